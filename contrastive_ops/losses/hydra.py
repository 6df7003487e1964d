r"""Hydra: contrast of class-gated features, each positive against the negatives only.

Wu et al., "Rethinking positive pairs in contrastive learning" (arXiv 2410.18200).
Official code: github.com/erow/hydra ``moco/builder.py`` (``MoCo.disparate_loss``,
``multipos_ce_loss``) with ``moco/filter.py`` (``Filter``, ``BasicGate``), and
github.com/erow/vitookit ``simlap.py`` (``SimLAP.disparate_loss``).

Inputs: this rank's anchors ``z1`` (B, D) with their gates ``gate`` (B, D)
(in the code ``g = σ(MLP((E[y1] + E[posy])/2))``, a network of the model, so
the loss takes its output), the keys ``k2`` (B, D) of the same samples, the
class ``y1`` (B,) of each sample and the class ``posy`` (B,) paired with each
anchor.  Keys (and their classes ``y1``) are all-gathered under a
``process_group``: M keys in all.  With s = 1/τ, for anchor i and key j:

``gating="filter"`` (hydra ``Filter``: the keys gated with the anchor's gate)::

    l_ij = s · n(z_i ⊙ g_i) · n(k_j ⊙ g_i),       n(x) = x / max(‖x‖, 1e-12)
         = s · Σ_d z_id g_id² k_jd / (‖z_i ⊙ g_i‖ · ‖k_j ⊙ g_i‖)

  with ‖k_j ⊙ g_i‖² = Σ_d g_id² k_jd²: a norm per pair (i, j).

``gating="simlap"`` (vitookit ``SimLAP``: ``contrast(z1*gate*gate, k2)`` on
normalized features, not normalized again)::

    l_ij = s · (ẑ_i ⊙ g_i ⊙ g_i) · k̂_j

Classes of the pair: c1_ij = [y1_j = y1_i], c2_ij = [y1_j = posy_i].  The
negatives of i are the keys of neither class, neg(i) = {j : ¬c1_ij ∧ ¬c2_ij};
the positives are ``positives="c2"``: {j : c2_ij} (``c2_mask``, simlap and the
current builder) or ``"class"``: {j : c1_ij ∨ c2_ij} (``class_mask``, an
earlier builder revision).  Each positive pair is contrasted with the
negatives only (the other positives are in no denominator)::

    N_i    = LSE_{k ∈ neg(i)} l_ik                   (−∞ when neg(i) = ∅)
    t_ij   = log(e^{l_ij} + e^{N_i}) − l_ij = softplus(N_i − l_ij)
    loss   = Σ_i Σ_{j ∈ pos(i)} t_ij / |pos|         (|pos|: all positive pairs)

``reduction="none"`` gives per anchor Σ_{j∈pos(i)} t_ij (B,), ``"sum"`` their
sum, ``"mean"`` the sum over the number of positive pairs (the code's
``/pos_mask.sum()``); no positive pair at all gives 0, in the graph.

Where this differs from the code:

* ``multipos_ce_loss`` subtracts the row mean of the logits and then
  exponentiates: the loss is the same (the shift cancels in t_ij), but
  e^{l − mean} overflows once a row spreads over ~88 (fp32) around its mean,
  and the division by ``pos_mask.sum()`` is NaN without positives.  Here N_i
  is an LSE and t_ij a logaddexp: finite for finite inputs.
* the builder's ``concat_all_gather`` carries no gradient (its keys come from
  the momentum encoder); simlap gathers with gradient, as here (SPEC
  "Distributed"): pass detached keys for the builder's setting.
* the temperature: simlap ``s = 1/temperature`` (``temperature=0.1``, the
  default here); the builder scales by a learnable ``scale_logit.exp()``
  (initialized to 20): pass ``temperature = 1/scale`` as a 0-dim tensor, it
  receives its gradient.
* the paper describes gating both sides with the pair's gate and normalizing,
  the ``"filter"`` gating; simlap's variant (``"simlap"``) drops the second
  normalization.

Fused composition (``gating="simlap"``, every kernel backend) on ``sim_lse``:
with Q = ẑ ⊙ g² and the keys k̂ sorted by class (each class a column range),
the negatives of anchor i are the columns outside its two class ranges
[a_lo, a_hi) ≤ [b_lo, b_hi): the arcs [b_hi, M + a_lo) and [a_hi, b_lo) of the
sorted keys repeated twice, so N_i is two row LSEs with a column range each
(no B × M mask, no log-subtraction).  The anchors reach the core ordered by
(a_lo, b_lo) (``row_index``), so a kernel's row block spans about the columns
its rows need.  The P positive logits (B·M/C for C balanced classes) come
from one product per class, the anchors paired with that class against its
column range of the sorted keys, batched: classes whose (anchor count, key
count) round up to the same powers of two form one padded ``bmm`` (at most 4×
their P logits), so a batch of 1000 classes is a handful of products, not a
thousand.  O(P) logits and O((B + M)·D) gathered rows (each anchor and key row
once per call), a host synchronization for the class buckets.  (Gathering the
two rows of every pair instead costs O(P·D) memory.)

``gating="filter"`` needs, per tile, the second product Σ_d g_id² k_jd² for the
per-pair key norm: the ``gated_lse`` primitive (``primitives/gated_lse.py``),
on the same layout (sorted keys repeated twice, two column ranges per anchor,
anchors ordered by their ranges), with a = n(z ⊙ g) ⊙ g and w = g² in the
accumulation dtype and the raw keys; the positive logits are one product pair
per class bucket, (a·kᵀ)·max(w·(k⊙k)ᵀ, eps²)^(-1/2)·s.  The ``"cpu"`` (C++, CPU tensors) and
``"triton"`` backends implement ``gated_lse``; the ``"cuda"`` backend does not: asked for explicitly it
raises for ``"filter"``, and under ``"auto"`` it gives way to the next backend of the device's priority
that has the primitive (on CUDA tensors: triton), else to the reference with a warning.  On CPU tensors
``"auto"`` takes the ``"cpu"`` kernels.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _checks, backends
from .._checks import as_scalar, shape_str
from .._numerics import acc_dtype, masked_lse
from ..distributed import GlobalBatch
from ..primitives.gated_lse import gated_lse
from ..primitives.sim_lse import sim_lse
from ._common import NORM_EPS, index_sum, kernel_operands, take_rows, unit

Tensor = torch.Tensor
POSITIVES = ("c2", "class")
GATINGS = ("filter", "simlap")
_WARNED: set = set()  # reasons already given for taking the reference under "auto"


def gated_logits(z1: Tensor, keys: Tensor, gate: Tensor, scale: Tensor, gating: str) -> Tensor:
    """Dense (B, M) logits l_ij of the module docstring, in the accumulation dtype (reference only)."""
    dt = acc_dtype(z1.dtype)
    z, k, g = z1.to(dt), keys.to(dt), gate.to(dt)
    if gating == "simlap":
        return (unit(z) * g * g) @ unit(k).T * scale
    # n(z_i ⊙ g_i) ⊙ g_i against the raw keys, divided by ‖k_j ⊙ g_i‖ (clamped like F.normalize; the clamp
    # on the squared norm keeps the gradient finite where a gate closes a key's support)
    a = F.normalize(z * g, dim=-1, eps=NORM_EPS) * g
    kn2 = (g * g) @ (k * k).T
    return (a @ k.T) * kn2.clamp_min(NORM_EPS * NORM_EPS).rsqrt() * scale


def hydra_reference(z1: Tensor, k2: Tensor, gate: Tensor, y1: Tensor, posy: Tensor, temperature, *,
                    positives: str = "c2", gating: str = "filter", reduction: str = "mean",
                    process_group=None) -> Tensor:
    """Exact dense Hydra loss: (B, M) logits and class masks of this rank's anchors against the gathered keys."""
    gb = GlobalBatch(z1.shape[0], process_group, z1.device)
    keys = gb.gather(k2)
    yk = gb.gather_nograd(y1)
    dt = acc_dtype(z1.dtype)
    scale = 1.0 / as_scalar("temperature", temperature, z1.to(dt))
    L = gated_logits(z1, keys, gate, scale, gating)
    c1 = y1[:, None] == yk[None, :]
    c2 = posy[:, None] == yk[None, :]
    pos = c2 if positives == "c2" else (c1 | c2)
    neg_lse = masked_lse(L, ~(c1 | c2), 1)  # N_i
    term = torch.logaddexp(neg_lse[:, None], L) - L
    values = torch.where(pos, term, 0).sum(1)
    return gb.reduce(values, reduction, count=pos.sum())


def _class_ranges(sorted_labels: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    """[lo, hi) of each label's run in ``sorted_labels`` (empty where absent)."""
    return (torch.searchsorted(sorted_labels, labels, right=False),
            torch.searchsorted(sorted_labels, labels, right=True))


def _fused_hydra(z1: Tensor, k2: Tensor, gate: Tensor, y1: Tensor, posy: Tensor, temperature, *,
                 positives: str = "c2", gating: str = "simlap", reduction: str = "mean", backend: str,
                 process_group=None) -> Tensor:
    """The fused composition (module docstring): two column-range row LSEs for the negatives (``sim_lse``
    for ``"simlap"``, ``gated_lse`` for ``"filter"``), pair logits for the positives; never builds B × M."""
    B = z1.shape[0]
    gb = GlobalBatch(B, process_group, z1.device)
    dt = acc_dtype(z1.dtype)
    scale = 1.0 / as_scalar("temperature", temperature, z1.to(dt))
    if gating == "simlap":
        Qk, Qr = kernel_operands(unit(z1) * gate.to(dt) * gate.to(dt), z1.dtype)  # ẑ ⊙ g²
        Kk, Kr = kernel_operands(unit(gb.gather(k2)), k2.dtype)  # k̂, all ranks
    else:  # filter: a = n(z ⊙ g) ⊙ g and w = g² in the accumulation dtype, the raw keys as given
        g = gate.to(dt)
        Qk = Qr = F.normalize(z1.to(dt) * g, dim=-1, eps=NORM_EPS) * g
        Wr = g * g
        Kk = gb.gather(k2)
        Kr = Kk.to(dt)
    yk = gb.gather_nograd(y1)
    M = yk.numel()
    ys, perm = torch.sort(yk)
    perm = perm.long()
    Ks = take_rows(Kk, perm, distinct=True)  # keys sorted by class: one column range per class
    lo1, hi1 = _class_ranges(ys, y1)
    lo2, hi2 = _class_ranges(ys, posy)
    first = lo1 <= lo2
    a_lo, a_hi = torch.where(first, lo1, lo2), torch.where(first, hi1, hi2)
    b_lo, b_hi = torch.where(first, lo2, lo1), torch.where(first, hi2, hi1)
    # Negatives: outside [a_lo, a_hi) ∪ [b_lo, b_hi).  On the sorted keys repeated twice the two arcs
    # [b_hi, M + a_lo) and [a_hi, b_lo) are contiguous (both ranges equal when y1_i = posy_i: the middle
    # arc is then empty).
    # The anchors go to the core ordered by their two ranges, so that the rows of a kernel's row block
    # share their column ranges (a block computes the union of its rows' ranges).
    order = torch.sort(a_lo * (M + 1) + b_lo, stable=True)[1]
    back = torch.empty_like(order)
    back[order] = torch.arange(B, device=order.device)
    K2 = torch.cat([Ks, Ks], 0)
    arcs = ((b_hi, a_lo + M), (a_hi, torch.maximum(b_lo, a_hi)))
    if gating == "simlap":
        outer, inner = (sim_lse(Qk, K2, scale, row_index=order, col_start=lo[order], col_end=hi[order],
                                backend=backend)[0] for lo, hi in arcs)
    else:
        Qo, Wo = take_rows(Qk, order, distinct=True), take_rows(Wr, order, distinct=True)
        outer, inner = (gated_lse(Qo, Wo, K2, scale, col_start=lo[order], col_end=hi[order], backend=backend)
                        for lo, hi in arcs)
    both = take_rows(torch.stack([outer, inner], 1), back, distinct=True)  # back in anchor order
    neg_lse = masked_lse(both, torch.isfinite(both), 1)  # N_i
    # Positive pairs: the anchors listed by positive class c (posy, or for "class" also y1 ≠ posy)
    # against the keys of c, a column range of the sorted keys.  Never B × M.
    anchors, labels = torch.arange(B, device=z1.device), posy
    if positives == "class":  # y1's class too, where it is another class than posy's
        other = y1 != posy
        anchors, labels = torch.cat([anchors, anchors[other]]), torch.cat([posy, y1[other]])
    labels, by_class = torch.sort(labels, stable=True)
    anchors = anchors[by_class]
    classes, runs = torch.unique_consecutive(labels, return_counts=True)
    key_classes, key_runs = torch.unique_consecutive(ys, return_counts=True)
    at = torch.searchsorted(key_classes, classes).clamp(max=key_classes.numel() - 1)
    found = key_classes[at] == classes
    Ksr = take_rows(Kr, perm, distinct=True)
    Qa = take_rows(Qr, anchors, distinct=positives == "c2")
    Wa = take_rows(Wr, anchors, distinct=positives == "c2") if gating == "filter" else None
    Na = take_rows(neg_lse, anchors, distinct=positives == "c2")
    vals, pos, P = _positive_terms(Qa, Wa, Na, Ksr, scale, runs, key_runs, at, found)
    if vals is None:  # no positive pair anywhere: a zero that keeps the graph
        values = index_sum(0 * Qa[:, 0], anchors, B)
    else:
        values = index_sum(vals, take_rows(anchors, pos), B)
    return gb.reduce(values, reduction, count=torch.tensor(P, device=z1.device))


def _positive_terms(Qa: Tensor, Wa: Optional[Tensor], Na: Tensor, Ksr: Tensor, scale: Tensor, runs: Tensor,
                    key_runs: Tensor, at: Tensor, found: Tensor):
    """Σ_{j ∈ class c} [logaddexp(N_i, L_ij) − L_ij] of every anchor row i of ``Qa`` (grouped by class: ``runs``
    rows per class, the keys of class ``at[c]`` a run of ``key_runs`` rows of ``Ksr``), O(P) logits.

    Classes are batched: those whose (anchor count, key count) round up to the same powers of two form one
    padded ``bmm`` (at most 4× the bucket's P logits), so the work is a few large products whatever the
    number of classes (ImageNet's 1000 classes at batch 1024 would be ~1000 tiny products otherwise).
    Returns (terms, row of ``Qa`` of each term, P), or (None, None, 0) without positive pairs."""
    dev = Qa.device
    a_off = torch.cumsum(runs, 0) - runs
    k_off = torch.cumsum(key_runs, 0) - key_runs
    na, nk = runs, torch.where(found, key_runs[at], 0)
    live = (nk > 0).nonzero().flatten()
    if live.numel() == 0:
        return None, None, 0
    na_l, nk_l = na[live], nk[live]
    P = int((na_l * nk_l).sum())
    ceil2 = lambda n: torch.exp2(torch.ceil(torch.log2(n.double()))).long()  # noqa: E731
    pa, pk = ceil2(na_l), ceil2(nk_l)
    bucket = pa * (int(pk.max()) + 1) + pk
    vals, pos = [], []
    for b in torch.unique(bucket).tolist():  # a host synchronization per call (as the class splits were)
        sel = (bucket == b).nonzero().flatten()
        cls = live[sel]
        A_pad, K_pad = int(pa[sel[0]]), int(pk[sel[0]])
        ar, kr = torch.arange(A_pad, device=dev), torch.arange(K_pad, device=dev)
        a_ok = ar[None, :] < na[cls][:, None]  # (n, A_pad)
        k_ok = kr[None, :] < nk[cls][:, None]  # (n, K_pad)
        a_idx = torch.where(a_ok, a_off[cls][:, None] + ar[None, :], 0)
        k_idx = torch.where(k_ok, k_off[at[cls]][:, None] + kr[None, :], 0)
        n = cls.numel()
        Qb = take_rows(Qa, a_idx.flatten()).view(n, A_pad, -1)
        Kb = take_rows(Ksr, k_idx.flatten()).view(n, K_pad, -1)
        L = torch.bmm(Qb, Kb.transpose(1, 2))
        if Wa is not None:  # the per-pair key norm under the anchor's gate, clamped as the reference
            Wb = take_rows(Wa, a_idx.flatten()).view(n, A_pad, -1)
            L = L * torch.bmm(Wb, (Kb * Kb).transpose(1, 2)).clamp_min(NORM_EPS * NORM_EPS).rsqrt()
        L = L * scale
        Nb = take_rows(Na, a_idx.flatten()).view(n, A_pad, 1)
        term = torch.where(k_ok[:, None, :], torch.logaddexp(Nb, L) - L, 0).sum(2)  # (n, A_pad)
        vals.append(term[a_ok])
        pos.append(a_idx[a_ok])
    return torch.cat(vals), torch.cat(pos), P


def kernel_why_not(gating: str, backend: str) -> Optional[str]:
    """Why kernel backend ``backend`` cannot run the fused composition of this gating (None: it can)."""
    if gating == "filter" and not backends.has_primitive(backend, "gated_lse"):
        return ("gating='filter' normalizes each key with the anchor's gate, a per-pair norm "
                f"sum_d g_id^2 k_jd^2 (a second product per tile): the gated_lse primitive, which backend "
                f"{backend!r} lacks (the 'cpu' and 'triton' backends have it)")
    return None


def _auto_filter_backend(tensors) -> Optional[str]:
    """Under ``"auto"`` for ``gating="filter"``: the first kernel backend of the device's priority that runs
    hydra_loss here and has ``gated_lse`` (None: none)."""
    device = tensors[0].device
    for cand in backends.AUTO_PRIORITY.get(device.type, ()):
        if cand == "reference":
            continue
        try:
            name = backends.resolve(cand, op="hydra_loss", tensors=tensors)
        except RuntimeError:
            continue
        if kernel_why_not("filter", name) is None:
            return name
    return None


def hydra_loss(z1, k2, gate, y1, posy, temperature=0.1, *, positives="c2", gating="filter", reduction="mean",
               backend="auto", process_group=None) -> Tensor:
    r"""Hydra / SimLAP disparate contrast: class-gated features, each positive against the negatives only.

    Args:
        z1: (B, D) anchor features (the official code: predictor outputs, not normalized).
        k2: (B, D) key features of the same samples (momentum-encoder outputs in the builder), same
            dtype and device; all-gathered with gradient under ``process_group``.
        gate: (B, D) the anchors' gates g = σ(MLP((E[y1] + E[posy])/2)) (the model's gate network),
            floating point; receives its gradient.
        y1: (B,) integer class of each sample (anchor and key).
        posy: (B,) integer class paired with each anchor (``y1`` shuffled in the code).
        temperature: τ > 0, float or 0-dim tensor (simlap: 0.1; the builder's learnable scale: 1/scale).
        positives: ``"c2"`` (keys of class ``posy``; simlap and the current builder) or ``"class"``
            (keys of class ``y1`` or ``posy``; an earlier builder revision).  Negatives: keys of neither.
        gating: ``"filter"`` (hydra ``Filter``: each key gated with the anchor's gate and normalized per
            pair) or ``"simlap"`` (normalized features, anchor times g², no second normalization).
        reduction: ``"mean"`` over all positive pairs, ``"sum"``, or ``"none"``: (B,) per-anchor sums.

    Kernel backends run ``gating="simlap"``; ``"filter"`` runs on the reference, the ``"cpu"`` and the
    ``"triton"`` backends (the ``gated_lse`` primitive; the ``"cuda"`` backend raises, see the module
    docstring).  The fused path reads the class
    runs on the host (a synchronization; a graph break under ``torch.compile``).  Returns fp32 (float64
    for float64 inputs).
    """
    _checks.check_pair("z1", z1, "k2", k2, same_rows=True)
    B, D = z1.shape
    _checks.check_features("gate", gate)
    if gate.shape != z1.shape:
        raise ValueError(f"gate must have the shape of z1 {shape_str(z1)}, got {shape_str(gate)}")
    if gate.device != z1.device:
        raise ValueError(f"gate is on {gate.device} but z1 is on {z1.device}")
    _checks.check_labels("y1", y1, B, z1.device)
    _checks.check_labels("posy", posy, B, z1.device)
    _checks.check_choice("positives", positives, POSITIVES)
    _checks.check_choice("gating", gating, GATINGS)
    _checks.check_reduction(reduction)
    temperature = _checks.as_scalar("temperature", temperature, z1, positive=True)
    requested = backends.get_backend() if backend is None else backend
    name = backends.resolve(backend, op="hydra_loss", tensors=[z1])
    kw = dict(positives=positives, reduction=reduction, process_group=process_group)
    if name != "reference":
        why = kernel_why_not(gating, name)
        if why is not None and requested != "auto":
            raise RuntimeError(f"backend {name!r} cannot run hydra_loss with these arguments: {why}")
        if why is not None:  # "auto": a later kernel backend of the priority may have the primitive
            alt = _auto_filter_backend([z1])
            if alt is not None:
                name, why = alt, None
        if why is None:
            return _fused_hydra(z1, k2, gate, y1, posy, temperature, gating=gating, backend=name, **kw)
        if why not in _WARNED:
            _WARNED.add(why)
            warnings.warn(f"contrastive_ops: hydra_loss runs on the plain-PyTorch reference ({why}); "
                          "pass backend='reference' to silence this.", RuntimeWarning, stacklevel=2)
    return hydra_reference(z1, k2, gate, y1, posy, temperature, gating=gating, **kw)
