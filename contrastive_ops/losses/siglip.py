r"""SigLIP pairwise sigmoid loss (big_vision ``siglip.py``, open_clip ``SigLipLoss``).

Maths
-----
With logits ``L_ij = s·x_i·y_j + b`` and labels ``z = 2I − 1`` (+1 on the
diagonal, −1 elsewhere)::

    loss = −(1/B) Σ_{i,j} log σ(z_ij·L_ij) = (1/B) Σ_{i,j} softplus(−z_ij·L_ij)

(divided by B, not B², as big_vision and open_clip do; no normalization
inside: the features arrive as the model gives them.)  With
``g_ij = ∂/∂L_ij softplus(−z_ij L_ij) = −z_ij·σ(−z_ij L_ij)``::

    dx_i = s Σ_j g_ij y_j,   dy_j = s Σ_i g_ij x_i,   ds = Σ_ij g_ij x_i·y_j,   db = Σ_ij g_ij

(each times the upstream gradient / B).

Kernel primitive ``"siglip"``
-----------------------------
A kernel backend implements the pair sum as an object in its ``PRIMITIVES``
under the key ``"siglip"`` with::

    forward(x, y, scale, bias) -> total                  0-dim, fp32 (float64 for float64 inputs)
    backward(x, y, scale, bias, grad) -> (dx, dy, dscale, dbias)

where ``x`` (B, D) and ``y`` (B, D) are contiguous, of one dtype (fp32, fp16,
bf16), ``scale`` and ``bias`` are 0-dim tensors in the accumulation dtype
(fp32, float64 for float64 inputs) on the features' device, ``total`` is
``Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias))`` (the maths of
``siglip_sum_reference``), ``grad`` is the 0-dim upstream gradient of
``total`` (accumulation dtype), ``dx``/``dy`` have the dtype and shape of
``x``/``y``, and ``dscale``/``dbias`` are 0-dim in the accumulation dtype.
The primitive never stores the B×B logits.  ``_SigLIPPairs`` wraps it in
autograd; the loss divides by B in PyTorch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import as_scalar
from ..core import acc_dtype
from .info_nce import _check_no_process_group, _check_pair

Tensor = torch.Tensor


def siglip_sum_reference(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias)), z = 2I − 1: the kernel primitive ``"siglip"``'s maths.

    Dense (stores B×B); accumulates in fp32 (float64 for float64 inputs).
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    logits = scale.to(dt) * (x.to(dt) @ y.to(dt).T) + bias.to(dt)
    z = 2 * torch.eye(x.shape[0], y.shape[0], dtype=dt, device=x.device) - 1
    return F.softplus(-z * logits).sum()


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias) -> Tensor:
    """Dense SigLIP loss: −(1/B) Σ_ij log σ(z_ij·(s·x_i·y_j + b)) (stores B×B)."""
    dt = acc_dtype(image_features.dtype)
    x, y = image_features.to(dt), text_features.to(dt)
    s = as_scalar("logit_scale", logit_scale, x)
    b = as_scalar("logit_bias", logit_bias, x)
    logits = s * (x @ y.T) + b
    B = x.shape[0]
    labels = -torch.ones(B, B, dtype=dt, device=x.device)
    labels.diagonal().fill_(1.0)
    return -F.logsigmoid(labels * logits).sum() / B


class _SigLIPPairs(torch.autograd.Function):
    """Autograd wrapper of a backend's ``"siglip"`` primitive (the pair sum, not yet divided by B)."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, backend):
        prim = backends.primitive(backend, "siglip")
        total = prim.forward(x, y, scale, bias)
        ctx.prim = prim
        ctx.save_for_backward(x, y, scale, bias)
        return total

    @staticmethod
    def backward(ctx, grad):
        x, y, scale, bias = ctx.saved_tensors
        dx, dy, dscale, dbias = ctx.prim.backward(x, y, scale, bias, grad.reshape(()).to(scale.dtype))
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dy if needs[1] else None,
            dscale if needs[2] else None,
            dbias if needs[3] else None,
            None,
        )


def _fused_siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend: str) -> Tensor:
    """SigLIP on the ``"siglip"`` primitive; ``backend="reference"`` runs its dense maths instead."""
    x, y = image_features, text_features
    s = as_scalar("logit_scale", logit_scale, x).reshape(())
    b = as_scalar("logit_bias", logit_bias, x).reshape(())
    if backend == "reference":
        total = siglip_sum_reference(x, y, s, b)
    else:
        total = _SigLIPPairs.apply(x.contiguous(), y.contiguous(), s, b, backend)
    return total / x.shape[0]


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend="auto",
                process_group=None) -> Tensor:
    r"""SigLIP loss: −(1/B) Σ_{i,j} log σ(z_ij·(s·x_i·y_j + b)), z = 2I − 1.

    Args:
        image_features, text_features: (B, D) each, same device and dtype; not normalized here.
        logit_scale: s > 0, already exponentiated (as open_clip passes it), float or 0-dim tensor.
        logit_bias: b, float or 0-dim tensor.  Tensors requiring grad get their gradients.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.

    Returns:
        0-dim fp32 loss (float64 for float64 inputs); gradients in the input dtype.
    """
    _check_pair("image_features", image_features, "text_features", text_features, same_rows=True)
    as_scalar("logit_scale", logit_scale, image_features, positive=True)
    as_scalar("logit_bias", logit_bias, image_features)
    _check_no_process_group(process_group)
    name = backends.resolve(backend, op="siglip_loss", tensors=(image_features, text_features))
    if name == "reference":
        return siglip_loss_reference(image_features, text_features, logit_scale, logit_bias)
    return _fused_siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=name)
