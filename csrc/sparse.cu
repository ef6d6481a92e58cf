/* Message gather and scatter, and the ordered sum of gathered messages (SPEC §2-3, §10).
 *
 * A message is (idx[k], vals[k]) with distinct indices, so one launch of scatter_add has no two
 * threads writing the same element: no atomics at all. The ordered sum of n messages is n launches
 * in rank order on one stream (out <- 0, then out[idx_r] += vals_r for r = 0, 1, ...), which is
 * bitwise the same sum on every rank and in the reference path.
 */
#include "portable.h"

/* out[i] = x[idx[i]] */
KERNEL void gather_f32(GLOBAL const float* x, GLOBAL const i64* idx, u32 k, GLOBAL float* out) {
    for (u32 i = BID * BDIM + TID; i < k; i += GDIM * BDIM) out[i] = x[idx[i]];
}

/* x[idx[off + i]] += sign * vals[off + i] for i < k (sign is +1 or -1: exact, so x - v when -1) */
KERNEL void scatter_add_f32(GLOBAL float* x, GLOBAL const i64* idx, GLOBAL const float* vals,
                            u32 off, u32 k, float sign) {
    for (u32 i = BID * BDIM + TID; i < k; i += GDIM * BDIM) {
        i64 j = idx[off + i];
        x[j] = x[j] + sign * vals[off + i];
    }
}

/* the same with int32 indices, as the all-gather carries them (index_dtype of commopt.exchange) */
KERNEL void scatter_add_f32_i32(GLOBAL float* x, GLOBAL const i32* idx, GLOBAL const float* vals,
                                u32 off, u32 k, float sign) {
    for (u32 i = BID * BDIM + TID; i < k; i += GDIM * BDIM) {
        i32 j = idx[off + i];
        x[j] = x[j] + sign * vals[off + i];
    }
}

/* x[i] = 0 */
KERNEL void zero_f32(GLOBAL float* x, u32 n) {
    for (u32 i = BID * BDIM + TID; i < n; i += GDIM * BDIM) x[i] = 0.0f;
}
