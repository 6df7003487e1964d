// CPU kernels of the similarity-LSE core and the SigLIP pair sum: the tiling of
// csrc/tiling.h with BLAS GEMMs on tiles (ATen, multithreaded) and epilogues
// that are vectorizable loops, parallel over the rows (or column chunks) of a
// tile with at::parallel_for.  Tiles are fp32 (float64 for float64 inputs);
// fp16/bf16 inputs are upcast once to fp32 copies of Q and K (O((B+M)·D)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../tiling.h"
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
inline void scale_mask_t(T* p, int64_t n, int64_t lo, int64_t hi, T scale) {
  for (int64_t j = 0; j < lo; ++j) p[j] = neg_inf<T>();
  for (int64_t j = lo; j < hi; ++j) p[j] *= scale;
  for (int64_t j = hi; j < n; ++j) p[j] = neg_inf<T>();
}

template <typename T>
inline T max_t(const T* p, int64_t n) {
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
inline T sumexp_t(const T* p, int64_t n, T m) {
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
inline void colmax_t(const T* p, T* m, int64_t n) {
  for (int64_t j = 0; j < n; ++j) m[j] = p[j] > m[j] ? p[j] : m[j];
}

// s[j] += exp(p[j] - m[j]) with m finite (callers pass 0 for columns still at -inf).
template <typename T>
inline void colsumexp_t(const T* p, const T* m, T* s, int64_t n) {
  for (int64_t j = 0; j < n; ++j) s[j] += fast_exp(p[j] - m[j]);
}

// ds[j] = gr·exp(scale·g[j] - rl) [+ gc[j]·exp(scale·g[j] - cl[j])].
// rl / cl are +inf where the LSE was -inf, which makes the term 0.  Excluded
// entries may overflow here; the caller zeroes them before using ds.
template <typename T>
inline void ds_row_t(const T* g, T* ds, int64_t n, T scale, T gr, T rl, const T* gc, const T* cl, bool has_col) {
  if (has_col) {
    for (int64_t j = 0; j < n; ++j) {
      const T s = scale * g[j];
      ds[j] = gr * fast_exp(s - rl) + gc[j] * fast_exp(s - cl[j]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) ds[j] = gr * fast_exp(scale * g[j] - rl);
  }
}

// Σ_j a[j]·b[j].
template <typename T>
inline T dot_t(const T* a, const T* b, int64_t n) {
  T acc[L] = {};
  int64_t j = 0;
  for (; j + L <= n; j += L)
    for (int64_t l = 0; l < L; ++l) acc[l] += a[j + l] * b[j + l];
  T s = 0;
  for (; j < n; ++j) s += a[j] * b[j];
  for (int64_t l = 0; l < L; ++l) s += acc[l];
  return s;
}

// Σ_j softplus(scale·g[j] + bias).
template <typename T>
inline T softplus_sum_t(const T* g, int64_t n, T scale, T bias) {
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
inline void sigmoid_row_t(const T* g, T* dl, int64_t n, T scale, T bias, T grad, T* sums) {
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
CO_MULTIVERSION void ds_row(const float* g, float* ds, int64_t n, float scale, float gr, float rl, const float* gc,
                            const float* cl, bool has_col) {
  ds_row_t(g, ds, n, scale, gr, rl, gc, cl, has_col);
}
CO_MULTIVERSION float dot(const float* a, const float* b, int64_t n) { return dot_t(a, b, n); }
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
inline void ds_row(const double* g, double* ds, int64_t n, double scale, double gr, double rl, const double* gc,
                   const double* cl, bool has_col) {
  ds_row_t(g, ds, n, scale, gr, rl, gc, cl, has_col);
}
inline double dot(const double* a, const double* b, int64_t n) { return dot_t(a, b, n); }
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
  // A 512 × 2048 fp32 tile is 4 MiB (8 MiB with the backward's dS tile): big
  // enough for efficient multithreaded GEMMs (256-row tiles measured ~3x slower
  // per FLOP with MKL on 2 cores), small enough to stay near the last-level cache.
  static int64_t row_block(int64_t, int64_t, int64_t) { return 512; }
  static int64_t col_block(int64_t, int64_t, int64_t) { return 2048; }

  static void gemm_nt(Tensor& out, const Tensor& a, const Tensor& b) { at::mm_out(out, a, b.t()); }
  static void gemm_acc(Tensor& c, const Tensor& a, const Tensor& b) { c.addmm_(a, b); }

  // Union of the allowed column ranges of rows r0 .. r0+br-1: tiles outside it are skipped.
  static std::pair<int64_t, int64_t> col_range(const Masks& mk, int64_t r0, int64_t br) {
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

  static void lse_fwd_epilogue(Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk,
                               Tensor& row_m, Tensor& row_s, Tensor& col_m, Tensor& col_s, bool want_col) {
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "sim_lse_fwd_epilogue_cpu", [&] {
      lse_fwd<scalar_t>(G, scale.item<scalar_t>(), r0, c0, mk, row_m, row_s, col_m, col_s, want_col);
    });
  }

  template <typename T>
  static void lse_fwd(Tensor& G, T scale, int64_t r0, int64_t c0, const Masks& mk, Tensor& row_m, Tensor& row_s,
                      Tensor& col_m, Tensor& col_s, bool want_col) {
    const int64_t br = G.size(0), bc = G.size(1);
    T* g = G.data_ptr<T>();
    T* rm = row_m.data_ptr<T>();
    T* rs = row_s.data_ptr<T>();
    const RowRange rr(mk);
    // Rows: mask in place (the column pass reads the masked tile), then online max/sum.
    at::parallel_for(0, br, kRowGrain, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        T* p = g + i * bc;
        const int64_t gi = r0 + i;
        int64_t lo, hi;
        rr.get(gi, c0, bc, lo, hi);
        scale_mask(p, bc, lo, hi, scale);
        for (int64_t x = 0; x < rr.E; ++x) {
          const int64_t j = int64_t(rr.ex[gi * rr.E + x]) - c0;
          if (j >= lo && j < hi) p[j] = neg_inf<T>();
        }
        if (lo >= hi) continue;
        const T m = vmax(p + lo, hi - lo);
        if (m == neg_inf<T>()) continue;
        lse_merge(rm[gi], rs[gi], m, sumexp(p + lo, hi - lo, m));
      }
    });
    if (!want_col) return;
    // Columns: parallel over column chunks; each walks the tile's rows over a
    // contiguous strip (max first, then the sum of exponentials).
    T* cm = col_m.data_ptr<T>() + c0;
    T* cs = col_s.data_ptr<T>() + c0;
    constexpr int64_t W = 256;
    at::parallel_for(0, (bc + W - 1) / W, 1, [&](int64_t b, int64_t e) {
      T tm[W], ts[W];
      for (int64_t blk = b; blk < e; ++blk) {
        const int64_t j0 = blk * W, n = std::min(W, bc - j0);
        std::fill(tm, tm + n, neg_inf<T>());
        for (int64_t i = 0; i < br; ++i) colmax(g + i * bc + j0, tm, n);
        for (int64_t j = 0; j < n; ++j) {
          ts[j] = 0;
          if (tm[j] == neg_inf<T>()) tm[j] = 0;  // no allowed entry: every exp below is exp(-inf) = 0
        }
        for (int64_t i = 0; i < br; ++i) colsumexp(g + i * bc + j0, tm, ts, n);
        for (int64_t j = 0; j < n; ++j) {
          if (ts[j] > 0) lse_merge(cm[j0 + j], cs[j0 + j], tm[j], ts[j]);
        }
      }
    });
  }

  static void lse_bwd_epilogue(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0,
                               const Masks& mk, const Tensor& rl, const Tensor& gr, const Tensor& cl,
                               const Tensor& gc, bool has_col, Tensor& dscale) {
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "sim_lse_bwd_epilogue_cpu", [&] {
      const int64_t br = G.size(0), bc = G.size(1);
      const scalar_t* g = G.data_ptr<scalar_t>();
      scalar_t* ds = dS.data_ptr<scalar_t>();
      const scalar_t sc = scale.item<scalar_t>();
      const scalar_t* rlp = rl.data_ptr<scalar_t>();
      const scalar_t* grp = gr.data_ptr<scalar_t>();
      const scalar_t* clp = has_col ? cl.data_ptr<scalar_t>() + c0 : nullptr;
      const scalar_t* gcp = has_col ? gc.data_ptr<scalar_t>() + c0 : nullptr;
      const RowRange rr(mk);
      std::vector<double> part(br, 0.0);
      at::parallel_for(0, br, kRowGrain, [&](int64_t b, int64_t e) {
        for (int64_t i = b; i < e; ++i) {
          const int64_t gi = r0 + i;
          const scalar_t* gp = g + i * bc;
          scalar_t* dp = ds + i * bc;
          int64_t lo, hi;
          rr.get(gi, c0, bc, lo, hi);
          std::fill(dp, dp + lo, scalar_t(0));
          std::fill(dp + hi, dp + bc, scalar_t(0));
          if (lo >= hi) continue;
          ds_row(gp + lo, dp + lo, hi - lo, sc, grp[gi], rlp[gi], has_col ? gcp + lo : nullptr,
                 has_col ? clp + lo : nullptr, has_col);
          for (int64_t x = 0; x < rr.E; ++x) {
            const int64_t j = int64_t(rr.ex[gi * rr.E + x]) - c0;
            if (j >= lo && j < hi) dp[j] = 0;
          }
          const double acc = dot(dp + lo, gp + lo, hi - lo);  // dscale: Σ dS·G over the allowed pairs
          part[i] = acc;
        }
      });
      double total = 0;
      for (double v : part) total += v;
      dscale.add_(total);
    });
  }

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

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "contrastive_ops (cpu kernels): ", name, " must be a CPU tensor, got ", t.device());
}

std::tuple<Tensor, Tensor> sim_lse_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                           const OptTensor& row_index, const OptTensor& col_index,
                                           const OptTensor& col_start, const OptTensor& col_end,
                                           const OptTensor& exclude, bool want_col) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  return sim_lse_fwd_tiled<CpuDev>(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col);
}

std::tuple<Tensor, Tensor, Tensor> sim_lse_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                   const OptTensor& row_index, const OptTensor& col_index,
                                                   const OptTensor& col_start, const OptTensor& col_end,
                                                   const OptTensor& exclude, const Tensor& row_lse,
                                                   const Tensor& col_lse, const Tensor& grad_row,
                                                   const Tensor& grad_col) {
  check_cpu(q, "q");
  check_cpu(k, "k");
  return sim_lse_bwd_tiled<CpuDev>(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
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

}  // namespace contrastive_ops
