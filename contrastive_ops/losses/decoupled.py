"""Losses whose positive is not in the denominator: dcl_loss (DCL/DCLW), dhel_loss."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def dcl_loss(z1, z2, temperature=0.1, *, weighted=False, sigma=0.5, normalize=True, reduction="mean",
             backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError


def dhel_loss(z1, z2, temperature=0.3, *, include_augs=True, normalize=True, reduction="mean",
              backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError
