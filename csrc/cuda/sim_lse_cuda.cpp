// CUDA kernels of the similarity-LSE core and the SigLIP pair sum: the tiling
// of csrc/tiling.h with cuBLAS GEMMs on tiles (through ATen) and the epilogue
// kernels of csrc/cuda/epilogues.cu (one read of each tile, no float atomics).
//
// fp16/bf16 inputs stay in their dtype for the GEMMs (tensor cores) with fp32
// outputs (aten::mm.dtype, aten::addmm.dtype for the accumulating GEMMs); the
// backward dS tile is written in the input dtype, fp16 tiles scaled by a power
// of two so that small gradients keep their bits (ds_scale in csrc/tiling.h);
// everything else accumulates in fp32.  fp32 and float64 run in their own
// dtype, fp32 GEMMs in IEEE fp32 whatever the global TF32 switch.
//
// Tiles: chosen from (B, M) (cuda_tile_shape in csrc/tiling.h), or CONTRASTIVE_OPS_CUDA_TILE=rows,cols.
// Column tiles that no row of a row block may use (col_start/col_end) are skipped.
//
// Compiled and linked in CI on a machine without a GPU; exercised by the tests
// marked `gpu` where a CUDA device exists.  The same tiling and the same
// per-element maths run on CPU in CI through csrc/cpu/sim_lse_tiled.cpp.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tiling.h"
#include "epilogues.h"

namespace contrastive_ops {
namespace {

struct CudaDev {
  static at::ScalarType compute_dtype(at::ScalarType in) { return in; }
  static at::ScalarType ds_dtype(at::ScalarType in) { return in; }
  static int64_t row_block(int64_t B, int64_t M, int64_t D) { return cuda_tile_shape(B, M, D).first; }
  static int64_t col_block(int64_t B, int64_t M, int64_t D) { return cuda_tile_shape(B, M, D).second; }

  static void gemm_nt(Tensor& out, const Tensor& a, const Tensor& b) {
    if (a.scalar_type() == out.scalar_type()) {
      at::mm_out(out, a, b.t());
    } else {
      at::mm_out(out, a, b.t(), out.scalar_type());  // fp16/bf16 inputs, fp32 output
    }
  }
  static void gemm_acc(Tensor& c, const Tensor& a, const Tensor& b) {
    if (a.scalar_type() == c.scalar_type()) {
      c.addmm_(a, b);
    } else {
      at::addmm_out(c, c, a, b, c.scalar_type());  // fp16/bf16 operands, fp32 accumulator in place
    }
  }

  static void lse_fwd_epilogue(Tensor& G, const Tensor& scale, int64_t r0, int64_t c0, const Masks& mk,
                               Tensor& row_m, Tensor& row_s, Tensor& col_m, Tensor& col_s, bool want_col) {
    cuda::lse_fwd(G, scale, r0, c0, mk, row_m, row_s, col_m, col_s, want_col);
  }
  static void lse_bwd_epilogue(const Tensor& G, Tensor& dS, const Tensor& scale, int64_t r0, int64_t c0,
                               const Masks& mk, const Tensor& rl, const Tensor& gr, const Tensor& cl,
                               const Tensor& gc, bool has_col, Tensor& dscale) {
    cuda::lse_bwd(G, dS, scale, r0, c0, mk, rl, gr, cl, gc, has_col, dscale);
  }
  static void siglip_fwd_epilogue(const Tensor& G, const Tensor& scale, const Tensor& bias, int64_t r0, int64_t c0,
                                  Tensor& total) {
    cuda::siglip_fwd(G, scale, bias, r0, c0, total);
  }
  static void siglip_bwd_epilogue(const Tensor& G, Tensor& dL, const Tensor& scale, const Tensor& bias,
                                  const Tensor& grad, int64_t r0, int64_t c0, Tensor& dscale, Tensor& dbias) {
    cuda::siglip_bwd(G, dL, scale, bias, grad, r0, c0, dscale, dbias);
  }
};

void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "contrastive_ops (cuda kernels): ", name, " must be a CUDA tensor, got ", t.device());
}

std::tuple<Tensor, Tensor> sim_lse_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& scale,
                                            const OptTensor& row_index, const OptTensor& col_index,
                                            const OptTensor& col_start, const OptTensor& col_end,
                                            const OptTensor& exclude, bool want_col, const OptTensor& row_max) {
  check_cuda(q, "q");
  check_cuda(k, "k");
  const c10::cuda::CUDAGuard guard(q.device());
  const IeeeFp32Matmul ieee;
  return sim_lse_fwd_tiled<CudaDev>(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col,
                                    row_max);
}

std::tuple<Tensor, Tensor, Tensor> sim_lse_bwd_cuda(const Tensor& q, const Tensor& k, const Tensor& scale,
                                                    const OptTensor& row_index, const OptTensor& col_index,
                                                    const OptTensor& col_start, const OptTensor& col_end,
                                                    const OptTensor& exclude, const Tensor& row_lse,
                                                    const Tensor& col_lse, const Tensor& grad_row,
                                                    const Tensor& grad_col, const OptTensor& row_max) {
  check_cuda(q, "q");
  check_cuda(k, "k");
  const c10::cuda::CUDAGuard guard(q.device());
  const IeeeFp32Matmul ieee;
  return sim_lse_bwd_tiled<CudaDev>(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse,
                                    col_lse, grad_row, grad_col, row_max);
}

Tensor siglip_fwd_cuda(const Tensor& x, const Tensor& y, const Tensor& scale, const Tensor& bias) {
  check_cuda(x, "x");
  check_cuda(y, "y");
  const c10::cuda::CUDAGuard guard(x.device());
  const IeeeFp32Matmul ieee;
  return siglip_fwd_tiled<CudaDev>(x, y, scale, bias);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> siglip_bwd_cuda(const Tensor& x, const Tensor& y, const Tensor& scale,
                                                           const Tensor& bias, const Tensor& grad) {
  check_cuda(x, "x");
  check_cuda(y, "y");
  const c10::cuda::CUDAGuard guard(x.device());
  const IeeeFp32Matmul ieee;
  return siglip_bwd_tiled<CudaDev>(x, y, scale, bias, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(contrastive_ops, CUDA, m) {
  m.impl("sim_lse_fwd", &sim_lse_fwd_cuda);
  m.impl("sim_lse_bwd", &sim_lse_bwd_cuda);
  m.impl("siglip_fwd", &siglip_fwd_cuda);
  m.impl("siglip_bwd", &siglip_bwd_cuda);
}

}  // namespace contrastive_ops
