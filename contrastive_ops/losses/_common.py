"""Pieces every loss shares: normalization, temperature and scale conversion, operands of the kernels.

One copy each; the accumulation dtype and the masked LSE live one layer
lower (``contrastive_ops._numerics``) because the primitives' references use
them too, and the argument checks (pair checks included) in
``contrastive_ops._checks``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import as_scalar
from .._numerics import acc_dtype

Tensor = torch.Tensor

NORM_EPS = 1e-12  # û = u / max(‖u‖, NORM_EPS), as F.normalize and the released codes


def unit(x: Tensor, normalize: bool = True) -> Tensor:
    """``x`` in the accumulation dtype, L2-normalized along the last dim there when ``normalize``."""
    x = x.to(acc_dtype(x.dtype))
    return F.normalize(x, dim=-1, eps=NORM_EPS) if normalize else x


def kernel_operands(x_acc: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Split a feature tensor held in the accumulation dtype into what a primitive and PyTorch see.

    Returns ``(x_kernel, x_rounded)``: ``x_kernel`` is ``x_acc`` in the input
    dtype (what the kernel reads); ``x_rounded`` has the same rounded values in
    the accumulation dtype, for the PyTorch-side terms (positive logits, label
    sums), so both sides of a loss see identical logits.  Gradients of both
    flow back into ``x_acc`` and are summed there in fp32 — with fp16/bf16
    inputs the large, nearly cancelling terms (the softmax and the positive)
    meet before the one final rounding, not after.
    """
    x_kernel = x_acc.to(dtype)
    if x_kernel.dtype == x_acc.dtype:
        return x_acc, x_acc
    return x_kernel, x_acc + (x_kernel.to(x_acc.dtype) - x_acc).detach()


def unit_operands(x: Tensor, normalize: bool) -> Tuple[Tensor, Tensor]:
    """``kernel_operands`` of ``unit(x, normalize)``: (for the kernel, for the PyTorch-side terms)."""
    return kernel_operands(unit(x, normalize), x.dtype)


def inv_temperature(temperature, like: Tensor) -> Tensor:
    """1/τ as a 0-dim tensor in the accumulation dtype (differentiable in a tensor temperature).

    Public functions check τ > 0 once (``as_scalar(..., positive=True)``) before any backend.
    """
    return 1.0 / as_scalar("temperature", temperature, like)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_d a_id·b_id in the accumulation dtype (positive logits, O(B·D))."""
    dt = acc_dtype(a.dtype)
    return (a.to(dt) * b.to(dt)).sum(-1)


def label_groups(labels: Optional[Tensor], N: int, device) -> Tensor:
    """Group id in [0, N) per instance: equal labels ⇔ equal ids (``None``: the instance ids).

    No data-dependent shapes, so compositions that sum features per label
    (``index_add`` into N slots) trace under ``torch.compile``.
    """
    if labels is None:
        return torch.arange(N, device=device)
    sorted_labels, perm = torch.sort(labels)
    new = torch.ones(N, dtype=torch.long, device=device)
    new[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    gid = torch.empty(N, dtype=torch.long, device=device)
    gid[perm] = torch.cumsum(new, 0) - 1
    return gid
