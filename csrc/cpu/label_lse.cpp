// The row LSE of similarities plus a per-pair label-distance log-weight (primitive "label_lse"): CPU kernels.
//
// For q (B, D), k (M, D) (any float dtype, computed in the accumulation type: fp32, float64 for float64
// inputs), scale s (0-dim), row labels y (B,), column labels ŷ (M,), a row coefficient c (B,) (all three
// converted to the accumulation type), column ranges [col_start_i, col_end_i) (B,) int32, exclude (B,)
// int32 (< 0: none), a weight kind and the skip_equal flag:
//
//     d_ij = c_i·|y_i − ŷ_j|,  φ = log1p(d) (kind 0), log1p(d²) (1), −log1p(d) (2), −log1p(d²) (3)
//     allowed(i, j) = start_i <= j < end_i, j != exclude_i, and (skip_equal) ŷ_j != y_i
//     label_lse_fwd: lse_i = LSE_{j allowed} (s·q_i·k_j + φ_ij)           (−inf if nothing is allowed)
//     label_lse_bwd: P = e^{S − lse} on allowed pairs, dG = γ_i·s·P_ij
//                    dq = dG k, dk = dGᵀ q, ds = Σ_i γ_i Σ_j P_ij·q_i·k_j
//
// Mixture mode (row_term b (B,) given, with row_ids (B,), col_ids (M,) int32, a seed and integer Beta(a, b)):
// λ_ij = pair_lambda(seed, row_ids_i, col_ids_j) below (the counter-based generator of
// contrastive_ops/primitives/label_lse.py, bit for bit), recomputed per tile in every pass (never stored), and
//     S_ij = λ_ij·b_i + (1 − λ_ij)·s·q_i·k_j + φ((1 − λ_ij)·d_ij)
//     dG = γ_i·s·(1 − λ_ij)·P_ij, ds = Σ_i γ_i Σ_j P_ij·(1 − λ_ij)·q_i·k_j, db_i = γ_i Σ_j P_ij·λ_ij.
//
// (maths in contrastive_ops/primitives/label_lse.py).  Rows are processed in blocks of kBlock: each block
// forms its (kBlock, M) tile of logits with one GEMM, its row LSE and, in the backward, dq of its rows and
// its rows' parts of ds; dk is formed by blocks of kBlock candidates against all B rows, the tile (B, kBlock)
// recomputed (no atomics, no B×M buffer: O(kBlock·(B + M)) per thread).  Blocks run in parallel; each output
// element is written by one block and the per-row parts of ds are summed in row order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../acc_dtype.h"

namespace contrastive_ops {
namespace label_lse_cpu {
namespace {

constexpr int64_t kBlock = 64;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The counter-based generator (primitives/label_lse.py: _fmix32, pair_key, pair_uniform, pair_lambda).
inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t pair_key(uint32_t seed, uint32_t row, uint32_t col) {
  return fmix32(fmix32(seed ^ (row * 0x9E3779B1u)) ^ (col * 0x7FEB352Du));
}

// Draw t of a pair: ((h >> 9) + 1/2)·2⁻²³, exact in fp32.
inline float pair_uniform(uint32_t key, uint32_t t) {
  const uint32_t h = fmix32(key ^ ((t + 1u) * 0x846CA68Bu));
  return (static_cast<float>(h >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// λ ~ Beta(a, b) = G_a/(G_a + G_b), G_a = −Σ_{t<a} log u_t, G_b = −Σ_{t<b} log u_{a+t}, in T.
template <typename T>
inline T pair_lambda(uint32_t key, int64_t a, int64_t b) {
  T ga = 0, gb = 0;
  for (int64_t t = 0; t < a; ++t) ga += -std::log(static_cast<T>(pair_uniform(key, static_cast<uint32_t>(t))));
  for (int64_t t = 0; t < b; ++t) gb += -std::log(static_cast<T>(pair_uniform(key, static_cast<uint32_t>(a + t))));
  return ga / (ga + gb);
}

// The operands in the accumulation type, shared by the tiles of one call.
struct Operands {
  at::Tensor q, k, y_row, y_col, coef, start, end, excl;
  double s;
  int64_t kind;
  bool skip_equal;
  bool mix = false;  // mixture mode: the fields below are set
  at::Tensor row_term, row_ids, col_ids;
  uint32_t seed = 0;
  int64_t beta_a = 0, beta_b = 0;
};

Operands prepare(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& scale, const at::Tensor& y_row,
                 const at::Tensor& y_col, const at::Tensor& coef, const at::Tensor& col_start,
                 const at::Tensor& col_end, const at::Tensor& exclude, int64_t kind, bool skip_equal,
                 const std::optional<at::Tensor>& row_term, const std::optional<at::Tensor>& row_ids,
                 const std::optional<at::Tensor>& col_ids, int64_t seed, int64_t beta_a, int64_t beta_b,
                 const char* op) {
  TORCH_CHECK(q_in.dim() == 2 && k_in.dim() == 2 && q_in.size(1) == k_in.size(1), op,
              ": q and k must be 2-D with one feature size, got ", q_in.sizes(), " and ", k_in.sizes());
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type(), op, ": q and k dtypes differ: ", q_in.scalar_type(),
              " vs ", k_in.scalar_type());
  TORCH_CHECK(at::isFloatingType(q_in.scalar_type()), op, ": q must be floating point, got ", q_in.scalar_type());
  TORCH_CHECK(scale.numel() == 1, op, ": scale must be 0-dim, got shape ", scale.sizes());
  TORCH_CHECK(kind >= 0 && kind <= 3, op, ": kind must be 0 (L1_inv), 1 (L2_inv), 2 (L1) or 3 (L2), got ", kind);
  const int64_t B = q_in.size(0), M = k_in.size(0);
  for (const at::Tensor* t : {&y_row, &coef}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && at::isFloatingType(t->scalar_type()), op,
                ": y_row and coef must be (", B, ",) floating point, got shape ", t->sizes(), " ", t->scalar_type());
  }
  TORCH_CHECK(y_col.dim() == 1 && y_col.size(0) == M && at::isFloatingType(y_col.scalar_type()), op,
              ": y_col must be (", M, ",) floating point, got shape ", y_col.sizes(), " ", y_col.scalar_type());
  for (const at::Tensor* t : {&col_start, &col_end, &exclude}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kInt, op,
                ": col_start, col_end and exclude must be (", B, ",) int32, got shape ", t->sizes(), " ",
                t->scalar_type());
  }
  const at::ScalarType acc = acc_dtype(q_in.scalar_type());
  Operands o;
  o.q = q_in.to(acc).contiguous();
  o.k = k_in.to(acc).contiguous();
  o.y_row = y_row.to(acc).contiguous();
  o.y_col = y_col.to(acc).contiguous();
  o.coef = coef.to(acc).contiguous();
  o.start = col_start.to(at::kLong).contiguous();
  o.end = col_end.to(at::kLong).contiguous();
  o.excl = exclude.to(at::kLong).contiguous();
  o.s = scale.to(at::kDouble).item<double>();
  o.kind = kind;
  o.skip_equal = skip_equal;
  o.mix = row_term.has_value();
  if (o.mix) {
    TORCH_CHECK(row_ids.has_value() && col_ids.has_value(), op, ": mixture mode needs row_ids and col_ids");
    TORCH_CHECK(row_term->dim() == 1 && row_term->size(0) == B && at::isFloatingType(row_term->scalar_type()), op,
                ": row_term must be (", B, ",) floating point, got shape ", row_term->sizes(), " ",
                row_term->scalar_type());
    TORCH_CHECK(row_ids->dim() == 1 && row_ids->size(0) == B && row_ids->scalar_type() == at::kInt, op,
                ": row_ids must be (", B, ",) int32, got shape ", row_ids->sizes(), " ", row_ids->scalar_type());
    TORCH_CHECK(col_ids->dim() == 1 && col_ids->size(0) == M && col_ids->scalar_type() == at::kInt, op,
                ": col_ids must be (", M, ",) int32, got shape ", col_ids->sizes(), " ", col_ids->scalar_type());
    TORCH_CHECK(seed >= 0 && seed < (int64_t{1} << 32), op, ": seed must lie in [0, 2**32), got ", seed);
    TORCH_CHECK(beta_a >= 1 && beta_b >= 1 && beta_a + beta_b <= 32, op,
                ": beta_a and beta_b must be integers >= 1 with beta_a + beta_b <= 32, got ", beta_a, " and ", beta_b);
    o.row_term = row_term->to(acc).contiguous();
    o.row_ids = row_ids->contiguous();
    o.col_ids = col_ids->contiguous();
    o.seed = static_cast<uint32_t>(seed);
    o.beta_a = beta_a;
    o.beta_b = beta_b;
  }
  return o;
}

// λ of the pairs of rows [r0, r1) and candidates [c0, c1) (mixture mode), in the accumulation type.
at::Tensor tile_lambda(const Operands& o, int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  at::Tensor lam = at::empty({r1 - r0, c1 - c0}, o.q.options());
  const int32_t* rid = o.row_ids.data_ptr<int32_t>();
  const int32_t* cid = o.col_ids.data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(lam.scalar_type(), "label_lse_lambda", [&] {
    scalar_t* out = lam.data_ptr<scalar_t>();
    for (int64_t i = r0; i < r1; ++i) {
      for (int64_t j = c0; j < c1; ++j) {
        const uint32_t key = pair_key(o.seed, static_cast<uint32_t>(rid[i]), static_cast<uint32_t>(cid[j]));
        *out++ = pair_lambda<scalar_t>(key, o.beta_a, o.beta_b);
      }
    }
  });
  return lam;
}

// Logits S of rows [r0, r1) against candidates [c0, c1), −inf where not allowed; G in *G_out and, in mixture
// mode, λ in *lam_out (when not null).
at::Tensor tile_logits(const Operands& o, int64_t r0, int64_t r1, int64_t c0, int64_t c1, at::Tensor* G_out,
                       at::Tensor* lam_out = nullptr) {
  const at::Tensor G = o.q.slice(0, r0, r1).mm(o.k.slice(0, c0, c1).t());
  const at::Tensor yr = o.y_row.slice(0, r0, r1).unsqueeze(1), yc = o.y_col.slice(0, c0, c1).unsqueeze(0);
  at::Tensor d = (yr - yc).abs() * o.coef.slice(0, r0, r1).unsqueeze(1);
  at::Tensor lam;
  if (o.mix) {
    lam = tile_lambda(o, r0, r1, c0, c1);
    d.mul_(1 - lam);
  }
  if (o.kind == 1 || o.kind == 3) d.mul_(d);
  at::Tensor w = d.log1p_();
  if (o.kind >= 2) w = -w;
  const at::Tensor cols = at::arange(c0, c1, o.start.options()).unsqueeze(0);
  at::Tensor allowed = (cols >= o.start.slice(0, r0, r1).unsqueeze(1)) & (cols < o.end.slice(0, r0, r1).unsqueeze(1)) &
                       (cols != o.excl.slice(0, r0, r1).unsqueeze(1));
  if (o.skip_equal) allowed = allowed & (yr != yc);
  if (G_out != nullptr) *G_out = G;
  if (o.mix) {
    if (lam_out != nullptr) *lam_out = lam;
    // λ·b + (1 − λ)·s·G + φ
    w.add_(lam * o.row_term.slice(0, r0, r1).unsqueeze(1)).add_((1 - lam) * G, o.s);
    return w.masked_fill_(allowed.logical_not(), kNegInf);
  }
  return w.add_(G, o.s).masked_fill_(allowed.logical_not(), kNegInf);  // in place: one (r, c) float tile less
}

// P (0 where not allowed or the row has nothing allowed) of a tile of logits against the rows' lse (r, 1).
at::Tensor probs(const at::Tensor& S, const at::Tensor& lse) {
  const at::Tensor lse_safe = at::where(at::isinf(lse), at::zeros_like(lse), lse);
  return at::exp(S - lse_safe);
}

}  // namespace

at::Tensor label_lse_fwd(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& scale,
                         const at::Tensor& y_row, const at::Tensor& y_col, const at::Tensor& coef,
                         const at::Tensor& col_start, const at::Tensor& col_end, const at::Tensor& exclude, int64_t kind,
                         bool skip_equal, const std::optional<at::Tensor>& row_term,
                         const std::optional<at::Tensor>& row_ids, const std::optional<at::Tensor>& col_ids,
                         int64_t seed, int64_t beta_a, int64_t beta_b) {
  const Operands o = prepare(q_in, k_in, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal,
                             row_term, row_ids, col_ids, seed, beta_a, beta_b, "label_lse_fwd");
  const int64_t B = o.q.size(0), M = o.k.size(0);
  at::Tensor lse = at::empty({B}, o.q.options());
  const int64_t blocks = (B + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlock, r1 = std::min(B, r0 + kBlock);
      if (M == 0) {
        lse.slice(0, r0, r1).fill_(kNegInf);
        continue;
      }
      lse.slice(0, r0, r1).copy_(tile_logits(o, r0, r1, 0, M, nullptr).logsumexp(1));
    }
  });
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> label_lse_bwd(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& scale, const at::Tensor& y_row,
    const at::Tensor& y_col, const at::Tensor& coef, const at::Tensor& col_start, const at::Tensor& col_end,
    const at::Tensor& exclude, int64_t kind, bool skip_equal, const std::optional<at::Tensor>& row_term,
    const std::optional<at::Tensor>& row_ids, const std::optional<at::Tensor>& col_ids, int64_t seed,
    int64_t beta_a, int64_t beta_b, const at::Tensor& lse_in, const at::Tensor& grad) {
  const Operands o = prepare(q_in, k_in, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal,
                             row_term, row_ids, col_ids, seed, beta_a, beta_b, "label_lse_bwd");
  const int64_t B = o.q.size(0), M = o.k.size(0);
  for (const at::Tensor* t : {&lse_in, &grad}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "label_lse_bwd: lse and grad must have shape (", B, ",), got ",
                t->sizes());
  }
  const at::Tensor lse = lse_in.to(o.q.scalar_type()).contiguous(), gl = grad.to(o.q.scalar_type()).contiguous();
  at::Tensor dq = at::empty_like(o.q), dk = at::empty_like(o.k), part = at::empty({B}, o.q.options());
  at::Tensor db = at::empty({B}, o.q.options());
  const int64_t row_blocks = (B + kBlock - 1) / kBlock;
  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kBlock, r1 = std::min(B, r0 + kBlock);
      at::Tensor G, lam;
      at::Tensor P = probs(tile_logits(o, r0, r1, 0, M, &G, &lam), lse.slice(0, r0, r1).unsqueeze(1));
      const at::Tensor g = gl.slice(0, r0, r1);
      if (o.mix) {
        db.slice(0, r0, r1).copy_(g * (P * lam).sum(1));
        P = P * (1 - lam);  // the G part of each logit carries (1 − λ)
      } else {
        db.slice(0, r0, r1).zero_();
      }
      dq.slice(0, r0, r1).copy_((P * (g * o.s).unsqueeze(1)).mm(o.k));
      part.slice(0, r0, r1).copy_(g * (P * G).sum(1));
    }
  });
  const int64_t col_blocks = (M + kBlock - 1) / kBlock;
  const at::Tensor lse_c = lse.unsqueeze(1), gs_c = (gl * o.s).unsqueeze(1);
  at::parallel_for(0, col_blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kBlock, c1 = std::min(M, c0 + kBlock);
      at::Tensor lam;
      at::Tensor P = probs(tile_logits(o, 0, B, c0, c1, nullptr, &lam), lse_c);  // (B, c1 − c0)
      if (o.mix) P = P * (1 - lam);
      dk.slice(0, c0, c1).copy_((P * gs_c).t().mm(o.q));
    }
  });
  const at::Tensor dscale = part.sum();
  return {dq.to(q_in.scalar_type()), dk.to(k_in.scalar_type()), dscale, db};
}

// The generator's uniforms u_t of the pairs (rows_i, cols_j) (R, C) fp32: a hook to check that this file, the
// Python and the Triton versions draw bitwise the same numbers.
at::Tensor label_lse_uniforms(int64_t seed, const at::Tensor& rows, const at::Tensor& cols, int64_t draw) {
  TORCH_CHECK(rows.dim() == 1 && cols.dim() == 1 && rows.scalar_type() == at::kInt && cols.scalar_type() == at::kInt,
              "label_lse_uniforms: rows and cols must be 1-D int32, got ", rows.sizes(), " ", rows.scalar_type(),
              " and ", cols.sizes(), " ", cols.scalar_type());
  TORCH_CHECK(seed >= 0 && seed < (int64_t{1} << 32) && draw >= 0 && draw < 32,
              "label_lse_uniforms: seed must lie in [0, 2**32) and draw in [0, 32), got ", seed, " and ", draw);
  const at::Tensor r = rows.contiguous(), c = cols.contiguous();
  const int64_t R = r.size(0), C = c.size(0);
  at::Tensor out = at::empty({R, C}, rows.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int32_t* rp = r.data_ptr<int32_t>();
  const int32_t* cp = c.data_ptr<int32_t>();
  for (int64_t i = 0; i < R; ++i) {
    for (int64_t j = 0; j < C; ++j) {
      const uint32_t key = pair_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(rp[i]),
                                    static_cast<uint32_t>(cp[j]));
      o[i * C + j] = pair_uniform(key, static_cast<uint32_t>(draw));
    }
  }
  return out;
}

}  // namespace label_lse_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("label_lse_fwd", &contrastive_ops::label_lse_cpu::label_lse_fwd);
  m.impl("label_lse_bwd", &contrastive_ops::label_lse_cpu::label_lse_bwd);
  m.impl("label_lse_uniforms", &contrastive_ops::label_lse_cpu::label_lse_uniforms);
}
