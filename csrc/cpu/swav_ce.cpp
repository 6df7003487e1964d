// The swapped-prediction cross-entropy of SwAV with soft targets, fused: CPU kernels.
//
// For predictions x (B, K) (any float dtype), targets t (B, K) and scale s = 1/τ
// (t and s in the accumulation type: fp32, float64 for float64 x):
//
//     swav_ce_fwd:  loss = Σ_b [T_b·lse_b − s·Σ_k t_bk·x_bk],   T_b = Σ_k t_bk,
//                   lse_b = LSE_k(s·x_bk)                        -> (loss 0-dim, lse (B,))
//     swav_ce_bwd:  dx_bk = g·s·(T_b·exp(s·x_bk − lse_b) − t_bk)
//                   ds    = g·Σ_b [T_b·Σ_k p_bk·x_bk − Σ_k t_bk·x_bk],  p_bk = exp(s·x_bk − lse_b)
//
// which is Σ_b of F.cross_entropy(s·x, t, reduction="none") (soft targets).
// One pass per row and direction, the row in L1: the forward reads x and t
// once (no log_softmax buffer), the backward reads them once more and writes
// dx.  Rows are split into one chunk per thread (row_chunks.h); the 0-dim sums
// are reduced in chunk order (bitwise reproducible for a fixed thread count).  lse is a
// by-product saved for the backward and carries no gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../swav_ce.h"
#include "fastmath.h"
#include "row_chunks.h"

namespace contrastive_ops {
namespace swav_ce_cpu {
namespace {

constexpr int64_t kLanes = 16;  // independent accumulators: vectorized reductions without reassociation

// max_k s·x[k]; also Σ t[k] and Σ t[k]·x[k].
template <typename T>
CO_INLINE T row_stats_t(const T* x, const T* t, int64_t K, T s, T* tsum, T* txsum) {
  T m[kLanes], a[kLanes] = {}, b[kLanes] = {};
  for (int64_t j = 0; j < kLanes; ++j) m[j] = -std::numeric_limits<T>::infinity();
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const T y = s * x[k + j];
      m[j] = y > m[j] ? y : m[j];
      a[j] += t[k + j];
      b[j] += t[k + j] * x[k + j];
    }
  T mx = -std::numeric_limits<T>::infinity(), ta = 0, tb = 0;
  for (; k < K; ++k) {
    const T y = s * x[k];
    mx = y > mx ? y : mx;
    ta += t[k];
    tb += t[k] * x[k];
  }
  for (int64_t j = 0; j < kLanes; ++j) {
    mx = m[j] > mx ? m[j] : mx;
    ta += a[j];
    tb += b[j];
  }
  *tsum = ta;
  *txsum = tb;
  return mx;
}

// Σ_k exp(s·x[k] − m).
template <typename T>
CO_INLINE T sum_exp_t(const T* x, int64_t K, T s, T m) {
  T a[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) a[j] += fastmath::fast_exp(s * x[k + j] - m);
  T r = 0;
  for (; k < K; ++k) r += fastmath::fast_exp(s * x[k] - m);
  for (int64_t j = 0; j < kLanes; ++j) r += a[j];
  return r;
}

// dx[k] = c·(T·p[k] − t[k]), p[k] = exp(s·x[k] − lse); returns Σ p[k]·x[k].
template <typename T>
CO_INLINE T grad_row_t(const T* x, const T* t, T* dx, int64_t K, T s, T lse, T Tb, T c) {
  T a[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int64_t j = 0; j < kLanes; ++j) {
      const T p = fastmath::fast_exp(s * x[k + j] - lse);
      dx[k + j] = c * (Tb * p - t[k + j]);
      a[j] += p * x[k + j];
    }
  T r = 0;
  for (; k < K; ++k) {
    const T p = fastmath::fast_exp(s * x[k] - lse);
    dx[k] = c * (Tb * p - t[k]);
    r += p * x[k];
  }
  for (int64_t j = 0; j < kLanes; ++j) r += a[j];
  return r;
}

// float: one clone per ISA (fastmath.h); double: the templates.
CO_MULTIVERSION float row_stats(const float* x, const float* t, int64_t K, float s, float* ts, float* txs) {
  return row_stats_t(x, t, K, s, ts, txs);
}
CO_MULTIVERSION float sum_exp(const float* x, int64_t K, float s, float m) { return sum_exp_t(x, K, s, m); }
CO_MULTIVERSION float grad_row(const float* x, const float* t, float* dx, int64_t K, float s, float lse, float Tb,
                               float c) {
  return grad_row_t(x, t, dx, K, s, lse, Tb, c);
}
inline double row_stats(const double* x, const double* t, int64_t K, double s, double* ts, double* txs) {
  return row_stats_t(x, t, K, s, ts, txs);
}
inline double sum_exp(const double* x, int64_t K, double s, double m) { return sum_exp_t(x, K, s, m); }
inline double grad_row(const double* x, const double* t, double* dx, int64_t K, double s, double lse, double Tb,
                       double c) {
  return grad_row_t(x, t, dx, K, s, lse, Tb, c);
}

// x rows in the accumulation type: the tensor itself, or an upcast copy for fp16/bf16.
at::Tensor acc_rows(const at::Tensor& x) { return x.contiguous().to(acc_dtype(x.scalar_type())); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> swav_ce_fwd(const at::Tensor& x_in, const at::Tensor& t_in,
                                               const at::Tensor& scale) {
  check_swav_ce_args(x_in, t_in, scale, "swav_ce_fwd");
  const at::Tensor x = acc_rows(x_in), t = t_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor lse = at::empty({B}, t.options());
  at::Tensor loss = at::empty({}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "swav_ce_fwd", [&] {
    using T = scalar_t;
    const T s = scale.item<T>();
    const T* X = x.data_ptr<T>();
    const T* Tt = t.data_ptr<T>();
    T* L = lse.data_ptr<T>();
    loss.fill_(RowChunks(B).sum([&](int64_t r0, int64_t r1) {
      double acc = 0;
      for (int64_t b = r0; b < r1; ++b) {
        T ts, txs;
        const T m = row_stats(X + b * K, Tt + b * K, K, s, &ts, &txs);
        const T l = std::isfinite(m) ? m + std::log(sum_exp(X + b * K, K, s, m)) : m;
        L[b] = l;
        acc += double(ts * l - s * txs);
      }
      return acc;
    }));
  });
  return {loss, lse};
}

std::tuple<at::Tensor, at::Tensor> swav_ce_bwd(const at::Tensor& x_in, const at::Tensor& t_in,
                                               const at::Tensor& scale, const at::Tensor& lse_in,
                                               const at::Tensor& grad) {
  check_swav_ce_bwd_args(x_in, t_in, scale, lse_in, grad);
  const at::Tensor x = acc_rows(x_in), t = t_in.contiguous();
  const at::Tensor lse = lse_in.to(t.scalar_type()).contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor dx = at::empty({B, K}, t.options());
  at::Tensor dscale = at::empty({}, t.options());
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "swav_ce_bwd", [&] {
    using T = scalar_t;
    const T s = scale.item<T>(), g = grad.to(t.scalar_type()).item<T>();
    const T* X = x.data_ptr<T>();
    const T* Tt = t.data_ptr<T>();
    const T* L = lse.data_ptr<T>();
    T* DX = dx.data_ptr<T>();
    const double total = RowChunks(B).sum([&](int64_t r0, int64_t r1) {
      double acc = 0;
      for (int64_t b = r0; b < r1; ++b) {
        T ts, txs;
        row_stats(X + b * K, Tt + b * K, K, s, &ts, &txs);
        const T px = grad_row(X + b * K, Tt + b * K, DX + b * K, K, s, L[b], ts, g * s);
        acc += double(ts * px - txs);
      }
      return acc;
    });
    dscale.fill_(double(g) * total);
  });
  return {dx.to(x_in.scalar_type()), dscale};
}

}  // namespace swav_ce_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("swav_ce_fwd", &contrastive_ops::swav_ce_cpu::swav_ce_fwd);
  m.impl("swav_ce_bwd", &contrastive_ops::swav_ce_cpu::swav_ce_bwd);
}
