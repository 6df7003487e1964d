"""Numerics shared by the primitives and the losses: the accumulation dtype, the masked LSE and the
present-first order of a mask (``losses._present_first``; the ring compacts each visiting block with it).

The bottom of the package's import graph (imports torch only), so that the
primitives' references, the extension glue and the losses take these from
one place.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every primitive and loss: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_lse(S: Tensor, allowed: Tensor, dim: int) -> Tensor:
    """LSE of ``S`` over the ``allowed`` entries along ``dim``; -inf (with zero gradient) where none is allowed.

    Slices with no allowed entry are given a harmless finite value before the
    ``logsumexp`` so that its backward has no NaN; their result is then -inf.
    """
    neg_inf = torch.tensor(float("-inf"), dtype=S.dtype, device=S.device)
    empty = ~allowed.any(dim)
    Sm = torch.where(allowed, S, neg_inf)
    Sm = torch.where(empty.unsqueeze(dim), torch.zeros_like(S), Sm)
    out = torch.logsumexp(Sm, dim)
    return torch.where(empty, neg_inf, out)


def present_first(present: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(order, pos, count)`` of a bool vector: present items first, each group in ascending order.

    ``order`` (n,) int64 lists the items, ``pos`` (n,) int64 is its inverse
    (``pos[order] = arange(n)``), ``count`` the 0-dim int64 number of present
    items.  O(n), no sort and no host synchronization.
    """
    p = present.reshape(-1).long()
    n = p.numel()
    count = p.sum()
    before = torch.cumsum(p, 0) - p  # present items before item x
    ar = torch.arange(n, device=p.device)
    pos = torch.where(p.bool(), before, count + ar - before)  # absent: after all present ones
    order = torch.zeros_like(pos).scatter(0, pos, ar)
    return order, pos, count
