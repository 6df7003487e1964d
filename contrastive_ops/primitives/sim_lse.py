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
    not S[i, j] > row_max[i]              (default: no threshold; +inf keeps every pair)

``row_max`` (B,) fp32 (float64 for float64 inputs) is a per-row threshold in
the logit domain, a constant of the maths (it gets no gradient): candidates
whose logit exceeds it are left out (a false-negative filter; see
``losses/info_nce.py``).  Backends compare the S value their kernel
exponentiates, in forward and backward alike, so the backward drops exactly
the pairs the forward dropped; a pair within rounding of the threshold is
decided on the kernel's rounding of S (fp16/bf16 products, fp32 as ``tf32x3``
in the Triton GPU kernels), which callers must treat as a tie.  A NaN S is
never dropped (the test is ``not S > row_max``).

The core returns, in fp32 (float64 for float64 inputs)::

    row_lse[i] = LSE_{j allowed for i} S[i, j]        (B,)   -inf if none allowed
    col_lse[j] = LSE_{i : j allowed for i} S[i, j]    (M,)   only if want_col

Backward, with upstream gradients g_row (B,), g_col (M,)::

    P_row[i,j] = exp(S[i,j] - row_lse[i]),   P_col[i,j] = exp(S[i,j] - col_lse[j])
    dS[i,j]    = g_row[i]·P_row[i,j] + g_col[j]·P_col[i,j]      (allowed pairs, else 0)
    dQ = scale · dS K,   dK = scale · dSᵀ Q,   dscale = Σ_ij dS[i,j]·S[i,j] / scale

(rows with ``row_lse = -inf`` and columns with ``col_lse = -inf`` contribute
nothing).

Per-row and per-column bias terms (``sim_lse(..., row_bias=r, col_bias=c)``)::

    S[i, j] = scale · Q_i·K_j + r_i + c_j

e.g. a Gaussian kernel e^{−‖x−y‖²/2τ} = e^{x·y/τ} · e^{−‖x‖²/2τ} · e^{−‖y‖²/2τ}.
Every backend runs them without a kernel of its own: the entry appends one
column to each operand, [Q, 1] and [K, c/scale], so that scale·[Q,1]·[K,c/scale]ᵀ
= scale·Q·Kᵀ + c (gradients of c, hence of what c is made of, flow through
autograd into the extra column); ``r`` is added to ``row_lse`` outside the
kernel, or, when column LSEs are asked for, enters the same way ([Q, r/scale],
[K, 1]).  The reference adds them to its dense S.  ``scale`` must then be > 0.  ``dQ``/``dK`` are scattered back to the rows of ``q``/``k`` named by
the index lists.  Positive logits, label sums and reductions stay in PyTorch on
O((B+M)·D) tensors; only this core touches B×M.

Kernel backends implement the primitive ``"sim_lse"`` as an object with::

    forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None)
        -> (row_lse (B,) fp32, col_lse (M,) fp32 or a 0-element tensor)
    backward(q, k, scale, row_index, col_index, col_start, col_end, exclude,
             row_lse, col_lse, grad_row, grad_col, row_max=None)
        -> (dq like q, dk like k, dscale 0-dim fp32)

(``row_max`` is passed by keyword, and only when a threshold is given, so a
primitive without it fails loudly instead of ignoring one.)

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
    S: Optional[Tensor] = None,
    row_max: Optional[Tensor] = None,
) -> Tensor:
    """Dense (B, M) bool mask of allowed pairs (reference and tests only); with ``row_max`` the
    logits ``S`` are needed too."""
    j = torch.arange(M, device=device)
    allowed = torch.ones(B, M, dtype=torch.bool, device=device)
    if col_start is not None:
        allowed &= j[None, :] >= col_start.to(device).long()[:, None]
    if col_end is not None:
        allowed &= j[None, :] < col_end.to(device).long()[:, None]
    if exclude is not None:
        for e in exclude.to(device).long().unbind(1):
            allowed &= j[None, :] != e[:, None]
    if row_max is not None:
        allowed &= ~(S.detach() > row_max.to(device=device, dtype=S.dtype)[:, None])
    return allowed


def sim_lse_reference(q: Tensor, k: Tensor, scale: Tensor, row_index=None, col_index=None, col_start=None,
                      col_end=None, exclude=None, want_col: bool = False, row_bias: Optional[Tensor] = None,
                      col_bias: Optional[Tensor] = None,
                      row_max: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Dense PyTorch implementation of the core (differentiable by autograd); arguments as ``sim_lse``.

    Materializes B×M: the oracle that kernel tests compare against, and the
    engine behind ``backend="reference"`` compositions in tests.
    """
    dt = acc_dtype(q.dtype)
    Q = q if row_index is None else q[row_index.long()]
    K = k if col_index is None else k[col_index.long()]
    S = (Q.to(dt) @ K.to(dt).T) * scale.to(dt)
    if row_bias is not None:
        S = S + row_bias.to(dt)[:, None]
    if col_bias is not None:
        S = S + col_bias.to(dt)[None, :]
    allowed = allowed_mask(S.shape[0], S.shape[1], col_start, col_end, exclude, S.device, S, row_max)
    row = masked_lse(S, allowed, 1)
    col = masked_lse(S, allowed, 0) if want_col else None
    return row, col


class SimLSEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"sim_lse"`` primitive (contract in the module docstring)."""

    # ``k`` is None when the candidates are the anchors' own matrix (q is k):
    # one autograd input, whose gradient is dq + dk.
    @staticmethod
    def forward(ctx, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, backend,
                row_max=None):
        prim = backends.primitive(backend, "sim_lse")
        kk = q if k is None else k
        kw = {} if row_max is None else {"row_max": row_max}
        row_lse, col_lse = prim.forward(q, kk, scale, row_index, col_index, col_start, col_end, exclude, want_col,
                                        **kw)
        ctx.prim = prim
        ctx.want_col = want_col
        ctx.same = k is None
        ctx.save_for_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                              row_max)
        if not want_col:
            ctx.mark_non_differentiable(col_lse)
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, g_row, g_col):
        q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, row_max = ctx.saved_tensors
        if g_row is None:
            g_row = torch.zeros_like(row_lse)
        if not ctx.want_col or g_col is None:
            g_col = torch.zeros_like(col_lse)
        dq, dk, dscale = ctx.prim.backward(
            q, q if ctx.same else k, scale, row_index, col_index, col_start, col_end, exclude,
            row_lse, col_lse, g_row.contiguous(), g_col.contiguous(),
            **({} if row_max is None else {"row_max": row_max}),
        )
        if ctx.same:
            dq, dk = dq + dk, None
        if not ctx.needs_input_grad[0]:
            dq = None
        if not ctx.needs_input_grad[1]:
            dk = None
        if not ctx.needs_input_grad[2]:
            dscale = None
        return dq, dk, dscale, None, None, None, None, None, None, None, None


class DenseSimLSE:
    """The ``"sim_lse"`` primitive interface computed densely (``backend="reference"`` in a ring, and the tests'
    stand-in for a kernel).  As the kernels do, the backward takes the LSEs it is given (in a ring: the merged
    LSEs of every hop, not this block's own) and returns full gradients of ``q`` and ``k`` (summed over repeated
    indices) even when they are one tensor."""

    def forward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
        with torch.no_grad():
            row, col = sim_lse_reference(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col,
                                         row_max=row_max)
        return row, (col if want_col else row.new_empty(0))

    def backward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col, row_max=None):
        dt = acc_dtype(q.dtype)
        Q = (q if row_index is None else q[row_index.long()]).to(dt)
        K = (k if col_index is None else k[col_index.long()]).to(dt)
        G = Q @ K.T
        S = G * scale.to(dt)
        ok = allowed_mask(S.shape[0], S.shape[1], col_start, col_end, exclude, S.device, S, row_max)
        zero = torch.zeros((), dtype=dt, device=S.device)
        dS = torch.where(ok & torch.isfinite(row_lse)[:, None], grad_row[:, None] * torch.exp(S - row_lse[:, None]),
                         zero)
        if col_lse.numel():
            dS = dS + torch.where(ok & torch.isfinite(col_lse)[None, :],
                                  grad_col[None, :] * torch.exp(S - col_lse[None, :]), zero)
        dQ, dK = (dS @ K) * scale.to(dt), (dS.T @ Q) * scale.to(dt)
        dq = dQ if row_index is None else torch.zeros(q.shape, dtype=dt, device=q.device).index_add_(
            0, row_index.long(), dQ)
        dk = dK if col_index is None else torch.zeros(k.shape, dtype=dt, device=k.device).index_add_(
            0, col_index.long(), dK)
        return dq.to(q.dtype), dk.to(k.dtype), (dS * G).sum()


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
    row_bias: Optional[Tensor] = None,
    col_bias: Optional[Tensor] = None,
    row_max: Optional[Tensor] = None,
    backend: str,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Row (and column) log-sum-exp of ``scale · q[row_index] · k[col_index]ᵀ (+ row_bias_i + col_bias_j)``
    over allowed pairs.

    ``backend`` is a concrete backend name.  ``"reference"`` runs the dense
    PyTorch version (same maths, stores B×M); kernel backends never store B×M.
    ``row_bias`` (B,) / ``col_bias`` (M,): bias terms per anchor / candidate (after the index lists),
    differentiable; with either, ``scale`` must be > 0 on kernel backends (module docstring).
    Returns ``(row_lse, col_lse)`` with ``col_lse`` None unless ``want_col``.
    ``row_max`` (B,): the per-row logit threshold of the module docstring (detached here).

    ``k`` may be a ``distributed.RingCandidates`` handle (``GlobalBatch.candidates``
    with ``exchange="ring"``): the candidates are then every rank's block,
    visited around the ring (``primitives.ring``), the masks are in global
    candidate positions, and ``col_lse`` covers this rank's block against
    every rank's anchors.
    """
    device = q.device
    scale = scale.to(device=device, dtype=acc_dtype(q.dtype))
    if row_max is not None:
        B = q.shape[0] if row_index is None else row_index.shape[0]
        if tuple(row_max.shape) != (B,):
            raise ValueError(f"row_max must have shape ({B},) (one per anchor), got {tuple(row_max.shape)}")
        row_max = row_max.detach().to(device=device, dtype=acc_dtype(q.dtype)).contiguous()
    biased = row_bias is not None or col_bias is not None
    if biased and row_max is not None:
        raise ValueError("sim_lse: row_max and bias terms together are not supported (got both)")
    if biased and backend != "reference":
        return _biased(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_bias,
                       col_bias, backend)
    args = (
        _as_index(row_index, device),
        _as_index(col_index, device),
        _as_index(col_start, device),
        _as_index(col_end, device),
        None if exclude is None else _as_index(exclude.reshape(exclude.shape[0], -1), device),
    )
    if biased:  # the reference
        return sim_lse_reference(q, k, scale, *args, want_col=want_col, row_bias=row_bias, col_bias=col_bias)
    if isinstance(k, RingCandidates):
        from .ring import ring_sim_lse

        return ring_sim_lse(q, k, scale, row_index=row_index, col_index=col_index, col_start=col_start,
                            col_end=col_end,
                            exclude=None if exclude is None else exclude.reshape(exclude.shape[0], -1).long(),
                            want_col=want_col, prim=primitive_object(backend), row_max=row_max)
    if backend == "reference":
        return sim_lse_reference(q, k, scale, *args, want_col=want_col, row_max=row_max)
    qc = q.contiguous()
    kc = None if k is q else k.contiguous()
    row, col = SimLSEFunction.apply(qc, kc, scale.reshape(()), *args, want_col, backend, row_max)
    return row, (col if want_col else None)


def _biased(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_bias, col_bias,
            backend):
    """``sim_lse`` with bias terms on a kernel backend: one extra column per bias in each operand."""
    dt = acc_dtype(q.dtype)
    scale = torch.as_tensor(scale, device=q.device).to(dt).reshape(())
    Q = q if row_index is None else q[row_index.long()]
    K = k if col_index is None else k[col_index.long()]
    B, M = Q.shape[0], K.shape[0]
    for name, t, n in (("row_bias", row_bias, B), ("col_bias", col_bias, M)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"sim_lse: {name} must have shape ({n},), got {tuple(t.shape)}")
    qa, ka = [Q], [K]
    if col_bias is not None:
        qa.append(Q.new_ones(B, 1))
        ka.append((col_bias.to(dt) / scale).to(K.dtype)[:, None])
    inside_row = row_bias is not None and want_col
    if inside_row:
        qa.append((row_bias.to(dt) / scale).to(Q.dtype)[:, None])
        ka.append(K.new_ones(M, 1))
    row, col = sim_lse(torch.cat(qa, 1), torch.cat(ka, 1), scale, col_start=col_start, col_end=col_end,
                       exclude=exclude, want_col=want_col, backend=backend)
    if row_bias is not None and not inside_row:
        row = row + row_bias.to(row.dtype)
    return row, col
