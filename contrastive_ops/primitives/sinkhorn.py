r"""Primitive ``"sinkhorn"``: SwAV's Sinkhorn-Knopp codes, in the log domain.

Contract (facebookresearch/swav ``distributed_sinkhorn``)
---------------------------------------------------------
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
the total) is combined across ranks; the sample step stays local.  No
gradient flows through the codes: there is no backward.

A kernel backend implements it as the object ``PRIMITIVES["sinkhorn"]`` with::

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

Kernels: ``csrc/cpu/sinkhorn.cpp``, ``csrc/cuda/sinkhorn.cu``,
``backends/_triton/sinkhorn.py``.

This module holds, in order: the dense reference (``sinkhorn_reference``),
the loop over a backend's fused steps (``sinkhorn_steps``; no autograd
Function, the codes carry no gradient) and the entry the losses call
(``sinkhorn``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .. import backends
from .._numerics import acc_dtype
from ..distributed import all_reduce_lse, global_rows

Tensor = torch.Tensor


@torch.no_grad()
def sinkhorn_reference(scores: Tensor, epsilon: float, iterations: int, process_group=None) -> Tensor:
    """SwAV's ``distributed_sinkhorn`` step by step, on log Q instead of Q (dense, plain PyTorch).

    Computes in fp32 (float64 for float64 scores); returns (B, K) fp32.
    """
    dt = acc_dtype(scores.dtype)
    logq = scores.detach().to(dt).T / epsilon                          # log Q, Q = exp(S/ε)ᵀ   (K, B)
    n_proto = logq.shape[0]
    n_rows = global_rows(logq.shape[1], process_group, logq.device)
    log_k, log_b = math.log(n_proto), math.log(n_rows)
    total = all_reduce_lse(torch.logsumexp(logq.reshape(-1), 0), process_group)
    logq = logq - total                                                 # Q /= ΣQ
    for _ in range(iterations):
        rows = all_reduce_lse(torch.logsumexp(logq, 1, keepdim=True), process_group)
        logq = logq - rows - log_k                                      # Q /= Q.sum(1); Q /= K
        logq = logq - torch.logsumexp(logq, 0, keepdim=True) - log_b   # Q /= Q.sum(0); Q /= B
    return torch.exp(logq + log_b).T.to(torch.float32).contiguous()    # (B·Q)ᵀ


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
        per_proto = all_reduce_lse(col_lse(scores, epsilon, None), process_group)   # LSE_b S/ε, global b
        n_rows = global_rows(scores.shape[0], process_group, scores.device)
        v = (math.log(n_rows) - torch.logsumexp(per_proto, 0)).expand(n_proto).contiguous()
        return codes(scores, epsilon, v, False)
    v = None
    for _ in range(iterations):
        v = -all_reduce_lse(col_lse(scores, epsilon, v), process_group)
    return codes(scores, epsilon, v, True)


def sinkhorn(scores: Tensor, epsilon: float, iterations: int, *, backend: str, process_group=None) -> Tensor:
    """The codes of the contract, (B, K) fp32, no gradient; ``backend`` is a concrete backend name.

    ``"reference"`` runs the dense version; a kernel backend runs its fused
    ``forward`` in one process, and its ``col_lse`` / ``codes`` steps with the
    ranks combined in between under ``process_group``.
    """
    if backend == "reference":
        return sinkhorn_reference(scores, epsilon, iterations, process_group)
    prim = backends.primitive(backend, "sinkhorn")
    scores = scores.detach().contiguous()
    with torch.no_grad():
        if process_group is None:
            return prim.forward(scores, epsilon, iterations)
        return sinkhorn_steps(prim.col_lse, prim.codes, scores, epsilon, iterations, process_group)
