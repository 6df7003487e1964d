// CUDA epilogue kernels of the tiled similarity-LSE core and SigLIP pair sum
// (maths in csrc/tiling.h, per-element lines in csrc/cuda/tile_math.cuh).
//
// One 2-D grid per tile: a thread block covers kSubRows rows × kThreads columns
// (one column per thread, rows walked in order: coalesced reads of the tile).
// Each element of G is read once:
//   forward   S = scale·G under the masks, never written back; per block, the
//             row (max, sum) of each of its rows (warp shuffles, then the 8
//             warps merged in order) and, only when columns are wanted, the
//             column (max, sum) of each of its columns (in registers); a merge
//             kernel folds the partials into the running row / column
//             statistics in partial order.
//   backward  dS (σ·dS for fp16 tiles, see ds_scale in csrc/tiling.h) written
//             in the same read; Σ dS·G as one partial per block, summed in
//             block order by a one-block kernel.
// No floating-point atomics: results are bitwise reproducible run to run.
// Accumulation type T is float (double for float64 inputs); dS tiles may be
// half/bfloat16 for tensor-core GEMMs.  Indices are 2-D: no 64-bit division.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include "epilogues.h"
#include "tile_math.cuh"

namespace contrastive_ops {
namespace cuda {
namespace {

using namespace tile_math;

constexpr int kThreads = 256;  // columns of a sub-block (one per thread)
constexpr int kWarps = kThreads / 32;
constexpr int kSubRows = 32;  // rows of a sub-block

// Sum over the block in a fixed order (warp tree, then the warps in order); valid in every thread.
template <typename T>
__device__ T block_sum(T v) {
  __shared__ T sm[kWarps];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // sm may still be read by a previous call
  if (lane == 0) sm[warp] = v;
  __syncthreads();
  T a = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) a += sm[w];
  return a;
}

struct Grid2 {
  unsigned nbx, nby;
};
Grid2 grid2(int64_t br, int64_t bc) {
  const int64_t nbx = (bc + kThreads - 1) / kThreads, nby = (br + kSubRows - 1) / kSubRows;
  TORCH_CHECK(nby <= 65535, "contrastive_ops (cuda): tile of ", br, " rows is too tall");
  return {unsigned(nbx), unsigned(nby)};
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    lse_fwd_kernel(const T* __restrict__ G, int64_t br, int64_t bc, const T* __restrict__ scale, int64_t r0,
                   int64_t c0, DevMasks mk, T* __restrict__ rpm, T* __restrict__ rps, T* __restrict__ cpm,
                   T* __restrict__ cps) {
  __shared__ T wm[kSubRows][kWarps], ws[kSubRows][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const bool in = j < bc, cols = cpm != nullptr;
  const T sc = *scale;
  T cm = neg_inf<T>(), cs = 0;
  const T* p = G + i0 * bc + j;
  for (int r = 0; r < nrows; ++r, p += bc) {
    const T v = in ? masked_logit(mk, sc, *p, r0 + i0 + r, c0 + j) : neg_inf<T>();
    if (cols) lse_push_masked(cm, cs, v);
    const T m = warp_max(v);
    const T e = warp_sum(v == neg_inf<T>() ? T(0) : dexp(v - m));
    if (lane == 0) {
      wm[r][warp] = m;
      ws[r][warp] = e;
    }
  }
  __syncthreads();
  if (int(threadIdx.x) < nrows) {
    T m = neg_inf<T>(), s = 0;
    merge_parts(m, s, &wm[threadIdx.x][0], &ws[threadIdx.x][0], kWarps, 1);
    const int64_t o = int64_t(blockIdx.x) * br + i0 + threadIdx.x;
    rpm[o] = m;
    rps[o] = s;
  }
  if (cols && in) {
    const int64_t o = int64_t(blockIdx.y) * bc + j;
    cpm[o] = cm;
    cps[o] = cs;
  }
}

// (m[i], s[i]) ← merge of (m[i], s[i]) and the partials (pm, ps)[p·n + i], p = 0..nparts-1 in order.
template <typename T>
__global__ void merge_kernel(T* __restrict__ m, T* __restrict__ s, const T* __restrict__ pm,
                             const T* __restrict__ ps, int64_t n, int64_t nparts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T mi = m[i], si = s[i];
  merge_parts(mi, si, pm + i, ps + i, nparts, n);
  m[i] = mi;
  s[i] = si;
}

// *out += Σ part[0..n) in a fixed order (one block).
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_kernel(const T* __restrict__ part, int64_t n, T* __restrict__ out) {
  T a = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) a += part[i];
  a = block_sum(a);
  if (threadIdx.x == 0) *out += a;
}

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    lse_bwd_kernel(const T* __restrict__ G, O* __restrict__ dS, int64_t br, int64_t bc, const T* __restrict__ scale,
                   int64_t r0, int64_t c0, DevMasks mk, const T* __restrict__ rl, const T* __restrict__ gr,
                   const T* __restrict__ cl, const T* __restrict__ gc, bool has_col, T* __restrict__ part) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const T sc = *scale;
  T acc = 0;
  if (j < bc) {
    const int64_t gj = c0 + j;
    const T clj = has_col ? cl[gj] : T(0), gcj = has_col ? gc[gj] : T(0);
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r, gi = r0 + i;
      const T g = G[i * bc + j];
      T d = 0;
      const T s = mul_rn(sc, g);
      if (allowed(mk, gi, gj) && under_row_max(mk, s, gi)) {
        d = lse_grad(s, rl[gi], gr[gi], has_col, clj, gcj);
        acc += d * g;
      }
      dS[i * bc + j] = static_cast<O>(d);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    siglip_fwd_kernel(const T* __restrict__ G, int64_t br, int64_t bc, const T* __restrict__ scale,
                      const T* __restrict__ bias, int64_t r0, int64_t c0, T* __restrict__ part) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const T sc = *scale, b = *bias;
  T acc = 0;
  if (j < bc) {
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r;
      acc += siglip_term(siglip_logit(sc, b, G[i * bc + j]), r0 + i == c0 + j);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    siglip_bwd_kernel(const T* __restrict__ G, O* __restrict__ dL, int64_t br, int64_t bc,
                      const T* __restrict__ scale, const T* __restrict__ bias, const T* __restrict__ grad,
                      int64_t r0, int64_t c0, T* __restrict__ part0, T* __restrict__ part1) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const T sc = *scale, b = *bias, gr = *grad;
  T a0 = 0, a1 = 0;
  if (j < bc) {
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r;
      const T g = G[i * bc + j];
      const T d = siglip_grad(siglip_logit(sc, b, g), r0 + i == c0 + j, gr);
      dL[i * bc + j] = static_cast<O>(d);
      a0 += d;
      a1 += d * g;
    }
  }
  a0 = block_sum(a0);
  a1 = block_sum(a1);
  if (threadIdx.x == 0) {
    const int64_t o = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
    part0[o] = a0;
    part1[o] = a1;
  }
}

template <typename T>
void launch_sum(const Tensor& part, Tensor& out, cudaStream_t stream) {
  sum_kernel<T><<<1, kThreads, 0, stream>>>(part.data_ptr<T>(), part.numel(), out.data_ptr<T>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_merge(T* m, T* s, const Tensor& pm, const Tensor& ps, int64_t n, int64_t nparts, cudaStream_t stream) {
  merge_kernel<T><<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      m, s, pm.data_ptr<T>(), ps.data_ptr<T>(), n, nparts);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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

void check_tile(const Tensor& G) {
  TORCH_CHECK(G.is_contiguous(), "contrastive_ops (cuda): tile must be contiguous");
}

}  // namespace

void lse_fwd(const Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk, Tensor& row_m,
             Tensor& row_s, Tensor& col_m, Tensor& col_s, bool want_col) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  const auto g = grid2(br, bc);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor rp = at::empty({2, int64_t(g.nbx) * br}, G.options());
  const Tensor cp = want_col ? at::empty({2, int64_t(g.nby) * bc}, G.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lse_fwd", [&] {
    using T = scalar_t;
    lse_fwd_kernel<T><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
        G.data_ptr<T>(), br, bc, scale.data_ptr<T>(), r0, c0, dev_masks(mk), rp[0].data_ptr<T>(),
        rp[1].data_ptr<T>(), want_col ? cp[0].data_ptr<T>() : nullptr, want_col ? cp[1].data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_merge<T>(row_m.data_ptr<T>() + r0, row_s.data_ptr<T>() + r0, rp[0], rp[1], br, g.nbx, stream);
    if (want_col) launch_merge<T>(col_m.data_ptr<T>() + c0, col_s.data_ptr<T>() + c0, cp[0], cp[1], bc, g.nby, stream);
  });
}

void lse_bwd(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk,
             const Tensor& rl, const Tensor& gr, const Tensor& cl, const Tensor& gc, bool has_col, Tensor& dscale) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  const auto g = grid2(br, bc);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor part = at::empty({int64_t(g.nbx) * g.nby}, G.options());
  dispatch_acc_out(G, dS, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    lse_bwd_kernel<T, O><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
        G.data_ptr<T>(), dS.data_ptr<O>(), br, bc, scale.data_ptr<T>(), r0, c0, dev_masks(mk), rl.data_ptr<T>(),
        gr.data_ptr<T>(), has_col ? cl.data_ptr<T>() : nullptr, has_col ? gc.data_ptr<T>() : nullptr, has_col,
        part.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_sum<T>(part, dscale, stream);
  });
}

void siglip_fwd(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0, Tensor& total) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  const auto g = grid2(br, bc);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor part = at::empty({int64_t(g.nbx) * g.nby}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "siglip_fwd", [&] {
    siglip_fwd_kernel<scalar_t><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), br, bc, scale.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(), r0, c0,
        part.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_sum<scalar_t>(part, total, stream);
  });
}

void siglip_bwd(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias, const Tensor& grad, int64_t r0,
                int64_t c0, Tensor& dscale, Tensor& dbias) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  const auto g = grid2(br, bc);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor part = at::empty({2, int64_t(g.nbx) * g.nby}, G.options());
  dispatch_acc_out(G, dL, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    siglip_bwd_kernel<T, O><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
        G.data_ptr<T>(), dL.data_ptr<O>(), br, bc, scale.data_ptr<T>(), bias.data_ptr<T>(), grad.data_ptr<T>(), r0,
        c0, part[0].data_ptr<T>(), part[1].data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_sum<T>(part[0], dbias, stream);
    launch_sum<T>(part[1], dscale, stream);
  });
}

}  // namespace cuda
}  // namespace contrastive_ops
