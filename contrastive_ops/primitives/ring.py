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
        dk_s  += ∂/∂k_s of this hop's pairs   (the accumulator travels with k_s)
    after the last hop dk_s reaches its owner s.

so each rank ends with Σ_r ∂L_r/∂(its rows), what ``all_gather_with_grad``'s
backward gives in ``exchange="gather"`` (``contrastive_ops.distributed``).
Extra memory per rank: two blocks of features (current and next), two
gradient accumulators in the backward, O(B + block rows) LSEs.  Gradient
accumulators are kept in the accumulation dtype (fp32 for fp16/bf16).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._numerics import acc_dtype
from ..distributed import RingCandidates, ring_shift, ring_wait

Tensor = torch.Tensor


class RingSimLSEFunction(torch.autograd.Function):
    """``sim_lse`` of this rank's anchors against every rank's candidate block, passed around the ring.

    Outputs ``(row_lse (B,), col_lse (block rows,) or empty, token)``; ``token``
    is a 0-dim zero that ``GlobalBatch._anchor`` adds to the loss so that the
    backward (a collective) runs on every rank.
    """

    @staticmethod
    def forward(ctx, q, k, scale, col_start, col_end, exclude, want_col, prim, cands):
        gb = cands.gb
        W, r = gb.world_size, gb.rank
        dt = acc_dtype(q.dtype)
        B, D = q.shape
        if k.data_ptr() == q.data_ptr():  # a kernel would take them for one tensor (symmetric Gram)
            k = k.clone()
        row = torch.full((B,), float("-inf"), dtype=dt, device=q.device)
        cur, col = k, (torch.full((k.shape[0],), float("-inf"), dtype=dt, device=q.device) if want_col else None)
        own_col = None
        for h in range(W):
            owner = (r - h) % W
            nxt_owner = (r - h - 1) % W
            if h < W - 1:  # the next block's transfer overlaps this block's compute
                nbuf = torch.empty((cands.rows(nxt_owner), D), dtype=k.dtype, device=k.device)
                reqs = ring_shift([cur], [nbuf], gb.group)
            if B > 0 and cur.shape[0] > 0:
                cs, ce, ex = cands.local_masks(owner, col_start, col_end, exclude)
                rl, cl = prim.forward(q, cur, scale, None, None, cs, ce, ex, want_col)
                row = torch.logaddexp(row, rl)
                if want_col:
                    col = torch.logaddexp(col, cl)
            if want_col:  # this block's column partial goes on with it; after the last hop it is home
                cbuf = torch.empty((cands.rows(nxt_owner),), dtype=dt, device=q.device)
                ring_wait(ring_shift([col], [cbuf], gb.group))
                col = cbuf
            if h < W - 1:
                ring_wait(reqs)
                cur = nbuf
        own_col = col if want_col else row.new_empty(0)
        ctx.prim, ctx.cands, ctx.want_col = prim, cands, want_col
        ctx.save_for_backward(q, k, scale, col_start, col_end, exclude, row, own_col)
        if not want_col:
            ctx.mark_non_differentiable(own_col)
        token = torch.zeros((), dtype=dt, device=q.device)
        return row, own_col, token

    @staticmethod
    def backward(ctx, g_row, g_col, _g_token):
        q, k, scale, col_start, col_end, exclude, row_lse, own_col = ctx.saved_tensors
        prim, cands, want_col = ctx.prim, ctx.cands, ctx.want_col
        gb = cands.gb
        W, r = gb.world_size, gb.rank
        dt = acc_dtype(q.dtype)
        B, D = q.shape
        g_row = torch.zeros_like(row_lse) if g_row is None else g_row.contiguous()
        if want_col:
            g_col = torch.zeros_like(own_col) if g_col is None else g_col.contiguous()
            aux = torch.stack([own_col, g_col.to(own_col.dtype)])  # (2, m): final col LSE and its gradient
        dq = torch.zeros((B, D), dtype=dt, device=q.device)
        dscale = torch.zeros((), dtype=scale.dtype, device=q.device)
        cur = k
        dk = torch.zeros(k.shape, dtype=dt, device=k.device)
        empty = row_lse.new_empty(0)
        for h in range(W):
            owner = (r - h) % W
            nxt_owner = (r - h - 1) % W
            if h < W - 1:
                nm = cands.rows(nxt_owner)
                nbuf = torch.empty((nm, D), dtype=k.dtype, device=k.device)
                send, recv = [cur], [nbuf]
                if want_col:
                    naux = torch.empty((2, nm), dtype=aux.dtype, device=aux.device)
                    send.append(aux)
                    recv.append(naux)
                reqs = ring_shift(send, recv, gb.group)
            if B > 0 and cur.shape[0] > 0:
                cs, ce, ex = cands.local_masks(owner, col_start, col_end, exclude)
                c_lse, c_g = (aux[0].contiguous(), aux[1].contiguous()) if want_col else (empty, empty)
                dq_h, dk_h, ds_h = prim.backward(q, cur, scale, None, None, cs, ce, ex, row_lse, c_lse, g_row, c_g)
                dq += dq_h.to(dt)
                dk += dk_h.to(dt)
                dscale = dscale + ds_h.reshape(()).to(dscale.dtype)
            # the block's gradient accumulator goes on with it; after the last hop it is home
            dbuf = torch.empty((cands.rows(nxt_owner), D), dtype=dt, device=k.device)
            ring_wait(ring_shift([dk], [dbuf], gb.group))
            dk = dbuf
            if h < W - 1:
                ring_wait(reqs)
                cur = nbuf
                if want_col:
                    aux = naux
        needs = ctx.needs_input_grad
        return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
                dscale if needs[2] else None, None, None, None, None, None, None)


def ring_sim_lse(q: Tensor, cands: RingCandidates, scale: Tensor, *, row_index: Optional[Tensor],
                 col_index: Optional[Tensor], col_start: Optional[Tensor], col_end: Optional[Tensor],
                 exclude: Optional[Tensor], want_col: bool, prim):
    """``sim_lse`` of this rank's anchors against a :class:`RingCandidates` handle (arguments as ``sim_lse``,
    masks in global candidate positions; ``prim`` the ``"sim_lse"`` primitive object that computes each
    hop).  Returns ``(row_lse, col_lse of this rank's block or None)``."""
    if col_index is not None:
        raise NotImplementedError("col_index is not supported with exchange='ring' (the candidates are "
                                  "never gathered); select candidates with col_start/col_end/exclude")
    if row_index is not None:
        q = q.index_select(0, row_index.long())
    if q.dtype != cands.dtype or q.shape[1] != cands.D:
        raise ValueError(f"anchors {tuple(q.shape)} {q.dtype} do not match the ring candidates "
                         f"(D={cands.D}, {cands.dtype})")
    row, col, token = RingSimLSEFunction.apply(q.contiguous(), cands.block.contiguous(), scale.reshape(()),
                                               col_start, col_end, exclude, want_col, prim, cands)
    cands.gb._tokens.append(token)
    return row, (col if want_col else None)
