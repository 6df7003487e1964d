// CPU instantiation of the CUDA tiling of csrc/tiling.h, for tests: the same
// host code as csrc/cuda/sim_lse_cuda.cpp (row / column blocks, column ranges
// read once per call, σ-scaled fp16 dS tiles, the fp32-GEMM guard, dQ / dK
// accumulation across tiles) and the same per-element and partial-merge lines
// as the CUDA epilogues (csrc/cuda/tile_math.cuh), on tiles of any size — tiny
// ones (3 × 5 by default) make every cross-tile merge run on small inputs.
//
// The epilogues below mirror the CUDA kernels' layout: a tile is cut into
// sub-blocks of kSubRows × kSubCols (a CUDA thread block each), each gives
// row partials, column partials and sum partials, merged in index order with
// merge_parts / sum_parts.  Within a sub-block the CPU walks elements in order
// where the GPU reduces over warps; only that order differs.
//
// Ops (CPU only, not part of the public API):
//   _sim_lse_tiled_fwd / _sim_lse_tiled_bwd: sim_lse_fwd / sim_lse_bwd plus tile_rows, tile_cols
//   _siglip_tiled_fwd / _siglip_tiled_bwd:   siglip_fwd / siglip_bwd plus tile_rows, tile_cols
// fp16/bf16 inputs: Q, K are upcast exactly to fp32 (what the tensor cores
// multiply), dS tiles are stored in the input dtype as on the GPU.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "../cuda/tile_math.cuh"
#include "../tiling.h"

namespace contrastive_ops {
namespace {

using namespace tile_math;

// Sub-blocks of 4 × 2 (several partials in both directions of the 5 × 3 and larger test tiles), the
// forward's column statistics folded 2 rows at a time (several folds per sub-block, a short last one).
constexpr int64_t kSubRows = 4, kSubCols = 2;
constexpr int kChunk = 2;

thread_local int64_t t_rows = 3, t_cols = 5;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Calls f(T{}, O{}) with T the accumulation type of G and O the element type of the dS tile.
template <typename F>
void dispatch_acc_out(const Tensor& G, const Tensor& dS, F&& f) {
  const auto gt = G.scalar_type(), dt = dS.scalar_type();
  if (gt == at::kDouble && dt == at::kDouble) return f(double{}, double{});
  TORCH_CHECK(gt == at::kFloat, "contrastive_ops (tiled cpu): unexpected tile dtype ", gt);
  if (dt == at::kFloat) return f(float{}, float{});
  if (dt == at::kHalf) return f(float{}, c10::Half{});
  if (dt == at::kBFloat16) return f(float{}, c10::BFloat16{});
  TORCH_CHECK(false, "contrastive_ops (tiled cpu): unexpected dS dtype ", dt);
}

struct CpuTiledDev {
  static at::ScalarType compute_dtype(at::ScalarType in) { return acc_dtype(in); }
  static at::ScalarType ds_dtype(at::ScalarType in) {
    return in == at::kHalf || in == at::kBFloat16 ? in : acc_dtype(in);  // as on the GPU
  }
  static int64_t row_block(int64_t, int64_t, int64_t) { return t_rows; }
  static int64_t col_block(int64_t, int64_t, int64_t) { return t_cols; }

  static void gemm_nt(Tensor& out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b.t()); }
  static void gemm_acc(Tensor& c, const Tensor& a, const Tensor& b) {
    c.addmm_(a.to(c.scalar_type()), b.to(c.scalar_type()));  // 16-bit dS upcast exactly
  }

  static void lse_fwd_epilogue(const Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& masks,
                               Tensor& row_m, Tensor& row_s, Tensor& col_m, Tensor& col_s, bool want_col) {
    const int64_t br = G.size(0), bc = G.size(1);
    if (br == 0 || bc == 0) return;
    const int64_t nbx = ceil_div(bc, kSubCols), nby = ceil_div(br, kSubRows);
    const DevMasks mk = dev_masks(masks);
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "lse_fwd_tiled_cpu", [&] {
      using T = scalar_t;
      const T* g = G.data_ptr<T>();
      const T sc = scale.item<T>();
      std::vector<T> rpm(nbx * br), rps(nbx * br), cpm(want_col ? nby * bc : 0), cps(want_col ? nby * bc : 0);
      std::vector<T> v(kSubRows * kSubCols);  // a sub-block's logits, row-major (w columns)
      for (int64_t by = 0; by < nby; ++by) {
        const int64_t i0 = by * kSubRows, i1 = std::min(br, i0 + kSubRows);
        for (int64_t bx = 0; bx < nbx; ++bx) {
          const int64_t j0 = bx * kSubCols, j1 = std::min(bc, j0 + kSubCols);
          const int w = int(j1 - j0);
          for (int64_t i = i0; i < i1; ++i) {  // the row's masks read once, as the CUDA kernel does
            const uint32_t ok =
                tile_allowed_bits(tile_range(mk, r0 + i, c0, bc), row_ex(mk, r0 + i), c0, int32_t(j0), w);
            const T thr = row_threshold<T>(mk, r0 + i);
            for (int64_t j = j0; j < j1; ++j)
              v[(i - i0) * w + (j - j0)] = masked_logit_row(((ok >> (j - j0)) & 1u) != 0, thr, sc, g[i * bc + j]);
          }
          for (int64_t i = i0; i < i1; ++i) {  // CUDA: a maximum over the thread's columns and the warp
            const T* row = v.data() + (i - i0) * w;
            const T m = chunk_max(row, w, 1);
            rpm[bx * br + i] = m;
            rps[bx * br + i] = chunk_sum_exp(row, w, 1, m);
          }
          if (!want_col) continue;
          for (int64_t j = j0; j < j1; ++j) {
            T m = neg_inf<T>(), s = 0;
            for (int64_t rc = 0; rc < i1 - i0; rc += kChunk)
              chunk_fold(m, s, v.data() + rc * w + (j - j0), int(std::min<int64_t>(kChunk, i1 - i0 - rc)), w);
            cpm[by * bc + j] = m;
            cps[by * bc + j] = s;
          }
        }
      }
      T* rm = row_m.data_ptr<T>() + r0;
      T* rs = row_s.data_ptr<T>() + r0;
      for (int64_t i = 0; i < br; ++i) merge_parts(rm[i], rs[i], rpm.data() + i, rps.data() + i, nbx, br);
      if (want_col) {
        T* cm = col_m.data_ptr<T>() + c0;
        T* cs = col_s.data_ptr<T>() + c0;
        for (int64_t j = 0; j < bc; ++j) merge_parts(cm[j], cs[j], cpm.data() + j, cps.data() + j, nby, bc);
      }
    });
  }

  static void lse_bwd_epilogue(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0,
                               const Masks& masks, const Tensor& rl, const Tensor& gr, const Tensor& cl,
                               const Tensor& gc, bool has_col, Tensor& dscale) {
    const int64_t br = G.size(0), bc = G.size(1);
    if (br == 0 || bc == 0) return;
    const int64_t nbx = ceil_div(bc, kSubCols), nby = ceil_div(br, kSubRows);
    const DevMasks mk = dev_masks(masks);
    dispatch_acc_out(G, dS, [&](auto t, auto o) {
      using T = decltype(t);
      using O = decltype(o);
      const T* g = G.data_ptr<T>();
      O* ds = dS.data_ptr<O>();
      const T sc = scale.item<T>();
      const T* rlp = rl.data_ptr<T>();
      const T* grp = gr.data_ptr<T>();
      const T* clp = has_col ? cl.data_ptr<T>() : nullptr;
      const T* gcp = has_col ? gc.data_ptr<T>() : nullptr;
      std::vector<T> part(nbx * nby);
      for (int64_t by = 0; by < nby; ++by) {
        const int64_t i0 = by * kSubRows, i1 = std::min(br, i0 + kSubRows);
        for (int64_t bx = 0; bx < nbx; ++bx) {
          const int64_t j0 = bx * kSubCols, j1 = std::min(bc, j0 + kSubCols);
          T acc = 0;
          for (int64_t j = j0; j < j1; ++j) {
            const int64_t gj = c0 + j;
            const T clj = has_col ? clp[gj] : T(0), gcj = has_col ? gcp[gj] : T(0);
            for (int64_t i = i0; i < i1; ++i) {
              const int64_t gi = r0 + i;
              const T gv = g[i * bc + j];
              T d = 0;
              const T s = mul_rn(sc, gv);
              const uint32_t ok = tile_allowed_bits(tile_range(mk, gi, c0, bc), row_ex(mk, gi), c0, int32_t(j), 1);
              if (ok != 0 && under_threshold(s, row_threshold<T>(mk, gi))) {
                d = lse_grad(s, rlp[gi], grp[gi], has_col, clj, gcj);
                acc += d * gv;
              }
              ds[i * bc + j] = static_cast<O>(d);
            }
          }
          part[by * nbx + bx] = acc;
        }
      }
      *dscale.data_ptr<T>() += sum_parts(part.data(), nbx * nby, 1);
    });
  }

  static void siglip_fwd_epilogue(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0,
                                  Tensor& total) {
    const int64_t br = G.size(0), bc = G.size(1);
    if (br == 0 || bc == 0) return;
    const int64_t nbx = ceil_div(bc, kSubCols), nby = ceil_div(br, kSubRows);
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "siglip_fwd_tiled_cpu", [&] {
      using T = scalar_t;
      const T* g = G.data_ptr<T>();
      const T sc = scale.item<T>(), b = bias.item<T>();
      std::vector<T> part(nbx * nby);
      for (int64_t by = 0; by < nby; ++by) {
        const int64_t i0 = by * kSubRows, i1 = std::min(br, i0 + kSubRows);
        for (int64_t bx = 0; bx < nbx; ++bx) {
          const int64_t j0 = bx * kSubCols, j1 = std::min(bc, j0 + kSubCols);
          T acc = 0;
          for (int64_t j = j0; j < j1; ++j)
            for (int64_t i = i0; i < i1; ++i) acc += siglip_term(siglip_logit(sc, b, g[i * bc + j]), r0 + i == c0 + j);
          part[by * nbx + bx] = acc;
        }
      }
      *total.data_ptr<T>() += sum_parts(part.data(), nbx * nby, 1);
    });
  }

  static void siglip_bwd_epilogue(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias,
                                  const Tensor& grad, int64_t r0, int64_t c0, Tensor& dscale, Tensor& dbias) {
    const int64_t br = G.size(0), bc = G.size(1);
    if (br == 0 || bc == 0) return;
    const int64_t nbx = ceil_div(bc, kSubCols), nby = ceil_div(br, kSubRows);
    dispatch_acc_out(G, dL, [&](auto t, auto o) {
      using T = decltype(t);
      using O = decltype(o);
      const T* g = G.data_ptr<T>();
      O* dl = dL.data_ptr<O>();
      const T sc = scale.item<T>(), b = bias.item<T>(), gr = grad.item<T>();
      std::vector<T> p0(nbx * nby), p1(nbx * nby);
      for (int64_t by = 0; by < nby; ++by) {
        const int64_t i0 = by * kSubRows, i1 = std::min(br, i0 + kSubRows);
        for (int64_t bx = 0; bx < nbx; ++bx) {
          const int64_t j0 = bx * kSubCols, j1 = std::min(bc, j0 + kSubCols);
          T a0 = 0, a1 = 0;
          for (int64_t j = j0; j < j1; ++j) {
            for (int64_t i = i0; i < i1; ++i) {
              const T gv = g[i * bc + j];
              const T d = siglip_grad(siglip_logit(sc, b, gv), r0 + i == c0 + j, gr);
              dl[i * bc + j] = static_cast<O>(d);
              a0 += d;
              a1 += d * gv;
            }
          }
          p0[by * nbx + bx] = a0;
          p1[by * nbx + bx] = a1;
        }
      }
      *dbias.data_ptr<T>() += sum_parts(p0.data(), nbx * nby, 1);
      *dscale.data_ptr<T>() += sum_parts(p1.data(), nbx * nby, 1);
    });
  }
};

// Tile sizes for the call on this thread.
struct TileScope {
  TileScope(int64_t rows, int64_t cols) {
    TORCH_CHECK(rows > 0 && cols > 0, "contrastive_ops: tile_rows and tile_cols must be positive, got ", rows, ", ",
                cols);
    t_rows = rows;
    t_cols = cols;
  }
};

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "contrastive_ops (tiled cpu): ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<Tensor, Tensor> sim_lse_tiled_fwd(const Tensor& q, const Tensor& k, const Tensor& scale,
                                             const OptTensor& row_index, const OptTensor& col_index,
                                             const OptTensor& col_start, const OptTensor& col_end,
                                             const OptTensor& exclude, bool want_col, int64_t rows, int64_t cols,
                                             const OptTensor& row_max) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  const TileScope tiles(rows, cols);
  const IeeeFp32Matmul ieee;
  return sim_lse_fwd_tiled<CpuTiledDev>(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col,
                                        row_max);
}

std::tuple<Tensor, Tensor, Tensor> sim_lse_tiled_bwd(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                     const OptTensor& row_index, const OptTensor& col_index,
                                                     const OptTensor& col_start, const OptTensor& col_end,
                                                     const OptTensor& exclude, const Tensor& row_lse,
                                                     const Tensor& col_lse, const Tensor& grad_row,
                                                     const Tensor& grad_col, int64_t rows, int64_t cols,
                                                     const OptTensor& row_max) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  const TileScope tiles(rows, cols);
  const IeeeFp32Matmul ieee;
  return sim_lse_bwd_tiled<CpuTiledDev>(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse,
                                        col_lse, grad_row, grad_col, row_max);
}

Tensor siglip_tiled_fwd(const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias, int64_t rows,
                        int64_t cols) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  const TileScope tiles(rows, cols);
  return siglip_fwd_tiled<CpuTiledDev>(x, y, scale, bias);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_tiled_bwd(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                            const Tensor& bias, const Tensor& grad, int64_t rows,
                                                            int64_t cols) {
  check_cpu(x, "x");
  check_cpu(y, "y");
  const TileScope tiles(rows, cols);
  return siglip_bwd_tiled<CpuTiledDev>(x, y, scale, bias, grad);
}

}  // namespace

// Test ops (schemas in csrc/ops.cpp): the CUDA tiling on CPU with tiles of
// tile_rows × tile_cols (see the top of this file), and the CUDA tile shape.
TORCH_LIBRARY_FRAGMENT(contrastive_ops, m) {
  m.impl("_cuda_tile_shape", [](int64_t B, int64_t M, int64_t D) {
    const auto t = cuda_tile_shape(B, M, D);
    return std::vector<int64_t>{t.first, t.second};
  });
}

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("_sim_lse_tiled_fwd", &sim_lse_tiled_fwd);
  m.impl("_sim_lse_tiled_bwd", &sim_lse_tiled_bwd);
  m.impl("_siglip_tiled_fwd", &siglip_tiled_fwd);
  m.impl("_siglip_tiled_bwd", &siglip_tiled_bwd);
}

}  // namespace contrastive_ops
