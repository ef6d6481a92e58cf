/* RandK indices from a counter-based rule (SPEC §10), one thread per stratum.
 *
 * [0, d) is split into k strata [floor(s*d/k), floor((s+1)*d/k)) of floor(d/k) or ceil(d/k)
 * elements; stratum s contributes start + mix(mix(s ^ seed_lo) ^ seed_hi) mod size. The indices
 * come out sorted, depend only on (seed, step, bucket key) (folded into seed_lo/seed_hi on the host)
 * and are bit for bit those of the reference path (commopt/kernels/reference.py).
 */
#include "portable.h"

/* A 32-bit avalanche mix (xorshift-multiply; both multipliers below 2^31 so that the reference path
 * computes the same products exactly in int64). */
DEVFN u32 mix32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x5bd1e995u;
    x ^= x >> 16;
    return x;
}

KERNEL void randk_indices(u32 d, u32 k, u32 seed_lo, u32 seed_hi, GLOBAL i64* out) {
    for (u32 s = BID * BDIM + TID; s < k; s += GDIM * BDIM) {
        u64 start = ((u64)s * (u64)d) / (u64)k;
        u64 end = ((u64)(s + 1u) * (u64)d) / (u64)k;
        u32 h = mix32(mix32(s ^ seed_lo) ^ seed_hi);
        out[s] = (i64)(start + (u64)(h % (u32)(end - start)));
    }
}
