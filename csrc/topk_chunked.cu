/* Chunked TopK (SPEC §9): the exact top k_c by magnitude of every chunk, one work-group per chunk (SPEC §10).
 *
 * x[0..d) is cut into chunks of `chunk` entries (chunk <= 65536); the last one may be shorter and keeps
 * k_last entries, every full chunk k_full (each clamped to its length). The output is the global int64
 * indices, in increasing order within each chunk and the chunks in order (chunk c starts at c * k_full),
 * exactly as TorchOps.topk_chunked returns them.
 *
 * Per chunk, as csrc/topk_select.cu does for the whole vector but with everything in shared memory:
 *   - three radix passes over the key (float bits of |x|, sign cleared: NaN above inf) of 11, 11 and
 *     9 bits (bits 30..20, 19..9, 8..0), each a shared-memory histogram of the keys matching the prefix
 *     found so far, then a shared-memory scan of the bins in descending order that fixes the digit
 *     holding the k-th largest key T;
 *   - a compaction: thread t owns a contiguous segment of the chunk, counts the keys above T and equal
 *     to T in it, a shared-memory scan of the counts gives every thread its offsets, and each thread
 *     writes its selected entries in index order: every key above T and the lowest-index keys equal to
 *     T (ties to the lowest index).
 * Integer atomics on the shared histogram counts only; the result does not depend on thread timing.
 * A grid smaller than the number of chunks loops (chunk c = BID, BID + GDIM, ...).
 */
#include "portable.h"

#define TKC_BINS 2048u

DEVFN u32 tkc_key(float x) { return F32_BITS(x) & 0x7fffffffu; }

/* Finds the digit of width `width` at `shift` holding the st[0]-th largest of the keys counted in h;
 * fixes it in the prefix st[1] / mask st[2] and leaves in st[0] how many keys of that digit to take. */
DEVFN void tkc_pick(SMEM_PTR u32* h, SMEM_PTR u32* s, SMEM_PTR u32* st, u32 shift, u32 width) {
    u32 nbins = 1u << width;
    u32 per = (nbins + COMMOPT_BLOCK - 1u) / COMMOPT_BLOCK;
    u32 t = TID;
    u32 mine = 0u;  /* thread t owns ranks [t*per, (t+1)*per) of the bins in descending digit order */
    for (u32 r = t * per; r < (t + 1u) * per && r < nbins; ++r) mine += h[nbins - 1u - r];
    s[t] = mine;
    BARRIER();
    block_inclusive_scan(s);
    u32 krem = st[0];
    u32 before = s[t] - mine;
    BARRIER();  /* every thread has read st[0] */
    if (before < krem && before + mine >= krem) {
        u32 acc = before;
        for (u32 r = t * per; r < (t + 1u) * per && r < nbins; ++r) {
            u32 b = nbins - 1u - r;
            u32 c = h[b];
            if (acc + c >= krem) {
                st[0] = krem - acc;
                st[1] = st[1] | (b << shift);
                st[2] = st[2] | ((nbins - 1u) << shift);
                break;
            }
            acc += c;
        }
    }
    BARRIER();
}

KERNEL void topk_chunked(GLOBAL const float* x, u32 d, u32 chunk, u32 nchunks, u32 k_full, u32 k_last,
                         GLOBAL i64* out_idx) {
    SMEM u32 h[TKC_BINS];
    SMEM u32 sa[COMMOPT_BLOCK];
    SMEM u32 sb[COMMOPT_BLOCK];
    SMEM u32 st[4];
    u32 t = TID;
    u32 kf = k_full < chunk ? k_full : chunk;
    for (u32 c = BID; c < nchunks; c += GDIM) {
        u32 start = c * chunk;
        u32 n = (d - start < chunk) ? d - start : chunk;
        u32 k = (n < chunk) ? k_last : k_full;
        if (k > n) k = n;
        GLOBAL const float* xc = x + start;
        GLOBAL i64* out = out_idx + (u64)c * kf;
        if (t == 0u) { st[0] = k; st[1] = 0u; st[2] = 0u; }
        BARRIER();
        for (u32 p = 0u; p < 3u; ++p) {
            u32 shift = (p == 0u) ? 20u : ((p == 1u) ? 9u : 0u);
            u32 width = (p == 2u) ? 9u : 11u;
            u32 dmask = (1u << width) - 1u;
            for (u32 i = t; i < TKC_BINS; i += BDIM) h[i] = 0u;
            BARRIER();
            u32 prefix = st[1], pmask = st[2];
            for (u32 j = t; j < n; j += BDIM) {
                u32 key = tkc_key(xc[j]);
                if ((key & pmask) == prefix) ATOMIC_ADD_U32(&h[(key >> shift) & dmask], 1u);
            }
            BARRIER();
            tkc_pick(h, sa, st, shift, width);
        }
        u32 need = st[0], thr = st[1];
        u32 per = (n + COMMOPT_BLOCK - 1u) / COMMOPT_BLOCK;
        u32 lo = t * per;
        u32 hi = lo + per;
        if (lo > n) lo = n;
        if (hi > n) hi = n;
        u32 gt = 0u, eq = 0u;
        for (u32 j = lo; j < hi; ++j) {
            u32 key = tkc_key(xc[j]);
            gt += (key > thr) ? 1u : 0u;
            eq += (key == thr) ? 1u : 0u;
        }
        sa[t] = gt;
        sb[t] = eq;
        BARRIER();
        block_inclusive_scan(sa);
        block_inclusive_scan(sb);
        u32 rg = sa[t] - gt, re = sb[t] - eq;  /* keys above / equal to T before this segment */
        for (u32 j = lo; j < hi; ++j) {
            u32 key = tkc_key(xc[j]);
            if (key > thr) {
                out[rg + (re < need ? re : need)] = (i64)(start + j);
                rg += 1u;
            } else if (key == thr) {
                if (re < need) out[rg + re] = (i64)(start + j);
                re += 1u;
            }
        }
        BARRIER();  /* before the next chunk reuses st, h, sa, sb */
    }
}
