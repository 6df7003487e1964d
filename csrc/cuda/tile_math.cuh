// Per-element and per-partial maths of the tile epilogues of csrc/tiling.h:
// the CUDA kernels (csrc/cuda/epilogues.cu) and the CPU instantiation of the
// same tiling (csrc/cpu/sim_lse_tiled.cpp) call these functions, so the lines
// that decide masks, logits, gradients and the merge of partial statistics are
// the ones CI runs on CPU.
//
// Partial layout of one tile (br rows × bc columns), shared by both devices:
// the tile is cut into sub-blocks of kSubRows rows × kSubCols columns (CUDA:
// one thread block each; CPU: the sizes the instantiation picks).
//   row partials  (m, s) at [bx·br + i]: row i over the columns of sub-block column bx
//   col partials  (m, s) at [by·bc + j]: column j over the rows of sub-block row by
//   sum partials  v at [by·nbx + bx]:   one per sub-block (dscale, SigLIP sums)
// Partials are merged in index order (merge_parts, sum_parts): results do not
// depend on scheduling, and no floating-point atomics are used.
#pragma once

#include <cstdint>
#include <limits>

#include "lse_math.cuh"

namespace contrastive_ops {
namespace tile_math {

using namespace lse_math;

// Masks as raw pointers (nullptr when absent); col indices are positions in K.
struct DevMasks {
  const int32_t* cs;
  const int32_t* ce;
  const int32_t* ex;
  int64_t E, M;
  const void* rmax;  // row_max (B,) in the accumulation dtype T of the tile, or nullptr
};

// The allowed column range of anchor gi relative to a tile's first column c0: [lo, hi) clamped to
// [0, bc] (a tile is narrower than 2^31 columns).  Read once per row of a tile (the CUDA kernels stage
// it in shared memory), so the per-column tests below are 32-bit.
struct TileRange {
  int32_t lo, hi;
};

CO_HD TileRange tile_range(const DevMasks& mk, int64_t gi, int64_t c0, int64_t bc) {
  const int64_t lo = mk.cs ? int64_t(mk.cs[gi]) - c0 : 0, hi = mk.ce ? int64_t(mk.ce[gi]) - c0 : bc;
  return {int32_t(lo < 0 ? 0 : (lo > bc ? bc : lo)), int32_t(hi < 0 ? 0 : (hi > bc ? bc : hi))};
}

// The exclusion list of anchor gi: E positions in K (entries < 0 exclude nothing).
struct RowEx {
  const int32_t* ex;
  int64_t E;
};

CO_HD RowEx row_ex(const DevMasks& mk, int64_t gi) {
  return {mk.ex ? mk.ex + gi * mk.E : nullptr, mk.ex ? mk.E : int64_t(0)};
}

CO_HD uint32_t low_bits(int32_t x) { return x >= 32 ? 0xffffffffu : (1u << x) - 1u; }  // bits [0, x), 0 ≤ x

// Bit k (k < n ≤ 32) set when column j + k of the tile starting at c0 is allowed for the row: inside
// its range and not excluded.  The exclusion list is read once for the n columns (a thread's columns
// on the GPU).
CO_HD uint32_t tile_allowed_bits(TileRange t, RowEx x, int64_t c0, int32_t j, int n) {
  const int32_t lo = t.lo - j < 0 ? 0 : (t.lo - j > n ? n : t.lo - j);
  const int32_t hi = t.hi - j < 0 ? 0 : (t.hi - j > n ? n : t.hi - j);
  uint32_t bits = low_bits(hi) & ~low_bits(lo);
  CO_NO_UNROLL
  for (int64_t e = 0; e < x.E; ++e) {  // E is small (1 for NT-Xent): a plain loop, not unrolled
    const uint64_t d = uint64_t(int64_t(x.ex[e]) - c0 - j);  // one unsigned test of 0 ≤ d < n
    if (d < uint64_t(n)) bits &= ~(1u << d);
  }
  return bits;
}

// The row threshold of anchor gi: row_max[gi], or +inf without one.
template <typename T>
CO_HD T row_threshold(const DevMasks& mk, int64_t gi) {
  return mk.rmax == nullptr ? std::numeric_limits<T>::infinity() : static_cast<const T*>(mk.rmax)[gi];
}

// A logit s is kept under the row threshold thr unless s > thr, compared on the S the epilogue
// exponentiates (forward and backward alike); a NaN s is kept (a threshold never hides a NaN).
template <typename T>
CO_HD bool under_threshold(T s, T thr) {
  return !(s > thr);
}

// S = scale·G, rounded once, or -inf where the column masks (ok: the pair's bit of tile_allowed_bits) or the
// row threshold exclude the pair.
template <typename T>
CO_HD T masked_logit_row(bool ok, T thr, T sc, T g) {
  if (!ok) return neg_inf<T>();
  const T s = mul_rn(sc, g);
  return under_threshold(s, thr) ? s : neg_inf<T>();
}

// Max of the n logits v[0], v[stride], …; -inf when all are masked (-inf), NaN when one is NaN (so
// that the sum below turns NaN too, whatever the other logits).
template <typename T>
CO_HD T chunk_max(const T* v, int n, int stride) {
  T m = neg_inf<T>();
  for (int i = 0; i < n; ++i) m = nan_max(m, v[i * stride]);
  return m;
}

// Σ exp(v[i·stride] - m) over the n logits, for m their maximum (a chunk's, a warp's): masked
// logits (-inf) add exp(-inf) = 0, and the sum is 0 when m is -inf (every logit masked).
template <typename T>
CO_HD T chunk_sum_exp(const T* v, int n, int stride, T m) {
  if (m == neg_inf<T>()) return T(0);
  T s = 0;
  for (int i = 0; i < n; ++i) s += fexp(v[i * stride] - m);
  return s;
}

// Fold n logits into a running (m, s): one maximum, one sum of exponentials against it, one merge
// (a column's rows held in registers by the CUDA forward epilogue, a sub-block's on CPU).
template <typename T>
CO_HD void chunk_fold(T& m, T& s, const T* v, int n, int stride) {
  const T cm = chunk_max(v, n, stride);
  lse_merge(m, s, cm, chunk_sum_exp(v, n, stride, cm));
}

// dS of an allowed pair from its recomputed logit s: g_row·exp(s - row_lse) + g_col·exp(s - col_lse).
// rl / cl are +inf where the LSE was -inf (see safe_lse in csrc/tiling.h): the term is then 0.
template <typename T>
CO_HD T lse_grad(T s, T rl, T gr, bool has_col, T cl, T gc) {
  T d = gr * fexp(s - rl);
  if (has_col) d += gc * fexp(s - cl);
  return d;
}

// SigLIP: logit l = scale·G + bias, z = +1 on the diagonal (gi == gj), -1 elsewhere.
template <typename T>
CO_HD T siglip_logit(T sc, T b, T g) {
  return mul_rn(sc, g) + b;
}

template <typename T>
CO_HD T softplus(T v) {
  return (v > T(0) ? v : T(0)) + dlog1p(fexp(-dabs(v)));
}

template <typename T>
CO_HD T sigmoid(T v) {
  const T e = fexp(-dabs(v));
  return v >= T(0) ? fdiv(T(1), T(1) + e) : fdiv(e, T(1) + e);
}

// softplus(-z·l) of one pair.
template <typename T>
CO_HD T siglip_term(T l, bool diag) {
  return softplus(diag ? -l : l);
}

// dL/dl of one pair, times the upstream gradient: grad·(σ(l) - [diag]).
template <typename T>
CO_HD T siglip_grad(T l, bool diag, T grad) {
  return grad * (sigmoid(l) - (diag ? T(1) : T(0)));
}

// Merge the partials (pm[p·stride], ps[p·stride]), p = 0, 1, …, n-1 in this order, into (m, s).
template <typename T>
CO_HD void merge_parts(T& m, T& s, const T* pm, const T* ps, int64_t n, int64_t stride) {
  for (int64_t p = 0; p < n; ++p) lse_merge(m, s, pm[p * stride], ps[p * stride]);
}

// Σ p[i·stride], i = 0, 1, …, n-1 in this order.
template <typename T>
CO_HD T sum_parts(const T* p, int64_t n, int64_t stride) {
  T a = 0;
  for (int64_t i = 0; i < n; ++i) a += p[i * stride];
  return a;
}

}  // namespace tile_math
}  // namespace contrastive_ops
