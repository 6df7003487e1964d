r"""Gradient-carrying gathers for global-batch losses under torch.distributed.

Semantics (SPEC "Distributed")
------------------------------
Every loss takes ``process_group=None``.  With a process group, each rank
passes its *local* batch; the candidates (keys, other views, labels, masks) are
all-gathered with gradient, and each rank's loss covers *its own anchors*
against the *global* batch.  Write ``L`` for the single-process loss on the
concatenation (in rank order) of the local batches and ``L_r`` for rank r's
loss.  The contract is::

    mean_r L_r = L                                        (values)
    (1/W) · grad_r(x_r) = ∂L/∂x_r                          (after DDP-style averaging)

Why the backward of the gather *sums* over ranks.  Rank r's loss depends on
the local rows of every rank through the gathered tensor ``G``.  Autograd on
rank r produces ∂L_r/∂G for all rows; the backward of :func:`all_gather_with_grad`
all-reduces (sums) that gradient and returns this rank's slice, so rank s gets

    grad_s(x_s) = Σ_r ∂L_r/∂x_s = W · ∂(mean_r L_r)/∂x_s = W · ∂L/∂x_s.

DDP then averages parameter gradients over the W ranks (factor 1/W), which
gives exactly ∂L/∂θ.  A scalar shared by the ranks (a temperature tensor, a
logit scale) is not gathered: its gradient on rank r is ∂L_r/∂τ, whose mean
over ranks is ∂L/∂τ.

Reductions.  For ``"mean"`` each rank returns ``W · Σ_{local anchors} ℓ / n``
where ``n`` is the *global* number of anchors that count, so the mean over
ranks is the global mean also when local batch sizes differ (with equal sizes
and every anchor counting this is the local mean).  ``"sum"`` returns
``W · Σ_local ℓ``; ``"none"`` returns this rank's anchors only.

Uneven local batch sizes are supported: the local sizes are all-gathered first
(one small collective and a host synchronization per call), every gather pads
to the largest size for the collective and cuts the padding away.

``process_group=None`` means no distribution (every helper then returns its
input); gathers happen before the backend is called, so every kernel backend
takes part unchanged.

Exchange modes (SPEC "Scale-out: ring exchange")
------------------------------------------------
``GlobalBatch(..., exchange="gather")`` all-gathers the candidates as above.
``exchange="ring"`` never builds them: :meth:`GlobalBatch.candidates` returns
a :class:`RingCandidates` handle on this rank's block, and the primitives that
accept one (``primitives.sim_lse``, ``primitives.ring``) pass the blocks rank
to rank with ``batch_isend_irecv`` (``W − 1`` hops), merging each hop's partial
LSEs online.  A loss is written once against ``gb.candidates(...)``; the two
modes only differ in what that returns.  Global candidate indices (the
``col_start``/``col_end``/``exclude`` of ``sim_lse``) mean the same in both
modes: for ``gb.candidates(a, b)`` position ``p·total + offset_r + i`` is row
``i`` of part ``p`` on rank ``r`` (view-major, as ``cat([gather(a), gather(b)])``).

Pre-flight check of the ring (:func:`ring_preflight`).  Before any collective
of a ring call the ranks exchange small descriptors through the process
group's c10d store (local rows for ``GlobalBatch``; parts, width, dtype, rows,
requires_grad and mask for each ``RingCandidates``), waiting at most
``CONTRASTIVE_OPS_RING_TIMEOUT`` seconds (default 300), not the group's own
timeout (30 min by default).  A rank that never arrives (it skipped the loss,
or called it with ``exchange="gather"``) is a ``RuntimeError`` naming it on
every waiting rank (and on itself, should it arrive later: the ranks that gave
up leave that in their keys); descriptors that disagree are a ``ValueError`` on
every rank.  Each check is numbered per group (the ranks make the same calls in the
same order), and a rank deletes its key of the previous check once every rank
has reached the current one, so the store holds at most two checks' keys.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from typing import Dict, List, NamedTuple, Optional

import torch

from . import _checks

Tensor = torch.Tensor


def _dist():
    import torch.distributed as dist

    return dist


def check_group(process_group) -> None:
    """Raise a clear error when a process group is given but torch.distributed is not usable."""
    if process_group is None:
        return
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group was given but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")


def world_size(process_group) -> int:
    """Number of ranks in ``process_group`` (1 for ``None``)."""
    if process_group is None:
        return 1
    return _dist().get_world_size(process_group)


def rank(process_group) -> int:
    """This process's rank inside ``process_group`` (0 for ``None``)."""
    if process_group is None:
        return 0
    return _dist().get_rank(process_group)


def gather_sizes(n: int, process_group, device) -> List[int]:
    """The local sizes ``n`` of every rank, in rank order (``[n]`` for ``None``)."""
    if process_group is None:
        return [n]
    W = world_size(process_group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(W)]
    _dist().all_gather(out, mine, group=process_group)
    return [int(s.item()) for s in out]


def _gather(t: Tensor, process_group, sizes: List[int]) -> Tensor:
    """All-gather ``t`` along dim 0 with per-rank sizes ``sizes`` (no autograd)."""
    n_max = max(sizes)
    send = t.detach().contiguous()
    if send.shape[0] < n_max:
        pad = send.new_zeros((n_max - send.shape[0],) + tuple(send.shape[1:]))
        send = torch.cat([send, pad])
    bufs = [torch.empty_like(send) for _ in sizes]
    _dist().all_gather(bufs, send, group=process_group)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's rows.  Backward: sum the gradient over ranks, keep this rank's rows."""

    @staticmethod
    def forward(ctx, t, process_group, sizes):
        ctx.group = process_group
        ctx.offset = sum(sizes[: rank(process_group)])
        ctx.n = t.shape[0]
        return _gather(t, process_group, sizes)

    @staticmethod
    def backward(ctx, grad):
        g = grad.contiguous().clone()
        _dist().all_reduce(g, op=_dist().ReduceOp.SUM, group=ctx.group)
        return g[ctx.offset: ctx.offset + ctx.n], None, None


def all_gather_with_grad(t: Tensor, process_group, sizes: Optional[List[int]] = None) -> Tensor:
    """Concatenate ``t`` of every rank along dim 0, differentiably.

    The backward all-reduces (sums) the gradient of the gathered tensor and
    returns this rank's slice (see the module docstring for why this is the
    right factor under DDP's averaging).  Local sizes may differ between
    ranks; pass ``sizes`` (from :func:`gather_sizes`) to skip gathering them
    again.  ``process_group=None`` returns ``t`` itself.

    Every rank must call it in the same order, and either all or none of the
    ranks' inputs must require grad (the backward is a collective too).
    """
    if process_group is None:
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], process_group, t.device)
    if not t.requires_grad:
        return _gather(t, process_group, sizes)
    return _AllGatherWithGrad.apply(t, process_group, sizes)


def all_gather_nograd(t: Tensor, process_group, sizes: Optional[List[int]] = None) -> Tensor:
    """Concatenate ``t`` (labels, masks: any dtype, bool included) of every rank along dim 0."""
    if process_group is None:
        return t
    if sizes is None:
        sizes = gather_sizes(t.shape[0], process_group, t.device)
    if t.dtype == torch.bool:
        return _gather(t.to(torch.uint8), process_group, sizes).bool()
    return _gather(t, process_group, sizes)


def all_reduce_sum(t: Tensor, process_group) -> Tensor:
    """Sum of ``t`` over the ranks (a new tensor, no autograd); ``t`` itself for ``None``."""
    if process_group is None:
        return t
    out = t.detach().clone()
    _dist().all_reduce(out, op=_dist().ReduceOp.SUM, group=process_group)
    return out


def all_reduce_lse(lse: Tensor, process_group) -> Tensor:
    """Element-wise LSE over the ranks of a local LSE tensor (no autograd); ``lse`` itself for ``None``."""
    if process_group is None:
        return lse
    dist = _dist()
    m = lse.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=process_group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = torch.exp(lse - m)
    dist.all_reduce(s, op=dist.ReduceOp.SUM, group=process_group)
    return m + torch.log(s)


def global_rows(n: int, process_group, device) -> int:
    """The number of rows over the ranks, each passing ``n`` local ones (a host synchronization)."""
    if process_group is None:
        return n
    return int(all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=device), process_group).item())


def reduce(values: Tensor, reduction: str, process_group, count: Optional[Tensor] = None) -> Tensor:
    """Reduce this rank's per-anchor ``values`` so that the mean over ranks is the global reduction.

    ``count`` is the number of this rank's anchors that count for ``"mean"``
    (default ``values.numel()``); it is summed over the ranks.  Without a
    process group this is :func:`contrastive_ops._checks.reduce`.
    """
    if process_group is None:
        return _checks.reduce(values, reduction, count)
    check_group(process_group)
    if reduction == "none":
        return values
    W = world_size(process_group)
    total = values.sum()
    if reduction == "sum":
        return total * W
    if count is None:
        count = torch.tensor(values.numel(), device=values.device)
    n_global = all_reduce_sum(count.detach().to(device=values.device, dtype=total.dtype).reshape(()), process_group)
    return total * W / n_global.clamp_min(1)


EXCHANGES = ("gather", "ring")


def check_exchange(exchange) -> str:
    """``exchange`` must be ``"gather"`` or ``"ring"`` (ValueError otherwise)."""
    if not isinstance(exchange, str) or exchange not in EXCHANGES:
        raise ValueError(f"exchange must be 'gather' or 'ring', got {exchange!r}")
    return exchange


def uses_ring(exchange, process_group) -> bool:
    """Whether a call runs the ring: ``exchange="ring"`` (checked) with a process group of more than one rank."""
    check_exchange(exchange)
    if exchange != "ring" or process_group is None:
        return False
    check_group(process_group)
    return world_size(process_group) > 1


def _peer(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` in ``group`` (what ``P2POp`` takes)."""
    dist = _dist()
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def ring_shift(send: List[Tensor], recv: List[Tensor], process_group, tag: int = 0):
    """Post ``send`` to the next rank and ``recv`` from the previous one (``batch_isend_irecv``).

    Returns the requests; call :func:`ring_wait` on them.  Tensor ``t`` of
    ``send`` pairs with tensor ``t`` of ``recv`` (tag ``tag + t``), so several
    tensors can travel in one step; transfers in flight at the same time take
    different ``tag`` ranges (backends that ignore tags match them by the
    order of posting, which is the same on every rank).  Needs two ranks or more.
    """
    dist = _dist()
    W, r = world_size(process_group), rank(process_group)
    nxt, prv = _peer(process_group, (r + 1) % W), _peer(process_group, (r - 1) % W)
    ops = []
    for t, x in enumerate(send):
        ops.append(dist.P2POp(dist.isend, x.contiguous(), nxt, process_group, tag + t))
    for t, x in enumerate(recv):
        ops.append(dist.P2POp(dist.irecv, x, prv, process_group, tag + t))
    return dist.batch_isend_irecv(ops) if ops else []


def ring_wait(reqs) -> None:
    for q in reqs:
        q.wait()


RING_TIMEOUT_ENV = "CONTRASTIVE_OPS_RING_TIMEOUT"
RING_TIMEOUT_DEFAULT_S = 300.0
_PREFLIGHT_PREFIX = "contrastive_ops/ring_preflight"
_GAVE_UP = "gave up waiting"  # the descriptor a rank leaves when its wait expired
_preflight_calls: Dict[str, int] = {}  # per process group (by name): the number of the next check


def ring_timeout() -> float:
    """Seconds the ring's pre-flight check waits for the other ranks (``CONTRASTIVE_OPS_RING_TIMEOUT``,
    read at every call; default 300).  0: no bounded wait of its own — the descriptors travel in one
    all-gather of the group (see :func:`ring_preflight`)."""
    raw = os.environ.get(RING_TIMEOUT_ENV, "").strip()
    if not raw:
        return RING_TIMEOUT_DEFAULT_S
    try:
        t = float(raw)
    except ValueError:
        t = float("nan")
    if not (t >= 0 and math.isfinite(t)):
        raise ValueError(f"{RING_TIMEOUT_ENV} must be a number of seconds >= 0 (0: no bounded wait), got {raw!r}")
    return t


def _group_store(process_group):
    """``(name, store)`` of ``process_group``: its name and its c10d store (the one
    ``init_process_group`` / ``new_group`` made, which every backend has)."""
    from torch.distributed import distributed_c10d as c10d

    dist = _dist()
    pg = dist.group.WORLD if process_group is None else process_group
    return c10d._get_process_group_name(pg), c10d._get_process_group_store(pg)


def _delete(store, key: str) -> None:
    try:
        store.delete_key(key)
    except RuntimeError:  # a store without deletion (FileStore): the key stays
        pass


def ring_preflight(process_group, kind: str, desc: dict) -> List[dict]:
    """Every rank's ``desc`` (a small JSON-able dict), exchanged through the group's store with a bounded wait.

    Called at the same point of a ring call by every rank, before any collective.  Waits at most
    :func:`ring_timeout` seconds for the other ranks; on expiry raises ``RuntimeError`` naming the
    ranks that did not arrive and the check (its number in this group and ``kind``).  Ranks at
    different kinds of check are a ``ValueError``.  Returns the descriptors in rank order.

    Cost: each rank makes about four requests to the store (set, wait, read all W keys, delete), so the
    store's server handles O(W) requests and O(W²) descriptor bytes per check (measured on gloo over
    TCP on a 2-core machine: 0.4, 0.6, 0.9 and 2.1 ms per check at W = 2, 4, 8 and 16).  For worlds
    where that load matters, ``CONTRASTIVE_OPS_RING_TIMEOUT=0`` exchanges the descriptors in one
    all-gather of the group instead (``all_gather_object``: O(W) bytes per rank through the backend's
    own collectives), with the same checks but the group's own timeout for a missing rank.
    """
    W, r = world_size(process_group), rank(process_group)
    timeout = ring_timeout()
    if timeout == 0:
        out = [None] * W
        _dist().all_gather_object(out, dict(desc, kind=kind), group=process_group)
        return _check_kinds(out, kind, "an all-gather of the descriptors")
    name, store = _group_store(process_group)
    call = _preflight_calls.get(name, 0)
    _preflight_calls[name] = call + 1
    keys = [f"{_PREFLIGHT_PREFIX}/{call}/{i}" for i in range(W)]
    store.set(keys[r], json.dumps(dict(desc, kind=kind)))
    try:
        store.wait(keys, datetime.timedelta(seconds=timeout))
    except RuntimeError:  # DistStoreError (a RuntimeError): the wait expired
        missing = [i for i, k in enumerate(keys) if not store.check([k])]
        if missing:
            # The key stays (the other waiting ranks count this rank as arrived) but says it gave up, so a
            # late rank raises too instead of starting the ring.
            store.set(keys[r], json.dumps(dict(kind=_GAVE_UP, missing=missing)))
            raise RuntimeError(
                f"exchange='ring': rank(s) {missing} of {W} did not reach pre-flight check {call} ({kind}) of "
                f"process group {name!r} within {timeout:g} s ({RING_TIMEOUT_ENV}); every rank must call the "
                f"loss the same number of times with exchange='ring' and the same arguments") from None
    if call > 0:  # every rank reached this check, so each is done reading the previous one
        _delete(store, f"{_PREFLIGHT_PREFIX}/{call - 1}/{r}")
    raw = store.multi_get(keys) if W > 1 else [store.get(keys[0])]
    out = [json.loads(v.decode() if isinstance(v, (bytes, bytearray)) else v) for v in raw]
    kinds = [d.get("kind") for d in out]
    gave_up = [i for i, k in enumerate(kinds) if k == _GAVE_UP]
    if gave_up:
        raise RuntimeError(f"exchange='ring': rank(s) {gave_up} of {W} gave up waiting at pre-flight check {call} "
                           f"({kind}) of process group {name!r} before this rank arrived ({RING_TIMEOUT_ENV}); every "
                           f"rank must call the loss the same number of times with exchange='ring'")
    return _check_kinds(out, kind, f"pre-flight check {call}")


def _check_kinds(out: List[dict], kind: str, where: str) -> List[dict]:
    """``out`` (every rank's descriptor) if all ranks are at the same kind of check, else a ValueError."""
    kinds = [d.get("kind") for d in out]
    if any(k != kind for k in kinds):
        lines = "; ".join(f"rank {i}: {k}" for i, k in enumerate(kinds))
        raise ValueError(f"exchange='ring': the ranks are at different steps of {where} ({lines}); "
                         f"every rank must call the loss with the same arguments")
    return out


class PresentCandidates(NamedTuple):
    """A candidate stack of which only some rows take part (``GlobalBatch.candidates(..., present=...)``
    without a ring): ``rows`` (M, D), ``present`` (M,) bool, both global (gathered) or this process's."""

    rows: Tensor
    present: Tensor


def restrict_to_present(present: Tensor, pos: Tensor, count: Tensor, B: int, col_start: Optional[Tensor],
                        col_end: Optional[Tensor], exclude: Optional[Tensor]):
    """Candidate masks over a stack's rows turned into masks over its present rows listed first.

    ``present`` (M,) bool, ``pos``/``count`` from ``present_first(present)``; ``col_start``/``col_end``
    (B,) and ``exclude`` (B, E) are positions in the stack (0..M).  Returns ``(col_start, col_end,
    exclude)`` (int32, contiguous) in the present-first order, for ``sim_lse`` with
    ``col_index = order``: the range ``[start, end)`` becomes the range of the present rows inside it
    (the present rows before a position, counted), a missing ``col_end`` the present count (the
    absent rows, listed after the present ones, lie in no range), an excluded present row its place
    in the list and an excluded absent row nothing (-1).
    """
    M = present.numel()
    p = present.reshape(-1).long()
    below = torch.cat([p.new_zeros(1), torch.cumsum(p, 0)])  # present rows before position x, x in 0..M
    out = []
    for t in (col_start, col_end):
        out.append(None if t is None else below[t.long().clamp(0, M)].to(torch.int32).contiguous())
    if out[1] is None:
        out[1] = count.reshape(1).expand(B).to(torch.int32).contiguous()
    if exclude is None:
        out.append(None)
    else:
        e = exclude.long()
        inside = (e >= 0) & (e < M)
        at = e.clamp(0, max(M - 1, 0))
        keep = inside & present.reshape(-1)[at] if M else inside
        out.append(torch.where(keep, pos[at] if M else e, torch.full_like(e, -1)).to(torch.int32).contiguous())
    return tuple(out)


class RingCandidates:
    """This rank's block of a view-major candidate stack, for a ring exchange (never gathered).

    ``parts`` are local (n, D) tensors; the global stack they stand for is
    ``cat([gather(parts[0]), gather(parts[1]), ...])`` and ``block`` is this
    rank's ``cat(parts)`` (``P·n`` rows).  ``present`` (optional: one (n,)
    bool per part, or a (P, n) bool tensor) marks the rows that take part;
    ``present_rows`` (``P·n`` uint8, 1 = present) travels with the block, and
    each hop restricts the candidates to the visiting block's present rows
    (:func:`restrict_to_present`), so global positions keep their meaning.
    On creation the ranks compare a descriptor (parts, width, dtype, rows,
    requires_grad, mask) through the group's store (:func:`ring_preflight`,
    a bounded wait), so a mismatch or a missing rank is a clear error on
    every rank instead of a hang of the point-to-point transfers.
    """

    def __init__(self, gb: "GlobalBatch", parts, present=None):
        self.gb = gb
        self.parts = tuple(parts)
        if not self.parts:
            raise ValueError("candidates needs at least one tensor")
        for p in self.parts:
            if p.dim() != 2 or p.shape[0] != gb.n:
                raise ValueError(f"ring candidates must be ({gb.n}, D) tensors (this rank's rows), got "
                                 f"{tuple(p.shape)}")
            if p.dtype != self.parts[0].dtype or p.shape[1] != self.parts[0].shape[1]:
                raise ValueError("ring candidates' parts must share dtype and width")
        self.P = len(self.parts)
        self.D = self.parts[0].shape[1]
        self.dtype = self.parts[0].dtype
        self.device = self.parts[0].device
        self.block = self.parts[0] if self.P == 1 else torch.cat(self.parts)
        self.present_rows = None
        if present is not None:
            pm = torch.stack(list(present)) if isinstance(present, (list, tuple)) else present
            if pm.dtype != torch.bool or tuple(pm.shape) not in ((self.P, gb.n), (self.P * gb.n,)):
                raise ValueError(f"ring candidates' present rows must be bool of shape ({self.P}, {gb.n}), got "
                                 f"{pm.dtype} {tuple(pm.shape)}")
            self.present_rows = pm.reshape(-1).to(device=self.device, dtype=torch.uint8).contiguous()
        self._check_ranks_agree()

    def _check_ranks_agree(self) -> None:
        mine = dict(parts=self.P, D=self.D, dtype=str(self.dtype).replace("torch.", ""), rows=self.gb.n,
                    requires_grad=bool(self.block.requires_grad), mask=self.present_rows is not None)
        rows = ring_preflight(self.gb.group, "candidates", mine)
        same = ("parts", "D", "dtype", "requires_grad", "mask")
        bad = [r for r, t in enumerate(rows) if any(t[k] != rows[0][k] for k in same) or t["rows"] != self.gb.sizes[r]]
        if bad:
            def desc(t):
                return (f"parts={t['parts']}, D={t['D']}, dtype={t['dtype']}, rows={t['rows']}, "
                        f"requires_grad={t['requires_grad']}, mask={t['mask']}")
            lines = "; ".join(f"rank {r}: {desc(t)}" for r, t in enumerate(rows))
            raise ValueError(f"exchange='ring': the ranks' candidate blocks disagree ({lines})")

    def rows(self, owner: int) -> int:
        """Rows of rank ``owner``'s block."""
        return self.P * self.gb.sizes[owner]

    def _below(self, x: Tensor, owner: int) -> Tensor:
        """How many rows of ``owner``'s block have a global position < ``x`` (int64)."""
        n, off, T = self.gb.sizes[owner], self.gb.offsets[owner], self.gb.total
        c = torch.zeros_like(x)
        for p in range(self.P):
            c = c + (x - (p * T + off)).clamp(0, n)
        return c

    def local_masks(self, owner: int, col_start: Optional[Tensor], col_end: Optional[Tensor],
                    exclude: Optional[Tensor]):
        """Global ``col_start``/``col_end``/``exclude`` as positions in ``owner``'s block (int32).

        The map from a block's rows to global positions is increasing, so a
        global range ``[start, end)`` is a range of the block too.
        """
        out = []
        for t in (col_start, col_end):
            out.append(None if t is None else self._below(t.long(), owner).to(torch.int32).contiguous())
        if exclude is None:
            out.append(None)
        else:
            e = exclude.long()
            n, off, T = self.gb.sizes[owner], self.gb.offsets[owner], self.gb.total
            p = torch.div(e, T, rounding_mode="floor")
            w = e - p * T - off
            ok = (e >= 0) & (p < self.P) & (w >= 0) & (w < n)
            out.append(torch.where(ok, p * n + w, torch.full_like(e, -1)).to(torch.int32).contiguous())
        return tuple(out)


class GlobalBatch:
    """Where this rank's ``n`` local rows sit in the concatenated global batch.

    ``sizes`` (per rank), ``offset`` (first global row of this rank), ``total``
    (global batch size), and gathers that reuse the sizes::

        gb = GlobalBatch(z.shape[0], process_group, z.device)
        Z = gb.gather(z)              # (total, D), with gradient
        y = gb.gather_nograd(labels)  # (total,)
        loss = gb.reduce(values, reduction)

    With ``process_group=None`` it describes a single process (offset 0,
    total n): the gathers and selections return their input and ``reduce`` is
    the plain reduction, so a composition written with it serves both cases.
    """

    def __init__(self, n: int, process_group, device, exchange: str = "gather"):
        check_exchange(exchange)
        check_group(process_group)
        self.group = process_group
        self.n = n
        self.world_size = world_size(process_group)
        self.rank = rank(process_group)
        if exchange == "ring" and self.world_size > 1:
            # the ring's first step: the sizes through the store, with a bounded wait (no collective yet)
            self.sizes = [int(d["n"]) for d in ring_preflight(process_group, "batch", dict(n=int(n)))]
        else:
            self.sizes = gather_sizes(n, process_group, device)
        self.offset = sum(self.sizes[: self.rank])
        self.total = sum(self.sizes)
        self.offsets = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        # "ring" only means something with more than one rank; otherwise it is ignored.
        self.ring = exchange == "ring" and self.world_size > 1
        self._gathered: List[Tensor] = []
        self._tokens: List[Tensor] = []  # zero outputs of ring Functions (see _anchor)

    def _keep(self, g: Tensor) -> Tensor:
        if g.requires_grad:
            self._gathered.append(g)
        return g

    def _anchor(self, out: Tensor) -> Tensor:
        """``out`` plus 0·(every gathered tensor): the backward of each gather (a collective) then runs
        on every rank, also where this rank's anchors happen not to use a gathered tensor."""
        for g in self._gathered:
            out = out + g.sum().to(out.dtype) * 0
        for t in self._tokens:  # exactly 0, in the graph of a ring Function whose backward is a collective
            out = out + t.to(out.dtype)
        return out

    def candidates(self, *parts: Tensor, dtype: Optional[torch.dtype] = None, present=None,
                   stack: Optional[Tensor] = None):
        """The global candidate stack ``cat([gather(p) for p in parts])`` (cast to ``dtype`` after the
        gather, if given) for the primitives.

        ``exchange="gather"``: that tensor (``parts[0]`` itself for one part
        without a process group; ``stack``, this process's ``cat(parts)`` in
        ``dtype``, itself when given, so a kernel sees anchors and candidates
        as one tensor).  ``exchange="ring"``: a :class:`RingCandidates` handle
        on this rank's block, which ``primitives.sim_lse`` runs around the
        ring; global indices mean the same in both modes.

        ``present`` (a (P, n) bool tensor or one (n,) bool per part: the rows
        that take part): ``"gather"`` returns :class:`PresentCandidates` (the
        stack and its gathered rows' mask), ``"ring"`` a handle whose mask
        travels with its block; ``losses._present_first.present_sim_lse``
        takes either.
        """
        if self.ring:
            return RingCandidates(self, [p if dtype is None else p.to(dtype) for p in parts], present)
        if self.group is None and stack is not None:
            out = stack
        else:
            if len(parts) == 1:
                out = self.gather(parts[0])
            else:  # one collective for every part: (P, n, D) gathered along dim 1, view-major
                out = self.gather(torch.stack(parts), dim=1).reshape(-1, parts[0].shape[-1])
            out = out if dtype is None else out.to(dtype)
        if present is None:
            return out
        pm = torch.stack(list(present)) if isinstance(present, (list, tuple)) else present
        return PresentCandidates(out, self.gather_nograd(pm.reshape(len(parts), self.n), dim=1).reshape(-1))

    def gather(self, t: Tensor, dim: int = 0) -> Tensor:
        """All ranks' ``t`` concatenated along ``dim`` (this rank's rows there), with gradient."""
        if self.group is None:
            return t
        if dim == 0:
            return self._keep(all_gather_with_grad(t, self.group, self.sizes))
        return self._keep(all_gather_with_grad(t.transpose(0, dim), self.group, self.sizes).transpose(0, dim))

    def gather_nograd(self, t: Tensor, dim: int = 0) -> Tensor:
        """All ranks' ``t`` (labels, masks) concatenated along ``dim``."""
        if dim == 0 or self.group is None:
            return all_gather_nograd(t, self.group, self.sizes)
        return all_gather_nograd(t.transpose(0, dim), self.group, self.sizes).transpose(0, dim)

    def local(self, t: Tensor, *, dim: int = 0) -> Tensor:
        """This rank's rows of a global tensor (``t.narrow(dim, offset, n)``)."""
        if self.group is None:
            return t
        return t.narrow(dim, self.offset, self.n)

    def local_anchors(self, t: Tensor, groups: int = 1) -> Tensor:
        """This rank's entries of a view-major ``(groups·total, ...)`` tensor, as ``(groups·n, ...)``.

        E.g. NT-Xent's per-anchor values (2N,) = [view 1; view 2] give this
        rank's [view 1 local; view 2 local].
        """
        if self.group is None:
            return t
        rest = tuple(t.shape[1:])
        return t.reshape((groups, self.total) + rest).narrow(1, self.offset, self.n).reshape((groups * self.n,) + rest)

    def anchor_index(self, groups: int, device) -> Tensor:
        """Global positions (int64, ``(groups·n,)``) of this rank's anchors in a view-major ``(groups·total)`` stack."""
        base = torch.arange(groups, device=device)[:, None] * self.total + self.offset
        return (base + torch.arange(self.n, device=device)[None, :]).reshape(-1)

    def reduce(self, values: Tensor, reduction: str, counted: Optional[Tensor] = None, *,
               count: Optional[Tensor] = None) -> Tensor:
        """:func:`reduce` of this rank's per-anchor ``values``.

        ``counted`` (bool, like ``values``) marks the anchors that count for
        the mean; by default all do, and the global count (``groups·total``
        for ``groups·n`` local values) needs no collective.  ``count`` (a
        0-dim tensor, instead of ``counted``) is this rank's share of the
        mean's denominator when it is not a number of anchors (e.g. pairs).
        """
        if count is None and counted is not None:
            count = counted.sum()
        if self.group is None:
            return reduce(values, reduction, None, count)
        if count is not None or reduction != "mean":
            out = reduce(values, reduction, self.group, count)
        else:
            n_global = values.numel() * self.total // self.n
            out = values.sum() * (self.world_size / n_global)
        return self._anchor(out)

    def mean_from_sum(self, total: Tensor) -> Tensor:
        """A sum over this rank's ``n`` rows turned into this rank's share of the global mean over rows."""
        if self.group is None:
            return total / self.n
        return self._anchor(total * (self.world_size / self.total))
