"""Pieces every loss shares: normalization, temperature and scale conversion, operands of the kernels.

One copy each; the accumulation dtype and the masked LSE live one layer
lower (``contrastive_ops._numerics``) because the primitives' references use
them too, and the argument checks (pair checks included) in
``contrastive_ops._checks``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import as_scalar
from .._numerics import acc_dtype
from ..distributed import GlobalBatch, PresentCandidates, RingCandidates
from ..primitives.ring import ring_pass
from ..primitives.sim_lse import sim_lse
from ._present_first import present_sim_lse

Tensor = torch.Tensor

NORM_EPS = 1e-12  # û = u / max(‖u‖, NORM_EPS), as F.normalize and the released codes


def unit(x: Tensor, normalize: bool = True) -> Tensor:
    """``x`` in the accumulation dtype, L2-normalized along the last dim there when ``normalize``."""
    x = x.to(acc_dtype(x.dtype))
    return F.normalize(x, dim=-1, eps=NORM_EPS) if normalize else x


def kernel_operands(x_acc: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Split a feature tensor held in the accumulation dtype into what a primitive and PyTorch see.

    Returns ``(x_kernel, x_rounded)``: ``x_kernel`` is ``x_acc`` in the input
    dtype (what the kernel reads); ``x_rounded`` has the same rounded values in
    the accumulation dtype, for the PyTorch-side terms (positive logits, label
    sums), so both sides of a loss see identical logits.  Gradients of both
    flow back into ``x_acc`` and are summed there in fp32 — with fp16/bf16
    inputs the large, nearly cancelling terms (the softmax and the positive)
    meet before the one final rounding, not after.
    """
    x_kernel = x_acc.to(dtype)
    if x_kernel.dtype == x_acc.dtype:
        return x_acc, x_acc
    return x_kernel, x_acc + (x_kernel.to(x_acc.dtype) - x_acc).detach()


def unit_operands(x: Tensor, normalize: bool) -> Tuple[Tensor, Tensor]:
    """``kernel_operands`` of ``unit(x, normalize)``: (for the kernel, for the PyTorch-side terms)."""
    return kernel_operands(unit(x, normalize), x.dtype)


def inv_temperature(temperature, like: Tensor) -> Tensor:
    """1/τ as a 0-dim tensor in the accumulation dtype (differentiable in a tensor temperature).

    Public functions check τ > 0 once (``as_scalar(..., positive=True)``) before any backend.
    """
    return 1.0 / as_scalar("temperature", temperature, like)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """Σ_d a_id·b_id in the accumulation dtype (positive logits, O(B·D))."""
    dt = acc_dtype(a.dtype)
    return (a.to(dt) * b.to(dt)).sum(-1)


# ----------------------------------------------------------------------------- deterministic row sums
#
# ``x[index]`` and ``x.index_select(0, index)`` backpropagate with an
# accumulating scatter (``index_put(accumulate=True)`` / ``index_add``), and
# ``index_add`` sums with atomics: on CUDA the order of the additions, hence
# the rounding, changes from run to run.  ``take_rows`` and ``index_sum`` are
# the same maps with a fixed order: the rows are sorted by index (a stable
# sort), each run of equal indices is summed by a segmented scan (log2(n)
# elementwise steps), and the totals are read back with gathers.  Each is the
# other's adjoint, so either backward (and the double backward) is the other.


def _segment_totals(values: Tensor, index: Tensor, size: int) -> Tensor:
    """``out[j] = Σ_{i: index_i = j} values[i]`` for j in [0, size), in an order fixed by the data."""
    n = index.numel()
    out_shape = (size,) + tuple(values.shape[1:])
    if n == 0 or size == 0:
        return values.new_zeros(out_shape)
    key, perm = torch.sort(index, stable=True)
    run = values.index_select(0, perm)
    trail = (1,) * (values.dim() - 1)
    step = 1
    while step < n:  # Hillis–Steele: run[i] = Σ of its segment's entries in (i − 2·step, i]
        same = (key[step:] == key[:-step]).view((-1,) + trail)
        run = torch.cat([run[:step], run[step:] + torch.where(same, run[:-step], torch.zeros_like(run[:-step]))])
        step *= 2
    # The last entry of index j's segment holds its total; indices that never occur get 0.
    j = torch.arange(size, device=index.device, dtype=key.dtype)
    last = torch.searchsorted(key, j, right=True) - 1
    found = (last >= 0) & (key[last.clamp_min(0)] == j)
    picked = run.index_select(0, last.clamp_min(0))
    return torch.where(found.view((-1,) + trail), picked, torch.zeros_like(picked))


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.size = x.shape[0]
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _IndexSum.apply(grad, index, ctx.size), None


class _IndexSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, index, size):
        ctx.save_for_backward(index)
        return _segment_totals(values, index, size)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return _TakeRows.apply(grad, index), None, None


class _TakeDistinctRows(_TakeRows):
    """``x[index]`` for an index without repeats: the backward writes each row once (no sum)."""

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        out = grad.new_zeros((ctx.size,) + tuple(grad.shape[1:]))
        return out.index_copy(0, index, grad), None


def take_rows(x: Tensor, index: Tensor, *, distinct: bool = False) -> Tensor:
    """``x[index]`` along dim 0 (``index`` int64) with a run-to-run deterministic backward.

    ``distinct=True`` promises that ``index`` has no repeats (e.g. a prefix of a permutation): then
    the backward is one write per row instead of the fixed-order segmented sum that repeats need."""
    if distinct:
        return _TakeDistinctRows.apply(x, index.long())
    return _TakeRows.apply(x, index.long())


def _unit_rows_fwd(x: Tensor, index: Tensor):
    """``unit(x[index])`` (in place on the gathered copy: the values of ``F.normalize``), its denominators
    max(‖x_i‖, eps) and where the norm is above eps."""
    rows = x.index_select(0, index).to(acc_dtype(x.dtype))
    norm = rows.norm(2, 1, keepdim=True)
    denom = norm.clamp_min(NORM_EPS)
    return rows.div_(denom), denom, norm > NORM_EPS


def _unit_rows_bwd(grad: Tensor, u: Tensor, denom: Tensor, live: Tensor, index: Tensor, size: int, dtype) -> Tensor:
    """dx_i = (g_i − [‖x_i‖ > eps]·û_i (û_i·g_i)) / max(‖x_i‖, eps) (``grad`` is overwritten), written into
    zeros at the rows ``index`` (one write per row, no atomics)."""
    along = torch.bmm(u.unsqueeze(1), grad.unsqueeze(2)).view(-1, 1).mul_(live)  # û_i·g_i, one pass (bmm)
    dx = grad.addcmul_(u, along, value=-1).div_(denom).to(dtype)
    out = dx.new_zeros((size,) + tuple(dx.shape[1:]))
    return out.index_copy_(0, index, dx)


class _UnitRowPairs(torch.autograd.Function):
    """``u = unit(x1[index])``, ``v = unit(x2[index])`` and the row dots ``u·v`` in one autograd node.

    The same maths as ``unit(take_rows(x, index, distinct=True))`` and ``(u * v).sum(-1)``, in fewer
    passes over the rows: the dots' gradient is added into the incoming ``du``/``dv`` in place (no
    separate products and accumulations), then the normalization's backward and one scatter per input.
    """

    @staticmethod
    def forward(ctx, x1, x2, index):
        u, den1, live1 = _unit_rows_fwd(x1, index)
        v, den2, live2 = _unit_rows_fwd(x2, index)
        ctx.save_for_backward(index, u, den1, live1, v, den2, live2)
        ctx.sizes, ctx.dtypes = (x1.shape[0], x2.shape[0]), (x1.dtype, x2.dtype)
        return u, v, torch.linalg.vecdot(u, v, dim=1)

    @staticmethod
    def backward(ctx, gu, gv, gdot):
        index, u, den1, live1, v, den2, live2 = ctx.saved_tensors
        # fresh tensors that the normalization's backward may overwrite: du + gdot·v, dv + gdot·u
        gdot = torch.zeros_like(den1) if gdot is None else gdot.unsqueeze(1)
        gu = v * gdot if gu is None else torch.addcmul(gu, v, gdot)
        gv = u * gdot if gv is None else torch.addcmul(gv, u, gdot)
        dx1 = _unit_rows_bwd(gu, u, den1, live1, index, ctx.sizes[0], ctx.dtypes[0])
        dx2 = _unit_rows_bwd(gv, v, den2, live2, index, ctx.sizes[1], ctx.dtypes[1])
        return dx1, dx2, None


def unit_row_pairs(x1: Tensor, x2: Tensor, index: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(u, v, (u * v).sum(-1))`` with ``u = unit(x1[index])``, ``v = unit(x2[index])`` (2-D inputs,
    ``index`` without repeats) in one autograd node: only the listed rows are normalized, the backward
    is a few passes over them plus one scatter per input.  Not twice differentiable."""
    return _UnitRowPairs.apply(x1, x2, index.long())


def index_sum(values: Tensor, index: Tensor, size: int) -> Tensor:
    """``zeros(size, ...).index_add(0, index, values)`` summed in a fixed order (deterministic on CUDA)."""
    return _IndexSum.apply(values, index.long(), size)


def label_groups(labels: Optional[Tensor], N: int, device) -> Tensor:
    """Group id in [0, N) per instance: equal labels ⇔ equal ids (``None``: the instance ids).

    No data-dependent shapes, so compositions that sum features per label
    (``index_add`` into N slots) trace under ``torch.compile``.
    """
    if labels is None:
        return torch.arange(N, device=device)
    sorted_labels, perm = torch.sort(labels)
    new = torch.ones(N, dtype=torch.long, device=device)
    new[1:] = (sorted_labels[1:] != sorted_labels[:-1]).long()
    gid = torch.empty(N, dtype=torch.long, device=device)
    gid[perm] = torch.cumsum(new, 0) - 1
    return gid


def supcon_setup(views: Tensor, labels: Optional[Tensor], temperature, base_temperature, normalize: bool,
                 process_group, gather: bool = True, exchange: str = "gather"):
    """The common start of the SupCon-family compositions on view-major ``views`` (V, n, D): this
    rank's unit features ``U``, the gathered ones ``Ug`` (V, N, D), the gathered labels, and the
    factor τ/τ_b and scale 1/τ.  Returns ``(gb, U, Ug, labels, factor, scale)``.

    ``gather=False`` (compositions written on ``gb.candidates``): ``Ug`` is None and the labels stay
    this rank's; ``exchange`` is then the ``GlobalBatch``'s."""
    gb = GlobalBatch(views.shape[1], process_group, views.device, exchange)
    U = unit(views, normalize)
    if not gather:
        t = as_scalar("temperature", temperature, U)
        return gb, U, None, labels, t / as_scalar("base_temperature", base_temperature, U), 1.0 / t
    Ug = gb.gather(U, dim=1)  # (V, N, D)
    labels = None if labels is None else gb.gather_nograd(labels)
    t = as_scalar("temperature", temperature, U)
    factor = t / as_scalar("base_temperature", base_temperature, U)
    return gb, U, Ug, labels, factor, 1.0 / t


def cross_lse(q: Tensor, k: Tensor, scale: Tensor, gb: GlobalBatch, *, exclude_own: bool = False,
              backend: str, q_all: Optional[Tensor] = None, k_all: Optional[Tensor] = None,
              present: Optional[Tensor] = None, present_all: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Row LSE of this rank's ``q`` over every rank's ``k`` and column LSE of this rank's ``k`` over every
    rank's ``q`` (q and k paired row by row: CLIP, symmetric InfoNCE).  ``exclude_own`` leaves out each
    pair (i, i).  ``present`` (n,) bool: only the pairs whose rows are both present take part (absent
    rows: -inf); the mask goes with the candidates (``gb.candidates(..., present=...)``).

    One process and ``exchange="ring"``: one core call with ``want_col``.  ``"gather"``: two calls, local
    rows against the gathered other side (a gathered call's columns would be over local anchors only);
    ``q_all``/``k_all`` (and ``present_all``, the gathered ``present``): those gathered tensors when the
    caller has them already.
    """
    own = (torch.arange(q.shape[0], device=q.device) + gb.offset)[:, None] if exclude_own else None
    if present is None:
        if gb.group is None or gb.ring:
            return sim_lse(q, gb.candidates(k), scale, exclude=own, want_col=True, backend=backend)
        row, _ = sim_lse(q, gb.gather(k) if k_all is None else k_all, scale, exclude=own, backend=backend)
        col, _ = sim_lse(k, gb.gather(q) if q_all is None else q_all, scale, exclude=own, backend=backend)
        return row, col
    end = torch.where(present, gb.total, 0)  # absent anchors: an empty range
    if gb.group is None or gb.ring:
        return present_sim_lse(q, gb.candidates(k, present=[present]), scale, col_end=end, exclude=own,
                               want_col=True, backend=backend)
    pa = gb.gather_nograd(present) if present_all is None else present_all
    row, _ = present_sim_lse(q, PresentCandidates(gb.gather(k) if k_all is None else k_all, pa), scale,
                             col_end=end, exclude=own, backend=backend)
    col, _ = present_sim_lse(k, PresentCandidates(gb.gather(q) if q_all is None else q_all, pa), scale,
                             col_end=end, exclude=own, backend=backend)
    return row, col


# ----------------------------------------------------------------------------- sums over equal labels


def label_sum(values: Tensor, labels: Tensor, query_labels: Tensor) -> Tensor:
    """``out[i] = Σ_{j: labels_j = query_labels_i} values[j]`` (``values`` (m, ...), ``out`` (n, ...)).

    Deterministic and without data-dependent shapes (``label_groups``, ``index_sum``, ``take_rows``);
    differentiable in ``values``.  ``query_labels is labels`` groups the m labels once.
    """
    m = labels.shape[0]
    if query_labels is labels:
        gid = label_groups(labels, m, labels.device)
        return take_rows(index_sum(values, gid, m), gid)
    n = query_labels.shape[0]
    gid = label_groups(torch.cat([labels.long(), query_labels.long()]), m + n, labels.device)
    return take_rows(index_sum(values, gid[:m], m + n), gid[m:])


class _RingLabelSum(torch.autograd.Function):
    """``label_sum`` of every rank's rows queried at this rank's labels, the blocks passed around the ring;
    the backward sends each block's gradient (the same sum with the roles swapped) home."""

    @staticmethod
    def forward(ctx, values, labels, cands):
        out = torch.zeros_like(values)

        def step(owner, cur):
            nonlocal out
            out = out + label_sum(cur[0], cur[1], labels)

        ring_pass(cands, [values, labels], [], step)
        ctx.cands = cands
        ctx.save_for_backward(labels)
        return out

    @staticmethod
    def backward(ctx, grad):
        (labels,) = ctx.saved_tensors
        grad = grad.contiguous()

        def step(owner, cur):
            return [label_sum(grad, labels, cur[0])]

        (dv,) = ring_pass(ctx.cands, [labels], [torch.zeros_like(grad)], step)
        return dv, None, None


def global_label_sum(gb: GlobalBatch, values: Tensor, labels: Tensor) -> Tensor:
    """For each of this rank's rows i: Σ over every rank's rows j with ``labels_j = labels_i`` of
    ``values_j`` (``values`` (n, D), ``labels`` (n,)), with gradient to every rank's values.

    One process: ``label_sum``; ``"gather"``: of the gathered values and labels; ``"ring"``: the
    (values, labels) blocks travel (``_RingLabelSum``), nothing global is held.
    """
    if gb.group is None:
        return label_sum(values, labels, labels)
    if gb.ring:
        out = _RingLabelSum.apply(values, labels.long().contiguous(), RingCandidates(gb, [values]))
        return out
    return label_sum(gb.gather(values), gb.gather_nograd(labels), labels)
