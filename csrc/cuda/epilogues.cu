// CUDA epilogue kernels of the tiled similarity-LSE core and SigLIP pair sum
// (maths in csrc/tiling.h, per-element lines in csrc/cuda/tile_math.cuh).
//
// One 2-D grid per tile: a thread block covers kSubRows rows × kThreads·V
// columns, each thread V consecutive columns (V = 16 bytes of the tile where
// its width allows, see vec_width; one 16-byte load per row), rows walked in
// order: coalesced, vectorized reads of the tile.  Each element of G is read once:
//   forward   S = scale·G under the masks, never written back.  Rows are taken
//             kChunk at a time into registers; per row, the maximum over the
//             thread's V columns, a warp maximum, the sum of exponentials against
//             it and a warp sum, the 8 warps then merged in order into one row
//             (max, sum) per block; only when columns are wanted, per column one
//             maximum and one sum over the chunk's rows folded into the
//             column's (max, sum) (one rescaling exponential per chunk, not per
//             element).  A merge kernel folds the partials into the running row /
//             column statistics in partial order.
//   backward  dS (σ·dS for fp16 tiles, see ds_scale in csrc/tiling.h) written
//             in the same read, V values per store; the rows' LSE and upstream
//             gradient staged in shared memory; Σ dS·G as one partial per block,
//             summed in block order by a one-block kernel.
// Tiles without masks take a kernel instantiated without the mask tests
// (kMasked = false).  No floating-point atomics: results are bitwise
// reproducible run to run.  Accumulation type T is float (double for float64
// inputs); dS tiles may be half/bfloat16 for tensor-core GEMMs.  Indices are
// 2-D: no 64-bit division.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <limits>
#include <type_traits>

#include "epilogues.h"
#include "tile_math.cuh"

namespace contrastive_ops {
namespace cuda {
namespace {

using namespace tile_math;

constexpr int kThreads = 256;  // threads of a sub-block
constexpr int kWarps = kThreads / 32;
constexpr int kSubRows = 32;  // rows of a sub-block
constexpr int kChunk = 8;     // rows of the forward held in registers at once (kSubRows / kChunk chunks)
static_assert(kSubRows % kChunk == 0, "a sub-block is a whole number of chunks");

// V values of type T in one aligned load or store.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const T* p, T (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int k = 0; k < V; ++k) out[k] = pk.v[k];
}

// The raw 16 bits of x rounded to O (half or bfloat16): a pack of them is one vector store, not one
// 2-byte store per element.
template <typename O>
__device__ __forceinline__ uint32_t bits16(float x) {
  return O(x).x;
}

// One vector store of V values converted to O (the front end splits a stored struct into scalar stores;
// the vector intrinsics keep it one instruction: 8 bytes for four 16-bit values, 16 for fp32 / fp64).
template <typename O, typename T, int V>
__device__ __forceinline__ void store_pack(O* p, const T (&in)[V]) {
  if constexpr (V == 1) {
    *p = static_cast<O>(in[0]);
  } else if constexpr (sizeof(O) == 2 && V == 4) {
    uint32_t w[2];
#pragma unroll
    for (int k = 0; k < 2; ++k)
      w[k] = bits16<O>(in[2 * k]) | (bits16<O>(in[2 * k + 1]) << 16);
    __stwb(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
  } else if constexpr (std::is_same_v<O, float> && V == 4) {
    __stwb(reinterpret_cast<float4*>(p), make_float4(in[0], in[1], in[2], in[3]));
  } else if constexpr (std::is_same_v<O, double> && V == 2) {
    __stwb(reinterpret_cast<double2*>(p), make_double2(in[0], in[1]));
  } else {
    static_assert(V == 1, "no vector store for this pack");
  }
}


// A row's column range (relative to the tile) and threshold, staged in shared memory once per block.
template <typename T>
struct RowMasks {
  TileRange range;
  T thr;
};

// rmk[t] ← the masks of row gi0 + t, t < nrows (64-bit index arithmetic once per row and block, not
// per row and thread); ends with a barrier.
template <typename T>
__device__ __forceinline__ void stage_row_masks(RowMasks<T>* rmk, const DevMasks& mk, int64_t gi0, int nrows,
                                                int64_t c0, int64_t bc) {
  if (int(threadIdx.x) < nrows) {
    rmk[threadIdx.x].range = tile_range(mk, gi0 + threadIdx.x, c0, bc);
    rmk[threadIdx.x].thr = row_threshold<T>(mk, gi0 + threadIdx.x);
  }
  __syncthreads();
}

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
Grid2 grid2(int64_t br, int64_t bc, int v) {
  const int64_t w = int64_t(kThreads) * v;
  const int64_t nbx = (bc + w - 1) / w, nby = (br + kSubRows - 1) / kSubRows;
  TORCH_CHECK(nby <= 65535, "contrastive_ops (cuda): tile of ", br, " rows is too tall");
  return {unsigned(nbx), unsigned(nby)};
}

// Columns per thread: 16 bytes of the tile (4 fp32, 2 fp64) where the tile's width is a multiple of
// it and every pointer the kernel loads or stores packs through is aligned to its pack; else 1.
int vec_width(int64_t bc, size_t elem, std::initializer_list<std::pair<const void*, size_t>> ptrs) {
  const int v = int(16 / elem);
  if (bc % v != 0) return 1;
  for (const auto& [p, e] : ptrs)
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (e * v) != 0) return 1;
  return v;
}

template <typename T, int V, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    lse_fwd_kernel(const T* __restrict__ G, int64_t br, int64_t bc, const T* __restrict__ scale, int64_t r0,
                   int64_t c0, DevMasks mk, T* __restrict__ rpm, T* __restrict__ rps, T* __restrict__ cpm,
                   T* __restrict__ cps) {
  __shared__ T wm[kSubRows][kWarps], ws[kSubRows][kWarps];
  __shared__ RowMasks<T> rmk[kMasked ? kSubRows : 1];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t j = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V;  // the thread's first column
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const bool in = j < bc, cols = cpm != nullptr;  // V > 1 divides bc: a thread's columns are all in or all out
  const T sc = *scale;
  if constexpr (kMasked) stage_row_masks(rmk, mk, r0 + i0, nrows, c0, bc);
  T cm[V], cs[V];
#pragma unroll
  for (int k = 0; k < V; ++k) cm[k] = neg_inf<T>(), cs[k] = 0;
  for (int rc = 0; rc < nrows; rc += kChunk) {
    T v[kChunk][V];
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      const int64_t i = i0 + rc + r;
      if (in && rc + r < nrows) {
        load_pack<T, V>(G + i * bc + j, v[r]);
        if constexpr (kMasked) {  // the row's masks from shared memory, tested for the thread's V columns
          const RowMasks<T> rm = rmk[rc + r];
          const uint32_t ok = tile_allowed_bits(rm.range, row_ex(mk, r0 + i), c0, int32_t(j), V);
#pragma unroll
          for (int k = 0; k < V; ++k) v[r][k] = masked_logit_row(((ok >> k) & 1u) != 0, rm.thr, sc, v[r][k]);
        } else {
#pragma unroll
          for (int k = 0; k < V; ++k) v[r][k] = mul_rn(sc, v[r][k]);
        }
      } else {
#pragma unroll
        for (int k = 0; k < V; ++k) v[r][k] = neg_inf<T>();
      }
    }
#pragma unroll
    for (int r = 0; r < kChunk; ++r) {
      const T m = warp_max(chunk_max(v[r], V, 1));
      const T e = warp_sum(chunk_sum_exp(v[r], V, 1, m));
      if (lane == 0) {  // rows past nrows hold (-inf, 0) and are never read
        wm[rc + r][warp] = m;
        ws[rc + r][warp] = e;
      }
    }
    if (cols) {
#pragma unroll
      for (int k = 0; k < V; ++k) chunk_fold(cm[k], cs[k], &v[0][k], kChunk, V);
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
    store_pack<T, T, V>(cpm + o, cm);
    store_pack<T, T, V>(cps + o, cs);
  }
}

// (m[i], s[i]) ← merge of (m[i], s[i]) and the partials (pm, ps)[p·n + i], p = 0..nparts-1 in order
// (merge_parts' order), kMergeBatch partials loaded before they are merged: the loads of a batch are
// in flight together instead of one global-memory latency per partial.
constexpr int kMergeBatch = 16;

template <typename T>
__global__ void merge_kernel(T* __restrict__ m, T* __restrict__ s, const T* __restrict__ pm,
                             const T* __restrict__ ps, int64_t n, int64_t nparts) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  T mi = m[i], si = s[i];
  int64_t p = 0;
  for (; p + kMergeBatch <= nparts; p += kMergeBatch) {
    T a[kMergeBatch], b[kMergeBatch];
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) {
      a[u] = pm[(p + u) * n + i];
      b[u] = ps[(p + u) * n + i];
    }
#pragma unroll
    for (int u = 0; u < kMergeBatch; ++u) lse_merge(mi, si, a[u], b[u]);
  }
  merge_parts(mi, si, pm + p * n + i, ps + p * n + i, nparts - p, n);
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

template <typename T, typename O, int V, bool kMasked>
__global__ void __launch_bounds__(kThreads)
    lse_bwd_kernel(const T* __restrict__ G, O* __restrict__ dS, int64_t br, int64_t bc, const T* __restrict__ scale,
                   int64_t r0, int64_t c0, DevMasks mk, const T* __restrict__ rl, const T* __restrict__ gr,
                   const T* __restrict__ cl, const T* __restrict__ gc, bool has_col, T* __restrict__ part) {
  __shared__ T srl[kSubRows], sgr[kSubRows];  // the rows' LSE and upstream gradient
  __shared__ RowMasks<T> rmk[kMasked ? kSubRows : 1];
  const int64_t j = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  if (int(threadIdx.x) < nrows) {
    srl[threadIdx.x] = rl[r0 + i0 + threadIdx.x];
    sgr[threadIdx.x] = gr[r0 + i0 + threadIdx.x];
  }
  if constexpr (kMasked) {
    stage_row_masks(rmk, mk, r0 + i0, nrows, c0, bc);
  } else {
    __syncthreads();
  }
  const T sc = *scale;
  T acc = 0;
  if (j < bc) {
    T clj[V], gcj[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      clj[k] = has_col ? cl[c0 + j + k] : T(0);
      gcj[k] = has_col ? gc[c0 + j + k] : T(0);
    }
#pragma unroll 4
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r, gi = r0 + i;
      T g[V], d[V];
      load_pack<T, V>(G + i * bc + j, g);
      uint32_t ok = 0;
      T thr = 0;
      if constexpr (kMasked) {
        ok = tile_allowed_bits(rmk[r].range, row_ex(mk, gi), c0, int32_t(j), V);
        thr = rmk[r].thr;
      }
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const T s = mul_rn(sc, g[k]);
        d[k] = 0;
        // masked pairs add nothing to dscale (not even 0·G, which is NaN for an infinite G)
        const bool keep = !kMasked || (((ok >> k) & 1u) != 0 && under_threshold(s, thr));
        if (keep) {
          d[k] = lse_grad(s, srl[r], sgr[r], has_col, clj[k], gcj[k]);
          acc += d[k] * g[k];
        }
      }
      store_pack<O, T, V>(dS + i * bc + j, d);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    siglip_fwd_kernel(const T* __restrict__ G, int64_t br, int64_t bc, const T* __restrict__ scale,
                      const T* __restrict__ bias, int64_t r0, int64_t c0, T* __restrict__ part) {
  const int64_t j = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const T sc = *scale, b = *bias;
  T acc = 0;
  if (j < bc) {
#pragma unroll 4
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r;
      T g[V];
      load_pack<T, V>(G + i * bc + j, g);
#pragma unroll
      for (int k = 0; k < V; ++k) acc += siglip_term(siglip_logit(sc, b, g[k]), r0 + i == c0 + j + k);
    }
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) part[int64_t(blockIdx.y) * gridDim.x + blockIdx.x] = acc;
}

template <typename T, typename O, int V>
__global__ void __launch_bounds__(kThreads)
    siglip_bwd_kernel(const T* __restrict__ G, O* __restrict__ dL, int64_t br, int64_t bc,
                      const T* __restrict__ scale, const T* __restrict__ bias, const T* __restrict__ grad,
                      int64_t r0, int64_t c0, T* __restrict__ part0, T* __restrict__ part1) {
  const int64_t j = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * V;
  const int64_t i0 = int64_t(blockIdx.y) * kSubRows;
  const int nrows = int(br - i0 < kSubRows ? br - i0 : kSubRows);
  const T sc = *scale, b = *bias, gr = *grad;
  T a0 = 0, a1 = 0;
  if (j < bc) {
#pragma unroll 4
    for (int r = 0; r < nrows; ++r) {
      const int64_t i = i0 + r;
      T g[V], d[V];
      load_pack<T, V>(G + i * bc + j, g);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        d[k] = siglip_grad(siglip_logit(sc, b, g[k]), r0 + i == c0 + j + k, gr);
        a0 += d[k];
        a1 += d[k] * g[k];
      }
      store_pack<O, T, V>(dL + i * bc + j, d);
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
  // the masked epilogues test a row's columns in 32-bit tile coordinates (TileRange)
  TORCH_CHECK(G.size(1) <= std::numeric_limits<int32_t>::max(), "contrastive_ops (cuda): tile of ", G.size(1),
              " columns is too wide (CONTRASTIVE_OPS_CUDA_TILE)");
}

bool has_masks(const Masks& mk) {
  return mk.col_start.has_value() || mk.col_end.has_value() || mk.exclude.has_value() || mk.row_max.has_value();
}

// Calls f(V, kMasked) as compile-time constants: V = v (16 bytes of T, or 1), kMasked = masked.
template <typename T, typename F>
void dispatch_vec(int v, bool masked, F&& f) {
  constexpr int W = int(16 / sizeof(T));
  using W_ = std::integral_constant<int, W>;
  using One = std::integral_constant<int, 1>;
  if (v == W) {
    if (masked) return f(W_{}, std::true_type{});
    return f(W_{}, std::false_type{});
  }
  TORCH_CHECK(v == 1, "contrastive_ops (cuda): unexpected vector width ", v);
  if (masked) return f(One{}, std::true_type{});
  return f(One{}, std::false_type{});
}

}  // namespace

void lse_fwd(const Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk, Tensor& row_m,
             Tensor& row_s, Tensor& col_m, Tensor& col_s, bool want_col) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  const int v = vec_width(bc, G.element_size(), {{G.data_ptr(), G.element_size()}});
  const auto g = grid2(br, bc, v);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor rp = at::empty({2, int64_t(g.nbx) * br}, G.options());
  const Tensor cp = want_col ? at::empty({2, int64_t(g.nby) * bc}, G.options()) : Tensor();
  // cp[0], cp[1] start at multiples of bc elements of a fresh allocation: aligned to V·sizeof(T) with G's width.
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lse_fwd", [&] {
    using T = scalar_t;
    dispatch_vec<T>(v, has_masks(mk), [&](auto vc, auto mc) {
      lse_fwd_kernel<T, decltype(vc)::value, decltype(mc)::value><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
          G.data_ptr<T>(), br, bc, scale.data_ptr<T>(), r0, c0, dev_masks(mk), rp[0].data_ptr<T>(),
          rp[1].data_ptr<T>(), want_col ? cp[0].data_ptr<T>() : nullptr, want_col ? cp[1].data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    launch_merge<T>(row_m.data_ptr<T>() + r0, row_s.data_ptr<T>() + r0, rp[0], rp[1], br, g.nbx, stream);
    if (want_col) launch_merge<T>(col_m.data_ptr<T>() + c0, col_s.data_ptr<T>() + c0, cp[0], cp[1], bc, g.nby, stream);
  });
}

void lse_bwd(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk,
             const Tensor& rl, const Tensor& gr, const Tensor& cl, const Tensor& gc, bool has_col, Tensor& dscale) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  TORCH_CHECK(dS.is_contiguous() && dS.sizes() == G.sizes(), "contrastive_ops (cuda): dS tile must match G");
  const int v = vec_width(bc, G.element_size(), {{G.data_ptr(), G.element_size()}, {dS.data_ptr(), dS.element_size()}});
  const auto g = grid2(br, bc, v);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor part = at::empty({int64_t(g.nbx) * g.nby}, G.options());
  dispatch_acc_out(G, dS, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    dispatch_vec<T>(v, has_masks(mk), [&](auto vc, auto mc) {
      lse_bwd_kernel<T, O, decltype(vc)::value, decltype(mc)::value><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
          G.data_ptr<T>(), dS.data_ptr<O>(), br, bc, scale.data_ptr<T>(), r0, c0, dev_masks(mk), rl.data_ptr<T>(),
          gr.data_ptr<T>(), has_col ? cl.data_ptr<T>() : nullptr, has_col ? gc.data_ptr<T>() : nullptr, has_col,
          part.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    launch_sum<T>(part, dscale, stream);
  });
}

void siglip_fwd(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0, Tensor& total) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  const int v = vec_width(bc, G.element_size(), {{G.data_ptr(), G.element_size()}});
  const auto g = grid2(br, bc, v);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor part = at::empty({int64_t(g.nbx) * g.nby}, G.options());
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "siglip_fwd", [&] {
    using T = scalar_t;
    dispatch_vec<T>(v, false, [&](auto vc, auto) {
      siglip_fwd_kernel<T, decltype(vc)::value><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
          G.data_ptr<T>(), br, bc, scale.data_ptr<T>(), bias.data_ptr<T>(), r0, c0, part.data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    launch_sum<T>(part, total, stream);
  });
}

void siglip_bwd(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias, const Tensor& grad, int64_t r0,
                int64_t c0, Tensor& dscale, Tensor& dbias) {
  const int64_t br = G.size(0), bc = G.size(1);
  if (br == 0 || bc == 0) return;
  check_tile(G);
  TORCH_CHECK(dL.is_contiguous() && dL.sizes() == G.sizes(), "contrastive_ops (cuda): dL tile must match G");
  const int v = vec_width(bc, G.element_size(), {{G.data_ptr(), G.element_size()}, {dL.data_ptr(), dL.element_size()}});
  const auto g = grid2(br, bc, v);
  auto stream = at::cuda::getCurrentCUDAStream();
  const Tensor part = at::empty({2, int64_t(g.nbx) * g.nby}, G.options());
  dispatch_acc_out(G, dL, [&](auto t, auto o) {
    using T = decltype(t);
    using O = decltype(o);
    dispatch_vec<T>(v, false, [&](auto vc, auto) {
      siglip_bwd_kernel<T, O, decltype(vc)::value><<<dim3(g.nbx, g.nby), kThreads, 0, stream>>>(
          G.data_ptr<T>(), dL.data_ptr<O>(), br, bc, scale.data_ptr<T>(), bias.data_ptr<T>(), grad.data_ptr<T>(), r0,
          c0, part[0].data_ptr<T>(), part[1].data_ptr<T>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    launch_sum<T>(part[0], dbias, stream);
    launch_sum<T>(part[1], dscale, stream);
  });
}

}  // namespace cuda
}  // namespace contrastive_ops
