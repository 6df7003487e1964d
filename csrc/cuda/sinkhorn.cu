// Sinkhorn-Knopp codes (SwAV) in the log domain: CUDA kernels of the ops declared in csrc/cpu/sinkhorn.cpp.
//
// Maths (see contrastive_ops/losses/swav.py): L = S/ε, log-scalings u (B,), v (K,),
//
//     u[b] = −LSE_k(L[b,k] + v[k])      sample step
//     v[k] = −LSE_b(L[b,k] + u[b])      prototype step
//     codes[b,:] = softmax_k(L[b,:] + v_T)    (T ≥ 1);   B·exp(L − LSE_{b,k} L)  (T = 0)
//
// One iteration = one launch of col_lse_kernel + one small combine launch:
//   * a block owns a contiguous range of rows and, per thread, a fixed set of
//     prototypes k ≡ tid (mod blockDim), whose running max / sum of exp it keeps in
//     shared memory (global memory when 2·K values do not fit);
//   * rows are taken a warp-count at a time: each warp computes u of one row
//     (online LSE over K, warp shuffles), then every thread folds L[b,k] + u[b]
//     of those rows into its prototypes: m' = max(m, x), s' = s·e^{m−m'} + e^{x−m'}.
//     The rows are read from HBM once per iteration (the second read hits L1/L2);
//   * combine_kernel: LSE over blocks of (m, s) per prototype (the host negates it into v).
// codes_kernel: one warp per row, online LSE then the write.
// Scores are read in their dtype and accumulated in fp32 (fp64 for fp64 scores).
// Nothing overflows: every exponent is ≤ 0.  Extra memory: (blocks × K) partials.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../sinkhorn.h"
#include "lse_math.cuh"

#include <cmath>
#include <limits>

namespace contrastive_ops {
namespace sinkhorn_cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace lse_math;

// LSE_k(row[k]·inv_eps + v[k]) by one warp; the result is valid in every lane.
template <typename scalar_t, typename acc_t>
__device__ acc_t warp_row_lse(const scalar_t* __restrict__ row, int64_t K, acc_t inv_eps,
                              const acc_t* __restrict__ v, int lane) {
  acc_t m = neg_inf<acc_t>(), s = 0;
  for (int64_t k = lane; k < K; k += 32) {
    lse_push(m, s, static_cast<acc_t>(row[k]) * inv_eps + (v ? v[k] : acc_t(0)));
  }
  warp_lse_merge(m, s);
  return m + dlog(s);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) col_lse_kernel(
    const scalar_t* __restrict__ S, int64_t B, int64_t K, acc_t inv_eps, const acc_t* __restrict__ v,
    acc_t* __restrict__ part_m, acc_t* __restrict__ part_s, int64_t rows_per_block, bool use_smem) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ acc_t u_sh[kWarps];
  acc_t* m_acc = use_smem ? reinterpret_cast<acc_t*>(smem_raw) : part_m + blockIdx.x * K;
  acc_t* s_acc = use_smem ? reinterpret_cast<acc_t*>(smem_raw) + K : part_s + blockIdx.x * K;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Each thread owns the prototypes k ≡ tid (mod kThreads): no synchronization on m_acc / s_acc.
  for (int64_t k = tid; k < K; k += kThreads) {
    m_acc[k] = neg_inf<acc_t>();
    s_acc[k] = 0;
  }
  const int64_t r0 = blockIdx.x * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < B ? r0 + rows_per_block : B;
  for (int64_t g = r0; g < r1; g += kWarps) {
    const int64_t g1 = g + kWarps < r1 ? g + kWarps : r1;
    if (v != nullptr) {  // sample step for rows g..g1-1, one warp per row
      if (g + warp < g1) {
        const acc_t lse = warp_row_lse<scalar_t, acc_t>(S + (g + warp) * K, K, inv_eps, v, lane);
        if (lane == 0) u_sh[warp] = -lse;
      }
      __syncthreads();
    }
    for (int64_t b = g; b < g1; ++b) {  // prototype step, this block's part
      const acc_t u = v != nullptr ? u_sh[b - g] : acc_t(0);
      const scalar_t* row = S + b * K;
      for (int64_t k = tid; k < K; k += kThreads) {
        acc_t m = m_acc[k], s = s_acc[k];
        lse_push(m, s, static_cast<acc_t>(row[k]) * inv_eps + u);
        m_acc[k] = m;
        s_acc[k] = s;
      }
    }
    if (v != nullptr) __syncthreads();  // u_sh is rewritten by the next group
  }
  if (use_smem) {
    for (int64_t k = tid; k < K; k += kThreads) {
      part_m[blockIdx.x * K + k] = m_acc[k];
      part_s[blockIdx.x * K + k] = s_acc[k];
    }
  }
}

// out[k] = LSE over blocks of the partials (every block holds ≥ 1 row, so m is finite, s ≥ 1).
// A block takes 32 prototypes; its 8 warps split the partial rows, then merge through shared memory.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) combine_kernel(const acc_t* __restrict__ part_m,
                                                           const acc_t* __restrict__ part_s, int64_t n_blocks,
                                                           int64_t K, acc_t* __restrict__ out) {
  __shared__ acc_t m_sh[kWarps][32];
  __shared__ acc_t s_sh[kWarps][32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t k = blockIdx.x * static_cast<int64_t>(32) + lane;
  acc_t m = neg_inf<acc_t>(), s = 0;
  if (k < K) {
    for (int64_t j = warp; j < n_blocks; j += kWarps) lse_merge(m, s, part_m[j * K + k], part_s[j * K + k]);
  }
  m_sh[warp][lane] = m;
  s_sh[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && k < K) {
    for (int w = 1; w < kWarps; ++w) lse_merge(m, s, m_sh[w][lane], s_sh[w][lane]);
    out[k] = m + dlog(s);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) codes_kernel(const scalar_t* __restrict__ S, int64_t B, int64_t K,
                                                         acc_t inv_eps, const acc_t* __restrict__ v, bool normalize,
                                                         float* __restrict__ out) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x * static_cast<int64_t>(kWarps) + warp;
  if (b >= B) return;
  const scalar_t* row = S + b * K;
  const acc_t lse = normalize ? warp_row_lse<scalar_t, acc_t>(row, K, inv_eps, v, lane) : acc_t(0);
  float* o = out + b * K;
  for (int64_t k = lane; k < K; k += 32) {
    o[k] = static_cast<float>(dexp(static_cast<acc_t>(row[k]) * inv_eps + v[k] - lse));
  }
}

void check_scores(const at::Tensor& scores, double epsilon, const char* op) {
  TORCH_CHECK(scores.is_cuda(), op, ": scores must be a CUDA tensor");
  check_sinkhorn_scores(scores, epsilon, op);
}

}  // namespace

at::Tensor sinkhorn_col_lse(const at::Tensor& scores_in, double epsilon, const c10::optional<at::Tensor>& v_in) {
  check_scores(scores_in, epsilon, "sinkhorn_col_lse");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  const auto acc = acc_dtype(scores.scalar_type());
  const at::Tensor v = sinkhorn_potentials(v_in, scores, K, acc, "sinkhorn_col_lse");
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t max_blocks = 2 * static_cast<int64_t>(prop->multiProcessorCount);
  const int64_t want = (B + kWarps - 1) / kWarps;  // at least one warp-group of rows per block
  const int64_t n_blocks0 = want < max_blocks ? want : max_blocks;
  const int64_t rows_per_block = (B + n_blocks0 - 1) / n_blocks0;
  const int64_t n_blocks = (B + rows_per_block - 1) / rows_per_block;  // every block gets ≥ 1 row
  at::Tensor pm = at::empty({n_blocks, K}, scores.options().dtype(acc));
  at::Tensor ps = at::empty({n_blocks, K}, scores.options().dtype(acc));
  at::Tensor out = at::empty({K}, scores.options().dtype(acc));
  auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_col_lse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The per-block limits (48 KiB by default, sharedMemPerBlockOptin after the opt-in) count the
    // kernel's static shared memory too: without it, K in [6141, 6144] (fp32) asked for
    // 48 KiB of dynamic memory plus the static bytes, past the default limit, with no opt-in.
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, col_lse_kernel<scalar_t, acc_t>));
    const size_t smem = 2 * static_cast<size_t>(K) * sizeof(acc_t);
    const size_t total = smem + attr.sharedSizeBytes;
    bool use_smem = total <= static_cast<size_t>(prop->sharedMemPerBlockOptin);
    if (use_smem && total > 48 * 1024) {
      use_smem = cudaFuncSetAttribute(col_lse_kernel<scalar_t, acc_t>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)) == cudaSuccess;
      if (!use_smem) (void)cudaGetLastError();
    }
    col_lse_kernel<scalar_t, acc_t><<<static_cast<unsigned>(n_blocks), kThreads, use_smem ? smem : 0, stream>>>(
        scores.data_ptr<scalar_t>(), B, K, static_cast<acc_t>(1.0 / epsilon),
        v.defined() ? v.data_ptr<acc_t>() : nullptr, pm.data_ptr<acc_t>(), ps.data_ptr<acc_t>(), rows_per_block,
        use_smem);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    combine_kernel<acc_t><<<static_cast<unsigned>((K + 31) / 32), kThreads, 0, stream>>>(
        pm.data_ptr<acc_t>(), ps.data_ptr<acc_t>(), n_blocks, K, out.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sinkhorn_codes(const at::Tensor& scores_in, double epsilon, const at::Tensor& v_in, bool normalize) {
  check_scores(scores_in, epsilon, "sinkhorn_codes");
  const c10::cuda::CUDAGuard guard(scores_in.device());
  const at::Tensor scores = scores_in.contiguous();
  const int64_t B = scores.size(0), K = scores.size(1);
  TORCH_CHECK(v_in.dim() == 1 && v_in.size(0) == K, "sinkhorn_codes: v must have shape (", K, ",), got ",
              v_in.sizes());
  const auto acc = acc_dtype(scores.scalar_type());
  const at::Tensor v = v_in.to(scores.device(), acc).contiguous();
  at::Tensor out = at::empty({B, K}, scores.options().dtype(at::kFloat));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "sinkhorn_codes_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    codes_kernel<scalar_t, acc_t><<<static_cast<unsigned>((B + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
        scores.data_ptr<scalar_t>(), B, K, static_cast<acc_t>(1.0 / epsilon), v.data_ptr<acc_t>(), normalize,
        out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sinkhorn(const at::Tensor& scores, double epsilon, int64_t iterations) {
  check_scores(scores, epsilon, "sinkhorn");
  TORCH_CHECK(iterations >= 0, "sinkhorn: iterations must be >= 0, got ", iterations);
  return sinkhorn_log_domain(
      scores.size(0), scores.size(1), iterations,
      [&](const c10::optional<at::Tensor>& v) { return sinkhorn_col_lse(scores, epsilon, v); },
      [&](const at::Tensor& v, bool normalize) { return sinkhorn_codes(scores, epsilon, v, normalize); });
}

}  // namespace sinkhorn_cuda
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CUDA, m) {
  m.impl("sinkhorn", &contrastive_ops::sinkhorn_cuda::sinkhorn);
  m.impl("sinkhorn_col_lse", &contrastive_ops::sinkhorn_cuda::sinkhorn_col_lse);
  m.impl("sinkhorn_codes", &contrastive_ops::sinkhorn_cuda::sinkhorn_codes);
}
