r"""CACR: contrastive attraction and contrastive repulsion (Zheng et al., NeurIPS 2021).

Official code: github.com/JegZheng/CACR-SSL, ``small_scale_experiments/losses/__init__.py``
(``our_loss1`` attraction, ``our_loss2`` / ``forward_negative_loss`` repulsion with the Euclidean
cost; the training scripts ``*/main_ours.py`` add them).  Features z^x_i, x = 0..V−1 views of
instance i (the official runs: V = Ny + 1 = 5), normalized (the official encoder ends with an
L2 normalization; ``normalize=True`` does it here), d(a, b) = ‖a − b‖²::

    attraction, per query view x and instance i, over the other views y ≠ x:
        A^x_i  = Σ_{y≠x} π⁺_{iy} · α·d(z^x_i, z^y_i),     π⁺_{i·} = softmax_y(τ⁺·d(z^x_i, z^y_i))
    repulsion, per view pair x < y and instance i, over the other instances j ≠ i:
        R^{xy}_i = Σ_{j≠i} π⁻_{ij} · (−β·d(z^x_i, z^y_j)),  π⁻_{i·} = softmax_j(−τ⁻·d(z^x_i, z^y_j))
    ℓ_i = mean_x A^x_i + mean_{x<y} R^{xy}_i,      L = mean_i ℓ_i   (``our_loss1 + our_loss2``)

Farther positives and closer negatives weigh more.  **The weights are not
detached** (the code's are not): gradients flow through π⁺ and π⁻.
``choice`` as the code: ``"without_w1"`` / ``"without_w2"`` / ``"none"``
replace π⁺ / π⁻ / both by uniform weights (plain means; the same as τ⁺ = 0 /
τ⁻ = 0).  ``with_debiased=True`` (with π⁻ in use) replaces R^{xy}_i by
(−τ_plus·d(z^x_i, z^y_i) + R^{xy}_i)/(1 − τ_plus), as the code does (the
positive distance there carries no β).  ``reduction="none"`` gives ℓ (N,).

Code and paper.  The code is followed.  It writes π⁺ as softmax(cost·τ⁺/α)
and π⁻ as softmax(cost·τ⁻/β), which is the formula above for α, β ≠ 0 (and
NaN for α = 0 or β = 0); here the weights do not depend on α, β.  The code
returns the repulsion weights of the last view pair too; not here.  The
commented-out RBF cost of the code is not provided.

Fused composition (kernel backends).  The attraction is O(N·V²·D) in
PyTorch.  The repulsion needs, per row, an expectation under the row's own
softmax: with a = z^x_i, b = z^y_j unit vectors, d = 2 − 2·a·b, so
π⁻_{i·} = softmax_j(2τ⁻·a·b) and R^{xy}_i = −β·(2 − 2·E_{π⁻_i}[a·b]): the
``sim_expect`` primitive (row mean of q·kᵀ under softmax(scale·q·kᵀ), scale =
2τ⁻, candidate j = i excluded), one call per view pair, no N×N buffer.
Without normalization d = ‖a‖² − 2·(a·b − ‖b‖²/2), and the call runs on [a, 1]
and [b, −‖b‖²/2].  ``sim_expect`` has Triton and C++ CPU kernels, no CUDA
kernels: the ``"cuda"`` backend raises for this loss, and ``"auto"`` takes
Triton on CUDA tensors.

Under ``process_group`` the views are all-gathered: each rank's rows are its
instances, the repulsion's candidates j the global batch.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .. import _checks, backends
from .._checks import as_scalar
from ..distributed import GlobalBatch
from ..primitives.sim_expect import sim_expect
from ._common import kernel_operands, unit

Tensor = torch.Tensor
CHOICES = ("full", "without_w1", "without_w2", "none")


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).sum(-1)


def _attraction(U: Tensor, alpha: float, tau_pos: Tensor, uniform: bool) -> Tensor:
    """mean_x A^x_i (N,) on this rank's views U (V, n, D)."""
    V = U.shape[0]
    out = []
    for x in range(V):
        d = torch.stack([_sqdist(U[x], U[y]) for y in range(V) if y != x], 1)  # (n, V−1)
        w = torch.full_like(d, 1.0 / (V - 1)) if uniform else torch.softmax(tau_pos * d, 1)
        out.append((w * (alpha * d)).sum(1))
    return torch.stack(out).mean(0)


def _repulsion_dense(a: Tensor, Bg: Tensor, self_idx: Tensor, beta: float, tau_neg: Tensor, uniform: bool) -> Tensor:
    """R_i (n,) for rows a (n, D) against the global rows Bg (N, D), j ≠ self_idx[i]; stores n × N."""
    d = torch.cdist(a, Bg, compute_mode="donot_use_mm_for_euclid_dist").pow(2)  # explicit differences
    allowed = self_idx[:, None] != torch.arange(Bg.shape[0], device=a.device)[None, :]
    logits = torch.zeros_like(d) if uniform else -tau_neg * d
    w = torch.softmax(logits.masked_fill(~allowed, float("-inf")), 1)
    return (w * torch.where(allowed, -beta * d, 0)).sum(1)


def _repulsion_fused(a: Tensor, Bg: Tensor, self_idx: Tensor, beta: float, tau_neg: Tensor, uniform: bool,
                     normalize: bool, dtype: torch.dtype, backend: str) -> Tensor:
    """R_i (n,) through ``sim_expect``: −β·E_{π⁻_i}[d], never an n × N buffer."""
    scale = torch.zeros_like(tau_neg) if uniform else 2 * tau_neg
    ak, ar = kernel_operands(a, dtype)
    bk, br = kernel_operands(Bg, dtype)
    if normalize:  # unit vectors: d = 2 − 2·a·b
        _, mean = sim_expect(ak, bk, scale, exclude=self_idx, backend=backend)
        return -beta * (2 - 2 * mean)
    # d = ‖a‖² − 2·(a·b − ‖b‖²/2): one extra column on each side
    qa = torch.cat([ak, ak.new_ones(ak.shape[0], 1)], 1)
    kb = torch.cat([bk, (-(br * br).sum(-1) / 2).to(dtype)[:, None]], 1)
    _, mean = sim_expect(qa, kb, scale, exclude=self_idx, backend=backend)
    return -beta * ((ar * ar).sum(-1) - 2 * mean)


def _cacr(views: Tensor, alpha, beta, tau_pos, tau_neg, choice, with_debiased, tau_plus, normalize, reduction,
          backend, process_group) -> Tensor:
    V, n, D = views.shape
    gb = GlobalBatch(n, process_group, views.device)
    U = unit(views, normalize)
    Ug = gb.gather(U, dim=1)  # (V, N, D)
    self_idx = gb.offset + torch.arange(n, device=U.device)
    uniform_pos = choice in ("none", "without_w1")
    uniform_neg = choice in ("none", "without_w2")
    values = _attraction(U, alpha, tau_pos, uniform_pos)
    reps = []
    for x in range(V):
        for y in range(x + 1, V):
            if backend == "reference":
                r = _repulsion_dense(U[x], Ug[y], self_idx, beta, tau_neg, uniform_neg)
            else:
                r = _repulsion_fused(U[x], Ug[y], self_idx, beta, tau_neg, uniform_neg, normalize, views.dtype,
                                     backend)
            if with_debiased and not uniform_neg:
                r = (-tau_plus * _sqdist(U[x], U[y]) + r) / (1 - tau_plus)
            reps.append(r)
    values = values + torch.stack(reps).mean(0)
    return gb.reduce(values, reduction)


def cacr_reference(views: Tensor, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, choice="full",
                   with_debiased=False, tau_plus=0.1, normalize=True, reduction="mean", process_group=None) -> Tensor:
    """Exact dense CACR on view-major ``views`` (V, n, D); stores n × N per view pair."""
    t_pos = as_scalar("tau_pos", tau_pos, views)
    t_neg = as_scalar("tau_neg", tau_neg, views)
    return _cacr(views, alpha, beta, t_pos, t_neg, choice, with_debiased, tau_plus, normalize, reduction,
                 "reference", process_group)


def _finite(name, v, *, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)):
        raise ValueError(f"{name} must be a finite float, got {v!r}")
    if lo is not None and not float(v) >= lo:
        raise ValueError(f"{name} must be >= {lo}, got {v!r}")
    if hi is not None and not float(v) < hi:
        raise ValueError(f"{name} must be < {hi}, got {v!r}")
    return float(v)


def _temperature(name, v, like):
    t = as_scalar(name, v, like)
    if not torch.compiler.is_compiling() and not float(t.detach()) >= 0:
        raise ValueError(f"{name} must be >= 0, got {float(t.detach())}")
    return t


def cacr_loss(features, *, alpha=1.0, beta=1.0, tau_pos=1.0, tau_neg=1.0, choice="full", with_debiased=False,
              tau_plus=0.1, normalize=True, reduction="mean", backend="auto", process_group=None) -> Tensor:
    r"""CACR: contrastive attraction (softmax-weighted positives) + contrastive repulsion (softmax-weighted negatives).

    Args:
        features: (N, V, D), or a sequence of V (N, D) tensors (the code's ``latent_codes_list``), V >= 2
            views (the official runs: 5).
        alpha, beta: cost multipliers of the attraction / repulsion (floats).
        tau_pos, tau_neg: τ⁺, τ⁻ >= 0 of the weights softmax(τ⁺·d) over positives and softmax(−τ⁻·d) over
            negatives (float or 0-dim tensor, receiving its gradient).
        choice: ``"full"``, ``"without_w1"``, ``"without_w2"`` or ``"none"`` (uniform weights where dropped).
        with_debiased, tau_plus: the code's debiased repulsion, τ_plus in [0, 1).
        normalize: L2-normalize the features first (the official encoder does).
        reduction: ``"mean"`` (the official value), ``"sum"`` or ``"none"`` ((N,) per instance).

    Defaults are the official scripts' (α = β = τ⁺ = τ⁻ = 1, choice "full", τ_plus 0.1).
    Returns fp32 (float64 for float64 inputs).  Maths in the module docstring.
    """
    views = _checks.check_views("features", features, min_views=2)
    V, N, D = views.shape
    _checks.check_reduction(reduction)
    _checks.check_choice("choice", choice, CHOICES)
    alpha = _finite("alpha", alpha)
    beta = _finite("beta", beta)
    if not isinstance(with_debiased, bool):
        raise ValueError(f"with_debiased must be a bool, got {with_debiased!r}")
    tau_plus = _finite("tau_plus", tau_plus, lo=0.0, hi=1.0)
    t_pos = _temperature("tau_pos", tau_pos, views)
    t_neg = _temperature("tau_neg", tau_neg, views)
    gN = GlobalBatch(N, process_group, views.device).total if process_group is not None else N
    if gN < 2:
        raise ValueError(f"cacr_loss needs at least 2 instances (the repulsion's negatives are the other "
                         f"instances), got features of {V} views of shape ({N}, {D})")
    name = backends.resolve(backend, op="cacr_loss", tensors=[views])
    return _cacr(views, alpha, beta, t_pos, t_neg, choice, with_debiased, tau_plus, normalize, reduction, name,
                 process_group)
