// CPU kernels of the similarity-LSE core (primitive "sim_lse"; maths in
// contrastive_ops/primitives/sim_lse.py).
//
// Row-block kernels (described below, "similarity-LSE core: row-block
// kernels"): one part per thread, single-threaded BLAS on cache-sized tiles
// (csrc/cpu/blas.h), fused epilogues (csrc/cpu/lse_epilogue.h), symmetric Gram
// when q is k.  Tiles are fp32 (float64 for float64 inputs); fp16/bf16 inputs
// are upcast once to fp32 copies of Q and K (O((B+M)·D)).
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
#include "lse_epilogue.h"

namespace contrastive_ops {
namespace {

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
// Row threshold (row_max, see csrc/tiling.h Masks): every epilogue compares the rounded product
// s = scale·g it exponentiates with thr_i = row_max[i] and drops the pair when s > thr_i.  The
// forward and the backward of the general path form each tile with the same GEMM call (the same
// row blocks, column blocks and operands), so they drop the same pairs.  With a threshold the
// symmetric Gram below is not used: there entry (j, i) of row j is read from tile (I, J), and the
// backward may take the general path (it does when its shifted weights are not finite), which
// would read it from tile (J, I) and could decide a tie at the threshold the other way.
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

// ---- forward ----

// thr_i = row_max[i] (+inf without a threshold).
template <typename T>
inline T row_thr(const T* thr, int64_t gi) {
  return thr ? thr[gi] : std::numeric_limits<T>::infinity();
}

template <typename T>
void fwd_general(const T* Q, const T* K, int64_t B, int64_t M, int64_t D, T scale, T R, bool fast, const Masks& mk,
                 const T* thr, bool want_col, T* row_lse, T* col_lse) {
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
              sum += fwd_seg(gp + a, want_col ? pcs + c0 + a : nullptr, b - a, scale, R, row_thr(thr, gi));
            });
            rs[i] += sum;
          } else {
            scale_mask(gp, bc, l, h, scale, row_thr(thr, gi));
            for (int64_t x = 0; x < nh; ++x) gp[hb[x]] = neg_inf<T>();
            if (l >= h) continue;
            T m = vmax(gp + l, h - l);
            if (m == neg_inf<T>()) m = nan_among(gp + l, h - l);  // a NaN logit alone among masked ones
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
              if (!(ts[j] <= 0)) lse_merge(pcm[c0 + j0 + j], pcs[c0 + j0 + j], tm[j], ts[j]);  // NaN merged
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
        } else if (!(cs[p * M + j] <= 0)) {  // a NaN partial is merged too
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
                       [&](int64_t a, int64_t b) {
                         sum += fwd_seg(g + i * bc + a, (T*)nullptr, b - a, scale, R, std::numeric_limits<T>::infinity());
                       });
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

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "contrastive_ops (cpu kernels): ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<Tensor, Tensor> sim_lse_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const OptTensor& row_index, const OptTensor& col_index,
                                            const OptTensor& col_start, const OptTensor& col_end,
                                            const OptTensor& exclude, bool want_col, const OptTensor& row_max) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  auto [B, M] = check_sim_lse_args(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_max);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const Tensor Q = gather_rows(q, row_index, acc);
  const bool sym = !want_col && !row_max && same_rows(q, k, row_index, col_index) &&
                   (!exclude || exclude->size(1) <= 2);
  const Tensor K = sym ? Q : gather_rows(k, col_index, acc);
  const Masks masks{col_start, col_end, exclude, M, acc_row_max(row_max, acc)};
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
      fwd_general<T>(Q.data_ptr<T>(), K.data_ptr<T>(), B, M, D, T(sc), T(R), fast, masks,
                     masks.row_max ? masks.row_max->data_ptr<T>() : nullptr, want_col, row_lse.data_ptr<T>(),
                     col_lse.data_ptr<T>());
    }
  });
  return {row_lse, col_lse};
}

// ---- backward ----

// Backward, tile row gi: zeroes the entries outside its allowed range [l, h) (set here) and lists
// its excluded positions inside it in hb; returns their count.
template <typename T>
inline int64_t zero_outside(const RowRange& rr, int64_t gi, int64_t c0, int64_t bc, T* gp, int64_t* hb, int64_t& l,
                            int64_t& h) {
  rr.get(gi, c0, bc, l, h);
  std::fill(gp, gp + l, T(0));
  std::fill(gp + h, gp + bc, T(0));
  return holes(rr, gi, c0, l, h, hb);
}

// Adds the gradient partials of parts 1 .. P-1 (``extra``, n entries each) into ``dst`` (part 0's),
// in part order; returns the sum of the parts' dscale partials.
template <typename T>
double reduce_parts(T* dst, const std::vector<T>& extra, int64_t n, const std::vector<double>& dsc) {
  const int64_t P = int64_t(dsc.size());
  if (P > 1) {
    at::parallel_for(0, n, 4096, [&](int64_t s, int64_t e) {
      for (int64_t p = 1; p < P; ++p) {
        const T* src = extra.data() + (p - 1) * n;
        for (int64_t x = s; x < e; ++x) dst[x] += src[x];
      }
    });
  }
  double total = 0;
  for (double v : dsc) total += v;
  return total;
}

// dQ (B × D) and dK (M × D) raw (not yet times scale); returns dscale.
template <typename T>
double bwd_general(const T* Q, const T* K, int64_t B, int64_t M, int64_t D, T scale, T R, bool fast, const Masks& mk,
                   const T* thr, const T* rl, const T* gr, const T* cl, const T* gc, bool has_col, const T* a, const T* b, T* dQ,
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
          const int64_t nh = zero_outside(rr, gi, c0, bc, gp, hb.data(), l, h);
          T dot_row = 0;
          for_segments(l, h, hb.data(), nh, [&](int64_t s0, int64_t s1) {
            if (fast) {
              dot_row += bwd_seg(gp + s0, s1 - s0, scale, R, a[gi], has_col ? b + c0 + s0 : nullptr,
                                 row_thr(thr, gi));
            } else {
              dot_row += bwd_exact_seg(gp + s0, s1 - s0, scale, gr[gi], rl[gi], has_col ? gc + c0 + s0 : nullptr,
                                       has_col ? cl + c0 + s0 : nullptr, row_thr(thr, gi));
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
  return reduce_parts(dK, dk_extra, M * D, dsc);
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
          const int64_t nh = zero_outside(rr, gi, c0, bc, gp, hb.data(), l, h);
          T dot_row = 0;
          for_segments(l, h, hb.data(), nh,
                       [&](int64_t s0, int64_t s1) {
                         dot_row += bwd_seg(gp + s0, s1 - s0, scale, R, a[gi], (T*)nullptr, std::numeric_limits<T>::infinity());
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
  return reduce_parts(dZ, dz_extra, B * D, dsc);
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

std::tuple<Tensor, Tensor, Tensor> sim_lse_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                    const OptTensor& row_index, const OptTensor& col_index,
                                                    const OptTensor& col_start, const OptTensor& col_end,
                                                    const OptTensor& exclude, const Tensor& row_lse,
                                                    const Tensor& col_lse, const Tensor& grad_row,
                                                    const Tensor& grad_col, const OptTensor& row_max) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  auto [B, M, has_col] = check_sim_lse_bwd_args(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                                                row_lse, col_lse, grad_row, grad_col, row_max);
  const auto acc = acc_dtype(q.scalar_type());
  const auto opts = q.options().dtype(acc);
  const Tensor Q = gather_rows(q, row_index, acc);
  // One tensor as q and k: its gradient is dq + dk, computed once over the symmetric Gram.
  const bool sym = !has_col && !row_max && q.is_same(k) && same_rows(q, k, row_index, col_index) &&
                   (!exclude || exclude->size(1) <= 2);
  const Tensor K = sym ? Q : gather_rows(k, col_index, acc);
  const Masks masks{col_start, col_end, exclude, M, acc_row_max(row_max, acc)};
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
                              masks.row_max ? masks.row_max->data_ptr<T>() : nullptr, rl.data_ptr<T>(), gr.data_ptr<T>(), has_col ? cl.data_ptr<T>() : nullptr,
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

}  // namespace

TORCH_LIBRARY_IMPL(contrastive_ops, CPU, m) {
  m.impl("sim_lse_fwd", &sim_lse_fwd_cpu);
  m.impl("sim_lse_bwd", &sim_lse_bwd_cpu);
}

// Test hooks (schemas in csrc/ops.cpp).
TORCH_LIBRARY_FRAGMENT(contrastive_ops, m) {
  m.impl("_cpu_last_path",
         [](bool backward) -> int64_t { return backward ? g_last_bwd_path.load() : g_last_fwd_path.load(); });
  m.impl("_cpu_last_threads", []() -> int64_t { return g_last_threads.load(); });
}

}  // namespace contrastive_ops