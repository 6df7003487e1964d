r"""Multi-view losses: MV-InfoNCE and MV-DHEL (Koromilas et al. 2025, official code).

Notation: N instances, V views, u_il the (normalized) feature of view l of
instance i, s(a, b) = a·b/τ, P_i the views present for instance i (all of
them without ``mask``).

MV-InfoNCE, ``variant="mv"`` (positives sit in the denominator; only the self
pair is left out)::

    ℓ_i = −LSE_{l≠l' ∈ P_i} s(u_il, u_il') + LSE_{l ∈ P_i} LSE_{(j,m) present, (j,m)≠(i,l)} s(u_il, u_jm)

MV-InfoNCE, ``variant="pairwise"``: the mean over ordered view pairs (l, l') of
CE(s(u_l, u_l') over the instances present in both views, targets = same
instance).

MV-DHEL (negatives from the same view only; the positives are in no
denominator)::

    ℓ_i = −LSE_{l<l' ∈ P_i} s(u_il, u_il') + Σ_{l ∈ P_i} LSE_{j≠i present in l} s(u_il, u_jl)

An absent view leaves every sum; an instance with |P_i| < 2 leaves the mean
(``reduction="none"`` gives 0 for it); an MV-DHEL view term whose LSE set is
empty is left out.

Layout: internally the features are a view-major (V, N, D) tensor, i.e. the
official code's z of shape (V·N, D) = [all of view 0; all of view 1; ...].

Fused compositions (``_fused_*``) call the similarity-LSE core once per loss
(once per unordered view pair for ``"pairwise"``) on the view-major (V·N, D)
features and keep everything else on O(V·N·D) and O(N·V²) tensors.  With a
mask, the candidates carry their present rows (``GlobalBatch.candidates(...,
present=...)``) and the core's index lists hold the present views first and the
absent ones after them with an empty candidate range (static length, no host
sync under ``torch.compile``; see ``contrastive_ops.losses._present_first``).

Under ``process_group`` (``contrastive_ops.distributed``) the instances are
all-gathered with gradient (the mask without); the anchors are this rank's
instances, the candidates every rank's.  The core runs this rank's anchor rows
against the gathered (V·N, D) stack, excluding each anchor's own global
position; the counts of the mean (instances that count, pairs) are global.
With ``exchange="ring"`` the same composition runs on a ring handle instead of
the gathered stack: each rank's (V·n, D) block travels with its mask rows, each
hop lists the visiting block's present rows first (``present_sim_lse``), and the
global counts are one small all-reduce.
The references compute the dense loss of the gathered batch and keep this
rank's instances.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _checks, backends
from .._numerics import masked_lse
from ..distributed import GlobalBatch, all_reduce_sum, uses_ring
from ..primitives.sim_lse import sim_lse
from ._common import cross_lse, inv_temperature, unit
from ._present_first import present_list, present_sim_lse

Tensor = torch.Tensor
VARIANTS = ("mv", "pairwise")


def _present(mask: Optional[Tensor], V: int, N: int, device) -> Tensor:
    """(V, N) bool: view l of instance i is present."""
    if mask is None:
        return torch.ones(V, N, dtype=torch.bool, device=device)
    return mask.T


def _pair_lse(U: Tensor, scale: Tensor, ok: Tensor) -> Tensor:
    """Per instance, LSE over the view pairs (l, l') with ``ok[i, l, l']`` of s(u_il, u_il').

    U (V, N, D) in the accumulation dtype; builds (N, V, V) only.  -inf (zero
    gradient) where no pair is allowed.
    """
    V, N, _ = U.shape
    P = torch.einsum("lnd,mnd->nlm", U, U) * scale
    return masked_lse(P.reshape(N, V * V), ok.reshape(N, V * V), 1)


def _not_eye(V: int, device) -> Tensor:
    return ~torch.eye(V, dtype=torch.bool, device=device)


# ---------------------------------------------------------------------------------------------
# References: dense, plain PyTorch, the formulas as written above
# ---------------------------------------------------------------------------------------------


def _reference_inputs(views: Tensor, temperature, mask: Optional[Tensor], normalize: bool, process_group):
    """The global batch of both references: ``(gb, U, scale, present, counted)``.

    Views (and mask) gathered over the instance axis, ``U`` the (normalized)
    views in the accumulation dtype, ``scale`` = 1/τ, ``present`` (V, N) and
    ``counted`` (N,): instances with at least 2 present views.
    """
    gb = GlobalBatch(views.shape[1], process_group, views.device)
    views = gb.gather(views, dim=1)
    mask = None if mask is None else gb.gather_nograd(mask)
    V, N, _ = views.shape
    U = unit(views, normalize)
    scale = inv_temperature(temperature, U)
    present = _present(mask, V, N, U.device)
    counted = present.sum(0) >= 2
    return gb, U, scale, present, counted


def mv_infonce_reference(views: Tensor, temperature, mask: Optional[Tensor] = None, *, variant: str = "mv",
                         normalize: bool = True, reduction: str = "mean", process_group=None) -> Tensor:
    """Exact dense MV-InfoNCE on view-major ``views`` (V, N, D); stores (V·N)² (``"mv"``) or N² per pair.

    ``reduction="none"`` gives (N,) with 0 for instances with fewer than 2
    present views.  For ``"pairwise"`` the per-instance value is that
    instance's share of the loss, scaled so that ``"mean"`` = sum / (number of
    instances that count): without a mask it is the mean over ordered view
    pairs of the instance's cross-entropy.
    """
    gb, U, scale, present, counted = _reference_inputs(views, temperature, mask, normalize, process_group)
    V, N, D = U.shape
    if variant == "mv":
        Z = U.reshape(V * N, D)
        S = (Z @ Z.T) * scale
        allowed = present.reshape(1, -1) & _not_eye(V * N, U.device)
        row = masked_lse(S, allowed, 1).view(V, N)
        den = masked_lse(row, present & counted[None, :], 0)
        ok = present.T[:, :, None] & present.T[:, None, :] & _not_eye(V, U.device)
        num = _pair_lse(U, scale, ok)
        values = torch.where(counted, den, 0) - torch.where(counted, num, 0)
        return gb.reduce(gb.local(values), reduction, gb.local(counted))
    # "pairwise": mean over ordered view pairs of the cross-entropy over the instances present in both.
    total = torch.zeros(N, dtype=U.dtype, device=U.device)
    n_pairs = torch.zeros((), dtype=U.dtype, device=U.device)
    eye = torch.eye(N, dtype=torch.bool, device=U.device)
    for l in range(V):
        for m in range(V):
            if l == m:
                continue
            both = present[l] & present[m]
            S = (U[l] @ U[m].T) * scale
            lse = masked_lse(S, both[:, None] & both[None, :], 1)
            ce = torch.where(both, lse, 0) - torch.where(both, S[eye], 0)
            n = both.sum()
            total = total + ce / n.clamp_min(1)
            n_pairs = n_pairs + (n > 0)
    values = total * counted.sum() / n_pairs.clamp_min(1)
    return gb.reduce(gb.local(values), reduction, gb.local(counted))


def mv_dhel_reference(views: Tensor, temperature, mask: Optional[Tensor] = None, *, normalize: bool = True,
                      reduction: str = "mean", process_group=None) -> Tensor:
    """Exact dense MV-DHEL on view-major ``views`` (V, N, D); stores V·N²."""
    gb, U, scale, present, counted = _reference_inputs(views, temperature, mask, normalize, process_group)
    V, N, D = U.shape
    S = torch.einsum("lnd,lmd->lnm", U, U) * scale  # (V, N, N): one Gram block per view
    allowed = present[:, :, None] & present[:, None, :] & _not_eye(N, U.device)
    lse = masked_lse(S, allowed, 2)  # (V, N), -inf where the view term's set is empty
    term = allowed.any(2)
    unif = torch.where(term, lse, 0).sum(0)
    ok = present.T[:, :, None] & present.T[:, None, :] & torch.ones(V, V, dtype=torch.bool, device=U.device).triu(1)
    align = _pair_lse(U, scale, ok)
    values = torch.where(counted, unif, 0) - torch.where(counted, align, 0)
    return gb.reduce(gb.local(values), reduction, gb.local(counted))


# ---------------------------------------------------------------------------------------------
# Fused compositions on the similarity-LSE core
# ---------------------------------------------------------------------------------------------


def _fused_mv_infonce(views: Tensor, temperature, mask: Optional[Tensor] = None, *, variant: str = "mv",
                      normalize: bool = True, reduction: str = "mean", backend: str,
                      process_group=None, exchange: str = "gather") -> Tensor:
    """MV-InfoNCE on the core: never builds (V·N)² or N² tensors.

    Anchors are this rank's instances (``views``, ``mask``: local, ``n`` of
    them), candidates every rank's (``N``; ``n == N`` in one process): gathered, or
    visited around the ring (``exchange="ring"``; the mask rows travel with their block).
    """
    V, n, D = views.shape
    gb = GlobalBatch(n, process_group, views.device, exchange)
    U = unit(views, normalize)  # (V, n, D) accumulation dtype: positives
    N = gb.total
    Uc = U.to(views.dtype)  # core operands in the input dtype
    Z = Uc.reshape(V * n, D)
    scale = inv_temperature(temperature, U)
    present = _present(mask, V, n, U.device)
    counted = present.sum(0) >= 2
    zero = U.sum() * 0 + torch.zeros(n, dtype=U.dtype, device=U.device)
    if variant == "mv":
        # every rank's view-major (V·N, D) stack (a ring handle, or gathered in the input dtype; one
        # process: Z itself, so the Gram kernels see one tensor), with its present rows under a mask
        Zg = gb.candidates(*U.unbind(0), dtype=views.dtype, stack=Z, present=None if mask is None else present)
        self_pos = gb.anchor_index(V, U.device)  # global position of each local anchor
        if mask is None:
            # Row (l, i): LSE over all V·N−1 others (self excluded, positives kept).
            row, _ = sim_lse(Z, Zg, scale, exclude=self_pos, backend=backend)
            den = torch.logsumexp(row.view(V, n), 0)
        else:
            # Present anchors first (rows), present candidates only; positions are the stack's.  Absent
            # anchors get an empty range (-inf).
            rows, _, _ = present_list(present.reshape(-1))
            end = torch.where(present.reshape(-1)[rows], V * N, 0)
            row_c, _ = present_sim_lse(Z, Zg, scale, row_index=rows, col_end=end, exclude=self_pos[rows],
                                       backend=backend)
            row = torch.full((V * n,), float("-inf"), dtype=row_c.dtype, device=U.device).index_put((rows,), row_c)
            den = masked_lse(row.view(V, n), present & counted[None, :], 0)
        ok = present.T[:, :, None] & present.T[:, None, :] & _not_eye(V, U.device)
        num = _pair_lse(U, scale, ok)
        values = torch.where(counted, den, 0) - torch.where(counted, num, 0)
        return gb.reduce(values, reduction, counted)

    # "pairwise": one core call per unordered pair (l, m); the row LSE is the
    # denominator of direction l→m, the column LSE that of m→l (``cross_lse``:
    # under "gather" two calls against the gathered views, gathered once here).
    # With a mask only the instances present in both views take part, and the
    # counts of the mean (per pair, instances that count) are global sums.
    Zc = None
    if gb.group is not None and not gb.ring:
        Zc = gb.candidates(*U.unbind(0), dtype=views.dtype).view(V, N, D)
    total = zero
    n_pairs = V * (V - 1) if mask is None else 0
    if mask is not None:
        co_present = (mask[:, :, None] & mask[:, None, :]).sum(0)  # (V, V): instances present in both views
        counts = all_reduce_sum(torch.cat([co_present.reshape(-1), counted.sum().reshape(1)]), gb.group)
        pair_count, n_counted = counts[:-1].view(V, V), counts[-1]
        mask_g = None if Zc is None else gb.gather_nograd(mask)
    for l in range(V):
        for m in range(l + 1, V):
            pos = (U[l] * U[m]).sum(-1) * scale  # (n,)
            kw = dict(backend=backend, q_all=None if Zc is None else Zc[l], k_all=None if Zc is None else Zc[m])
            if mask is None:
                r, c = cross_lse(Uc[l], Uc[m], scale, gb, **kw)
                total = total + (r + c - 2 * pos) / N
            else:
                both = mask[:, l] & mask[:, m]
                cnt = pair_count[l, m]
                r, c = cross_lse(Uc[l], Uc[m], scale, gb, present=both,
                                 present_all=None if mask_g is None else mask_g[:, l] & mask_g[:, m], **kw)
                ce = torch.where(both, r + c - 2 * pos, 0) / cnt.clamp_min(1)
                total = total + ce.to(total.dtype)
                n_pairs = n_pairs + 2 * (cnt > 0)  # a pair with no common instance leaves the mean
    if mask is None:
        values = total * N / n_pairs
    else:
        values = total * n_counted / n_pairs.clamp_min(1)
    return gb.reduce(values, reduction, counted)


def _fused_mv_dhel(views: Tensor, temperature, mask: Optional[Tensor] = None, *, normalize: bool = True,
                   reduction: str = "mean", backend: str, process_group=None, exchange: str = "gather") -> Tensor:
    """MV-DHEL on the core: one call over view-major features, each row limited to its own view block.

    Anchors are this rank's instances (``n``), candidates every rank's (``N``): gathered, or visited
    around the ring (``exchange="ring"``; the mask rows travel with their block).
    """
    V, n, D = views.shape
    gb = GlobalBatch(n, process_group, views.device, exchange)
    U = unit(views, normalize)
    N = gb.total
    Z = U.to(views.dtype).reshape(V * n, D)
    scale = inv_temperature(temperature, U)
    present = _present(mask, V, n, U.device)
    counted = present.sum(0) >= 2
    # One process: Z itself as the candidates, so the kernels take the symmetric Gram both ways.
    Zg = gb.candidates(*U.unbind(0), dtype=views.dtype, stack=Z, present=None if mask is None else present)
    self_pos = gb.anchor_index(V, U.device)  # global position of each local anchor
    view_of = torch.arange(V, device=Z.device).repeat_interleave(n)
    unif = U.sum() * 0 + torch.zeros(n, dtype=U.dtype, device=U.device)
    if mask is None:
        if N >= 2:  # with N = 1 every view term's set is empty and is left out
            start = view_of * N
            row, _ = sim_lse(Z, Zg, scale, col_start=start, col_end=start + N, exclude=self_pos,
                                  backend=backend)
            unif = unif + row.view(V, n).sum(0)
    else:
        # Present anchors first, each against the present rows of its own view's block [l·N, (l+1)·N)
        # of the stack (present candidates only).  Absent anchors get an empty range (-inf).
        rows, _, _ = present_list(present.reshape(-1))
        on = present.reshape(-1)[rows]
        start = view_of[rows] * N
        end = torch.where(on, start + N, start)
        row_c, _ = present_sim_lse(Z, Zg, scale, row_index=rows, col_start=start, col_end=end,
                                   exclude=self_pos[rows], backend=backend)
        term = on & (row_c > float("-inf"))  # else no other instance is present in that view: left out
        vals = torch.where(term, row_c, 0)
        flat = torch.zeros(V * n, dtype=vals.dtype, device=vals.device).index_put((rows,), vals)
        unif = unif + flat.view(V, n).sum(0)
    ok = present.T[:, :, None] & present.T[:, None, :] & torch.ones(V, V, dtype=torch.bool, device=U.device).triu(1)
    align = _pair_lse(U, scale, ok)
    values = torch.where(counted, unif, 0) - torch.where(counted, align, 0)
    return gb.reduce(values, reduction, counted)


# ---------------------------------------------------------------------------------------------
# Released code (peer): the official naive formulation, transcribed
# ---------------------------------------------------------------------------------------------


def mv_infonce_released(features: Tensor, temperature: float) -> Tensor:
    """MV-InfoNCE as the official code computes it (loss-notes §1), transcribed; no mask, mean over N.

    ``features`` (N, V, D).  View-major z (V·N, D), L2-normalized; the exp-Gram
    exp(z·zᵀ/τ) with its diagonal removed ((V·N)×(V·N−1)); its row chunks of N
    (one per view) laid side by side and summed, so instance i's denominator is
    Σ_l Σ_{(j,m)≠(i,l)}; the numerator 2·Σ_{l<l'} exp(s(u_il, u_il')).  Plain
    exp, no max shift: fine for |s| ≤ 1/τ in fp32 at τ ≥ 0.02.

    Computes in the dtype it is given (tests pass float64; under
    ``torch.autocast`` the Gram product runs in the autocast dtype and exp, sum
    and log in fp32, as AMP training runs the official code).  Stores the
    (V·N)² exp-Gram several times over: a peer for tests and the naive baseline
    of benchmarks.
    """
    N, V, D = features.shape
    z = F.normalize(features.transpose(0, 1).reshape(V * N, D), dim=1)
    n = V * N
    e = torch.exp(torch.mm(z, z.t()) / temperature)
    e = e.masked_select(~torch.eye(n, dtype=torch.bool, device=z.device)).view(n, n - 1)
    neg = torch.cat(torch.split(e, N), dim=1).sum(-1)  # (N,)
    vs = z.view(V, N, D)
    pos = sum(torch.exp((vs[l] * vs[m]).sum(-1) / temperature) for l in range(V) for m in range(l + 1, V))
    return -(torch.log(2 * pos / neg)).mean()


def mv_dhel_released(features: Tensor, temperature: float, *, product: bool = False) -> Tensor:
    """MV-DHEL as the official code computes it (loss-notes §1), transcribed; no mask, mean over N.

    ``features`` (N, V, D).  Per view an N×N exp-Gram without its diagonal,
    summed over rows: neg_l (V, N); the numerator Σ_{l<l'} exp(s(u_il, u_il')).
    ``product=True``: the ``MVDHEL`` class's −log(pos / Π_l neg_l), which
    overflows in fp32 at large N·V (tests use it in float64);
    ``product=False``: the ``CL_2`` form −log pos + Σ_l log neg_l, the same
    value.  Computes in the dtype it is given (see :func:`mv_infonce_released`).
    """
    vs = F.normalize(features, dim=-1).transpose(0, 1)  # (V, N, D)
    V, N, _ = vs.shape
    off = ~torch.eye(N, dtype=torch.bool, device=vs.device)
    negs = torch.stack([torch.exp(torch.mm(v, v.t()) / temperature).masked_select(off).view(N, N - 1).sum(-1)
                        for v in vs])
    pos = sum(torch.exp((vs[l] * vs[m]).sum(-1) / temperature) for l in range(V) for m in range(l + 1, V))
    if product:
        return -(torch.log(pos / torch.prod(negs, 0))).mean()
    return (torch.log(negs).sum(0) - torch.log(pos)).mean()


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check_common(features, mask, reduction):
    views = _checks.check_views("features", features, min_views=2)
    V, N, _ = views.shape
    _checks.check_mask("mask", mask, (N, V), views.device)
    _checks.check_reduction(reduction)
    return views


def mv_infonce(features, temperature=0.1, *, mask=None, variant="mv", normalize=True, reduction="mean",
               backend="auto", process_group=None, exchange="gather") -> Tensor:
    r"""MV-InfoNCE over V ≥ 2 views.

    Args:
        features: (N, V, D) tensor or a sequence of V tensors (N, D).
        temperature: τ > 0, a float or a 0-dim tensor (receives a gradient if it requires one).
        mask: optional (N, V) bool, True = view present.  Absent views leave every sum; instances
            with fewer than 2 present views leave the mean.
        variant: ``"mv"`` (official MV-InfoNCE: ℓ_i = −LSE_{l≠l'} s(u_il,u_il') +
            LSE_l LSE_{(j,m)≠(i,l)} s(u_il,u_jm)) or ``"pairwise"`` (mean over ordered view pairs of
            the N×N cross-entropy).
        normalize: L2-normalize the features first.
        reduction: ``"mean"`` (over instances that count), ``"sum"`` or ``"none"`` ((N,), 0 for the
            instances left out).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        exchange: ``"gather"`` or ``"ring"`` under ``process_group`` (see ``info_nce``); with
            ``"ring"`` the mask rows travel with the candidate blocks.

    Returns the loss in fp32 (float64 for float64 inputs).
    """
    views = _check_common(features, mask, reduction)
    _checks.check_choice("variant", variant, VARIANTS)
    temperature = _checks.as_scalar("temperature", temperature, views, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="mv_infonce", tensors=[views])
    kw = dict(variant=variant, normalize=normalize, reduction=reduction, process_group=process_group)
    if name == "reference" and not ring:
        return mv_infonce_reference(views, temperature, mask, **kw)
    return _fused_mv_infonce(views, temperature, mask, backend=name, exchange=exchange, **kw)


def mv_dhel(features, temperature=0.2, *, mask=None, normalize=True, reduction="mean", backend="auto",
            process_group=None, exchange="gather") -> Tensor:
    r"""MV-DHEL over V ≥ 2 views: ℓ_i = −LSE_{l<l'} s(u_il,u_il') + Σ_l LSE_{j≠i} s(u_il,u_jl).

    Arguments as :func:`mv_infonce` (no ``variant``).  Negatives come from the same view only; a
    view term whose LSE set is empty (no other instance present in that view) is left out.
    """
    views = _check_common(features, mask, reduction)
    temperature = _checks.as_scalar("temperature", temperature, views, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="mv_dhel", tensors=[views])
    kw = dict(normalize=normalize, reduction=reduction, process_group=process_group)
    if name == "reference" and not ring:
        return mv_dhel_reference(views, temperature, mask, **kw)
    return _fused_mv_dhel(views, temperature, mask, backend=name, exchange=exchange, **kw)
