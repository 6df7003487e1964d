// PixPro's masked pixel sum (primitive "pix_pos_sum"): CPU kernel.
//
// For x (B, P, D), P = H·W (any float dtype), the per-axis tables of squared
// bin-centre distances dxt (B, W, W), dyt (B, H, H), the larger bin diagonal
// diag (B,) and the 0-dim ratio, all four in one float dtype (fp32 or float64):
//
//     pos_ij   = sqrt(dxt[b, a_i, a_j] + dyt[b, r_i, r_j]) / diag[b] < ratio     (p = r·W + a)
//     Z[b, i]  = Σ_j pos_ij · x[b, j]            (B, P, D)  fp32 (float64 for float64 x)
//     cnt[b,i] = Σ_j pos_ij                      (B, P)     same dtype
//
// The predicate is evaluated in the tables' dtype with IEEE square root and
// division (the extension is built with -ffp-contract=off, without
// -ffast-math), so it equals the dense mask of the reference bit for bit.  No
// (P, P) mask is stored: each row's predicate is evaluated on the fly and only
// the positive columns are accumulated, so the work is P² predicate
// evaluations plus (number of positive pairs)·D multiply-adds per image,
// against P²·D for the dense product.  (b, i) rows are split over threads;
// each output row is written by one thread, in a fixed order (deterministic).
// The backward of Z is this kernel on the upstream gradient with the
// transposed tables (primitives/pix_pos.py).
//
// PixContrast's two LSEs (primitive "pix_pos_lse"): anchors q (B, P, D),
// candidates k (Bk, P, D), anchor image b is candidate image b + offset:
//
//     lse_pos[b,i] = LSE_{j : pos_ij} s·q[b,i]·k[b+offset,j]          (−inf if none)
//     lse_all[b,i] = LSE_{(c,j) allowed} s·q[b,i]·k[c,j]                (c = b+offset, or every c)
//
// and the backward dq, dscale with W = g_pos·exp(S − lse_pos)·pos + g_all·exp(S − lse_all).
// One anchor row per step, its dot products in the accumulation type, an
// online LSE per set; O(P + D) memory per thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../acc_dtype.h"

namespace contrastive_ops {
namespace pix_pos_cpu {
namespace {

template <typename T, typename G, typename A>
void run(const T* x, const G* dxt, const G* dyt, const G* diag, G ratio, A* z, A* cnt, int64_t B, int64_t P,
         int64_t D, int64_t H, int64_t W) {
  at::parallel_for(0, B * P, 16, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / P, i = row % P;
      const int64_t ri = i / W, ai = i % W;
      const G* dx = dxt + (b * W + ai) * W;  // dxt[b, a_i, :]
      const G* dy = dyt + (b * H + ri) * H;  // dyt[b, r_i, :]
      const G dg = diag[b];
      const T* xb = x + b * P * D;
      std::fill(acc.begin(), acc.end(), A(0));
      int64_t n = 0;
      for (int64_t j = 0; j < P; ++j) {
        const G d2 = dx[j % W] + dy[j / W];
        if (std::sqrt(d2) / dg < ratio) {
          ++n;
          const T* xj = xb + j * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<A>(xj[d]);
        }
      }
      A* zr = z + row * D;
      for (int64_t d = 0; d < D; ++d) zr[d] = acc[d];
      cnt[row] = static_cast<A>(n);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> pix_pos_sum(const at::Tensor& x_, const at::Tensor& dxt_, const at::Tensor& dyt_,
                                               const at::Tensor& diag_, const at::Tensor& ratio, int64_t H,
                                               int64_t W) {
  TORCH_CHECK(x_.dim() == 3 && x_.size(1) == H * W, "pix_pos_sum: x must be (B, H·W, D), got ", x_.sizes(),
              " with H=", H, ", W=", W);
  const int64_t B = x_.size(0), P = x_.size(1), D = x_.size(2);
  TORCH_CHECK(dxt_.sizes() == at::IntArrayRef({B, W, W}) && dyt_.sizes() == at::IntArrayRef({B, H, H}) &&
                  diag_.sizes() == at::IntArrayRef({B}) && ratio.numel() == 1,
              "pix_pos_sum: tables must be dxt (B, W, W), dyt (B, H, H), diag (B,), ratio 0-dim; got ",
              dxt_.sizes(), ", ", dyt_.sizes(), ", ", diag_.sizes(), ", ", ratio.sizes());
  const auto g = dxt_.scalar_type();
  TORCH_CHECK((g == at::kFloat || g == at::kDouble) && dyt_.scalar_type() == g && diag_.scalar_type() == g &&
                  ratio.scalar_type() == g,
              "pix_pos_sum: the tables must share one dtype, float32 or float64");
  const at::Tensor x = x_.contiguous(), dxt = dxt_.contiguous(), dyt = dyt_.contiguous(), diag = diag_.contiguous();
  const auto acc = acc_dtype(x.scalar_type());
  at::Tensor z = at::empty({B, P, D}, x.options().dtype(acc));
  at::Tensor cnt = at::empty({B, P}, x.options().dtype(acc));
  if (B * P == 0) return {z, cnt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pix_pos_sum", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(g, "pix_pos_sum_geometry", [&] {
      using G = scalar_t;
      const G r = ratio.item<G>();
      if (acc == at::kDouble) {
        run<T, G, double>(x.data_ptr<T>(), dxt.data_ptr<G>(), dyt.data_ptr<G>(), diag.data_ptr<G>(), r,
                          z.data_ptr<double>(), cnt.data_ptr<double>(), B, P, D, H, W);
      } else {
        run<T, G, float>(x.data_ptr<T>(), dxt.data_ptr<G>(), dyt.data_ptr<G>(), diag.data_ptr<G>(), r,
                         z.data_ptr<float>(), cnt.data_ptr<float>(), B, P, D, H, W);
      }
    });
  });
  return {z, cnt};
}

template <typename T, typename A>
A dot_row(const T* a, const T* b, int64_t D) {
  A acc = 0;
  for (int64_t d = 0; d < D; ++d) acc += static_cast<A>(a[d]) * static_cast<A>(b[d]);
  return acc;
}

template <typename G>
bool is_pos(const G* dx, const G* dy, G dg, G ratio, int64_t j, int64_t W) {
  return std::sqrt(dx[j % W] + dy[j / W]) / dg < ratio;
}

// Folds value v into the running (max m, sum s) of an online LSE.
template <typename A>
void lse_add(A& m, A& s, A v) {
  if (v <= m) {
    s += std::exp(v - m);
  } else {
    s = s * std::exp(m - v) + A(1);
    m = v;
  }
}

template <typename T, typename G, typename A>
void lse_fwd(const T* q, const T* k, A scale, const G* dxt, const G* dyt, const G* diag, G ratio, A* lp, A* la,
             int64_t B, int64_t Bk, int64_t offset, int64_t P, int64_t D, int64_t H, int64_t W, bool batch) {
  const A ninf = -std::numeric_limits<A>::infinity();
  at::parallel_for(0, B * P, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / P, i = row % P, own = b + offset;
      const G* dx = dxt + (b * W + i % W) * W;
      const G* dy = dyt + (b * H + i / W) * H;
      const T* qi = q + row * D;
      A mp = ninf, sp = 0, ma = ninf, sa = 0;
      const int64_t c0 = batch ? 0 : own, c1 = batch ? Bk : own + 1;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t j = 0; j < P; ++j) {
          const A v = scale * dot_row<T, A>(qi, k + (c * P + j) * D, D);
          lse_add(ma, sa, v);
          if (c == own && is_pos(dx, dy, diag[b], ratio, j, W)) lse_add(mp, sp, v);
        }
      }
      lp[row] = mp == ninf ? ninf : mp + std::log(sp);
      la[row] = ma == ninf ? ninf : ma + std::log(sa);
    }
  });
}

template <typename T, typename G, typename A>
void lse_bwd_t(const T* q, const T* k, A scale, const G* dxt, const G* dyt, const G* diag, G ratio, const A* lp,
               const A* la, const A* gp, const A* ga, T* dq, A* part, int64_t B, int64_t Bk, int64_t offset,
               int64_t P, int64_t D, int64_t H, int64_t W, bool batch) {
  const A ninf = -std::numeric_limits<A>::infinity();
  at::parallel_for(0, B * P, 4, [&](int64_t begin, int64_t end) {
    std::vector<A> acc(D);
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / P, i = row % P, own = b + offset;
      const G* dx = dxt + (b * W + i % W) * W;
      const G* dy = dyt + (b * H + i / W) * H;
      const T* qi = q + row * D;
      // rows without positive (or candidate) take no term of that set
      const A gpr = lp[row] == ninf ? A(0) : gp[row];
      const A gar = la[row] == ninf ? A(0) : ga[row];
      const A lpr = lp[row] == ninf ? A(0) : lp[row];
      const A lar = la[row] == ninf ? A(0) : la[row];
      std::fill(acc.begin(), acc.end(), A(0));
      A ds = 0;
      const int64_t c0 = batch ? 0 : own, c1 = batch ? Bk : own + 1;
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t j = 0; j < P; ++j) {
          const T* kj = k + (c * P + j) * D;
          const A dot = dot_row<T, A>(qi, kj, D);
          const A v = scale * dot;
          A w = gar == A(0) ? A(0) : gar * std::exp(v - lar);
          if (gpr != A(0) && c == own && is_pos(dx, dy, diag[b], ratio, j, W)) w += gpr * std::exp(v - lpr);
          if (w == A(0)) continue;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<A>(kj[d]);
          ds += w * dot;
        }
      }
      T* dqr = dq + row * D;
      for (int64_t d = 0; d < D; ++d) dqr[d] = static_cast<T>(acc[d] * scale);
      part[row] = ds;
    }
  });
}

void check_lse_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& dxt, const at::Tensor& dyt,
                    const at::Tensor& diag, const at::Tensor& ratio, int64_t H, int64_t W, int64_t offset) {
  TORCH_CHECK(q.dim() == 3 && q.size(1) == H * W && k.dim() == 3 && k.size(1) == q.size(1) &&
                  k.size(2) == q.size(2) && k.scalar_type() == q.scalar_type(),
              "pix_pos_lse: q must be (B, H·W, D) and k (B_k, H·W, D) of its dtype, got ", q.sizes(), " and ",
              k.sizes());
  const int64_t B = q.size(0);
  TORCH_CHECK(offset >= 0 && offset + B <= k.size(0), "pix_pos_lse: offset ", offset, " out of range for ", B,
              " anchor images and ", k.size(0), " candidate images");
  TORCH_CHECK(dxt.sizes() == at::IntArrayRef({B, W, W}) && dyt.sizes() == at::IntArrayRef({B, H, H}) &&
                  diag.sizes() == at::IntArrayRef({B}) && ratio.numel() == 1,
              "pix_pos_lse: tables must be dxt (B, W, W), dyt (B, H, H), diag (B,), ratio 0-dim");
  const auto g = dxt.scalar_type();
  TORCH_CHECK((g == at::kFloat || g == at::kDouble) && dyt.scalar_type() == g && diag.scalar_type() == g &&
                  ratio.scalar_type() == g,
              "pix_pos_lse: the tables must share one dtype, float32 or float64");
}

std::tuple<at::Tensor, at::Tensor> pix_pos_lse_fwd(const at::Tensor& q_, const at::Tensor& k_,
                                                   const at::Tensor& scale, const at::Tensor& dxt_,
                                                   const at::Tensor& dyt_, const at::Tensor& diag_,
                                                   const at::Tensor& ratio, int64_t H, int64_t W,
                                                   bool batch_negatives, int64_t offset) {
  check_lse_args(q_, k_, dxt_, dyt_, diag_, ratio, H, W, offset);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), dxt = dxt_.contiguous(), dyt = dyt_.contiguous(),
                   diag = diag_.contiguous();
  const int64_t B = q.size(0), P = q.size(1), D = q.size(2), Bk = k.size(0);
  const auto acc = acc_dtype(q.scalar_type());
  at::Tensor lp = at::empty({B, P}, q.options().dtype(acc));
  at::Tensor la = at::empty({B, P}, q.options().dtype(acc));
  if (B * P == 0) return {lp, la};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pix_pos_lse_fwd", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dxt.scalar_type(), "pix_pos_lse_geometry", [&] {
      using G = scalar_t;
      const G r = ratio.item<G>();
      if (acc == at::kDouble) {
        lse_fwd<T, G, double>(q.data_ptr<T>(), k.data_ptr<T>(), scale.item<double>(), dxt.data_ptr<G>(),
                              dyt.data_ptr<G>(), diag.data_ptr<G>(), r, lp.data_ptr<double>(), la.data_ptr<double>(),
                              B, Bk, offset, P, D, H, W, batch_negatives);
      } else {
        lse_fwd<T, G, float>(q.data_ptr<T>(), k.data_ptr<T>(), scale.item<float>(), dxt.data_ptr<G>(),
                             dyt.data_ptr<G>(), diag.data_ptr<G>(), r, lp.data_ptr<float>(), la.data_ptr<float>(), B,
                             Bk, offset, P, D, H, W, batch_negatives);
      }
    });
  });
  return {lp, la};
}

std::tuple<at::Tensor, at::Tensor> pix_pos_lse_bwd(const at::Tensor& q_, const at::Tensor& k_,
                                                   const at::Tensor& scale, const at::Tensor& dxt_,
                                                   const at::Tensor& dyt_, const at::Tensor& diag_,
                                                   const at::Tensor& ratio, int64_t H, int64_t W,
                                                   bool batch_negatives, int64_t offset, const at::Tensor& lse_pos,
                                                   const at::Tensor& lse_all, const at::Tensor& g_pos,
                                                   const at::Tensor& g_all) {
  check_lse_args(q_, k_, dxt_, dyt_, diag_, ratio, H, W, offset);
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), dxt = dxt_.contiguous(), dyt = dyt_.contiguous(),
                   diag = diag_.contiguous();
  const int64_t B = q.size(0), P = q.size(1), D = q.size(2), Bk = k.size(0);
  const auto acc = acc_dtype(q.scalar_type());
  // The LSEs and upstream gradients are read in the accumulation type.
  at::Tensor dq = at::empty_like(q);
  at::Tensor part = at::empty({B, P}, q.options().dtype(acc));
  if (B * P == 0) return {dq, part.sum()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "pix_pos_lse_bwd", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dxt.scalar_type(), "pix_pos_lse_geometry", [&] {
      using G = scalar_t;
      const G r = ratio.item<G>();
      if (acc == at::kDouble) {
        const at::Tensor lp = lse_pos.to(at::kDouble).contiguous(), la = lse_all.to(at::kDouble).contiguous();
        const at::Tensor gp = g_pos.to(at::kDouble).contiguous(), ga = g_all.to(at::kDouble).contiguous();
        lse_bwd_t<T, G, double>(q.data_ptr<T>(), k.data_ptr<T>(), scale.item<double>(), dxt.data_ptr<G>(),
                                dyt.data_ptr<G>(), diag.data_ptr<G>(), r, lp.data_ptr<double>(), la.data_ptr<double>(),
                                gp.data_ptr<double>(), ga.data_ptr<double>(), dq.data_ptr<T>(),
                                part.data_ptr<double>(), B, Bk, offset, P, D, H, W, batch_negatives);
      } else {
        const at::Tensor lp = lse_pos.to(at::kFloat).contiguous(), la = lse_all.to(at::kFloat).contiguous();
        const at::Tensor gp = g_pos.to(at::kFloat).contiguous(), ga = g_all.to(at::kFloat).contiguous();
        lse_bwd_t<T, G, float>(q.data_ptr<T>(), k.data_ptr<T>(), scale.item<float>(), dxt.data_ptr<G>(),
                               dyt.data_ptr<G>(), diag.data_ptr<G>(), r, lp.data_ptr<float>(), la.data_ptr<float>(),
                               gp.data_ptr<float>(), ga.data_ptr<float>(), dq.data_ptr<T>(), part.data_ptr<float>(), B,
                               Bk, offset, P, D, H, W, batch_negatives);
      }
    });
  });
  return {dq, part.sum()};
}

}  // namespace
}  // namespace pix_pos_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("pix_pos_sum", &contrastive_ops::pix_pos_cpu::pix_pos_sum);
  m.impl("pix_pos_lse_fwd", &contrastive_ops::pix_pos_cpu::pix_pos_lse_fwd);
  m.impl("pix_pos_lse_bwd", &contrastive_ops::pix_pos_cpu::pix_pos_lse_bwd);
}
