r"""Primitive ``"sim_expect"``: the softmax-weighted mean of the similarities, per row, never storing B×M.

Maths
-----
Anchors are the rows of ``q`` (B, D), candidates the rows of ``k`` (M, D)::

    G = q kᵀ  (B, M, unscaled)        S = scale · G
    candidate j is allowed for anchor i unless j == exclude[i]   (exclude[i] < 0: all allowed)
    P[i, j]  = exp(S[i, j] − lse[i]) on allowed pairs, 0 elsewhere

    lse[i]  = LSE_{j allowed} S[i, j]                  (B,)   −inf if nothing is allowed
    mean[i] = Σ_j P[i, j] · G[i, j]                    (B,)   0 if nothing is allowed

i.e. E_{P_i}[G_i·], an expectation under the row's own softmax (CACR's
repulsion with normalized features: ‖a−b‖² = 2 − 2·a·b).  ``scale`` = 0
gives the plain mean over the allowed candidates.

Backward, with upstream gradients g_lse, g_mean (B,)::

    ∂lse_i/∂G_ij  = scale·P_ij
    ∂mean_i/∂G_ij = P_ij·(1 + scale·(G_ij − mean_i))
    dG_ij  = P_ij·(scale·g_lse_i + g_mean_i·(1 + scale·(G_ij − mean_i)))
    dq = dG k,   dk = dGᵀ q
    dscale = Σ_i [g_lse_i·mean_i + g_mean_i·Var_i],   Var_i = Σ_j P_ij·G_ij·(G_ij − mean_i)

Only row statistics (lse, mean, and the upstream gradients) are needed to
recompute P and dG tile by tile, so a kernel needs no B×M buffer: one pass
with an online max keeps (max, Σ e^{S−max}, Σ e^{S−max}·G) per row.

Kernel backends implement ``"sim_expect"`` as an object with::

    forward(q, k, scale, exclude) -> (lse (B,) fp32, mean (B,) fp32)
    backward(q, k, scale, exclude, lse, mean, grad_lse, grad_mean) -> (dq like q, dk like k, dscale 0-dim fp32)

with ``scale`` a 0-dim fp32 tensor and ``exclude`` None or (B,) int32.
Kernels: ``backends/_triton/sim_expect.py`` and ``csrc/cpu/sim_expect.cpp``
(row blocks of one GEMM each).  The ``"cuda"`` backend does not implement it:
a loss that needs it raises there ("does not implement ['sim_expect']"), and
``"auto"`` takes Triton on CUDA tensors.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backends
from .._numerics import acc_dtype

Tensor = torch.Tensor


def sim_expect_reference(q: Tensor, k: Tensor, scale: Tensor, exclude: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor]:
    """Dense PyTorch version (differentiable by autograd); stores B×M."""
    dt = acc_dtype(q.dtype)
    G = q.to(dt) @ k.to(dt).T
    S = G * scale.to(dt)
    if exclude is not None:
        ex = exclude.to(q.device).long()
        allowed = torch.arange(k.shape[0], device=q.device)[None, :] != ex[:, None]
    else:
        allowed = torch.ones_like(S, dtype=torch.bool)
    Sm = S.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(Sm, 1)
    has = allowed.any(1)
    P = torch.exp(Sm - torch.where(has, lse, 0)[:, None])
    mean = (P * torch.where(allowed, G, 0)).sum(1)
    return lse, torch.where(has, mean, 0)


class SimExpectFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"sim_expect"`` primitive (contract in the module docstring)."""

    @staticmethod
    def forward(ctx, q, k, scale, exclude, backend):
        prim = backends.primitive(backend, "sim_expect")
        lse, mean = prim.forward(q, k, scale, exclude)
        ctx.prim = prim
        ctx.save_for_backward(q, k, scale, exclude, lse, mean)
        return lse, mean

    @staticmethod
    def backward(ctx, g_lse, g_mean):
        q, k, scale, exclude, lse, mean = ctx.saved_tensors
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.contiguous()
        g_mean = torch.zeros_like(mean) if g_mean is None else g_mean.contiguous()
        dq, dk, dscale = ctx.prim.backward(q, k, scale, exclude, lse, mean, g_lse, g_mean)
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                dscale if ctx.needs_input_grad[2] else None, None, None)


def sim_expect(q: Tensor, k: Tensor, scale, *, exclude: Optional[Tensor] = None, backend: str
               ) -> Tuple[Tensor, Tensor]:
    """``(lse, mean)``: row LSE of ``scale·q·kᵀ`` and the row's softmax-weighted mean of ``q·kᵀ`` (unscaled).

    ``exclude`` (B,) names one candidate per anchor to leave out (< 0: none).
    ``backend`` is a concrete backend name; ``"reference"`` is the dense version.
    Both outputs are fp32 (float64 for float64 inputs) and differentiable in q, k and scale.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"sim_expect: q and k must be 2-D with one feature size, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if exclude is not None and tuple(exclude.shape) != (q.shape[0],):
        raise ValueError(f"sim_expect: exclude must have shape ({q.shape[0]},), got {tuple(exclude.shape)}")
    dt = acc_dtype(q.dtype)
    scale = torch.as_tensor(scale, device=q.device).to(dt).reshape(())
    ex = None if exclude is None else exclude.to(device=q.device, dtype=torch.int32).contiguous()
    if backend == "reference":
        return sim_expect_reference(q, k, scale, ex)
    return SimExpectFunction.apply(q.contiguous(), k.contiguous(), scale, ex, backend)
