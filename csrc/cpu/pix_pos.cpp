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
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
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

}  // namespace
}  // namespace pix_pos_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("pix_pos_sum", &contrastive_ops::pix_pos_cpu::pix_pos_sum);
}
