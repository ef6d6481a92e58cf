/* Exact top-k by magnitude: radix select on the float bits, then a deterministic compaction (SPEC §10).
 *
 * The key of x[j] is its float bits with the sign cleared: for non-negative floats the bit pattern
 * orders like the value, NaN sorts above inf. Three histogram passes find the k-th largest key T one
 * digit at a time (bits 30..20, 19..9, 8..0); each pass reads x once. Then
 *   topk_count   counts, per tile, the keys above T and equal to T,
 *   topk_scan    turns the counts into exclusive offsets (one block),
 *   topk_write   writes exactly k (index, value) pairs in index order: every key above T, and the
 *                lowest-index keys equal to T (ties go to the lowest index).
 * Only integer atomics, on histogram counts: the result does not depend on thread timing.
 *
 * state (u32[4]): [0] k still to place (after the last pass: how many keys equal to T to take),
 *                 [1] the prefix of T found so far, [2] the mask of the bits found, [3] unused.
 * hist (u32[3 * 2048]): one histogram per pass.
 */
#include "portable.h"

#define RADIX_BINS 2048u
#define TILE_ITEMS 8u
#define TILE (COMMOPT_BLOCK * TILE_ITEMS)

DEVFN u32 mag_key(float x) { return F32_BITS(x) & 0x7fffffffu; }

/* One block: state <- (k, 0, 0), histograms <- 0. */
KERNEL void topk_init(GLOBAL u32* state, GLOBAL u32* hist, u32 k) {
    for (u32 i = TID; i < 3u * RADIX_BINS; i += BDIM) hist[i] = 0u;
    if (TID == 0) { state[0] = k; state[1] = 0u; state[2] = 0u; state[3] = 0u; }
}

/* Histogram of digit (key >> shift) & (2^width - 1) over the keys whose found bits match the prefix. */
KERNEL void topk_hist(GLOBAL const float* x, u32 n, GLOBAL const u32* state, GLOBAL u32* hists,
                      u32 pass, u32 shift, u32 width) {
    GLOBAL u32* hist = hists + pass * RADIX_BINS;
    SMEM u32 h[RADIX_BINS];
    for (u32 i = TID; i < RADIX_BINS; i += BDIM) h[i] = 0u;
    BARRIER();
    u32 prefix = state[1], pmask = state[2], dmask = (1u << width) - 1u;
    for (u32 j = BID * BDIM + TID; j < n; j += GDIM * BDIM) {
        u32 key = mag_key(x[j]);
        if ((key & pmask) == prefix) ATOMIC_ADD_U32(&h[(key >> shift) & dmask], 1u);
    }
    BARRIER();
    for (u32 i = TID; i < RADIX_BINS; i += BDIM)
        if (h[i] != 0u) ATOMIC_ADD_U32(&hist[i], h[i]);
}

/* One block: the digit that holds the k-th largest matching key; fixes it in the prefix and
 * subtracts the keys of the larger digits from k. */
KERNEL void topk_pick(GLOBAL u32* state, GLOBAL const u32* hists, u32 pass, u32 shift, u32 width) {
    GLOBAL const u32* hist = hists + pass * RADIX_BINS;
    SMEM u32 s[COMMOPT_BLOCK];
    u32 nbins = 1u << width;
    u32 per = (nbins + COMMOPT_BLOCK - 1u) / COMMOPT_BLOCK;
    u32 t = TID;
    /* thread t owns ranks [t*per, (t+1)*per) of the bins in descending digit order */
    u32 mine = 0u;
    for (u32 r = t * per; r < (t + 1u) * per && r < nbins; ++r) mine += hist[nbins - 1u - r];
    s[t] = mine;
    BARRIER();
    block_inclusive_scan(s);
    u32 krem = state[0];
    u32 before = s[t] - mine;
    BARRIER();
    if (before < krem && before + mine >= krem) {
        u32 acc = before;
        for (u32 r = t * per; r < (t + 1u) * per && r < nbins; ++r) {
            u32 b = nbins - 1u - r;
            u32 c = hist[b];
            if (acc + c >= krem) {
                state[0] = krem - acc;
                state[1] = state[1] | (b << shift);
                state[2] = state[2] | ((nbins - 1u) << shift);
                break;
            }
            acc += c;
        }
    }
}

/* Per tile of TILE consecutive elements: how many keys are above T and equal to T. */
KERNEL void topk_count(GLOBAL const float* x, u32 n, GLOBAL const u32* state,
                       GLOBAL u32* count_gt, GLOBAL u32* count_eq) {
    SMEM u32 s[COMMOPT_BLOCK];
    u32 thr = state[1];
    u32 gt = 0u, eq = 0u;
    u32 base = BID * TILE;
    for (u32 it = 0; it < TILE_ITEMS; ++it) {
        u32 j = base + it * COMMOPT_BLOCK + TID;
        if (j < n) {
            u32 key = mag_key(x[j]);
            gt += (key > thr) ? 1u : 0u;
            eq += (key == thr) ? 1u : 0u;
        }
    }
    s[TID] = gt | (eq << 16);  /* at most TILE = 2048 of each */
    BARRIER();
    block_inclusive_scan(s);
    if (TID == COMMOPT_BLOCK - 1u) {
        count_gt[BID] = s[TID] & 0xffffu;
        count_eq[BID] = s[TID] >> 16;
    }
}

/* One block: exclusive prefix sums of the per-tile counts, in place. */
KERNEL void topk_scan(GLOBAL u32* count_gt, GLOBAL u32* count_eq, u32 ntiles) {
    SMEM u32 a[COMMOPT_BLOCK];
    SMEM u32 b[COMMOPT_BLOCK];
    u32 carry_gt = 0u, carry_eq = 0u;
    for (u32 base = 0; base < ntiles; base += COMMOPT_BLOCK) {
        u32 i = base + TID;
        u32 vg = (i < ntiles) ? count_gt[i] : 0u;
        u32 ve = (i < ntiles) ? count_eq[i] : 0u;
        a[TID] = vg;
        b[TID] = ve;
        BARRIER();
        block_inclusive_scan(a);
        block_inclusive_scan(b);
        if (i < ntiles) {
            count_gt[i] = carry_gt + a[TID] - vg;
            count_eq[i] = carry_eq + b[TID] - ve;
        }
        carry_gt += a[COMMOPT_BLOCK - 1u];
        carry_eq += b[COMMOPT_BLOCK - 1u];
        BARRIER();
    }
}

/* Writes the k selected (index, value) pairs in index order. An element's slot is
 * (keys above T before it) + min(keys equal to T before it, the number of ties to take). */
KERNEL void topk_write(GLOBAL const float* x, u32 n, GLOBAL const u32* state,
                       GLOBAL const u32* off_gt, GLOBAL const u32* off_eq,
                       GLOBAL i64* out_idx, GLOBAL float* out_val) {
    SMEM u32 s[COMMOPT_BLOCK];
    u32 need = state[0], thr = state[1];
    u32 run_gt = off_gt[BID], run_eq = off_eq[BID];
    u32 base = BID * TILE;
    for (u32 it = 0; it < TILE_ITEMS; ++it) {
        u32 j = base + it * COMMOPT_BLOCK + TID;
        u32 key = 0u, fg = 0u, fe = 0u;
        float v = 0.0f;
        if (j < n) {
            v = x[j];
            key = mag_key(v);
            fg = (key > thr) ? 1u : 0u;
            fe = (key == thr) ? 1u : 0u;
        }
        u32 mine = fg | (fe << 16);
        s[TID] = mine;
        BARRIER();
        block_inclusive_scan(s);
        u32 excl = s[TID] - mine, tot = s[COMMOPT_BLOCK - 1u];
        u32 gt_before = run_gt + (excl & 0xffffu), eq_before = run_eq + (excl >> 16);
        if (fg || (fe && eq_before < need)) {
            u32 pos = gt_before + (eq_before < need ? eq_before : need);
            out_idx[pos] = (i64)j;
            out_val[pos] = v;
        }
        run_gt += tot & 0xffffu;
        run_eq += tot >> 16;
        BARRIER();
    }
}
