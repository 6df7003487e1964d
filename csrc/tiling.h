// Device-generic tiling of the similarity-LSE core and of the SigLIP pair sum.
//
// Anchors Q = q[row_index] (B, D) are processed in row blocks, candidates
// K = k[col_index] (M, D) in column blocks; only one tile of
// G = Q_blk K_blkᵀ (raw dot products, BR × BC in the accumulation dtype) exists
// at a time.  The GEMMs go to ATen (BLAS on CPU, cuBLAS on CUDA); everything
// else on a tile is a per-device "epilogue" supplied by the policy class Dev:
//
//   forward   S = scale·G, masked by [col_start, col_end) and the exclusions;
//             online row max/sum (row_m, row_s) across column blocks, and
//             per-column max/sum (col_m, col_s) merged across row blocks:
//             lse = m + log(s) at the end (-inf where s == 0).  The column LSE
//             comes from the same pass over the tiles.
//   backward  the tile is recomputed; dS = g_row·exp(S - row_lse)
//             + g_col·exp(S - col_lse) on allowed pairs (0 elsewhere);
//             dQ_blk += dS K_blk, dK_blk += dSᵀ Q_blk (GEMMs),
//             dscale += Σ dS·G; dQ, dK are multiplied by scale at the end.
//
// FLOPs: 2·B·M·D forward, 6·B·M·D backward.  Extra memory: O(BR·BC) tile
// buffers plus O((B+M)·D) gathered/upcast copies of Q, K and the fp32/f64
// gradient accumulators.
//
// Dev provides (see csrc/cpu/sim_lse.cpp and csrc/cuda/sim_lse_cuda.cpp):
//   compute_dtype(in)    dtype of the Q/K copies fed to the GEMMs
//   ds_dtype(in)         dtype of the dS tile fed to the backward GEMMs (fp16 tiles hold dS·σ,
//                        see ds_scale: the epilogues get σ·grad and need not know)
//   row_block, col_block tile sizes
//   gemm_nt(out, a, b)   out = a bᵀ in the accumulation dtype
//   gemm_acc(c, a, b)    c += a b (c in the accumulation dtype)
//   lse_fwd_epilogue, lse_bwd_epilogue, siglip_fwd_epilogue, siglip_bwd_epilogue
#pragma once

#include <ATen/ATen.h>

#include "acc_dtype.h"
#include "cuda/tile_math.cuh"
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <cstdlib>
#include <string>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace contrastive_ops {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Allowed-candidate description shared by every epilogue.  All index tensors
// are int32 and contiguous; col indices are positions in K (0..M-1).
struct Masks {
  OptTensor col_start;  // (B,) or none (0)
  OptTensor col_end;    // (B,) or none (M)
  OptTensor exclude;    // (B, E) or none; entries < 0 exclude nothing
  int64_t M = 0;
  // (B,) in the accumulation dtype, contiguous, or none: pair (i, j) is allowed only if
  // !(S[i, j] > row_max[i]), compared on the S the epilogue exponentiates (+inf keeps every
  // pair, and so does a NaN S: a threshold never hides a NaN).
  OptTensor row_max;
  int64_t E() const { return exclude.has_value() ? exclude->size(1) : 0; }
};

// Everything below has internal linkage: this header is compiled by g++ (csrc/cpu/*.cpp,
// csrc/cuda/*.cpp) and by nvcc (csrc/cuda/*.cu) with different flags, and a weak inline
// definition from one compiler must never stand in for the other's at link time.
namespace {

inline tile_math::DevMasks dev_masks(const Masks& mk) {
  return {mk.col_start ? mk.col_start->data_ptr<int32_t>() : nullptr,
          mk.col_end ? mk.col_end->data_ptr<int32_t>() : nullptr,
          mk.exclude ? mk.exclude->data_ptr<int32_t>() : nullptr, mk.E(), mk.M,
          mk.row_max ? mk.row_max->data_ptr() : nullptr};
}

// row_max in the accumulation dtype of the tiles, contiguous (none stays none).
inline OptTensor acc_row_max(const OptTensor& row_max, at::ScalarType acc) {
  if (!row_max.has_value()) return c10::nullopt;
  return row_max->to(acc).contiguous();
}

// fp32 GEMMs in IEEE fp32 for the lifetime of the guard, whatever the global TF32 switch
// (torch.set_float32_matmul_precision("high") or torch.backends.cuda.matmul.allow_tf32):
// logits with TF32's 10 mantissa bits would break the fp32 error budget the CPU and Triton
// paths meet.
//
// With cuBLAS (ATen's default BLAS library) this is at::NoTF32Guard: thread-local, it gives the
// cuBLAS handle this thread takes CUBLAS_DEFAULT_MATH and changes nothing global, so other
// threads' matmuls keep their TF32 setting.  cuBLASLt does not consult that guard: when it is the
// preferred library (torch.backends.cuda.preferred_blas_library("cublaslt") or
// TORCH_BLAS_PREFER_CUBLASLT=1) and TF32 is on, the process-global switch is turned off for the
// guard's lifetime and restored after (the previous setting: legacy "high" or "medium", or the
// fp32_precision "tf32"); fp32 matmuls of other threads during the call then run in IEEE fp32 too.
class IeeeFp32Matmul {
 public:
  IeeeFp32Matmul() {
    auto& ctx = at::globalContext();
    if (!ctx.allowTF32CuBLAS()) return;
    if (ctx.blasPreferredBackend() != at::BlasBackend::Cublaslt) {
      thread_local_.emplace();
      return;
    }
    try {
      medium_ = ctx.float32MatmulPrecision() == at::Float32MatmulPrecision::MEDIUM;
    } catch (const c10::Error&) {
    }
    ctx.setAllowTF32CuBLAS(false);
    global_ = true;
  }
  ~IeeeFp32Matmul() {
    if (!global_) return;
    auto& ctx = at::globalContext();
    ctx.setAllowTF32CuBLAS(true);
    if (medium_) ctx.setFloat32MatmulPrecision("medium");
  }
  IeeeFp32Matmul(const IeeeFp32Matmul&) = delete;
  IeeeFp32Matmul& operator=(const IeeeFp32Matmul&) = delete;

 private:
  std::optional<at::NoTF32Guard> thread_local_;
  bool global_ = false, medium_ = false;
};

// Tile rows × columns of the CUDA backend.  Default: columns up to 16384 and rows up to 2048
// (a 128 MiB fp32 tile; the backward adds a dS tile), never more than the problem: large tiles
// keep cuBLAS near its peak (each GEMM is 2·rows·cols·D FLOPs) and the per-tile launches few.
// CONTRASTIVE_OPS_CUDA_TILE=rows,cols overrides it (read at every call).
inline std::pair<int64_t, int64_t> cuda_tile_shape(int64_t B, int64_t M, int64_t /*D*/) {
  int64_t rows = 2048, cols = 16384;
  if (const char* env = std::getenv("CONTRASTIVE_OPS_CUDA_TILE")) {
    const std::string v(env);
    const auto comma = v.find(',');
    char* end1 = nullptr;
    char* end2 = nullptr;
    long long r = 0, c = 0;
    if (comma != std::string::npos) {
      r = std::strtoll(v.c_str(), &end1, 10);
      c = std::strtoll(v.c_str() + comma + 1, &end2, 10);
    }
    TORCH_CHECK(comma != std::string::npos && end1 == v.c_str() + comma && end2 != nullptr && *end2 == '\0' &&
                    end2 != v.c_str() + comma + 1 && r > 0 && c > 0,
                "contrastive_ops: CONTRASTIVE_OPS_CUDA_TILE must be 'rows,cols' with positive integers, got '", v,
                "'");
    rows = r;
    cols = c;
  }
  return {std::max<int64_t>(1, std::min(rows, B)), std::max<int64_t>(1, std::min(cols, M))};
}

inline void check_float_input(const Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "contrastive_ops: ", name, " must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(t.dim() == 2, "contrastive_ops: ", name, " must be 2-D, got shape ", t.sizes());
}

inline void check_index(const OptTensor& t, const char* name, const Tensor& like, int64_t n, int64_t ndim) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kInt, "contrastive_ops: ", name, " must be int32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == like.device(), "contrastive_ops: ", name, " is on ", t->device(), " but q is on ",
              like.device());
  TORCH_CHECK(t->dim() == ndim, "contrastive_ops: ", name, " must be ", ndim, "-D, got shape ", t->sizes());
  if (n >= 0) {
    TORCH_CHECK(t->size(0) == n, "contrastive_ops: ", name, " must have ", n, " rows, got shape ", t->sizes());
  }
}

// The kernels read t's data on q's device: a tensor elsewhere is an error, not an illegal memory access.
inline void check_same_device(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "contrastive_ops: ", name, " is on ", t.device(), " but the inputs are on ",
              like.device());
}

// Shapes and dtypes of a sim_lse call; returns (B, M).
inline std::pair<int64_t, int64_t> check_sim_lse_args(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                      const OptTensor& row_index, const OptTensor& col_index,
                                                      const OptTensor& col_start, const OptTensor& col_end,
                                                      const OptTensor& exclude,
                                                      const OptTensor& row_max = c10::nullopt) {
  check_float_input(q, "q");
  check_float_input(k, "k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "contrastive_ops: q and k dtypes differ: ", q.scalar_type(),
              " vs ", k.scalar_type());
  TORCH_CHECK(q.device() == k.device(), "contrastive_ops: q and k devices differ");
  TORCH_CHECK(q.size(1) == k.size(1), "contrastive_ops: q ", q.sizes(), " and k ", k.sizes(),
              " have different feature sizes");
  TORCH_CHECK(scale.numel() == 1 && scale.dim() == 0, "contrastive_ops: scale must be a 0-dim tensor, got ",
              scale.sizes());
  TORCH_CHECK(scale.device() == q.device(), "contrastive_ops: scale must be on ", q.device());
  check_index(row_index, "row_index", q, -1, 1);
  check_index(col_index, "col_index", q, -1, 1);
  const int64_t B = row_index.has_value() ? row_index->size(0) : q.size(0);
  const int64_t M = col_index.has_value() ? col_index->size(0) : k.size(0);
  check_index(col_start, "col_start", q, B, 1);
  check_index(col_end, "col_end", q, B, 1);
  check_index(exclude, "exclude", q, B, 2);
  if (row_max.has_value()) {
    const auto st = row_max->scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, "contrastive_ops: row_max must be float32 or float64, got ", st);
    check_same_device(*row_max, "row_max", q);
    TORCH_CHECK(row_max->dim() == 1 && row_max->size(0) == B, "contrastive_ops: row_max must have shape (", B,
                "), got ", row_max->sizes());
  }
  return {B, M};
}

// Shapes of a sim_lse backward call; returns (B, M, has_col).
inline std::tuple<int64_t, int64_t, bool> check_sim_lse_bwd_args(
    const Tensor& q, const Tensor& k, const Tensor& scale, const OptTensor& row_index, const OptTensor& col_index,
    const OptTensor& col_start, const OptTensor& col_end, const OptTensor& exclude, const Tensor& row_lse,
    const Tensor& col_lse, const Tensor& grad_row, const Tensor& grad_col, const OptTensor& row_max = c10::nullopt) {
  auto [B, M] = check_sim_lse_args(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_max);
  check_same_device(row_lse, "row_lse", q);
  check_same_device(grad_row, "grad_row", q);
  TORCH_CHECK(row_lse.numel() == B && grad_row.numel() == B, "contrastive_ops: row_lse/grad_row must have ", B,
              " entries, got ", row_lse.sizes(), " and ", grad_row.sizes());
  const bool has_col = col_lse.numel() > 0;
  if (has_col) {
    check_same_device(col_lse, "col_lse", q);
    check_same_device(grad_col, "grad_col", q);
    TORCH_CHECK(col_lse.numel() == M && grad_col.numel() == M, "contrastive_ops: col_lse/grad_col must have ", M,
                " entries, got ", col_lse.sizes(), " and ", grad_col.sizes());
  }
  return {B, M, has_col};
}

inline Tensor gather_rows(const Tensor& x, const OptTensor& index, at::ScalarType dtype) {
  Tensor g = index.has_value() ? x.index_select(0, *index) : x;
  return g.to(dtype).contiguous();
}

// d(rows of x) from d(gathered rows): scatter-add through the index list.
inline Tensor scatter_rows(const Tensor& dG, const OptTensor& index, const Tensor& like) {
  if (!index.has_value()) return dG.to(like.scalar_type());
  Tensor out = at::zeros(like.sizes(), dG.options());
  out.index_add_(0, index->to(at::kLong), dG);
  return out.to(like.scalar_type());
}

inline Tensor tile_view(const Tensor& buf, int64_t br, int64_t bc) {
  return buf.narrow(0, 0, br * bc).view({br, bc});
}

// lse = m + log(s); -inf where nothing was summed.
// m + log(s); -inf where nothing was summed (s = 0), NaN where a NaN logit made the sum NaN.
inline Tensor finish_lse(const Tensor& m, const Tensor& s) {
  return at::where(s == 0, at::full({}, -std::numeric_limits<double>::infinity(), m.options()), m + at::log(s));
}

// -inf LSE (no allowed entry) -> +inf, so that exp(S - lse) is 0 there instead of NaN.
inline Tensor safe_lse(const Tensor& lse) {
  return lse.masked_fill(at::isinf(lse) & (lse < 0), std::numeric_limits<double>::infinity()).contiguous();
}

// Columns [lo, hi) that some row of each row block [r0, r0 + BR) may use: the block's smallest
// col_start and largest col_end over its non-empty rows ((0, 0) when every row is empty).
// Computed on the masks' device and read back once per call (one host synchronization when
// col_start/col_end exist, none otherwise).  Exclusions do not narrow the range.
inline std::vector<std::pair<int64_t, int64_t>> block_col_ranges(const Masks& mk, int64_t B, int64_t BR) {
  const int64_t nb = B > 0 ? (B + BR - 1) / BR : 0;
  std::vector<std::pair<int64_t, int64_t>> out(nb, {0, mk.M});
  if (nb == 0 || (!mk.col_start.has_value() && !mk.col_end.has_value())) return out;
  const auto lopts = (mk.col_start.has_value() ? *mk.col_start : *mk.col_end).options().dtype(at::kLong);
  Tensor s = mk.col_start.has_value() ? mk.col_start->to(at::kLong).clamp(0, mk.M) : at::zeros({B}, lopts);
  Tensor e = mk.col_end.has_value() ? mk.col_end->to(at::kLong).clamp(0, mk.M) : at::full({B}, mk.M, lopts);
  const Tensor empty = s >= e;  // rows that allow nothing do not widen their block's range
  s = s.masked_fill(empty, mk.M);
  e = e.masked_fill(empty, 0);
  const int64_t pad = nb * BR - B;
  s = at::constant_pad_nd(s, {0, pad}, double(mk.M)).view({nb, BR}).amin(1);
  e = at::constant_pad_nd(e, {0, pad}, 0.0).view({nb, BR}).amax(1);
  const Tensor se = at::stack({s, e}, 1).cpu().contiguous();
  const int64_t* p = se.data_ptr<int64_t>();
  for (int64_t b = 0; b < nb; ++b) {
    out[b] = p[2 * b] < p[2 * b + 1] ? std::make_pair(p[2 * b], p[2 * b + 1]) : std::make_pair(int64_t(0), int64_t(0));
  }
  return out;
}

// Power-of-two factor σ by which a 16-bit dS tile is stored (dS·σ), and the accumulated
// dQ, dK divided at the end; 1 for other tile dtypes.  |dS_ij| ≤ max|g_row| + max|g_col|
// (softmax weights are ≤ 1), so σ·bound ≤ 2^14 never overflows fp16 (max 65504) while
// gradients ~g/M at M = 32k with mean reduction (~1e-9, below fp16's smallest subnormal
// 6e-8) keep ~11 bits.  A 0-dim tensor on the inputs' device: no host synchronization.
inline Tensor ds_scale(const Tensor& gr, const Tensor& gc, bool has_col, at::ScalarType ds_dtype) {
  const auto opts = gr.options();
  if (ds_dtype != at::kHalf) return at::ones({}, opts);
  Tensor bound = gr.numel() > 0 ? gr.abs().amax() : at::zeros({}, opts);
  if (has_col && gc.numel() > 0) bound = bound + gc.abs().amax();
  const Tensor k = at::floor(at::log2(at::full({}, 16384.0, opts) / bound)).clamp(-100, 100);
  const Tensor sigma = at::exp2(k);
  return at::where(at::isfinite(bound) & (bound > 0), sigma, at::ones({}, opts));
}

template <class Dev>
std::tuple<Tensor, Tensor> sim_lse_fwd_tiled(const Tensor& q, const Tensor& k, const Tensor& scale,
                                             const OptTensor& row_index, const OptTensor& col_index,
                                             const OptTensor& col_start, const OptTensor& col_end,
                                             const OptTensor& exclude, bool want_col, const OptTensor& row_max) {
  auto [B, M] = check_sim_lse_args(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_max);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const Tensor Q = gather_rows(q, row_index, Dev::compute_dtype(q.scalar_type()));
  const Tensor K = gather_rows(k, col_index, Dev::compute_dtype(q.scalar_type()));
  const Tensor sc = scale.to(acc);
  const Masks masks{col_start, col_end, exclude, M, acc_row_max(row_max, acc)};
  const double inf = std::numeric_limits<double>::infinity();

  Tensor row_m = at::full({B}, -inf, opts), row_s = at::zeros({B}, opts);
  Tensor col_m = at::full({want_col ? M : 0}, -inf, opts), col_s = at::zeros({want_col ? M : 0}, opts);
  const int64_t BR = Dev::row_block(B, M, Q.size(1)), BC = Dev::col_block(B, M, Q.size(1));
  Tensor gbuf = at::empty({std::min(B, BR) * std::min(M, BC)}, opts);
  const auto ranges = block_col_ranges(masks, B, BR);
  for (int64_t r0 = 0; r0 < B; r0 += BR) {
    const int64_t br = std::min(BR, B - r0);
    auto [lo, hi] = ranges[r0 / BR];
    const Tensor Qb = Q.narrow(0, r0, br);
    for (int64_t c0 = lo; c0 < hi; c0 += BC) {
      const int64_t bc = std::min(BC, hi - c0);
      Tensor G = tile_view(gbuf, br, bc);
      Dev::gemm_nt(G, Qb, K.narrow(0, c0, bc));
      Dev::lse_fwd_epilogue(G, sc, r0, c0, masks, row_m, row_s, col_m, col_s, want_col);
    }
  }
  Tensor row_lse = finish_lse(row_m, row_s);
  Tensor col_lse = want_col ? finish_lse(col_m, col_s) : at::empty({0}, opts);
  return {row_lse, col_lse};
}

template <class Dev>
std::tuple<Tensor, Tensor, Tensor> sim_lse_bwd_tiled(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                     const OptTensor& row_index, const OptTensor& col_index,
                                                     const OptTensor& col_start, const OptTensor& col_end,
                                                     const OptTensor& exclude, const Tensor& row_lse,
                                                     const Tensor& col_lse, const Tensor& grad_row,
                                                     const Tensor& grad_col, const OptTensor& row_max) {
  auto [B, M, has_col] = check_sim_lse_bwd_args(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                                                row_lse, col_lse, grad_row, grad_col, row_max);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const Tensor Q = gather_rows(q, row_index, Dev::compute_dtype(q.scalar_type()));
  const Tensor K = gather_rows(k, col_index, Dev::compute_dtype(q.scalar_type()));
  const Tensor sc = scale.to(acc);
  // The same Masks as the forward: the threshold is compared on the recomputed S of the same tile.
  const Masks masks{col_start, col_end, exclude, M, acc_row_max(row_max, acc)};
  const Tensor rl = safe_lse(row_lse.to(acc)), gr = grad_row.to(acc).contiguous();
  const Tensor cl = has_col ? safe_lse(col_lse.to(acc)) : col_lse.to(acc);
  const Tensor gc = has_col ? grad_col.to(acc).contiguous() : grad_col.to(acc);

  const int64_t D = Q.size(1);
  Tensor dQ = at::zeros({B, D}, opts), dK = at::zeros({M, D}, opts), dscale = at::zeros({}, opts);
  const int64_t BR = Dev::row_block(B, M, D), BC = Dev::col_block(B, M, D);
  Tensor gbuf = at::empty({std::min(B, BR) * std::min(M, BC)}, opts);
  const auto dsd = Dev::ds_dtype(q.scalar_type());
  Tensor dbuf = at::empty({std::min(B, BR) * std::min(M, BC)}, opts.dtype(dsd));
  // The epilogue sees σ·g_row, σ·g_col (exact: σ is a power of two), so it writes σ·dS and sums σ·dscale.
  const Tensor sigma = ds_scale(gr, gc, has_col, dsd);
  const Tensor grs = gr * sigma, gcs = has_col ? gc * sigma : gc;
  const auto ranges = block_col_ranges(masks, B, BR);
  for (int64_t r0 = 0; r0 < B; r0 += BR) {
    const int64_t br = std::min(BR, B - r0);
    auto [lo, hi] = ranges[r0 / BR];
    const Tensor Qb = Q.narrow(0, r0, br);
    Tensor dQb = dQ.narrow(0, r0, br);
    for (int64_t c0 = lo; c0 < hi; c0 += BC) {
      const int64_t bc = std::min(BC, hi - c0);
      const Tensor Kb = K.narrow(0, c0, bc);
      Tensor G = tile_view(gbuf, br, bc), dS = tile_view(dbuf, br, bc);
      Dev::gemm_nt(G, Qb, Kb);
      Dev::lse_bwd_epilogue(G, dS, sc, r0, c0, masks, rl, grs, cl, gcs, has_col, dscale);
      Dev::gemm_acc(dQb, dS, Kb);
      Tensor dKb = dK.narrow(0, c0, bc);
      Dev::gemm_acc(dKb, dS.t(), Qb);
    }
  }
  const Tensor f = sc / sigma;  // exact: σ is a power of two
  dQ.mul_(f);
  dK.mul_(f);
  dscale.div_(sigma);
  return {scatter_rows(dQ, row_index, q), scatter_rows(dK, col_index, k), dscale.to(scale.scalar_type())};
}

inline void check_siglip_args(const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias) {
  check_float_input(x, "x");
  check_float_input(y, "y");
  TORCH_CHECK(x.scalar_type() == y.scalar_type(), "contrastive_ops: x and y dtypes differ");
  TORCH_CHECK(x.device() == y.device(), "contrastive_ops: x and y devices differ");
  TORCH_CHECK(x.size(1) == y.size(1), "contrastive_ops: x ", x.sizes(), " and y ", y.sizes(),
              " have different feature sizes");
  TORCH_CHECK(scale.numel() == 1 && scale.dim() == 0 && bias.numel() == 1 && bias.dim() == 0,
              "contrastive_ops: scale and bias must be 0-dim tensors, got ", scale.sizes(), " and ", bias.sizes());
  TORCH_CHECK(scale.device() == x.device() && bias.device() == x.device(),
              "contrastive_ops: scale and bias must be on ", x.device());
}

// Σ_ij softplus(-z_ij·l_ij), l = scale·G + bias, z = +1 on the diagonal i == j, -1 elsewhere.
template <class Dev>
Tensor siglip_fwd_tiled(const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias) {
  check_siglip_args(x, y, scale, bias);
  const int64_t B = x.size(0), M = y.size(0), D = x.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const Tensor X = gather_rows(x, c10::nullopt, Dev::compute_dtype(x.scalar_type()));
  const Tensor Y = gather_rows(y, c10::nullopt, Dev::compute_dtype(x.scalar_type()));
  const Tensor sc = scale.to(acc), bi = bias.to(acc);
  Tensor total = at::zeros({}, opts);
  const int64_t BR = Dev::row_block(B, M, D), BC = Dev::col_block(B, M, D);
  Tensor gbuf = at::empty({std::min(B, BR) * std::min(M, BC)}, opts);
  for (int64_t r0 = 0; r0 < B; r0 += BR) {
    const int64_t br = std::min(BR, B - r0);
    for (int64_t c0 = 0; c0 < M; c0 += BC) {
      const int64_t bc = std::min(BC, M - c0);
      Tensor G = tile_view(gbuf, br, bc);
      Dev::gemm_nt(G, X.narrow(0, r0, br), Y.narrow(0, c0, bc));
      Dev::siglip_fwd_epilogue(G, sc, bi, r0, c0, total);
    }
  }
  return total;
}

// dL/dl_ij = grad·(σ(l_ij) - [i == j]);  dx = scale·dL Y, dy = scale·dLᵀ X,
// dscale = Σ dL·G, dbias = Σ dL.
template <class Dev>
std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd_tiled(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                            const Tensor& bias, const Tensor& grad) {
  check_siglip_args(x, y, scale, bias);
  TORCH_CHECK(grad.numel() == 1, "contrastive_ops: grad must have one element, got ", grad.sizes());
  check_same_device(grad, "grad", x);
  const int64_t B = x.size(0), M = y.size(0), D = x.size(1);
  const auto acc = acc_dtype(x.scalar_type());
  const auto opts = x.options().dtype(acc);
  const Tensor X = gather_rows(x, c10::nullopt, Dev::compute_dtype(x.scalar_type()));
  const Tensor Y = gather_rows(y, c10::nullopt, Dev::compute_dtype(x.scalar_type()));
  const Tensor sc = scale.to(acc), bi = bias.to(acc), g = grad.reshape({}).to(acc);
  Tensor dX = at::zeros({B, D}, opts), dY = at::zeros({M, D}, opts);
  Tensor dscale = at::zeros({}, opts), dbias = at::zeros({}, opts);
  const int64_t BR = Dev::row_block(B, M, D), BC = Dev::col_block(B, M, D);
  Tensor gbuf = at::empty({std::min(B, BR) * std::min(M, BC)}, opts);
  const auto dsd = Dev::ds_dtype(x.scalar_type());
  Tensor dbuf = at::empty({std::min(B, BR) * std::min(M, BC)}, opts.dtype(dsd));
  // |dL| ≤ |grad|: the epilogue sees σ·grad and writes σ·dL (see ds_scale).
  const Tensor sigma = ds_scale(g.reshape({1}), g, false, dsd);
  const Tensor gs = g * sigma;
  for (int64_t r0 = 0; r0 < B; r0 += BR) {
    const int64_t br = std::min(BR, B - r0);
    const Tensor Xb = X.narrow(0, r0, br);
    Tensor dXb = dX.narrow(0, r0, br);
    for (int64_t c0 = 0; c0 < M; c0 += BC) {
      const int64_t bc = std::min(BC, M - c0);
      const Tensor Yb = Y.narrow(0, c0, bc);
      Tensor G = tile_view(gbuf, br, bc), dL = tile_view(dbuf, br, bc);
      Dev::gemm_nt(G, Xb, Yb);
      Dev::siglip_bwd_epilogue(G, dL, sc, bi, gs, r0, c0, dscale, dbias);
      Dev::gemm_acc(dXb, dL, Yb);
      Tensor dYb = dY.narrow(0, c0, bc);
      Dev::gemm_acc(dYb, dL.t(), Xb);
    }
  }
  const Tensor f = sc / sigma;
  dX.mul_(f);
  dY.mul_(f);
  dscale.div_(sigma);
  dbias.div_(sigma);
  return {dX.to(x.scalar_type()), dY.to(y.scalar_type()), dscale.to(scale.scalar_type()),
          dbias.to(bias.scalar_type())};
}

}  // namespace

}  // namespace contrastive_ops
