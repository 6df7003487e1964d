"""InfoNCE family: info_nce, clip_loss, nt_xent, similarity_lse."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def info_nce(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
             reduction="mean", backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError


def clip_loss(image_features, text_features, logit_scale, *, backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError


def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
            process_group=None) -> Tensor:
    raise NotImplementedError


def similarity_lse(query, key, scale, *, backend="auto", process_group=None) -> Tensor:
    raise NotImplementedError
