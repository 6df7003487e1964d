r"""Sinkhorn-Knopp codes and the SwAV swapped-prediction loss.

Maths (facebookresearch/swav ``distributed_sinkhorn``)
------------------------------------------------------
``scores`` S (B, K) = z·Cᵀ, ε = ``epsilon``, T = ``iterations``::

    Q = exp(S/ε)ᵀ                       (K, B)
    Q /= ΣQ                             total          (all-reduced)
    repeat T:
        Q /= Q.sum(1); Q /= K           rows = prototypes (all-reduced)
        Q /= Q.sum(0); Q /= B           columns = samples (local only)
    return (B·Q)ᵀ                       (B, K) fp32, no gradient

exp(S/ε) overflows fp32 once S/ε > 88 and a max shift alone underflows, so
everything is kept in the log domain.  Every step multiplies Q by a
per-prototype or a per-sample factor, hence after any number of steps
``log Q[k,b] = S[b,k]/ε + u[b] + v[k]`` with log-scalings u (B,), v (K,).  The
constants (ΣQ, K, B) only shift u or v by a constant that the next step
removes, so for T ≥ 1 (u₀ = 0)::

    v_t[k] = −LSE_b(S[b,k]/ε + u_{t−1}[b])            prototype step
    u_t[b] = −LSE_k(S[b,k]/ε + v_t[k])                 sample step
    codes[b,k] = exp(S[b,k]/ε + v_T[k] + u_T[b]) = softmax_k(S[b,:]/ε + v_T)[k]

and for T = 0, codes = B·exp(S/ε − LSE_{b,k}(S/ε)).  Each row of the codes sums
to 1.  Every exponent is ≤ 0 after its LSE, so nothing overflows, and no
per-sample shift is ever applied before the prototype sums (that would change
the T-step result).  Under ``process_group`` the prototype LSE (and, for T = 0,
the total) is combined across ranks; the sample step stays local.

Kernel backends implement the primitive ``"sinkhorn"`` as an object with::

    forward(scores, epsilon, iterations) -> codes (B, K) fp32
    col_lse(scores, epsilon, v)          -> (K,) fp32:  LSE_b(S[b,k]/ε + u[b]),
                                            u[b] = −LSE_k(S[b,k]/ε + v[k]) (u = 0 if v is None)
    codes(scores, epsilon, v, normalize) -> (B, K) fp32: exp(S/ε + v[k] − (LSE_k(S/ε + v) if normalize))

``col_lse`` fuses one sample step with the next prototype step in one pass
over S; ``forward`` is the loop of ``sinkhorn_steps`` inside the backend.  The
CPU ``forward`` runs the same iteration in scaling form when the scores' range
allows it (E = exp(S/ε − column max) written once, then one multiply-add pass
per iteration; see ``csrc/cpu/sinkhorn.cpp``), the log domain otherwise.
``scores`` may be fp32, fp16 or bf16 (read and upcast to fp32 in the kernel).

SwAV loss
---------
For each a in ``crops_for_assign``: q_a = codes(scores[a].detach()) and ::

    L_a  = Σ_{v≠a} mean_b[−Σ_k q_a[b,k]·log_softmax(scores[v]/τ)[b,k]] / (n_crops − 1)
    loss = mean_a L_a

The fused composition sums the targets per predicting crop (Σ_{a≠v} q_a) and
runs the kernel primitive ``"swav_ce"`` once per crop: Σ_b [T_b·LSE_k(x_bk/τ) −
Σ_k t_bk·x_bk/τ] with T_b = Σ_k t_bk, one pass per row in each direction and no
log-softmax buffer (``csrc/cpu/swav_ce.cpp``, ``csrc/cuda/swav_ce.cu``,
``backends/_triton/swav_ce.py``).
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F

from .. import backends
from .._checks import as_scalar, check_features, check_same_device_dtype, shape_str
from ..core import acc_dtype
from ..distributed import GlobalBatch

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


# --------------------------------------------------------------------------- log-domain all-reduce


def _allreduce_lse(lse: Tensor, group) -> Tensor:
    """Element-wise LSE across the ranks of ``group`` of a local LSE tensor (identity without a group)."""
    if group is None:
        return lse
    import torch.distributed as dist

    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(lse - m)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
    return m + torch.log(s)


def _global_rows(b_local: int, group, device) -> int:
    if group is None:
        return b_local
    import torch.distributed as dist

    n = torch.tensor([b_local], dtype=torch.int64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return int(n.item())


# --------------------------------------------------------------------------- reference


@torch.no_grad()
def sinkhorn_reference(scores: Tensor, epsilon: float, iterations: int, process_group=None) -> Tensor:
    """SwAV's ``distributed_sinkhorn`` step by step, on log Q instead of Q (dense, plain PyTorch).

    Computes in fp32 (float64 for float64 scores); returns (B, K) fp32.
    """
    dt = acc_dtype(scores.dtype)
    logq = scores.detach().to(dt).T / epsilon                          # log Q, Q = exp(S/ε)ᵀ   (K, B)
    n_proto = logq.shape[0]
    n_rows = _global_rows(logq.shape[1], process_group, logq.device)
    log_k, log_b = math.log(n_proto), math.log(n_rows)
    total = _allreduce_lse(torch.logsumexp(logq.reshape(-1), 0), process_group)
    logq = logq - total                                                 # Q /= ΣQ
    for _ in range(iterations):
        rows = _allreduce_lse(torch.logsumexp(logq, 1, keepdim=True), process_group)
        logq = logq - rows - log_k                                      # Q /= Q.sum(1); Q /= K
        logq = logq - torch.logsumexp(logq, 0, keepdim=True) - log_b   # Q /= Q.sum(0); Q /= B
    return torch.exp(logq + log_b).T.to(torch.float32).contiguous()    # (B·Q)ᵀ


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


# --------------------------------------------------------------------------- fused composition


@torch.no_grad()
def sinkhorn_steps(col_lse: Callable, codes: Callable, scores: Tensor, epsilon: float, iterations: int,
                   process_group=None) -> Tensor:
    """The Sinkhorn loop on the scaling form, one fused pass per iteration, ranks combined in between.

    ``col_lse`` / ``codes`` are a kernel primitive's steps (see the module
    docstring).  Only the prototype LSE (K,) and, for ``iterations == 0``,
    the total cross the ranks; the sample step stays local.
    """
    n_proto = scores.shape[1]
    if iterations == 0:
        per_proto = _allreduce_lse(col_lse(scores, epsilon, None), process_group)   # LSE_b S/ε, global b
        n_rows = _global_rows(scores.shape[0], process_group, scores.device)
        v = (math.log(n_rows) - torch.logsumexp(per_proto, 0)).expand(n_proto).contiguous()
        return codes(scores, epsilon, v, False)
    v = None
    for _ in range(iterations):
        v = -_allreduce_lse(col_lse(scores, epsilon, v), process_group)
    return codes(scores, epsilon, v, True)


def _sinkhorn(name: str, scores: Tensor, epsilon: float, iterations: int, process_group) -> Tensor:
    if name == "reference":
        return sinkhorn_reference(scores, epsilon, iterations, process_group)
    prim = backends.primitive(name, "sinkhorn")
    scores = scores.detach().contiguous()
    with torch.no_grad():
        if process_group is None:
            return prim.forward(scores, epsilon, iterations)
        return sinkhorn_steps(prim.col_lse, prim.codes, scores, epsilon, iterations, process_group)


class _SwappedCE(torch.autograd.Function):
    """Autograd wrapper of a backend's ``"swav_ce"`` primitive: Σ_b CE(scale·x_b, t_b) with soft targets."""

    @staticmethod
    def forward(ctx, x, t, scale, backend):
        prim = backends.primitive(backend, "swav_ce")
        loss, lse = prim.forward(x, t, scale)
        ctx.prim = prim
        ctx.save_for_backward(x, t, scale, lse)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, t, scale, lse = ctx.saved_tensors
        dx, dscale = ctx.prim.backward(x, t, scale, lse, grad.reshape(()).to(scale.dtype))
        needs = ctx.needs_input_grad
        return dx if needs[0] else None, None, dscale if needs[2] else None, None


def _swapped_ce(name: str, tau: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """mean_b of the soft-target cross-entropy of crop/τ against t: the backend's fused ``"swav_ce"``
    primitive where it has one (one pass per row and direction, no log-softmax buffer: ``cpu``, ``cuda``
    and ``triton`` do), else ``F.cross_entropy``."""
    if backends.has_primitive(name, "swav_ce"):
        return lambda crop, t: _SwappedCE.apply(crop.contiguous(), t.contiguous(), 1.0 / tau, name) / crop.shape[0]
    return lambda crop, t: F.cross_entropy(crop.to(t.dtype) / tau, t, reduction="mean")


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
    return _sinkhorn(name, scores, eps, iters, process_group)


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
    tau = as_scalar("temperature", temperature, crops[0], positive=True)
    name = backends.resolve(backend, op="swav_loss", tensors=crops)
    if name == "reference":
        return swav_loss_reference(crops, temperature, assign, eps, iters, process_group)
    dt = acc_dtype(crops[0].dtype)
    q = {a: _sinkhorn(name, crops[a], eps, iters, process_group) for a in assign}
    ce = _swapped_ce(name, tau)
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
        loss = loss + ce(crop, target_of[others])
    return loss / ((len(crops) - 1) * len(assign)) * _share_of_global_mean(crops[0], process_group)
