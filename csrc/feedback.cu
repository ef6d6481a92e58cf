/* The feedback input of each error-feedback rule in one pass (SPEC §2), fp32.
 *
 * Each kernel reads the gradient and the rule's state once and writes the vector to compress (and
 * the rule's intermediate, if any). The arithmetic is the reference path's, operation for operation
 * and without contraction (see portable.h), so both paths give the same bits.
 */
#include "portable.h"

/* EF14: p = e + g */
KERNEL void ef14_input(GLOBAL const float* e, GLOBAL const float* g, u32 n, GLOBAL float* p) {
    for (u32 i = BID * BDIM + TID; i < n; i += GDIM * BDIM) p[i] = e[i] + g[i];
}

/* EF21: p = g - w_i */
KERNEL void ef21_input(GLOBAL const float* g, GLOBAL const float* w, u32 n, GLOBAL float* p) {
    for (u32 i = BID * BDIM + TID; i < n; i += GDIM * BDIM) p[i] = g[i] - w[i];
}

/* EF21-SGDM: v' = v*(1-beta) + g*beta, p = v' - w_i */
KERNEL void sgdm_input(GLOBAL const float* v, GLOBAL const float* g, GLOBAL const float* w, u32 n,
                       float one_minus_beta, float beta, GLOBAL float* v_out, GLOBAL float* p) {
    for (u32 i = BID * BDIM + TID; i < n; i += GDIM * BDIM) {
        float a = v[i] * one_minus_beta;
        float b = g[i] * beta;
        float vn = a + b;
        v_out[i] = vn;
        p[i] = vn - w[i];
    }
}

/* EControl: r = g - h_i, q = e + r, p = e*eta + r (p = q when eta_is_one) */
KERNEL void econtrol_input(GLOBAL const float* g, GLOBAL const float* h, GLOBAL const float* e, u32 n,
                           float eta, u32 eta_is_one, GLOBAL float* q, GLOBAL float* p) {
    for (u32 i = BID * BDIM + TID; i < n; i += GDIM * BDIM) {
        float r = g[i] - h[i];
        float qi = e[i] + r;
        q[i] = qi;
        if (eta_is_one) {
            p[i] = qi;
        } else {
            float s = e[i] * eta;
            p[i] = s + r;
        }
    }
}
