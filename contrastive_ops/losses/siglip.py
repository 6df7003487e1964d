"""SigLIP pairwise sigmoid loss."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend="auto",
                process_group=None) -> Tensor:
    raise NotImplementedError
