// Sinkhorn-Knopp codes (SwAV) in the log domain: CPU kernels (schemas in csrc/ops.cpp).
//
// Maths (see contrastive_ops/primitives/sinkhorn.py): with L = S/ε and log-scalings
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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "../sinkhorn.h"
#include "fastmath.h"
#include "row_chunks.h"

// The polynomial exp below is vectorized by GCC only when float compares may not trap (we never
// read the floating-point exception flags).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

namespace contrastive_ops {
namespace sinkhorn_cpu {

namespace {

// exp(x) in fp32 without a libm call, so that the loops below vectorize: fastmath::exp_in_range
// (Cody-Waite reduction, the Cephes polynomial; relative error < 2e-7) on x clamped to [-87.3, 88];
// x < -87.3 gives 1.2e-38 (the terms it stands for are < 1e-37 too).  Bit-identical to
// fastmath::fast_exp for x >= -87, but without its select to 0 below -87: that select is there for
// the -inf of masked entries, which scores never hold, and costs the loops below about 8%
// (B=4096, K=3000, one thread).
CO_INLINE float vexp(float x) {
  x = x < -87.3f ? -87.3f : x;
  return fastmath::exp_in_range(x > 88.0f ? 88.0f : x);
}
inline double vexp(double x) { return std::exp(x); }

constexpr int64_t kLanes = 16;  // independent accumulators: the reductions vectorize without reassociation

// buf[k] = row[k]·inv_eps, in the accumulation type.
template <typename scalar_t, typename acc_t>
CO_INLINE void load_row(const scalar_t* row, int64_t K, acc_t inv_eps, acc_t* buf) {
  for (int64_t k = 0; k < K; ++k) buf[k] = static_cast<acc_t>(row[k]) * inv_eps;
}

// LSE_k(x[k] + v[k]) (v may be null); `tmp` is scratch of K values.
template <typename acc_t>
CO_INLINE acc_t lse_plus_t(const acc_t* x, const acc_t* v, int64_t K, acc_t* tmp) {
  if (v) {
    for (int64_t k = 0; k < K; ++k) tmp[k] = x[k] + v[k];
  } else {
    for (int64_t k = 0; k < K; ++k) tmp[k] = x[k];
  }
  acc_t lm[kLanes];
  for (int64_t j = 0; j < kLanes; ++j) lm[j] = -std::numeric_limits<acc_t>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) lm[j] = tmp[k + j] > lm[j] ? tmp[k + j] : lm[j];
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < kLanes; ++j) m = std::max(m, lm[j]);
  for (; k < K; ++k) m = std::max(m, tmp[k]);
  acc_t ls[kLanes] = {};
  k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) ls[j] += vexp(tmp[k + j] - m);
  acc_t s = 0;
  for (int64_t j = 0; j < kLanes; ++j) s += ls[j];
  for (; k < K; ++k) s += vexp(tmp[k] - m);
  return m + std::log(s);
}

// Fold x[k] + u into the running (m[k], s[k]) of Σ_b e^{x}: m' = max(m, x), s' = s·e^{m−m'} + e^{x−m'}.
template <typename acc_t>
CO_INLINE void fold_column_t(const acc_t* x, acc_t u, acc_t* m, acc_t* s, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    const acc_t y = x[k] + u;
    const acc_t mn = y > m[k] ? y : m[k];
    s[k] = s[k] * vexp(m[k] - mn) + vexp(y - mn);
    m[k] = mn;
  }
}

// float: one clone per ISA (see fastmath.h); double: the templates.
CO_MULTIVERSION float lse_plus(const float* x, const float* v, int64_t K, float* tmp) {
  return lse_plus_t(x, v, K, tmp);
}
CO_MULTIVERSION void fold_column(const float* x, float u, float* m, float* s, int64_t K) {
  fold_column_t(x, u, m, s, K);
}
inline double lse_plus(const double* x, const double* v, int64_t K, double* tmp) { return lse_plus_t(x, v, K, tmp); }
inline void fold_column(const double* x, double u, double* m, double* s, int64_t K) { fold_column_t(x, u, m, s, K); }

// ---- scaling form (fp32 accumulation, one process) ----
//
// With c[k] = max_b L[b,k] and E = exp(L − c) (every column of E peaks at exactly 1), the
// log-scalings become factors: w[k] = exp(c[k] + v[k]), a[b] = exp(u[b]), and
//
//     w_1 = 1 / Σ_b E[b,:]          a_t = 1 / (E w_t)          w_{t+1} = 1 / (Eᵀ a_t)
//     codes[b,k] = E[b,k]·w_T[k] / Σ_k' E[b,k']·w_T[k']
//
// (constant factors of w cancel in the last row normalization, so w is rescaled
// to max 1 after each step).  E is written once into the output buffer; each
// further iteration is one pass over it with two multiply-adds per entry (a row
// dot product, then the row added into the next column sums), no exponential.
//
// Range.  Entries of E below fp32's range are flushed to 0.  The flushed terms
// are negligible (relative < 1e-12) when every row of E peaks at ≥ kMinRowPeak
// and every w_t lies within [kMinFactor, 1] after rescaling: then each row sum
// holds a term ≥ kMinRowPeak·kMinFactor and no factor exceeds 1e18.  Otherwise
// (scores whose spread |ΔS|/ε exceeds ~23 between a sample's best prototype
// and that prototype's best sample) the log-domain passes run instead.
constexpr float kMinRowPeak = 1e-10f;
constexpr float kMinFactor = 1e-8f;

// m[k] = max(m[k], x[k]).
CO_MULTIVERSION void colmax_row(const float* x, float* m, int64_t K) {
  for (int64_t k = 0; k < K; ++k) m[k] = x[k] > m[k] ? x[k] : m[k];
}

// e[k] = exp(x[k]·inv_eps − c[k]), col[k] += e[k]; returns max_k e[k].
CO_MULTIVERSION float exp_row(const float* x, const float* c, float inv_eps, float* e, float* col, int64_t K) {
  float lm[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const float y = fastmath::fast_exp(x[k + j] * inv_eps - c[k + j]);
      e[k + j] = y;
      col[k + j] += y;
      lm[j] = y > lm[j] ? y : lm[j];
    }
  float m = 0;
  for (; k < K; ++k) {
    const float y = fastmath::fast_exp(x[k] * inv_eps - c[k]);
    e[k] = y;
    col[k] += y;
    m = y > m ? y : m;
  }
  for (int64_t j = 0; j < kLanes; ++j) m = lm[j] > m ? lm[j] : m;
  return m;
}

// Σ_k e[k]·w[k].
CO_MULTIVERSION float dot_row(const float* e, const float* w, int64_t K) {
  float acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) acc[j] += e[k + j] * w[k + j];
  float s = 0;
  for (; k < K; ++k) s += e[k] * w[k];
  for (int64_t j = 0; j < kLanes; ++j) s += acc[j];
  return s;
}

// col[k] += a·e[k].
CO_MULTIVERSION void axpy_row(float a, const float* e, float* col, int64_t K) {
  for (int64_t k = 0; k < K; ++k) col[k] += a * e[k];
}

// e[k] = e[k]·w[k]·a.
CO_MULTIVERSION void scale_row(float* e, const float* w, float a, int64_t K) {
  for (int64_t k = 0; k < K; ++k) e[k] = e[k] * w[k] * a;
}

// w[k] = 1 / Σ_p part[p,k] (parts summed in order), rescaled to max 1; false if a factor leaves [kMinFactor, 1].
bool column_factors(const std::vector<float>& part, int64_t P, int64_t K, float* w) {
  float mx = 0;
  for (int64_t k = 0; k < K; ++k) {
    float t = 0;
    for (int64_t p = 0; p < P; ++p) t += part[p * K + k];
    w[k] = 1.0f / t;
    if (!(w[k] > 0 && w[k] <= std::numeric_limits<float>::max())) return false;
    mx = std::max(mx, w[k]);
  }
  const float inv = 1.0f / mx;
  bool ok = true;
  for (int64_t k = 0; k < K; ++k) {
    w[k] *= inv;
    ok &= w[k] >= kMinFactor;
  }
  return ok;
}

// The codes of `iterations` ≥ 1 steps in the scaling form, written to out (B, K) fp32;
// false (out then holds garbage) when the range conditions above fail.
template <typename scalar_t>
bool sinkhorn_scaled(const scalar_t* S, int64_t B, int64_t K, float inv_eps, int64_t iterations, float* out) {
  const RowChunks rows(B);
  const int64_t P = rows.P;
  std::vector<float> part(P * K);
  auto row_of = [&](int64_t b, std::vector<float>& buf) -> const float* {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return S + b * K;
    } else {
      load_row<scalar_t, float>(S + b * K, K, 1.0f, buf.data());
      return buf.data();
    }
  };
  // column maxima of S (ε > 0: max_b S/ε = (max_b S)/ε, and the same products as below)
  rows.run([&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : K);
    float* m = part.data() + p * K;
    std::fill(m, m + K, -std::numeric_limits<float>::infinity());
    for (int64_t b = r0; b < r1; ++b) colmax_row(row_of(b, buf), m, K);
  });
  std::vector<float> c(K);
  for (int64_t k = 0; k < K; ++k) {
    float m = part[k];
    for (int64_t p = 1; p < P; ++p) m = std::max(m, part[p * K + k]);
    c[k] = m * inv_eps;
  }
  // E and its column sums
  std::vector<float> peak(P);
  rows.run([&](int64_t p, int64_t r0, int64_t r1) {
    std::vector<float> buf(std::is_same_v<scalar_t, float> ? 0 : K);
    float* col = part.data() + p * K;
    std::fill(col, col + K, 0.0f);
    float low = 1.0f;
    for (int64_t b = r0; b < r1; ++b) low = std::min(low, exp_row(row_of(b, buf), c.data(), inv_eps, out + b * K, col, K));
    peak[p] = low;
  });
  if (*std::min_element(peak.begin(), peak.end()) < kMinRowPeak) return false;
  std::vector<float> w(K);
  if (!column_factors(part, P, K, w.data())) return false;
  // iterations 2..T: a_t = 1/(E w_t), then w_{t+1} = 1/(Eᵀ a_t), one pass each
  for (int64_t t = 1; t < iterations; ++t) {
    rows.run([&](int64_t p, int64_t r0, int64_t r1) {
      float* col = part.data() + p * K;
      std::fill(col, col + K, 0.0f);
      for (int64_t b = r0; b < r1; ++b) {
        const float* e = out + b * K;
        axpy_row(1.0f / dot_row(e, w.data(), K), e, col, K);
      }
    });
    if (!column_factors(part, P, K, w.data())) return false;
  }
  rows.run([&](int64_t p, int64_t r0, int64_t r1) {
    for (int64_t b = r0; b < r1; ++b) {
      float* e = out + b * K;
      scale_row(e, w.data(), 1.0f / dot_row(e, w.data(), K), K);
    }
  });
  return true;
}

// Which path the last CPU `sinkhorn` call took: 1 scaling form, 0 log domain, -1 before any call.
std::atomic<int64_t> g_last_path{-1};

}  // namespace

// (K,) in fp32 (float64 for float64 scores): LSE_b(L[b,k] + u[b]), u[b] = −LSE_k(L[b,k] + v[k]), u = 0 without v.
at::Tensor sinkhorn_col_lse(const at::Tensor& scores_in, double epsilon, const c10::optional<at::Tensor>& v_in) {
  check_sinkhorn_scores(scores_in, epsilon, "sinkhorn_col_lse");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  const auto acc = acc_dtype(scores.scalar_type());
  const at::Tensor v = sinkhorn_potentials(v_in, scores, K, acc, "sinkhorn_col_lse");
  const RowChunks chunks(B);
  const int64_t n_chunks = chunks.P;
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
    chunks.run([&](int64_t c, int64_t r0, int64_t r1) {
      std::vector<acc_t> xbuf(K), tmp(K);
      acc_t* m = PM + c * K;
      acc_t* s = PS + c * K;
      for (int64_t b = r0; b < r1; ++b) {
        load_row<scalar_t, acc_t>(S + b * K, K, inv_eps, xbuf.data());
        const acc_t u = vp ? -lse_plus(xbuf.data(), vp, K, tmp.data()) : acc_t(0);  // sample step
        if (b == r0) {                                                                        // prototype step
          for (int64_t k = 0; k < K; ++k) {
            m[k] = xbuf[k] + u;
            s[k] = acc_t(1);
          }
        } else {
          fold_column(xbuf.data(), u, m, s, K);
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
  check_sinkhorn_scores(scores_in, epsilon, "sinkhorn_codes");
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  TORCH_CHECK(v_in.dim() == 1 && v_in.size(0) == K, "sinkhorn_codes: v must have shape (", K, ",), got ",
              v_in.sizes());
  const auto acc = acc_dtype(scores.scalar_type());
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
      std::vector<acc_t> xbuf(K), tmp(K);
      for (int64_t b = b0; b < b1; ++b) {
        load_row<scalar_t, acc_t>(S + b * K, K, inv_eps, xbuf.data());
        const acc_t lse = normalize ? lse_plus(xbuf.data(), vp, K, tmp.data()) : acc_t(0);
        float* o = O + b * K;
        for (int64_t k = 0; k < K; ++k) o[k] = static_cast<float>(vexp(xbuf[k] + vp[k] - lse));
      }
    });
  });
  return out;
}

// The whole loop: the scaling form where it applies, else the log-domain passes.
at::Tensor sinkhorn(const at::Tensor& scores, double epsilon, int64_t iterations) {
  check_sinkhorn_scores(scores, epsilon, "sinkhorn");
  TORCH_CHECK(iterations >= 0, "sinkhorn: iterations must be >= 0, got ", iterations);
  const int64_t B = scores.size(0), K = scores.size(1);
  if (iterations > 0) {
    bool ok = false;
    at::Tensor out;
    if (scores.scalar_type() != at::kDouble) {
      const at::Tensor sc = scores.contiguous();
      out = at::empty({B, K}, sc.options().dtype(at::kFloat));
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "sinkhorn", [&] {
        ok = sinkhorn_scaled<scalar_t>(sc.data_ptr<scalar_t>(), B, K, float(1.0 / epsilon), iterations,
                                       out.data_ptr<float>());
      });
    }
    g_last_path = ok ? 1 : 0;
    if (ok) return out;
  }
  return sinkhorn_log_domain(
      B, K, iterations, [&](const c10::optional<at::Tensor>& v) { return sinkhorn_col_lse(scores, epsilon, v); },
      [&](const at::Tensor& v, bool normalize) { return sinkhorn_codes(scores, epsilon, v, normalize); });
}

}  // namespace sinkhorn_cpu
}  // namespace contrastive_ops

// Test hook (schema in csrc/ops.cpp): the path of the last CPU sinkhorn call.
TORCH_LIBRARY_FRAGMENT(contrastive_ops, m) {
  m.impl("_cpu_sinkhorn_last_path", []() -> int64_t { return contrastive_ops::sinkhorn_cpu::g_last_path.load(); });
}

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("sinkhorn", &contrastive_ops::sinkhorn_cpu::sinkhorn);
  m.impl("sinkhorn_col_lse", &contrastive_ops::sinkhorn_cpu::sinkhorn_col_lse);
  m.impl("sinkhorn_codes", &contrastive_ops::sinkhorn_cpu::sinkhorn_codes);
}
