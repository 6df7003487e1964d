// CUDA epilogue kernels of the tiled similarity-LSE core and SigLIP pair sum
// (maths in csrc/tiling.h).  Deliberately simple: one block per tile row for
// the row statistics, one thread per column for the column statistics, and
// grid-stride elementwise kernels with a block reduction + atomicAdd for the
// backward.  Accumulation type T is float (float64 for float64 inputs); dS
// tiles may be written in half/bfloat16 for tensor-core GEMMs.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>

#include "epilogues.h"

namespace contrastive_ops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dlog1p(double x) { return log1p(x); }

template <typename T>
__device__ __forceinline__ T softplus(T v) {
  return (v > T(0) ? v : T(0)) + dlog1p(dexp(-fabs(v)));
}

template <typename T>
__device__ __forceinline__ T sigmoid(T v) {
  const T e = dexp(-fabs(v));
  return v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
}

// Block-wide reductions (blockDim.x == kThreads, a multiple of 32); result valid in every thread.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T smem[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = smem[0];
  for (int w = 1; w < kThreads / 32; ++w) v = op(v, smem[w]);
  return v;
}

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// Masks as raw pointers (nullptr when absent).
struct DevMasks {
  const int32_t* cs;
  const int32_t* ce;
  const int32_t* ex;
  int64_t E, M;
};

DevMasks dev_masks(const Masks& mk) {
  return {mk.col_start ? mk.col_start->data_ptr<int32_t>() : nullptr,
          mk.col_end ? mk.col_end->data_ptr<int32_t>() : nullptr,
          mk.exclude ? mk.exclude->data_ptr<int32_t>() : nullptr, mk.E(), mk.M};
}

// Is candidate gj (a position in K) allowed for anchor gi?
__device__ __forceinline__ bool allowed(const DevMasks& mk, int64_t gi, int64_t gj) {
  if (mk.cs && gj < int64_t(mk.cs[gi])) return false;
  if (mk.ce && gj >= int64_t(mk.ce[gi])) return false;
  for (int64_t x = 0; x < mk.E; ++x)
    if (int64_t(mk.ex[gi * mk.E + x]) == gj) return false;
  return true;
}

// Merge (m2, s2) into the running (m, s) of a log-sum-exp.
template <typename T>
__device__ __forceinline__ void lse_merge(T* m, T* s, T m2, T s2) {
  const T m1 = *m;
  if (m2 > m1) {
    *s = *s * dexp(m1 - m2) + s2;  // exp(-inf) == 0 while m1 is still -inf
    *m = m2;
  } else {
    *s += s2 * dexp(m2 - m1);
  }
}

template <typename T>
__global__ void lse_fwd_rows_kernel(T* __restrict__ G, int64_t bc, const T* __restrict__ scale, int64_t r0,
                                    int64_t c0, DevMasks mk, T* __restrict__ row_m, T* __restrict__ row_s) {
  const int64_t i = blockIdx.x, gi = r0 + i;
  T* p = G + i * bc;
  const T sc = *scale;
  T m = neg_inf<T>();
  for (int64_t j = threadIdx.x; j < bc; j += blockDim.x) {
    const T v = allowed(mk, gi, c0 + j) ? sc * p[j] : neg_inf<T>();
    p[j] = v;  // the column kernel reads the masked tile
    m = v > m ? v : m;
  }
  m = block_reduce(m, MaxOp());
  if (m == neg_inf<T>()) return;  // uniform across the block
  T s = 0;
  for (int64_t j = threadIdx.x; j < bc; j += blockDim.x) s += dexp(p[j] - m);  // own elements only
  s = block_reduce(s, SumOp());
  if (threadIdx.x == 0) lse_merge(row_m + gi, row_s + gi, m, s);
}

template <typename T>
__global__ void lse_fwd_cols_kernel(const T* __restrict__ G, int64_t br, int64_t bc, int64_t c0,
                                    T* __restrict__ col_m, T* __restrict__ col_s) {
  const int64_t j = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= bc) return;
  T m = neg_inf<T>(), s = 0;
  for (int64_t i = 0; i < br; ++i) {  // coalesced: neighbouring threads read neighbouring columns
    const T v = G[i * bc + j];
    if (v > m) {
      s = s * dexp(m - v) + T(1);
      m = v;
    } else if (v != neg_inf<T>()) {
      s += dexp(v - m);
    }
  }
  if (m == neg_inf<T>()) return;
  lse_merge(col_m + c0 + j, col_s + c0 + j, m, s);
}

template <typename T, typename O>
__global__ void lse_bwd_kernel(const T* __restrict__ G, O* __restrict__ dS, int64_t br, int64_t bc,
                               const T* __restrict__ scale, int64_t r0, int64_t c0, DevMasks mk,
                               const T* __restrict__ rl, const T* __restrict__ gr, const T* __restrict__ cl,
                               const T* __restrict__ gc, bool has_col, T* __restrict__ dscale) {
  const T sc = *scale;
  T acc = 0;
  const int64_t n = br * bc;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / bc, j = idx - i * bc, gi = r0 + i, gj = c0 + j;
    T d = 0;
    if (allowed(mk, gi, gj)) {
      const T g = G[idx], s = sc * g;
      d = gr[gi] * dexp(s - rl[gi]);  // rl, cl are +inf where the LSE was -inf: the term is 0
      if (has_col) d += gc[gj] * dexp(s - cl[gj]);
      acc += d * g;
    }
    dS[idx] = static_cast<O>(d);
  }
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) atomicAdd(dscale, acc);
}

template <typename T>
__global__ void siglip_fwd_kernel(const T* __restrict__ G, int64_t br, int64_t bc, const T* __restrict__ scale,
                                  const T* __restrict__ bias, int64_t r0, int64_t c0, T* __restrict__ total) {
  const T sc = *scale, b = *bias;
  T acc = 0;
  const int64_t n = br * bc;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / bc, j = idx - i * bc;
    const T l = sc * G[idx] + b;
    acc += softplus(r0 + i == c0 + j ? -l : l);  // z = +1 on the diagonal, -1 elsewhere
  }
  acc = block_reduce(acc, SumOp());
  if (threadIdx.x == 0) atomicAdd(total, acc);
}

template <typename T, typename O>
__global__ void siglip_bwd_kernel(const T* __restrict__ G, O* __restrict__ dL, int64_t br, int64_t bc,
                                  const T* __restrict__ scale, const T* __restrict__ bias, const T* __restrict__ grad,
                                  int64_t r0, int64_t c0, T* __restrict__ dscale, T* __restrict__ dbias) {
  const T sc = *scale, b = *bias, gr = *grad;
  T a0 = 0, a1 = 0;
  const int64_t n = br * bc;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / bc, j = idx - i * bc;
    const T g = G[idx];
    const T d = gr * (sigmoid(sc * g + b) - (r0 + i == c0 + j ? T(1) : T(0)));
    dL[idx] = static_cast<O>(d);
    a0 += d;
    a1 += d * g;
  }
  a0 = block_reduce(a0, SumOp());
  a1 = block_reduce(a1, SumOp());
  if (threadIdx.x == 0) {
    atomicAdd(dbias, a0);
    atomicAdd(dscale, a1);
  }
}

int grid_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return int(std::max<int64_t>(1, std::min<int64_t>(blocks, 8192)));
}

// Calls f(T{}, O{}) with T the accumulation type of G and O the element type of the dS tile.
template <typename F>
void dispatch_acc_out(const Tensor& G, const Tensor& dS, F&& f) {
  const auto gt = G.scalar_type(), dt = dS.scalar_type();
  if (gt == at::kDouble && dt == at::kDouble) return f(double{}, double{});
  TORCH_CHECK(gt == at::kFloat, "contrastive_ops (cuda): unexpected tile dtype ", gt);
  if (dt == at::kFloat) return f(float{}, float{});
  if (dt == at::kHalf) return f(float{}, c10::Half{});
  if (dt == at::kBFloat16) return f(float{}, c10::BFloat16{});
  TORCH_CHECK(false, "contrastive_ops (cuda): unexpected dS dtype ", dt);
}

}  // namespace

void lse_fwd_rows(Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk, Tensor& row_m,
                  Tensor& row_s) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lse_fwd_rows", [&] {
    lse_fwd_rows_kernel<scalar_t><<<unsigned(br), kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), bc, scale.data_ptr<scalar_t>(), r0, c0, dev_masks(mk), row_m.data_ptr<scalar_t>(),
        row_s.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lse_fwd_cols(const Tensor& G, int64_t c0, Tensor& col_m, Tensor& col_s) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lse_fwd_cols", [&] {
    lse_fwd_cols_kernel<scalar_t><<<unsigned((bc + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), br, bc, c0, col_m.data_ptr<scalar_t>(), col_s.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lse_bwd(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk,
             const Tensor& rl, const Tensor& gr, const Tensor& cl, const Tensor& gc, bool has_col, Tensor& dscale) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_acc_out(G, dS, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    lse_bwd_kernel<T, O><<<grid_for(br * bc), kThreads, 0, stream>>>(
        G.data_ptr<T>(), dS.data_ptr<O>(), br, bc, scale.data_ptr<T>(), r0, c0, dev_masks(mk), rl.data_ptr<T>(),
        gr.data_ptr<T>(), has_col ? cl.data_ptr<T>() : nullptr, has_col ? gc.data_ptr<T>() : nullptr, has_col,
        dscale.data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void siglip_fwd(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0, Tensor& total) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "siglip_fwd", [&] {
    siglip_fwd_kernel<scalar_t><<<grid_for(br * bc), kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), br, bc, scale.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), r0, c0,
        total.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void siglip_bwd(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias, const Tensor& grad, int64_t r0,
                int64_t c0, Tensor& dscale, Tensor& dbias) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_acc_out(G, dL, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    siglip_bwd_kernel<T, O><<<grid_for(br * bc), kThreads, 0, stream>>>(
        G.data_ptr<T>(), dL.data_ptr<O>(), br, bc, scale.data_ptr<T>(), bias.data_ptr<T>(), grad.data_ptr<T>(), r0,
        c0, dscale.data_ptr<T>(), dbias.data_ptr<T>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace contrastive_ops
