"""Numerics shared by the primitives and the losses: the accumulation dtype and the masked LSE.

The bottom of the package's import graph (imports torch only), so that the
primitives' references, the extension glue and the losses take these from
one place.
"""
from __future__ import annotations

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
