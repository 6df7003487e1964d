// The vectorizable loops of the CPU similarity-LSE epilogues: row and column
// max / sum-of-exponentials over a tile row, the running log-sum-exp merge,
// and the fused loops of the shifted ("fast") and exact epilogues, in the
// general and the symmetric-Gram layout (see csrc/cpu/sim_lse.cpp for the
// kernels that call them and the maths they serve).
//
// Templates (float64 calls them directly) with float wrappers compiled once
// per ISA (CO_MULTIVERSION).  Everything here has internal linkage: each
// translation unit that includes the header gets its own ISA clones.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "fastmath.h"

namespace contrastive_ops {
namespace {

using fastmath::fast_exp;

// Independent accumulators per reduction: lets the compiler vectorize a
// reduction without reassociating floating-point sums (no -ffast-math).
constexpr int64_t L = 16;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---- row and column loops (templates; float versions are multiversioned below) ----

// p[j] = scale·p[j] for j in [lo, hi) (-inf where that product is > thr), -inf for the other j in [0, n).
template <typename T>
CO_INLINE void scale_mask_t(T* p, int64_t n, int64_t lo, int64_t hi, T scale, T thr) {
  for (int64_t j = 0; j < lo; ++j) p[j] = neg_inf<T>();
  for (int64_t j = lo; j < hi; ++j) {
    const T s = p[j] * scale;
    p[j] = s > thr ? neg_inf<T>() : s;
  }
  for (int64_t j = hi; j < n; ++j) p[j] = neg_inf<T>();
}

template <typename T>
CO_INLINE T max_t(const T* p, int64_t n) {
  T acc[L];
  for (int64_t l = 0; l < L; ++l) acc[l] = neg_inf<T>();
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) acc[l] = p[j + l] > acc[l] ? p[j + l] : acc[l];
  T m = neg_inf<T>();
  for (; j < n; ++j) m = p[j] > m ? p[j] : m;
  for (int64_t l = 0; l < L; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// NaN if some p[j] is NaN, else -inf: the maximum of a slice whose other entries are all masked
// (max_t lets a NaN lose to -inf).
template <typename T>
inline T nan_among(const T* p, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (p[j] != p[j]) return p[j];
  return neg_inf<T>();
}

// Σ_j exp(p[j] - m), m finite.
template <typename T>
CO_INLINE T sumexp_t(const T* p, int64_t n, T m) {
  T acc[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) acc[l] += fast_exp(p[j + l] - m);
  T s = 0;
  for (; j < n; ++j) s += fast_exp(p[j] - m);
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// m[j] = max(m[j], p[j]).
template <typename T>
CO_INLINE void colmax_t(const T* p, T* m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) m[j] = p[j] > m[j] ? p[j] : m[j];
}

// s[j] += exp(p[j] - m[j]) with m finite (callers pass 0 for columns still at -inf).
template <typename T>
CO_INLINE void colsumexp_t(const T* p, const T* m, T* s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] += fast_exp(p[j] - m[j]);
}

// float: one clone per ISA; double: the templates directly.
CO_MULTIVERSION void scale_mask(float* p, int64_t n, int64_t lo, int64_t hi, float scale, float thr) {
  scale_mask_t(p, n, lo, hi, scale, thr);
}
CO_MULTIVERSION float vmax(const float* p, int64_t n) { return max_t(p, n); }
CO_MULTIVERSION float sumexp(const float* p, int64_t n, float m) { return sumexp_t(p, n, m); }
CO_MULTIVERSION void colmax(const float* p, float* m, int64_t n) { colmax_t(p, m, n); }
CO_MULTIVERSION void colsumexp(const float* p, const float* m, float* s, int64_t n) { colsumexp_t(p, m, s, n); }
inline void scale_mask(double* p, int64_t n, int64_t lo, int64_t hi, double scale, double thr) {
  scale_mask_t(p, n, lo, hi, scale, thr);
}
inline double vmax(const double* p, int64_t n) { return max_t(p, n); }
inline double sumexp(const double* p, int64_t n, double m) { return sumexp_t(p, n, m); }
inline void colmax(const double* p, double* m, int64_t n) { colmax_t(p, m, n); }
inline void colsumexp(const double* p, const double* m, double* s, int64_t n) { colsumexp_t(p, m, s, n); }

// Merge (m2, s2) into the running (m, s) of a log-sum-exp: s·e^m + s2·e^m2.
template <typename T>
inline void lse_merge(T& m, T& s, T m2, T s2) {
  if (m2 == neg_inf<T>()) return;
  if (m2 > m) {
    s = s * fast_exp(m - m2) + s2;  // exp(-inf) == 0 when m was still -inf
    m = m2;
  } else {
    s += s2 * fast_exp(m2 - m);
  }
}

// The log-sum-exp of a finished running (m, s): -inf when nothing was summed, NaN when a NaN logit
// made the sum NaN.
template <typename T>
T finish(T m, T s) {
  return s == T(0) ? neg_inf<T>() : m + std::log(s);
}

// ---- fused loops (float versions multiversioned below) ----

// exp(s - R) of a logit s = scale·g, or 0 where s > thr (the row threshold; +inf: none).  Every
// loop below compares the rounded product s it exponentiates, so the forward and the backward
// drop the same pairs of the same tile.
template <typename T>
CO_INLINE T capped_exp(T s, T R, T thr) {
  return s > thr ? T(0) : fast_exp(s - R);
}

// Σ e over [0, n), e = exp(scale·g - R) (0 where scale·g > thr); col[j] += e when col is given.
template <typename T>
CO_INLINE T fwd_seg_t(const T* __restrict__ g, T* __restrict__ col, int64_t n, T scale, T R, T thr) {
  T acc[L] = {};
  int64_t j = 0;
  if (col) {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T e = capped_exp(scale * g[j + l], R, thr);
        acc[l] += e;
        col[j + l] += e;
      }
    for (; j < n; ++j) {
      const T e = capped_exp(scale * g[j], R, thr);
      acc[0] += e;
      col[j] += e;
    }
  } else {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) acc[l] += capped_exp(scale * g[j + l], R, thr);
    for (; j < n; ++j) acc[0] += capped_exp(scale * g[j], R, thr);
  }
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// In place: g[j] <- dS = e·(a + b[j]) (b optional), e = exp(scale·g - R) (0 where scale·g > thr);
// returns Σ dS·g.
template <typename T>
CO_INLINE T bwd_seg_t(T* __restrict__ g, int64_t n, T scale, T R, T a, const T* __restrict__ b, T thr) {
  T acc[L] = {};
  int64_t j = 0;
  if (b) {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], e = capped_exp(scale * x, R, thr), d = e * a + e * b[j + l];
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], e = capped_exp(scale * x, R, thr), d = e * a + e * b[j];
      acc[0] += d * x;
      g[j] = d;
    }
  } else {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], d = capped_exp(scale * x, R, thr) * a;
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], d = capped_exp(scale * x, R, thr) * a;
      acc[0] += d * x;
      g[j] = d;
    }
  }
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// Exact epilogue of the backward, in place: g[j] <- gr·exp(s - rl) [+ gc[j]·exp(s - cl[j])], s = scale·g
// (0 where s > thr); returns Σ dS·g.  rl / cl are +inf where the LSE was -inf (the term is then 0).
template <typename T>
CO_INLINE T bwd_exact_seg_t(T* __restrict__ g, int64_t n, T scale, T gr, T rl, const T* __restrict__ gc,
                         const T* __restrict__ cl, T thr) {
  T acc[L] = {};
  int64_t j = 0;
  if (gc) {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], s = scale * x;
        const T d = s > thr ? T(0) : gr * fast_exp(s - rl) + gc[j + l] * fast_exp(s - cl[j + l]);
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], s = scale * x, d = s > thr ? T(0) : gr * fast_exp(s - rl) + gc[j] * fast_exp(s - cl[j]);
      acc[0] += d * x;
      g[j] = d;
    }
  } else {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], s = scale * x, d = s > thr ? T(0) : gr * fast_exp(s - rl);
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], s = scale * x, d = s > thr ? T(0) : gr * fast_exp(s - rl);
      acc[0] += d * x;
      g[j] = d;
    }
  }
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// Column-view masks of an off-diagonal symmetric tile: column j (global row gj of the
// other block) allows tile row gi iff cs[j] <= gi < ce[j] and gi ∉ {x0[j], x1[j]}.
struct ColView {
  const int32_t* cs;
  const int32_t* ce;
  const int32_t* x0;
  const int32_t* x1;
};

// Off-diagonal symmetric tile, forward, one tile row gi: e = exp(scale·g - R);
// returns Σ e over the row's allowed columns (tile coordinates lo <= j < hi, j ∉ {h0, h1})
// and adds e to col[j] where column j allows row gi.
template <typename T>
CO_INLINE T sym_fwd_row_t(const T* __restrict__ g, T* __restrict__ col, int32_t n, T scale, T R, int32_t lo, int32_t hi,
                       int32_t h0, int32_t h1, const int32_t* __restrict__ cs, const int32_t* __restrict__ ce,
                       const int32_t* __restrict__ x0, const int32_t* __restrict__ x1, int32_t gi) {
  T acc[L] = {};
  int32_t j = 0;
  for (; j + L <= n; j += L)
    for (int32_t l = 0; l < L; ++l) {
      const int32_t jj = j + l;
      const T e = fast_exp(scale * g[jj] - R);
      const bool ar = (jj >= lo) & (jj < hi) & (jj != h0) & (jj != h1);
      const bool ac = (gi >= cs[jj]) & (gi < ce[jj]) & (gi != x0[jj]) & (gi != x1[jj]);
      acc[l] += ar ? e : T(0);
      col[jj] += ac ? e : T(0);
    }
  for (; j < n; ++j) {
    const T e = fast_exp(scale * g[j] - R);
    const bool ar = (j >= lo) & (j < hi) & (j != h0) & (j != h1);
    const bool ac = (gi >= cs[j]) & (gi < ce[j]) & (gi != x0[j]) & (gi != x1[j]);
    acc[0] += ar ? e : T(0);
    col[j] += ac ? e : T(0);
  }
  T s = 0;
  for (int32_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// Off-diagonal symmetric tile, backward, one tile row gi, in place:
// g[j] <- C = e·([row allows j]·a + [column j allows gi]·b[j]); returns Σ C·g.
template <typename T>
CO_INLINE T sym_bwd_row_t(T* __restrict__ g, int32_t n, T scale, T R, T a, const T* __restrict__ b, int32_t lo,
                       int32_t hi, int32_t h0, int32_t h1, const int32_t* __restrict__ cs,
                       const int32_t* __restrict__ ce, const int32_t* __restrict__ x0, const int32_t* __restrict__ x1,
                       int32_t gi) {
  T acc[L] = {};
  int32_t j = 0;
  for (; j + L <= n; j += L)
    for (int32_t l = 0; l < L; ++l) {
      const int32_t jj = j + l;
      const T x = g[jj], e = fast_exp(scale * x - R);
      const bool ar = (jj >= lo) & (jj < hi) & (jj != h0) & (jj != h1);
      const bool ac = (gi >= cs[jj]) & (gi < ce[jj]) & (gi != x0[jj]) & (gi != x1[jj]);
      const T d = (ar ? e * a : T(0)) + (ac ? e * b[jj] : T(0));
      acc[l] += d * x;
      g[jj] = d;
    }
  for (; j < n; ++j) {
    const T x = g[j], e = fast_exp(scale * x - R);
    const bool ar = (j >= lo) & (j < hi) & (j != h0) & (j != h1);
    const bool ac = (gi >= cs[j]) & (gi < ce[j]) & (gi != x0[j]) & (gi != x1[j]);
    const T d = (ar ? e * a : T(0)) + (ac ? e * b[j] : T(0));
    acc[0] += d * x;
    g[j] = d;
  }
  T s = 0;
  for (int32_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

CO_MULTIVERSION float fwd_seg(const float* g, float* col, int64_t n, float scale, float R, float thr) {
  return fwd_seg_t(g, col, n, scale, R, thr);
}
CO_MULTIVERSION float bwd_seg(float* g, int64_t n, float scale, float R, float a, const float* b, float thr) {
  return bwd_seg_t(g, n, scale, R, a, b, thr);
}
CO_MULTIVERSION float bwd_exact_seg(float* g, int64_t n, float scale, float gr, float rl, const float* gc,
                                    const float* cl, float thr) {
  return bwd_exact_seg_t(g, n, scale, gr, rl, gc, cl, thr);
}
CO_MULTIVERSION float sym_fwd_row(const float* g, float* col, int32_t n, float scale, float R, int32_t lo, int32_t hi,
                                  int32_t h0, int32_t h1, const int32_t* cs, const int32_t* ce, const int32_t* x0,
                                  const int32_t* x1, int32_t gi) {
  return sym_fwd_row_t(g, col, n, scale, R, lo, hi, h0, h1, cs, ce, x0, x1, gi);
}
CO_MULTIVERSION float sym_bwd_row(float* g, int32_t n, float scale, float R, float a, const float* b, int32_t lo,
                                  int32_t hi, int32_t h0, int32_t h1, const int32_t* cs, const int32_t* ce,
                                  const int32_t* x0, const int32_t* x1, int32_t gi) {
  return sym_bwd_row_t(g, n, scale, R, a, b, lo, hi, h0, h1, cs, ce, x0, x1, gi);
}
inline double fwd_seg(const double* g, double* col, int64_t n, double scale, double R, double thr) {
  return fwd_seg_t(g, col, n, scale, R, thr);
}
inline double bwd_seg(double* g, int64_t n, double scale, double R, double a, const double* b, double thr) {
  return bwd_seg_t(g, n, scale, R, a, b, thr);
}
inline double bwd_exact_seg(double* g, int64_t n, double scale, double gr, double rl, const double* gc,
                            const double* cl, double thr) {
  return bwd_exact_seg_t(g, n, scale, gr, rl, gc, cl, thr);
}
inline double sym_fwd_row(const double* g, double* col, int32_t n, double scale, double R, int32_t lo, int32_t hi,
                          int32_t h0, int32_t h1, const int32_t* cs, const int32_t* ce, const int32_t* x0,
                          const int32_t* x1, int32_t gi) {
  return sym_fwd_row_t(g, col, n, scale, R, lo, hi, h0, h1, cs, ce, x0, x1, gi);
}
inline double sym_bwd_row(double* g, int32_t n, double scale, double R, double a, const double* b, int32_t lo,
                          int32_t hi, int32_t h0, int32_t h1, const int32_t* cs, const int32_t* ce, const int32_t* x0,
                          const int32_t* x1, int32_t gi) {
  return sym_bwd_row_t(g, n, scale, R, a, b, lo, hi, h0, h1, cs, ce, x0, x1, gi);
}

}  // namespace
}  // namespace contrastive_ops
