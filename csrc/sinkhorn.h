// Shared by the CPU and CUDA Sinkhorn-Knopp ops (csrc/cpu/sinkhorn.cpp, csrc/cuda/sinkhorn.cu):
// the argument checks, and SwAV's loop in the log domain on a device's col_lse / codes steps
// (maths in contrastive_ops/primitives/sinkhorn.py).
#pragma once

#include <ATen/ATen.h>

#include "acc_dtype.h"

#include <cmath>

namespace contrastive_ops {
// Internal linkage: compiled by g++ and by nvcc, a weak copy from one must not replace the other's.
namespace {

inline void check_sinkhorn_scores(const at::Tensor& scores, double epsilon, const char* op) {
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D (B, K), got shape ", scores.sizes());
  TORCH_CHECK(scores.size(0) > 0 && scores.size(1) > 0, op, ": scores must be non-empty, got shape ",
              scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), op, ": scores must be floating point, got ",
              scores.scalar_type());
  TORCH_CHECK(epsilon > 0 && std::isfinite(epsilon), op, ": epsilon must be a finite float > 0, got ", epsilon);
}

// The column potentials v of a (B, K) problem as the kernels read them: (K,), contiguous, in the
// accumulation dtype on the scores' device; undefined when absent (col_lse without v).
inline at::Tensor sinkhorn_potentials(const c10::optional<at::Tensor>& v_in, const at::Tensor& scores, int64_t K,
                                      at::ScalarType acc, const char* op) {
  if (!v_in.has_value() || !v_in->defined()) return at::Tensor();
  TORCH_CHECK(v_in->dim() == 1 && v_in->size(0) == K, op, ": v must have shape (", K, ",), got ", v_in->sizes());
  return v_in->to(scores.device(), acc).contiguous();
}

// col_lse(v) -> (K,) LSE_b(L[b,k] + u[b]) (u from v, 0 without v); codes(v, normalize) -> (B, K).
// `iterations` fused passes, then one pass writing the codes; for 0 iterations B·exp(L − LSE_{b,k} L).
template <class ColLse, class Codes>
at::Tensor sinkhorn_log_domain(int64_t B, int64_t K, int64_t iterations, const ColLse& col_lse, const Codes& codes) {
  if (iterations == 0) {
    const at::Tensor total = at::logsumexp(col_lse(c10::optional<at::Tensor>()), {0});
    return codes((std::log(static_cast<double>(B)) - total).expand({K}), false);
  }
  c10::optional<at::Tensor> v;
  for (int64_t t = 0; t < iterations; ++t) v = col_lse(v).neg_();
  return codes(*v, true);
}

}  // namespace

}  // namespace contrastive_ops
