// The accumulation dtype of every kernel: float64 for float64 inputs, fp32 otherwise.
#pragma once

#include <ATen/ATen.h>

namespace contrastive_ops {

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace contrastive_ops
