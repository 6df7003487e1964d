"""Masked point-token contrast (Point-CMAE) over co-masked token sets."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def point_token_contrast(f1, f2, mask1, mask2, *, mode="infonce", temperature=0.1, pairing="diag",
                         negatives="cloud", backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError
