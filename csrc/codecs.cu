/* Value codecs of compact messages (SPEC §9), bit for bit as commopt.kernels.reference.TorchOps (SPEC §10).
 *
 * int8 / int4: symmetric absmax scaling per group of G values, one fp32 scale per group:
 *   quant_amax    one block per group: a shared-memory max reduction of the keys (float bits of |v|, sign
 *                 cleared; for non-negative floats the bits order like the value, NaN above inf);
 *   quant_scales  one block: s_g = fp32(max|v_g| / q) with the division in double (as the reference),
 *                 and if any group's max is not finite (a NaN or inf anywhere) every scale is NaN;
 *   quant_codes   code = rint(v / s) (round half to even) in double, clamped to [-q, q]; 0 where s is 0
 *                 (all-zero group, or a scale that underflowed) or NaN (the poisoned message).
 *   The quotients are done in double because a float quotient can round onto k + 0.5 (or off it) and
 *   change the code; double division is correctly rounded in CUDA and OpenCL alike. Without double
 *   (an OpenCL device lacking cl_khr_fp64) these two kernels are not compiled and the op falls back.
 *   dequant_f32   fp32(code) * s_g (one rounding, as the reference's fp32 multiply).
 *   pack_int4 / unpack_int4   two 4-bit two's-complement codes per byte, entry 2i in the low nibble.
 * bf16: f32_to_bf16 rounds to nearest even on the bits; a NaN becomes `nan_bits`, the NaN PyTorch's own
 * conversion gives on that device (0xFFFF on the CPU, the canonical 0x7FFF on CUDA), passed by the host.
 * No atomics at all: every output has one writer.
 */
#include "portable.h"

DEVFN u32 cdc_key(float x) { return F32_BITS(x) & 0x7fffffffu; }

/* amax[g] = the largest key of group g = v[g*G .. min((g+1)*G, k)) */
KERNEL void quant_amax(GLOBAL const float* v, u32 k, u32 group, u32 ngroups, GLOBAL u32* amax) {
    SMEM u32 s[COMMOPT_BLOCK];
    for (u32 g = BID; g < ngroups; g += GDIM) {
        u32 start = g * group;
        u32 n = (k - start < group) ? k - start : group;
        u32 m = 0u;
        for (u32 j = TID; j < n; j += BDIM) {
            u32 key = cdc_key(v[start + j]);
            m = key > m ? key : m;
        }
        s[TID] = m;
        BARRIER();
        for (u32 off = COMMOPT_BLOCK / 2u; off > 0u; off >>= 1) {
            if (TID < off) {
                u32 o = s[TID + off];
                if (o > s[TID]) s[TID] = o;
            }
            BARRIER();
        }
        if (TID == 0u) amax[g] = s[0];
        BARRIER();
    }
}

/* out[j] = fp32(codes[j]) * scales[j / G] */
KERNEL void dequant_f32(GLOBAL const i8* codes, u32 k, u32 group, GLOBAL const float* scales,
                        GLOBAL float* out) {
    for (u32 j = BID * BDIM + TID; j < k; j += GDIM * BDIM) out[j] = (float)codes[j] * scales[j / group];
}

/* out[i] = (codes[2i] & 15) | (codes[2i+1] & 15) << 4, the missing last code of an odd k as 0 */
KERNEL void pack_int4(GLOBAL const i8* codes, u32 k, GLOBAL u8* out) {
    u32 nb = (k + 1u) / 2u;
    for (u32 i = BID * BDIM + TID; i < nb; i += GDIM * BDIM) {
        u32 lo = ((u32)(i32)codes[2u * i]) & 15u;
        u32 hi = (2u * i + 1u < k) ? (((u32)(i32)codes[2u * i + 1u]) & 15u) : 0u;
        out[i] = (u8)(lo | (hi << 4));
    }
}

/* codes[j] = the sign-extended nibble j of packed (low nibble first) */
KERNEL void unpack_int4(GLOBAL const u8* packed, u32 k, GLOBAL i8* codes) {
    for (u32 j = BID * BDIM + TID; j < k; j += GDIM * BDIM) {
        u32 b = (u32)packed[j >> 1];
        u32 nib = (j & 1u) ? ((b >> 4) & 15u) : (b & 15u);
        codes[j] = (i8)((i32)(nib ^ 8u) - 8);
    }
}

/* out[j] = bfloat16 bits of x[j], round to nearest even; NaN -> nan_bits */
KERNEL void f32_to_bf16(GLOBAL const float* x, u32 n, u32 nan_bits, GLOBAL u16* out) {
    for (u32 j = BID * BDIM + TID; j < n; j += GDIM * BDIM) {
        u32 u = F32_BITS(x[j]);
        u32 r = ((u & 0x7fffffffu) > 0x7f800000u) ? nan_bits : ((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
        out[j] = (u16)r;
    }
}

#if defined(COMMOPT_HAS_F64)
/* One block: scales[g] = fp32(double(amax_g) / q), or NaN for every group if any amax_g is not finite. */
KERNEL void quant_scales(GLOBAL const u32* amax, u32 ngroups, u32 q, GLOBAL float* scales) {
    SMEM u32 s[COMMOPT_BLOCK];
    u32 bad = 0u;
    for (u32 g = TID; g < ngroups; g += BDIM) bad |= (amax[g] >= 0x7f800000u) ? 1u : 0u;
    s[TID] = bad;
    BARRIER();
    block_inclusive_scan(s);
    u32 poisoned = s[COMMOPT_BLOCK - 1u];
    for (u32 g = TID; g < ngroups; g += BDIM)
        scales[g] = poisoned ? BITS_F32(0x7fc00000u) : (float)((double)BITS_F32(amax[g]) / (double)q);
}

/* codes[j] = clamp(rint(double(v[j]) / double(s)), -q, q) for s = scales[j / G] > 0, else 0 */
KERNEL void quant_codes(GLOBAL const float* v, u32 k, u32 group, GLOBAL const float* scales, u32 q,
                        GLOBAL i8* codes) {
    double qd = (double)q;
    for (u32 j = BID * BDIM + TID; j < k; j += GDIM * BDIM) {
        float s = scales[j / group];
        i32 c = 0;
        if (s > 0.0f) {
            double r = rint((double)v[j] / (double)s);
            r = r > qd ? qd : (r < -qd ? -qd : r);
            c = (i32)r;
        }
        codes[j] = (i8)c;
    }
}
#endif
