r"""Primitives ``"pix_pos_sum"`` and ``"pix_pos_lse"``: pixel pairs of two crops, positives from box coordinates.

Geometry (PixPro, zdaxie/PixPro ``contrast/models/PixPro.py``)
----------------------------------------------------------------
Two views of image b are crops with boxes ``coord = (x0, y0, x1, y1)`` in
original-image coordinates, each seen as an H×W feature map.  Pixel
``p = r·W + a`` (row r, column a) of a view covers a bin of size
``bw = (x1 − x0)/W`` by ``bh = (y1 − y0)/H`` with centre::

    cx_p = (a + 0.5)·bw + x0,      cy_p = (r + 0.5)·bh + y0

Pixel i of view q and pixel j of view k of the same image are *positive* when::

    pos_ij = sqrt((cx^q_i − cx^k_j)² + (cy^q_i − cy^k_j)²) / max(diag_q, diag_k) < ratio

with ``diag = sqrt(bw² + bh²)`` of each view.  The squared distance splits
by axis: ``dx²`` depends only on the columns (a_i, a_j), ``dy²`` only on the
rows (r_i, r_j).  So the geometry a kernel needs is O(B·(W² + H²)): the tables::

    DX[b, a, c] = (cx^q_{a} − cx^k_{c})²   (B, W, W)
    DY[b, r, s] = (cy^q_{r} − cy^k_{s})²   (B, H, H)
    diag[b]     = max(diag_q, diag_k)       (B,)

built here in the coordinates' dtype with the same operations, in the same
order, as the official code, and the kernel evaluates
``sqrt(DX + DY) / diag < ratio`` per tile with IEEE-rounded square root and
division: the predicate is bit-identical to the official mask (no (HW)²·B
mask is ever stored by a kernel).  The transposed predicate (view k's pixel
j against view q's pixel i) is the same with ``DX``, ``DY`` transposed.

``"pix_pos_sum"`` (PixPro)
--------------------------
With x (B, P, D), P = H·W (the other view's features), per image b::

    Z[b, i] = Σ_j pos_ij · x[b, j]           (B, P, D)   fp32 (float64 for float64 x)
    cnt[b, i] = Σ_j pos_ij                   (B, P)      same dtype

Z is linear in x: its backward is the same primitive on the upstream gradient
with the transposed geometry, ``dx[b, j] = Σ_i pos_ij · gZ[b, i]``.  ``cnt``
has no gradient.  A kernel backend implements it as an object with::

    forward(x, dx_tab, dy_tab, diag, ratio, H, W) -> (Z, cnt)

with ``x`` contiguous (B, P, D) in the input dtype, the tables contiguous in
one float dtype (fp32 or float64), ``ratio`` a 0-dim tensor of that dtype.

``"pix_pos_lse"`` (PixContrast)
-------------------------------
With anchors q (B, P, D), candidates k (B_k, P, D), an integer ``offset``
(anchor image b is image b + offset of k: 0 in one process, the rank's
offset when k holds the gathered global batch) and 0-dim ``scale``,
``S[(b,i), (c,j)] = scale · q[b,i]·k[c,j]``; candidate (c, j) of anchor
(b, i) is *allowed* when c = b + offset (``batch_negatives=False``: the other
view of the same image) or always (``batch_negatives=True``: every pixel of
the batch's other views), and *positive* when c = b + offset and pos_ij::

    lse_pos[b, i] = LSE_{j : pos_ij} S[(b,i), (b+offset,j)]   (B, P)   −inf if no positive
    lse_all[b, i] = LSE_{(c,j) allowed} S[(b,i), (c,j)]        (B, P)

Backward, with upstream gradients g_pos, g_all (B, P) and
``W = g_pos·exp(S − lse_pos)·pos + g_all·exp(S − lse_all)·allowed``::

    dq[b,i] = scale · Σ_{(c,j)} W[(b,i),(c,j)] · k[c,j],    dscale = Σ W ⊙ S / scale

(anchors with ``lse_pos = −inf`` take no positive term).  The candidates k
get no gradient: in PixContrast they are the momentum encoder's keys, which
the loss detaches (the entry below refuses a k that requires grad).  A kernel
backend implements it as an object with::

    forward(q, k, scale, dx_tab, dy_tab, diag, ratio, H, W, batch_negatives, offset) -> (lse_pos, lse_all)
    backward(q, k, scale, dx_tab, dy_tab, diag, ratio, H, W, batch_negatives, offset,
             lse_pos, lse_all, g_pos, g_all) -> (dq like q, dscale 0-dim fp32)

Kernels: ``backends/_triton/pix_pos.py`` and ``csrc/cpu/pix_pos.cpp`` (both
primitives).  The ``cuda`` backend implements neither: dispatch raises,
naming the missing primitive.

This module holds, in order: the geometry, the dense references (they build
the (B, P, P) mask: the oracle), the autograd Functions and the entries the
losses call.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .. import backends
from .._numerics import acc_dtype, masked_lse

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- geometry


def bin_centres(coord: Tensor, H: int, W: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Bin centres of each crop, as the official code computes them, and the bin diagonal.

    ``coord`` (B, 4) = (x0, y0, x1, y1).  Returns ``cx`` (B, W), ``cy`` (B, H),
    ``diag`` (B,), in ``coord``'s dtype.
    """
    x_array = torch.arange(0.0, float(W), dtype=coord.dtype, device=coord.device).view(1, -1)
    y_array = torch.arange(0.0, float(H), dtype=coord.dtype, device=coord.device).view(1, -1)
    bin_w = ((coord[:, 2] - coord[:, 0]) / W).view(-1, 1)
    bin_h = ((coord[:, 3] - coord[:, 1]) / H).view(-1, 1)
    diag = torch.sqrt(bin_w ** 2 + bin_h ** 2).view(-1)
    cx = (x_array + 0.5) * bin_w + coord[:, 0].view(-1, 1)
    cy = (y_array + 0.5) * bin_h + coord[:, 1].view(-1, 1)
    return cx, cy, diag


def geometry(coord_q: Tensor, coord_k: Tensor, H: int, W: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The per-axis tables ``(DX (B, W, W), DY (B, H, H), diag (B,))`` of the module docstring."""
    cqx, cqy, dq = bin_centres(coord_q, H, W)
    ckx, cky, dk = bin_centres(coord_k, H, W)
    dx = (cqx[:, :, None] - ckx[:, None, :]) ** 2
    dy = (cqy[:, :, None] - cky[:, None, :]) ** 2
    return dx.contiguous(), dy.contiguous(), torch.max(dq, dk).contiguous()


def transpose_geometry(dx: Tensor, dy: Tensor, diag: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The tables of the transposed predicate (view k's pixels against view q's)."""
    return dx.transpose(1, 2).contiguous(), dy.transpose(1, 2).contiguous(), diag


def pos_mask(dx: Tensor, dy: Tensor, diag: Tensor, ratio: Tensor, H: int, W: int) -> Tensor:
    """Dense (B, P, P) bool mask from the tables (references and tests only).

    ``sqrt(dx² + dy²) / diag < ratio`` with the same roundings as the official code.
    """
    B = dx.shape[0]
    d2 = dy[:, :, None, :, None] + dx[:, None, :, None, :]  # (B, H, W, H, W): [b, r, a, s, c]
    dist = torch.sqrt(d2.reshape(B, H * W, H * W)) / diag.view(-1, 1, 1)
    return dist < ratio


# ----------------------------------------------------------------------------- references


def pix_pos_sum_reference(x: Tensor, dx: Tensor, dy: Tensor, diag: Tensor, ratio: Tensor, H: int,
                          W: int) -> Tuple[Tensor, Tensor]:
    """Dense ``(Z, cnt)`` (stores the (B, P, P) mask; differentiable in ``x`` by autograd)."""
    dt = acc_dtype(x.dtype)
    pos = pos_mask(dx, dy, diag, ratio, H, W).to(dt)
    return torch.bmm(pos, x.to(dt)), pos.sum(-1)


def pix_pos_lse_reference(q: Tensor, k: Tensor, scale: Tensor, dx: Tensor, dy: Tensor, diag: Tensor,
                          ratio: Tensor, H: int, W: int, batch_negatives: bool,
                          offset: int = 0) -> Tuple[Tensor, Tensor]:
    """Dense ``(lse_pos, lse_all)`` (stores (B, P, P), or B·P × B_k·P with ``batch_negatives``)."""
    dt = acc_dtype(q.dtype)
    B, P, _ = q.shape
    pos = pos_mask(dx, dy, diag, ratio, H, W)
    own = k[offset:offset + B]
    S_img = torch.bmm(q.to(dt), own.to(dt).transpose(1, 2)) * scale.to(dt)  # (B, P, P)
    lse_pos = masked_lse(S_img, pos, 2)
    if not batch_negatives:
        return lse_pos, torch.logsumexp(S_img, 2)
    S = (q.reshape(B * P, -1).to(dt) @ k.reshape(-1, k.shape[-1]).to(dt).T) * scale.to(dt)  # (B·P, B_k·P)
    return lse_pos, torch.logsumexp(S, 1).reshape(B, P)


# ----------------------------------------------------------------------------- autograd


class PixPosSumFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"pix_pos_sum"`` (Z linear in x; cnt constant)."""

    @staticmethod
    def forward(ctx, x, dx, dy, diag, ratio, H, W, backend):
        prim = backends.primitive(backend, "pix_pos_sum")
        Z, cnt = prim.forward(x, dx, dy, diag, ratio, H, W)
        ctx.prim, ctx.H, ctx.W, ctx.x_dtype = prim, H, W, x.dtype
        ctx.save_for_backward(dx, dy, diag, ratio)
        ctx.mark_non_differentiable(cnt)
        return Z, cnt

    @staticmethod
    def backward(ctx, gZ, _gcnt):
        dx, dy, diag, ratio = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0] and gZ is not None:
            tx, ty, td = transpose_geometry(dx, dy, diag)
            gx, _ = ctx.prim.forward(gZ.contiguous(), tx, ty, td, ratio, ctx.H, ctx.W)
            gx = gx.to(ctx.x_dtype)
        return gx, None, None, None, None, None, None, None


class PixPosLSEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"pix_pos_lse"`` (gradients of q and scale)."""

    @staticmethod
    def forward(ctx, q, k, scale, dx, dy, diag, ratio, H, W, batch_negatives, offset, backend):
        prim = backends.primitive(backend, "pix_pos_lse")
        lse_pos, lse_all = prim.forward(q, k, scale, dx, dy, diag, ratio, H, W, batch_negatives, offset)
        ctx.prim, ctx.H, ctx.W, ctx.bn, ctx.offset = prim, H, W, batch_negatives, offset
        ctx.save_for_backward(q, k, scale, dx, dy, diag, ratio, lse_pos, lse_all)
        return lse_pos, lse_all

    @staticmethod
    def backward(ctx, g_pos, g_all):
        q, k, scale, dx, dy, diag, ratio, lse_pos, lse_all = ctx.saved_tensors
        g_pos = torch.zeros_like(lse_pos) if g_pos is None else g_pos.contiguous()
        g_all = torch.zeros_like(lse_all) if g_all is None else g_all.contiguous()
        dq, dscale = ctx.prim.backward(q, k, scale, dx, dy, diag, ratio, ctx.H, ctx.W, ctx.bn, ctx.offset,
                                       lse_pos, lse_all, g_pos, g_all)
        return (dq if ctx.needs_input_grad[0] else None, None,
                dscale if ctx.needs_input_grad[2] else None) + (None,) * 9


# ----------------------------------------------------------------------------- entries


def _check_geometry(x: Tensor, dx: Tensor, dy: Tensor, diag: Tensor, H: int, W: int) -> None:
    B, P = x.shape[0], x.shape[1]
    if P != H * W or dx.shape != (B, W, W) or dy.shape != (B, H, H) or diag.shape != (B,):
        raise ValueError(f"pix_pos: features (B, H·W, D) = {tuple(x.shape)} do not match H={H}, W={W} and the "
                         f"tables dx {tuple(dx.shape)}, dy {tuple(dy.shape)}, diag {tuple(diag.shape)}")


def pix_pos_sum(x: Tensor, dx: Tensor, dy: Tensor, diag: Tensor, ratio: Tensor, H: int, W: int, *,
                backend: str) -> Tuple[Tensor, Tensor]:
    """``(Z, cnt)`` of the module docstring; ``backend`` is a concrete backend name.

    ``"reference"`` builds the dense mask; kernel backends never store it.
    """
    _check_geometry(x, dx, dy, diag, H, W)
    ratio = ratio.to(dx.dtype).reshape(())
    if backend == "reference":
        return pix_pos_sum_reference(x, dx, dy, diag, ratio, H, W)
    return PixPosSumFunction.apply(x.contiguous(), dx.contiguous(), dy.contiguous(), diag.contiguous(), ratio,
                                   H, W, backend)


def pix_pos_lse(q: Tensor, k: Tensor, scale: Tensor, dx: Tensor, dy: Tensor, diag: Tensor, ratio: Tensor,
                H: int, W: int, *, batch_negatives: bool, offset: int = 0, backend: str) -> Tuple[Tensor, Tensor]:
    """``(lse_pos, lse_all)`` of the module docstring; ``backend`` is a concrete backend name.

    ``k`` gets no gradient (a ``k`` that requires grad is refused).
    """
    _check_geometry(q, dx, dy, diag, H, W)
    if k.dim() != 3 or k.shape[1:] != q.shape[1:] or not 0 <= offset <= k.shape[0] - q.shape[0]:
        raise ValueError(f"pix_pos_lse: k must be (B_k, P, D) with P, D of q {tuple(q.shape)} and hold images "
                         f"offset .. offset + B - 1 (offset {offset}), got {tuple(k.shape)}")
    if k.requires_grad:
        raise ValueError("pix_pos_lse gives no gradient to k (the momentum encoder's keys): pass k.detach()")
    ratio = ratio.to(dx.dtype).reshape(())
    scale = scale.to(device=q.device, dtype=acc_dtype(q.dtype)).reshape(())
    if backend == "reference":
        return pix_pos_lse_reference(q, k, scale, dx, dy, diag, ratio, H, W, batch_negatives, offset)
    return PixPosLSEFunction.apply(q.contiguous(), k.contiguous(), scale, dx.contiguous(), dy.contiguous(),
                                   diag.contiguous(), ratio, H, W, bool(batch_negatives), int(offset), backend)
