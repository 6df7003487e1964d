// Argument checks of the swav_ce_fwd / swav_ce_bwd ops (maths in csrc/cpu/swav_ce.cpp), shared by
// the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "acc_dtype.h"

namespace contrastive_ops {
// Internal linkage: compiled by g++ and by nvcc, a weak copy from one must not replace the other's.
namespace {

// x (B, K ≥ 1) floating; t like x in the accumulation type; scale 0-dim in the accumulation type.
inline void check_swav_ce_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& scale, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (B, K), got shape ", x.sizes());
  TORCH_CHECK(x.size(1) > 0, op, ": x must have K >= 1 columns, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": t must have the shape of x ", x.sizes(), ", got ", t.sizes());
  const auto acc = acc_dtype(x.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, op, ": t must be ", acc, " for x of dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(scale.dim() == 0 && scale.scalar_type() == acc, op, ": scale must be a 0-dim ", acc,
              " tensor, got shape ", scale.sizes(), " and dtype ", scale.scalar_type());
}

inline void check_swav_ce_bwd_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& scale,
                                   const at::Tensor& lse, const at::Tensor& grad) {
  check_swav_ce_args(x, t, scale, "swav_ce_bwd");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == x.size(0), "swav_ce_bwd: lse must have shape (", x.size(0),
              ",), got ", lse.sizes());
  TORCH_CHECK(grad.dim() == 0, "swav_ce_bwd: grad must be 0-dim, got shape ", grad.sizes());
}

}  // namespace

}  // namespace contrastive_ops
