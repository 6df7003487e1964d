r"""Primitive ``"label_lse"``: a row LSE of similarities plus a per-pair label-distance log-weight, never B×M.

Maths
-----
Anchors are the rows of ``q`` (B, D) with labels y (B,) and coefficients c
(B,); candidates the rows of ``k`` (M, D) with labels ŷ (M,)::

    G[i, j]  = q_i·k_j                                   (B, M, unscaled)
    d[i, j]  = c_i·|y_i − ŷ_j|
    φ(d)     = log1p(d)  (kind 0, "L1_inv": w = d + 1)     log1p(d²)  (kind 1, "L2_inv": w = d² + 1)
               −log1p(d) (kind 2, "L1":  w = 1/(d + 1))    −log1p(d²) (kind 3, "L2":  w = 1/(d² + 1))
    allowed  = start_i <= j < end_i,  j != exclude_i  (exclude_i < 0: none),
               and, with ``skip_equal``, ŷ_j != y_i
    lse[i]   = LSE_{j allowed} (scale·G[i, j] + φ(d[i, j]))     (B,)   −inf if nothing is allowed

i.e. log Σ_j w(c_i·|y_i − ŷ_j|)·e^{scale·G_ij}: SupReMix's "distance
magnifying" denominator (``losses/supremix.py``): real pairs with c = 1 and
the anchor excluded; hard negatives with c_i = 1 − λ_i (a mixture's label is
λ_i y_i + (1−λ_i) y_k, so its distance is (1−λ_i)|y_i − y_k|) and equal
labels skipped.  Labels and c are data: they receive no gradient.

Backward, with upstream gradient γ (B,) and P[i, j] = e^{scale·G_ij + φ_ij − lse_i}
on allowed pairs (0 elsewhere, and on rows with nothing allowed)::

    dG = γ_i·scale·P_ij          dq = dG k,   dk = dGᵀ q
    dscale = Σ_i γ_i Σ_j P_ij·G_ij

Only the row statistics (lse and γ) are needed to recompute P tile by tile,
so a kernel needs no B×M buffer.

Why a primitive of its own and not an option of ``sim_lse``: ``sim_lse`` has
a dozen kernels (CPU row-block, symmetric-Gram and tiled-CUDA-host paths; the
Triton general, Gram, atomic and GEMM-backward kernels; the CUDA kernels),
each with its own epilogue; a per-pair label term would have to enter every
one of them or make each raise, for one loss.  The term needs only the row
LSE (no column LSE, no index lists, no row threshold), so, like
``sim_expect``, it is a small primitive with one forward and two backward
passes per backend, and ``sim_lse`` stays as it is.

Kernel backends implement ``"label_lse"`` as an object with::

    forward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal) -> lse (B,)
    backward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, lse, grad)
        -> (dq like q, dk like k, dscale 0-dim)

with ``scale`` a 0-dim tensor of the accumulation dtype, ``y_row``, ``coef``
(B,) and ``y_col`` (M,) in the accumulation dtype (fp32; float64 for float64
inputs), ``col_start``, ``col_end``, ``exclude`` (B,) int32, ``kind`` an int
(the index in ``KINDS``) and ``skip_equal`` a bool; lse and dscale in the
accumulation dtype.  Kernels: ``backends/_triton/label_lse.py`` and
``csrc/cpu/label_lse.cpp``.  The ``"cuda"`` backend does not implement it:
a loss that needs it names what is missing there, and ``"auto"`` takes Triton
on CUDA tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._numerics import acc_dtype, masked_lse

Tensor = torch.Tensor
KINDS = ("L1_inv", "L2_inv", "L1", "L2")  # the weight kinds, in the order of the kernels' ``kind``


def log_weight(d: Tensor, kind: int) -> Tensor:
    """φ(d) = log w(d) of weight kind ``kind`` (an index in ``KINDS``) for distances d >= 0."""
    if kind in (1, 3):
        d = d * d
    w = torch.log1p(d)
    return -w if kind >= 2 else w


def allowed_pairs(B: int, M: int, y_row: Tensor, y_col: Tensor, col_start: Tensor, col_end: Tensor,
                  exclude: Tensor, skip_equal: bool) -> Tensor:
    """The (B, M) bool mask of allowed pairs (dense; the reference's)."""
    cols = torch.arange(M, device=y_row.device)[None, :]
    ok = (cols >= col_start.long()[:, None]) & (cols < col_end.long()[:, None]) & (cols != exclude.long()[:, None])
    if skip_equal:
        ok = ok & (y_row[:, None] != y_col[None, :])
    return ok


def label_lse_reference(q: Tensor, k: Tensor, scale: Tensor, y_row: Tensor, y_col: Tensor, coef: Tensor,
                        col_start: Tensor, col_end: Tensor, exclude: Tensor, kind: int, skip_equal: bool) -> Tensor:
    """Dense PyTorch version (differentiable by autograd in q, k and scale); stores B×M."""
    dt = acc_dtype(q.dtype)
    yr, yc, c = y_row.to(dt), y_col.to(dt), coef.to(dt)
    S = (q.to(dt) @ k.to(dt).T) * scale.to(dt) + log_weight(c[:, None] * (yr[:, None] - yc[None, :]).abs(), kind)
    ok = allowed_pairs(q.shape[0], k.shape[0], yr, yc, col_start, col_end, exclude, skip_equal)
    return masked_lse(S, ok, 1)


class LabelLSEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"label_lse"`` primitive (contract in the module docstring).

    ``k`` is None when the candidates are the anchors' own matrix (q is k): one autograd input, whose
    gradient is dq + dk (``torch.compile`` cannot trace one tensor passed as two inputs)."""

    @staticmethod
    def forward(ctx, q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, backend):
        prim = backends.primitive(backend, "label_lse")
        lse = prim.forward(q, q if k is None else k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind,
                           skip_equal)
        ctx.prim, ctx.kind, ctx.skip_equal, ctx.same = prim, kind, skip_equal, k is None
        ctx.save_for_backward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, lse)
        return lse

    @staticmethod
    def backward(ctx, g):
        q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, lse = ctx.saved_tensors
        dq, dk, dscale = ctx.prim.backward(q, q if ctx.same else k, scale, y_row, y_col, coef, col_start, col_end,
                                           exclude, ctx.kind, ctx.skip_equal, lse, g.contiguous())
        if ctx.same:
            dq, dk = dq + dk, None
        n = ctx.needs_input_grad
        return (dq if n[0] else None, dk if n[1] else None, dscale if n[2] else None) + (None,) * 9


def _rows(name: str, t, B: int, device, dtype, default) -> Tensor:
    if t is None:
        return torch.full((B,), default, dtype=dtype, device=device)
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if tuple(t.shape) != (B,):
        raise ValueError(f"label_lse: {name} must have shape ({B},) (or be a scalar), got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def label_lse(q: Tensor, k: Tensor, scale, y_row: Tensor, y_col: Tensor, *, kind, coef=None,
              col_start=None, col_end=None, exclude=None, skip_equal: bool = False, backend: str) -> Tensor:
    """Row LSE of ``scale·q·kᵀ + φ(coef_i·|y_row_i − y_col_j|)`` over the allowed candidates (module docstring).

    ``kind``: a name in ``KINDS`` or its index.  ``coef`` (B,) or scalar (default 1); ``col_start`` /
    ``col_end`` (B,) or scalar (default 0 / M); ``exclude`` (B,) (< 0: none; default none);
    ``skip_equal`` leaves out the candidates whose label equals the row's.  ``backend`` is a concrete
    backend name; ``"reference"`` is the dense version.  fp32 (float64 for float64 inputs), differentiable
    in q, k and scale.
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"label_lse: q and k must be 2-D with one feature size, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    kind_i = KINDS.index(kind) if isinstance(kind, str) and kind in KINDS else kind
    if not isinstance(kind_i, int) or isinstance(kind_i, bool) or kind_i not in range(len(KINDS)):
        raise ValueError(f"label_lse: kind must be one of {KINDS} or its index, got {kind!r}")
    B, M = q.shape[0], k.shape[0]
    dt = acc_dtype(q.dtype)
    dev = q.device
    scale = torch.as_tensor(scale, device=dev).to(dt).reshape(())
    yr = _rows("y_row", y_row, B, dev, dt, 0.0)
    if y_col is None or tuple(torch.as_tensor(y_col).shape) != (M,):
        raise ValueError(f"label_lse: y_col must have shape ({M},), got "
                         f"{None if y_col is None else tuple(torch.as_tensor(y_col).shape)}")
    yc = y_col.to(device=dev, dtype=dt).contiguous()
    c = _rows("coef", coef, B, dev, dt, 1.0)
    start = _rows("col_start", col_start, B, dev, torch.int32, 0)
    end = _rows("col_end", col_end, B, dev, torch.int32, M)
    ex = _rows("exclude", exclude, B, dev, torch.int32, -1)
    if backend == "reference":
        return label_lse_reference(q, k, scale, yr, yc, c, start, end, ex, kind_i, bool(skip_equal))
    return LabelLSEFunction.apply(q.contiguous(), None if k is q else k.contiguous(), scale, yr, yc, c, start, end,
                                  ex, kind_i, bool(skip_equal), backend)
