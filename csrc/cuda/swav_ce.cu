// SwAV's swapped-prediction cross-entropy with soft targets: CUDA kernels of the ops declared in
// csrc/cpu/swav_ce.cpp (maths there).  One warp per row: the forward keeps an online max / sum of
// exp and the target sums in registers (warp shuffles at the end), the backward sums the targets,
// then writes dx.  Per-row partial sums go to a (B,) buffer summed by at::sum (deterministic).
// x is read in its dtype and accumulated in fp32 (fp64 for fp64 x).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../swav_ce.h"
#include "lse_math.cuh"

#include <cmath>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace contrastive_ops {
namespace swav_ce_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using namespace lse_math;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) fwd_kernel(const scalar_t* __restrict__ X, const acc_t* __restrict__ T,
                                                       int64_t B, int64_t K, const acc_t* __restrict__ scale,
                                                       acc_t* __restrict__ part, acc_t* __restrict__ lse) {
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  if (b >= B) return;
  const acc_t s = *scale;
  const scalar_t* x = X + b * K;
  const acc_t* t = T + b * K;
  acc_t m = neg_inf<acc_t>(), e = 0, ts = 0, txs = 0;
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t xv = static_cast<acc_t>(x[k]);
    lse_push(m, e, s * xv);
    ts += t[k];
    txs += t[k] * xv;
  }
  warp_lse_merge(m, e);
  ts = warp_sum(ts);
  txs = warp_sum(txs);
  if (lane == 0) {
    const acc_t l = m + dlog(e);
    lse[b] = l;
    part[b] = ts * l - s * txs;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) bwd_kernel(const scalar_t* __restrict__ X, const acc_t* __restrict__ T,
                                                       int64_t B, int64_t K, const acc_t* __restrict__ scale,
                                                       const acc_t* __restrict__ lse, const acc_t* __restrict__ grad,
                                                       scalar_t* __restrict__ DX, acc_t* __restrict__ part) {
  const int lane = threadIdx.x % 32;
  const int64_t b = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  if (b >= B) return;
  const acc_t s = *scale, g = *grad, l = lse[b];
  const scalar_t* x = X + b * K;
  const acc_t* t = T + b * K;
  scalar_t* dx = DX + b * K;
  acc_t ts = 0, txs = 0, pxs = 0;
  for (int64_t k = lane; k < K; k += 32) {
    ts += t[k];
    txs += t[k] * static_cast<acc_t>(x[k]);
  }
  ts = warp_sum(ts);
  txs = warp_sum(txs);
  const acc_t c = g * s;
  for (int64_t k = lane; k < K; k += 32) {
    const acc_t xv = static_cast<acc_t>(x[k]), p = dexp(s * xv - l);
    dx[k] = static_cast<scalar_t>(c * (ts * p - t[k]));
    pxs += p * xv;
  }
  pxs = warp_sum(pxs);
  if (lane == 0) part[b] = g * (ts * pxs - txs);
}

// The kernels read every argument's data on x's device: anything elsewhere is an error here,
// not an illegal memory access later.
void check_on_device(const at::Tensor& x, std::initializer_list<const at::Tensor*> others, const char* what) {
  bool ok = x.is_cuda();
  for (const at::Tensor* t : others) ok = ok && t->device() == x.device();
  TORCH_CHECK(ok, what, " must be CUDA tensors on one device (x is on ", x.device(), ")");
}

unsigned blocks(int64_t B) { return static_cast<unsigned>((B + kWarps - 1) / kWarps); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> swav_ce_fwd(const at::Tensor& x_in, const at::Tensor& t_in,
                                               const at::Tensor& scale) {
  check_on_device(x_in, {&t_in, &scale}, "swav_ce_fwd: x, t and scale");
  check_swav_ce_args(x_in, t_in, scale, "swav_ce_fwd");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), t = t_in.contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor part = at::empty({B}, t.options());
  at::Tensor lse = at::empty({B}, t.options());
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swav_ce_fwd_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      fwd_kernel<scalar_t, acc_t><<<blocks(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), t.data_ptr<acc_t>(), B, K, scale.data_ptr<acc_t>(), part.data_ptr<acc_t>(),
          lse.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {part.sum(), lse};
}

std::tuple<at::Tensor, at::Tensor> swav_ce_bwd(const at::Tensor& x_in, const at::Tensor& t_in,
                                               const at::Tensor& scale, const at::Tensor& lse_in,
                                               const at::Tensor& grad) {
  check_on_device(x_in, {&t_in, &scale, &lse_in, &grad}, "swav_ce_bwd: x, t, scale, lse and grad");
  check_swav_ce_bwd_args(x_in, t_in, scale, lse_in, grad);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), t = t_in.contiguous();
  const at::Tensor lse = lse_in.to(t.scalar_type()).contiguous();
  const at::Tensor g = grad.to(t.options()).contiguous();
  const int64_t B = x.size(0), K = x.size(1);
  at::Tensor dx = at::empty_like(x);
  at::Tensor part = at::empty({B}, t.options());
  if (B > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "swav_ce_bwd_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      bwd_kernel<scalar_t, acc_t><<<blocks(B), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          x.data_ptr<scalar_t>(), t.data_ptr<acc_t>(), B, K, scale.data_ptr<acc_t>(), lse.data_ptr<acc_t>(),
          g.data_ptr<acc_t>(), dx.data_ptr<scalar_t>(), part.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {dx, part.sum()};
}

}  // namespace swav_ce_cuda
}  // namespace contrastive_ops

TORCH_LIBRARY_IMPL(contrastive_ops, CUDA, m) {
  m.impl("swav_ce_fwd", &contrastive_ops::swav_ce_cuda::swav_ce_fwd);
  m.impl("swav_ce_bwd", &contrastive_ops::swav_ce_cuda::swav_ce_bwd);
}
