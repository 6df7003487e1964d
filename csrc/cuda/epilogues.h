// Launchers of the CUDA epilogue kernels (csrc/cuda/epilogues.cu), called by
// the tiling in csrc/cuda/sim_lse_cuda.cpp on tiles G = Q_blk K_blkᵀ that live on
// the current stream.  Scalars (scale, bias, grad, σ, the LSE arrays) stay device
// tensors: no host synchronization.  Every reduction goes through per-block
// partials merged in a fixed order (csrc/cuda/tile_math.cuh): results are
// bitwise reproducible run to run.
#pragma once

#include <ATen/ATen.h>

#include "../tiling.h"

namespace contrastive_ops {
namespace cuda {

// One read of the tile: S = scale·G under the masks (not written back); the
// tile's row (max, sum) merged into row_m/row_s and, with want_col, its column
// (max, sum) merged into col_m/col_s.
void lse_fwd(const Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk, Tensor& row_m,
             Tensor& row_s, Tensor& col_m, Tensor& col_s, bool want_col);
// dS = g_row·exp(S - row_lse) + g_col·exp(S - col_lse) on allowed pairs, 0 elsewhere, in one read
// of G; dscale += Σ dS·G.  (The tiling passes σ·g_row, σ·g_col for σ-scaled fp16 tiles.)
void lse_bwd(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk,
             const Tensor& rl, const Tensor& gr, const Tensor& cl, const Tensor& gc, bool has_col, Tensor& dscale);
// total += Σ softplus(-z·(scale·G + bias)).
void siglip_fwd(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0, Tensor& total);
// dL = grad·(σ(scale·G + bias) - [diagonal]); dscale += Σ dL·G, dbias += Σ dL.
void siglip_bwd(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias, const Tensor& grad, int64_t r0,
                int64_t c0, Tensor& dscale, Tensor& dbias);

}  // namespace cuda
}  // namespace contrastive_ops
