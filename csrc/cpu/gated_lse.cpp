// Row LSE of per-pair gated, normalized similarities (primitive "gated_lse", Hydra's filter gating):
// CPU kernels.
//
// For a, w (B, D), k (M, D), scale s (0-dim) and column ranges [col_start_i, col_end_i) (int32):
//
//     G = a kᵀ, N = w (k⊙k)ᵀ, r = max(N, eps²)^(-1/2), S = s·G·r           (eps² = 1e-24)
//     gated_lse_fwd: lse[i] = LSE_{start_i ≤ j < end_i} S[i, j]               (−inf for an empty range)
//     gated_lse_bwd: P = e^{S − lse} on the range, dS = γ·P, dG = dS·s·r, dN = −½·dS·S/N (0 where clamped)
//                    da = dG k, dw = dN (k⊙k), dk = dGᵀ a + 2 k ⊙ (dNᵀ w), ds = Σ dS·G·r
//
// (maths and the backend contract in contrastive_ops/primitives/gated_lse.py).  a and w are fp32, k
// fp32/fp16/bf16 (upcast once to an fp32 copy, with k⊙k beside it: O(M·D)); or all three float64,
// computed in float64.
//
// Tiles of kRows rows × kCols columns: each tile's G and N are two single-threaded BLAS GEMMs
// (blas.h), the epilogue a loop over the part of each row's range inside the tile (fastmath.h exp).
// No B×M buffer: O(kRows·kCols + kCols·D) per thread.
// * forward: row blocks in parallel, each streaming the column tiles of the union of its rows'
//   ranges (the caller orders rows by range) with an online max and sum per row;
// * backward, rows: the same tiles recomputed, dG and dN formed in place, da += dG·k and
//   dw += dN·(k⊙k) per block, and each row's part of ds;
// * backward, columns: column blocks in parallel, each streaming the row blocks whose range union
//   meets it, dk += dGᵀ·a and dkw += dNᵀ·w, then dk = dk + 2·k⊙dkw.
// Every output element is written by one task, its sums in a fixed order (columns, resp. row blocks,
// in increasing order) and ds is the per-row parts summed in row order: bitwise reproducible, for any
// thread count (the tiles do not depend on it).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "../acc_dtype.h"
#include "blas.h"
#include "fastmath.h"

namespace contrastive_ops {
namespace gated_lse_cpu {
namespace {

using fastmath::fast_exp;

constexpr int64_t kRows = 64;   // rows per block
constexpr int64_t kCols = 128;  // columns per tile
constexpr double kEps2 = 1e-24;  // the losses' eps 1e-12 (F.normalize), squared

// r = max(n, eps²)^(-1/2) and S = s·g·r of one tile row, S written over g; returns the row's max.
template <typename T>
CO_INLINE T logits_row_t(T* g, const T* n, int64_t len, T s) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < len; ++j) {
    const T z = s * g[j] * (T(1) / std::sqrt(std::max(n[j], T(kEps2))));
    g[j] = z;
    m = z > m ? z : m;
  }
  return m;
}

// Σ_j e^{z_j − m}.
template <typename T>
CO_INLINE T sum_exp_t(const T* z, int64_t len, T m) {
  T acc = 0;
  for (int64_t j = 0; j < len; ++j) acc += fast_exp(z[j] - m);
  return acc;
}

// One tile row of the backward on the row's range: g and n (the row's G and N) are overwritten with
// dG and dN; returns Σ_j dS·G·r.
template <typename T>
CO_INLINE T grad_row_t(T* g, T* n, int64_t len, T s, T lse, T gl) {
  T part = 0;
  for (int64_t j = 0; j < len; ++j) {
    const T nj = n[j];
    const T r = T(1) / std::sqrt(std::max(nj, T(kEps2)));
    const T gr = g[j] * r;
    const T z = s * gr;
    const T ds = gl * fast_exp(z - lse);
    g[j] = ds * s * r;
    n[j] = nj > T(kEps2) ? T(-0.5) * ds * z / nj : T(0);
    part += ds * gr;
  }
  return part;
}

CO_MULTIVERSION float logits_row(float* g, const float* n, int64_t len, float s) {
  return logits_row_t(g, n, len, s);
}
CO_MULTIVERSION float sum_exp(const float* z, int64_t len, float m) { return sum_exp_t(z, len, m); }
CO_MULTIVERSION float grad_row(float* g, float* n, int64_t len, float s, float lse, float gl) {
  return grad_row_t(g, n, len, s, lse, gl);
}
double logits_row(double* g, const double* n, int64_t len, double s) { return logits_row_t(g, n, len, s); }
double sum_exp(const double* z, int64_t len, double m) { return sum_exp_t(z, len, m); }
double grad_row(double* g, double* n, int64_t len, double s, double lse, double gl) {
  return grad_row_t(g, n, len, s, lse, gl);
}

// A per-task tile buffer, 64-byte aligned like every tensor (the GEMMs see the same alignment on every
// run: MKL's result may depend on it).
template <typename T>
struct Buffer {
  at::Tensor t;
  explicit Buffer(int64_t n) : t(at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value))) {}
  T* data() { return t.data_ptr<T>(); }
};

// The operands in the accumulation type: a, w, k, k⊙k (contiguous) and the column ranges.
template <typename T>
struct Operands {
  at::Tensor a_t, w_t, k_t, kk_t;
  const T *a, *w, *k, *kk;
  const int32_t *cs, *ce;
  int64_t B, M, D;
  T s;
  std::vector<int32_t> lo, hi;  // per row block: the union [lo, hi) of its non-empty ranges (lo = hi: none)

  Operands(const at::Tensor& a_in, const at::Tensor& w_in, const at::Tensor& k_in, const at::Tensor& scale,
           const at::Tensor& cs_t, const at::Tensor& ce_t) {
    const auto acc = c10::CppTypeToScalarType<T>::value;
    a_t = a_in.contiguous();
    w_t = w_in.contiguous();
    k_t = k_in.to(acc).contiguous();
    kk_t = k_t * k_t;
    a = a_t.data_ptr<T>();
    w = w_t.data_ptr<T>();
    k = k_t.data_ptr<T>();
    kk = kk_t.data_ptr<T>();
    cs = cs_t.data_ptr<int32_t>();
    ce = ce_t.data_ptr<int32_t>();
    B = a_t.size(0);
    M = k_t.size(0);
    D = a_t.size(1);
    s = static_cast<T>(scale.to(at::kDouble).item<double>());
    const int64_t blocks = (B + kRows - 1) / kRows;
    lo.assign(blocks, 0);
    hi.assign(blocks, 0);
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t l = std::numeric_limits<int32_t>::max(), h = 0;
      for (int64_t i = b * kRows; i < std::min(B, (b + 1) * kRows); ++i) {
        if (cs[i] < ce[i]) {
          l = std::min(l, cs[i]);
          h = std::max(h, ce[i]);
        }
      }
      if (h > 0) {
        lo[b] = l;
        hi[b] = h;
      }
    }
  }

  // G and N (nr × nc, ld nc) of rows [r0, r0 + nr) against columns [c0, c0 + nc).
  void tile(T* G, T* N, int64_t r0, int64_t nr, int64_t c0, int64_t nc) const {
    blas::nt(G, a + r0 * D, k + c0 * D, nr, nc, D);
    blas::nt(N, w + r0 * D, kk + c0 * D, nr, nc, D);
  }

  // dG and dN over a tile (G, N overwritten; zero outside each row's range); adds each row's Σ dS·G·r
  // to part[row − r0] when part is given.
  void grad_tile(T* G, T* N, int64_t r0, int64_t nr, int64_t c0, int64_t nc, const T* lse, const T* gl,
                 T* part) const {
    for (int64_t i = 0; i < nr; ++i) {
      const int64_t row = r0 + i;
      T* g = G + i * nc;
      T* n = N + i * nc;
      const int64_t j0 = std::max<int64_t>(c0, cs[row]) - c0, j1 = std::min<int64_t>(c0 + nc, ce[row]) - c0;
      const bool has = j1 > j0 && lse[row] > -std::numeric_limits<T>::infinity();
      if (!has) {
        std::fill(g, g + nc, T(0));
        std::fill(n, n + nc, T(0));
        continue;
      }
      std::fill(g, g + j0, T(0));
      std::fill(n, n + j0, T(0));
      std::fill(g + j1, g + nc, T(0));
      std::fill(n + j1, n + nc, T(0));
      const T p = grad_row(g + j0, n + j0, j1 - j0, s, lse[row], gl[row]);
      if (part != nullptr) part[i] += p;
    }
  }
};

void check_args(const at::Tensor& a, const at::Tensor& w, const at::Tensor& k, const at::Tensor& scale,
                const at::Tensor& cs, const at::Tensor& ce, const char* op) {
  TORCH_CHECK(a.dim() == 2 && w.sizes() == a.sizes() && k.dim() == 2 && k.size(1) == a.size(1), op,
              ": a and w must be (B, D) and k (M, D), got ", a.sizes(), ", ", w.sizes(), " and ", k.sizes());
  const bool f64 = a.scalar_type() == at::kDouble;
  TORCH_CHECK((a.scalar_type() == at::kFloat || f64) && w.scalar_type() == a.scalar_type(), op,
              ": a and w must be float32 (or both float64), got ", a.scalar_type(), " and ", w.scalar_type());
  const auto kt = k.scalar_type();
  TORCH_CHECK(f64 ? kt == at::kDouble : (kt == at::kFloat || kt == at::kHalf || kt == at::kBFloat16), op,
              ": k must be float32, float16 or bfloat16 (float64 with float64 a), got ", kt);
  TORCH_CHECK(scale.numel() == 1, op, ": scale must be 0-dim, got shape ", scale.sizes());
  const int64_t B = a.size(0), M = k.size(0);
  for (const at::Tensor* t : {&cs, &ce}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B && t->scalar_type() == at::kInt, op,
                ": col_start and col_end must be (", B, ",) int32, got ", t->sizes(), " ", t->scalar_type());
  }
  if (B > 0) {
    const bool ok = (cs.min().item<int32_t>() >= 0 && cs.max().item<int32_t>() <= M &&
                     ce.min().item<int32_t>() >= 0 && ce.max().item<int32_t>() <= M);
    TORCH_CHECK(ok, op, ": col_start and col_end must lie in [0, ", M, "]");
  }
}

template <typename T>
void forward(const Operands<T>& o, T* lse) {
  const int64_t blocks = (o.B + kRows - 1) / kRows;
  const T ninf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    const blas::BlasThreads threads(1);
    Buffer<T> G(kRows * kCols), N(kRows * kCols);
    std::vector<T> m(kRows), l(kRows);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, nr = std::min(o.B, r0 + kRows) - r0;
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), T(0));
      for (int64_t c0 = o.lo[b]; c0 < o.hi[b]; c0 += kCols) {
        const int64_t nc = std::min<int64_t>(o.hi[b], c0 + kCols) - c0;
        o.tile(G.data(), N.data(), r0, nr, c0, nc);
        for (int64_t i = 0; i < nr; ++i) {
          const int64_t row = r0 + i;
          const int64_t j0 = std::max<int64_t>(c0, o.cs[row]) - c0;
          const int64_t j1 = std::min<int64_t>(c0 + nc, o.ce[row]) - c0;
          if (j1 <= j0) continue;
          T* g = G.data() + i * nc + j0;
          const T tmax = logits_row(g, N.data() + i * nc + j0, j1 - j0, o.s);
          const T mn = std::max(m[i], tmax);
          l[i] = (m[i] == ninf ? T(0) : l[i] * fast_exp(m[i] - mn)) + sum_exp(g, j1 - j0, mn);
          m[i] = mn;
        }
      }
      for (int64_t i = 0; i < nr; ++i) lse[r0 + i] = l[i] > T(0) ? m[i] + std::log(l[i]) : ninf;
    }
  });
}

template <typename T>
T backward(const Operands<T>& o, const T* lse, const T* gl, T* da, T* dw, T* dk) {
  const int64_t B = o.B, M = o.M, D = o.D;
  const int64_t row_blocks = (B + kRows - 1) / kRows;
  std::vector<T> part(B, T(0));
  at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
    const blas::BlasThreads threads(1);
    Buffer<T> G(kRows * kCols), N(kRows * kCols);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows, nr = std::min(B, r0 + kRows) - r0;
      std::fill(da + r0 * D, da + (r0 + nr) * D, T(0));
      std::fill(dw + r0 * D, dw + (r0 + nr) * D, T(0));
      for (int64_t c0 = o.lo[b]; c0 < o.hi[b]; c0 += kCols) {
        const int64_t nc = std::min<int64_t>(o.hi[b], c0 + kCols) - c0;
        o.tile(G.data(), N.data(), r0, nr, c0, nc);
        o.grad_tile(G.data(), N.data(), r0, nr, c0, nc, lse, gl, part.data() + r0);
        blas::acc_nn(da + r0 * D, G.data(), nc, o.k + c0 * D, nr, nc, D);
        blas::acc_nn(dw + r0 * D, N.data(), nc, o.kk + c0 * D, nr, nc, D);
      }
    }
  });
  const int64_t col_blocks = (M + kCols - 1) / kCols;
  at::parallel_for(0, col_blocks, 1, [&](int64_t b0, int64_t b1) {
    const blas::BlasThreads threads(1);
    Buffer<T> G(kRows * kCols), N(kRows * kCols), dkw(kCols * D);
    for (int64_t cb = b0; cb < b1; ++cb) {
      const int64_t c0 = cb * kCols, nc = std::min(M, c0 + kCols) - c0;
      T* dkg = dk + c0 * D;  // dGᵀ·a accumulated in place
      std::fill(dkg, dkg + nc * D, T(0));
      std::fill(dkw.data(), dkw.data() + kCols * D, T(0));
      for (int64_t b = 0; b < row_blocks; ++b) {
        if (!(o.lo[b] < c0 + nc && o.hi[b] > c0)) continue;  // the block's ranges miss these columns
        const int64_t r0 = b * kRows, nr = std::min(B, r0 + kRows) - r0;
        o.tile(G.data(), N.data(), r0, nr, c0, nc);
        o.grad_tile(G.data(), N.data(), r0, nr, c0, nc, lse, gl, nullptr);
        blas::acc_tn(dkg, G.data(), nc, o.a + r0 * D, nr, nc, D);
        blas::acc_tn(dkw.data(), N.data(), nc, o.w + r0 * D, nr, nc, D);
      }
      const T* kc = o.k + c0 * D;
      const T* dn = dkw.data();
      for (int64_t x = 0; x < nc * D; ++x) dkg[x] += T(2) * kc[x] * dn[x];
    }
  });
  T ds = 0;
  for (int64_t i = 0; i < B; ++i) ds += part[i];  // row order
  return ds;
}

}  // namespace

at::Tensor gated_lse_fwd(const at::Tensor& a, const at::Tensor& w, const at::Tensor& k, const at::Tensor& scale,
                         const at::Tensor& col_start, const at::Tensor& col_end) {
  check_args(a, w, k, scale, col_start, col_end, "gated_lse_fwd");
  const at::Tensor cs = col_start.contiguous(), ce = col_end.contiguous();
  at::Tensor lse = at::empty({a.size(0)}, a.options());
  if (a.scalar_type() == at::kDouble) {
    forward(Operands<double>(a, w, k, scale, cs, ce), lse.data_ptr<double>());
  } else {
    forward(Operands<float>(a, w, k, scale, cs, ce), lse.data_ptr<float>());
  }
  return lse;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_lse_bwd(
    const at::Tensor& a, const at::Tensor& w, const at::Tensor& k, const at::Tensor& scale,
    const at::Tensor& col_start, const at::Tensor& col_end, const at::Tensor& lse_in, const at::Tensor& grad_lse) {
  check_args(a, w, k, scale, col_start, col_end, "gated_lse_bwd");
  const int64_t B = a.size(0);
  for (const at::Tensor* t : {&lse_in, &grad_lse}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == B, "gated_lse_bwd: lse and grad_lse must have shape (", B,
                ",), got ", t->sizes());
  }
  const at::Tensor cs = col_start.contiguous(), ce = col_end.contiguous();
  const auto acc = a.scalar_type();
  const at::Tensor lse = lse_in.to(acc).contiguous(), gl = grad_lse.to(acc).contiguous();
  at::Tensor da = at::empty(a.sizes(), a.options()), dw = at::empty(w.sizes(), a.options());
  at::Tensor dk = at::empty(k.sizes(), a.options());  // in the accumulation type, cast to k's below
  at::Tensor dscale = at::empty({}, a.options());
  if (acc == at::kDouble) {
    const double ds = backward(Operands<double>(a, w, k, scale, cs, ce), lse.data_ptr<double>(),
                               gl.data_ptr<double>(), da.data_ptr<double>(), dw.data_ptr<double>(),
                               dk.data_ptr<double>());
    dscale.fill_(ds);
  } else {
    const float ds = backward(Operands<float>(a, w, k, scale, cs, ce), lse.data_ptr<float>(),
                              gl.data_ptr<float>(), da.data_ptr<float>(), dw.data_ptr<float>(),
                              dk.data_ptr<float>());
    dscale.fill_(ds);
  }
  return {da, dw, dk.to(k.scalar_type()), dscale};
}

}  // namespace gated_lse_cpu
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("gated_lse_fwd", &contrastive_ops::gated_lse_cpu::gated_lse_fwd);
  m.impl("gated_lse_bwd", &contrastive_ops::gated_lse_cpu::gated_lse_bwd);
}
