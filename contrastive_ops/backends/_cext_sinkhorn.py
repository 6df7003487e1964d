"""The ``"sinkhorn"`` primitive of the C++/CUDA extension (``cpu`` and ``cuda`` backends).

The ops are declared in ``csrc/cpu/sinkhorn.cpp`` (CPU kernels) with CUDA
kernels in ``csrc/cuda/sinkhorn.cu``::

    contrastive_ops::sinkhorn(Tensor scores, float epsilon, int iterations) -> Tensor          (B, K) fp32
    contrastive_ops::sinkhorn_col_lse(Tensor scores, float epsilon, Tensor? v) -> Tensor        (K,)
    contrastive_ops::sinkhorn_codes(Tensor scores, float epsilon, Tensor v, bool normalize) -> Tensor

(maths in ``contrastive_ops.losses.swav``).  ``register_fakes()`` gives them
fake kernels for ``torch.compile``; ``backends._cext`` calls it once the
extension is loaded (through ``_ext.load``, which checks the build versions),
and it may be called again after loading the library by hand.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

_OPS = ("sinkhorn", "sinkhorn_col_lse", "sinkhorn_codes")
_registered: set = set()


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.contrastive_ops, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_sinkhorn(scores, epsilon, iterations):
    torch._check(scores.dim() == 2, lambda: f"sinkhorn: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _fake_col_lse(scores, epsilon, v):
    torch._check(scores.dim() == 2, lambda: f"sinkhorn_col_lse: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty((scores.shape[1],), dtype=_acc(scores.dtype))


def _fake_codes(scores, epsilon, v, normalize):
    torch._check(scores.dim() == 2, lambda: f"sinkhorn_codes: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty(scores.shape, dtype=torch.float32)


_FAKES = {"sinkhorn": _fake_sinkhorn, "sinkhorn_col_lse": _fake_col_lse, "sinkhorn_codes": _fake_codes}


def register_fakes() -> None:
    """Register the fake kernels of the ops that exist and have none yet (idempotent)."""
    for name in _OPS:
        if name in _registered or not _has_op(name):
            continue
        torch.library.register_fake(f"contrastive_ops::{name}")(_FAKES[name])
        _registered.add(name)


class _Sinkhorn:
    """``forward`` / ``col_lse`` / ``codes`` of the ``"sinkhorn"`` primitive on the extension's ops."""

    @staticmethod
    def forward(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
        return torch.ops.contrastive_ops.sinkhorn(scores, float(epsilon), int(iterations))

    @staticmethod
    def col_lse(scores: Tensor, epsilon: float, v: Optional[Tensor]) -> Tensor:
        return torch.ops.contrastive_ops.sinkhorn_col_lse(scores, float(epsilon), v)

    @staticmethod
    def codes(scores: Tensor, epsilon: float, v: Tensor, normalize: bool) -> Tensor:
        return torch.ops.contrastive_ops.sinkhorn_codes(scores, float(epsilon), v, bool(normalize))


SINKHORN = _Sinkhorn()
