// CPU kernels of the similarity-LSE core and the SigLIP pair sum.
//
// Core: row-block kernels (described below, "similarity-LSE core: row-block
// kernels"): one part per thread, single-threaded BLAS on cache-sized tiles
// (csrc/cpu/blas.h), fused epilogues, symmetric Gram when q is k.
// SigLIP: the tiling of csrc/tiling.h with multithreaded ATen GEMMs on tiles
// and epilogues parallel over the rows of a tile with at::parallel_for.
// Tiles are fp32 (float64 for float64 inputs); fp16/bf16 inputs are upcast
// once to fp32 copies of Q and K (O((B+M)·D)).  The loops are vectorizable
// templates, compiled per ISA through the CO_MULTIVERSION wrappers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "../tiling.h"
#include "blas.h"
#include "fastmath.h"

namespace contrastive_ops {
namespace {

using fastmath::fast_exp;
using fastmath::fast_sigmoid;
using fastmath::fast_softplus;

// Independent accumulators per reduction: lets the compiler vectorize a
// reduction without reassociating floating-point sums (no -ffast-math).
constexpr int64_t L = 16;

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---- row and column loops (templates; float versions are multiversioned below) ----

// p[j] = scale·p[j] for j in [lo, hi), -inf for the other j in [0, n).
template <typename T>
CO_INLINE void scale_mask_t(T* p, int64_t n, int64_t lo, int64_t hi, T scale) {
  for (int64_t j = 0; j < lo; ++j) p[j] = neg_inf<T>();
  for (int64_t j = lo; j < hi; ++j) p[j] *= scale;
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

// Σ_j softplus(scale·g[j] + bias).
template <typename T>
CO_INLINE T softplus_sum_t(const T* g, int64_t n, T scale, T bias) {
  T acc[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) acc[l] += fast_softplus(scale * g[j + l] + bias);
  T s = 0;
  for (; j < n; ++j) s += fast_softplus(scale * g[j] + bias);
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// dl[j] = grad·σ(scale·g[j] + bias); sums[0] += Σ dl, sums[1] += Σ dl·g.
template <typename T>
CO_INLINE void sigmoid_row_t(const T* g, T* dl, int64_t n, T scale, T bias, T grad, T* sums) {
  T a0[L] = {}, a1[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) {
      const T d = grad * fast_sigmoid(scale * g[j + l] + bias);
      dl[j + l] = d;
      a0[l] += d;
      a1[l] += d * g[j + l];
    }
  for (; j < n; ++j) {
    const T d = grad * fast_sigmoid(scale * g[j] + bias);
    dl[j] = d;
    a0[0] += d;
    a1[0] += d * g[j];
  }
  for (int64_t l = 0; l < L; ++l) {
    sums[0] += a0[l];
    sums[1] += a1[l];
  }
}

// float: one clone per ISA; double: the templates directly.
CO_MULTIVERSION void scale_mask(float* p, int64_t n, int64_t lo, int64_t hi, float scale) {
  scale_mask_t(p, n, lo, hi, scale);
}
CO_MULTIVERSION float vmax(const float* p, int64_t n) { return max_t(p, n); }
CO_MULTIVERSION float sumexp(const float* p, int64_t n, float m) { return sumexp_t(p, n, m); }
CO_MULTIVERSION void colmax(const float* p, float* m, int64_t n) { colmax_t(p, m, n); }
CO_MULTIVERSION void colsumexp(const float* p, const float* m, float* s, int64_t n) { colsumexp_t(p, m, s, n); }
CO_MULTIVERSION float softplus_sum(const float* g, int64_t n, float scale, float bias) {
  return softplus_sum_t(g, n, scale, bias);
}
CO_MULTIVERSION void sigmoid_row(const float* g, float* dl, int64_t n, float scale, float bias, float grad,
                                 float* sums) {
  sigmoid_row_t(g, dl, n, scale, bias, grad, sums);
}
inline void scale_mask(double* p, int64_t n, int64_t lo, int64_t hi, double scale) {
  scale_mask_t(p, n, lo, hi, scale);
}
inline double vmax(const double* p, int64_t n) { return max_t(p, n); }
inline double sumexp(const double* p, int64_t n, double m) { return sumexp_t(p, n, m); }
inline void colmax(const double* p, double* m, int64_t n) { colmax_t(p, m, n); }
inline void colsumexp(const double* p, const double* m, double* s, int64_t n) { colsumexp_t(p, m, s, n); }
inline double softplus_sum(const double* g, int64_t n, double scale, double bias) {
  return softplus_sum_t(g, n, scale, bias);
}
inline void sigmoid_row(const double* g, double* dl, int64_t n, double scale, double bias, double grad,
                        double* sums) {
  sigmoid_row_t(g, dl, n, scale, bias, grad, sums);
}

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

// Allowed column range [lo, hi) of tile row gi, in tile coordinates.
struct RowRange {
  const int32_t* cs;
  const int32_t* ce;
  const int32_t* ex;
  int64_t E, M;
  explicit RowRange(const Masks& mk)
      : cs(mk.col_start ? mk.col_start->data_ptr<int32_t>() : nullptr),
        ce(mk.col_end ? mk.col_end->data_ptr<int32_t>() : nullptr),
        ex(mk.exclude ? mk.exclude->data_ptr<int32_t>() : nullptr),
        E(mk.E()),
        M(mk.M) {}
  void get(int64_t gi, int64_t c0, int64_t bc, int64_t& lo, int64_t& hi) const {
    const int64_t s = cs ? std::max<int64_t>(cs[gi], 0) : 0;
    const int64_t e = ce ? std::min<int64_t>(ce[gi], M) : M;
    lo = std::clamp<int64_t>(s - c0, 0, bc);
    hi = std::clamp<int64_t>(e - c0, lo, bc);
  }
};

constexpr int64_t kRowGrain = 8;  // rows per parallel task

struct CpuDev {
  static at::ScalarType compute_dtype(at::ScalarType in) { return acc_dtype(in); }
  static at::ScalarType ds_dtype(at::ScalarType in) { return acc_dtype(in); }
  // SigLIP pair sum only (the similarity-LSE core has its own row-block kernels
  // below).  A 512 × 2048 fp32 tile is 4 MiB (8 MiB with the backward's dS
  // tile): big enough for efficient multithreaded GEMMs, small enough to stay
  // near the last-level cache.
  static int64_t row_block(int64_t, int64_t, int64_t) { return 512; }
  static int64_t col_block(int64_t, int64_t, int64_t) { return 2048; }

  static void gemm_nt(Tensor& out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b.t()); }
  static void gemm_acc(Tensor& c, const Tensor& a, const Tensor& b) { c.addmm_(a, b); }

  // Row sums of softplus(-z·l); the diagonal (z = +1) is corrected separately:
  // softplus(-l) = softplus(l) - l.
  static void siglip_fwd_epilogue(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0,
                                  Tensor& total) {
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "siglip_fwd_epilogue_cpu", [&] {
      const int64_t br = G.size(0), bc = G.size(1);
      const scalar_t* g = G.data_ptr<scalar_t>();
      const scalar_t sc = scale.item<scalar_t>(), bi = bias.item<scalar_t>();
      std::vector<double> part(br, 0.0);
      at::parallel_for(0, br, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* gp = g + i * bc;
          double acc = softplus_sum(gp, bc, sc, bi);
          const int64_t j = r0 + i - c0;
          if (j >= 0 && j < bc) {
            const scalar_t l = sc * gp[j] + bi;
            acc += double(fast_softplus(scalar_t(-l))) - double(fast_softplus(l));
          }
          part[i] = acc;
        }
      });
      double s = 0;
      for (double v : part) s += v;
      total.add_(s);
    });
  }

  static void siglip_bwd_epilogue(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias,
                                  const Tensor& grad, int64_t r0, int64_t c0, Tensor& dscale, Tensor& dbias) {
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "siglip_bwd_epilogue_cpu", [&] {
      const int64_t br = G.size(0), bc = G.size(1);
      const scalar_t* g = G.data_ptr<scalar_t>();
      scalar_t* dl = dL.data_ptr<scalar_t>();
      const scalar_t sc = scale.item<scalar_t>(), bi = bias.item<scalar_t>(), gr = grad.item<scalar_t>();
      std::vector<double> p0(br, 0.0), p1(br, 0.0);
      at::parallel_for(0, br, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const scalar_t* gp = g + i * bc;
          scalar_t* dp = dl + i * bc;
          scalar_t sums[2] = {0, 0};
          sigmoid_row(gp, dp, bc, sc, bi, gr, sums);
          const int64_t j = r0 + i - c0;
          if (j >= 0 && j < bc) {  // diagonal: d softplus(-l)/dl = σ(l) - 1
            dp[j] -= gr;
            sums[0] -= gr;
            sums[1] -= gr * gp[j];
          }
          p0[i] = sums[0];
          p1[i] = sums[1];
        }
      });
      double s0 = 0, s1 = 0;
      for (int64_t i = 0; i < br; ++i) {
        s0 += p0[i];
        s1 += p1[i];
      }
      dbias.add_(s0);
      dscale.add_(s1);
    });
  }
};

// ---------------------------------------------------------------- similarity-LSE core: row-block kernels
//
// The CPU core does not use the device-generic tiling of csrc/tiling.h (which
// runs multithreaded GEMMs and epilogues tile after tile, with a barrier per
// tile).  Here the work is split into P parts, one per thread; each part owns
// a contiguous range of row blocks (or of tile pairs, see "symmetric Gram"),
// runs single-threaded GEMMs on cache-sized tiles and its own fused epilogue,
// and keeps thread-local column partials (column sums, dK) that are reduced in
// part order at the end.  Results are bitwise reproducible for a fixed thread
// count; rows are always summed in the same order, column partials and dK/dscale
// are reduced over parts in order.
//
// Shifted exponentials ("fast" epilogue).  With R ≥ max |S| (Cauchy-Schwarz:
// R = |scale|·max‖Q_i‖·max‖K_j‖), every allowed entry gives e = exp(S - R) ≤ 1,
// and the largest term of any row or column is ≥ exp(-2R).  When 2R stays well
// inside the exponent range (R ≤ kFastR: 40 for fp32, 300 for float64) no
// running maxima are needed: one exponential per entry serves the row sum and
// the column sum (lse = R + log Σe), and the backward's
//     dS = g_row·exp(S - row_lse) + g_col·exp(S - col_lse) = e·(a_i + b_j),
//     a_i = g_row[i]·exp(R - row_lse[i]),  b_j = g_col[j]·exp(R - col_lse[j]),
// is one exponential and a multiply.  Otherwise ("exact" epilogue: large
// |scale|·norms, e.g. temperature 0.01 on unit vectors) rows keep an online
// max/sum and columns a per-tile max then sum, merged with lse_merge.
//
// Symmetric Gram.  When Q and K are the same rows (q and k one tensor, the same
// or no index lists) and no column LSE is asked for, S is symmetric: each tile
// pair I ≤ J is computed once and serves row block I (tile rows) and row block
// J (tile columns), each view with its own rows' masks.  In the backward, when
// q and k are one tensor (its gradient is dq + dk), the two views' dS combine
// into C = dS_IJ + (dS_JI)ᵀ and dZ_I += C Z_J, dZ_J += Cᵀ Z_I: 1.5 + 2 GEMM
// passes over half the pairs instead of 1 + 3 over all tiles.  dq then holds
// the whole gradient of that tensor and dk is zeros (see csrc/ops.cpp).

// Tile sizes, measured at B = M = 8192, D = 256 on 2 cores (within ±5 % of each other
// for 64–256 rows × 512–2048 columns and symmetric sides 128–512): a 256 × 512 fp32
// tile is 512 KiB, the K block of D = 256 another 512 KiB, both near the L2.
constexpr int64_t kMaxRowBlock = 256;  // rows of a general tile (one part owns whole row blocks)
constexpr int64_t kColBlock = 512;     // columns of a general tile
constexpr int64_t kSymBlock = 256;     // side of a symmetric tile

// Rows per block: kMaxRowBlock, or fewer (multiples of 16) so that every thread gets a block.
inline int64_t row_block(int64_t B) {
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  const int64_t per = (B + T - 1) / T;
  return std::clamp<int64_t>((per + 15) / 16 * 16, 16, kMaxRowBlock);
}


template <typename T>
constexpr double kFastR = 40.0;
template <>
constexpr double kFastR<double> = 300.0;

// Which epilogue the last CPU call took (tests check that each path is exercised).
enum PathFlags : int64_t { kPathFast = 1, kPathSymmetric = 2, kPathSummedGrad = 4 };
std::atomic<int64_t> g_last_fwd_path{-1}, g_last_bwd_path{-1};

// ---- fused loops (float versions multiversioned below) ----

// Σ e over [0, n), e = exp(scale·g - R); col[j] += e when col is given.
template <typename T>
CO_INLINE T fwd_seg_t(const T* __restrict__ g, T* __restrict__ col, int64_t n, T scale, T R) {
  T acc[L] = {};
  int64_t j = 0;
  if (col) {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T e = fast_exp(scale * g[j + l] - R);
        acc[l] += e;
        col[j + l] += e;
      }
    for (; j < n; ++j) {
      const T e = fast_exp(scale * g[j] - R);
      acc[0] += e;
      col[j] += e;
    }
  } else {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) acc[l] += fast_exp(scale * g[j + l] - R);
    for (; j < n; ++j) acc[0] += fast_exp(scale * g[j] - R);
  }
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// In place: g[j] <- dS = e·(a + b[j]) (b optional), e = exp(scale·g - R); returns Σ dS·g.
template <typename T>
CO_INLINE T bwd_seg_t(T* __restrict__ g, int64_t n, T scale, T R, T a, const T* __restrict__ b) {
  T acc[L] = {};
  int64_t j = 0;
  if (b) {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], e = fast_exp(scale * x - R), d = e * a + e * b[j + l];
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], e = fast_exp(scale * x - R), d = e * a + e * b[j];
      acc[0] += d * x;
      g[j] = d;
    }
  } else {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], d = fast_exp(scale * x - R) * a;
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], d = fast_exp(scale * x - R) * a;
      acc[0] += d * x;
      g[j] = d;
    }
  }
  T s = 0;
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// Exact epilogue of the backward, in place: g[j] <- gr·exp(s - rl) [+ gc[j]·exp(s - cl[j])], s = scale·g;
// returns Σ dS·g.  rl / cl are +inf where the LSE was -inf (the term is then 0).
template <typename T>
CO_INLINE T bwd_exact_seg_t(T* __restrict__ g, int64_t n, T scale, T gr, T rl, const T* __restrict__ gc,
                         const T* __restrict__ cl) {
  T acc[L] = {};
  int64_t j = 0;
  if (gc) {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], s = scale * x;
        const T d = gr * fast_exp(s - rl) + gc[j + l] * fast_exp(s - cl[j + l]);
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], s = scale * x, d = gr * fast_exp(s - rl) + gc[j] * fast_exp(s - cl[j]);
      acc[0] += d * x;
      g[j] = d;
    }
  } else {
    for (; j + L <= n; j += L)
      for (int64_t l = 0; l < L; ++l) {
        const T x = g[j + l], d = gr * fast_exp(scale * x - rl);
        acc[l] += d * x;
        g[j + l] = d;
      }
    for (; j < n; ++j) {
      const T x = g[j], d = gr * fast_exp(scale * x - rl);
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

CO_MULTIVERSION float fwd_seg(const float* g, float* col, int64_t n, float scale, float R) {
  return fwd_seg_t(g, col, n, scale, R);
}
CO_MULTIVERSION float bwd_seg(float* g, int64_t n, float scale, float R, float a, const float* b) {
  return bwd_seg_t(g, n, scale, R, a, b);
}
CO_MULTIVERSION float bwd_exact_seg(float* g, int64_t n, float scale, float gr, float rl, const float* gc,
                                    const float* cl) {
  return bwd_exact_seg_t(g, n, scale, gr, rl, gc, cl);
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
inline double fwd_seg(const double* g, double* col, int64_t n, double scale, double R) {
  return fwd_seg_t(g, col, n, scale, R);
}
inline double bwd_seg(double* g, int64_t n, double scale, double R, double a, const double* b) {
  return bwd_seg_t(g, n, scale, R, a, b);
}
inline double bwd_exact_seg(double* g, int64_t n, double scale, double gr, double rl, const double* gc,
                            const double* cl) {
  return bwd_exact_seg_t(g, n, scale, gr, rl, gc, cl);
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

// ---- parts, masks, setup ----

// Number of parts (= tasks = threads used): at most the threads, the work items and cap.
inline int64_t num_parts(int64_t items, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>({int64_t(at::get_num_threads()), items, cap}));
}

// Items [p·n/P, (p+1)·n/P) of part p.
inline std::pair<int64_t, int64_t> part_range(int64_t p, int64_t P, int64_t n) { return {p * n / P, (p + 1) * n / P}; }

// Runs f(p) for the P parts, one per thread; when P is below the thread count
// (memory cap on the dK accumulators), each part's GEMMs get the spare threads.
// Records in g_last_threads how many distinct threads ran parts (1 when the
// extension was built without OpenMP: at::parallel_for then runs inline).
std::atomic<int64_t> g_last_threads{0};

template <class F>
void run_parts(int64_t P, const F& f) {
  const int64_t blas_threads = std::max<int64_t>(1, int64_t(at::get_num_threads()) / P);
  std::vector<char> ran(std::max<int64_t>(P, int64_t(at::get_num_threads())), 0);
  at::parallel_for(0, P, 1, [&](int64_t b, int64_t e) {
    const blas::BlasThreads threads(blas_threads);
    const int64_t t = at::get_thread_num();
    if (t >= 0 && t < int64_t(ran.size())) ran[t] = 1;
    for (int64_t p = b; p < e; ++p) f(p);
  });
  g_last_threads = std::count(ran.begin(), ran.end(), char(1));
}

// Sorted positions (tile coordinates, in [lo, hi)) that row gi excludes; returns their count.
inline int64_t holes(const RowRange& rr, int64_t gi, int64_t c0, int64_t lo, int64_t hi, int64_t* out) {
  int64_t n = 0;
  for (int64_t x = 0; x < rr.E; ++x) {
    const int64_t j = int64_t(rr.ex[gi * rr.E + x]) - c0;
    if (j >= lo && j < hi) out[n++] = j;
  }
  std::sort(out, out + n);
  return int64_t(std::unique(out, out + n) - out);
}

// Calls seg(a, b) for the maximal runs [a, b) of [lo, hi) between the sorted holes.
template <class F>
inline void for_segments(int64_t lo, int64_t hi, const int64_t* h, int64_t nh, const F& seg) {
  int64_t a = lo;
  for (int64_t x = 0; x < nh; ++x) {
    if (h[x] > a) seg(a, h[x]);
    a = h[x] + 1;
  }
  if (hi > a) seg(a, hi);
}

// Union of the allowed column ranges of rows r0 .. r0+br-1: tiles outside it are skipped.
inline std::pair<int64_t, int64_t> block_col_range(const Masks& mk, int64_t r0, int64_t br) {
  if (!mk.col_start && !mk.col_end) return {0, mk.M};
  RowRange rr(mk);
  int64_t lo = mk.M, hi = 0;
  for (int64_t i = r0; i < r0 + br; ++i) {
    int64_t l, h;
    rr.get(i, 0, mk.M, l, h);
    if (l < h) {
      lo = std::min(lo, l);
      hi = std::max(hi, h);
    }
  }
  return lo < hi ? std::make_pair(lo, hi) : std::make_pair<int64_t, int64_t>(0, 0);
}

// Rows per block of a general problem: row_block(B), or fewer when the rows allow narrow column
// ranges that move along the rows (block-diagonal problems such as point-token "cloud" negatives,
// each row's range its own cloud): a block of RB rows then spans about RB + w columns for ranges of
// width w, so most of a tall block's GEMM would fall outside every range.  Halves the block while
// the GEMM entries per block row, span / RB, keep shrinking by more than a quarter.
inline int64_t general_row_block(const Masks& mk, int64_t B) {
  int64_t RB = row_block(B);
  auto entries_per_row = [&](int64_t rb) {
    double total = 0;
    for (int64_t r0 = 0; r0 < B; r0 += rb) {
      const auto [lo, hi] = block_col_range(mk, r0, std::min(rb, B - r0));
      total += double(hi - lo) * double(std::min(rb, B - r0));
    }
    return total / double(std::max<int64_t>(B, 1));
  };
  double cur = entries_per_row(RB);
  while (RB > 32) {
    const double half = entries_per_row(RB / 2);
    if (half > 0.75 * cur) break;
    RB /= 2;
    cur = half;
  }
  return RB;
}

// R = |scale|·max‖Q_i‖·max‖K_j‖ (slightly rounded up): an upper bound of |S|; +inf if not finite.
inline double shift_bound(const Tensor& Q, const Tensor& K, double scale) {
  if (Q.size(0) == 0 || K.size(0) == 0) return 0.0;
  const double nq = at::linalg_vector_norm(Q, 2, {1}).max().item<double>();
  const double nk = at::linalg_vector_norm(K, 2, {1}).max().item<double>();
  const double R = std::abs(scale) * nq * nk;
  return std::isfinite(R) ? R * (1 + 1e-5) + 1e-30 : std::numeric_limits<double>::infinity();
}

inline bool is_identity(const Tensor& idx, int64_t n) {
  if (idx.numel() != n) return false;
  const int32_t* p = idx.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    if (p[i] != i) return false;
  return true;
}

// Q = q[row_index] and K = k[col_index] are the same rows.
inline bool same_rows(const Tensor& q, const Tensor& k, const OptTensor& ri, const OptTensor& ci) {
  if (q.data_ptr() != k.data_ptr() || q.sizes() != k.sizes() || q.strides() != k.strides() ||
      q.scalar_type() != k.scalar_type())
    return false;
  if (!ri && !ci) return true;
  if (ri && ci)
    return ri->numel() == ci->numel() &&
           (ri->is_same(*ci) ||
            std::equal(ri->data_ptr<int32_t>(), ri->data_ptr<int32_t>() + ri->numel(), ci->data_ptr<int32_t>()));
  return ri ? is_identity(*ri, k.size(0)) : is_identity(*ci, q.size(0));
}

// Tile pairs (I, J), I <= J, of the nb symmetric blocks, in row-major order, that hold an allowed
// entry: the columns some row of I allows meet block J, or those of a row of J meet block I.  The
// others contribute to no row (e.g. absent items listed last, with empty ranges, see
// losses/_present_first.py), so the parts share only the live pairs.
inline std::vector<std::pair<int32_t, int32_t>> tile_pairs(const Masks& mk, int64_t B, int64_t nb) {
  std::vector<std::pair<int64_t, int64_t>> allowed(nb);
  for (int64_t I = 0; I < nb; ++I) allowed[I] = block_col_range(mk, I * kSymBlock, std::min(kSymBlock, B - I * kSymBlock));
  auto meets = [&](int64_t I, int64_t J) {
    const int64_t c0 = J * kSymBlock, c1 = std::min(B, c0 + kSymBlock);
    return allowed[I].first < c1 && c0 < allowed[I].second;
  };
  std::vector<std::pair<int32_t, int32_t>> v;
  v.reserve(nb * (nb + 1) / 2);
  for (int64_t I = 0; I < nb; ++I)
    for (int64_t J = I; J < nb; ++J)
      if (meets(I, J) || meets(J, I)) v.emplace_back(int32_t(I), int32_t(J));
  return v;
}

// First row block of each of the P parts (P + 1 entries, the last nb), balanced by work: a block
// costs its rows × the span of columns they allow, plus 1 (so empty blocks are spread too).  Rows
// that allow no column cost nothing, so present-first lists with empty ranges for the absent rows
// keep every thread busy.  Without masks this is the even split of the blocks.
inline std::vector<int64_t> balanced_blocks(const Masks& mk, int64_t B, int64_t RB, int64_t nb, int64_t P) {
  std::vector<double> cum(nb + 1, 0.0);
  for (int64_t blk = 0; blk < nb; ++blk) {
    const int64_t r0 = blk * RB, br = std::min(RB, B - r0);
    const auto [lo, hi] = block_col_range(mk, r0, br);
    cum[blk + 1] = cum[blk] + double(br) * double(hi - lo) + 1.0;
  }
  std::vector<int64_t> first(P + 1, nb);
  first[0] = 0;
  for (int64_t p = 1; p < P; ++p) {
    const double target = cum[nb] * double(p) / double(P);
    const int64_t i = int64_t(std::lower_bound(cum.begin(), cum.end(), target) - cum.begin());
    first[p] = std::clamp<int64_t>(i, first[p - 1], nb);
  }
  return first;
}

// Column-view mask arrays of rows gj0 .. gj0+n-1 (see ColView).
struct ColViewBuf {
  std::vector<int32_t> cs, ce, x0, x1;
  ColView fill(const Masks& mk, const RowRange& rr, int64_t gj0, int64_t n) {
    cs.resize(n);
    ce.resize(n);
    x0.resize(n);
    x1.resize(n);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t gj = gj0 + j;
      cs[j] = rr.cs ? rr.cs[gj] : 0;
      ce[j] = rr.ce ? rr.ce[gj] : int32_t(mk.M);
      x0[j] = rr.E > 0 ? rr.ex[gj * rr.E] : -1;
      x1[j] = rr.E > 1 ? rr.ex[gj * rr.E + 1] : -1;
    }
    return {cs.data(), ce.data(), x0.data(), x1.data()};
  }
};

// Row view of a tile row: allowed [lo, hi) and up to two holes (-1: none), tile coordinates.
inline void row_view(const RowRange& rr, int64_t gi, int64_t c0, int64_t bc, int32_t& lo, int32_t& hi, int32_t& h0,
                     int32_t& h1) {
  int64_t l, h;
  rr.get(gi, c0, bc, l, h);
  lo = int32_t(l);
  hi = int32_t(h);
  h0 = h1 = -1;
  if (rr.E > 0) {
    const int64_t j = int64_t(rr.ex[gi * rr.E]) - c0;
    if (j >= 0 && j < bc) h0 = int32_t(j);
  }
  if (rr.E > 1) {
    const int64_t j = int64_t(rr.ex[gi * rr.E + 1]) - c0;
    if (j >= 0 && j < bc) h1 = int32_t(j);
  }
}

template <typename T>
T finish(T m, T s) {
  return s > 0 ? m + std::log(s) : neg_inf<T>();
}

// ---- forward ----

template <typename T>
void fwd_general(const T* Q, const T* K, int64_t B, int64_t M, int64_t D, T scale, T R, bool fast, const Masks& mk,
                 bool want_col, T* row_lse, T* col_lse) {
  const int64_t RB = general_row_block(mk, B), nb = (B + RB - 1) / RB;
  const int64_t P = num_parts(nb, std::numeric_limits<int64_t>::max());
  const int64_t Mc = want_col ? M : 0;
  std::vector<T> cm(P * Mc, fast ? R : neg_inf<T>()), cs(P * Mc, T(0));
  const RowRange rr(mk);
  const auto first = balanced_blocks(mk, B, RB, nb, P);
  run_parts(P, [&](int64_t p) {
    std::vector<T> gbuf(std::min(B, RB) * std::min(M, kColBlock));
    std::vector<T> rm(RB), rs(RB);
    std::vector<int64_t> hb(std::max<int64_t>(rr.E, 1));
    T* pcm = cm.data() + p * Mc;
    T* pcs = cs.data() + p * Mc;
    T* g = gbuf.data();
    for (int64_t blk = first[p]; blk < first[p + 1]; ++blk) {
      const int64_t r0 = blk * RB, br = std::min(RB, B - r0);
      auto [lo, hi] = block_col_range(mk, r0, br);
      std::fill(rm.begin(), rm.end(), fast ? R : neg_inf<T>());
      std::fill(rs.begin(), rs.end(), T(0));
      for (int64_t c0 = lo; c0 < hi; c0 += kColBlock) {
        const int64_t bc = std::min(kColBlock, hi - c0);
        blas::nt(g, Q + r0 * D, K + c0 * D, br, bc, D);
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          T* gp = g + i * bc;
          int64_t l, h;
          rr.get(gi, c0, bc, l, h);
          const int64_t nh = holes(rr, gi, c0, l, h, hb.data());
          if (fast) {
            T sum = 0;
            for_segments(l, h, hb.data(), nh, [&](int64_t a, int64_t b) {
              sum += fwd_seg(gp + a, want_col ? pcs + c0 + a : nullptr, b - a, scale, R);
            });
            rs[i] += sum;
          } else {
            scale_mask(gp, bc, l, h, scale);
            for (int64_t x = 0; x < nh; ++x) gp[hb[x]] = neg_inf<T>();
            if (l >= h) continue;
            const T m = vmax(gp + l, h - l);
            if (m != neg_inf<T>()) lse_merge(rm[i], rs[i], m, sumexp(gp + l, h - l, m));
          }
        }
        if (!fast && want_col) {
          // Columns of the masked tile: max over the rows, then the sum of exponentials, per strip.
          constexpr int64_t W = 256;
          T tm[W], ts[W];
          for (int64_t j0 = 0; j0 < bc; j0 += W) {
            const int64_t n = std::min(W, bc - j0);
            std::fill(tm, tm + n, neg_inf<T>());
            for (int64_t i = 0; i < br; ++i) colmax(g + i * bc + j0, tm, n);
            for (int64_t j = 0; j < n; ++j) {
              ts[j] = 0;
              if (tm[j] == neg_inf<T>()) tm[j] = 0;  // no allowed entry: every exp below is exp(-inf) = 0
            }
            for (int64_t i = 0; i < br; ++i) colsumexp(g + i * bc + j0, tm, ts, n);
            for (int64_t j = 0; j < n; ++j)
              if (ts[j] > 0) lse_merge(pcm[c0 + j0 + j], pcs[c0 + j0 + j], tm[j], ts[j]);
          }
        }
      }
      for (int64_t i = 0; i < br; ++i) row_lse[r0 + i] = finish(rm[i], rs[i]);
    }
  });
  if (!want_col) return;
  at::parallel_for(0, M, 1024, [&](int64_t b, int64_t e) {
    for (int64_t j = b; j < e; ++j) {
      T m = cm[j], s = cs[j];
      for (int64_t p = 1; p < P; ++p) {
        if (fast) {
          s += cs[p * M + j];
        } else if (cs[p * M + j] > 0) {
          lse_merge(m, s, cm[p * M + j], cs[p * M + j]);
        }
      }
      col_lse[j] = finish(m, s);
    }
  });
}

// Symmetric Gram, fast epilogue only, no column LSE, at most two exclusions per row.
template <typename T>
void fwd_symmetric(const T* Z, int64_t B, int64_t D, T scale, T R, const Masks& mk, T* row_lse) {
  const int64_t nb = (B + kSymBlock - 1) / kSymBlock;
  const auto pairs = tile_pairs(mk, B, nb);
  const int64_t np = int64_t(pairs.size());
  const int64_t P = num_parts(np, std::numeric_limits<int64_t>::max());
  std::vector<T> rs(P * B, T(0));
  const RowRange rr(mk);
  run_parts(P, [&](int64_t p) {
    std::vector<T> gbuf(std::min(B, kSymBlock) * std::min(B, kSymBlock));
    std::vector<int64_t> hb(std::max<int64_t>(rr.E, 1));
    ColViewBuf cvb;
    T* prs = rs.data() + p * B;
    T* g = gbuf.data();
    auto [t0, t1] = part_range(p, P, np);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = pairs[t].first * kSymBlock, c0 = pairs[t].second * kSymBlock;
      const int64_t br = std::min(kSymBlock, B - r0), bc = std::min(kSymBlock, B - c0);
      blas::nt(g, Z + r0 * D, Z + c0 * D, br, bc, D);
      if (r0 == c0) {  // diagonal tile: rows only
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          int64_t l, h;
          rr.get(gi, c0, bc, l, h);
          const int64_t nh = holes(rr, gi, c0, l, h, hb.data());
          T sum = 0;
          for_segments(l, h, hb.data(), nh,
                       [&](int64_t a, int64_t b) { sum += fwd_seg(g + i * bc + a, (T*)nullptr, b - a, scale, R); });
          prs[gi] += sum;
        }
      } else {
        const ColView cv = cvb.fill(mk, rr, c0, bc);
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          int32_t lo, hi, h0, h1;
          row_view(rr, gi, c0, bc, lo, hi, h0, h1);
          prs[gi] += sym_fwd_row(g + i * bc, prs + c0, int32_t(bc), scale, R, lo, hi, h0, h1, cv.cs, cv.ce, cv.x0,
                                 cv.x1, int32_t(gi));
        }
      }
    }
  });
  at::parallel_for(0, B, 1024, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      T s = rs[i];
      for (int64_t p = 1; p < P; ++p) s += rs[p * B + i];
      row_lse[i] = finish(R, s);
    }
  });
}

std::tuple<Tensor, Tensor> sim_lse_fwd_rows(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const OptTensor& row_index, const OptTensor& col_index,
                                            const OptTensor& col_start, const OptTensor& col_end,
                                            const OptTensor& exclude, bool want_col) {
  auto [B, M] = check_sim_lse_args(q, k, scale, row_index, col_index, col_start, col_end, exclude);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const Tensor Q = gather_rows(q, row_index, acc);
  const bool sym = !want_col && same_rows(q, k, row_index, col_index) && (!exclude || exclude->size(1) <= 2);
  const Tensor K = sym ? Q : gather_rows(k, col_index, acc);
  const Masks masks{col_start, col_end, exclude, M};
  const int64_t D = Q.size(1);
  Tensor row_lse = at::empty({B}, opts);
  Tensor col_lse = at::empty({want_col ? M : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES(acc, "sim_lse_fwd_cpu", [&] {
    using T = scalar_t;
    const double sc = scale.to(acc).item<double>();
    const double R = shift_bound(Q, K, sc);
    const bool fast = R <= kFastR<T>;
    const bool use_sym = sym && fast;
    g_last_fwd_path = (fast ? kPathFast : 0) | (use_sym ? kPathSymmetric : 0);
    if (use_sym) {
      fwd_symmetric<T>(Q.data_ptr<T>(), B, D, T(sc), T(R), masks, row_lse.data_ptr<T>());
    } else {
      fwd_general<T>(Q.data_ptr<T>(), K.data_ptr<T>(), B, M, D, T(sc), T(R), fast, masks, want_col,
                     row_lse.data_ptr<T>(), col_lse.data_ptr<T>());
    }
  });
  return {row_lse, col_lse};
}

// ---- backward ----

// dQ (B × D) and dK (M × D) raw (not yet times scale); returns dscale.
template <typename T>
double bwd_general(const T* Q, const T* K, int64_t B, int64_t M, int64_t D, T scale, T R, bool fast, const Masks& mk,
                   const T* rl, const T* gr, const T* cl, const T* gc, bool has_col, const T* a, const T* b, T* dQ,
                   T* dK) {
  const int64_t RB = general_row_block(mk, B), nb = (B + RB - 1) / RB;
  // Each part beyond the first holds an M × D dK accumulator: cap them at B/(8D) parts
  // (≤ 1/8 of the B × M matrix a dense backward stores), two at least.
  const int64_t P = num_parts(nb, std::max<int64_t>(2, B / std::max<int64_t>(8 * D, 1)));
  std::vector<T> dk_extra((P - 1) * M * D, T(0));
  std::vector<double> dsc(P, 0.0);
  const RowRange rr(mk);
  const auto first = balanced_blocks(mk, B, RB, nb, P);
  run_parts(P, [&](int64_t p) {
    std::vector<T> gbuf(std::min(B, RB) * std::min(M, kColBlock));
    std::vector<int64_t> hb(std::max<int64_t>(rr.E, 1));
    T* g = gbuf.data();
    T* dKp = p == 0 ? dK : dk_extra.data() + (p - 1) * M * D;
    double dot_total = 0;
    for (int64_t blk = first[p]; blk < first[p + 1]; ++blk) {
      const int64_t r0 = blk * RB, br = std::min(RB, B - r0);
      auto [lo, hi] = block_col_range(mk, r0, br);
      for (int64_t c0 = lo; c0 < hi; c0 += kColBlock) {
        const int64_t bc = std::min(kColBlock, hi - c0);
        blas::nt(g, Q + r0 * D, K + c0 * D, br, bc, D);
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          T* gp = g + i * bc;
          int64_t l, h;
          rr.get(gi, c0, bc, l, h);
          std::fill(gp, gp + l, T(0));
          std::fill(gp + h, gp + bc, T(0));
          const int64_t nh = holes(rr, gi, c0, l, h, hb.data());
          T dot_row = 0;
          for_segments(l, h, hb.data(), nh, [&](int64_t s0, int64_t s1) {
            if (fast) {
              dot_row += bwd_seg(gp + s0, s1 - s0, scale, R, a[gi], has_col ? b + c0 + s0 : nullptr);
            } else {
              dot_row += bwd_exact_seg(gp + s0, s1 - s0, scale, gr[gi], rl[gi], has_col ? gc + c0 + s0 : nullptr,
                                       has_col ? cl + c0 + s0 : nullptr);
            }
          });
          for (int64_t x = 0; x < nh; ++x) gp[hb[x]] = 0;
          dot_total += dot_row;
        }
        blas::acc_nn(dQ + r0 * D, g, bc, K + c0 * D, br, bc, D);
        blas::acc_tn(dKp + c0 * D, g, bc, Q + r0 * D, br, bc, D);
      }
    }
    dsc[p] = dot_total;
  });
  if (P > 1) {
    at::parallel_for(0, M * D, 4096, [&](int64_t s, int64_t e) {
      for (int64_t p = 1; p < P; ++p) {
        const T* src = dk_extra.data() + (p - 1) * M * D;
        for (int64_t x = s; x < e; ++x) dK[x] += src[x];
      }
    });
  }
  double total = 0;
  for (double v : dsc) total += v;
  return total;
}

// Symmetric Gram with q and k one tensor: dZ = dQ + dK (raw); fast epilogue, no column terms.
template <typename T>
double bwd_symmetric(const T* Z, int64_t B, int64_t D, T scale, T R, const Masks& mk, const T* a, T* dZ) {
  const int64_t nb = (B + kSymBlock - 1) / kSymBlock;
  const auto pairs = tile_pairs(mk, B, nb);
  const int64_t np = int64_t(pairs.size());
  const int64_t P = num_parts(np, std::max<int64_t>(2, B / std::max<int64_t>(8 * D, 1)));
  std::vector<T> dz_extra((P - 1) * B * D, T(0));
  std::vector<double> dsc(P, 0.0);
  const RowRange rr(mk);
  run_parts(P, [&](int64_t p) {
    std::vector<T> gbuf(std::min(B, kSymBlock) * std::min(B, kSymBlock));
    std::vector<int64_t> hb(std::max<int64_t>(rr.E, 1));
    ColViewBuf cvb;
    T* g = gbuf.data();
    T* dZp = p == 0 ? dZ : dz_extra.data() + (p - 1) * B * D;
    double dot_total = 0;
    auto [t0, t1] = part_range(p, P, np);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = pairs[t].first * kSymBlock, c0 = pairs[t].second * kSymBlock;
      const int64_t br = std::min(kSymBlock, B - r0), bc = std::min(kSymBlock, B - c0);
      blas::nt(g, Z + r0 * D, Z + c0 * D, br, bc, D);
      if (r0 == c0) {  // diagonal tile: dS of the rows; dZ_I += (dS + dSᵀ) Z_I
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          T* gp = g + i * bc;
          int64_t l, h;
          rr.get(gi, c0, bc, l, h);
          std::fill(gp, gp + l, T(0));
          std::fill(gp + h, gp + bc, T(0));
          const int64_t nh = holes(rr, gi, c0, l, h, hb.data());
          T dot_row = 0;
          for_segments(l, h, hb.data(), nh,
                       [&](int64_t s0, int64_t s1) {
                         dot_row += bwd_seg(gp + s0, s1 - s0, scale, R, a[gi], (T*)nullptr);
                       });
          for (int64_t x = 0; x < nh; ++x) gp[hb[x]] = 0;
          dot_total += dot_row;
        }
        blas::acc_nn(dZp + r0 * D, g, bc, Z + c0 * D, br, bc, D);
        blas::acc_tn(dZp + c0 * D, g, bc, Z + r0 * D, br, bc, D);
      } else {  // C = dS_IJ + (dS_JI)ᵀ; dZ_I += C Z_J, dZ_J += Cᵀ Z_I
        const ColView cv = cvb.fill(mk, rr, c0, bc);
        for (int64_t i = 0; i < br; ++i) {
          const int64_t gi = r0 + i;
          int32_t lo, hi, h0, h1;
          row_view(rr, gi, c0, bc, lo, hi, h0, h1);
          dot_total += sym_bwd_row(g + i * bc, int32_t(bc), scale, R, a[gi], a + c0, lo, hi, h0, h1, cv.cs, cv.ce,
                                   cv.x0, cv.x1, int32_t(gi));
        }
        blas::acc_nn(dZp + r0 * D, g, bc, Z + c0 * D, br, bc, D);
        blas::acc_tn(dZp + c0 * D, g, bc, Z + r0 * D, br, bc, D);
      }
    }
    dsc[p] = dot_total;
  });
  if (P > 1) {
    at::parallel_for(0, B * D, 4096, [&](int64_t s, int64_t e) {
      for (int64_t p = 1; p < P; ++p) {
        const T* src = dz_extra.data() + (p - 1) * B * D;
        for (int64_t x = s; x < e; ++x) dZ[x] += src[x];
      }
    });
  }
  double total = 0;
  for (double v : dsc) total += v;
  return total;
}

// a_i = gr_i·exp(R - lse_i) (0 where lse = +inf); false if any is not finite.
template <typename T>
bool shifted_weights(const T* lse, const T* g, int64_t n, double R, T* out) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    const double v = double(g[i]) * std::exp(R - double(lse[i]));
    out[i] = T(v);
    ok = ok && std::isfinite(out[i]);
  }
  return ok;
}

std::tuple<Tensor, Tensor, Tensor> sim_lse_bwd_rows(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                    const OptTensor& row_index, const OptTensor& col_index,
                                                    const OptTensor& col_start, const OptTensor& col_end,
                                                    const OptTensor& exclude, const Tensor& row_lse,
                                                    const Tensor& col_lse, const Tensor& grad_row,
                                                    const Tensor& grad_col) {
  auto [B, M, has_col] = check_sim_lse_bwd_args(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                                                row_lse, col_lse, grad_row, grad_col);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const Tensor Q = gather_rows(q, row_index, acc);
  // One tensor as q and k: its gradient is dq + dk, computed once over the symmetric Gram.
  const bool sym = !has_col && q.is_same(k) && same_rows(q, k, row_index, col_index) &&
                   (!exclude || exclude->size(1) <= 2);
  const Tensor K = sym ? Q : gather_rows(k, col_index, acc);
  const Masks masks{col_start, col_end, exclude, M};
  const Tensor rl = safe_lse(row_lse.to(acc)), gr = grad_row.to(acc).contiguous();
  const Tensor cl = has_col ? safe_lse(col_lse.to(acc)) : col_lse.to(acc);
  const Tensor gc = has_col ? grad_col.to(acc).contiguous() : grad_col.to(acc);
  const int64_t D = Q.size(1);
  Tensor dQ = at::zeros({B, D}, opts);
  Tensor dK = sym ? Tensor() : at::zeros({M, D}, opts);
  double dscale = 0;
  bool summed = false;
  AT_DISPATCH_FLOATING_TYPES(acc, "sim_lse_bwd_cpu", [&] {
    using T = scalar_t;
    const double sc = scale.to(acc).item<double>();
    const double R = shift_bound(Q, K, sc);
    std::vector<T> a(B), b(has_col ? M : 0);
    bool fast = R <= kFastR<T> && shifted_weights(rl.data_ptr<T>(), gr.data_ptr<T>(), B, R, a.data());
    if (fast && has_col) fast = shifted_weights(cl.data_ptr<T>(), gc.data_ptr<T>(), M, R, b.data());
    summed = sym && fast;
    g_last_bwd_path = (fast ? kPathFast : 0) | (summed ? kPathSymmetric | kPathSummedGrad : 0);
    if (summed) {
      dscale = bwd_symmetric<T>(Q.data_ptr<T>(), B, D, T(sc), T(R), masks, a.data(), dQ.data_ptr<T>());
    } else {
      if (!dK.defined()) dK = at::zeros({M, D}, opts);
      dscale = bwd_general<T>(Q.data_ptr<T>(), K.data_ptr<T>(), B, M, D, T(sc), T(R), fast, masks,
                              rl.data_ptr<T>(), gr.data_ptr<T>(), has_col ? cl.data_ptr<T>() : nullptr,
                              has_col ? gc.data_ptr<T>() : nullptr, has_col, a.data(), b.data(), dQ.data_ptr<T>(),
                              dK.data_ptr<T>());
    }
  });
  const Tensor sc = scale.to(acc);
  dQ.mul_(sc);
  Tensor dq = scatter_rows(dQ, row_index, q);
  Tensor dk;
  if (summed) {
    dk = at::zeros_like(k);
  } else {
    dK.mul_(sc);
    dk = scatter_rows(dK, col_index, k);
  }
  return {dq, dk, at::full({}, dscale, opts).to(scale.scalar_type())};
}

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "contrastive_ops (cpu kernels): ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<Tensor, Tensor> sim_lse_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                           const OptTensor& row_index, const OptTensor& col_index,
                                           const OptTensor& col_start, const OptTensor& col_end,
                                           const OptTensor& exclude, bool want_col) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  return sim_lse_fwd_rows(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col);
}

std::tuple<Tensor, Tensor, Tensor> sim_lse_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                   const OptTensor& row_index, const OptTensor& col_index,
                                                   const OptTensor& col_start, const OptTensor& col_end,
                                                   const OptTensor& exclude, const Tensor& row_lse,
                                                   const Tensor& col_lse, const Tensor& grad_row,
                                                   const Tensor& grad_col) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  return sim_lse_bwd_rows(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                                   grad_row, grad_col);
}

Tensor siglip_fwd_cpu(const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias) {
  check_cpu(x, "x");
  return siglip_fwd_tiled<CpuDev>(x, y, scale, bias);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd_cpu(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                          const Tensor& bias, const Tensor& grad) {
  check_cpu(x, "x");
  return siglip_bwd_tiled<CpuDev>(x, y, scale, bias, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("sim_lse_fwd", &sim_lse_fwd_cpu);
  m.impl("sim_lse_bwd", &sim_lse_bwd_cpu);
  m.impl("siglip_fwd", &siglip_fwd_cpu);
  m.impl("siglip_bwd", &siglip_bwd_cpu);
}

// Test hook: the epilogue flags (1 shifted exponentials, 2 symmetric Gram, 4 dq holds dq + dk)
// of the last CPU sim_lse_fwd (backward=False) or sim_lse_bwd call; -1 before any.
// _cpu_last_threads: how many threads ran the parts of the last row-block kernel call.
TORCH_LIBRARY_FRAGMENT(contrastive_ops, m) {
  m.def("_cpu_last_path(bool backward) -> int",
        [](bool backward) -> int64_t { return backward ? g_last_bwd_path.load() : g_last_fwd_path.load(); });
  m.def("_cpu_last_threads() -> int", []() -> int64_t { return g_last_threads.load(); });
}

}  // namespace contrastive_ops
