"""Argument placement of the Triton ops: every tensor a kernel reads must be on the inputs' device.

A Triton kernel takes each tensor as a raw pointer: a CPU tensor next to CUDA
inputs fails at launch ("Pointer argument cannot be accessed from Triton"),
far from the call that put it there.  PyTorch's own ops accept a 0-dim CPU
tensor next to CUDA tensors as a scalar, so the ops do too: such a scalar
(a temperature, a bias, an upstream gradient) is copied to the inputs'
device.  Any other tensor elsewhere is an error naming the op and argument.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def scalar_on(op: str, name: str, t: Tensor, device: torch.device) -> Tensor:
    """The 0-dim or one-element tensor ``t`` on ``device``; a CPU scalar is copied there."""
    if t.numel() != 1:
        raise ValueError(f"{op}: {name} must be a 0-dim tensor, got shape {tuple(t.shape)}")
    if t.device == device:
        return t
    if t.device.type == "cpu" and t.dim() == 0:
        return t.to(device)
    raise ValueError(f"{op}: {name} is on {t.device}, the inputs on {device}: pass it on {device} "
                     "(or as a 0-dim CPU tensor)")


def same_device(op: str, device: torch.device, **tensors) -> None:
    """Raise unless every given tensor (``None`` skipped) is on ``device``."""
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, the inputs on {device}: every tensor argument "
                             f"must be on {device}")
