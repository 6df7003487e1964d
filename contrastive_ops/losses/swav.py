r"""Sinkhorn-Knopp codes and the SwAV swapped-prediction loss.

``sinkhorn_knopp`` is the primitive ``"sinkhorn"``
(``contrastive_ops.primitives.sinkhorn``: the maths of SwAV's
``distributed_sinkhorn`` in the log domain, the dense reference, the loop
over a backend's fused steps) behind the public argument checks.

SwAV loss
---------
For each a in ``crops_for_assign``: q_a = codes(scores[a].detach()) and ::

    L_a  = Σ_{v≠a} mean_b[−Σ_k q_a[b,k]·log_softmax(scores[v]/τ)[b,k]] / (n_crops − 1)
    loss = mean_a L_a

The fused composition sums the targets per predicting crop (Σ_{a≠v} q_a) and
runs the primitive ``"swav_ce"`` once per crop: Σ_b [T_b·LSE_k(x_bk/τ) −
Σ_k t_bk·x_bk/τ] with T_b = Σ_k t_bk, one pass per row in each direction and no
log-softmax buffer (``contrastive_ops.primitives.swav_ce``).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import List, Sequence

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import as_scalar, check_features, check_same_device_dtype, shape_str
from .._numerics import acc_dtype
from ..distributed import GlobalBatch
from ..primitives.sinkhorn import sinkhorn, sinkhorn_reference
from ..primitives.swav_ce import swav_ce
from ._common import inv_temperature

Tensor = torch.Tensor


# --------------------------------------------------------------------------- checks


def _check_epsilon(epsilon) -> float:
    if isinstance(epsilon, Tensor):
        if epsilon.numel() != 1:
            raise ValueError(f"epsilon must be a float or a 0-dim tensor, got shape {shape_str(epsilon)}")
        epsilon = float(epsilon.detach().reshape(()).item())
    if isinstance(epsilon, bool) or not isinstance(epsilon, Real):
        raise ValueError(f"epsilon must be a float, got {type(epsilon).__name__}")
    eps = float(epsilon)
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"epsilon must be a finite float > 0, got {eps}")
    return eps


def _check_iterations(iterations) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, Integral):
        raise ValueError(f"iterations must be an int >= 0, got {iterations!r} ({type(iterations).__name__})")
    if iterations < 0:
        raise ValueError(f"iterations must be an int >= 0, got {iterations}")
    return int(iterations)


def _check_scores(scores) -> None:
    check_features("scores", scores, (2,))
    if scores.shape[1] == 0:
        raise ValueError(f"scores must have at least one prototype (K >= 1), got shape {shape_str(scores)}")


def _check_crops(scores) -> List[Tensor]:
    if isinstance(scores, Tensor):
        if scores.dim() != 3:
            raise ValueError(
                "scores must be a sequence of n_crops tensors (B, K) or one tensor (n_crops, B, K), "
                f"got a tensor of shape {shape_str(scores)}"
            )
        crops = list(scores.unbind(0))
    elif isinstance(scores, (list, tuple)):
        crops = list(scores)
    else:
        raise ValueError(f"scores must be a sequence of tensors (B, K), got {type(scores).__name__}")
    if len(crops) < 2:
        raise ValueError(f"scores must hold at least 2 crops, got {len(crops)}")
    for i, c in enumerate(crops):
        check_features(f"scores[{i}]", c, (2,))
    shapes = [tuple(c.shape) for c in crops]
    for i, c in enumerate(crops[1:], 1):
        if c.shape != crops[0].shape:
            raise ValueError(
                f"every crop in scores must have the same shape (B, K), got scores[0] {shapes[0]} "
                f"and scores[{i}] {shapes[i]} (all: {shapes})"
            )
    check_same_device_dtype([(f"scores[{i}]", c) for i, c in enumerate(crops)])
    return crops


def _check_crops_for_assign(crops_for_assign, n_crops: int) -> tuple:
    if isinstance(crops_for_assign, Integral) and not isinstance(crops_for_assign, bool):
        crops_for_assign = (crops_for_assign,)
    try:
        items = tuple(crops_for_assign)
    except TypeError:
        raise ValueError(f"crops_for_assign must be a sequence of ints, got {crops_for_assign!r}") from None
    if not items:
        raise ValueError("crops_for_assign must name at least one crop, got an empty sequence")
    for a in items:
        if isinstance(a, bool) or not isinstance(a, Integral):
            raise ValueError(f"crops_for_assign must hold ints, got {items!r}")
        if not 0 <= a < n_crops:
            raise ValueError(f"crops_for_assign {items!r} is out of range for {n_crops} crops (0..{n_crops - 1})")
    if len(set(items)) != len(items):
        raise ValueError(f"crops_for_assign must not repeat a crop, got {items!r}")
    return tuple(int(a) for a in items)


# --------------------------------------------------------------------------- reference


def _share_of_global_mean(crop: Tensor, process_group) -> float:
    """Factor turning a mean over this rank's B rows into this rank's share of the mean over the global batch.

    1 without a process group or with equal local batches; with uneven ones
    the mean over ranks of the losses is then the global mean.
    """
    gb = GlobalBatch(crop.shape[0], process_group, crop.device)
    return gb.world_size * gb.n / gb.total


def swav_loss_reference(crops: Sequence[Tensor], temperature, crops_for_assign, epsilon, iterations,
                        process_group=None) -> Tensor:
    """The swapped-prediction loss as SwAV's training loop writes it (dense, plain PyTorch)."""
    dt = acc_dtype(crops[0].dtype)
    tau = as_scalar("temperature", temperature, crops[0], positive=True)
    n = len(crops)
    loss = torch.zeros((), dtype=dt, device=crops[0].device)
    for a in crops_for_assign:
        q = sinkhorn_reference(crops[a].detach(), epsilon, iterations, process_group).to(dt)
        subloss = torch.zeros((), dtype=dt, device=crops[0].device)
        for v in range(n):
            if v == a:
                continue
            x = crops[v].to(dt) / tau
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (n - 1)
    return loss / len(crops_for_assign) * _share_of_global_mean(crops[0], process_group)


# --------------------------------------------------------------------------- released code (peer)


@torch.no_grad()
def swav_released_sinkhorn(out: Tensor, epsilon: float, iterations: int) -> Tensor:
    """facebookresearch/swav ``distributed_sinkhorn`` at world size 1, transcribed (plain exp).

    Computes in the dtype of ``out`` (tests pass float64, benchmarks fp32) and
    overflows where SwAV's code does (S/ε > 88 in fp32).  Kept as a peer for
    tests and a baseline for benchmarks; ``sinkhorn_reference`` is the
    log-domain reference.
    """
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1]
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def swav_released_loss(crops: Sequence[Tensor], temperature: float, crops_for_assign, epsilon: float,
                       iterations: int) -> Tensor:
    """SwAV's training-loop loss, transcribed: codes from ``swav_released_sinkhorn``, one crop pair at a time.

    Computes in the dtype of ``crops``.  A peer for tests and a baseline for
    benchmarks, like ``swav_released_sinkhorn``.
    """
    n = len(crops)
    loss = 0
    for a in crops_for_assign:
        q = swav_released_sinkhorn(crops[a].detach(), epsilon, iterations)
        subloss = 0
        for v in range(n):
            if v != a:
                x = crops[v] / temperature
                subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
        loss = loss + subloss / (n - 1)
    return loss / len(crops_for_assign)


# --------------------------------------------------------------------------- public functions


def sinkhorn_knopp(scores, epsilon=0.05, iterations=3, *, process_group=None, backend="auto") -> Tensor:
    """SwAV's Sinkhorn-Knopp codes of ``scores`` (B, K) = z·Cᵀ, as (B, K) fp32 with rows summing to 1.

    No gradient flows through the codes.  Exact and finite for any finite
    input (log-domain scalings; see the module docstring).  Under
    ``process_group`` each rank passes its local rows; the total and the
    prototype sums are combined across ranks, the sample sums stay local (as
    in SwAV), and each rank gets the codes of its own rows.
    """
    _check_scores(scores)
    eps = _check_epsilon(epsilon)
    iters = _check_iterations(iterations)
    name = backends.resolve(backend, op="sinkhorn_knopp", tensors=[scores])
    return sinkhorn(scores, eps, iters, backend=name, process_group=process_group)


def swav_loss(scores, temperature=0.1, *, crops_for_assign=(0, 1), epsilon=0.05, iterations=3,
              process_group=None, backend="auto") -> Tensor:
    """SwAV swapped-prediction loss over ``scores``: a sequence of n_crops tensors (B, K) (same B, K).

    Codes come from the crops in ``crops_for_assign`` (detached); every other
    crop predicts them with ``log_softmax(scores[v]/τ)``.  Returns a 0-dim
    tensor in fp32 (float64 for float64 scores); gradients reach every crop
    and a tensor ``temperature`` that requires grad.
    """
    crops = _check_crops(scores)
    assign = _check_crops_for_assign(crops_for_assign, len(crops))
    eps = _check_epsilon(epsilon)
    iters = _check_iterations(iterations)
    as_scalar("temperature", temperature, crops[0], positive=True)
    name = backends.resolve(backend, op="swav_loss", tensors=crops)
    if name == "reference":
        return swav_loss_reference(crops, temperature, assign, eps, iters, process_group)
    dt = acc_dtype(crops[0].dtype)
    q = {a: sinkhorn(crops[a], eps, iters, backend=name, process_group=process_group) for a in assign}
    inv_tau = inv_temperature(temperature, crops[0])
    # Σ_a Σ_{v≠a} CE(scores[v], q_a) = Σ_v CE(scores[v], Σ_{a≠v} q_a): one pass per crop; the crops
    # outside crops_for_assign share one target, summed once.
    loss = torch.zeros((), dtype=dt, device=crops[0].device)
    target_of = {}
    for v, crop in enumerate(crops):
        others = tuple(a for a in assign if a != v)
        if not others:
            continue
        if others not in target_of:
            target = q[others[0]].to(dt)
            for a in others[1:]:
                target = target + q[a]
            target_of[others] = target
        loss = loss + swav_ce(crop, target_of[others], inv_tau, backend=name) / crop.shape[0]
    return loss / ((len(crops) - 1) * len(assign)) * _share_of_global_mean(crops[0], process_group)
