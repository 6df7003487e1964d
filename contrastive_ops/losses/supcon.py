r"""Supervised contrastive loss (SupContrast L_out, Khosla et al. 2020).

Anchors a run over the V·N features, view-major (view 0's N instances first);
``contrast_mode="one"`` keeps the N anchors of view 0.  The contrast set is
always all V·N features.  With labels y (``None``: the instance ids)::

    P(a) = {c ≠ a : y_c = y_a}
    ℓ_a  = −(τ/τ_b) · (1/|P(a)|) Σ_{p∈P(a)} [ s_ap − LSE_{c≠a} s_ac ]
         = −(τ/τ_b) · [ (1/|P(a)|) Σ_{p∈P(a)} s_ap − LSE_{c≠a} s_ac ]

Positives are in the denominator; only self is left out.  Anchors with
P(a) = ∅ leave the mean (``reduction="none"`` gives 0 for them); if none has a
positive the loss is 0 and still in the graph.

Fused composition: one core call for LSE_{c≠a} s_ac; the positive sum
Σ_{p∈P(a)} s_ap = u_a·(Σ_{c: y_c=y_a} u_c − u_a)/τ uses per-label sums of the
features, |P(a)| = V·#{i: y_i = y_a} − 1.  The label sums are summed in an
order fixed by the data (``_common.index_sum``, not ``index_add``, whose CUDA
atomics and indexing backward change the rounding from run to run).

Queue (``queue`` Q (K, D), ``queue_labels`` y_Q (K,)): K extra contrast
candidates, never anchors, normalized like the features.  They join every
anchor's denominator; with ``queue_labels`` those with y_Q = y_a join P(a)
(pytorch-metric-learning ``CrossBatchMemory`` + ``SupConLoss``); without,
they are negatives only.  Fused: the queue's LSE comes from a second core
call (anchors against Q) merged with ``logaddexp``, its positive sums from
per-label sums of Q over the joint label groups of batch and queue; no A×K
buffer.  The queue is not gathered under ``process_group`` (it is the same on
every rank).

Under ``process_group`` the features and labels (instance ids without labels)
are all-gathered, the anchors are this rank's instances (in each view), the
contrast set and the label groups are global; the reference keeps this rank's
anchors of the dense loss on the gathered batch.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _checks, backends
from .._checks import as_scalar
from .._numerics import masked_lse
from ..distributed import GlobalBatch, uses_ring
from ..primitives.sim_lse import sim_lse
from ._common import global_label_sum, label_sum, supcon_setup, unit

Tensor = torch.Tensor
CONTRAST_MODES = ("all", "one")


def supcon_reference(views: Tensor, labels: Optional[Tensor], temperature, base_temperature, *,
                     contrast_mode: str = "all", normalize: bool = True, reduction: str = "mean",
                     process_group=None, queue: Optional[Tensor] = None,
                     queue_labels: Optional[Tensor] = None) -> Tensor:
    """Exact dense SupCon on view-major ``views`` (V, N, D); stores A × (V·N + K)."""
    gb = GlobalBatch(views.shape[1], process_group, views.device)
    views = gb.gather(views, dim=1)
    labels = None if labels is None else gb.gather_nograd(labels)
    V, N, D = views.shape
    U = unit(views, normalize)
    t = as_scalar("temperature", temperature, U)
    factor = t / as_scalar("base_temperature", base_temperature, U)
    Z = U.reshape(V * N, D)
    A = N if contrast_mode == "one" else V * N
    K = 0 if queue is None else queue.shape[0]
    C = Z if queue is None else torch.cat([Z, unit(queue, normalize)], 0)  # contrast set: batch, then queue
    S = (Z[:A] @ C.T) / t
    not_self = ~torch.eye(A, V * N + K, dtype=torch.bool, device=U.device)
    lse = masked_lse(S, not_self, 1)
    y = (torch.arange(N, device=U.device) if labels is None else labels).repeat(V)
    pos = (y[:A, None] == y[None, :])
    if K:
        q_pos = (y[:A, None] == queue_labels[None, :]) if queue_labels is not None \
            else torch.zeros(A, K, dtype=torch.bool, device=U.device)
        pos = torch.cat([pos, q_pos], 1)
    pos = pos & not_self
    npos = pos.sum(1)
    has = npos > 0
    mean_pos = torch.where(pos, S, 0).sum(1) / npos.clamp_min(1)
    values = -factor * (mean_pos - torch.where(has, lse, 0))
    values = torch.where(has, values, 0)
    groups = 1 if contrast_mode == "one" else V
    return gb.reduce(gb.local_anchors(values, groups), reduction, gb.local_anchors(has, groups))


def _fused_supcon(views: Tensor, labels: Optional[Tensor], temperature, base_temperature, *,
                  contrast_mode: str = "all", normalize: bool = True, reduction: str = "mean",
                  backend: str, process_group=None, queue: Optional[Tensor] = None,
                  queue_labels: Optional[Tensor] = None, exchange: str = "gather") -> Tensor:
    """SupCon on the core: one similarity-LSE call, label sums in PyTorch; never builds A × V·N.

    Anchors are this rank's (``n`` instances per view), the contrast set every
    rank's V·N features (``gb.candidates``: gathered, or visited around the
    ring); the positives' feature sums per label come from
    ``global_label_sum`` (gathered, or a ring pass of (sum, label) blocks).
    """
    V, n, D = views.shape
    gb, U, _, labels, factor, scale = supcon_setup(views, labels, temperature, base_temperature, normalize,
                                                   process_group, gather=False, exchange=exchange)
    groups = 1 if contrast_mode == "one" else V
    Za = U[:groups].reshape(groups * n, D)  # this rank's anchors, view-major
    a = gb.anchor_index(groups, U.device)  # their positions in the contrast set
    # Anchor a sits at column a of the contrast set: exclude it.
    if gb.group is None:  # every view an anchor: anchors and candidates are the same tensor (Gram kernels)
        Zk = U.reshape(V * n, D).to(views.dtype)
        Zak = Zk if groups == V else Za.to(views.dtype)
    else:
        Zk = gb.candidates(*U.unbind(0), dtype=views.dtype)
        Zak = Za.to(views.dtype)
    lse, _ = sim_lse(Zak, Zk, scale, exclude=a, backend=backend)
    K = 0 if queue is None else queue.shape[0]
    labelled_queue = K > 0 and queue_labels is not None
    # W_i = Σ_{j: y_j = y_i} Σ_v u_vj over every rank's instances: the features of i's label, all views.
    inst_sum = U.sum(0)  # (n, D)
    if labels is None:
        W = inst_sum
        cnt = torch.full((n,), V, dtype=torch.long, device=U.device)
    else:
        W = global_label_sum(gb, inst_sum, labels)
        cnt = global_label_sum(gb, torch.full((n, 1), V, dtype=torch.long, device=U.device), labels)[:, 0]
    # Anchor (v, i) of this rank: positives are the other V·|y_i| − 1 features of its label.
    Za3 = U[:groups]  # (groups, n, D)
    pos_sum = ((W[None] - Za3) * Za3).sum(-1).reshape(groups * n) * scale  # Σ_{p∈P(a)} s_ap over the batch
    npos = (cnt - 1).repeat(groups)
    if K > 0:
        Qu = unit(queue, normalize)
        q_lse, _ = sim_lse(Zak, Qu.to(views.dtype), scale, backend=backend)
        lse = torch.logaddexp(lse, q_lse)
    if labelled_queue:  # queue entries with the anchor's label are positives too
        QW = label_sum(Qu, queue_labels, labels)  # (n, D): the queue features of instance i's label
        q_cnt = label_sum(torch.ones_like(queue_labels, dtype=torch.long), queue_labels, labels)
        pos_sum = pos_sum + (QW[None] * Za3).sum(-1).reshape(groups * n) * scale
        npos = npos + q_cnt.repeat(groups)
    has = npos > 0
    mean_pos = pos_sum / npos.clamp_min(1)
    values = -factor * (mean_pos - torch.where(has, lse, 0))
    values = torch.where(has, values, 0)
    return gb.reduce(values, reduction, has)


def supcon_loss(features, labels=None, temperature=0.07, *, base_temperature=0.07, contrast_mode="all",
                normalize=True, reduction="mean", backend="auto", process_group=None, queue=None,
                queue_labels=None, exchange="gather") -> Tensor:
    r"""Supervised contrastive loss (SupContrast L_out).

    Args:
        features: (N, V, D), or (N, D) as a single view.
        labels: optional (N,) integer tensor; ``None`` makes the other views of the same instance
            the positives.
        temperature: τ > 0 (float or 0-dim tensor); base_temperature: τ_b > 0.
        contrast_mode: ``"all"`` (V·N anchors) or ``"one"`` (the N anchors of view 0).
        normalize: L2-normalize the features first (SupContrast itself expects normalized input).
        reduction: ``"mean"`` over anchors with a positive, ``"sum"``, or ``"none"``: (V·N,)
            view-major for ``"all"``, (N,) for ``"one"``, 0 for anchors without a positive.
        queue: optional (K, D) extra contrast candidates (never anchors), same dtype and device as the
            features, normalized like them; they get gradient only if they require it.
        queue_labels: optional (K,) integer labels of the queue entries (needs ``labels``): entries with
            the anchor's label are positives too.  Without them the queue holds negatives only.
        exchange: ``"gather"`` or ``"ring"`` under ``process_group`` (see ``info_nce``).

    ℓ_a = −(τ/τ_b)·mean_{p∈P(a)}[s_ap − LSE_{c≠a} s_ac].  Returns fp32 (float64 for float64 inputs).
    """
    views = _checks.check_views("features", features, min_views=1, allow_single=True)
    V, N, _ = views.shape
    if labels is not None:
        _checks.check_labels("labels", labels, N, views.device)
    if queue is not None:
        _checks.check_queue(queue, "features", features if isinstance(features, torch.Tensor) else views)
    _checks.check_queue_labels(queue_labels, queue)
    if queue_labels is not None and labels is None:
        raise ValueError(
            f"queue_labels (shape {_checks.shape_str(queue_labels)}) needs labels: without labels the "
            f"positives are instance ids, which queue entries cannot share"
        )
    _checks.check_choice("contrast_mode", contrast_mode, CONTRAST_MODES)
    _checks.check_reduction(reduction)
    temperature = _checks.as_scalar("temperature", temperature, views, positive=True)
    base_temperature = _checks.as_scalar("base_temperature", base_temperature, views, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="supcon_loss", tensors=[views])
    kw = dict(contrast_mode=contrast_mode, normalize=normalize, reduction=reduction, process_group=process_group,
              queue=queue, queue_labels=queue_labels)
    if name == "reference" and not ring:
        return supcon_reference(views, labels, temperature, base_temperature, **kw)
    return _fused_supcon(views, labels, temperature, base_temperature, backend=name, exchange=exchange, **kw)
