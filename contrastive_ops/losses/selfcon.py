r"""Self-contrastive learning (SelfCon, Bae et al. 2023), raymin0223/Self-Contrastive-Learning.

One augmented view per image; the "views" are the L2-normalized outputs of
the sub-network exits and of the backbone's head, stacked as
``features = (N, V, D)`` with the backbone **last** (as ``main_represent.py``
stacks ``[sub exits..., backbone]``).  The loss is the SupContrast ``ConLoss``
on them (``losses/losses.py``).  Samples ``c`` run over the V·N features,
view-major (view 0's N instances first); y are the labels (``None``: the
instance ids, so positives are the other exits of the same image)::

    s_ac   = u_a·u_c / τ
    P(a)   = {c ≠ a in C : y_c = y_a}
    ℓ_a(C) = −(τ/τ_b) · [ (1/|P(a)|) Σ_{p∈P(a)} s_ap − LSE_{c∈C, c≠a} s_ac ]

``alpha = 0`` (the official default, SelfCon-S): every sample is an anchor
and C is all V·N samples — SupCon over the exits::

    L = mean_{a : P(a)≠∅} ℓ_a(all)

``alpha > 0`` (``selfcon_s_FG`` in the official code): the sub-network
outputs (views 0..V−2) are the anchors of the self-contrastive term, with all
V·N samples as candidates; with labels, a SupCon term on the backbone view
alone is added (``supcon_s=True``: its anchors without a positive leave its
mean)::

    L = [labels given] · mean_{a∈backbone, P_bb(a)≠∅} ℓ_a(backbone)
        + α · mean_{a∈sub exits} ℓ_a(all)

``reduction="none"`` returns (V·N,) view-major: sub-exit anchors hold
α·ℓ_a(all) (ℓ_a(all) for ``alpha=0``), backbone anchors ℓ_a(backbone)
(ℓ_a(all) for ``alpha=0``), 0 where an anchor has no positive or, for
``alpha > 0`` without labels, no term.  ``"sum"`` sums that vector; ``"mean"``
is the formula above (each mean over its anchors that count, 0 if none does).

Code and paper.  The paper's SelfCon loss is the ``alpha = 0`` form: every
exit's output is an anchor and contrasts the outputs of all exits of the
batch.  ``alpha > 0`` is an option of the released code (``--alpha``), given
here as that code computes it.  The code's ``ConLoss`` subtracts a detached
row max (self included) and masks self with 0/1, which leaves the value
above unchanged up to rounding; unlike SupContrast it adds no ε inside the
log.  The code is followed throughout.  It does not normalize inside the
loss (the network does); ``normalize=True`` normalizes here.  Not provided:
the official multi-view ``selfcon_m_FG`` branch (two augmented views,
``alpha > 0``) and the memory queue; for ``alpha = 0`` the multi-view
variant is this function on the (2N, V, D) stack with the labels repeated,
as the official code calls it.

Fused composition: one ``sim_lse`` call per term (all anchors against all
samples; the backbone view against itself), positive sums from per-label
feature sums, as ``supcon_loss``.  Under ``process_group`` the features and
labels are all-gathered, the anchors are this rank's instances (in each
anchor view), the candidates and label groups global.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _checks, backends
from .._checks import as_scalar
from .._numerics import masked_lse
from ..distributed import GlobalBatch
from ..primitives.sim_lse import sim_lse
from ._common import index_sum, label_groups, supcon_setup, take_rows, unit

Tensor = torch.Tensor


def _dense_term(Z: Tensor, y: Tensor, anchors: Tensor, cands: Tensor, t: Tensor, factor: Tensor
                ) -> Tuple[Tensor, Tensor]:
    """ℓ_a over the candidate rows ``cands`` of ``Z`` for the anchor rows ``anchors`` (dense); (values, has)."""
    S = (Z[anchors] @ Z[cands].T) / t
    not_self = anchors[:, None] != cands[None, :]
    lse = masked_lse(S, not_self, 1)
    pos = (y[anchors][:, None] == y[cands][None, :]) & not_self
    npos = pos.sum(1)
    has = npos > 0
    mean_pos = torch.where(pos, S, 0).sum(1) / npos.clamp_min(1)
    values = -factor * (mean_pos - torch.where(has, lse, 0))
    return torch.where(has, values, 0), has


def selfcon_reference(views: Tensor, labels: Optional[Tensor], temperature, base_temperature, *,
                      alpha: float = 0.0, normalize: bool = True, reduction: str = "mean",
                      process_group=None) -> Tensor:
    """Exact dense SelfCon on view-major ``views`` (V, N, D), backbone last; stores anchors × V·N."""
    gb = GlobalBatch(views.shape[1], process_group, views.device)
    views = gb.gather(views, dim=1)
    labels = None if labels is None else gb.gather_nograd(labels)
    V, N, D = views.shape
    U = unit(views, normalize)
    t = as_scalar("temperature", temperature, U)
    factor = t / as_scalar("base_temperature", base_temperature, U)
    Z = U.reshape(V * N, D)
    y = (torch.arange(N, device=U.device) if labels is None else labels).repeat(V)
    every = torch.arange(V * N, device=U.device)
    if alpha == 0:
        values, has = _dense_term(Z, y, every, every, t, factor)
        return gb.reduce(gb.local_anchors(values, V), reduction, gb.local_anchors(has, V))
    sub, bb = every[: (V - 1) * N], every[(V - 1) * N:]
    v_sub, h_sub = _dense_term(Z, y, sub, every, t, factor)
    v_sub, h_sub = gb.local_anchors(v_sub, V - 1), gb.local_anchors(h_sub, V - 1)
    if labels is None:
        v_bb = torch.zeros(N, dtype=U.dtype, device=U.device)
        h_bb = torch.zeros(N, dtype=torch.bool, device=U.device)
    else:
        v_bb, h_bb = _dense_term(Z, y, bb, bb, t, factor)
    v_bb, h_bb = gb.local(v_bb), gb.local(h_bb)
    return _combine(gb, alpha * v_sub, h_sub, v_bb, h_bb, reduction)


def _combine(gb: GlobalBatch, v_sub: Tensor, h_sub: Tensor, v_bb: Tensor, h_bb: Tensor, reduction: str) -> Tensor:
    """``alpha > 0``: (V·N,) view-major per-anchor values, their sum, or mean_bb + α·mean_sub."""
    if reduction == "mean":
        return gb.reduce(v_bb, "mean", h_bb) + gb.reduce(v_sub, "mean", h_sub)
    return gb.reduce(torch.cat([v_sub, v_bb]), reduction)


def _fused_term(Za: Tensor, a: Tensor, Z: Tensor, Zk: Tensor, Zak: Tensor, gid: Tensor, scale: Tensor,
                factor: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """ℓ_a over all rows of ``Z`` (kernel copy ``Zk``) for anchors ``Za`` at rows ``a`` (kernel copy ``Zak``)."""
    lse, _ = sim_lse(Zak, Zk, scale, exclude=a, backend=backend)
    C, D = Z.shape
    # label sums in an order fixed by the data (index_sum / take_rows: no atomics on CUDA)
    group_sum = index_sum(Z, gid, C)
    group_cnt = index_sum(torch.ones_like(gid), gid, C)
    ga = gid[a]
    pos_sum = ((take_rows(group_sum, ga) - Za) * Za).sum(-1) * scale  # Σ_{p∈P(a)} s_ap
    npos = take_rows(group_cnt, ga) - 1
    has = npos > 0
    values = -factor * (pos_sum / npos.clamp_min(1) - torch.where(has, lse, 0))
    return torch.where(has, values, 0), has


def _fused_selfcon(views: Tensor, labels: Optional[Tensor], temperature, base_temperature, *,
                   alpha: float = 0.0, normalize: bool = True, reduction: str = "mean", backend: str,
                   process_group=None) -> Tensor:
    """SelfCon on the ``sim_lse`` core: one call per term, label sums in PyTorch; never builds anchors × V·N."""
    V, n, D = views.shape
    gb, U, Ug, labels, factor, scale = supcon_setup(views, labels, temperature, base_temperature, normalize,
                                                    process_group)
    N = Ug.shape[1]
    gid = label_groups(labels, N, U.device)
    one = gb.group is None
    if alpha == 0:
        Z = Ug.reshape(V * N, D)
        Zk = Z.to(views.dtype)
        Za = U.reshape(V * n, D)
        Zak = Zk if one else Za.to(views.dtype)  # one process: the Gram kernels (q is k)
        values, has = _fused_term(Za, gb.anchor_index(V, U.device), Z, Zk, Zak, gid.repeat(V), scale, factor,
                                  backend)
        return gb.reduce(values, reduction, has)
    Z = Ug.reshape(V * N, D)
    Zk = Z.to(views.dtype)
    Za = U[: V - 1].reshape((V - 1) * n, D)
    v_sub, h_sub = _fused_term(Za, gb.anchor_index(V - 1, U.device), Z, Zk, Za.to(views.dtype), gid.repeat(V),
                               scale, factor, backend)
    if labels is None:
        v_bb = torch.zeros(n, dtype=U.dtype, device=U.device)
        h_bb = torch.zeros(n, dtype=torch.bool, device=U.device)
    else:
        Zb = Ug[V - 1]  # (N, D): the backbone view is its own contrast set
        Zbk = Zb.to(views.dtype)
        Zba = U[V - 1]
        v_bb, h_bb = _fused_term(Zba, gb.anchor_index(1, U.device), Zb, Zbk, Zbk if one else Zba.to(views.dtype),
                                 gid, scale, factor, backend)
    return _combine(gb, alpha * v_sub, h_sub, v_bb, h_bb, reduction)


def selfcon_loss(features, labels=None, temperature=0.07, *, base_temperature=0.07, alpha=0.0, normalize=True,
                 reduction="mean", backend="auto", process_group=None) -> Tensor:
    r"""Self-contrastive loss (SelfCon): SupCon over the outputs of a network's sub-network exits.

    Args:
        features: (N, V, D), or a sequence of V (N, D) tensors: the exits' outputs of one view,
            the sub-network exits first and the backbone's head **last**; V >= 2.
        labels: optional (N,) integer tensor; ``None`` makes the other exits of the same image the
            positives (unsupervised SelfCon).
        temperature: τ > 0 (float or 0-dim tensor); base_temperature: τ_b > 0.
        alpha: 0 (default): SupCon over all exits.  > 0: α·(sub-exit anchors against all exits)
            plus, with labels, SupCon on the backbone view alone (official ``selfcon_s_FG``).
        normalize: L2-normalize the features first (the official network does it before the loss).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` ((V·N,) view-major; see the module docstring).

    Returns fp32 (float64 for float64 inputs).
    """
    views = _checks.check_views("features", features, min_views=2)
    V, N, D = views.shape
    if labels is not None:
        _checks.check_labels("labels", labels, N, views.device)
    _checks.check_reduction(reduction)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0 or alpha == float("inf"):
        raise ValueError(f"alpha must be a finite float >= 0, got {alpha!r} (features of {V} views of shape ({N}, {D}))")
    temperature = _checks.as_scalar("temperature", temperature, views, positive=True)
    base_temperature = _checks.as_scalar("base_temperature", base_temperature, views, positive=True)
    name = backends.resolve(backend, op="selfcon_loss", tensors=[views])
    kw = dict(alpha=float(alpha), normalize=normalize, reduction=reduction, process_group=process_group)
    if name == "reference":
        return selfcon_reference(views, labels, temperature, base_temperature, **kw)
    return _fused_selfcon(views, labels, temperature, base_temperature, backend=name, **kw)
