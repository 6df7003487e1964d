"""``exchange="ring"`` equals ``exchange="gather"`` and one process on the concatenated batch.

One group of processes per world size (gloo on CPU, spawned on localhost,
uneven local batches) runs every case below; for each case each rank

* computes the single-process loss and gradients on the global batch,
* runs the loss on its own slice with ``exchange="gather"`` and with
  ``exchange="ring"``,
* checks that the ring's values and gradients equal the gather's (a shared
  scalar's gradient: its sum over the ranks, which the two modes may split
  differently between the ranks), and that
  the mean over ranks of the ring losses equals the single-process loss
  (per-anchor values: its anchors' global values), its input gradients / W
  the matching rows of the single-process gradients (DDP's averaging), and
  the mean over ranks of a shared scalar's gradient the single-process one.

Backends: ``reference`` (the composition on the dense core, hop by hop) and
``cpu`` for every case, the interpreted ``triton`` for the CLIP case and one
masked multi-view case only.
While the ring runs, the all-gather of ``contrastive_ops.distributed`` is
replaced by one that fails, and every block the primitive sees is recorded:
every block must be one rank's (one to three views of its local batch),
i.e. no rank ever holds the global candidates.  One case checks that
ranks which disagree on the candidates' shape or dtype get a clear error.
``test_ring_never_holds_the_global_candidates`` measures it at world size 4
(cpu kernels): the largest tensor of a ring step is one rank's block, and
the peak of live tensors is below the gather's and within a W-independent
number of blocks.

The pre-flight check (``distributed.ring_preflight``, through the group's
store with ``CONTRASTIVE_OPS_RING_TIMEOUT``) runs in a group of its own
(``test_ring_preflight``): a rank that does not call the loss in time is named
on the others within the timeout (and raises itself when it calls late),
disagreeing width / dtype / mask is a ValueError on every rank, and many calls
in a row leave only the last check's keys.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from typing import Callable, Dict, List

import pytest
import torch
import torch.distributed as dist

import contrastive_ops as co
from contrastive_ops import distributed as codist
from contrastive_ops.benchmarking.measure import LiveBytes
from contrastive_ops.distributed import GlobalBatch
from contrastive_ops.primitives import siglip_pairs as siglip_mod
from contrastive_ops.primitives import sim_lse as sim_lse_mod
from test_distributed import B, PerRank, S, _materialize, _Skip, close_group, run_case, spawn_ranks

pytestmark = pytest.mark.distributed

SIZES = {2: [3, 2], 3: [2, 4, 1], 4: [2, 1, 3, 2]}
COLLECTIVE_TIMEOUT_S = 45
RUN_TIMEOUT_S = 240


class RCtx:
    def __init__(self, rank: int, world: int, sizes: List[int], backend: str, dtype: torch.dtype):
        self.rank, self.world, self.sizes, self.backend, self.dtype = rank, world, sizes, backend, dtype
        self.group = dist.group.WORLD
        self.n, self.N, self.offset = sizes[rank], sum(sizes), sum(sizes[:rank])
        self.tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)

    def randn(self, *shape, requires_grad=True, seed=0):
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(self.dtype).requires_grad_(requires_grad)

    def scalar(self, v, requires_grad=True):
        return torch.tensor(v, dtype=self.dtype).requires_grad_(requires_grad)

    def close(self, actual, expected, what):
        torch.testing.assert_close(actual, expected, **self.tol, msg=lambda m: f"rank {self.rank}: {what}: {m}")

    def _run(self, fn, args, gb, exchange, kwargs):
        l_args, leaves = _materialize(args, gb)
        seen: List[int] = []
        real_prims = [(m, m.primitive_object) for m in (sim_lse_mod, siglip_mod)]
        real_gather = codist._gather
        if exchange == "ring":
            def recording(real_prim):
                return lambda backend: rec(real_prim(backend))

            def rec(p):

                class Rec:
                    def forward(self, q, k, *a, **kw):
                        seen.append(k.shape[0])
                        return p.forward(q, k, *a, **kw)

                    def backward(self, q, k, *a, **kw):
                        seen.append(k.shape[0])
                        return p.backward(q, k, *a, **kw)
                return Rec()

            def no_gather(*a, **k):
                raise AssertionError("exchange='ring' gathered a tensor")
            for m, real in real_prims:
                m.primitive_object = recording(real)
            codist._gather = no_gather
        try:
            out = fn(*l_args, process_group=self.group, exchange=exchange, **kwargs)
            return out, leaves, seen
        finally:
            for m, real in real_prims:
                m.primitive_object = real
            codist._gather = real_gather

    def check(self, fn: Callable, args, rows=None, block_rows=None, **kwargs):
        """``block_rows``: the rows each rank's candidate block may have (default: 1 to 3 local batches)."""
        gb = GlobalBatch(self.n, self.group, torch.device("cpu"))
        kwargs.setdefault("backend", self.backend)
        g_args, g_leaves = _materialize(args, None)
        try:
            out = fn(*g_args, **kwargs)
        except RuntimeError as e:
            if "cannot run" in str(e):
                raise _Skip(str(e)) from None
            raise
        idx = (rows or (lambda c: torch.arange(c.offset, c.offset + c.n)))(self)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(out.dtype)
        J = 2.0 * out if out.dim() == 0 else (w * out).sum()
        J.backward()
        res = {}
        for exchange in ("gather", "ring"):
            real_gather = codist._gather
            out_r, leaves, seen = self._run(fn, args, gb, exchange, kwargs)
            J_r = 2.0 * out_r if out.dim() == 0 else self.world * (w[idx] * out_r).sum()
            if exchange == "ring":  # the backward must not gather either
                def no_gather(*a, **k):
                    raise AssertionError("exchange='ring' gathered a tensor in the backward")
                codist._gather = no_gather
            try:
                J_r.backward()
            finally:
                codist._gather = real_gather
            res[exchange] = (out_r.detach(), [None if a.grad is None else a.grad.clone() for _, a in leaves], seen)
        # ring == gather (summation order only)
        (o_g, gr_g, _), (o_r, gr_r, seen) = res["gather"], res["ring"]
        self.close(o_r, o_g, "ring value vs gather")
        kinds = [kind for kind, _ in _materialize(args, gb)[1]]
        for i, (kind, a, b) in enumerate(zip(kinds, gr_r, gr_g)):
            if kind == "S":  # a shared scalar: its share per rank may differ, the sum over ranks may not
                a, b = (codist.all_reduce_sum(torch.zeros(()) if t is None else t, self.group) for t in (a, b))
            if a is None or b is None:
                assert a is None and b is None, f"rank {self.rank}: gradient of input {i} only in one mode"
                continue
            self.close(a, b, f"ring grad of input {i} vs gather")
        # ring == one process
        if out.dim() == 0:
            mean = codist.all_reduce_sum(o_r, self.group) / self.world
            self.close(mean, out.detach(), "mean over ranks of the ring loss")
        else:
            self.close(o_r, out.detach()[idx], "ring per-anchor values")
        l_leaves = _materialize(args, gb)[1]
        for i, ((kind, _), (_, b), a) in enumerate(zip(l_leaves, g_leaves, gr_r)):
            if not b.requires_grad:
                continue
            if kind == "B":
                assert a is not None, f"rank {self.rank}: no ring gradient for input {i}"
                self.close(a / self.world, b.grad[self.offset: self.offset + self.n], f"ring grad of input {i}")
            else:
                g = torch.zeros_like(b) if a is None else a
                self.close(codist.all_reduce_sum(g, self.group) / self.world, b.grad, f"ring grad of shared {i}")
        # never the global candidates: every block the kernel saw is one rank's (one or two views)
        calls = codist.all_reduce_sum(torch.tensor([len(seen)]), self.group)
        assert int(calls) > 0, "the ring never called the primitive"
        allowed = block_rows or {p * s for s in self.sizes for p in (1, 2, 3)}
        assert set(seen) <= allowed, f"rank {self.rank}: the primitive saw blocks of {sorted(set(seen))} rows"


CASES: Dict[str, Callable[[RCtx], None]] = {}


def case(name):
    def deco(f):
        CASES[name] = f
        return f
    return deco


@case("similarity_lse")
def _(c):
    c.check(co.similarity_lse, [B(c.randn(c.N, 5)), B(c.randn(c.N, 5, seed=1)), S(c.scalar(1.7))])


@case("info_nce")
def _(c):
    c.check(co.info_nce, [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.2))])


@case("info_nce_targets_sum")
def _(c):
    local = [torch.randperm(n, generator=torch.Generator().manual_seed(r)) for r, n in enumerate(c.sizes)]
    glob = torch.cat([t + sum(c.sizes[:r]) for r, t in enumerate(local)])
    c.check(lambda q, k, tau, tg, **kw: co.info_nce(q, k, tau, targets=tg, reduction="sum", **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.2)), PerRank(glob, local[c.rank])])


@case("info_nce_symmetric_none")
def _(c):
    c.check(co.info_nce, [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.3))], symmetric=True,
            reduction="none", normalize=False)


@case("info_nce_symmetric_hcl")
def _(c):
    c.check(co.info_nce, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.3], symmetric=True,
            hard_negative_beta=0.5, debias_tau_plus=0.1)


@case("info_nce_targets_queue_hcl")
def _(c):
    local = [torch.randperm(n, generator=torch.Generator().manual_seed(r)) for r, n in enumerate(c.sizes)]
    glob = torch.cat([t + sum(c.sizes[:r]) for r, t in enumerate(local)])
    queue = c.randn(3, 6, seed=5, requires_grad=False)
    c.check(lambda q, k, tau, tg, **kw: co.info_nce(q, k, tau, targets=tg, queue=queue, hard_negative_beta=0.4,
                                                    debias_tau_plus=0.1, **kw),
            [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.25)), PerRank(glob, local[c.rank])])


@case("info_nce_targets_queue_margin")
def _(c):
    local = [torch.randperm(n, generator=torch.Generator().manual_seed(r)) for r, n in enumerate(c.sizes)]
    glob = torch.cat([t + sum(c.sizes[:r]) for r, t in enumerate(local)])
    queue = c.randn(3, 6, seed=5, requires_grad=False)
    c.check(lambda q, k, tau, tg, **kw: co.info_nce(q, k, tau, targets=tg, queue=queue, false_negative_margin=0.05,
                                                    **kw),
            [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.25)), PerRank(glob, local[c.rank])])


@case("info_nce_symmetric_margin_hcl")
def _(c):
    c.check(co.info_nce, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.3], symmetric=True,
            hard_negative_beta=0.5, debias_tau_plus=0.1, false_negative_margin=0.0)


@case("clip_loss")
def _(c):
    c.check(co.clip_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(2.5))])


def _two_view_rows(c) -> torch.Tensor:
    local = torch.arange(c.offset, c.offset + c.n)
    return torch.cat([local, local + c.N])


@case("nt_xent")
def _(c):
    c.check(co.nt_xent, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.5))])


@case("nt_xent_none_hcl")
def _(c):
    c.check(co.nt_xent, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.4], reduction="none",
            rows=_two_view_rows, hard_negative_beta=0.7)


@case("nt_xent_margin")
def _(c):
    c.check(co.nt_xent, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.5))],
            false_negative_margin=-0.1)


@case("dcl_loss")
def _(c):
    c.check(co.dcl_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.3))])


@case("dcl_loss_weighted")
def _(c):
    c.check(co.dcl_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.3], weighted=True)


@case("dhel_loss")
def _(c):
    c.check(co.dhel_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.3))])


@case("dhel_loss_no_augs_none")
def _(c):
    c.check(co.dhel_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.3], include_augs=False,
            reduction="none")


def _module_fn(cls, *ctor_args, **ctor_kw):
    """A loss module as a function of the check's keywords (``process_group`` → ``gather_distributed``)."""
    def fn(*tensors, process_group=None, exchange="gather", backend):
        m = cls(*ctor_args, backend=backend, exchange=exchange, gather_distributed=process_group is not None,
                **ctor_kw)
        return m(*tensors)
    return fn


@case("modules")
def _(c):
    c.check(_module_fn(co.nn.ClipLoss), [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(2.5))])
    c.check(_module_fn(co.nn.NTXentLoss, 0.5), [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1))])
    c.check(_module_fn(co.nn.InfoNCELoss, 0.2, symmetric=True), [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1))])
    c.check(_module_fn(co.nn.DCLLoss, 0.2, weighted=True), [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1))])
    c.check(_module_fn(co.nn.DHELLoss, 0.2), [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1))])
    c.check(_module_fn(co.nn.SupConLoss, 0.2), [B(c.randn(c.N, 2, 6)), B(_labels(c))])


def _point_inputs(c, G: int = 5, empty_last: bool = False):
    g = torch.Generator().manual_seed(3001)
    m1, m2 = torch.rand(c.N, G, generator=g) > 0.4, torch.rand(c.N, G, generator=g) > 0.4
    m1[0, :2] = m2[0, :2] = True
    if empty_last:  # the last rank holds no co-masked token
        m1[c.N - c.sizes[-1]:] = False
    S = m1 & m2
    counts = {int(S[sum(c.sizes[:r]): sum(c.sizes[:r + 1])].sum()) for r in range(c.world)}
    return [B(c.randn(c.N, G, 4)), B(c.randn(c.N, G, 4, seed=1)), B(m1), B(m2)], counts


@case("point_token_infonce_batch")
def _(c):
    args, counts = _point_inputs(c)
    c.check(lambda f1, f2, m1, m2, t, **kw: co.point_token_contrast(f1, f2, m1, m2, temperature=t, **kw),
            args + [S(c.scalar(0.2))], negatives="batch", block_rows=counts)


@case("point_token_infonce_batch_rank_without_tokens")
def _(c):
    args, counts = _point_inputs(c, empty_last=True)
    c.check(co.point_token_contrast, args, negatives="batch", temperature=0.3, block_rows=counts)


def _labels(c, classes=3):
    return torch.randint(0, classes, (c.N,), generator=torch.Generator().manual_seed(2001))


@case("supcon_labels")
def _(c):
    c.check(co.supcon_loss, [B(c.randn(c.N, 2, 5)), B(_labels(c)), S(c.scalar(0.2))])


@case("supcon_no_labels_one_none")
def _(c):
    c.check(co.supcon_loss, [B(c.randn(c.N, 3, 5)), None, 0.3], contrast_mode="one", reduction="none")


@case("supcon_labelled_queue")
def _(c):
    q = c.randn(4, 5, seed=9, requires_grad=False)
    qy = torch.tensor([0, 2, 2, 5])
    c.check(lambda f, y, **kw: co.supcon_loss(f, y, 0.2, queue=q, queue_labels=qy, **kw),
            [B(c.randn(c.N, 2, 5)), B(_labels(c))])


@case("mv_infonce")
def _(c):
    c.check(co.mv_infonce, [B(c.randn(c.N, 3, 5)), S(c.scalar(0.2))])


@case("mv_infonce_pairwise_none")
def _(c):
    c.check(co.mv_infonce, [B(c.randn(c.N, 3, 5)), 0.3], variant="pairwise", reduction="none")


@case("mv_dhel")
def _(c):
    c.check(co.mv_dhel, [B(c.randn(c.N, 3, 5)), S(c.scalar(0.2))])


def _view_mask(c, V: int = 3, empty_rank: bool = False) -> torch.Tensor:
    """A global (N, V) view mask with missing views: instance 0 has one present view (a candidate
    that leaves the mean), the last rank's rows have one present view in all (``empty_rank``: none)."""
    m = torch.rand(c.N, V, generator=torch.Generator().manual_seed(4001)) > 0.3
    m[0] = False
    m[0, 1] = True
    if c.N > 1:
        m[1] = True
    last = c.N - c.sizes[-1]
    m[last:] = False
    if not empty_rank:
        m[last, V - 1] = True
    return m


@case("mv_infonce_mask")
def _(c):
    c.check(lambda x, m, t, **kw: co.mv_infonce(x, t, mask=m, **kw),
            [B(c.randn(c.N, 3, 5)), B(_view_mask(c)), S(c.scalar(0.2))])


@case("mv_infonce_mask_none_rank_without_views")
def _(c):
    c.check(lambda x, m, **kw: co.mv_infonce(x, 0.3, mask=m, **kw),
            [B(c.randn(c.N, 3, 5)), B(_view_mask(c, empty_rank=True))], reduction="none")


@case("mv_infonce_pairwise_mask")
def _(c):
    c.check(lambda x, m, t, **kw: co.mv_infonce(x, t, mask=m, variant="pairwise", **kw),
            [B(c.randn(c.N, 3, 5)), B(_view_mask(c)), S(c.scalar(0.25))])


@case("mv_infonce_pairwise_mask_none")
def _(c):
    c.check(lambda x, m, **kw: co.mv_infonce(x, 0.3, mask=m, variant="pairwise", reduction="none", **kw),
            [B(c.randn(c.N, 3, 5)), B(_view_mask(c, empty_rank=True))])


@case("mv_dhel_mask")
def _(c):
    c.check(lambda x, m, t, **kw: co.mv_dhel(x, t, mask=m, **kw),
            [B(c.randn(c.N, 3, 5)), B(_view_mask(c)), S(c.scalar(0.2))])


@case("mv_dhel_mask_sum_rank_without_views")
def _(c):
    c.check(lambda x, m, **kw: co.mv_dhel(x, 0.3, mask=m, reduction="sum", **kw),
            [B(c.randn(c.N, 3, 5)), B(_view_mask(c, empty_rank=True))])


@case("ranks_disagree")
def _(c):
    # A rank with another width or dtype is a ValueError on every rank before any transfer, not a hang.
    D = 5 if c.rank == 0 else 6
    q, k = c.randn(c.n, D), c.randn(c.n, D, seed=1)
    with pytest.raises(ValueError, match="rank 0: parts=1, D=5.*rank 1: parts=1, D=6"):
        co.similarity_lse(q, k, 1.0, process_group=c.group, exchange="ring", backend=c.backend)
    dt = torch.float32 if c.rank == c.world - 1 else torch.float64
    q, k = c.randn(c.n, 4).to(dt), c.randn(c.n, 4, seed=1).to(dt)
    with pytest.raises(ValueError, match="candidate blocks disagree"):
        co.info_nce(q, k, 0.2, process_group=c.group, exchange="ring", backend="reference")


@case("siglip_loss")
def _(c):
    c.check(co.siglip_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(1.5)), S(c.scalar(-2.0))])


# --------------------------------------------------------------------------- processes


# The interpreted Triton backend is slow: small cases (the column LSE travelling with its block; the view mask
# travelling with its block).
TRITON_CASES = {"clip_loss", "mv_dhel_mask"}


def _backends() -> List[str]:
    out = ["reference"]
    for name in ("cpu", "triton"):
        if co.available_backends()[name][0]:
            out.append(name)
    return out


def _dtype_for(backend: str) -> torch.dtype:
    if backend == "reference":
        return torch.float64
    from contrastive_ops import backends

    return torch.float64 if torch.float64 in backends.backend_module(backend).dtypes() else torch.float32


def _worker(rank: int, world: int, port: int, sizes: List[int], backend_names: List[str], outdir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for backend in backend_names:
            for name, fn in CASES.items():
                if backend == "triton" and name not in TRITON_CASES:
                    results[f"{backend}/{name}"] = dict(error="SKIP: interpreted Triton runs one case", seconds=0)
                    continue
                run_case(results, f"{backend}/{name}",
                         lambda: fn(RCtx(rank, world, sizes, backend, _dtype_for(backend))), rank)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        close_group()


def run_group(world: int) -> dict:
    per_rank = spawn_ranks(_worker, world, SIZES[world], BACKENDS, timeout_s=RUN_TIMEOUT_S,
                           what=f"ring run with world size {world}")
    return {k: [pr[k]["error"] for pr in per_rank] for k in per_rank[0]}


BACKENDS = _backends()
_RESULTS: Dict[int, dict] = {}


@pytest.mark.parametrize("name,backend", [(n, b) for b in BACKENDS for n in CASES
                                          if b != "triton" or n in TRITON_CASES])
@pytest.mark.parametrize("world", sorted(SIZES))
def test_ring_equals_gather_and_single_process(world, name, backend):
    if world not in _RESULTS:
        try:
            _RESULTS[world] = run_group(world)
        except Exception as e:  # noqa: BLE001 - a hung or crashed group fails its cases once, not once each
            _RESULTS[world] = e
    if isinstance(_RESULTS[world], Exception):
        raise _RESULTS[world]
    errors = _RESULTS[world][f"{backend}/{name}"]
    if all(e is not None and e.startswith("SKIP: ") for e in errors):
        pytest.skip(errors[0][len("SKIP: "):])
    failed = [f"--- rank {r} ---\n{e}" for r, e in enumerate(errors) if e is not None]
    assert not failed, "\n".join(failed)


# --------------------------------------------------------------------------- one process


_FNS = {
    "similarity_lse": lambda x, y, **kw: co.similarity_lse(x, y, 2.0, **kw),
    "info_nce": lambda x, y, **kw: co.info_nce(x, y, 0.2, **kw),
    "clip_loss": lambda x, y, **kw: co.clip_loss(x, y, 2.0, **kw),
    "nt_xent": lambda x, y, **kw: co.nt_xent(x, y, 0.5, **kw),
    "dcl_loss": lambda x, y, **kw: co.dcl_loss(x, y, 0.3, **kw),
    "dhel_loss": lambda x, y, **kw: co.dhel_loss(x, y, 0.3, **kw),
    "siglip_loss": lambda x, y, **kw: co.siglip_loss(x, y, 2.0, -1.0, **kw),
    "supcon_loss": lambda x, y, **kw: co.supcon_loss(torch.stack([x, y], 1), torch.arange(5) % 2, **kw),
    "mv_infonce": lambda x, y, **kw: co.mv_infonce(torch.stack([x, y], 1), 0.2, **kw),
    "mv_dhel": lambda x, y, **kw: co.mv_dhel(torch.stack([x, y], 1), 0.2, **kw),
    "point_token_contrast": lambda x, y, **kw: co.point_token_contrast(
        x.view(5, 2, 2), y.view(5, 2, 2), torch.ones(5, 2, dtype=torch.bool), torch.ones(5, 2, dtype=torch.bool),
        negatives="batch", **kw),
}


@pytest.mark.parametrize("name", list(_FNS))
def test_exchange_checked_and_ignored_without_group(name):
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for bad in ("all_gather", "Ring", None, 1):
        with pytest.raises(ValueError, match="exchange must be 'gather' or 'ring'"):
            _FNS[name](x, y, backend="reference", exchange=bad)
    for backend in [b for b in BACKENDS if b != "triton"]:
        a = _FNS[name](x, y, backend=backend)
        b = _FNS[name](x, y, backend=backend, exchange="ring")
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [co.nn.InfoNCELoss, co.nn.ClipLoss, co.nn.NTXentLoss, co.nn.DCLLoss,
                                 co.nn.DHELLoss, co.nn.SigLIPLoss, co.nn.SupConLoss, co.nn.MVInfoNCELoss,
                                 co.nn.MVDHELLoss, co.nn.PointTokenContrastLoss])
def test_module_exchange_keyword(cls):
    with pytest.raises(ValueError, match="exchange must be 'gather' or 'ring'"):
        cls(exchange="allgather")
    assert "exchange='ring'" in repr(cls(exchange="ring"))


# --------------------------------------------------------------------------- pre-flight check


PREFLIGHT_TIMEOUT_S = 4.0
PREFLIGHT_SIZES = [2, 3, 1]


def _preflight_consecutive_calls(c):
    """Many ring calls in a row (gather calls between them) keep working and agree with the gather, and the
    store keeps the keys of the last check only."""
    name, store = codist._group_store(c.group)
    q, k = c.randn(c.n, 6), c.randn(c.n, 6, seed=1)
    x, m = c.randn(c.n, 3, 4, seed=2), _view_mask(c)[c.offset: c.offset + c.n]
    for i in range(12):
        a = co.info_nce(q, k, 0.2, process_group=c.group, exchange="gather", backend="reference")
        b = co.info_nce(q, k, 0.2, process_group=c.group, exchange="ring", backend="reference")
        c.close(b, a, f"info_nce call {i}")
        b.backward()
        a = co.mv_dhel(x, 0.3, mask=m, process_group=c.group, exchange="gather", backend="reference")
        b = co.mv_dhel(x, 0.3, mask=m, process_group=c.group, exchange="ring", backend="reference")
        c.close(b, a, f"mv_dhel call {i}")
    dist.barrier()
    last = codist._preflight_calls[name] - 1
    assert last + 1 >= 4 * 12, last  # a batch and a candidates check per ring call at least
    key = lambda call, r: f"{codist._PREFLIGHT_PREFIX}/{call}/{r}"  # noqa: E731
    assert all(store.check([key(last, r)]) for r in range(c.world))
    left = [(call, r) for call in range(last) for r in range(c.world) if store.check([key(call, r)])]
    assert not left, f"keys of finished checks left in the store: {left[:5]}"


def _preflight_disagree(c):
    """A rank with another width, dtype or without the mask: a ValueError on every rank, quickly."""
    x = c.randn(c.n, 3, 4 if c.rank != 1 else 5)
    m = torch.ones(c.n, 3, dtype=torch.bool)
    t0 = time.time()
    with pytest.raises(ValueError, match="rank 0: parts=3, D=4.*rank 1: parts=3, D=5"):
        co.mv_infonce(x, 0.2, mask=m, process_group=c.group, exchange="ring", backend="reference")
    x = c.randn(c.n, 3, 4).to(torch.float32 if c.rank == c.world - 1 else torch.float64)
    with pytest.raises(ValueError, match=f"rank {c.world - 1}: parts=3, D=4, dtype=float32"):
        co.mv_dhel(x, 0.2, mask=m, process_group=c.group, exchange="ring", backend="reference")
    x = c.randn(c.n, 3, 4)
    with pytest.raises(ValueError, match="mask=True.*rank 1: .*mask=False"):
        co.mv_dhel(x, 0.2, mask=None if c.rank == 1 else m, process_group=c.group, exchange="ring",
                   backend="reference")
    assert time.time() - t0 < PREFLIGHT_TIMEOUT_S, "a disagreement waited for the timeout"
    # the ranks are still in step
    co.mv_dhel(x, 0.2, mask=m, process_group=c.group, exchange="ring", backend="reference").backward()


def _preflight_absent_rank(c):
    """The last rank does not call the loss in time: the others raise a RuntimeError naming it within the
    timeout (the group's own collective timeout is far longer); when it calls later, it raises too (the
    others left word in the store) instead of starting the ring, and the ranks are in step again."""
    q, k = c.randn(c.n, 6), c.randn(c.n, 6, seed=1)
    ring = lambda: co.info_nce(q, k, 0.2, process_group=c.group, exchange="ring", backend="reference")  # noqa: E731
    if c.rank == c.world - 1:
        time.sleep(PREFLIGHT_TIMEOUT_S + 4)
        others = ", ".join(str(r) for r in range(c.world - 1))
        with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{others}\] of {c.world} gave up waiting at "
                                               rf"pre-flight check \d+ \(batch\)"):
            ring()
    else:
        t0 = time.time()
        with pytest.raises(RuntimeError, match=rf"rank\(s\) \[{c.world - 1}\] of {c.world} did not reach "
                                               rf"pre-flight check \d+ \(batch\).*within {PREFLIGHT_TIMEOUT_S:g} s"):
            ring()
        took = time.time() - t0
        assert PREFLIGHT_TIMEOUT_S * 0.9 <= took < PREFLIGHT_TIMEOUT_S + 3, took
    dist.barrier()
    a = co.info_nce(q, k, 0.2, process_group=c.group, exchange="gather", backend="reference")
    c.close(ring(), a, "a ring call after the timeout")


def _preflight_collective(c):
    """CONTRASTIVE_OPS_RING_TIMEOUT=0: the descriptors travel in one all-gather (no store keys); the ring
    still equals gather and a disagreement is still a ValueError on every rank."""
    name, store = codist._group_store(c.group)
    before = codist._preflight_calls.get(name, 0)
    os.environ[codist.RING_TIMEOUT_ENV] = "0"
    try:
        q, k = c.randn(c.n, 6), c.randn(c.n, 6, seed=1)
        x, m = c.randn(c.n, 3, 4, seed=2), _view_mask(c)[c.offset: c.offset + c.n]
        a = co.info_nce(q, k, 0.2, process_group=c.group, exchange="gather", backend="reference")
        c.close(co.info_nce(q, k, 0.2, process_group=c.group, exchange="ring", backend="reference"), a, "info_nce")
        a = co.mv_dhel(x, 0.3, mask=m, process_group=c.group, exchange="gather", backend="reference")
        c.close(co.mv_dhel(x, 0.3, mask=m, process_group=c.group, exchange="ring", backend="reference"), a, "mv_dhel")
        y = c.randn(c.n, 3, 4 if c.rank != 1 else 5)
        with pytest.raises(ValueError, match="rank 0: parts=3, D=4.*rank 1: parts=3, D=5"):
            co.mv_infonce(y, 0.2, mask=m, process_group=c.group, exchange="ring", backend="reference")
        assert codist._preflight_calls.get(name, 0) == before, "the store check ran"
    finally:
        os.environ[codist.RING_TIMEOUT_ENV] = str(PREFLIGHT_TIMEOUT_S)


PREFLIGHT_CASES = {"consecutive_calls": _preflight_consecutive_calls, "disagree": _preflight_disagree,
                   "absent_rank": _preflight_absent_rank, "collective": _preflight_collective}


def _preflight_worker(rank: int, world: int, port: int, sizes: List[int], outdir: str):
    torch.set_num_threads(1)
    os.environ[codist.RING_TIMEOUT_ENV] = str(PREFLIGHT_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name, fn in PREFLIGHT_CASES.items():
            run_case(results, name, lambda: fn(RCtx(rank, world, sizes, "reference", torch.float64)), rank)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        close_group()


_PREFLIGHT: Dict[str, list] = {}


@pytest.mark.parametrize("name", list(PREFLIGHT_CASES))
def test_ring_preflight(name):
    if not _PREFLIGHT:
        per_rank = spawn_ranks(_preflight_worker, len(PREFLIGHT_SIZES), PREFLIGHT_SIZES, timeout_s=RUN_TIMEOUT_S,
                               what="ring pre-flight run")
        _PREFLIGHT.update({k: [pr[k]["error"] for pr in per_rank] for k in per_rank[0]})
    failed = [f"--- rank {r} ---\n{e}" for r, e in enumerate(_PREFLIGHT[name]) if e is not None]
    assert not failed, "\n".join(failed)


def test_ring_timeout_setting(monkeypatch):
    monkeypatch.delenv(codist.RING_TIMEOUT_ENV, raising=False)
    assert codist.ring_timeout() == codist.RING_TIMEOUT_DEFAULT_S
    monkeypatch.setenv(codist.RING_TIMEOUT_ENV, "7.5")
    assert codist.ring_timeout() == 7.5
    monkeypatch.setenv(codist.RING_TIMEOUT_ENV, "0")
    assert codist.ring_timeout() == 0  # the all-gather pre-flight
    for bad in ("-1", "inf", "nan", "soon"):
        monkeypatch.setenv(codist.RING_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{codist.RING_TIMEOUT_ENV} must be a number of seconds >= 0"):
            codist.ring_timeout()


# --------------------------------------------------------------------------- memory per rank


MEMORY_SIZES = [300, 257, 256, 211]  # world size 4, uneven
MEMORY_D = 64


def _memory_steps(group, x, y, v, m):
    """One forward + backward per loss; {loss: (peak bytes, largest tensor bytes)}."""
    out = {}
    for name, fn in (("clip_loss", lambda a, b, ex: co.clip_loss(a, b, 10.0, process_group=group, exchange=ex,
                                                                   backend="cpu")),
                     ("mv_infonce_mask", lambda a, b, ex: co.mv_infonce(v, 0.2, mask=m, process_group=group,
                                                                        exchange=ex, backend="cpu"))):
        for ex in ("gather", "ring"):
            xs, ys = x.detach().clone().requires_grad_(True), y.detach().clone().requires_grad_(True)
            v.grad = None
            dist.barrier()
            with LiveBytes() as mb:
                fn(xs, ys, ex).backward()
            out[f"{name}/{ex}"] = (mb.peak, mb.largest)
    return out


def _memory_worker(rank: int, world: int, port: int, sizes: List[int], outdir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        n = sizes[rank]
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(n, MEMORY_D, generator=g), torch.randn(n, MEMORY_D, generator=g)
        v = torch.randn(n, 3, MEMORY_D, generator=g).requires_grad_(True)
        m = torch.rand(n, 3, generator=g) < 0.8
        res = _memory_steps(dist.group.WORLD, x, y, v, m)
    finally:
        close_group()
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


# The ring's peak of live tensors in blocks (the largest rank's candidate block, fp32), whatever W: local
# inputs and their gradients, the current and next visiting block, their accumulators and the core's
# per-hop outputs (measured at W = 4: about 8 for CLIP, 11-13 for masked MV-InfoNCE with 3 views, whose
# hops also carry the view mask and compact the present rows).  The gather's grows as W: all W blocks and
# their gradient (about 12-13 blocks at W = 4).  A ring that kept every visited block would exceed them.
RING_PEAK_BLOCKS = {"clip_loss": 10, "mv_infonce_mask": 14}


def test_ring_never_holds_the_global_candidates():
    """World size 4, the cpu kernels: under the ring no tensor of a rank's step is as large as the gathered
    candidates (the largest is one rank's block), the peak of live tensors is below the gather's and
    within a W-independent number of blocks."""
    if not co.available_backends()["cpu"][0]:
        pytest.skip(co.available_backends()["cpu"][1])
    per_rank = spawn_ranks(_memory_worker, len(MEMORY_SIZES), MEMORY_SIZES, timeout_s=RUN_TIMEOUT_S,
                           what="ring memory run")
    N, n_max = sum(MEMORY_SIZES), max(MEMORY_SIZES)
    for loss, views in (("clip_loss", 1), ("mv_infonce_mask", 3)):
        gathered = views * N * MEMORY_D * 4  # one side's global candidates, fp32
        block = views * n_max * MEMORY_D * 4  # the largest rank's block
        for r, res in enumerate(per_rank):
            g_peak, g_largest = res[f"{loss}/gather"]
            r_peak, r_largest = res[f"{loss}/ring"]
            assert g_largest >= gathered, (loss, r, g_largest, gathered)  # the probe sees the gather
            assert r_largest < gathered / 2, (loss, r, r_largest, gathered)
            assert r_largest <= 2 * block, (loss, r, r_largest, block)
            assert r_peak < g_peak, (loss, r, r_peak, g_peak)
            assert r_peak <= RING_PEAK_BLOCKS[loss] * block, (loss, r, r_peak / block)
