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

Fused composition: the pair sum Σ_ij softplus(−z_ij·L_ij) is the primitive
``"siglip"`` (``contrastive_ops.primitives.siglip_pairs``: contract, dense
reference, autograd Function); this module divides it by the global B.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import as_scalar, check_pair
from .._numerics import acc_dtype
from ..distributed import GlobalBatch, uses_ring
from ..primitives.siglip_pairs import siglip_pairs

Tensor = torch.Tensor


def siglip_loss_reference(image_features, text_features, logit_scale, logit_bias, process_group=None) -> Tensor:
    """Dense SigLIP loss: −(1/B) Σ_ij log σ(z_ij·(s·x_i·y_j + b)) (stores B×B).

    Under ``process_group``: the global batch's loss restricted to this rank's images (rows).
    """
    dt = acc_dtype(image_features.dtype)
    gb = GlobalBatch(image_features.shape[0], process_group, image_features.device)
    x, y = gb.gather(image_features).to(dt), gb.gather(text_features).to(dt)
    s = as_scalar("logit_scale", logit_scale, x)
    b = as_scalar("logit_bias", logit_bias, x)
    logits = s * (x @ y.T) + b
    B = x.shape[0]
    labels = -torch.ones(B, B, dtype=dt, device=x.device)
    labels.diagonal().fill_(1.0)
    if process_group is None:
        return -F.logsigmoid(labels * logits).sum() / B
    return gb.reduce(gb.local(-F.logsigmoid(labels * logits).sum(1)), "mean")


def _fused_siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend: str,
                       process_group=None, exchange="gather") -> Tensor:
    """SigLIP on the ``"siglip"`` primitive; ``backend="reference"`` runs its dense maths instead.

    Under ``process_group`` the local images (n rows) meet all N gathered
    texts, rotated so that this rank's texts come first: the positive pairs
    are then (i, i) of the n×N pair sum, as the primitive expects.  The loss
    divides by the global B (``gb.reduce`` of the per-rank total).
    ``exchange="ring"``: the text blocks visit every rank instead, the
    positives being the pairs with the rank's own block.
    """
    x, y = image_features, text_features
    s = as_scalar("logit_scale", logit_scale, x).reshape(())
    b = as_scalar("logit_bias", logit_bias, x).reshape(())
    gb = GlobalBatch(x.shape[0], process_group, x.device, exchange)
    if gb.ring:
        y = gb.candidates(y)
    elif process_group is not None:
        Y = gb.gather(y)
        y = torch.cat([Y[gb.offset:], Y[:gb.offset]])
    total = siglip_pairs(x, y, s, b, backend=backend)
    return gb.mean_from_sum(total)  # total / B, B the global batch size


def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, backend="auto",
                process_group=None, exchange="gather") -> Tensor:
    r"""SigLIP loss: −(1/B) Σ_{i,j} log σ(z_ij·(s·x_i·y_j + b)), z = 2I − 1.

    Args:
        image_features, text_features: (B, D) each, same device and dtype; not normalized here.
        logit_scale: s > 0, already exponentiated (as open_clip passes it), float or 0-dim tensor.
        logit_bias: b, float or 0-dim tensor.  Tensors requiring grad get their gradients.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        exchange: ``"gather"`` or ``"ring"`` under ``process_group`` (see ``info_nce``).

    Returns:
        0-dim fp32 loss (float64 for float64 inputs); gradients in the input dtype.
    """
    check_pair("image_features", image_features, "text_features", text_features, same_rows=True)
    as_scalar("logit_scale", logit_scale, image_features, positive=True)
    as_scalar("logit_bias", logit_bias, image_features)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="siglip_loss", tensors=(image_features, text_features))
    if name == "reference" and not ring:
        return siglip_loss_reference(image_features, text_features, logit_scale, logit_bias, process_group)
    return _fused_siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=name,
                              process_group=process_group, exchange=exchange)
