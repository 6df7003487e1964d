"""Supervised contrastive loss (SupContrast L_out)."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def supcon_loss(features, labels=None, temperature=0.07, *, base_temperature=0.07, contrast_mode="all",
                normalize=True, reduction="mean", backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError
