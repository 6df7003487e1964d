r"""Primitive ``"sim_lse"``: the tiled similarity-LSE core that most fused losses are built on.

Maths
-----
Anchors are rows of ``q`` (optionally a subset, ``row_index``), candidates rows
of ``k`` (optionally a subset, ``col_index``)::

    Q = q[row_index]            (B, D)        K = k[col_index]      (M, D)
    S = scale · Q Kᵀ            (B, M)        never stored by a kernel backend

Candidate ``j`` is *allowed* for anchor ``i`` when::

    col_start[i] <= j < col_end[i]       (default: all of 0..M-1)
    j not in exclude[i, :]                (entries < 0 exclude nothing)

The core returns, in fp32 (float64 for float64 inputs)::

    row_lse[i] = LSE_{j allowed for i} S[i, j]        (B,)   -inf if none allowed
    col_lse[j] = LSE_{i : j allowed for i} S[i, j]    (M,)   only if want_col

Backward, with upstream gradients g_row (B,), g_col (M,)::

    P_row[i,j] = exp(S[i,j] - row_lse[i]),   P_col[i,j] = exp(S[i,j] - col_lse[j])
    dS[i,j]    = g_row[i]·P_row[i,j] + g_col[j]·P_col[i,j]      (allowed pairs, else 0)
    dQ = scale · dS K,   dK = scale · dSᵀ Q,   dscale = Σ_ij dS[i,j]·S[i,j] / scale

(rows with ``row_lse = -inf`` and columns with ``col_lse = -inf`` contribute
nothing).  ``dQ``/``dK`` are scattered back to the rows of ``q``/``k`` named by
the index lists.  Positive logits, label sums and reductions stay in PyTorch on
O((B+M)·D) tensors; only this core touches B×M.

Kernel backends implement the primitive ``"sim_lse"`` as an object with::

    forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col)
        -> (row_lse (B,) fp32, col_lse (M,) fp32 or a 0-element tensor)
    backward(q, k, scale, row_index, col_index, col_start, col_end, exclude,
             row_lse, col_lse, grad_row, grad_col)
        -> (dq like q, dk like k, dscale 0-dim fp32)

with ``scale`` a 0-dim fp32 tensor, index tensors int32 and contiguous,
``exclude`` of shape (B, E), E in {1, 2}, and ``grad_col``/``col_lse`` empty
when no column LSE was asked for.  ``q`` and ``k`` may be the same tensor;
when they are one tensor object, ``backward`` may return the whole gradient
of that tensor (dq + dk) in ``dq`` and zeros in ``dk`` (the CPU kernel does,
computing each pair of the symmetric Gram once).

Kernels: ``csrc/cpu/sim_lse.cpp`` (loops in ``csrc/cpu/lse_epilogue.h``),
``csrc/cuda/epilogues.cu`` with ``csrc/tiling.h``, ``backends/_triton``.

This module holds, in order: the dense reference (``sim_lse_reference``),
the autograd Function over ``backends.primitive(backend, "sim_lse")``
(``SimLSEFunction``) and the entry the losses call (``sim_lse``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import backends
from .._numerics import acc_dtype, masked_lse
from ..distributed import RingCandidates

Tensor = torch.Tensor


def allowed_mask(
    B: int,
    M: int,
    col_start: Optional[Tensor],
    col_end: Optional[Tensor],
    exclude: Optional[Tensor],
    device,
) -> Tensor:
    """Dense (B, M) bool mask of allowed pairs (reference and tests only)."""
    j = torch.arange(M, device=device)
    allowed = torch.ones(B, M, dtype=torch.bool, device=device)
    if col_start is not None:
        allowed &= j[None, :] >= col_start.to(device).long()[:, None]
    if col_end is not None:
        allowed &= j[None, :] < col_end.to(device).long()[:, None]
    if exclude is not None:
        for e in exclude.to(device).long().unbind(1):
            allowed &= j[None, :] != e[:, None]
    return allowed


def sim_lse_reference(q: Tensor, k: Tensor, scale: Tensor, row_index=None, col_index=None, col_start=None,
                      col_end=None, exclude=None, want_col: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """Dense PyTorch implementation of the core (differentiable by autograd); arguments as ``sim_lse``.

    Materializes B×M: the oracle that kernel tests compare against, and the
    engine behind ``backend="reference"`` compositions in tests.
    """
    dt = acc_dtype(q.dtype)
    Q = q if row_index is None else q[row_index.long()]
    K = k if col_index is None else k[col_index.long()]
    S = (Q.to(dt) @ K.to(dt).T) * scale.to(dt)
    allowed = allowed_mask(S.shape[0], S.shape[1], col_start, col_end, exclude, S.device)
    row = masked_lse(S, allowed, 1)
    col = masked_lse(S, allowed, 0) if want_col else None
    return row, col


class SimLSEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"sim_lse"`` primitive (contract in the module docstring)."""

    # ``k`` is None when the candidates are the anchors' own matrix (q is k):
    # one autograd input, whose gradient is dq + dk.
    @staticmethod
    def forward(ctx, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, backend):
        prim = backends.primitive(backend, "sim_lse")
        kk = q if k is None else k
        row_lse, col_lse = prim.forward(q, kk, scale, row_index, col_index, col_start, col_end, exclude, want_col)
        ctx.prim = prim
        ctx.want_col = want_col
        ctx.same = k is None
        ctx.save_for_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse)
        if not want_col:
            ctx.mark_non_differentiable(col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse = ctx.saved_tensors
        if g_row is None:
            g_row = torch.zeros_like(row_lse)
        if not ctx.want_col or g_col is None:
            g_col = torch.zeros_like(col_lse)
        dq, dk, dscale = ctx.prim.backward(
            q, q if ctx.same else k, scale, row_index, col_index, col_start, col_end, exclude,
            row_lse, col_lse, g_row.contiguous(), g_col.contiguous(),
        )
        if ctx.same:
            dq, dk = dq + dk, None
        if not ctx.needs_input_grad[0]:
            dq = None
        if not ctx.needs_input_grad[1]:
            dk = None
        if not ctx.needs_input_grad[2]:
            dscale = None
        return dq, dk, dscale, None, None, None, None, None, None, None


class DenseSimLSE:
    """The ``"sim_lse"`` primitive interface computed by the dense reference (``backend="reference"`` in a ring)."""

    def forward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
        with torch.no_grad():
            row, col = sim_lse_reference(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col)
        return row, (col if want_col else row.new_empty(0))

    def backward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col):
        dt = acc_dtype(q.dtype)
        S = (q.to(dt) @ k.to(dt).T) * scale.to(dt)
        ok = allowed_mask(S.shape[0], S.shape[1], col_start, col_end, exclude, S.device)
        dS = torch.zeros_like(S)
        fin_r = torch.isfinite(row_lse)
        dS = dS + torch.where(ok & fin_r[:, None], grad_row[:, None] * torch.exp(S - row_lse[:, None]),
                              torch.zeros_like(S))
        if col_lse.numel():
            fin_c = torch.isfinite(col_lse)
            dS = dS + torch.where(ok & fin_c[None, :], grad_col[None, :] * torch.exp(S - col_lse[None, :]),
                                  torch.zeros_like(S))
        dq = (dS @ k.to(dt)) * scale.to(dt)
        dk = (dS.T @ q.to(dt)) * scale.to(dt)
        dscale = (dS * S).sum() / scale.to(dt)
        return dq.to(q.dtype), dk.to(k.dtype), dscale


_DENSE = DenseSimLSE()


def primitive_object(backend: str):
    """The ``"sim_lse"`` primitive object of ``backend`` (``"reference"``: :class:`DenseSimLSE`)."""
    return _DENSE if backend == "reference" else backends.primitive(backend, "sim_lse")


def _as_index(t: Optional[Tensor], device) -> Optional[Tensor]:
    if t is None:
        return None
    return t.to(device=device, dtype=torch.int32).contiguous()


def sim_lse(
    q: Tensor,
    k: Tensor,
    scale: Tensor,
    *,
    row_index: Optional[Tensor] = None,
    col_index: Optional[Tensor] = None,
    col_start: Optional[Tensor] = None,
    col_end: Optional[Tensor] = None,
    exclude: Optional[Tensor] = None,
    want_col: bool = False,
    backend: str,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) log-sum-exp of ``scale · q[row_index] · k[col_index]ᵀ`` over allowed pairs.

    ``backend`` is a concrete backend name.  ``"reference"`` runs the dense
    PyTorch version (same maths, stores B×M); kernel backends never store B×M.
    Returns ``(row_lse, col_lse)`` with ``col_lse`` None unless ``want_col``.

    ``k`` may be a ``distributed.RingCandidates`` handle (``GlobalBatch.candidates``
    with ``exchange="ring"``): the candidates are then every rank's block,
    visited around the ring (``primitives.ring``), the masks are in global
    candidate positions, and ``col_lse`` covers this rank's block against
    every rank's anchors.
    """
    device = q.device
    if isinstance(k, RingCandidates):
        from .ring import ring_sim_lse

        scale = scale.to(device=device, dtype=acc_dtype(q.dtype))
        return ring_sim_lse(q, k, scale, row_index=row_index, col_index=col_index, col_start=col_start,
                            col_end=col_end,
                            exclude=None if exclude is None else exclude.reshape(exclude.shape[0], -1).long(),
                            want_col=want_col, prim=primitive_object(backend))
    args = (
        _as_index(row_index, device),
        _as_index(col_index, device),
        _as_index(col_start, device),
        _as_index(col_end, device),
        None if exclude is None else _as_index(exclude.reshape(exclude.shape[0], -1), device),
    )
    scale = scale.to(device=device, dtype=acc_dtype(q.dtype))
    if backend == "reference":
        return sim_lse_reference(q, k, scale, *args, want_col=want_col)
    qc = q.contiguous()
    kc = None if k is q else k.contiguous()
    row, col = SimLSEFunction.apply(qc, kc, scale.reshape(()), *args, want_col, backend)
    return row, (col if want_col else None)
