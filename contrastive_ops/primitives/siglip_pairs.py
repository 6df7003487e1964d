r"""Primitive ``"siglip"``: the SigLIP pair sum over all B×B pairs, never storing the logits.

Contract
--------
With ``x`` (B, D), ``y`` (B, D), 0-dim ``scale`` s and ``bias`` b, logits
``L_ij = s·x_i·y_j + b`` and labels ``z = 2I − 1`` (+1 on the diagonal, −1
elsewhere)::

    total = Σ_{i,j} softplus(−z_ij·L_ij)                    0-dim

With ``g_ij = ∂/∂L_ij softplus(−z_ij L_ij) = −z_ij·σ(−z_ij L_ij)`` and the
upstream gradient ``G`` of ``total``::

    dx_i = G·s Σ_j g_ij y_j,   dy_j = G·s Σ_i g_ij x_i,   ds = G·Σ_ij g_ij x_i·y_j,   db = G·Σ_ij g_ij

A kernel backend implements it as the object ``PRIMITIVES["siglip"]`` with::

    forward(x, y, scale, bias) -> total                  0-dim, fp32 (float64 for float64 inputs)
    backward(x, y, scale, bias, grad) -> (dx, dy, dscale, dbias)

and optionally, for a step that will be differentiated (the gradient needs no statistic of the
forward, so one pass can give both)::

    fuses(x, y) -> bool                                   whether to use it for these inputs
    forward_with_grads(x, y, scale, bias) -> (total, dx, dy, dscale, dbias)     for G = 1; fp32

where ``x`` and ``y`` are contiguous, of one dtype (fp32, fp16, bf16,
float64 where the backend takes it), ``scale``, ``bias`` and ``grad`` are
0-dim tensors in the accumulation dtype (fp32, float64 for float64 inputs)
on the features' device, ``dx``/``dy`` have the dtype and shape of
``x``/``y``, and ``dscale``/``dbias`` are 0-dim in the accumulation dtype.
The loss (``losses.siglip``) divides by B in PyTorch.

Kernels: ``csrc/cpu/siglip.cpp`` (tiling of ``csrc/tiling.h``),
``csrc/cuda/epilogues.cu``, ``backends/_triton/siglip.py``.

This module holds, in order: the dense reference (``siglip_pairs_reference``),
the autograd Function (``SigLIPPairsFunction``) and the entry the loss calls
(``siglip_pairs``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .._numerics import acc_dtype
from ..distributed import RingCandidates

Tensor = torch.Tensor


def siglip_pairs_reference(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias)), z = 2I − 1, densely (stores B×B; differentiable by autograd).

    Accumulates in fp32 (float64 for float64 inputs).
    """
    dt = acc_dtype(x.dtype)
    logits = scale.to(dt) * (x.to(dt) @ y.to(dt).T) + bias.to(dt)
    z = 2 * torch.eye(x.shape[0], y.shape[0], dtype=dt, device=x.device) - 1
    return F.softplus(-z * logits).sum()


class SigLIPPairsFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"siglip"`` primitive (the pair sum, not yet divided by B)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, backend, differentiated=False):
        """``differentiated``: grad mode is on and an input requires grad (known only outside)."""
        prim = backends.primitive(backend, "siglip")
        ctx.prim = prim
        ctx.fused = differentiated and hasattr(prim, "forward_with_grads") and prim.fuses(x, y)
        if ctx.fused:  # loss and gradient (for G = 1) in one pass; the backward only scales them
            total, dx, dy, dscale, dbias = prim.forward_with_grads(x, y, scale, bias)
            ctx.dtypes = (x.dtype, y.dtype, scale.dtype, bias.dtype)
            ctx.save_for_backward(dx, dy, dscale, dbias)
            return total
        total = prim.forward(x, y, scale, bias)
        ctx.save_for_backward(x, y, scale, bias)
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.fused:
            g = grad.reshape(()).float()
            dx, dy, dscale, dbias = (
                (g * t).to(dt) for t, dt in zip(ctx.saved_tensors, ctx.dtypes))
        else:
            x, y, scale, bias = ctx.saved_tensors
            dx, dy, dscale, dbias = ctx.prim.backward(x, y, scale, bias, grad.reshape(()).to(scale.dtype))
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dy if needs[1] else None,
            dscale if needs[2] else None,
            dbias if needs[3] else None,
            None,
            None,
        )


class DenseSigLIP:
    """The ``"siglip"`` primitive interface computed by the dense reference (``backend="reference"`` in a ring)."""

    def forward(self, x, y, scale, bias):
        with torch.no_grad():
            return siglip_pairs_reference(x, y, scale, bias)

    def backward(self, x, y, scale, bias, grad):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (x, y, scale, bias)]
            return torch.autograd.grad(siglip_pairs_reference(*leaves) * grad, leaves)


def primitive_object(backend: str):
    """The ``"siglip"`` primitive object of ``backend`` (``"reference"``: :class:`DenseSigLIP`)."""
    return DenseSigLIP() if backend == "reference" else backends.primitive(backend, "siglip")


def siglip_pairs(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, *, backend: str) -> Tensor:
    """The pair sum of the contract; ``backend`` is a concrete backend name.

    ``"reference"`` runs the dense version (same maths, stores B×B); kernel
    backends never store B×B.  ``scale`` and ``bias`` are 0-dim tensors in the
    accumulation dtype.  ``y`` may be a ``distributed.RingCandidates`` handle
    (``exchange="ring"``): the sum is then over this rank's ``x`` against every
    rank's ``y`` block, the positives being this rank's own pairs (i, i)
    (``primitives.ring``).
    """
    if isinstance(y, RingCandidates):
        from .ring import ring_siglip_pairs

        return ring_siglip_pairs(x, y, scale, bias, prim=primitive_object(backend))
    if backend == "reference":
        return siglip_pairs_reference(x, y, scale, bias)
    differentiated = torch.is_grad_enabled() and any(t.requires_grad for t in (x, y, scale, bias))
    return SigLIPPairsFunction.apply(x.contiguous(), y.contiguous(), scale, bias, backend, differentiated)
