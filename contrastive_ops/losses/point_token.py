r"""Masked point-token contrast (Point-CMAE) over co-masked token sets.

Maths
-----
Two masked branches see the same B point clouds of G tokens each and produce
token features ``f1, f2`` of shape (B, G, D); ``mask1, mask2`` (B, G) are True
where a token is masked in that branch.  With ``û = u/max(‖u‖, 1e-12)``::

    S = {(b, i) : mask1[b, i] ∧ mask2[b, i]}          the co-masked tokens
    c(x, y) = x̂ · ŷ                                    cosine similarity

``mode="cosine"`` (no temperature, no negatives)::

    pairing="diag":      L = (1/|S|)     Σ_{(b,i)∈S} (1 − c(f1_bi, f2_bi))
    pairing="official":  L = (1/(G·|S|)) Σ_{(b,i)∈S} Σ_{j<G} (1 − c(f1_bi, f2_bj))

"official" is the released Point-CMAE loss (mask on rows only, G hard-coded
to 64 there): each co-masked token is pulled toward *all* G tokens of the
other branch.  It is linear in f̂2, so with the per-cloud mean
``v̄_b = (1/G) Σ_j f̂2_bj`` it is the "diag" form with f̂2_bi replaced by v̄_b::

    L = (1/|S|) Σ_{(b,i)∈S} (1 − f̂1_bi · v̄_b)

``mode="infonce"`` with s(x, y) = c(x, y)/τ and the candidate set
``N(b) = {(b, j) ∈ S}`` (``negatives="cloud"``) or ``N = S`` (``"batch"``)::

    ℓ¹_bi = −s(f1_bi, f2_bi) + LSE_{(c,j)∈N} s(f1_bi, f2_cj)     f1 → f2
    ℓ²_bi = −s(f1_bi, f2_bi) + LSE_{(c,j)∈N} s(f1_cj, f2_bi)     f2 → f1
    L = (1/|S|) Σ_{(b,i)∈S} ½(ℓ¹_bi + ℓ²_bi)

The positive is in its own denominator.  An empty S gives L = 0, still
attached to the autograd graph (zero gradients, never NaN).  Losses
accumulate in fp32 (float64 for float64 inputs).

Fused composition
-----------------
The co-masked tokens are listed once, in (b, i) order, as indices into the
flattened (B·G, D) features: ``idx``, followed by the other tokens, which
get an empty candidate range (a list of static length: no host
synchronization under ``torch.compile``; see
``contrastive_ops.losses._present_first``).  Both LSE directions are the row and
the column LSE of the *same* similarity ``s(f̂1[idx], f̂2[idx])``, restricted
to the block diagonal of clouds for "cloud" (anchor k of cloud b may see the
compacted range ``[start_b, end_b)``) or to everything for "batch": one call
of the core with ``want_col=True``.  The listed tokens are gathered,
normalized and their positive dots taken in one autograd node
(``_common.unit_row_pairs``: a backward of a few passes over the listed rows
and one scatter per input, no atomics), so in eager mode only the |S|
co-masked tokens of the B·G are normalized and the core gets them compacted,
without index lists.  No B×G×G padding;
positives and the cosine modes are O(B·G·D).

Distributed (``process_group``): each rank passes its own clouds; the mean is
over the global |S| (all-reduced).  "cosine" and "cloud" need nothing else
(their candidates are in the same cloud).  "batch" gathers, with gradient,
the co-masked tokens of both branches (compacted first, so ranks may hold
different numbers of them) and runs this rank's tokens as anchors against all
of them: the row LSE (f1 → f2) and, by a second call, the column LSE of this
rank's f2 tokens (f2 → f1).  The reference keeps this rank's tokens of the
dense loss on the gathered batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks, backends
from .._numerics import acc_dtype, masked_lse
from ..distributed import GlobalBatch, reduce, uses_ring
from ..primitives.sim_lse import sim_lse
from ._common import cross_lse, inv_temperature, unit, unit_row_pairs
from ._present_first import present_list

Tensor = torch.Tensor

MODES = ("infonce", "cosine")
PAIRINGS = ("diag", "official")
NEGATIVES = ("cloud", "batch")


# ----------------------------------------------------------------------------- reference


def point_token_contrast_reference(
    f1: Tensor,
    f2: Tensor,
    mask1: Tensor,
    mask2: Tensor,
    inv_t: Tensor,
    *,
    mode: str = "infonce",
    pairing: str = "diag",
    negatives: str = "cloud",
    process_group=None,
) -> Tensor:
    """Exact dense PyTorch form of the loss (see the module docstring).

    ``inv_t`` is 1/τ as a 0-dim tensor (unused by ``mode="cosine"``).  Stores
    (B, G, G) similarities ("cloud", "official") or |S|×|S| ("batch").
    """
    gb = GlobalBatch(f1.shape[0], process_group, f1.device)
    f1, f2 = gb.gather(f1), gb.gather(f2)
    mask1, mask2 = gb.gather_nograd(mask1), gb.gather_nograd(mask2)

    def mean(per: Tensor) -> Tensor:  # (B, G) per-token values, 0 outside S -> this rank's share of the mean
        return gb.reduce(gb.local(per).reshape(-1), "mean", gb.local(S).reshape(-1))

    B, G, D = f1.shape
    dt = acc_dtype(f1.dtype)
    u = unit(f1)
    v = unit(f2)
    S = mask1 & mask2  # (B, G)
    count = S.sum().clamp_min(1).to(dt)
    zero = torch.zeros((), dtype=dt, device=f1.device)

    if mode == "cosine":
        if pairing == "diag":
            per = 1 - (u * v).sum(-1)  # (B, G)
            return mean(torch.where(S, per, zero))
        C = torch.bmm(u, v.transpose(1, 2))  # (B, G, G): C[b, i, j] = û1_bi · û2_bj
        return mean(torch.where(S.unsqueeze(-1), 1 - C, zero).sum(-1) / G)

    inv_t = inv_t.to(dt)
    if negatives == "cloud":
        L = torch.bmm(u, v.transpose(1, 2)) * inv_t  # (B, G, G): L[b, i, j] = s(f1_bi, f2_bj)
        allowed = S.unsqueeze(2) & S.unsqueeze(1)
        pos = torch.diagonal(L, dim1=1, dim2=2)  # (B, G)
        lse12 = masked_lse(L, allowed, 2)  # anchor f1_bi over f2_bj
        lse21 = masked_lse(L, allowed, 1)  # anchor f2_bj over f1_bi
        per = 0.5 * (lse12 + lse21) - pos
        return mean(torch.where(S, per, zero))

    # "batch": every co-masked token of the batch is a candidate; compact them.
    Sf = S.reshape(-1)
    U = u.reshape(B * G, D)[Sf]
    V = v.reshape(B * G, D)[Sf]
    L = (U @ V.T) * inv_t  # (|S|, |S|)
    pos = torch.diagonal(L)
    per = 0.5 * (torch.logsumexp(L, 1) + torch.logsumexp(L, 0)) - pos
    # The sum of an empty per is 0 with grad_fn, so an empty S stays in the graph.
    if process_group is None:
        return per.sum() / count
    mine = gb.local(torch.ones(B, G, dtype=torch.bool, device=f1.device), dim=0)
    mine = torch.cat([torch.zeros(gb.offset, G, dtype=torch.bool, device=f1.device), mine,
                      torch.zeros(B - gb.offset - gb.n, G, dtype=torch.bool, device=f1.device)])[S]
    return gb.reduce(per[mine], "mean", mine[mine])


def point_cmae_released_loss(f1: Tensor, f2: Tensor, mask1: Tensor, mask2: Tensor) -> Tensor:
    """The released Point-CMAE contrast loss, transcribed (loss-notes §3).

    ``C = bmm(F1, F2ᵀ)``, the co-mask applied to rows only (expanded over G),
    ``Σ mask·(1 − C + 1e-8) / (G·Σ mask)``.  It equals ``pairing="official"``
    up to the 1e-8 term; kept as a peer for tests and benchmarks.  NaN when no
    token is co-masked, as in the released code.
    """
    G = f1.shape[1]
    F1 = F.normalize(f1, dim=-1)
    F2 = F.normalize(f2, dim=-1)
    C = torch.bmm(F1, F2.transpose(1, 2))
    comask = mask1 & mask2
    rows = comask.unsqueeze(-1).expand(-1, -1, G)
    return (rows * (1 - C + 1e-8)).sum() / (G * comask.sum())


# ----------------------------------------------------------------------------- fused


def _fused_point_token_contrast(
    f1: Tensor,
    f2: Tensor,
    mask1: Tensor,
    mask2: Tensor,
    inv_t: Tensor,
    *,
    mode: str = "infonce",
    pairing: str = "diag",
    negatives: str = "cloud",
    backend: str,
    process_group=None,
    exchange: str = "gather",
) -> Tensor:
    """The loss on O(B·G·D) tensors plus, for "infonce", one call of the core.

    ``backend`` is a concrete backend name handed to ``sim_lse``
    (``"reference"`` runs the dense core, which tests use to check this
    composition without a kernel).  The cosine modes need no core and run the
    same code on every backend.

    No host synchronization under ``torch.compile``: "infonce" lists every
    token, the co-masked ones first, in a list of static length B·G (see
    ``contrastive_ops.losses._present_first``); in eager mode the list is cut
    after the co-masked tokens (one read of |S|).  The cosine modes never
    synchronize.
    """
    if process_group is not None:
        return _fused_distributed(f1, f2, mask1, mask2, inv_t, mode=mode, pairing=pairing, negatives=negatives,
                                  backend=backend, process_group=process_group, exchange=exchange)
    B, G, D = f1.shape
    dt = acc_dtype(f1.dtype)
    S = mask1 & mask2
    Sd = S.to(dt)
    count = S.sum().clamp_min(1).to(dt)

    if mode == "cosine":
        u = unit(f1)  # (B, G, D) in dt
        v = unit(f2)
        if pairing == "official":
            # Σ_j (1 − û1_bi·û2_bj) / G = 1 − û1_bi · v̄_b,  v̄_b = mean_j û2_bj
            v = v.mean(1, keepdim=True)
        per = 1 - (u * v).sum(-1)  # (B, G)
        return (Sd * per).sum() / count

    inv_t = inv_t.to(dt)
    Sf = S.reshape(B * G)
    # Co-masked tokens first, in (b, i) order, then the others (static length; see _present_first).
    idx, _, n = present_list(Sf)
    on = Sf[idx]
    if negatives == "cloud":
        # Cloud b's co-masked tokens are the contiguous range [start_b, end_b) of the list.
        per_cloud = S.sum(1)  # (B,)
        end = per_cloud.cumsum(0)
        start = end - per_cloud
        cloud = torch.div(idx, G, rounding_mode="floor")
        col_start = start[cloud]
        col_end = torch.where(on, end[cloud], col_start)
    else:
        col_start, col_end = None, torch.where(on, n, 0)
    # Tokens outside S get an empty range: -inf row LSEs (dropped below); they are in no range,
    # so their column LSEs are -inf too and they enter no other token's LSE.

    # Only the listed tokens are normalized (in eager mode the co-masked ones: |S| of the B·G), and
    # the core sees them compacted, in list order: no index lists, positions are list positions.
    # (len(idx), D) in dt, and s(f1_bi, f2_bi)·τ of each listed token
    u, v, dot = unit_row_pairs(f1.reshape(B * G, D), f2.reshape(B * G, D), idx)
    pos = dot * inv_t
    # Kernels take features in the input dtype; normalization stays in dt.
    lse12, lse21 = sim_lse(
        u.to(f1.dtype), v.to(f2.dtype), inv_t,
        col_start=col_start, col_end=col_end, want_col=True, backend=backend,
    )
    # Row LSE: anchor f1_k over its candidates f2_j (f1 → f2); column LSE of
    # the same matrix: anchor f2_k over f1_i (f2 → f1).  Same positive.
    per = torch.where(on, 0.5 * (lse12.to(dt) + lse21.to(dt)) - pos, 0)
    # An empty S gives 0, attached to f1, f2 and the temperature, with zero gradients.
    return per.sum() / count


def _fused_distributed(f1, f2, mask1, mask2, inv_t, *, mode, pairing, negatives, backend, process_group,
                       exchange="gather") -> Tensor:
    """The fused loss under a process group: this rank's co-masked tokens are the anchors.

    "cosine" and "cloud" run the single-process composition on the local
    clouds (their candidates never leave a cloud) and turn its mean into this
    rank's share of the mean over the global |S|; "batch" gathers the
    compacted co-masked tokens of both branches (``exchange="ring"``: they
    visit every rank instead; a rank with none still takes part in the ring).
    """
    S = mask1 & mask2
    if mode == "cosine" or negatives == "cloud":
        local = _fused_point_token_contrast(f1, f2, mask1, mask2, inv_t, mode=mode, pairing=pairing,
                                            negatives=negatives, backend=backend)
        n_local = S.sum()
        return reduce((local * n_local.clamp_min(1)).reshape(1), "mean", process_group, n_local)
    B, G, D = f1.shape
    dt = acc_dtype(f1.dtype)
    Sf = S.reshape(B * G)
    u = unit(f1).reshape(B * G, D)[Sf]  # this rank's co-masked tokens, (b, i) order
    v = unit(f2).reshape(B * G, D)[Sf]
    gb = GlobalBatch(u.shape[0], process_group, f1.device, exchange)  # ranks hold different numbers of them
    inv_t = inv_t.to(dt)
    pos = (u * v).sum(-1) * inv_t
    if gb.n == 0 and not gb.ring:  # no co-masked token here: 0, still attached to the graph
        gb.gather(v.to(f2.dtype)), gb.gather(u.to(f1.dtype))  # the other ranks' gathers (cross_lse's order)
        return gb.reduce(pos, "mean", torch.zeros_like(pos, dtype=torch.bool))
    # f1_k over every co-masked f2 (rows) and f2_k over every co-masked f1 (columns)
    lse12, lse21 = cross_lse(u.to(f1.dtype), v.to(f2.dtype), inv_t, gb, backend=backend)
    per = 0.5 * (lse12.to(dt) + lse21.to(dt)) - pos
    return gb.reduce(per, "mean", torch.ones_like(per, dtype=torch.bool))


# ----------------------------------------------------------------------------- public


def _check_args(f1, f2, mask1, mask2, mode, pairing, negatives, backend):
    _checks.check_features("f1", f1, ndims=(3,))
    _checks.check_features("f2", f2, ndims=(3,))
    _checks.check_same_shape("f1", f1, "f2", f2)
    _checks.check_same_device_dtype([("f1", f1), ("f2", f2)])
    B, G, _ = f1.shape
    for name, m in (("mask1", mask1), ("mask2", mask2)):
        if m is None:
            raise ValueError(f"{name} must be a bool tensor of shape {(B, G)}, got None "
                             f"(f1 has shape {_checks.shape_str(f1)})")
        _checks.check_mask(name, m, (B, G), f1.device)
    _checks.check_choice("mode", mode, MODES)
    _checks.check_choice("pairing", pairing, PAIRINGS)
    _checks.check_choice("negatives", negatives, NEGATIVES)
    if backend is not None:
        backends._check_name(backend)


def point_token_contrast(
    f1: Tensor,
    f2: Tensor,
    mask1: Tensor,
    mask2: Tensor,
    *,
    mode: str = "infonce",
    temperature=0.1,
    pairing: str = "diag",
    negatives: str = "cloud",
    backend: str = "auto",
    process_group=None,
    exchange: str = "gather",
) -> Tensor:
    r"""Contrast of the tokens masked in both branches of a two-mask point-cloud MAE.

    Args:
        f1, f2: (B, G, D) token features of the two branches (same dtype and device).
        mask1, mask2: (B, G) bool, True where the token is masked in that branch.
        mode: ``"infonce"`` (temperature-scaled, symmetric InfoNCE) or ``"cosine"``
            (Point-CMAE's 1 − cosine).
        temperature: τ of ``"infonce"``; float or 0-dim tensor (receives a gradient).
        pairing: ``"diag"`` (token i with token i) or ``"official"`` (the released
            code: each co-masked token of f1 against all G tokens of f2); only for
            ``mode="cosine"``.
        negatives: ``"cloud"`` (candidates are the co-masked tokens of the same
            cloud) or ``"batch"`` (all co-masked tokens); only for ``"infonce"``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        exchange: ``"gather"`` or ``"ring"`` under ``process_group``: how ``negatives="batch"`` meets the
            other ranks' tokens (the other settings never leave a cloud and exchange nothing).

    Returns:
        0-dim loss, fp32 (float64 for float64 inputs); 0 (in the graph) when
        no token is co-masked.

    ::

        branch 1  ■ ■ □ ■ □      ■ masked, □ visible
        branch 2  ■ □ □ ■ ■
        S         ■ · · ■ ·      tokens 0 and 3 are contrasted

    The maths is in the module docstring of ``contrastive_ops.losses.point_token``.
    Compiles with ``torch.compile(fullgraph=True)`` on the kernel backends
    (the index lists have a static length); in eager mode "infonce" reads |S|
    once (one host sync) to cut them to the co-masked tokens.
    """
    _check_args(f1, f2, mask1, mask2, mode, pairing, negatives, backend)
    _checks.as_scalar("temperature", temperature, f1, positive=True)
    inv_t = inv_temperature(temperature, f1)
    ring = uses_ring(exchange, process_group) and mode == "infonce" and negatives == "batch"
    name = backends.resolve(backend, op="point_token_contrast", tensors=(f1, f2))
    kw = dict(mode=mode, pairing=pairing, negatives=negatives, process_group=process_group)
    if name == "reference" and not ring:
        return point_token_contrast_reference(f1, f2, mask1, mask2, inv_t, **kw)
    return _fused_point_token_contrast(f1, f2, mask1, mask2, inv_t, backend=name, exchange=exchange, **kw)
