"""SigLIP pairwise sigmoid loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def siglip_sum_reference(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias)), z = 2I − 1: the kernel primitive ``"siglip"``'s maths.

    Dense (stores B×B); accumulates in fp32 (float64 for float64 inputs).
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = scale.to(dt) * (x.to(dt) @ y.to(dt).T) + bias.to(dt)
    z = 2 * torch.eye(x.shape[0], y.shape[0], dtype=dt, device=x.device) - 1
    return F.softplus(-z * logits).sum()


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend="auto",
                process_group=None) -> Tensor:
    raise NotImplementedError
