/* portable.h: one kernel source, two compilers (SPEC §10).
 *
 * Every file in csrc/ includes this header and uses only the names below, so the
 * same text compiles as CUDA C++ (NVRTC through CuPy, or nvcc in CI) and as
 * OpenCL C (PoCL on the CPU in the test suite).
 *
 *   KERNEL        a kernel entry point (unmangled name)
 *   GLOBAL        pointer to device memory            SMEM      a shared (local) array declaration
 *   SMEM_PTR      pointer into shared (local) memory  DEVFN     a device helper function
 *   BARRIER()     block-wide barrier (shared and global memory)
 *   TID, BID      thread id in the block, block id   BDIM, GDIM  threads per block, blocks in the grid
 *   ATOMIC_ADD_U32(p, v)   integer atomic add, shared or global memory (there are no float atomics)
 *   F32_BITS(x)   the bits of a float as u32          BITS_F32(u)  the float of u32 bits
 *   u32, i32, u64, i64, u16, u8, i8     fixed-width integers
 *   COMMOPT_HAS_F64        defined where double is available (always in CUDA; OpenCL with cl_khr_fp64):
 *                          a kernel that needs double is compiled only then (the op falls back otherwise)
 *
 * No warp intrinsics are used: every scan and reduction is a shared-memory one,
 * so nothing depends on the warp size. Float contraction is off on both sides
 * (FP_CONTRACT OFF here, --fmad=false for NVRTC/nvcc): a*b+c rounds twice, as
 * the PyTorch reference ops, which run a*b and +c as separate ops, do.
 */
#ifndef COMMOPT_PORTABLE_H
#define COMMOPT_PORTABLE_H

#if defined(__OPENCL_VERSION__)
#pragma OPENCL FP_CONTRACT OFF
typedef uint u32;
typedef int i32;
typedef ulong u64;
typedef long i64;
typedef ushort u16;
typedef uchar u8;
typedef char i8;
#if defined(cl_khr_fp64)
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define COMMOPT_HAS_F64 1
#endif
#define KERNEL __kernel
#define GLOBAL __global
#define SMEM __local
#define SMEM_PTR __local
#define DEVFN inline
#define BARRIER() barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE)
#define TID ((u32)get_local_id(0))
#define BID ((u32)get_group_id(0))
#define BDIM ((u32)get_local_size(0))
#define GDIM ((u32)get_num_groups(0))
#define ATOMIC_ADD_U32(p, v) atomic_add((p), (v))
#define F32_BITS(x) as_uint(x)
#define BITS_F32(u) as_float(u)
#else
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned short u16;
typedef unsigned char u8;
typedef signed char i8;
#define COMMOPT_HAS_F64 1
#define KERNEL extern "C" __global__
#define GLOBAL
#define SMEM __shared__
#define SMEM_PTR
#define DEVFN __device__ __forceinline__
#define BARRIER() __syncthreads()
#define TID ((u32)threadIdx.x)
#define BID ((u32)blockIdx.x)
#define BDIM ((u32)blockDim.x)
#define GDIM ((u32)gridDim.x)
#define ATOMIC_ADD_U32(p, v) atomicAdd((p), (v))
#define F32_BITS(x) __float_as_uint(x)
#define BITS_F32(u) __uint_as_float(u)
#endif

/* Threads per block of every kernel (the launcher uses the same number). */
#define COMMOPT_BLOCK 256

/* Inclusive scan of s[0..COMMOPT_BLOCK) in place (Hillis-Steele); every thread calls it. */
DEVFN void block_inclusive_scan(SMEM_PTR u32* s) {
    u32 t = TID;
    for (u32 off = 1; off < COMMOPT_BLOCK; off <<= 1) {
        u32 v = (t >= off) ? s[t - off] : 0u;
        BARRIER();
        s[t] += v;
        BARRIER();
    }
}

#endif
