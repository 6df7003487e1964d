r"""Primitive ``"swav_ce"``: SwAV's swapped-prediction cross-entropy with soft targets, fused.

Contract
--------
For predictions ``x`` (B, K), soft targets ``t`` (B, K) and a 0-dim ``scale``
s (= 1/τ), with ``T_b = Σ_k t_bk`` and ``lse_b = LSE_k(s·x_bk)``::

    loss = Σ_b [T_b·lse_b − s·Σ_k t_bk·x_bk]       0-dim: Σ_b of F.cross_entropy(s·x, t) with soft targets

and, for the upstream gradient g of ``loss``, with ``p_bk = exp(s·x_bk − lse_b)``::

    dx_bk = g·s·(T_b·p_bk − t_bk)
    ds    = g·Σ_b [T_b·Σ_k p_bk·x_bk − Σ_k t_bk·x_bk]

No gradient flows to ``t`` (the Sinkhorn codes).  A kernel backend implements
it as the optional object ``PRIMITIVES["swav_ce"]`` with::

    forward(x, t, scale) -> (loss 0-dim, lse (B,))
    backward(x, t, scale, lse, grad) -> (dx like x, dscale 0-dim)

``x`` contiguous in any float dtype the backend takes; ``t``, ``scale`` and
``grad`` in the accumulation dtype (fp32, float64 for float64 inputs); ``lse``
is a by-product saved for the backward and carries no gradient.  One pass
per row and direction, no log-softmax buffer.

Kernels: ``csrc/cpu/swav_ce.cpp``, ``csrc/cuda/swav_ce.cu``,
``backends/_triton/swav_ce.py``.

This module holds, in order: the dense reference (``swav_ce_reference``),
the autograd Function (``SwAVCEFunction``) and the entry the loss calls
(``swav_ce``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends

Tensor = torch.Tensor


def swav_ce_reference(x: Tensor, t: Tensor, scale: Tensor) -> Tensor:
    """Σ_b of the soft-target cross-entropy of scale·x against t, in ``t``'s dtype (dense, differentiable)."""
    return F.cross_entropy(x.to(t.dtype) * scale, t, reduction="sum")


class SwAVCEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"swav_ce"`` primitive (no gradient to the targets)."""

    @staticmethod
    def forward(ctx, x, t, scale, backend):
        prim = backends.primitive(backend, "swav_ce")
        loss, lse = prim.forward(x, t, scale)
        ctx.prim = prim
        ctx.save_for_backward(x, t, scale, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, t, scale, lse = ctx.saved_tensors
        dx, dscale = ctx.prim.backward(x, t, scale, lse, grad.reshape(()).to(scale.dtype))
        needs = ctx.needs_input_grad
        return dx if needs[0] else None, None, dscale if needs[2] else None, None


def swav_ce(x: Tensor, t: Tensor, scale: Tensor, *, backend: str) -> Tensor:
    """The loss of the contract; ``backend`` is a concrete backend name.

    Runs the backend's fused ``"swav_ce"`` where it has one (``cpu``, ``cuda``
    and ``triton`` do); the dense reference for ``"reference"`` and for a
    backend without it (the primitive is optional: a backend may implement
    only ``"sinkhorn"``).
    """
    if backend != "reference" and backends.has_primitive(backend, "swav_ce"):
        return SwAVCEFunction.apply(x.contiguous(), t.contiguous(), scale, backend)
    return swav_ce_reference(x, t, scale)
