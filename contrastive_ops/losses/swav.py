"""Sinkhorn-Knopp codes and the SwAV swapped-prediction loss."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def sinkhorn_knopp(scores, epsilon=0.05, iterations=3, *, process_group=None, backend="auto") -> Tensor:
    raise NotImplementedError


def swav_loss(scores, temperature=0.1, *, crops_for_assign=(0, 1), epsilon=0.05, iterations=3,
              process_group=None, backend="auto") -> Tensor:
    raise NotImplementedError
