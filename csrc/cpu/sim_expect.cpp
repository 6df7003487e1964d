// The softmax-weighted row mean of the similarities (primitive "sim_expect"): CPU kernels.
//
// For q (B, D), k (M, D) (any float dtype, computed in the accumulation type: fp32, float64 for
// float64 inputs), scale s (0-dim) and exclude (B,) int32 or none (entries < 0 exclude nothing):
//
//     G = q kᵀ, S = s·G, allowed(i, j) = j != exclude[i], P = softmax over the allowed j of S[i, ·]
//     sim_expect_fwd: lse[i] = LSE_{j allowed} S[i, j] (−inf if none), mean[i] = Σ_j P[i, j]·G[i, j] (0 if none)
//     sim_expect_bwd: dG = P·(s·g_lse + g_mean·(1 + s·(G − mean)))
//                     dq = dG k, dk = dGᵀ q, ds = Σ_i [g_lse_i·mean_i + g_mean_i·Σ_j P·G·(G − mean_i)]
//
// (maths and derivation in contrastive_ops/primitives/sim_expect.py).  Rows are processed in blocks of
// kBlock: each block forms its (kBlock, M) tile of G with one GEMM, its row statistics and, in the
// backward, dq of its rows; dk is formed by blocks of kBlock candidates against all B rows, the tile
// (kBlock, B) recomputed (no atomics, no B×M buffer: O(kBlock·(B + M)) per thread).  Blocks run in
// parallel; the per-row parts of ds are summed in row order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "../acc_dtype.h"

namespace contrastive_ops {
namespace sim_expect_cpu {
namespace {

constexpr int64_t kBlock = 64;

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                const c10::optional<at::Tensor>& exclude, const char* op) {
  TORCH_CHECK(q.dim() == 2 && k.dim() == 2 && q.size(1) == k.size(1), op,
              ": q and k must be 2-D with one feature size, got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k dtypes differ: ", q.scalar_type(), " vs ",
              k.scalar_type());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q must be floating point, got ", q.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must be 0-dim, got shape ", scale.sizes());
  if (exclude.has_value()) {
    TORCH_CHECK(exclude->dim() == 1 && exclude->size(0) == q.size(0) && exclude->scalar_type() == at::kInt, op,
                ": exclude must be (", q.size(0), ",) int32, got shape ", exclude->sizes(), " ",
                exclude->scalar_type());
  }
}

// Allowed pairs of rows [r0, r1) against all M candidates (undefined: all allowed).
at::Tensor allowed_rows(const c10::optional<at::Tensor>& ex, int64_t r0, int64_t r1, int64_t M) {
  if (!ex.has_value()) return at::Tensor();
  const at::Tensor cols = at::arange(M, ex->options().dtype(at::kLong));
  return cols.unsqueeze(0) != ex->slice(0, r0, r1).to(at::kLong).unsqueeze(1);
}

// Allowed pairs of all B rows against candidates [c0, c1), as a (c1 − c0, B) mask (undefined: all).
at::Tensor allowed_cols(const c10::optional<at::Tensor>& ex, int64_t c0, int64_t c1) {
  if (!ex.has_value()) return at::Tensor();
  const at::Tensor cols = at::arange(c0, c1, ex->options().dtype(at::kLong));
  return cols.unsqueeze(1) != ex->to(at::kLong).unsqueeze(0);
}

// P and dG of a tile G whose row statistics broadcast against it (``dim`` = the candidates' axis).
std::tuple<at::Tensor, at::Tensor> p_dg(const at::Tensor& G, const at::Tensor& allowed, double s,
                                        const at::Tensor& lse, const at::Tensor& mean, const at::Tensor& gl,
                                        const at::Tensor& gm) {
  at::Tensor S = G * s;
  if (allowed.defined()) S = S.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
  const at::Tensor lse_safe = at::where(at::isinf(lse), at::zeros_like(lse), lse);
  const at::Tensor P = at::exp(S - lse_safe);
  const at::Tensor dG = P * (gl * s + gm * ((G - mean) * s + 1.0));
  return {P, dG};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> sim_expect_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                  const at::Tensor& scale, const c10::optional<at::Tensor>& exclude) {
  check_args(q_in, k_in, scale, exclude, "sim_expect_fwd");
  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous();
  const int64_t B = q.size(0), M = k.size(0);
  const double s = scale.to(at::kDouble).item<double>();
  at::Tensor lse = at::empty({B}, q.options()), mean = at::empty({B}, q.options());
  const at::Tensor kt = k.t();
  const int64_t blocks = (B + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlock, r1 = std::min(B, r0 + kBlock);
      const at::Tensor G = q.slice(0, r0, r1).mm(kt);
      at::Tensor S = G * s;
      const at::Tensor allowed = allowed_rows(exclude, r0, r1, M);
      if (allowed.defined()) S = S.masked_fill(allowed.logical_not(), -std::numeric_limits<double>::infinity());
      const at::Tensor l = M > 0 ? S.logsumexp(1) : at::full({r1 - r0}, -std::numeric_limits<double>::infinity(),
                                                             q.options());
      const at::Tensor l_safe = at::where(at::isinf(l), at::zeros_like(l), l);
      const at::Tensor P = at::exp(S - l_safe.unsqueeze(1));
      lse.slice(0, r0, r1).copy_(l);
      mean.slice(0, r0, r1).copy_((P * G).sum(1));
    }
  });
  return {lse, mean};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sim_expect_bwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& scale, const c10::optional<at::Tensor>& exclude,
    const at::Tensor& lse_in, const at::Tensor& mean_in, const at::Tensor& grad_lse, const at::Tensor& grad_mean) {
  check_args(q_in, k_in, scale, exclude, "sim_expect_bwd");
  const int64_t B = q_in.size(0), M = k_in.size(0);
  for (const at::Tensor* t : {&lse_in, &mean_in, &grad_lse, &grad_mean}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "sim_expect_bwd: row statistics and gradients must have shape (",
                B, ",), got ", t->sizes());
  }
  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc).contiguous(), k = k_in.to(acc).contiguous();
  const at::Tensor lse = lse_in.to(acc).contiguous(), mean = mean_in.to(acc).contiguous();
  const at::Tensor gl = grad_lse.to(acc).contiguous(), gm = grad_mean.to(acc).contiguous();
  const double s = scale.to(at::kDouble).item<double>();
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), part = at::empty({B}, q.options());
  const at::Tensor kt = k.t(), qt = q.t();
  const int64_t row_blocks = (B + kBlock - 1) / kBlock;
  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlock, r1 = std::min(B, r0 + kBlock);
      const at::Tensor G = q.slice(0, r0, r1).mm(kt);
      const at::Tensor mu = mean.slice(0, r0, r1).unsqueeze(1);
      auto [P, dG] = p_dg(G, allowed_rows(exclude, r0, r1, M), s, lse.slice(0, r0, r1).unsqueeze(1), mu,
                          gl.slice(0, r0, r1).unsqueeze(1), gm.slice(0, r0, r1).unsqueeze(1));
      dq.slice(0, r0, r1).copy_(dG.mm(k));
      const at::Tensor var = (P * G * (G - mu)).sum(1);
      part.slice(0, r0, r1).copy_(gl.slice(0, r0, r1) * mean.slice(0, r0, r1) + gm.slice(0, r0, r1) * var);
    }
  });
  const int64_t col_blocks = (M + kBlock - 1) / kBlock;
  const at::Tensor lse_r = lse.unsqueeze(0), mean_r = mean.unsqueeze(0), gl_r = gl.unsqueeze(0), gm_r = gm.unsqueeze(0);
  at::parallel_for(0, col_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kBlock, c1 = std::min(M, c0 + kBlock);
      const at::Tensor Gt = k.slice(0, c0, c1).mm(qt);  // (c1 − c0, B): G transposed
      auto [P, dGt] = p_dg(Gt, allowed_cols(exclude, c0, c1), s, lse_r, mean_r, gl_r, gm_r);
      (void)P;
      dk.slice(0, c0, c1).copy_(dGt.mm(q));
    }
  });
  const at::Tensor dscale = part.sum();
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dscale};
}

}  // namespace sim_expect_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("sim_expect_fwd", &contrastive_ops::sim_expect_cpu::sim_expect_fwd);
  m.impl("sim_expect_bwd", &contrastive_ops::sim_expect_cpu::sim_expect_bwd);
}
