// Sinkhorn-Knopp codes (SwAV) in the log domain: schema and CPU kernels.
//
// Maths (see contrastive_ops/losses/swav.py): with L = S/ε and log-scalings
// u (B,), v (K,), one iteration is
//
//     u[b] = −LSE_k(L[b,k] + v[k])      sample step
//     v[k] = −LSE_b(L[b,k] + u[b])      prototype step
//
// and the codes are softmax_k(L[b,:] + v_T) (T ≥ 1), or B·exp(L − LSE_{b,k} L)
// for T = 0.  Every exponent is ≤ 0 after its LSE, so the result is finite
// for any finite input.
//
// sinkhorn_col_lse fuses one sample step with the next prototype step in one
// pass: each thread owns a contiguous chunk of rows; for each row it computes
// u[b] (the row is then in L1) and folds L[b,:] + u[b] into its own (K,)
// running max / sum of exp, m' = max(m, x), s' = s·e^{m−m'} + e^{x−m'}.  The
// per-thread partials (threads × K) are combined at the end.  No B×K buffer
// besides the output of sinkhorn_codes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace contrastive_ops {
namespace sinkhorn_cpu {

namespace {

void check_scores(const at::Tensor& scores, double epsilon, const char* op) {
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D (B, K), got shape ", scores.sizes());
  TORCH_CHECK(scores.size(0) > 0 && scores.size(1) > 0, op, ": scores must be non-empty, got shape ",
              scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), op, ": scores must be floating point, got ",
              scores.scalar_type());
  TORCH_CHECK(epsilon > 0 && std::isfinite(epsilon), op, ": epsilon must be a finite float > 0, got ", epsilon);
}

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// LSE_k(row[k]·inv_eps + v[k]) (v may be null), two passes over a row that stays in cache.
template <typename scalar_t, typename acc_t>
acc_t row_lse(const scalar_t* row, int64_t K, acc_t inv_eps, const acc_t* v) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    acc_t x = static_cast<acc_t>(row[k]) * inv_eps + (v ? v[k] : acc_t(0));
    m = std::max(m, x);
  }
  acc_t s = 0;
  for (int64_t k = 0; k < K; ++k) {
    acc_t x = static_cast<acc_t>(row[k]) * inv_eps + (v ? v[k] : acc_t(0));
    s += std::exp(x - m);
  }
  return m + std::log(s);
}

}  // namespace

// (K,) in fp32 (float64 for float64 scores): LSE_b(L[b,k] + u[b]), u[b] = −LSE_k(L[b,k] + v[k]), u = 0 without v.
at::Tensor sinkhorn_col_lse(const at::Tensor& scores_in, double epsilon, const c10::optional<at::Tensor>& v_in) {
  check_scores(scores_in, epsilon, "sinkhorn_col_lse");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  const auto acc = acc_type(scores.scalar_type());
  at::Tensor v;
  if (v_in.has_value() && v_in->defined()) {
    TORCH_CHECK(v_in->dim() == 1 && v_in->size(0) == K, "sinkhorn_col_lse: v must have shape (", K,
                ",), got ", v_in->sizes());
    v = v_in->to(scores.device(), acc).contiguous();
  }
  const int64_t n_chunks = std::max<int64_t>(1, std::min<int64_t>(B, at::get_num_threads()));
  at::Tensor pm = at::empty({n_chunks, K}, scores.options().dtype(acc));
  at::Tensor ps = at::empty({n_chunks, K}, scores.options().dtype(acc));
  at::Tensor out = at::empty({K}, scores.options().dtype(acc));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_col_lse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* S = scores.data_ptr<scalar_t>();
    const acc_t* vp = v.defined() ? v.data_ptr<acc_t>() : nullptr;
    acc_t* PM = pm.data_ptr<acc_t>();
    acc_t* PS = ps.data_ptr<acc_t>();
    const acc_t inv_eps = acc_t(1.0 / epsilon);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        acc_t* m = PM + c * K;
        acc_t* s = PS + c * K;
        std::fill(m, m + K, neg_inf);
        std::fill(s, s + K, acc_t(0));
        const int64_t r0 = B * c / n_chunks, r1 = B * (c + 1) / n_chunks;
        for (int64_t b = r0; b < r1; ++b) {
          const scalar_t* row = S + b * K;
          const acc_t u = vp ? -row_lse<scalar_t, acc_t>(row, K, inv_eps, vp) : acc_t(0);  // sample step
          for (int64_t k = 0; k < K; ++k) {                                                  // prototype step
            const acc_t x = static_cast<acc_t>(row[k]) * inv_eps + u;
            if (x > m[k]) {
              s[k] = s[k] * std::exp(m[k] - x) + acc_t(1);
              m[k] = x;
            } else {
              s[k] += std::exp(x - m[k]);
            }
          }
        }
      }
    });
    // Combine the chunks: every chunk holds ≥ 1 row, so each m is finite and each s ≥ 1.
    acc_t* O = out.data_ptr<acc_t>();
    at::parallel_for(0, K, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        acc_t M = neg_inf;
        for (int64_t c = 0; c < n_chunks; ++c) M = std::max(M, PM[c * K + k]);
        acc_t tot = 0;
        for (int64_t c = 0; c < n_chunks; ++c) tot += PS[c * K + k] * std::exp(PM[c * K + k] - M);
        O[k] = M + std::log(tot);
      }
    });
  });
  return out;
}

// (B, K) fp32: exp(L + v − LSE_k(L + v)), or exp(L + v) when normalize is false.
at::Tensor sinkhorn_codes(const at::Tensor& scores_in, double epsilon, const at::Tensor& v_in, bool normalize) {
  check_scores(scores_in, epsilon, "sinkhorn_codes");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  TORCH_CHECK(v_in.dim() == 1 && v_in.size(0) == K, "sinkhorn_codes: v must have shape (", K, ",), got ",
              v_in.sizes());
  const auto acc = acc_type(scores.scalar_type());
  const at::Tensor v = v_in.to(scores.device(), acc).contiguous();
  at::Tensor out = at::empty({B, K}, scores.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_codes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* S = scores.data_ptr<scalar_t>();
    const acc_t* vp = v.data_ptr<acc_t>();
    float* O = out.data_ptr<float>();
    const acc_t inv_eps = acc_t(1.0 / epsilon);
    const int64_t grain = std::max<int64_t>(1, 16384 / K);
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* row = S + b * K;
        const acc_t lse = normalize ? row_lse<scalar_t, acc_t>(row, K, inv_eps, vp) : acc_t(0);
        float* o = O + b * K;
        for (int64_t k = 0; k < K; ++k) {
          o[k] = static_cast<float>(std::exp(static_cast<acc_t>(row[k]) * inv_eps + vp[k] - lse));
        }
      }
    });
  });
  return out;
}

// The whole loop: `iterations` fused passes, then one pass writing the codes.
at::Tensor sinkhorn(const at::Tensor& scores, double epsilon, int64_t iterations) {
  check_scores(scores, epsilon, "sinkhorn");
  TORCH_CHECK(iterations >= 0, "sinkhorn: iterations must be >= 0, got ", iterations);
  const int64_t B = scores.size(0), K = scores.size(1);
  if (iterations == 0) {
    const at::Tensor total = at::logsumexp(sinkhorn_col_lse(scores, epsilon, c10::nullopt), {0});
    const at::Tensor v = (std::log(static_cast<double>(B)) - total).expand({K});
    return sinkhorn_codes(scores, epsilon, v, false);
  }
  c10::optional<at::Tensor> v;
  for (int64_t t = 0; t < iterations; ++t) v = sinkhorn_col_lse(scores, epsilon, v).neg_();
  return sinkhorn_codes(scores, epsilon, *v, true);
}

}  // namespace sinkhorn_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_FRAGMENT(contrastive_ops, m) {
  m.def("sinkhorn(Tensor scores, float epsilon, int iterations) -> Tensor");
  m.def("sinkhorn_col_lse(Tensor scores, float epsilon, Tensor? v) -> Tensor");
  m.def("sinkhorn_codes(Tensor scores, float epsilon, Tensor v, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("sinkhorn", &contrastive_ops::sinkhorn_cpu::sinkhorn);
  m.impl("sinkhorn_col_lse", &contrastive_ops::sinkhorn_cpu::sinkhorn_col_lse);
  m.impl("sinkhorn_codes", &contrastive_ops::sinkhorn_cpu::sinkhorn_codes);
}
