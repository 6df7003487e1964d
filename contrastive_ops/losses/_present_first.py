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
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor

# Pass whole static-length lists in eager mode too (see the module docstring).
STATIC = False


def present_first(present: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(order, pos, count)`` of a bool vector: present items first, each group in ascending order.

    ``order`` (n,) int64 lists the items, ``pos`` (n,) int64 is its inverse
    (``pos[order] = arange(n)``), ``count`` the 0-dim int64 number of present
    items.  O(n), no sort and no host synchronization.
    """
    p = present.reshape(-1).long()
    n = p.numel()
    count = p.sum()
    before = torch.cumsum(p, 0) - p  # present items before item x
    ar = torch.arange(n, device=p.device)
    pos = torch.where(p.bool(), before, count + ar - before)  # absent: after all present ones
    order = torch.zeros_like(pos).scatter(0, pos, ar)
    return order, pos, count


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
