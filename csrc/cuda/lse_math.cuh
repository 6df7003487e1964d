// Device helpers shared by the CUDA kernels that keep running log-sum-exps
// (sinkhorn.cu, swav_ce.cu): exp / log overloads for fp32 and fp64, and the
// online (max, sum of exp) updates.
#pragma once

#include <cmath>
#include <limits>

namespace contrastive_ops {
namespace lse_math {

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Merge (m2, s2) into (m, s): both describe Σ e^x as s·e^m (s = 0, m = -inf when empty).
template <typename T>
__device__ __forceinline__ void lse_merge(T& m, T& s, T m2, T s2) {
  const T mn = m > m2 ? m : m2;
  if (mn == neg_inf<T>()) return;  // both empty
  s = s * dexp(m - mn) + s2 * dexp(m2 - mn);
  m = mn;
}

// Add e^x to (m, s).
template <typename T>
__device__ __forceinline__ void lse_push(T& m, T& s, T x) {
  if (x > m) {
    s = s * dexp(m - x) + T(1);
    m = x;
  } else {
    s += dexp(x - m);
  }
}

// (m, s) of a warp merged over its 32 lanes (every lane gets the result).
template <typename T>
__device__ __forceinline__ void warp_lse_merge(T& m, T& s) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const T s2 = __shfl_xor_sync(0xffffffffu, s, off);
    lse_merge(m, s, m2, s2);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace lse_math
}  // namespace contrastive_ops
