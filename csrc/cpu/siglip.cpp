// CPU kernels of the SigLIP pair sum (primitive "siglip"; maths in
// contrastive_ops/primitives/siglip_pairs.py).
//
// The device-generic tiling of csrc/tiling.h with multithreaded ATen GEMMs on
// tiles and epilogues parallel over the rows of a tile with at::parallel_for.
// Tiles are fp32 (float64 for float64 inputs); fp16/bf16 inputs are upcast
// once to fp32 copies of X and Y (O(B·D)).  The loops are vectorizable
// templates, compiled per ISA through the CO_MULTIVERSION wrappers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../tiling.h"
#include "fastmath.h"

namespace contrastive_ops {
namespace {

using fastmath::fast_sigmoid;
using fastmath::fast_softplus;

// Independent accumulators per reduction: lets the compiler vectorize a
// reduction without reassociating floating-point sums (no -ffast-math).
constexpr int64_t L = 16;

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
CO_MULTIVERSION float softplus_sum(const float* g, int64_t n, float scale, float bias) {
  return softplus_sum_t(g, n, scale, bias);
}
CO_MULTIVERSION void sigmoid_row(const float* g, float* dl, int64_t n, float scale, float bias, float grad,
                                 float* sums) {
  sigmoid_row_t(g, dl, n, scale, bias, grad, sums);
}
inline double softplus_sum(const double* g, int64_t n, double scale, double bias) {
  return softplus_sum_t(g, n, scale, bias);
}
inline void sigmoid_row(const double* g, double* dl, int64_t n, double scale, double bias, double grad,
                        double* sums) {
  sigmoid_row_t(g, dl, n, scale, bias, grad, sums);
}

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

void check_cpu(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "contrastive_ops (cpu kernels): ", name, " must be a CPU tensor, got ", t.device());
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
  m.impl("siglip_fwd", &siglip_fwd_cpu);
  m.impl("siglip_bwd", &siglip_bwd_cpu);
}

}  // namespace contrastive_ops
