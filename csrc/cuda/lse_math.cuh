// Helpers shared by the kernels that keep running log-sum-exps (the sim_lse /
// SigLIP tile epilogues, sinkhorn.cu, swav_ce.cu): exp / log overloads for fp32
// and fp64, the online (max, sum of exp) updates and a multiply that is never
// contracted into an FMA.
//
// The scalar helpers are __host__ __device__ under nvcc and plain inline
// functions under a C++ compiler, so that the CPU instantiation of the tiling
// (csrc/cpu/sim_lse_tiled.cpp) runs the same lines as the CUDA kernels.  The
// warp-level helpers exist only under nvcc.
#pragma once

#include <cmath>
#include <limits>

// static: internal linkage in every translation unit, so that a host copy compiled by nvcc never
// stands in for the one g++ compiled (or the reverse) at link time.
#if defined(__CUDACC__)
#define CO_HD static __host__ __device__ __forceinline__
#else
#define CO_HD static inline
#endif

// A loop the device compiler must not unroll (short runtime trip counts).
#if defined(__CUDACC__)
#define CO_NO_UNROLL _Pragma("unroll 1")
#else
#define CO_NO_UNROLL
#endif

namespace contrastive_ops {
namespace lse_math {

CO_HD float dexp(float x) { return expf(x); }
CO_HD double dexp(double x) { return exp(x); }
// exp of the epilogues' per-element sums and gradients: on the GPU the hardware exponential
// (ex2.approx.ftz of x·log2(e), as Triton's tl.exp; relative error about 2^-22 + |x|·2^-24,
// results below 2^-126 flushed to 0, exp(-inf) = 0), on the host expf; exp in double on both.
// x is a logit minus a maximum or an LSE, computed before the call, so the error does not grow
// with the logits themselves.
CO_HD float fexp(float x) {
#if defined(__CUDA_ARCH__)
  float y;  // ex2.approx.ftz: one multiply and one MUFU.EX2 (__expf adds a denormal-range fix-up)
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else
  return expf(x);
#endif
}
CO_HD double fexp(double x) { return exp(x); }
// a / b for a divisor in [1, 2] (a sigmoid's 1 + e^-|v|): on the GPU the fast division (2 ulp, no
// slow path for denormal or huge divisors, which cannot occur), on the host the IEEE one.
CO_HD float fdiv(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdividef(a, b);
#else
  return a / b;
#endif
}
CO_HD double fdiv(double a, double b) { return a / b; }
CO_HD float dlog(float x) { return logf(x); }
CO_HD double dlog(double x) { return log(x); }
CO_HD float dlog1p(float x) { return log1pf(x); }
CO_HD double dlog1p(double x) { return log1p(x); }
CO_HD float dabs(float x) { return fabsf(x); }
CO_HD double dabs(double x) { return fabs(x); }

// a·b rounded to the dtype, never fused with a following add or subtract.  The
// backward recomputes S = scale·G and subtracts the forward's LSE from it: the
// product must be the one the forward rounded, or at logits ~1e8 the softmax
// weights are off by up to exp(half an ulp of S).  Host code is compiled with
// -ffp-contract=off; device code uses the round-to-nearest intrinsics, which
// nvcc never contracts.
CO_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
CO_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// max(a, b), NaN if either is NaN (one FMNMX.NAN on the GPU for fp32).
CO_HD float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return a != a || a > b ? a : b;
#endif
}
CO_HD double nan_max(double a, double b) { return a != a || a > b ? a : b; }

template <typename T>
CO_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Merge (m2, s2) into (m, s): both describe Σ e^x as s·e^m (s = 0, m = -inf when empty).
template <typename T>
CO_HD void lse_merge(T& m, T& s, T m2, T s2) {
  const T mn = m > m2 ? m : m2;
  if (mn == neg_inf<T>()) return;  // both empty
  s = s * dexp(m - mn) + s2 * dexp(m2 - mn);
  m = mn;
}

// Add e^x to (m, s); x must not be -inf.
template <typename T>
CO_HD void lse_push(T& m, T& s, T x) {
  if (x > m) {
    s = s * dexp(m - x) + T(1);
    m = x;
  } else {
    s += dexp(x - m);
  }
}

#if defined(__CUDACC__)
// (m, s) of a warp merged over its 32 lanes (every lane gets the result).
template <typename T>
static __device__ __forceinline__ void warp_lse_merge(T& m, T& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
}

template <typename T>
static __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Maximum over the warp (every lane gets it), NaN if any lane holds NaN: a row with one NaN logit
// gets a NaN statistic whichever lane holds it.
template <typename T>
static __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
#endif

}  // namespace lse_math
}  // namespace contrastive_ops
