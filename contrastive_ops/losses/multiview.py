"""Multi-view losses: mv_infonce, mv_dhel."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def mv_infonce(features, temperature=0.1, *, mask=None, variant="mv", normalize=True, reduction="mean",
               backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError


def mv_dhel(features, temperature=0.2, *, mask=None, normalize=True, reduction="mean", backend="auto",
            process_group=None) -> Tensor:
    raise NotImplementedError
