r"""InfoNCE family: ``info_nce``, ``clip_loss``, ``nt_xent``, ``similarity_lse``.

Maths
-----
With ``s(a, b) = â·b̂ / τ`` (``normalize=True``, ``û = u/max(‖u‖, 1e-12)``) or
``a·b / τ``, and ``S = scale · Q Kᵀ`` (``scale = 1/τ``)::

    info_nce     ℓ_i = −S[i, t_i] + LSE_j S[i, j]                     (B,)   t = targets or arange(B)
      symmetric  ℓ_i = ½(ℓ_i^row + ℓ_i^col),
                 ℓ_i^col = −S[i, i] + LSE_j S[j, i]                     (needs M == B)
    clip_loss    ½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)]  = info_nce(I, T, symmetric, scale = s,
                 no normalization, mean)
    nt_xent      Z = cat(ẑ1, ẑ2) (2N, D);  ℓ_a = −S[a, a±N] + LSE_{b≠a} S[a, b]      (2N,)
                 view-1 anchors first; the positive stays in the denominator
    similarity_lse  LSE_j (scale · q_i·k_j)                             (B,)

Queues (``queue`` Q (K, D), normalized like the keys): K extra candidates in
every anchor's denominator, never anchors or positives::

    info_nce     ℓ_i = −S[i, t_i] + log(Σ_j e^{S[i, j]} + Σ_m e^{s(q_i, Q_m)})
      in_batch_negatives=False (MoCo v2): the keys' sum is e^{S[i, t_i]} alone
    nt_xent      ℓ_a = −S[a, a±N] + log(Σ_{b≠a} e^{S[a, b]} + Σ_m e^{s(z_a, Q_m)})

Negative shaping (HCL, Robinson et al. 2021, joshr17/HCL; debiased CL, Chuang
et al. 2020), ``hard_negative_beta`` β ≥ 0 and ``debias_tau_plus`` τ⁺ ∈ [0, 1):
with the M_i negatives j of anchor i (its candidates other than its positive,
queue included) and p_i = e^{x_i}, x_i its positive logit::

    reweighted_i = M_i · Σ_j e^{(1+β)s_ij} / Σ_j e^{β s_ij}
    Ng_i         = max((reweighted_i − τ⁺·M_i·p_i) / (1 − τ⁺),  M_i·e^{−1/τ})
    ℓ_i          = −log(p_i / (p_i + Ng_i))

The weights e^{β s_ij} are not detached.  β = τ⁺ = 0 (the defaults) is the
plain loss, computed by the plain path.  ``symmetric=True`` shapes both the row
and the column terms (the column anchor is key i, its negatives the other
queries).  The fused compositions need two LSEs over the negatives only,
``LSE_j (1+β)s_ij`` and ``LSE_j β s_ij``: two core calls at the scales (1+β)/τ
and β/τ with the positive excluded (the β/τ call is skipped at β = 0, where
that LSE is log M_i), then O(B) maths in the log domain::

    r_i = LSE_j (1+β)s_ij − LSE_j β s_ij                 (log of reweighted_i / M_i)
    log Ng_i = log M_i + max(r_i + log(1 − τ⁺ e^{x_i − r_i}) − log(1 − τ⁺),  −1/τ)
    ℓ_i = logaddexp(x_i, log Ng_i) − x_i

False-negative filter (``false_negative_margin`` m, as in the Qwen3-Embedding
training loss; needs ``normalize=True``): a negative j of anchor i is left out
of the denominator when cos(a_i, c_j) > cos(a_i, c_pos) + m, on detached
cosines (the threshold carries no gradient).  It applies to every negative
(keys, queue, the other view's rows) and never to the positive.  With β or τ⁺,
M_i counts the kept negatives only.  ``symmetric=True``: each direction filters
its own anchor's negatives — the row term drops key j when cos(q_i, k_j) >
cos(q_i, k_i) + m, the column term (anchor key i, positive query i) drops query
j when cos(k_i, q_j) > cos(k_i, q_i) + m.  The fused compositions hand the core
the per-row threshold row_max_i = σ·(cos_i,pos + m) at each call's scale σ and
exclude the positive from the call; the positive logit is added back with
``logaddexp`` (so it counts whatever m, even m < 0, and whatever the rounding).
The kernels compare their own S with row_max, so a candidate within rounding of
the threshold (a tie) may fall either way.  M_i for β or τ⁺ comes from one more
forward-only core call at the scale 2⁻²⁴ (every term e^{2⁻²⁴·cos} is 1 to
within 6·10⁻⁸, so the LSE is log M_i; exact after rounding up to about 10⁵
kept negatives per anchor).

The fused compositions take the queue's LSE from a second core call
(anchors against Q) and merge it with ``logaddexp``: exact gradients for the
anchors, Q (when it requires grad) and τ, and never a B×K or (B+K)×D buffer.
The queue is not gathered under ``process_group`` (a ``MemoryBank`` is
identical on every rank); a queue that requires grad gets ∂L_r/∂Q on rank r,
whose mean over ranks is the single-process gradient, as for a shared τ.

Gradients (what the core's backward gives the LSE terms, PyTorch gives the
positive terms): ∂ℓ_i/∂S[i, j] = P[i, j] − [j = t_i], P = softmax_j S[i, ·].

Layout of each loss
-------------------
``<loss>_reference``  the exact dense formula in plain PyTorch (fp32, float64 for
                      float64 inputs), written from the maths above and
                      independent of the core; this is ``backend="reference"``.
``_fused_<loss>``     the composition on ``primitives.sim_lse``: normalization and
                      positive logits in PyTorch on O((B+M)·D) tensors, every
                      LSE from the core.  With ``backend="reference"`` the core
                      is its dense version, which is how tests check the
                      composition without a kernel.
``<loss>``            the public function: argument checks once, then
                      ``backends.resolve`` picks one of the two above.

Under ``process_group`` (see ``contrastive_ops.distributed``) each rank's
anchors are its local rows; the keys (for the symmetric / CLIP / NT-Xent
forms also the other side) are all-gathered with gradient.  The fused
compositions run their core calls on local anchors against the global
candidates: info_nce's targets move by the rank's key offset, the column
terms become the local keys' rows against the gathered queries, and NT-Xent
excludes each anchor's own global position.  Positive logits only involve
local rows.  The references compute the dense loss of the gathered global
batch and keep this rank's anchors.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .. import backends
from .._checks import _compiling, as_scalar, check_pair, check_queue, check_reduction, shape_str
from .._numerics import acc_dtype
from ..distributed import GlobalBatch, uses_ring
from ..primitives.sim_lse import sim_lse
from ._common import cross_lse, inv_temperature, rowdot, take_rows, unit, unit_operands

Tensor = torch.Tensor

# --------------------------------------------------------------------------- helpers


def _check_targets(targets, B: int, M: int, device) -> Tensor:
    """targets: integer tensor of shape (B,) on the features' device with values in [0, M)."""
    if not isinstance(targets, Tensor):
        raise ValueError(f"targets must be an int64 tensor of shape ({B},), got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be an integer (int64) tensor, got dtype {targets.dtype} with shape {shape_str(targets)}"
        )
    if tuple(targets.shape) != (B,):
        raise ValueError(f"targets must have shape ({B},) (one per query row), got {shape_str(targets)}")
    if targets.device != device:
        raise ValueError(f"targets is on {targets.device} but query is on {device}")
    if not _compiling():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= M:
            raise ValueError(
                f"targets must lie in [0, {M}) for key of {M} rows, got values in [{lo}, {hi}] "
                f"(targets shape {shape_str(targets)})"
            )
    return targets.long()


def _has_rows(queue) -> bool:
    return queue is not None and queue.shape[0] > 0


def _queue_lse(anchors: Tensor, queue, scale: Tensor, normalize: bool, backend: str) -> Tensor:
    """LSE_m s(anchor_i, Q_m) over the K queue entries (B,), from a second core call (no B×K buffer).

    Why a second call rather than more columns of the first: the core's
    ``col_index`` / ``col_start`` / ``col_end`` select rows of its one
    candidate tensor, so taking the queue there would need a (M+K)×D
    concatenation of keys and queue.  Two calls merged with ``logaddexp`` are
    exact in value and gradient: its backward hands each call's row LSE the
    upstream gradient times that block's share of the softmax mass, which is
    what each block's P = exp(S − row_lse) needs.
    """
    Qk, _ = unit_operands(queue, normalize)
    lse, _ = sim_lse(anchors, Qk, scale, backend=backend)
    return lse


def _queue_logits(anchors_acc: Tensor, queue, scale: Tensor, normalize: bool) -> Tensor:
    """Dense s(anchor_i, Q_m) (B, K) in the accumulation dtype (the references only)."""
    return (anchors_acc @ unit(queue, normalize).T) * scale


# --------------------------------------------------------------------------- negative shaping


def _check_shaping(hard_negative_beta, debias_tau_plus) -> tuple:
    """(β, τ⁺) as floats: β finite and >= 0, τ⁺ in [0, 1)."""
    for name, v in (("hard_negative_beta", hard_negative_beta), ("debias_tau_plus", debias_tau_plus)):
        if isinstance(v, bool) or not isinstance(v, Real):
            raise ValueError(f"{name} must be a float, got {type(v).__name__}")
    beta, tau_plus = float(hard_negative_beta), float(debias_tau_plus)
    if not (0.0 <= beta < math.inf):
        raise ValueError(f"hard_negative_beta must be a finite float >= 0, got {beta}")
    if not (0.0 <= tau_plus < 1.0):
        raise ValueError(f"debias_tau_plus must lie in [0, 1), got {tau_plus}")
    return beta, tau_plus


def _shaped_dense(S: Tensor, neg: Tensor, pos: Tensor, beta: float, tau_plus: float, scale: Tensor) -> Tensor:
    """HCL / debiased loss per anchor from dense logits (the references only).

    ``S`` (B, C) candidate logits, ``neg`` (B, C) bool marks anchor i's
    negatives, ``pos`` (B,) positive logits, ``scale`` = 1/τ.  The formula as
    written (importance weights e^{β s}, their weighted sum of e^{s}, the
    debias and the clamp), with each row shifted by its largest negative logit
    and the last step by the largest of its terms, so nothing overflows.
    """
    count = neg.sum(1)
    empty = count == 0
    M = torch.where(empty, torch.ones_like(count), count).to(S.dtype)
    m = S.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
    m = torch.where(empty[:, None], torch.zeros_like(m), m).detach()
    d = torch.where(neg, S - m, torch.zeros_like(S))  # <= 0 on the negatives
    zero = torch.zeros_like(S)
    w = torch.where(neg, torch.exp(beta * d), zero)  # importance weights e^{β s_ij}, shifted by e^{−β m}
    e = torch.where(neg, torch.exp(d), zero)  # e^{s_ij}, shifted by e^{−m}
    w_sum = torch.where(empty, torch.ones_like(M), w.sum(1))
    we_sum = torch.where(empty, torch.ones_like(M), (w * e).sum(1))
    log_rw = torch.log(M) + m.squeeze(1) + torch.log(we_sum / w_sum)  # log(M Σ w e^{s} / Σ w)
    c = torch.maximum(torch.maximum(pos, log_rw), torch.log(M) - scale).detach()
    p = torch.exp(pos - c)
    Ng = torch.maximum((torch.exp(log_rw - c) - tau_plus * M * p) / (1.0 - tau_plus), M * torch.exp(-scale - c))
    loss = torch.log(p + Ng) + c - pos
    return torch.where(empty, pos - pos, loss)


def _shaped_from_lse(pos: Tensor, lse_hi: Tensor, lse_lo, n_neg, beta: float, tau_plus: float,
                     scale: Tensor) -> Tensor:
    """HCL / debiased loss per anchor from ``lse_hi`` = LSE_j (1+β)s_ij and ``lse_lo`` = LSE_j β s_ij over
    its ``n_neg`` negatives (``lse_lo`` None at β = 0: it is log n_neg), in the log domain (O(B)).
    ``n_neg``: an int, or a (B,) tensor of per-anchor counts (the false-negative filter); an anchor with
    no negative has loss 0."""
    if isinstance(n_neg, Tensor):
        none = n_neg == 0
        log_m = torch.log(n_neg.clamp_min(1))
        # rows without negatives have LSEs of -inf: replace them so no -inf - -inf reaches autograd
        lse_hi = torch.where(none, torch.zeros_like(lse_hi), lse_hi)
        lse_lo = None if lse_lo is None else torch.where(none, torch.zeros_like(lse_lo), lse_lo)
    else:
        if n_neg == 0:
            return pos - pos
        none, log_m = None, math.log(n_neg)
    r = lse_hi - (log_m if lse_lo is None else lse_lo)  # log(reweighted / M)
    if tau_plus > 0:
        # log(e^r − τ⁺e^x) = r + log(1 − e^u), u = x − r + log τ⁺; u >= 0: the clamp bound wins
        u = (pos - r + math.log(tau_plus)).clamp_max(0.0)
        d = -torch.expm1(u)
        ok = d > 0
        inner = torch.where(ok, r + torch.log(torch.where(ok, d, torch.ones_like(d))) - math.log1p(-tau_plus),
                            torch.full_like(r, float("-inf")))
    else:
        inner = r
    log_ng = log_m + torch.maximum(inner, -scale)
    loss = torch.logaddexp(pos, log_ng) - pos
    return loss if none is None else torch.where(none, pos - pos, loss)


def _negatives_lse(anchors: Tensor, blocks, scale: Tensor, backend: str, want_col: bool = False, cut=None):
    """LSE of ``scale``·(anchor · candidate) over the candidate ``blocks`` [(tensor, exclude or None)], merged;
    ``cut`` (B,): the false-negative threshold on the cosine (``_fn_cut``), None for none."""
    out, col = None, None
    row_max = None if cut is None else _row_max(scale, cut)
    for cand, exclude in blocks:
        lse, col = sim_lse(anchors, cand, scale, exclude=exclude, want_col=want_col, row_max=row_max,
                           backend=backend)
        out = lse if out is None else torch.logaddexp(out, lse)
    return out, col


# --------------------------------------------------------------------------- false-negative filter


def _check_margin(false_negative_margin, normalize) -> "float | None":
    """The margin m as a float (None: no filter); it compares cosines, so it needs normalize=True."""
    if false_negative_margin is None:
        return None
    if isinstance(false_negative_margin, bool) or not isinstance(false_negative_margin, Real):
        raise ValueError(f"false_negative_margin must be None or a finite float, got "
                         f"{type(false_negative_margin).__name__}")
    m = float(false_negative_margin)
    if not math.isfinite(m):
        raise ValueError(f"false_negative_margin must be a finite float, got {m}")
    if not normalize:
        raise ValueError("false_negative_margin compares cosines of the normalized features and needs "
                         "normalize=True (got normalize=False)")
    return m


def _fn_cut(cos_pos: Tensor, margin: float) -> Tensor:
    """Per-anchor cosine threshold cos(a_i, c_pos) + m, detached: negatives above it are dropped."""
    return cos_pos.detach() + margin


def _row_max(scale: Tensor, cut: Tensor) -> Tensor:
    """``cut`` in the logit domain of a core call at ``scale`` (the primitive's ``row_max``)."""
    return (scale.detach() * cut).detach()


_COUNT_SCALE = 2.0 ** -24  # |logit| <= 2^-24 for unit features: e^logit is 1 to within 6e-8


def _kept_count(anchors: Tensor, blocks, cut: Tensor, backend: str) -> Tensor:
    """M_i: how many negatives of each anchor the threshold keeps, from a forward-only core call at the scale
    2⁻²⁴ over the same blocks (LSE = log M_i + O(2⁻²⁴)); rounded, in the accumulation dtype."""
    sc = torch.tensor(_COUNT_SCALE, dtype=acc_dtype(anchors.dtype), device=anchors.device)
    with torch.no_grad():
        lse, _ = _negatives_lse(anchors.detach(), [(c.detach() if isinstance(c, Tensor) else c, ex)
                                                   for c, ex in blocks], sc, backend, cut=cut)
    return torch.round(torch.exp(lse.double())).to(lse.dtype)


def _dense_keep(cos: Tensor, cos_pos: Tensor, margin) -> Tensor:
    """(B, C) bool: candidate kept by the filter (the references only; cosines of unit features)."""
    if margin is None:
        return torch.ones_like(cos, dtype=torch.bool)
    return ~(cos.detach() > (cos_pos.detach() + margin)[:, None])


# --------------------------------------------------------------------------- info_nce


def info_nce_reference(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
                       reduction="mean", process_group=None, queue=None, in_batch_negatives=True,
                       hard_negative_beta=0.0, debias_tau_plus=0.0, false_negative_margin=None) -> Tensor:
    """Dense InfoNCE: ℓ_i = −S[i, t_i] + LSE_j S[i, j] (stores B×M), the queue's logits as extra columns;
    with β or τ⁺ > 0 the HCL / debiased form over the negatives (every candidate but the positive);
    ``false_negative_margin`` m drops the negatives whose cosine exceeds the positive's by more than m."""
    margin = false_negative_margin
    beta, tau_plus = float(hard_negative_beta), float(debias_tau_plus)
    shaped = beta > 0 or tau_plus > 0
    gq = GlobalBatch(query.shape[0], process_group, query.device)
    gk = GlobalBatch(key.shape[0], process_group, key.device)
    if targets is not None:  # local key indices -> positions in the gathered keys
        targets = gq.gather_nograd(targets.long() + gk.offset)
    q = unit(gq.gather(query), normalize)
    k = unit(gk.gather(key), normalize)
    scale = inv_temperature(temperature, q)
    S = (q @ k.T) * scale
    B = S.shape[0]
    cos = None if margin is None else (q @ k.T).detach()  # unit features: cosines
    if symmetric:
        pos = S.diagonal()
        if margin is not None:  # each direction filters its own anchor's negatives
            eye = torch.eye(B, dtype=torch.bool, device=S.device)
            neg_r = ~eye & _dense_keep(cos, cos.diagonal(), margin)
            neg_c = ~eye & _dense_keep(cos.T, cos.diagonal(), margin)
            if shaped:
                loss = 0.5 * (_shaped_dense(S, neg_r, pos, beta, tau_plus, scale)
                              + _shaped_dense(S.T, neg_c, pos, beta, tau_plus, scale))
            else:
                loss = 0.5 * ((S.masked_fill(~(neg_r | eye), float("-inf")).logsumexp(1) - pos)
                              + (S.T.masked_fill(~(neg_c | eye), float("-inf")).logsumexp(1) - pos))
        elif shaped:
            off = ~torch.eye(B, dtype=torch.bool, device=S.device)
            loss = 0.5 * (_shaped_dense(S, off, pos, beta, tau_plus, scale)
                          + _shaped_dense(S.T, off, pos, beta, tau_plus, scale))
        else:
            loss = 0.5 * ((S.logsumexp(1) - pos) + (S.logsumexp(0) - pos))
    else:
        t = torch.arange(B, device=S.device) if targets is None else targets.long()
        pos = S.gather(1, t[:, None]).squeeze(1)
        cand = S if in_batch_negatives else pos[:, None]
        neg = torch.ones_like(cand, dtype=torch.bool)
        neg[torch.arange(B, device=S.device), t if in_batch_negatives else 0] = False
        if queue is not None:
            Sq = _queue_logits(q, queue, scale, normalize)
            cand = torch.cat([cand, Sq], 1)
            neg = torch.cat([neg, torch.ones_like(Sq, dtype=torch.bool)], 1)
        if margin is not None:
            cos_pos = cos.gather(1, t[:, None]).squeeze(1)
            cos_cand = cos if in_batch_negatives else cos_pos[:, None]
            if queue is not None:
                cos_cand = torch.cat([cos_cand, (q @ unit(queue, normalize).T).detach()], 1)
            positive = ~neg
            neg = neg & _dense_keep(cos_cand, cos_pos, margin)
            if not shaped:
                cand = cand.masked_fill(~(neg | positive), float("-inf"))
        loss = _shaped_dense(cand, neg, pos, beta, tau_plus, scale) if shaped else cand.logsumexp(1) - pos
    return gq.reduce(gq.local(loss), reduction)


def _fused_info_nce(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
                    reduction="mean", backend: str, process_group=None, queue=None,
                    in_batch_negatives=True, hard_negative_beta=0.0, debias_tau_plus=0.0,
                    false_negative_margin=None, exchange="gather") -> Tensor:
    """InfoNCE on ``sim_lse``: row (and column) LSEs from the core, positives in PyTorch.

    Under ``process_group``: local queries against the gathered keys (and,
    symmetric, local keys against the gathered queries).  A queue adds one
    core call of the queries against it, merged into the row LSE with
    ``logaddexp``; with ``in_batch_negatives=False`` the keys enter only
    through the positive logit (no key core call, no gather).  With β or
    τ⁺ > 0 each block is taken at the scales (1+β)/τ and β/τ instead of 1/τ,
    the positive excluded (``_shaped_from_lse``).  ``exchange="ring"``: the
    keys (symmetric: and queries) visit every rank instead (``gk.candidates``).
    """
    gk = GlobalBatch(key.shape[0], process_group, key.device, exchange)
    q, q32 = unit_operands(query, normalize)
    k, k32 = unit_operands(key, normalize)
    scale = inv_temperature(temperature, q)
    beta, tau_plus = float(hard_negative_beta), float(debias_tau_plus)
    margin = false_negative_margin
    if beta > 0 or tau_plus > 0:
        return gk.reduce(_shaped_info_nce_rows(q, q32, k, k32, gk, scale, targets, symmetric, normalize, backend,
                                               queue, in_batch_negatives, beta, tau_plus, margin), reduction)
    if margin is not None:
        return gk.reduce(_filtered_info_nce_rows(q, q32, k, k32, gk, scale, targets, symmetric, normalize, backend,
                                                 queue, in_batch_negatives, margin), reduction)
    if symmetric:  # this rank's columns of the global S: its keys against all queries
        row_lse, col_lse = cross_lse(q, k, scale, gk, backend=backend)
        pos = rowdot(q32, k32) * scale
        loss = 0.5 * ((row_lse - pos) + (col_lse - pos))
    else:
        t = torch.arange(q.shape[0], device=q.device) if targets is None else targets.long()
        # targets index the local keys (repeats allowed); take_rows: a backward without atomics
        pos = rowdot(q32, take_rows(k32, t)) * scale
        if in_batch_negatives:
            row_lse, _ = sim_lse(q, gk.candidates(k), scale, backend=backend)
        else:  # MoCo v2: the only key in the denominator is the positive itself
            row_lse = pos
        if _has_rows(queue):
            row_lse = torch.logaddexp(row_lse, _queue_lse(q, queue, scale, normalize, backend))
        loss = row_lse - pos
    return gk.reduce(loss, reduction)


def _filtered_info_nce_rows(q, q32, k, k32, gk, scale, targets, symmetric, normalize, backend, queue,
                            in_batch_negatives, margin) -> Tensor:
    """Per-query InfoNCE with the false-negative filter: the negatives' LSE from the core with the positive
    excluded and the threshold row_max = (cos_pos + m)/τ, the positive added back with ``logaddexp``
    (it is never dropped, whatever m); symmetric: the column terms are the keys' rows against the
    queries, each key with its own threshold."""
    B = q.shape[0]
    if symmetric:
        own = (torch.arange(B, device=q.device) + gk.offset)[:, None]  # global position of query i's key
        cos_pos = rowdot(q32, k32)
        pos, cut = cos_pos * scale, _fn_cut(cos_pos, margin)
        row, _ = _negatives_lse(q, [(gk.candidates(k), own)], scale, backend, cut=cut)
        col, _ = _negatives_lse(k, [(gk.candidates(q), own)], scale, backend, cut=cut)
        return 0.5 * ((torch.logaddexp(pos, row) - pos) + (torch.logaddexp(pos, col) - pos))
    t = torch.arange(B, device=q.device) if targets is None else targets.long()
    cos_pos = rowdot(q32, take_rows(k32, t))
    pos, cut = cos_pos * scale, _fn_cut(cos_pos, margin)
    blocks = []
    if in_batch_negatives:
        blocks.append((gk.candidates(k), (t + gk.offset)[:, None]))
    if _has_rows(queue):
        blocks.append((unit_operands(queue, normalize)[0], None))
    if not blocks:
        return pos - pos
    neg, _ = _negatives_lse(q, blocks, scale, backend, cut=cut)
    return torch.logaddexp(pos, neg) - pos


def _shaped_info_nce_rows(q, q32, k, k32, gk, scale, targets, symmetric, normalize, backend, queue,
                          in_batch_negatives, beta, tau_plus, margin=None) -> Tensor:
    """Per-query HCL / debiased InfoNCE on ``sim_lse``: every block's LSE over the negatives at (1+β)/τ and
    (β > 0) β/τ, the positive excluded by index; symmetric: the column terms from the same calls.  With the
    false-negative ``margin`` each call gets the threshold at its own scale, the column terms come from the
    keys' rows against the queries, and M_i is the per-anchor count of kept negatives (``_kept_count``)."""
    B = q.shape[0]
    scales = [(1.0 + beta) * scale] + ([beta * scale] if beta > 0 else [])
    if symmetric:
        n_neg = gk.total - 1
        own = (torch.arange(B, device=q.device) + gk.offset)[:, None]  # global position of query i's key
        cos_pos = rowdot(q32, k32)
        pos = cos_pos * scale
        if margin is not None:
            cut = _fn_cut(cos_pos, margin)
            rb, cb = [(gk.candidates(k), own)], [(gk.candidates(q), own)]
            rows = [_negatives_lse(q, rb, sc, backend, cut=cut)[0] for sc in scales] + [None]
            cols = [_negatives_lse(k, cb, sc, backend, cut=cut)[0] for sc in scales] + [None]
            n_row, n_col = _kept_count(q, rb, cut, backend), _kept_count(k, cb, cut, backend)
            return 0.5 * (_shaped_from_lse(pos, rows[0], rows[1], n_row, beta, tau_plus, scale)
                          + _shaped_from_lse(pos, cols[0], cols[1], n_col, beta, tau_plus, scale))
        rows, cols = [], []
        for sc in scales:
            r, c = cross_lse(q, k, sc, gk, exclude_own=True, backend=backend)
            rows.append(r)
            cols.append(c)
        rows.append(None)  # β = 0: no β/τ call, that LSE is log M
        cols.append(None)
        return 0.5 * (_shaped_from_lse(pos, rows[0], rows[1], n_neg, beta, tau_plus, scale)
                      + _shaped_from_lse(pos, cols[0], cols[1], n_neg, beta, tau_plus, scale))
    t = torch.arange(B, device=q.device) if targets is None else targets.long()
    cos_pos = rowdot(q32, take_rows(k32, t))
    pos = cos_pos * scale
    cut = None if margin is None else _fn_cut(cos_pos, margin)
    blocks, n_neg = [], 0
    if in_batch_negatives:
        blocks.append((gk.candidates(k), (t + gk.offset)[:, None]))
        n_neg += gk.total - 1
    if _has_rows(queue):
        blocks.append((unit_operands(queue, normalize)[0], None))
        n_neg += queue.shape[0]
    if n_neg == 0:
        return pos - pos
    lses = [_negatives_lse(q, blocks, sc, backend, cut=cut)[0] for sc in scales]
    if cut is not None:
        n_neg = _kept_count(q, blocks, cut, backend)
    return _shaped_from_lse(pos, lses[0], lses[1] if beta > 0 else None, n_neg, beta, tau_plus, scale)


def info_nce(query, key, temperature=0.07, *, targets=None, symmetric=False, normalize=True,
             reduction="mean", backend="auto", process_group=None, queue=None, in_batch_negatives=True,
             hard_negative_beta=0.0, debias_tau_plus=0.0, false_negative_margin=None,
             exchange="gather") -> Tensor:
    r"""InfoNCE of queries against keys.

    ``ℓ_i = −s(q_i, k_{t_i}) + LSE_j s(q_i, k_j)`` with ``s(a,b) = â·b̂/τ``
    (``normalize=True``) or ``a·b/τ``.

    Args:
        query: (B, D) floating tensor.
        key: (M, D), same device and dtype.
        temperature: τ > 0, float or 0-dim tensor (a tensor requiring grad gets its gradient).
        targets: (B,) int64, index of each query's positive key; default ``arange(B)`` (needs M ≥ B).
        symmetric: ½(row loss + column loss) as in CLIP; needs M == B and no targets.
        normalize: L2-normalize query and key rows first (eps 1e-12, in fp32).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` ((B,) per-query values).
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        queue: optional (K, D) extra candidates (a MoCo queue, a ``MemoryBank``'s ``features``) in every
            query's denominator, same dtype and device as ``query``, normalized like the keys; they get
            gradient only if they require it.  K = 0 adds nothing.
        in_batch_negatives: ``True``: candidates = all keys ∪ queue.  ``False`` (needs a queue): candidates
            = the query's own target key ∪ queue (MoCo v2).
        hard_negative_beta: β >= 0, HCL hard-negative weighting (weights e^{β·s} of the negatives, not detached).
        debias_tau_plus: τ⁺ in [0, 1), debiased CL's class prior; with β the HCL estimator (see the module
            docstring for the formula).  β = τ⁺ = 0 is the plain loss.
        false_negative_margin: None, or a float m (needs ``normalize=True``): a negative j of query i (key or
            queue entry) is left out of the denominator when cos(q_i, k_j) > cos(q_i, k_{t_i}) + m, compared on
            detached cosines (Qwen3-Embedding); the positive always stays.  With β or τ⁺, M_i counts the kept
            negatives.  ``symmetric=True``: each direction filters its own anchor's negatives (the column term,
            anchor key i with positive query i, drops query j when cos(k_i, q_j) > cos(k_i, q_i) + m).  A
            candidate within rounding of the threshold may fall either way (the kernels compare their own S).
        exchange: ``"gather"`` or ``"ring"``: how the candidates reach each rank under ``process_group``
            (see ``contrastive_ops.distributed``); ignored without one.

    Returns:
        fp32 loss (float64 for float64 inputs); gradients in the input dtype.
    """
    check_pair("query", query, "key", key, same_rows=False)
    check_reduction(reduction)
    B, M = query.shape[0], key.shape[0]
    if queue is not None:
        check_queue(queue, "query", query)
        if symmetric:
            raise ValueError(
                f"queue adds candidates to the query rows only, so it cannot be used with symmetric=True "
                f"(got queue {shape_str(queue)}, query {shape_str(query)}, key {shape_str(key)})"
            )
    if not isinstance(in_batch_negatives, bool):
        raise ValueError(f"in_batch_negatives must be True or False, got {in_batch_negatives!r}")
    if not in_batch_negatives and queue is None:
        raise ValueError(
            "in_batch_negatives=False keeps only the positive key in the denominator and needs a queue of "
            f"negatives; got queue=None (query {shape_str(query)}, key {shape_str(key)})"
        )
    if symmetric:
        if targets is not None:
            raise ValueError(
                f"symmetric=True uses the diagonal as positives and takes no targets (got targets of shape "
                f"{shape_str(targets)}, query {shape_str(query)}, key {shape_str(key)})"
            )
        if M != B:
            raise ValueError(
                f"symmetric=True needs as many keys as queries, got query {shape_str(query)} and key {shape_str(key)}"
            )
    elif targets is not None:
        targets = _check_targets(targets, B, M, query.device)
    elif M < B:
        raise ValueError(
            f"without targets the positive of query i is key i, so key needs at least as many rows as query; "
            f"got query {shape_str(query)} and key {shape_str(key)}"
        )
    as_scalar("temperature", temperature, query, positive=True)
    beta, tau_plus = _check_shaping(hard_negative_beta, debias_tau_plus)
    margin = _check_margin(false_negative_margin, normalize)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="info_nce", tensors=(query, key))
    kw = dict(targets=targets, symmetric=symmetric, normalize=normalize, reduction=reduction,
              process_group=process_group, queue=queue, in_batch_negatives=in_batch_negatives,
              hard_negative_beta=beta, debias_tau_plus=tau_plus, false_negative_margin=margin)
    if name == "reference" and not ring:
        return info_nce_reference(query, key, temperature, **kw)
    return _fused_info_nce(query, key, temperature, backend=name, exchange=exchange, **kw)


# --------------------------------------------------------------------------- clip_loss


def clip_loss_reference(image_features, text_features, logit_scale, process_group=None) -> Tensor:
    """Dense CLIP loss: ½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)] (stores B×B)."""
    dt = acc_dtype(image_features.dtype)
    gb = GlobalBatch(image_features.shape[0], process_group, image_features.device)
    img, txt = gb.gather(image_features).to(dt), gb.gather(text_features).to(dt)
    s = as_scalar("logit_scale", logit_scale, img)
    logits = s * (img @ txt.T)
    # log-softmax over texts for each image (rows) and over images for each text (columns).
    row = logits.logsumexp(1) - logits.diagonal()
    col = logits.logsumexp(0) - logits.diagonal()
    if process_group is None:
        return 0.5 * (row.mean() + col.mean())
    return gb.reduce(gb.local(0.5 * (row + col)), "mean")


def _fused_clip_loss(image_features, text_features, logit_scale, *, backend: str, process_group=None,
                     exchange="gather") -> Tensor:
    """CLIP loss on one core call: the row LSEs are the image→text terms, the column LSEs text→image.

    Under ``process_group``: local images against all texts and local texts
    against all images (``cross_lse``: two core calls, or one ring call).
    """
    img, img32 = unit_operands(image_features, False)
    txt, txt32 = unit_operands(text_features, False)
    s = as_scalar("logit_scale", logit_scale, img)
    pos = rowdot(img32, txt32) * s
    gb = GlobalBatch(img.shape[0], process_group, img.device, exchange)
    row_lse, col_lse = cross_lse(img, txt, s, gb, backend=backend)
    if process_group is None:
        return 0.5 * ((row_lse - pos).mean() + (col_lse - pos).mean())
    return gb.reduce(0.5 * ((row_lse - pos) + (col_lse - pos)), "mean")


def clip_loss(image_features, text_features, logit_scale, *, backend="auto", process_group=None,
              exchange="gather") -> Tensor:
    r"""open_clip ``ClipLoss``: ½[CE(s·I Tᵀ, arange) + CE(s·T Iᵀ, arange)].

    Args:
        image_features, text_features: (B, D) each, same device and dtype; not normalized here.
        logit_scale: s > 0, already exponentiated (as open_clip passes it), float or 0-dim tensor.
        backend, exchange: see ``info_nce``.

    Returns:
        0-dim fp32 loss (float64 for float64 inputs).
    """
    check_pair("image_features", image_features, "text_features", text_features, same_rows=True)
    as_scalar("logit_scale", logit_scale, image_features, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="clip_loss", tensors=(image_features, text_features))
    if name == "reference" and not ring:
        return clip_loss_reference(image_features, text_features, logit_scale, process_group)
    return _fused_clip_loss(image_features, text_features, logit_scale, backend=name, process_group=process_group,
                            exchange=exchange)


# --------------------------------------------------------------------------- nt_xent


def nt_xent_reference(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", process_group=None,
                      queue=None, hard_negative_beta=0.0, debias_tau_plus=0.0, false_negative_margin=None) -> Tensor:
    """Dense NT-Xent over the 2N anchors of Z = cat(z1, z2) (stores 2N×2N), the queue's logits as extra columns;
    with β or τ⁺ > 0 the HCL / debiased form over the negatives (all but the anchor and its other view);
    ``false_negative_margin`` m drops the negatives whose cosine exceeds the positive's by more than m."""
    beta, tau_plus = float(hard_negative_beta), float(debias_tau_plus)
    margin = false_negative_margin
    gb = GlobalBatch(z1.shape[0], process_group, z1.device)
    Z = torch.cat([unit(gb.gather(z1), normalize), unit(gb.gather(z2), normalize)], 0)
    n2 = Z.shape[0]
    N = n2 // 2
    scale = inv_temperature(temperature, Z)
    S = (Z @ Z.T) * scale
    self_pair = torch.eye(n2, dtype=torch.bool, device=S.device)
    partner = (torch.arange(n2, device=S.device) + N) % n2
    pos = S.gather(1, partner[:, None]).squeeze(1)
    if margin is not None:
        cos = (Z @ Z.T).detach()
        cos_pos = cos.gather(1, partner[:, None]).squeeze(1)
        neg = ~self_pair
        neg[torch.arange(n2, device=S.device), partner] = False
        cand = S
        if queue is not None:
            Sq = _queue_logits(Z, queue, scale, normalize)
            cand = torch.cat([cand, Sq], 1)
            neg = torch.cat([neg, torch.ones_like(Sq, dtype=torch.bool)], 1)
            cos = torch.cat([cos, (Z @ unit(queue, normalize).T).detach()], 1)
        neg = neg & _dense_keep(cos, cos_pos, margin)
        if beta > 0 or tau_plus > 0:
            loss = _shaped_dense(cand, neg, pos, beta, tau_plus, scale)
        else:
            positive = torch.zeros_like(neg)
            positive[torch.arange(n2, device=S.device), partner] = True
            loss = cand.masked_fill(~(neg | positive), float("-inf")).logsumexp(1) - pos
        return gb.reduce(gb.local_anchors(loss, 2), reduction)
    if beta > 0 or tau_plus > 0:
        neg = ~self_pair
        neg[torch.arange(n2, device=S.device), partner] = False
        cand = S
        if queue is not None:
            Sq = _queue_logits(Z, queue, scale, normalize)
            cand = torch.cat([cand, Sq], 1)
            neg = torch.cat([neg, torch.ones_like(Sq, dtype=torch.bool)], 1)
        loss = _shaped_dense(cand, neg, pos, beta, tau_plus, scale)
        return gb.reduce(gb.local_anchors(loss, 2), reduction)
    cand = S.masked_fill(self_pair, float("-inf"))
    if queue is not None:
        cand = torch.cat([cand, _queue_logits(Z, queue, scale, normalize)], 1)
    denom = cand.logsumexp(1)
    return gb.reduce(gb.local_anchors(denom - pos, 2), reduction)


def _fused_nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend: str,
                   process_group=None, queue=None, hard_negative_beta=0.0, debias_tau_plus=0.0,
                   false_negative_margin=None, exchange="gather") -> Tensor:
    """NT-Xent on ``sim_lse(Z, Z)`` with the self pair excluded; positives in PyTorch.

    Under ``process_group`` the anchors are the 2n local rows and the
    candidates the 2N gathered ones; each anchor excludes its own global position.
    A queue adds one core call of the 2n anchors against it, merged with ``logaddexp``.
    With β or τ⁺ > 0 every block is taken at (1+β)/τ and (β > 0) β/τ, the anchor's
    other view excluded as well (``_shaped_from_lse``).  With the false-negative margin the other view is
    excluded from every call and added back with ``logaddexp`` (plain) or counted as the positive (shaped),
    every call gets the threshold at its scale, and M_i counts the kept negatives (``_kept_count``).
    """
    gb = GlobalBatch(z1.shape[0], process_group, z1.device, exchange)
    (a, a32), (b, b32) = unit_operands(z1, normalize), unit_operands(z2, normalize)
    Z = torch.cat([a, b], 0)  # local anchors, view 1 then view 2
    scale = inv_temperature(temperature, Z)
    keys = Z if process_group is None else gb.candidates(a, b)  # one process: one tensor (symmetric Gram)
    self_pos = gb.anchor_index(2, Z.device)  # arange(2N) in one process
    beta, tau_plus = float(hard_negative_beta), float(debias_tau_plus)
    margin = false_negative_margin
    if beta > 0 or tau_plus > 0 or margin is not None:
        cos_pos = rowdot(torch.cat([a32, b32], 0), torch.cat([b32, a32], 0))
        pos = cos_pos * scale
        cut = None if margin is None else _fn_cut(cos_pos, margin)
        partner = torch.where(self_pos < gb.total, self_pos + gb.total, self_pos - gb.total)
        blocks = [(keys, torch.stack([self_pos, partner], 1))]
        n_neg = 2 * gb.total - 2
        if _has_rows(queue):
            blocks.append((unit_operands(queue, normalize)[0], None))
            n_neg += queue.shape[0]
        if n_neg == 0:
            return gb.reduce(pos - pos, reduction)
        if not (beta > 0 or tau_plus > 0):  # plain loss with the filter: the positive added back
            neg, _ = _negatives_lse(Z, blocks, scale, backend, cut=cut)
            return gb.reduce(torch.logaddexp(pos, neg) - pos, reduction)
        hi, _ = _negatives_lse(Z, blocks, (1.0 + beta) * scale, backend, cut=cut)
        lo = _negatives_lse(Z, blocks, beta * scale, backend, cut=cut)[0] if beta > 0 else None
        if cut is not None:
            n_neg = _kept_count(Z, blocks, cut, backend)
        return gb.reduce(_shaped_from_lse(pos, hi, lo, n_neg, beta, tau_plus, scale), reduction)
    row_lse, _ = sim_lse(Z, keys, scale, exclude=self_pos[:, None], backend=backend)
    if _has_rows(queue):
        row_lse = torch.logaddexp(row_lse, _queue_lse(Z, queue, scale, normalize, backend))
    pos = rowdot(torch.cat([a32, b32], 0), torch.cat([b32, a32], 0)) * scale
    return gb.reduce(row_lse - pos, reduction)


def nt_xent(z1, z2, temperature=0.5, *, normalize=True, reduction="mean", backend="auto",
            process_group=None, queue=None, hard_negative_beta=0.0, debias_tau_plus=0.0,
            false_negative_margin=None, exchange="gather") -> Tensor:
    r"""SimCLR NT-Xent (lightly ``NTXentLoss``) over the 2N anchors of two views.

    Each anchor's positive is its other view; the denominator holds all 2N−1
    other embeddings, the positive included.

    Args:
        z1, z2: (N, D) each, same device and dtype.
        temperature: τ > 0, float or 0-dim tensor.
        normalize: L2-normalize first (eps 1e-12, in fp32).
        reduction: ``"mean"`` (over the 2N anchors), ``"sum"`` or ``"none"`` ((2N,), view-1 anchors then view-2).
        backend: see ``info_nce``.
        queue: optional (K, D) extra negatives of every anchor (see ``info_nce``).
        hard_negative_beta, debias_tau_plus: HCL / debiased CL over each anchor's 2N−2 (+K) negatives
            (see ``info_nce``); ``hard_negative_beta=β, debias_tau_plus=τ⁺`` is the joshr17/HCL criterion.
        false_negative_margin: None, or a float m (needs ``normalize=True``): a negative b of anchor a (another
            embedding or a queue entry) is left out when cos(z_a, z_b) > cos(z_a, z_partner) + m, on detached
            cosines; the other view (the positive) always stays (see ``info_nce``).
        exchange: see ``info_nce``.
    """
    check_pair("z1", z1, "z2", z2, same_rows=True)
    if queue is not None:
        check_queue(queue, "z1", z1)
    check_reduction(reduction)
    as_scalar("temperature", temperature, z1, positive=True)
    beta, tau_plus = _check_shaping(hard_negative_beta, debias_tau_plus)
    margin = _check_margin(false_negative_margin, normalize)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="nt_xent", tensors=(z1, z2))
    kw = dict(normalize=normalize, reduction=reduction, process_group=process_group, queue=queue,
              hard_negative_beta=beta, debias_tau_plus=tau_plus, false_negative_margin=margin)
    if name == "reference" and not ring:
        return nt_xent_reference(z1, z2, temperature, **kw)
    return _fused_nt_xent(z1, z2, temperature, backend=name, exchange=exchange, **kw)


# --------------------------------------------------------------------------- similarity_lse


def similarity_lse_reference(query, key, scale, process_group=None) -> Tensor:
    """Dense row LSE of scale·Q Kᵀ (stores B×M); under ``process_group`` against the gathered keys."""
    dt = acc_dtype(query.dtype)
    gk = GlobalBatch(key.shape[0], process_group, key.device)
    q, k = query.to(dt), gk.gather(key).to(dt)
    return ((q @ k.T) * as_scalar("scale", scale, q)).logsumexp(1)


def _fused_similarity_lse(query, key, scale, *, backend: str, process_group=None, exchange="gather") -> Tensor:
    gk = GlobalBatch(key.shape[0], process_group, key.device, exchange)
    row_lse, _ = sim_lse(query, gk.candidates(key), as_scalar("scale", scale, query), backend=backend)
    return row_lse


def similarity_lse(query, key, scale, *, backend="auto", process_group=None, exchange="gather") -> Tensor:
    r"""Row-wise ``LSE_j(scale · q_i·k_j)`` as a (B,) fp32 tensor, differentiable.

    Kernel backends never store the B×M matrix: the building block for custom losses.

    Args:
        query: (B, D); key: (M, D), same device and dtype.
        scale: > 0, float or 0-dim tensor (a tensor requiring grad gets its gradient).
        backend, exchange: see ``info_nce``.
    """
    check_pair("query", query, "key", key, same_rows=False)
    as_scalar("scale", scale, query, positive=True)
    ring = uses_ring(exchange, process_group)
    name = backends.resolve(backend, op="similarity_lse", tensors=(query, key))
    if name == "reference" and not ring:
        return similarity_lse_reference(query, key, scale, process_group)
    return _fused_similarity_lse(query, key, scale, backend=name, process_group=process_group, exchange=exchange)


__all__ = ["info_nce", "clip_loss", "nt_xent", "similarity_lse"]
