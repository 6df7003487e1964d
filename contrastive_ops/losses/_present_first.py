r"""Static-length lists of the present items of a mask, for the fused compositions.

The fused losses run the similarity-LSE core on the present items only (the
views present under ``mask``, the co-masked tokens).  Listing them with
``torch.nonzero`` gives a length that depends on the data: a host
synchronization, and a graph break under ``torch.compile``.  Instead every
item stays in the list, in an order that puts the present ones first::

    order[:P] = the present items, ascending        P = present.sum(), a tensor
    order[P:] = the absent items, ascending
    pos[order[k]] = k                                pos: where each item sits

so ``order[:P]`` is exactly the list ``nonzero`` gives, and column ranges and
exclusions written in those compacted coordinates stay valid.  The callers
give absent anchors an empty column range (``col_start == col_end``): their
LSEs are -inf, which they drop with ``torch.where``, and they get no gradient;
absent candidates lie in no anchor's range, so they enter no row or column
LSE.  The length (``present.numel()``) is static.

Length kept (:func:`kept`).  Under ``torch.compile`` the whole list is passed
to the core.  In eager mode the list is cut after its last present item (at
least one entry): one host read of ``P``.  The absent tail changes no value
and the CPU kernels skip its tiles (row blocks are shared out between threads
by work, and the symmetric Gram path visits only tile pairs with an allowed
entry), but gathering its rows and composing the loss over them still costs:
measured on 2 cores, whole lists take 0–5 % longer for the masked multi-view
losses (N = 2048, V = 4, a quarter of the views missing) and 25–30 % longer for
point-token InfoNCE (B = 128, G = 64, 36 % co-masked).  Setting
``STATIC = True`` passes the whole list in eager mode too (tests use it to run
the static lists through every kernel backend).

Candidates that carry their present rows (``GlobalBatch.candidates(...,
present=...)``, the multi-view losses' view mask): :func:`present_sim_lse`
runs the core on the present rows listed first, the masks given in the whole
stack's positions, one process, gathered or around the ring alike.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._numerics import present_first
from ..distributed import RingCandidates, restrict_to_present
from ..primitives.sim_lse import sim_lse

Tensor = torch.Tensor

# Pass whole static-length lists in eager mode too (see the module docstring).
STATIC = False


def kept(count: Tensor, n: int) -> int:
    """How many entries of a present-first list of length ``n`` (``count`` present) to pass to the core.

    ``n`` under ``torch.compile`` (or with ``STATIC``); in eager mode
    ``max(count, 1)``, read from the tensor (one host synchronization).
    """
    if STATIC or torch.compiler.is_compiling():
        return n
    return max(int(count), 1)


def present_list(present: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(index, pos, count)``: :func:`present_first`'s order cut to :func:`kept` entries."""
    order, pos, count = present_first(present)
    return order[: kept(count, order.numel())], pos, count


def present_sim_lse(q: Tensor, cands, scale: Tensor, *, row_index: Optional[Tensor] = None,
                    col_start: Optional[Tensor] = None, col_end: Optional[Tensor] = None,
                    exclude: Optional[Tensor] = None, want_col: bool = False,
                    backend: str) -> Tuple[Tensor, Optional[Tensor]]:
    """``sim_lse`` of ``q`` against the present rows of ``cands`` only (``GlobalBatch.candidates(...,
    present=...)``), one composition for every exchange.

    The masks are positions in the whole candidate stack (global under a
    process group), as without a mask.  A :class:`~contrastive_ops.distributed.PresentCandidates`
    (one process, or gathered): the present rows listed first (``present_list``: cut in eager mode,
    static under ``torch.compile``) are the core's ``col_index`` and the masks are translated into
    that list (``distributed.restrict_to_present``).  A ring handle: its mask travels with its block
    and each hop does the same on the visiting block (``primitives.ring``).  ``col_lse`` (``want_col``)
    is in the stack's row order, -inf at absent rows.
    """
    if isinstance(cands, RingCandidates):
        if cands.present_rows is None:
            raise ValueError("present_sim_lse takes ring candidates with present rows "
                             "(GlobalBatch.candidates(..., present=...))")
        return sim_lse(q, cands, scale, row_index=row_index, col_start=col_start, col_end=col_end,
                       exclude=exclude, want_col=want_col, backend=backend)
    k, present = cands
    B = q.shape[0] if row_index is None else row_index.shape[0]
    cols, pos, count = present_list(present)
    ex = None if exclude is None else exclude.reshape(exclude.shape[0], -1)
    cs, ce, ex = restrict_to_present(present, pos, count, B, col_start, col_end, ex)
    row, col = sim_lse(q, k, scale, row_index=row_index, col_index=cols, col_start=cs, col_end=ce, exclude=ex,
                       want_col=want_col, backend=backend)
    if want_col:  # list order → stack order (distinct rows: no accumulating backward); absent rows are -inf
        col = col.new_full((present.numel(),), float("-inf")).index_put((cols,), col)
    return row, col
