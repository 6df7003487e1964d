r"""Triton kernels of the ``"swav_ce"`` primitive: SwAV's swapped-prediction cross-entropy, fused.

For predictions x (B, K) (fp32, fp16 or bf16), soft targets t (B, K) fp32 and
scale s = 1/τ (maths of ``csrc/cpu/swav_ce.cpp``)::

    forward:  loss = Σ_b [T_b·lse_b − s·Σ_k t_bk·x_bk],  T_b = Σ_k t_bk,  lse_b = LSE_k(s·x_bk)
    backward: dx_bk = g·s·(T_b·exp(s·x_bk − lse_b) − t_bk)
              ds    = g·Σ_b [T_b·Σ_k p_bk·x_bk − Σ_k t_bk·x_bk]

One program per row streams the row in BLOCK_K chunks: the forward keeps an
online max / sum of exp and the two target sums (no log-softmax buffer), the
backward sums the targets, then writes dx chunk by chunk.  Per-row partial
sums are added by ``torch.sum`` (deterministic).
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .args import same_device, scalar_on
from .tiles import wrap

Tensor = torch.Tensor


@triton.jit
def _chunk(X, T, row, k0, offs, K, stride_x, stride_t):
    """Columns k0 + offs of row ``row``: (x as fp32, t, in-range mask); 0 outside."""
    cols = k0 + offs
    cmask = cols < K
    x = tl.load(X + row * stride_x + cols, mask=cmask, other=0.0).to(tl.float32)
    t = tl.load(T + row * stride_t + cols, mask=cmask, other=0.0)
    return x, t, cmask


@triton.jit
def _swav_ce_fwd_kernel(X, T, Scale, Part, LSE, K, stride_x, stride_t, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(Scale)
    offs = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)  # per-lane running max / sum of exp
    acc = tl.zeros([BLOCK_K], tl.float32)
    t_sum = tl.zeros([BLOCK_K], tl.float32)
    tx_sum = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, t, cmask = _chunk(X, T, row, k0, offs, K, stride_x, stride_t)
        y = tl.where(cmask, x * s, float("-inf"))
        m_new = tl.maximum(m, y)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw no column yet: nothing to shift
        acc = acc * tl.exp(m - shift) + tl.exp(y - shift)
        m = m_new
        t_sum += t
        tx_sum += t * x
    mx = tl.max(m, axis=0)
    total = tl.sum(acc * tl.exp(m - mx), axis=0)
    lse = mx + tl.log(total)
    tl.store(LSE + row, lse)
    tl.store(Part + row, tl.sum(t_sum, axis=0) * lse - s * tl.sum(tx_sum, axis=0))


@triton.jit
def _swav_ce_bwd_kernel(X, T, Scale, LSE, Grad, DX, Part, K, stride_x, stride_t, stride_dx,
                        BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    s = tl.load(Scale)
    g = tl.load(Grad)
    lse = tl.load(LSE + row)
    offs = tl.arange(0, BLOCK_K)
    t_sum = tl.zeros([BLOCK_K], tl.float32)
    tx_sum = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, t, cmask = _chunk(X, T, row, k0, offs, K, stride_x, stride_t)
        t_sum += t
        tx_sum += t * x
    tb = tl.sum(t_sum, axis=0)
    px_sum = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x, t, cmask = _chunk(X, T, row, k0, offs, K, stride_x, stride_t)
        p = tl.where(cmask, tl.exp(x * s - lse), 0.0)
        tl.store(DX + row * stride_dx + k0 + offs, (g * s * (tb * p - t)).to(DX.dtype.element_ty), mask=cmask)
        px_sum += p * x
    tl.store(Part + row, g * (tb * tl.sum(px_sum, axis=0) - tl.sum(tx_sum, axis=0)))


def _block_k(K: int) -> int:
    return min(triton.next_power_of_2(max(K, 1)), 1024)


@torch.library.triton_op("contrastive_ops_triton::swav_ce_fwd", mutates_args=())
def _swav_ce_fwd_op(x: Tensor, t: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    same_device("swav_ce_fwd", x.device, t=t)
    scale = scalar_on("swav_ce_fwd", "scale", scale, x.device)
    B, K = x.shape
    part = torch.empty((B,), dtype=torch.float32, device=x.device)
    lse = torch.empty((B,), dtype=torch.float32, device=x.device)
    if B > 0:
        wrap(_swav_ce_fwd_kernel)[(B,)](
            x, t, scale, part, lse, K, x.stride(0), t.stride(0), BLOCK_K=_block_k(K))
    return part.sum(), lse


@_swav_ce_fwd_op.register_fake
def _(x, t, scale):
    return x.new_empty((), dtype=torch.float32), x.new_empty((x.shape[0],), dtype=torch.float32)


@torch.library.triton_op("contrastive_ops_triton::swav_ce_bwd", mutates_args=())
def _swav_ce_bwd_op(x: Tensor, t: Tensor, scale: Tensor, lse: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor]:
    same_device("swav_ce_bwd", x.device, t=t, lse=lse)
    scale = scalar_on("swav_ce_bwd", "scale", scale, x.device)
    grad = scalar_on("swav_ce_bwd", "grad", grad, x.device)
    B, K = x.shape
    dx = torch.empty_like(x)
    part = torch.empty((B,), dtype=torch.float32, device=x.device)
    if B > 0:
        wrap(_swav_ce_bwd_kernel)[(B,)](
            x, t, scale, lse, grad, dx, part, K, x.stride(0), t.stride(0), dx.stride(0), BLOCK_K=_block_k(K))
    return dx, part.sum()


@_swav_ce_bwd_op.register_fake
def _(x, t, scale, lse, grad):
    return torch.empty_like(x), x.new_empty((), dtype=torch.float32)


def _f32(v: Tensor, like: Tensor) -> Tensor:
    return torch.as_tensor(v, device=like.device).to(torch.float32).reshape(()).contiguous()


def _check(x: Tensor, t: Tensor) -> None:
    if x.dim() != 2 or t.shape != x.shape:
        raise ValueError(f"swav_ce: x must be 2-D and t of its shape, got {tuple(x.shape)} and {tuple(t.shape)}")
    if t.dtype != torch.float32:
        raise ValueError(f"swav_ce: t must be float32 on the Triton backend, got {t.dtype}")


class _SwAVCE:
    """The ``"swav_ce"`` primitive of the Triton backend (contract in ``backends._cext``)."""

    @staticmethod
    def forward(x: Tensor, t: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
        _check(x, t)
        return torch.ops.contrastive_ops_triton.swav_ce_fwd(x.contiguous(), t.contiguous(), _f32(scale, x))

    @staticmethod
    def backward(x: Tensor, t: Tensor, scale: Tensor, lse: Tensor, grad: Tensor) -> Tuple[Tensor, Tensor]:
        _check(x, t)
        return torch.ops.contrastive_ops_triton.swav_ce_bwd(x.contiguous(), t.contiguous(), _f32(scale, x),
                                                            lse.contiguous(), _f32(grad, x))


SWAV_CE = _SwAVCE()


def compile_specs():
    """The variants the launchers compile (see ``backends/_triton/specs.py``): forward and backward
    in every input dtype, at the block of K = 3000 prototypes (SwAV's default) and of K = 128."""
    out = []
    for dtype in ("bf16", "fp16", "fp32"):
        t = "*" + dtype
        for K in (3000, 128):
            c = dict(BLOCK_K=_block_k(K))
            out.append(dict(name="swav_ce_fwd", fn=_swav_ce_fwd_kernel,
                            args=dict(X=t, T="*fp32", Scale="*fp32", Part="*fp32", LSE="*fp32", K="i32",
                                      stride_x="i32", stride_t="i32"),
                            constexprs=c, num_warps=4, num_stages=3, dtype=dtype, D=None))
            out.append(dict(name="swav_ce_bwd", fn=_swav_ce_bwd_kernel,
                            args=dict(X=t, T="*fp32", Scale="*fp32", LSE="*fp32", Grad="*fp32", DX=t, Part="*fp32",
                                      K="i32", stride_x="i32", stride_t="i32", stride_dx="i32"),
                            constexprs=c, num_warps=4, num_stages=3, dtype=dtype, D=None))
    return out
