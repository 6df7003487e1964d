r"""SupReMix: supervised contrastive regression with mixtures (Wu et al. 2023, arXiv 2309.16633).

Official code: github.com/Dingyijiang1/Mixup-Your-Own-Pairs, ``agedb-dir/``
(``supremix_loss.py`` ``SupConLoss_v2``, ``train_supremix.py`` ``mixing_func``,
``utils.py`` ``calculate_alpha_vectorized``).

Samples a, b, c run over the M = V·N features, view-major, each with the
regression label y of its instance; z = û when ``normalize`` (the official
network normalizes), G_ab = z_a·z_b/τ.  For an anchor i:

* real pairs a ≠ i: logit G_ia (gradient into both sides);
* hard negatives (``mix_neg``), one per k with y_k ≠ y_i:
  m = λ_ik z_i + (1−λ_ik) z_k, λ_ik ~ Beta(2, 8), label λ_ik y_i + (1−λ_ik) y_k;
* hard positives (``mix_pos``), one per (j, k) with y_j < y_i < y_k,
  y_i − y_j < n, y_k − y_i < n (n = ``window``):
  m = λ z_j + (1−λ) z_k, λ = (y_k − y_i)/(y_k − y_j), label exactly y_i.

Mixtures are detached and not re-normalized, so their logits are the Gram
trick on the anchor's row (no (M, M², D) mixture tensor)::

    s(z_i, m) = λ·z_i·sg(z_j)/τ + (1−λ)·z_i·sg(z_k)/τ      (hard negatives: j = i)

The loss (the paper's, one LSE over all candidates)::

    P(i)   = {a ≠ i : y_a = y_i} ∪ {hard positives of i}
    LSE_i  = log[ Σ_{a≠i} w(|y_i−y_a|) e^{G_ia} + Σ_k w(|y_i−ỹ_ik|) e^{s(z_i,m_ik)} + Σ_{(j,k)} e^{s(z_i,m_ijk)} ]
    ℓ_i    = −(τ/τ_b) · [ (1/|P(i)|) Σ_{p∈P(i)} s_ip − LSE_i ]

with the "distance magnifying" weight w(d) = d + 1 (``distance="L1_inv"``,
``use_weight=True``, the official defaults; ``"L2_inv"``: d² + 1, ``"L1"``:
1/(d + 1), ``"L2"``: 1/(d² + 1)); w = 1 for every positive, and the
numerator is unweighted.  τ_b defaults to τ (the training script passes
``base_temperature=temperature``; τ = 0.5 on AgeDB).  Anchors with P(i) = ∅
leave the mean; ``reduction="none"`` gives (V·N,) view-major, 0 for them.

Where code and paper differ (the paper is followed):

* the code max-shifts the real block and the mixture block **separately**
  (``logits_max`` includes the self-similarity; the mixture max includes the
  zero logits of the empty mixture slots), then sums both blocks in one
  denominator: the mixtures come out weighted by e^{max_real − max_mix} and
  the mixture positives' log-probabilities shifted by max_real − max_mix.
  That is a bug (the loss depends on the shift); here one joint LSE.
* ``distance="L2_inv"`` squares (y_i − ỹ + 1) for the mixtures in the code,
  (y_i − y_a) for real pairs; here (y_i − ỹ) for both.
* ``compress_mixtures`` sorts the mixture labels apart from the mixtures, so
  weights and mixtures end up misaligned; it only drops empty slots
  otherwise, and is not reproduced.
* the ``--beta`` help text lists the Beta distributions in another order than
  the code, whose default is Beta(2, 8), used here.
* the training script splits the batch into ``--pool`` sub-batches (one loss
  each): call this function per sub-batch for that.

``mix_lambda`` fixes the hard-negative λ (reproducible tests): a float or
0-dim tensor, one value per anchor (A,), or one per pair (A, M) (A = the
anchors, this rank's V·n under ``process_group``), in [0, 1], receiving no
gradient; ``None`` (the default, the official sampling) draws λ_ik ~
Beta(``beta``) per pair:

* integer a, b >= 1 with a + b <= 32 (the default Beta(2, 8)): from the
  counter-based generator of ``primitives/label_lse.py`` (``pair_lambda``),
  keyed by one seed per call drawn from torch's default CPU generator
  (``torch.manual_seed`` makes calls reproducible) and counted by the global
  anchor index i and the global sample index k.  The kernels draw λ_ik inside
  their tiles and the reference builds the same (A, M) matrix from the same
  function, so every backend gives the same loss for a given torch seed.
  Under ``process_group`` rank 0's seed is broadcast to the group, and the
  counters are global, so the ranks draw what one process would;
* other a, b: ``torch.distributions.Beta`` on torch's global generator, as the
  code does, on the reference only (an explicit kernel backend raises;
  ``"auto"`` warns and takes the reference).

The values differ from those of ``torch.distributions.Beta``: the same
distribution, another stream.

Fused composition (kernel backends) on ``sim_lse`` and ``label_lse``, the
samples sorted by label so that each label value is a column range:

* real pairs: one call with the anchor excluded (``label_lse`` with c = 1
  when ``use_weight``, its log-weight φ = log w(|y_i − y_a|) added to each
  logit; ``sim_lse`` otherwise); real positives from per-label feature sums;
* hard negatives, λ drawn per pair (``mix_lambda=None``): one ``label_lse``
  call in mixture mode, q = z_i, k = sg(z_k), row term z_i·sg(z_i)/τ,
  λ_ik drawn in the kernels from the seed and the counters (global anchor,
  global sample: the label-sorted columns keep their sample index), c = 1
  with ``use_weight`` (φ((1−λ_ik)|y_i − y_k|)) and c = 0 without it (φ = 0),
  equal labels skipped;
* hard negatives, λ a float or per anchor: the anchor rows scaled by (1−λ_i)
  against detached samples, plus λ_i·z_i·sg(z_i)/τ; with ``use_weight`` one
  ``label_lse`` call with c_i = 1 − λ_i (a mixture's label λ_i y_i + (1−λ_i) y_k
  is (1−λ_i)|y_i − y_k| away from y_i) that skips equal labels, without it
  two ``sim_lse`` calls (the columns before and after the anchor's label
  range, ``col_end`` / ``col_start``);
* hard positives, integer labels: y_j = y_i − d_j, y_k = y_i + d_k with
  1 <= d < n, so λ = d_k/(d_j + d_k) is one number per offset class
  (d_j, d_k), and Σ_{j,k} e^{λ s_ij + (1−λ) s_ik} factorizes into
  e^{LSE_j λ s_ij}·e^{LSE_k (1−λ) s_ik}: two label-range calls per class,
  2·(⌈n⌉−1)² calls (32 for n = 5); their positive logits from the per-label
  sums of the samples (summed in a fixed order, no atomics).  Their weight is
  1 (label y_i exactly), so ``use_weight`` changes nothing here.

``label_lse`` has CPU and Triton kernels; the ``"cuda"`` backend lacks it, so
there ``use_weight=True`` and ``mix_lambda=None`` (with ``mix_neg``) raise
naming it, and ``"auto"`` on CUDA tensors takes Triton for them.

What the kernels lack, so these configurations run on the reference only
(``"auto"`` takes it with a warning; an explicit kernel backend raises):

* an (A, M) ``mix_lambda`` (an anchor-by-sample input);
* ``mix_lambda=None`` with a Beta the kernels cannot draw (non-integer a or
  b, or a + b > 32);
* candidates that are pairs (j, k) of rows with a λ per pair — hard positives
  with floating-point labels (O(M³) logits λ_ijk G_ij + (1−λ_ijk) G_ik).

The reference stores A × M Gram blocks and streams the hard positives over
anchor blocks (at most 2²² logits at a time).

Under ``process_group`` the features and labels are all-gathered: the anchors
are this rank's samples (view-major), the real candidates, the mixtures'
components and the label groups global; the rows of a (A,) or (A, M)
``mix_lambda`` are this rank's anchors.
"""
from __future__ import annotations

import math
import warnings
from numbers import Real
from typing import Optional, Tuple

import torch

from .. import _checks, backends
from .._checks import as_scalar, shape_str
from .._numerics import acc_dtype, masked_lse
from ..distributed import GlobalBatch
from ..primitives.label_lse import KINDS, MAX_BETA, kernel_beta, label_lse, log_weight, pair_lambda
from ..primitives.sim_lse import sim_lse
from ._common import index_sum, label_groups, take_rows, unit

Tensor = torch.Tensor
DISTANCES = KINDS  # ("L1_inv", "L2_inv", "L1", "L2")
_BLOCK = 1 << 22  # hard-positive logits held at once by the reference
_WARNED: set = set()  # reasons already given for taking the reference under "auto"


def _log_weight(d: Tensor, distance: str) -> Tensor:
    """log w(d) for a label distance d >= 0 (``DISTANCES`` are the primitive's ``KINDS``, in its order)."""
    return log_weight(d, DISTANCES.index(distance))


def _lse_parts(parts) -> Tensor:
    """Joint LSE of per-anchor partial LSEs (each -inf where empty), -inf where all are."""
    P = torch.stack(parts, 1)
    return masked_lse(P, torch.isfinite(P), 1)


def _lambda_rows(lam: Optional[Tensor], a: Tensor, M: int, beta, like: Tensor, seed: Optional[int]) -> Tensor:
    """λ as an (A, M) (or broadcastable (A, 1) / 0-dim) tensor in the accumulation dtype; ``None``: drawn per
    pair, by the counter-based generator (``pair_lambda``, what the kernels draw) keyed by ``seed`` and the
    global (anchor, sample) indices, or from torch's generator for a Beta the kernels cannot draw (seed None)."""
    if lam is None:
        if seed is not None:
            return pair_lambda(seed, a, torch.arange(M, device=like.device), beta, like.dtype)
        b0 = torch.tensor(float(beta[0]), dtype=like.dtype, device=like.device)
        b1 = torch.tensor(float(beta[1]), dtype=like.dtype, device=like.device)
        return torch.distributions.Beta(b0, b1).sample((a.numel(), M))
    lam = lam.to(device=like.device, dtype=like.dtype)
    return lam[:, None] if lam.dim() == 1 else lam


def draw_seed(process_group=None, device=None) -> int:
    """The seed of the per-pair λ: one integer from torch's default CPU generator (``torch.manual_seed`` makes
    calls reproducible); under ``process_group`` rank 0's, broadcast, so every rank draws the same λ."""
    seed = torch.randint(0, 2 ** 31 - 1, ())
    if process_group is not None:
        import torch.distributed as dist

        t = seed.reshape(1).to(device)
        dist.broadcast(t, src=dist.get_global_rank(process_group, 0), group=process_group)
        seed = t.cpu()
    return int(seed.reshape(()))


def supremix_reference(views: Tensor, labels: Tensor, temperature, base_temperature, *, window=5,
                       beta=(2.0, 8.0), mix_neg=True, mix_pos=True, use_weight=True, distance="L1_inv",
                       mix_lambda: Optional[Tensor] = None, normalize=True, reduction="mean",
                       process_group=None, seed: Optional[int] = None) -> Tensor:
    """Exact SupReMix (the paper's joint LSE) on view-major ``views`` (V, n, D); Gram blocks A × M.

    ``mix_lambda=None``: λ per pair from ``pair_lambda(seed, ...)`` when ``seed`` is given (what the kernels
    draw), else from ``torch.distributions.Beta(beta)`` on torch's generator."""
    V, n, D = views.shape
    gb = GlobalBatch(n, process_group, views.device)
    U = unit(views, normalize)
    Z = gb.gather(U, dim=1).reshape(-1, D)  # (M, D) global samples, view-major
    N = Z.shape[0] // V
    M = V * N
    y = gb.gather_nograd(labels).to(U.dtype).repeat(V)  # (M,)
    a = gb.anchor_index(V, U.device)  # (A,) this rank's anchors
    A = a.numel()
    t = as_scalar("temperature", temperature, U)
    factor = 1.0 if base_temperature is None else t / as_scalar("base_temperature", base_temperature, U)
    Za, ya = Z[a], y[a]
    G = Za @ Z.T / t  # real logits, gradient into both sides
    Gd = Za @ Z.detach().T / t  # logits against detached samples: mixtures reach the anchor only
    not_self = a[:, None] != torch.arange(M, device=U.device)[None, :]
    dist = (ya[:, None] - y[None, :]).abs()
    w = _log_weight(dist, distance) if use_weight else torch.zeros_like(dist)
    parts = [masked_lse(G + w, not_self, 1)]
    pos_real = (dist == 0) & not_self
    pos_sum = torch.where(pos_real, G, 0).sum(1)
    pos_cnt = pos_real.sum(1).to(U.dtype)
    if mix_neg:
        lam = _lambda_rows(mix_lambda, a, M, beta, Gd, seed)
        self_d = (Za * Za.detach()).sum(1, keepdim=True) / t  # z_i·sg(z_i)/τ
        logit = lam * self_d + (1 - lam) * Gd
        wn = _log_weight((1 - lam) * dist, distance) if use_weight else 0
        parts.append(masked_lse(logit + wn, dist != 0, 1))
    if mix_pos:
        lse_p, sum_p, cnt_p = [], [], []
        step = max(1, _BLOCK // (M * M))
        for s in range(0, A, step):
            yi = ya[s:s + step, None, None]
            yj, yk = y[None, :, None], y[None, None, :]
            ok = (yj < yi) & (yi < yk) & (yi - yj < window) & (yk - yi < window)
            lp = ((yk - yi) / (yk - yj).clamp_min(1e-9)).clamp(0, 1)
            g = Gd[s:s + step]
            logit = lp * g[:, :, None] + (1 - lp) * g[:, None, :]  # (b, M, M): s(z_i, m_ijk)
            b = logit.shape[0]
            lse_p.append(masked_lse(logit.reshape(b, M * M), ok.reshape(b, M * M), 1))
            sum_p.append(torch.where(ok, logit, 0).sum((1, 2)))
            cnt_p.append(ok.sum((1, 2)).to(U.dtype))
        parts.append(torch.cat(lse_p))
        pos_sum = pos_sum + torch.cat(sum_p)
        pos_cnt = pos_cnt + torch.cat(cnt_p)
    lse = _lse_parts(parts)
    has = pos_cnt > 0
    values = -factor * (pos_sum / pos_cnt.clamp_min(1) - torch.where(has, lse, 0))
    return gb.reduce(torch.where(has, values, 0), reduction, has)


def kernel_why_not(*, mix_pos, use_weight, mix_neg, mix_lambda, labels, backend: str,
                   beta=(2.0, 8.0)) -> Optional[str]:
    """Why the fused composition cannot compute this configuration on ``backend`` (None: it can)."""
    if use_weight and not backends.has_primitive(backend, "label_lse"):
        return (f"use_weight=True needs the label_lse primitive (a per-pair label log-weight in the LSE), which "
                f"backend {backend!r} does not implement (the cpu and triton backends do)")
    if mix_pos and labels.is_floating_point():
        return ("mix_pos=True with floating-point labels needs an LSE over pairs (j, k) of candidates with a "
                "lambda per pair (O(M^3) logits), which the sim_lse primitive lacks; integer labels are composed")
    if mix_neg and mix_lambda is not None and mix_lambda.dim() == 2:
        return ("mix_neg with an (A, M) mix_lambda (an anchor-by-sample input) runs on the reference only; pass "
                "None (drawn per pair in the kernels), a float or one lambda per anchor")
    if mix_neg and mix_lambda is None:
        if not kernel_beta(beta):
            return (f"mix_lambda=None with beta={tuple(beta)}: the kernels draw lambda per pair from Beta(a, b) "
                    f"for integers a, b >= 1 with a + b <= {MAX_BETA} only")
        if not backends.has_primitive(backend, "label_lse"):
            return (f"mix_lambda=None (lambda drawn per pair) needs the label_lse primitive's mixture mode, which "
                    f"backend {backend!r} does not implement (the cpu and triton backends do)")
    return None


def _fused_supremix(views: Tensor, labels: Tensor, temperature, base_temperature, *, window=5, mix_neg=True,
                    mix_pos=False, use_weight=False, distance="L1_inv", mix_lambda: Optional[Tensor] = None,
                    normalize=True, reduction="mean", backend: str, process_group=None, beta=(2, 8),
                    seed: Optional[int] = None) -> Tensor:
    """SupReMix on the primitives (hard positives for integer labels, λ a float, per anchor or drawn per pair
    in the kernels from ``seed``): no A × M buffer."""
    V, n, D = views.shape
    gb = GlobalBatch(n, process_group, views.device)
    U = unit(views, normalize)
    Ug = gb.gather(U, dim=1)
    N = Ug.shape[1]
    Z = Ug.reshape(V * N, D)
    yl = gb.gather_nograd(labels)
    a = gb.anchor_index(V, U.device)
    Za = U.reshape(V * n, D)
    t = as_scalar("temperature", temperature, U)
    factor = 1.0 if base_temperature is None else t / as_scalar("base_temperature", base_temperature, U)
    scale = 1.0 / t
    Zk = Z.to(views.dtype)
    Zak = Zk if gb.group is None else Za.to(views.dtype)
    y = yl.repeat(V)
    ya = y[a]
    if use_weight:  # Σ_{a≠i} w(|y_i − y_a|) e^{G_ia}: the label term in the LSE
        parts = [label_lse(Zak, Zk, scale, ya, y, kind=distance, exclude=a, backend=backend)]
    else:
        parts = [sim_lse(Zak, Zk, scale, exclude=a, backend=backend)[0]]
    # real positives: per-label sums of the samples (one label group per instance label, repeated per view)
    gid = label_groups(yl, N, U.device).repeat(V)
    # label sums in an order fixed by the data (index_sum / take_rows: no atomics on CUDA)
    group_sum = index_sum(Z, gid, V * N)
    group_cnt = index_sum(torch.ones_like(gid), gid, V * N)
    ga = gid[a]
    pos_sum = ((take_rows(group_sum, ga) - Za) * Za).sum(-1) * scale
    pos_cnt = take_rows(group_cnt, ga) - 1
    if mix_neg or mix_pos:
        ys, perm = torch.sort(y)  # the samples sorted by label: each label value is a column range
        Kd = Z.detach()[perm].to(views.dtype)
    if mix_neg and mix_lambda is None:
        # λ_ik drawn per pair inside the kernels (label_lse's mixture mode), keyed by the global anchor and sample
        # indices: logit λ_ik·z_i·sg(z_i)/τ + (1−λ_ik)·z_i·sg(z_k)/τ + φ((1−λ_ik)|y_i − y_k|) (φ = 0 without
        # use_weight: coef 0), equal labels skipped
        self_d = (Za * Za.detach()).sum(1) * scale
        coef = 1.0 if use_weight else 0.0
        neg = label_lse(Za.to(views.dtype), Kd, scale, ya, ys, kind=distance if use_weight else 0, coef=coef,
                        skip_equal=True, row_term=self_d, seed=seed, beta=(int(beta[0]), int(beta[1])), row_ids=a,
                        col_ids=perm, backend=backend)
        parts.append(neg)
    elif mix_neg:
        lam = mix_lambda.to(device=U.device, dtype=U.dtype)  # 0-dim or (A,)
        Q = ((1 - lam).reshape(-1, 1) * Za).to(views.dtype)  # (1−λ_i)·z_i against sg(z_k)
        self_d = (Za * Za.detach()).sum(1) * scale
        if use_weight:
            # the mixture's label is λ_i y_i + (1−λ_i) y_k: its distance (1−λ_i)|y_i − y_k|; equal labels skipped
            neg = label_lse(Q, Kd, scale, ya, ys, kind=distance, coef=(1 - lam).expand(ya.shape), skip_equal=True,
                            backend=backend)
        else:
            lo = torch.searchsorted(ys, ya, right=False)  # candidates before the anchor's label range
            hi = torch.searchsorted(ys, ya, right=True)  # and after it
            before = sim_lse(Q, Kd, scale, col_end=lo, backend=backend)[0]
            after = sim_lse(Q, Kd, scale, col_start=hi, backend=backend)[0]
            neg = _lse_parts([before, after])
        parts.append(lam * self_d + neg)
    if mix_pos:
        # Integer labels: y_j = y_i − d_j, y_k = y_i + d_k with 1 <= d < window, λ = d_k/(d_j + d_k) is one
        # number per offset class (d_j, d_k), where Σ_{j,k} e^{λ s_ij + (1−λ) s_ik} factorizes into
        # e^{LSE_j λ s_ij} · e^{LSE_k (1−λ) s_ik}: two label-range LSEs per class.  The positive logits sum
        # to λ·|k's|·z_i·Σ_j sg(z_j)/τ + (1−λ)·|j's|·z_i·Σ_k sg(z_k)/τ, from the label-group sums of the samples.
        # Σ of the detached samples of one label value: its group's sum (a label absent from the batch: 0).
        gsum_d = group_sum.detach()
        gid_sorted = gid[perm]

        def range_sum(lo, hi):
            first = take_rows(gid_sorted, lo.clamp(max=ys.numel() - 1))
            return torch.where((hi > lo)[:, None], take_rows(gsum_d, first), 0)
        offsets = range(1, math.ceil(window))
        Zak_rows = Za.to(views.dtype)

        def label_range(d):
            return torch.searchsorted(ys, ya + d, right=False), torch.searchsorted(ys, ya + d, right=True)

        below = {d: label_range(-d) for d in offsets}
        above = {d: label_range(d) for d in offsets}
        for dj in offsets:
            lo_j, hi_j = below[dj]
            sum_j = (range_sum(lo_j, hi_j) * Za).sum(1) * scale
            for dk in offsets:
                lo_k, hi_k = above[dk]
                lp = dk / (dj + dk)
                lse_j = sim_lse(Zak_rows, Kd, scale * lp, col_start=lo_j, col_end=hi_j, backend=backend)[0]
                lse_k = sim_lse(Zak_rows, Kd, scale * (1 - lp), col_start=lo_k, col_end=hi_k, backend=backend)[0]
                parts.append(lse_j + lse_k)
                sum_k = (range_sum(lo_k, hi_k) * Za).sum(1) * scale
                n_j, n_k = hi_j - lo_j, hi_k - lo_k
                pos_sum = pos_sum + lp * n_k * sum_j + (1 - lp) * n_j * sum_k
                pos_cnt = pos_cnt + n_j * n_k
    lse = _lse_parts(parts)
    has = pos_cnt > 0
    values = -factor * (pos_sum / pos_cnt.clamp_min(1) - torch.where(has, lse, 0))
    return gb.reduce(torch.where(has, values, 0), reduction, has)


def _auto_with_label_lse(name: str, views: Tensor) -> str:
    """Under ``"auto"``: the first backend of the device's priority list after ``name`` that runs
    supremix_loss and has the ``label_lse`` primitive (Triton on CUDA tensors), else ``name``."""
    prio = backends.AUTO_PRIORITY.get(views.device.type, ())
    for cand in prio[prio.index(name) + 1:] if name in prio else ():
        if cand == "reference" or not backends.has_primitive(cand, "label_lse"):
            continue
        try:
            return backends.resolve(cand, op="supremix_loss", tensors=[views])
        except RuntimeError:
            continue
    return name


def _check_lambda(mix_lambda, A: int, M: int, like: Tensor) -> Optional[Tensor]:
    if mix_lambda is None:
        return None
    if isinstance(mix_lambda, Tensor):
        if mix_lambda.is_complex() or mix_lambda.dtype == torch.bool:
            raise ValueError(f"mix_lambda must be real, got dtype {mix_lambda.dtype}")
        if tuple(mix_lambda.shape) not in ((), (A,), (A, M)):
            raise ValueError(f"mix_lambda must be a float, a 0-dim tensor, ({A},) or ({A}, {M}) for {A} anchors "
                             f"and {M} samples, got shape {shape_str(mix_lambda)}")
        if mix_lambda.device != like.device:
            raise ValueError(f"mix_lambda is on {mix_lambda.device} but the features are on {like.device}")
        lam = mix_lambda.detach().to(acc_dtype(like.dtype))
    elif isinstance(mix_lambda, Real) and not isinstance(mix_lambda, bool):
        lam = torch.tensor(float(mix_lambda), dtype=acc_dtype(like.dtype), device=like.device)
    else:
        raise ValueError(f"mix_lambda must be a float or a tensor, got {type(mix_lambda).__name__}")
    if not torch.compiler.is_compiling() and not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"mix_lambda must lie in [0, 1], got values in [{float(lam.min())}, {float(lam.max())}] "
                         f"(shape {shape_str(lam)})")
    return lam


def supremix_loss(features, labels, temperature=0.5, *, base_temperature=None, window=5, beta=(2.0, 8.0),
                  mix_neg=True, mix_pos=True, use_weight=True, distance="L1_inv", mix_lambda=None, normalize=True,
                  reduction="mean", backend="auto", process_group=None) -> Tensor:
    r"""SupReMix (supervised contrastive regression with hard mixtures), the paper's joint LSE.

    Args:
        features: (N, V, D) (the official code: V = 2 views), (N, D) as one view, or a sequence of V
            (N, D) tensors.
        labels: (N,) regression targets (float or integer), finite.
        temperature: τ > 0; base_temperature: τ_b > 0, ``None`` (default) = τ as the training script.
        window: n > 0, the label window of the hard positives (``--n``).
        beta: the Beta(a, b) of the hard-negative λ (default Beta(2, 8), the code's default).
        mix_neg, mix_pos: add the hard negatives / hard positives (both: ``--contrastive_method supremix``).
        use_weight, distance: the "distance magnifying" denominator weight w (``"L1_inv"``: |Δy| + 1).
        mix_lambda: fixes the hard-negative λ: float, 0-dim, (A,) per anchor or (A, M) per pair; ``None``
            draws it per pair from Beta(``beta``): for integer a, b (a + b <= 32) from a counter-based
            generator keyed by a seed drawn from torch's generator (the same λ on every backend; rank 0's
            seed under ``process_group``), otherwise from ``torch.distributions.Beta`` (reference only).
        normalize: L2-normalize the features first (the official network does).
        reduction: ``"mean"`` over anchors with a positive, ``"sum"``, or ``"none"`` ((V·N,) view-major).

    Kernel backends (``"cpu"``, ``"triton"``; ``"cuda"`` with ``use_weight=False`` and a given
    ``mix_lambda`` only) compute every ``distance`` with or without ``use_weight``, with ``mix_lambda``
    None (λ drawn per pair inside the kernels, integer Beta), a float or per anchor (or ``mix_neg=False``),
    and ``mix_pos=True`` for integer labels.  On the reference only: an (A, M) ``mix_lambda``, a
    non-integer ``beta`` with ``mix_lambda=None``, and ``mix_pos=True`` with floating-point labels; see the
    module docstring.
    Returns fp32 (float64 for float64 inputs).
    """
    views = _checks.check_views("features", features, min_views=1, allow_single=True)
    V, N, D = views.shape
    if not isinstance(labels, Tensor):
        raise ValueError(f"labels must be a tensor of shape ({N},), got {type(labels).__name__}")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be real, got dtype {labels.dtype} with shape {shape_str(labels)}")
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape ({N},) for features of {V} views of shape ({N}, {D}), "
                         f"got {shape_str(labels)}")
    if labels.device != views.device:
        raise ValueError(f"labels is on {labels.device} but the features are on {views.device}")
    if labels.is_floating_point() and not torch.compiler.is_compiling() and not bool(torch.isfinite(labels).all()):
        raise ValueError(f"labels must be finite (shape {shape_str(labels)})")
    _checks.check_reduction(reduction)
    _checks.check_choice("distance", distance, DISTANCES)
    if isinstance(window, bool) or not isinstance(window, Real) or not window > 0:
        raise ValueError(f"window must be a number > 0, got {window!r}")
    if (not isinstance(beta, (tuple, list)) or len(beta) != 2
            or not all(isinstance(b, Real) and not isinstance(b, bool) and b > 0 for b in beta)):
        raise ValueError(f"beta must be a pair (a, b) of numbers > 0, got {beta!r}")
    temperature = _checks.as_scalar("temperature", temperature, views, positive=True)
    if base_temperature is not None:
        base_temperature = _checks.as_scalar("base_temperature", base_temperature, views, positive=True)
    gb_n = GlobalBatch(N, process_group, views.device).total if process_group is not None else N
    lam = _check_lambda(mix_lambda, V * N, V * gb_n, views)
    requested = backends.get_backend() if backend is None else backend
    name = backends.resolve(backend, op="supremix_loss", tensors=[views])
    # λ per pair: one seed from torch's generator (rank 0's under process_group) keys the counter-based draws of
    # the kernels and of the reference alike; a Beta the kernels cannot draw keeps torch.distributions.Beta
    seed = draw_seed(process_group, views.device) if mix_neg and lam is None and kernel_beta(beta) else None
    kw = dict(mix_neg=bool(mix_neg), mix_lambda=lam, normalize=normalize, reduction=reduction,
              process_group=process_group, seed=seed)
    if name != "reference":
        needs_label_lse = use_weight or (mix_neg and lam is None)
        if requested == "auto" and needs_label_lse and not backends.has_primitive(name, "label_lse"):
            name = _auto_with_label_lse(name, views)
        why = kernel_why_not(mix_pos=mix_pos, use_weight=use_weight, mix_neg=mix_neg, mix_lambda=lam, labels=labels,
                             backend=name, beta=beta)
        if why is not None and requested != "auto":
            raise RuntimeError(f"backend {name!r} cannot run supremix_loss with these arguments: {why}")
        if why is None:
            return _fused_supremix(views, labels, temperature, base_temperature, window=window,
                                   mix_pos=bool(mix_pos), use_weight=bool(use_weight), distance=distance,
                                   backend=name, beta=beta, **kw)
        if why not in _WARNED:
            _WARNED.add(why)
            warnings.warn(f"contrastive_ops: supremix_loss runs on the plain-PyTorch reference ({why}); "
                          "pass backend='reference' to silence this.", RuntimeWarning, stacklevel=2)
    return supremix_reference(views, labels, temperature, base_temperature, window=window, beta=beta,
                              mix_pos=bool(mix_pos), use_weight=bool(use_weight), distance=distance, **kw)
