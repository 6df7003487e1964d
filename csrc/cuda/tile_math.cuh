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

// Is candidate gj (a position in K) allowed for anchor gi?
CO_HD bool allowed(const DevMasks& mk, int64_t gi, int64_t gj) {
  if (mk.cs && gj < int64_t(mk.cs[gi])) return false;
  if (mk.ce && gj >= int64_t(mk.ce[gi])) return false;
  for (int64_t x = 0; x < mk.E; ++x)
    if (int64_t(mk.ex[gi * mk.E + x]) == gj) return false;
  return true;
}

// The row threshold of anchor gi on its logit s (the value the epilogue exponentiates, forward and
// backward alike): kept unless s > row_max[gi]; a NaN s is kept (a threshold never hides a NaN).
template <typename T>
CO_HD bool under_row_max(const DevMasks& mk, T s, int64_t gi) {
  return mk.rmax == nullptr || !(s > static_cast<const T*>(mk.rmax)[gi]);
}

// S = scale·G, rounded once, or -inf where the pair is not allowed (masks and row threshold).
template <typename T>
CO_HD T masked_logit(const DevMasks& mk, T sc, T g, int64_t gi, int64_t gj) {
  if (!allowed(mk, gi, gj)) return neg_inf<T>();
  const T s = mul_rn(sc, g);
  return under_row_max(mk, s, gi) ? s : neg_inf<T>();
}

// dS of an allowed pair from its recomputed logit s: g_row·exp(s - row_lse) + g_col·exp(s - col_lse).
// rl / cl are +inf where the LSE was -inf (see safe_lse in csrc/tiling.h): the term is then 0.
template <typename T>
CO_HD T lse_grad(T s, T rl, T gr, bool has_col, T cl, T gc) {
  T d = gr * dexp(s - rl);
  if (has_col) d += gc * dexp(s - cl);
  return d;
}

// SigLIP: logit l = scale·G + bias, z = +1 on the diagonal (gi == gj), -1 elsewhere.
template <typename T>
CO_HD T siglip_logit(T sc, T b, T g) {
  return mul_rn(sc, g) + b;
}

template <typename T>
CO_HD T softplus(T v) {
  return (v > T(0) ? v : T(0)) + dlog1p(dexp(-dabs(v)));
}

template <typename T>
CO_HD T sigmoid(T v) {
  const T e = dexp(-dabs(v));
  return v >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
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
