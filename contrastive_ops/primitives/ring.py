r"""The ``"sim_lse"`` primitive fed by a ring exchange (``exchange="ring"``): no rank holds the global candidates.

Forward (rank r of W, its anchors ``q`` (B, D), its candidate block ``k_r``)::

    for hop h = 0 .. W−1:                     block k_s of owner s = r − h (mod W)
        post: send k_s to r+1, receive k_{s−1} from r−1      (h < W−1; overlaps the compute)
        row_lse  ← logaddexp(row_lse, LSE over k_s of the allowed pairs)
        col_s    ← logaddexp(col_s, LSE over this rank's anchors)   (want_col; travels with k_s)
        send col_s on with the block (after the last hop it reaches its owner)

The global masks (``col_start``/``col_end``/``exclude`` in global candidate
positions) are translated to each visiting block
(:meth:`~contrastive_ops.distributed.RingCandidates.local_masks`), so the
kernel sees (local anchors × one block) only.

Backward, with the final ``row_lse`` and each block's final ``col_lse``::

    for hop h = 0 .. W−1:                     block k_s travels with (col_lse_s, g_col_s)
        dq    += ∂/∂q   of this hop's pairs   (prim.backward with the final LSEs)
        dk_s  += ∂/∂k_s of this hop's pairs   (the accumulator arrives from r−1 while
                                               this hop computes, then goes on to r+1)
    after the last hop dk_s reaches its owner s.

so each rank ends with Σ_r ∂L_r/∂(its rows), what ``all_gather_with_grad``'s
backward gives in ``exchange="gather"`` (``contrastive_ops.distributed``).
Extra memory per rank: two blocks of features (current and next), three
block-sized gradient buffers in the backward (the accumulator going out, the
one coming in, this hop's contribution), O(B + block rows) LSEs.  Gradient
accumulators are kept in the accumulation dtype (fp32 for fp16/bf16).

The ``"siglip"`` pair sum runs the same way (:class:`RingSigLIPFunction`):
the pair sum of this rank's images against every rank's text block; only the
rank's own block holds the positive pairs (i, i), so a visiting block's
diagonal is turned back into negatives with softplus(L) = softplus(−L) + L,
i.e. Σ_i L_ii added in PyTorch (O(n·D)).

Candidates with a mask (``RingCandidates.present_rows``: the multi-view
losses' present views): the mask rows travel with their block, and each hop
lists the visiting block's present rows first (``col_index``) and turns the
masks into positions in that list (:func:`hop_masks`), so absent rows enter
no LSE and get no gradient, as the gathered stack's present-first lists do.

Both Functions share :func:`ring_pass`, the loop that moves the blocks.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._numerics import acc_dtype, present_first
from ..distributed import RingCandidates, restrict_to_present, ring_shift, ring_wait

Tensor = torch.Tensor


_ACC_TAG = 16  # tags of the accumulators, apart from the travelling tensors' (in flight at the same time)


def ring_pass(cands: RingCandidates, travel, acc, step, combine=torch.add):
    """Visit every rank's block once: W hops, block data prefetched one hop ahead.

    ``travel``: this rank's tensors with dim 0 of block rows (``cands.rows``)
    that go round unchanged (the block, its LSEs and their gradients, its
    labels); ``acc``: this rank's initial accumulators (dim 0 of block rows:
    column partials, gradient accumulators) that each hop merges a
    contribution into with ``combine``.  ``step(owner, travelling)`` computes
    on rank ``owner``'s ``travel`` tensors and returns its contributions to
    that block's ``acc`` (or None: nothing).  Returns the ``acc`` of this
    rank's own block after every rank has added to it (``[]`` if ``acc`` is
    empty).

    Overlap: the next block's tensors are posted before this block's compute;
    this block's accumulators, sent on by the previous rank after its own
    compute on the block, are waited for only after this rank's compute.
    """
    gb = cands.gb
    W, r = gb.world_size, gb.rank
    cur = list(travel)
    acc = list(acc)
    acc_reqs, sent = [], None
    for h in range(W):
        nxt_owner = (r - h - 1) % W
        if h < W - 1:
            m = cands.rows(nxt_owner)
            nbufs = [t.new_empty((m,) + tuple(t.shape[1:])) for t in cur]
            reqs = ring_shift(cur, nbufs, gb.group)
        contrib = step((r - h) % W, cur)
        if acc:
            ring_wait(acc_reqs)  # this block's accumulators have arrived (h > 0)
            if contrib is not None:
                acc = [combine(a, c) for a, c in zip(acc, contrib)]
            # on to the next rank; after the last hop they reach their owner
            m = cands.rows(nxt_owner)
            sent, abufs = acc, [t.new_empty((m,) + tuple(t.shape[1:])) for t in acc]
            acc_reqs = ring_shift(sent, abufs, gb.group, tag=_ACC_TAG)
            acc = abufs
        if h < W - 1:
            ring_wait(reqs)
            cur = nbufs
    ring_wait(acc_reqs)
    return acc


def hop_masks(cands: RingCandidates, owner: int, B: int, cur, col_start, col_end, exclude):
    """The masks of one hop on ``owner``'s block, ``cur`` its travelling tensors (``cur[1]``: its present
    rows when the candidates have a mask).  Returns ``(col_index, col_start, col_end, exclude, pos)``:
    without a mask ``col_index``/``pos`` are None and the masks are block positions; with one,
    ``col_index`` lists the present rows first and the masks are positions in it, ``pos`` the list
    position of each block row (block order ↔ list order of the column LSEs)."""
    cs, ce, ex = cands.local_masks(owner, col_start, col_end, exclude)
    if cands.present_rows is None:
        return None, cs, ce, ex, None
    present = cur[1].bool()
    order, pos, count = present_first(present)
    cs, ce, ex = restrict_to_present(present, pos, count, B, cs, ce, ex)
    return order.to(torch.int32).contiguous(), cs, ce, ex, pos


class RingSimLSEFunction(torch.autograd.Function):
    """``sim_lse`` of this rank's anchors against every rank's candidate block, passed around the ring.

    Outputs ``(row_lse (B,), col_lse (block rows,) or empty, token)``; ``token``
    is a 0-dim zero that ``GlobalBatch._anchor`` adds to the loss so that the
    backward (a collective) runs on every rank.
    """

    @staticmethod
    def forward(ctx, q, k, scale, col_start, col_end, exclude, want_col, prim, cands, row_max):
        dt = acc_dtype(q.dtype)
        B = q.shape[0]
        rm = {} if row_max is None else {"row_max": row_max}  # passed only when given (sim_lse's contract)
        row = torch.full((B,), float("-inf"), dtype=dt, device=q.device)

        def step(owner, cur):
            nonlocal row
            blk = cur[0]
            if B == 0 or blk.shape[0] == 0:
                return None
            if blk.data_ptr() == q.data_ptr():  # a kernel would take them for one tensor (symmetric Gram)
                blk = blk.clone()
            ci, cs, ce, ex, pos = hop_masks(cands, owner, B, cur, col_start, col_end, exclude)
            rl, cl = prim.forward(q, blk, scale, None, ci, cs, ce, ex, want_col, **rm)
            row = torch.logaddexp(row, rl)
            if want_col and pos is not None:
                cl = cl[pos]  # list order → block order
            return [cl.to(dt)] if want_col else None

        col0 = [torch.full((k.shape[0],), float("-inf"), dtype=dt, device=q.device)] if want_col else []
        out = ring_pass(cands, [cands.block] + _mask_rows(cands), col0, step, combine=torch.logaddexp)
        own_col = out[0] if want_col else row.new_empty(0)
        ctx.prim, ctx.cands, ctx.want_col, ctx.rm = prim, cands, want_col, rm
        ctx.save_for_backward(q, k, scale, col_start, col_end, exclude, row, own_col)
        if not want_col:
            ctx.mark_non_differentiable(own_col)
        token = torch.zeros((), dtype=dt, device=q.device)
        return row, own_col, token

    @staticmethod
    def backward(ctx, g_row, g_col, _g_token):
        q, k, scale, col_start, col_end, exclude, row_lse, own_col = ctx.saved_tensors
        prim, cands, want_col, rm = ctx.prim, ctx.cands, ctx.want_col, ctx.rm
        dt = acc_dtype(q.dtype)
        B = q.shape[0]
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
        fixed = []
        if want_col:  # (m, 2): the block's final column LSE and its gradient travel with it
            g_col = torch.zeros_like(own_col) if g_col is None else g_col.to(own_col.dtype)
            fixed = [torch.stack([own_col, g_col], 1)]
        dq = torch.zeros(q.shape, dtype=dt, device=q.device)
        dscale = torch.zeros((), dtype=scale.dtype, device=q.device)
        empty = row_lse.new_empty(0)

        def step(owner, cur):
            nonlocal dq, dscale
            blk = cur[0]
            if B == 0 or blk.shape[0] == 0:
                return None
            if blk.data_ptr() == q.data_ptr():
                blk = blk.clone()
            ci, cs, ce, ex, pos = hop_masks(cands, owner, B, cur, col_start, col_end, exclude)
            c_lse, c_g = (cur[-1][:, 0], cur[-1][:, 1]) if want_col else (empty, empty)
            if want_col and ci is not None:  # block order → list order
                c_lse, c_g = c_lse[ci.long()], c_g[ci.long()]
            dq_h, dk_h, ds_h = prim.backward(q, blk, scale, None, ci, cs, ce, ex, row_lse, c_lse.contiguous(),
                                             g_row, c_g.contiguous(), **rm)
            dq = dq + dq_h.to(dt)
            dscale = dscale + ds_h.reshape(()).to(dscale.dtype)
            return [dk_h.to(dt)]

        (dk,) = ring_pass(cands, [cands.block] + _mask_rows(cands) + fixed,
                          [torch.zeros(k.shape, dtype=dt, device=k.device)], step)
        needs = ctx.needs_input_grad
        return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
                dscale if needs[2] else None, None, None, None, None, None, None, None)


def _mask_rows(cands: RingCandidates):
    """The travelling mask rows of ``cands`` (``[]`` without a mask)."""
    return [] if cands.present_rows is None else [cands.present_rows]


def ring_sim_lse(q: Tensor, cands: RingCandidates, scale: Tensor, *, row_index: Optional[Tensor],
                 col_index: Optional[Tensor], col_start: Optional[Tensor], col_end: Optional[Tensor],
                 exclude: Optional[Tensor], want_col: bool, prim, row_max: Optional[Tensor] = None):
    """``sim_lse`` of this rank's anchors against a :class:`RingCandidates` handle (arguments as ``sim_lse``,
    masks in global candidate positions; ``prim`` the ``"sim_lse"`` primitive object that computes each
    hop; ``row_max`` the per-anchor logit threshold, detached).  Returns ``(row_lse, col_lse of this rank's
    block or None)``."""
    if col_index is not None:
        raise NotImplementedError("col_index is not supported with exchange='ring' (the candidates are "
                                  "never gathered); select candidates with col_start/col_end/exclude and "
                                  "the handle's present rows (GlobalBatch.candidates(..., present=...))")
    if row_index is not None:
        q = q.index_select(0, row_index.long())
    if row_max is not None and tuple(row_max.shape) != (q.shape[0],):
        raise ValueError(f"row_max must have shape ({q.shape[0]},) (one per anchor), got {tuple(row_max.shape)}")
    if q.dtype != cands.dtype or q.shape[1] != cands.D:
        raise ValueError(f"anchors {tuple(q.shape)} {q.dtype} do not match the ring candidates "
                         f"(D={cands.D}, {cands.dtype})")
    cands.block = cands.block.contiguous()
    row, col, token = RingSimLSEFunction.apply(q.contiguous(), cands.block, scale.reshape(()),
                                               col_start, col_end, exclude, want_col, prim, cands, row_max)
    cands.gb._tokens.append(token)
    return row, (col if want_col else None)


class RingSigLIPFunction(torch.autograd.Function):
    """The ``"siglip"`` pair sum of this rank's ``x`` against every rank's ``y`` block (positives: this
    rank's own pairs (i, i)); outputs ``(total, token)``."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, prim, cands):
        me = cands.gb.rank
        dt = acc_dtype(x.dtype)
        total = torch.zeros((), dtype=dt, device=x.device)

        def step(owner, cur):
            nonlocal total
            blk = cur[0]
            if x.shape[0] == 0 or blk.shape[0] == 0:
                return None
            total = total + prim.forward(x, blk, scale, bias).to(dt)
            if owner != me:  # no positives in another rank's block: softplus(L) = softplus(−L) + L
                d = min(x.shape[0], blk.shape[0])
                total = total + (scale * (x[:d].to(dt) * blk[:d].to(dt)).sum() + d * bias).to(dt)
            return None

        ring_pass(cands, [cands.block], [], step)
        ctx.prim, ctx.cands = prim, cands
        ctx.save_for_backward(x, y, scale, bias)
        return total, torch.zeros((), dtype=dt, device=x.device)

    @staticmethod
    def backward(ctx, grad, _g_token):
        x, y, scale, bias = ctx.saved_tensors
        prim, cands = ctx.prim, ctx.cands
        me = cands.gb.rank
        dt = acc_dtype(x.dtype)
        G = (torch.zeros((), dtype=scale.dtype, device=x.device) if grad is None
             else grad.reshape(()).to(scale.dtype))
        dx = torch.zeros(x.shape, dtype=dt, device=x.device)
        ds = torch.zeros((), dtype=scale.dtype, device=x.device)
        db = torch.zeros((), dtype=bias.dtype, device=x.device)

        def step(owner, cur):
            nonlocal dx, ds, db
            blk = cur[0]
            if x.shape[0] == 0 or blk.shape[0] == 0:
                return None
            dx_h, dy_h, ds_h, db_h = prim.backward(x, blk, scale, bias, G)
            dx = dx + dx_h.to(dt)
            dy = dy_h.to(dt)
            ds = ds + ds_h.reshape(()).to(ds.dtype)
            db = db + db_h.reshape(()).to(db.dtype)
            if owner != me:  # the gradient of Σ_i L_ii over the block's diagonal
                d = min(x.shape[0], blk.shape[0])
                xd, yd = x[:d].to(dt), blk[:d].to(dt)
                dx = torch.cat([dx[:d] + G * scale * yd, dx[d:]])
                dy = torch.cat([dy[:d] + G * scale * xd, dy[d:]])
                ds = ds + G * (xd * yd).sum()
                db = db + G * d
            return [dy]

        (dy,) = ring_pass(cands, [cands.block], [torch.zeros(y.shape, dtype=dt, device=y.device)], step)
        needs = ctx.needs_input_grad
        return (dx.to(x.dtype) if needs[0] else None, dy.to(y.dtype) if needs[1] else None,
                ds if needs[2] else None, db if needs[3] else None, None, None)


def ring_siglip_pairs(x: Tensor, cands: RingCandidates, scale: Tensor, bias: Tensor, *, prim) -> Tensor:
    """The ``"siglip"`` pair sum of this rank's ``x`` against every rank's block of ``cands`` (one part)."""
    if cands.P != 1:
        raise ValueError("the SigLIP pair sum takes candidates of one part")
    if x.dtype != cands.dtype or x.shape[1] != cands.D:
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} does not match the ring candidates (D={cands.D}, "
                         f"{cands.dtype})")
    cands.block = cands.block.contiguous()
    total, token = RingSigLIPFunction.apply(x.contiguous(), cands.block, scale, bias, prim, cands)
    cands.gb._tokens.append(token)
    return total
