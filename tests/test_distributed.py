"""Global-batch losses under torch.distributed equal one process on the concatenated batch.

One group of processes per world size (gloo on CPU, spawned on localhost) runs
every case below; each rank

* builds the same global batch from a fixed seed and computes the
  single-process loss and gradients on it,
* runs the loss on its own slice with ``process_group=WORLD``,
* checks that the mean over ranks of the losses equals the single-process
  loss (for ``reduction="none"``: that its values are the global values of
  its anchors), that its input gradients divided by the world size (DDP's
  averaging) equal the matching rows of the single-process gradients, and
  that the mean over ranks of a shared scalar's gradient (temperature,
  logit scale) equals the single-process one.

World size 2 uses equal local batches, world size 3 uneven ones (one rank
holds a single sample).  Every collective has a timeout and the parent
bounds the whole run, so a hang fails instead of blocking.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Callable, Dict, List, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import contrastive_ops as co
from contrastive_ops import distributed as codist
from contrastive_ops.distributed import GlobalBatch

pytestmark = pytest.mark.distributed

SIZES = {2: [3, 3], 3: [2, 4, 1]}
COLLECTIVE_TIMEOUT_S = 45
RUN_TIMEOUT_S = 170


# --------------------------------------------------------------------------- harness


class B:
    """A batch tensor: rank r gets rows [offset_r, offset_r + n_r) (dim 0)."""

    def __init__(self, t: torch.Tensor):
        self.t = t


class BL:
    """A sequence of batch tensors (views or crops), each split like ``B``."""

    def __init__(self, ts: List[torch.Tensor]):
        self.ts = ts


class PerRank:
    """A non-differentiable input whose global value is not the concatenation of the local ones
    (info_nce's targets index the local keys)."""

    def __init__(self, global_value: torch.Tensor, local_value: torch.Tensor):
        self.global_value, self.local_value = global_value, local_value


class S:
    """A tensor shared by every rank (temperature, logit scale): not split."""

    def __init__(self, t: torch.Tensor):
        self.t = t


def _fresh(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


def _materialize(args, gb: Optional[GlobalBatch]):
    """Copies of the inputs: global ones (``gb`` None) or this rank's slices."""
    out, leaves = [], []
    for a in args:
        if isinstance(a, B):
            t = _fresh(a.t if gb is None else gb.local(a.t))
            out.append(t)
            leaves.append(("B", t))
        elif isinstance(a, BL):
            ts = [_fresh(x if gb is None else gb.local(x)) for x in a.ts]
            out.append(ts)
            leaves.extend(("B", t) for t in ts)
        elif isinstance(a, PerRank):
            out.append(a.global_value if gb is None else a.local_value)
        elif isinstance(a, S):
            t = _fresh(a.t)
            out.append(t)
            leaves.append(("S", t))
        else:
            out.append(a)
    return out, leaves


class _Skip(Exception):
    """The backend cannot run this loss (a primitive it does not implement)."""


class Ctx:
    def __init__(self, rank: int, world: int, sizes: List[int], backend: str, dtype: torch.dtype):
        self.rank, self.world, self.sizes, self.backend, self.dtype = rank, world, sizes, backend, dtype
        self.group = dist.group.WORLD
        self.n = sizes[rank]
        self.N = sum(sizes)
        self.offset = sum(sizes[:rank])
        self.tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)

    def randn(self, *shape, requires_grad=True, seed=0):
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(self.dtype).requires_grad_(requires_grad)

    def randint(self, high, *shape, seed=0):
        g = torch.Generator().manual_seed(2000 + seed)
        return torch.randint(0, high, shape, generator=g)

    def rand(self, *shape, seed=0):
        g = torch.Generator().manual_seed(3000 + seed)
        return torch.rand(*shape, generator=g)

    def scalar(self, v, requires_grad=True):
        return torch.tensor(v, dtype=self.dtype).requires_grad_(requires_grad)

    def close(self, actual, expected, what):
        torch.testing.assert_close(actual, expected, **self.tol, msg=lambda m: f"rank {self.rank}: {what}: {m}")

    def check(self, fn: Callable, args, rows: Optional[Callable] = None, grad: bool = True, **kwargs):
        """Distributed ``fn`` on this rank's slice against ``fn`` on the global batch.

        ``rows(ctx)``: for a per-anchor output, the global positions of this
        rank's outputs (default: this rank's batch rows).
        """
        gb = GlobalBatch(self.n, self.group, torch.device("cpu"))
        assert (gb.offset, gb.total) == (self.offset, self.N)
        kwargs.setdefault("backend", self.backend)

        g_args, g_leaves = _materialize(args, None)
        try:
            out = fn(*g_args, **kwargs)
        except RuntimeError as e:  # raised by the dispatch on every rank alike, before any collective
            if "cannot run" in str(e):
                raise _Skip(str(e)) from None
            raise
        l_args, l_leaves = _materialize(args, gb)
        out_r = fn(*l_args, process_group=self.group, **kwargs)

        if out.dim() == 0:
            assert out_r.dim() == 0, f"rank {self.rank}: expected a scalar, got shape {tuple(out_r.shape)}"
            mean = codist.all_reduce_sum(out_r, self.group) / self.world
            self.close(mean, out.detach(), "mean over ranks of the loss")
            J, J_r = 2.0 * out, 2.0 * out_r
        else:
            idx = (rows or (lambda c: torch.arange(c.offset, c.offset + c.n)))(self)
            self.close(out_r.detach(), out.detach()[idx], "per-anchor values")
            g = torch.Generator().manual_seed(7)
            w = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
            J, J_r = (w * out).sum(), self.world * (w[idx] * out_r).sum()
        if not grad:
            return
        J.backward()
        J_r.backward()
        for i, ((kind, a), (_, b)) in enumerate(zip(l_leaves, g_leaves)):
            if not a.requires_grad:
                continue
            if kind == "B":
                assert a.grad is not None, f"rank {self.rank}: no gradient for input {i}"
                self.close(a.grad / self.world, b.grad[self.offset: self.offset + self.n], f"grad of input {i}")
            else:
                # A rank whose anchors all leave the mean gives a shared scalar no gradient.
                g = torch.zeros_like(a) if a.grad is None else a.grad
                mean = codist.all_reduce_sum(g, self.group) / self.world
                self.close(mean, b.grad, f"grad of shared input {i}")


# --------------------------------------------------------------------------- cases

CASES: Dict[str, Callable[[Ctx], None]] = {}


def case(name):
    def deco(f):
        CASES[name] = f
        return f

    return deco


def _toy_loss(x: torch.Tensor, temperature, *, backend=None, process_group=None):
    """A loss written only with the gather helpers: rows of x against all rows of the global x."""
    gb = GlobalBatch(x.shape[0], process_group, x.device)
    X = gb.gather(x)
    s = x @ X.T / temperature
    pos = (x * gb.local(X.roll(1, 0))).sum(1) / temperature
    values = torch.logsumexp(s, 1) - pos
    return codist.reduce(values, "mean", process_group)


@case("all_gather_with_grad")
def _(c: Ctx):
    c.check(_toy_loss, [B(c.randn(c.N, 5)), S(c.scalar(0.3))], backend=None)


@case("info_nce")
def _(c: Ctx):
    c.check(co.info_nce, [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.2))])


@case("info_nce_targets_sum")
def _(c: Ctx):
    # Local targets index the local keys; here a permutation inside each rank's block.
    local = [torch.randperm(n, generator=torch.Generator().manual_seed(r)) for r, n in enumerate(c.sizes)]
    glob = torch.cat([t + sum(c.sizes[:r]) for r, t in enumerate(local)])
    c.check(lambda q, k, tau, tg, **kw: co.info_nce(q, k, tau, targets=tg, reduction="sum", **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.2)), PerRank(glob, local[c.rank])])


@case("info_nce_symmetric_none")
def _(c: Ctx):
    c.check(co.info_nce, [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), 0.3], symmetric=True,
            reduction="none", normalize=False)


@case("clip_loss")
def _(c: Ctx):
    c.check(co.clip_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(2.5))])


@case("siglip_loss")
def _(c: Ctx):
    c.check(co.siglip_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(1.5)), S(c.scalar(-2.0))])


def _two_view_rows(c: Ctx) -> torch.Tensor:
    """Global rows of this rank's anchors in a (2N,) view-major output."""
    local = torch.arange(c.offset, c.offset + c.n)
    return torch.cat([local, local + c.N])


@case("nt_xent")
def _(c: Ctx):
    c.check(co.nt_xent, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.5))])


@case("nt_xent_none")
def _(c: Ctx):
    c.check(co.nt_xent, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.4], reduction="none",
            rows=_two_view_rows)


@case("similarity_lse")
def _(c: Ctx):
    c.check(co.similarity_lse, [B(c.randn(c.N, 5)), B(c.randn(c.N, 5, seed=1)), S(c.scalar(1.3))])


def _mask(c: Ctx, V: int, seed: int = 0) -> torch.Tensor:
    m = c.rand(c.N, V, seed=seed) > 0.3
    m[0, :] = True
    m[-1, 1:] = False  # an instance with a single view leaves the mean
    return m


@case("mv_infonce_mask")
def _(c: Ctx):
    c.check(lambda f, tau, m, **kw: co.mv_infonce(f, tau, mask=m, **kw),
            [B(c.randn(c.N, 3, 5)), S(c.scalar(0.2)), B(_mask(c, 3))])


@case("mv_infonce_list_none")
def _(c: Ctx):
    c.check(co.mv_infonce, [BL([c.randn(c.N, 5, seed=s) for s in range(3)]), 0.3], reduction="none")


@case("mv_infonce_pairwise_mask")
def _(c: Ctx):
    c.check(lambda f, tau, m, **kw: co.mv_infonce(f, tau, mask=m, variant="pairwise", **kw),
            [B(c.randn(c.N, 3, 5)), S(c.scalar(0.2)), B(_mask(c, 3, seed=1))])


@case("mv_infonce_pairwise_sum")
def _(c: Ctx):
    c.check(co.mv_infonce, [B(c.randn(c.N, 3, 5)), S(c.scalar(0.3))], variant="pairwise", reduction="sum")


@case("mv_dhel_none")
def _(c: Ctx):
    c.check(co.mv_dhel, [BL([c.randn(c.N, 5, seed=s) for s in range(3)]), S(c.scalar(0.3))], reduction="none")


@case("mv_dhel_mask")
def _(c: Ctx):
    c.check(lambda f, tau, m, **kw: co.mv_dhel(f, tau, mask=m, **kw),
            [B(c.randn(c.N, 3, 5)), S(c.scalar(0.25)), B(_mask(c, 3, seed=2))])


@case("supcon_labels")
def _(c: Ctx):
    c.check(lambda f, y, tau, **kw: co.supcon_loss(f, y, tau, **kw),
            [B(c.randn(c.N, 2, 5)), B(c.randint(3, c.N)), S(c.scalar(0.1))])


@case("supcon_one_none")
def _(c: Ctx):
    # Labels with singletons: anchors without a positive count as 0 and leave the mean.
    y = torch.arange(c.N) // 2
    c.check(lambda f, y, **kw: co.supcon_loss(f, y, 0.2, **kw), [B(c.randn(c.N, 5)), B(y)],
            contrast_mode="one", reduction="none")


@case("supcon_unsupervised_sum")
def _(c: Ctx):
    c.check(lambda f, **kw: co.supcon_loss(f, None, 0.2, **kw), [B(c.randn(c.N, 3, 5))], reduction="sum")


@case("supcon_unsupervised_none")
def _(c: Ctx):
    def rows(c):
        local = torch.arange(c.offset, c.offset + c.n)
        return torch.cat([local + v * c.N for v in range(3)])

    c.check(lambda f, **kw: co.supcon_loss(f, None, 0.2, **kw), [B(c.randn(c.N, 3, 5))], reduction="none", rows=rows)


# Queues: the same (K, D) queue on every rank (a MemoryBank is identical everywhere), not gathered; a
# queue that requires grad is checked like a shared scalar (mean over ranks of its gradient).


@case("info_nce_queue")
def _(c: Ctx):
    c.check(lambda q, k, Q, tau, **kw: co.info_nce(q, k, tau, queue=Q, **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.randn(5, 7, seed=2)), S(c.scalar(0.2))])


@case("info_nce_queue_moco_none")
def _(c: Ctx):
    c.check(lambda q, k, Q, **kw: co.info_nce(q, k, 0.2, queue=Q, in_batch_negatives=False, **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.randn(5, 7, seed=2, requires_grad=False))],
            reduction="none")


@case("nt_xent_queue")
def _(c: Ctx):
    c.check(lambda a, b, Q, tau, **kw: co.nt_xent(a, b, tau, queue=Q, **kw),
            [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.randn(4, 6, seed=2)), S(c.scalar(0.5))])


# Negative shaping (HCL / debiased CL): the negatives of an anchor are the global candidates but its positive.


@case("info_nce_shaped")
def _(c: Ctx):
    c.check(lambda q, k, tau, **kw: co.info_nce(q, k, tau, hard_negative_beta=1.0, debias_tau_plus=0.1, **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.3))])


@case("info_nce_shaped_symmetric_none")
def _(c: Ctx):
    c.check(lambda q, k, tau, **kw: co.info_nce(q, k, tau, symmetric=True, hard_negative_beta=0.5,
                                                debias_tau_plus=0.2, **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.3))], reduction="none")


@case("nt_xent_shaped_queue")
def _(c: Ctx):
    c.check(lambda a, b, Q, tau, **kw: co.nt_xent(a, b, tau, queue=Q, hard_negative_beta=1.0, debias_tau_plus=0.1,
                                                  **kw),
            [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.randn(4, 6, seed=2)), S(c.scalar(0.5))])


# False-negative filter: each local anchor's threshold from its own positive, against the global candidates.


@case("info_nce_margin_queue")
def _(c: Ctx):
    c.check(lambda q, k, Q, tau, **kw: co.info_nce(q, k, tau, queue=Q, false_negative_margin=0.0, **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.randn(5, 7, seed=2)), S(c.scalar(0.3))])


@case("info_nce_margin_symmetric_shaped_none")
def _(c: Ctx):
    c.check(lambda q, k, tau, **kw: co.info_nce(q, k, tau, symmetric=True, hard_negative_beta=0.5,
                                                false_negative_margin=0.05, **kw),
            [B(c.randn(c.N, 7)), B(c.randn(c.N, 7, seed=1)), S(c.scalar(0.3))], reduction="none")


@case("nt_xent_margin_shaped_queue")
def _(c: Ctx):
    c.check(lambda a, b, Q, tau, **kw: co.nt_xent(a, b, tau, queue=Q, debias_tau_plus=0.1, false_negative_margin=0.0,
                                                  **kw),
            [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.randn(4, 6, seed=2)), S(c.scalar(0.5))])


@case("supcon_queue_labels")
def _(c: Ctx):
    yq = c.randint(3, 5, seed=3)
    c.check(lambda f, y, Q, tau, **kw: co.supcon_loss(f, y, tau, queue=Q, queue_labels=yq, **kw),
            [B(c.randn(c.N, 2, 5)), B(c.randint(3, c.N)), S(c.randn(5, 5, seed=4)), S(c.scalar(0.1))])


@case("memory_bank_enqueue")
def _(c: Ctx):
    """enqueue under a process group gathers in rank order: every rank's bank equals one process's bank
    fed the global batches; a loss module with memory_size and gather_distributed equals one process."""
    bank, single = co.nn.MemoryBank(5, 3, with_labels=True), co.nn.MemoryBank(5, 3, with_labels=True)
    for step in range(3):
        x, y = c.randn(c.N, 3, seed=10 + step, requires_grad=False), c.randint(9, c.N, seed=step)
        bank.enqueue(x[c.offset:c.offset + c.n], y[c.offset:c.offset + c.n], process_group=c.group)
        single.enqueue(x, y)
        assert len(bank) == len(single), f"rank {c.rank}: {len(bank)} entries, one process {len(single)}"
        c.close(bank.features, single.features.to(bank.features.dtype), f"step {step}: bank features")
        assert torch.equal(bank.labels, single.labels), f"rank {c.rank}: step {step}: bank labels"
    for make in (lambda **kw: co.nn.InfoNCELoss(0.2, memory_size=5, **kw),
                 lambda **kw: co.nn.InfoNCELoss(0.2, memory_size=5, in_batch_negatives=False, **kw),
                 lambda **kw: co.nn.NTXentLoss(0.5, memory_size=6, **kw),
                 lambda **kw: co.nn.SupConLoss(0.1, memory_size=7, **kw)):
        dmod, smod = make(gather_distributed=True, backend=c.backend), make(backend=c.backend)
        for step in range(3):
            q, k = c.randn(c.N, 4, seed=20 + step), c.randn(c.N, 4, seed=30 + step)
            y = c.randint(3, c.N, seed=40 + step)
            ql = q.detach()[c.offset:c.offset + c.n].requires_grad_(True)
            kl = k.detach()[c.offset:c.offset + c.n].requires_grad_(True)
            if isinstance(smod, co.nn.SupConLoss):
                dl = dmod(torch.stack([ql, kl], 1), y[c.offset:c.offset + c.n])
                sl = smod(torch.stack([q, k], 1), y)
            else:
                dl, sl = dmod(ql, kl), smod(q, k)
            what = f"{type(smod).__name__} step {step}"
            c.close(codist.all_reduce_sum(dl.detach(), c.group) / c.world, sl.detach(), f"{what}: loss")
            dl.backward()
            sl.backward()
            c.close(ql.grad / c.world, q.grad[c.offset:c.offset + c.n], f"{what}: query gradient")
            c.close(dmod.memory.features, smod.memory.features, f"{what}: memory")


def _view_major_rows(views):
    def rows(c):
        local = torch.arange(c.offset, c.offset + c.n)
        return torch.cat([local + v * c.N for v in range(views)])

    return rows


@case("selfcon_labels")
def _(c: Ctx):
    c.check(lambda f, y, tau, **kw: co.selfcon_loss(f, y, tau, **kw),
            [B(c.randn(c.N, 3, 5)), B(c.randint(3, c.N)), S(c.scalar(0.1))])


@case("selfcon_alpha_labels")
def _(c: Ctx):
    c.check(lambda f, y, tau, **kw: co.selfcon_loss(f, y, tau, alpha=0.5, **kw),
            [B(c.randn(c.N, 3, 5)), B(c.randint(3, c.N)), S(c.scalar(0.1))])


@case("selfcon_alpha_none")
def _(c: Ctx):
    y = torch.arange(c.N) // 2  # singletons on the backbone view: its anchors without a positive give 0
    c.check(lambda f, y, **kw: co.selfcon_loss(f, y, 0.2, alpha=0.5, **kw), [B(c.randn(c.N, 3, 5)), B(y)],
            reduction="none", rows=_view_major_rows(3))


@case("selfcon_alpha_unsupervised_sum")
def _(c: Ctx):
    c.check(lambda f, **kw: co.selfcon_loss(f, None, 0.2, alpha=0.5, **kw), [B(c.randn(c.N, 3, 5))],
            reduction="sum")


@case("sepclr")
def _(c: Ctx):
    y = c.randint(2, c.N, seed=4)
    y[0], y[-1] = 0, 1

    def fn(c1, c2, s1, s2, y, tau, **kw):
        return co.sepclr_loss(c1, c2, s1, s2, y, tau=tau, salient_term_beta=3.0, salient_reg_beta=2.0,
                              jem_lambda=1.5, **kw)

    c.check(fn,
            [B(c.randn(c.N, 5, seed=1)), B(c.randn(c.N, 5, seed=2)), B(c.randn(c.N, 4, seed=3)),
             B(c.randn(c.N, 4, seed=5)), B(y), S(c.scalar(0.4))])


@case("cacr")
def _(c: Ctx):
    c.check(lambda f, tp, tn, **kw: co.cacr_loss(f, alpha=0.5, beta=2.0, tau_pos=tp, tau_neg=tn, **kw),
            [B(c.randn(c.N, 3, 5)), S(c.scalar(0.7)), S(c.scalar(1.5))])


@case("cacr_unnormalized_debiased_none")
def _(c: Ctx):
    c.check(lambda f, **kw: co.cacr_loss(f, with_debiased=True, normalize=False, **kw),
            [B(c.randn(c.N, 3, 4))], reduction="none")


def _ages(c: Ctx):
    return 20.0 + c.randint(4, c.N, seed=1).double()


@case("supremix_fused")
def _(c: Ctx):
    c.check(lambda f, y, tau, **kw: co.supremix_loss(f, y, tau, mix_pos=False, use_weight=False, mix_lambda=0.3,
                                                     **kw),
            [B(c.randn(c.N, 2, 5)), B(_ages(c)), S(c.scalar(0.2))])


@case("supremix_fused_lambda_per_anchor_none")
def _(c: Ctx):
    lam = c.rand(2 * c.N).double()
    local = torch.cat([lam[v * c.N + c.offset: v * c.N + c.offset + c.n] for v in range(2)])
    c.check(lambda f, y, lam, **kw: co.supremix_loss(f, y, 0.2, mix_pos=False, use_weight=False, mix_lambda=lam,
                                                     **kw),
            [B(c.randn(c.N, 2, 5)), B(_ages(c)), PerRank(lam, local)], reduction="none", rows=_view_major_rows(2))


@case("supremix_fused_hard_positives")
def _(c: Ctx):
    # integer labels: the hard positives are composed on the kernels too
    c.check(lambda f, y, tau, **kw: co.supremix_loss(f, y, tau, use_weight=False, mix_lambda=0.3, window=3, **kw),
            [B(c.randn(c.N, 2, 5)), B(20 + c.randint(4, c.N, seed=1)), S(c.scalar(0.2))])


@case("supremix_fused_weighted")
def _(c: Ctx):
    # the official weights (label_lse): real pairs and hard negatives with a per-anchor lambda
    lam = c.rand(2 * c.N).double()
    local = torch.cat([lam[v * c.N + c.offset: v * c.N + c.offset + c.n] for v in range(2)])
    c.check(lambda f, y, lam, **kw: co.supremix_loss(f, y, 0.2, mix_pos=False, distance="L2", mix_lambda=lam, **kw),
            [B(c.randn(c.N, 2, 5)), B(_ages(c)), PerRank(lam, local)])


@case("supremix_fused_weighted_hard_positives_none")
def _(c: Ctx):
    # the official defaults but lambda (a float) on integer labels: weights, hard negatives and positives fused
    c.check(lambda f, y, tau, **kw: co.supremix_loss(f, y, tau, mix_lambda=0.3, window=3, **kw),
            [B(c.randn(c.N, 2, 5)), B(20 + c.randint(4, c.N, seed=1)), S(c.scalar(0.2))], reduction="none",
            rows=_view_major_rows(2))


@case("supremix_fused_drawn_lambda")
def _(c: Ctx):
    # the official defaults: λ drawn per pair (counters: global anchor and sample); every rank seeds torch
    # differently, so only rank 0's seed, broadcast, can give the single process's λ (it draws with seed 17)
    def fn(f, y, tau, process_group=None, **kw):
        torch.manual_seed(17 + (0 if process_group is None else 1000 * c.rank))
        return co.supremix_loss(f, y, tau, window=3, process_group=process_group, **kw)

    c.check(fn, [B(c.randn(c.N, 2, 5)), B(20 + c.randint(4, c.N, seed=1)), S(c.scalar(0.2))], reduction="none",
            rows=_view_major_rows(2))


@case("supremix_fused_drawn_lambda_unweighted")
def _(c: Ctx):
    def fn(f, y, tau, process_group=None, **kw):
        torch.manual_seed(5 + (0 if process_group is None else 1000 * c.rank))
        return co.supremix_loss(f, y, tau, mix_pos=False, use_weight=False, process_group=process_group, **kw)

    c.check(fn, [B(c.randn(c.N, 2, 5)), B(_ages(c)), S(c.scalar(0.2))])


def _hydra_args(c: Ctx):
    y1 = c.randint(3, c.N, seed=1)
    posy = y1[torch.randperm(c.N, generator=torch.Generator().manual_seed(5))]
    gate = (c.rand(c.N, 5, seed=2).double() * 0.9 + 0.05).to(c.dtype).requires_grad_(True)
    return [B(c.randn(c.N, 5)), B(c.randn(c.N, 5, seed=1)), B(gate), B(y1), B(posy), S(c.scalar(0.2))]


@case("hydra_filter")
def _(c: Ctx):
    c.check(co.hydra_loss, _hydra_args(c))  # the gated_lse composition (cpu and triton; cuda raises)


@case("hydra_filter_class_none")
def _(c: Ctx):
    c.check(co.hydra_loss, _hydra_args(c), positives="class", reduction="none")


@case("hydra_simlap")
def _(c: Ctx):
    c.check(co.hydra_loss, _hydra_args(c), gating="simlap")


@case("hydra_simlap_class_none")
def _(c: Ctx):
    c.check(co.hydra_loss, _hydra_args(c), gating="simlap", positives="class", reduction="none")


@case("supremix_full_reference")
def _(c: Ctx):
    # hard positives with float labels: the reference only (kernel backends raise "cannot run": skipped)
    c.check(lambda f, y, tau, **kw: co.supremix_loss(f, y, tau, mix_lambda=0.3, window=3, **kw),
            [B(c.randn(c.N, 2, 5)), B(_ages(c)), S(c.scalar(0.5))])


@case("dcl")
def _(c: Ctx):
    c.check(co.dcl_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.2))])


@case("dcl_weighted_none")
def _(c: Ctx):
    c.check(co.dcl_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.2], weighted=True, reduction="none")


@case("dhel")
def _(c: Ctx):
    c.check(co.dhel_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), S(c.scalar(0.3))])


@case("dhel_no_augs_none")
def _(c: Ctx):
    c.check(co.dhel_loss, [B(c.randn(c.N, 6)), B(c.randn(c.N, 6, seed=1)), 0.3], include_augs=False,
            reduction="none")


@case("sinkhorn_knopp")
def _(c: Ctx):
    c.check(co.sinkhorn_knopp, [B(c.randn(c.N, 5, requires_grad=False) * 0.5)], grad=False, epsilon=0.1)


@case("swav_loss")
def _(c: Ctx):
    crops = [c.randn(c.N, 5, seed=s) * 0.5 for s in range(3)]
    c.check(co.swav_loss, [BL(crops), 0.2], epsilon=0.1)


def _point_inputs(c: Ctx, G: int = 5):
    m1, m2 = c.rand(c.N, G, seed=1) > 0.4, c.rand(c.N, G, seed=2) > 0.4
    m1[0, :2] = m2[0, :2] = True
    return [B(c.randn(c.N, G, 4)), B(c.randn(c.N, G, 4, seed=1)), B(m1), B(m2)]


@case("point_token_infonce_batch")
def _(c: Ctx):
    c.check(co.point_token_contrast, _point_inputs(c), negatives="batch", temperature=0.2)


@case("point_token_infonce_batch_rank_without_tokens")
def _(c: Ctx):
    f1, f2, m1, m2 = _point_inputs(c)
    m1.t[c.N - SIZES[c.world][-1]:] = False  # the last rank holds no co-masked token
    c.check(co.point_token_contrast, [f1, f2, m1, m2], negatives="batch", temperature=0.3)


@case("point_token_infonce_cloud")
def _(c: Ctx):
    c.check(co.point_token_contrast, _point_inputs(c), negatives="cloud", temperature=0.2)


@case("point_token_cosine_diag")
def _(c: Ctx):
    c.check(co.point_token_contrast, _point_inputs(c), mode="cosine", pairing="diag")


@case("point_token_cosine_official")
def _(c: Ctx):
    c.check(co.point_token_contrast, _point_inputs(c), mode="cosine", pairing="official")


@case("ddp_module")
def _(c: Ctx):
    """DistributedDataParallel + a loss module with gather_distributed=True equals one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(c.dtype)
    single = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).to(c.dtype)
    single.load_state_dict(model.state_dict())
    ddp = DDP(model)
    x1, x2 = c.randn(c.N, 6, requires_grad=False), c.randn(c.N, 6, seed=1, requires_grad=False)
    for loss_cls in (co.nn.NTXentLoss, co.nn.SupConLoss):
        ddp.zero_grad()
        single.zero_grad()
        kw = dict(backend=c.backend)
        if loss_cls is co.nn.NTXentLoss:
            h = ddp(torch.cat([x1[c.offset:c.offset + c.n], x2[c.offset:c.offset + c.n]]))
            dloss = loss_cls(0.5, gather_distributed=True, **kw)(h[:c.n], h[c.n:])
            hs = single(torch.cat([x1, x2]))
            sloss = loss_cls(0.5, **kw)(hs[:c.N], hs[c.N:])
        else:
            y = torch.arange(c.N) % 2
            x = torch.stack([x1, x2], 1)
            dloss = loss_cls(0.1, gather_distributed=True, **kw)(ddp(x[c.offset:c.offset + c.n]),
                                                               y[c.offset:c.offset + c.n])
            sloss = loss_cls(0.1, **kw)(single(x), y)
        dloss.backward()  # DDP averages the parameter gradients over the ranks
        sloss.backward()
        c.close(codist.all_reduce_sum(dloss.detach(), c.group) / c.world, sloss.detach(), f"{loss_cls.__name__}")
        for (name, p), q in zip(model.named_parameters(), single.parameters()):
            c.close(p.grad, q.grad, f"{loss_cls.__name__}: DDP gradient of {name}")


# PixPro / PixContrast: images are independent except for PixContrast's batch negatives (gathered keys,
# no gradient).  The momentum keys are detached by the losses, so they are passed without grad.


def _pix_inputs(c: Ctx, C: int = 6, H: int = 5, W: int = 7):
    g = torch.Generator().manual_seed(4000)
    w = 0.4 + 0.5 * torch.rand(2, c.N, generator=g, dtype=torch.float64)
    x0 = (1 - w) * torch.rand(2, c.N, generator=g, dtype=torch.float64)
    coords = [torch.stack([x0[v], x0[v] * 0.5, x0[v] + w[v], x0[v] * 0.5 + w[v]], 1) for v in range(2)]
    maps = [c.randn(c.N, C, H, W, seed=40 + i, requires_grad=i < 2) for i in range(4)]
    return [B(m) for m in maps] + [B(coords[0]), B(coords[1])], H * W


def _pix_rows(P: int):
    """Global positions of this rank's (2·n·P,) per-anchor PixContrast values (view-major, image-major)."""
    def rows(c: Ctx):
        return torch.cat([torch.arange(v * c.N * P + c.offset * P, v * c.N * P + (c.offset + c.n) * P)
                          for v in range(2)])
    return rows


@case("pixpro")
def _(c: Ctx):
    args, _ = _pix_inputs(c)
    c.check(lambda *a, **kw: co.pixpro_loss(*a, **kw), args)


@case("pixpro_none")
def _(c: Ctx):
    args, _ = _pix_inputs(c)
    c.check(lambda *a, **kw: co.pixpro_loss(*a, **kw), args, reduction="none")


@case("pixcontrast_image")
def _(c: Ctx):
    args, _ = _pix_inputs(c)
    c.check(lambda *a, **kw: co.pixcontrast_loss(*a, **kw), args + [S(c.scalar(0.3))])


@case("pixcontrast_batch")
def _(c: Ctx):
    args, _ = _pix_inputs(c)
    c.check(lambda *a, **kw: co.pixcontrast_loss(*a, **kw), args + [S(c.scalar(0.3))], negatives="batch")


@case("pixcontrast_batch_none")
def _(c: Ctx):
    args, P = _pix_inputs(c)
    c.check(lambda *a, **kw: co.pixcontrast_loss(*a, 0.3, **kw), args, negatives="batch", reduction="none",
            rows=_pix_rows(P))


# --------------------------------------------------------------------------- processes


# The "sim_lse" primitive with the kernel interface, computed by the dense core: lets the fused compositions
# (and the core's autograd Function) run under a process group on any machine, with or without kernels.
from contrastive_ops.primitives.sim_lse import DenseSimLSE as _DenseSimLSE  # noqa: E402


class _DensePixPosSum:
    """The "pix_pos_sum" primitive with the kernel interface, computed with the dense mask."""

    def forward(self, x, dx, dy, diag, ratio, H, W):
        from contrastive_ops.primitives.pix_pos import pix_pos_sum_reference

        with torch.no_grad():
            return pix_pos_sum_reference(x, dx, dy, diag, ratio, H, W)


class _DensePixPosLSE:
    """The "pix_pos_lse" primitive with the kernel interface, computed densely."""

    def forward(self, q, k, scale, dx, dy, diag, ratio, H, W, batch_negatives, offset):
        from contrastive_ops.primitives.pix_pos import pix_pos_lse_reference

        with torch.no_grad():
            return pix_pos_lse_reference(q, k, scale, dx, dy, diag, ratio, H, W, batch_negatives, offset)

    def backward(self, q, k, scale, dx, dy, diag, ratio, H, W, batch_negatives, offset, lse_pos, lse_all, g_pos,
                 g_all):
        from contrastive_ops.primitives.pix_pos import pix_pos_lse_reference

        with torch.enable_grad():
            qq, ss = q.detach().requires_grad_(True), scale.detach().requires_grad_(True)
            lp, la = pix_pos_lse_reference(qq, k, ss, dx, dy, diag, ratio, H, W, batch_negatives, offset)
            total = torch.where(torch.isfinite(lp), lp * g_pos, 0).sum() + (la * g_all).sum()
            return torch.autograd.grad(total, (qq, ss))


from contrastive_ops.primitives.siglip_pairs import DenseSigLIP as _DenseSigLIP  # noqa: E402  (dense "siglip")


class _DenseSinkhorn:
    """The "sinkhorn" primitive's steps (see ``contrastive_ops.losses.swav``), computed densely."""

    @staticmethod
    def _logits(scores, epsilon):
        return scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32) / epsilon

    def col_lse(self, scores, epsilon, v):
        L = self._logits(scores, epsilon)
        u = torch.zeros(L.shape[0], 1, dtype=L.dtype) if v is None else -torch.logsumexp(L + v, 1, keepdim=True)
        return torch.logsumexp(L + u, 0)

    def codes(self, scores, epsilon, v, normalize):
        X = self._logits(scores, epsilon) + v
        return torch.exp(X - torch.logsumexp(X, 1, keepdim=True) if normalize else X)

    def forward(self, scores, epsilon, iterations):
        from contrastive_ops.primitives.sinkhorn import sinkhorn_steps

        return sinkhorn_steps(self.col_lse, self.codes, scores, epsilon, iterations)


class _DenseSimExpect:
    """The "sim_expect" primitive with the kernel interface, computed densely."""

    def forward(self, q, k, scale, exclude):
        from contrastive_ops.primitives.sim_expect import sim_expect_reference

        with torch.no_grad():
            return sim_expect_reference(q, k, scale, exclude)

    def backward(self, q, k, scale, exclude, lse, mean, grad_lse, grad_mean):
        from contrastive_ops.primitives.sim_expect import sim_expect_reference

        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, scale)]
            lse2, mean2 = sim_expect_reference(*leaves, exclude)
            return torch.autograd.grad((lse2 * grad_lse).sum() + (mean2 * grad_mean).sum(), leaves)


class _DenseGatedLSE:
    """The "gated_lse" primitive with the kernel interface, computed densely."""

    def forward(self, a, w, k, scale, col_start, col_end):
        from contrastive_ops.primitives.gated_lse import gated_lse_reference

        with torch.no_grad():
            return gated_lse_reference(a, w, k, scale, col_start, col_end)

    def backward(self, a, w, k, scale, col_start, col_end, lse, grad_lse):
        from contrastive_ops.primitives.gated_lse import gated_lse_reference

        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (a, w, k, scale)]
            lse2 = gated_lse_reference(*leaves, col_start, col_end)
            return torch.autograd.grad(torch.where(torch.isfinite(lse2), lse2 * grad_lse, 0).sum(), leaves)


class _DenseLabelLSE:
    """The "label_lse" primitive with the kernel interface, computed densely (mixture mode included)."""

    def forward(self, q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix=None):
        from contrastive_ops.primitives.label_lse import label_lse_reference

        with torch.no_grad():
            return label_lse_reference(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal,
                                       mix)

    def backward(self, q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix, lse,
                 grad):
        from contrastive_ops.primitives.label_lse import label_lse_reference

        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (q, k, scale)]
            b = None if mix is None else mix[0].detach().requires_grad_(True)
            mix2 = None if mix is None else (b,) + tuple(mix[1:])
            lse2 = label_lse_reference(*leaves, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal,
                                       mix2)
            J = torch.where(torch.isfinite(lse2), lse2 * grad, 0).sum()
            if mix is None:
                return tuple(torch.autograd.grad(J, leaves)) + (torch.zeros_like(lse),)
            return torch.autograd.grad(J, leaves + [b])


_DENSE_PRIMITIVES = {"sim_lse": _DenseSimLSE(), "siglip": _DenseSigLIP(), "sinkhorn": _DenseSinkhorn(),
                     "sim_expect": _DenseSimExpect()}
_DENSE_PRIMITIVES.update({"pix_pos_sum": _DensePixPosSum(), "pix_pos_lse": _DensePixPosLSE()})
_DENSE_PRIMITIVES["gated_lse"] = _DenseGatedLSE()
_DENSE_PRIMITIVES["label_lse"] = _DenseLabelLSE()
# Ops whose composition needs a primitive the dense stand-in lacks keep the reference.
_DENSE_OPS = {op for op, prims in __import__("contrastive_ops.backends", fromlist=["x"]).OP_PRIMITIVES.items()
              if all(p in _DENSE_PRIMITIVES for p in prims)}


def _use_dense_compositions() -> None:
    """Route every loss to its fused composition with the dense primitives (this process only)."""
    from contrastive_ops import backends

    real_resolve, real_primitive, real_check = backends.resolve, backends.primitive, backends._check_name
    backends._check_name = lambda name, **kw: name if name == "composition" else real_check(name, **kw)
    backends.resolve = lambda backend, *, op, tensors: (
        "composition" if backend == "composition" and op in _DENSE_OPS
        else real_resolve("reference" if backend == "composition" else backend, op=op, tensors=tensors))
    backends.primitive = lambda name, prim: (_DENSE_PRIMITIVES[prim] if name == "composition"
                                             else real_primitive(name, prim))
    real_has = backends.has_primitive
    backends.has_primitive = lambda name, prim: (prim in _DENSE_PRIMITIVES if name == "composition"
                                                 else real_has(name, prim))


def _kernel_backends_for_cpu() -> List[str]:
    """Kernel backends that run on CPU tensors here (the interpreted Triton one is left to its own tests)."""
    out = []
    ok, _ = co.available_backends()["cpu"]
    if ok:
        out.append("cpu")
    return out


def _dtype_for(backend: str) -> torch.dtype:
    if backend in ("reference", "composition"):
        return torch.float64
    from contrastive_ops import backends

    return torch.float64 if torch.float64 in backends.backend_module(backend).dtypes() else torch.float32


def _worker(rank: int, world: int, port: int, sizes: List[int], backend_names: List[str], outdir: str):
    torch.set_num_threads(1)
    _use_dense_compositions()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    only = [o for o in os.environ.get("CONTRASTIVE_OPS_DIST_ONLY", "").split(",") if o]  # debugging aid
    try:
        for backend in backend_names:
            for name, fn in CASES.items():
                if only and not any(o in name for o in only):
                    continue
                run_case(results, f"{backend}/{name}", lambda: fn(Ctx(rank, world, sizes, backend, _dtype_for(backend))),
                         rank)
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        close_group()


def run_case(results: dict, key: str, call: Callable[[], None], rank: int) -> None:
    """Run one case on this rank and record its error (None, "SKIP: ..." or the traceback) and time in
    ``results[key]``; then a barrier keeps the ranks in step even when one failed between collectives."""
    t0 = time.time()
    try:
        call()
        err = None
    except _Skip as e:
        err = f"SKIP: {e}"
    except Exception:  # noqa: BLE001 - reported to the parent
        err = traceback.format_exc()
        print(f"rank {rank}: {key} failed:\n{err}", file=sys.stderr, flush=True)
    results[key] = dict(error=err, seconds=time.time() - t0)
    dist.barrier()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close_group() -> None:
    """Every rank reaches this point before any closes its connections, then the group is destroyed: under
    gloo a rank that tears down while a peer is still finishing its last collective can abort that peer."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable, world: int, *args, timeout_s: float, what: str) -> List[dict]:
    """Spawn ``world`` processes of ``worker(rank, world, port, *args, outdir)`` and return what each rank
    wrote to ``outdir/rank<r>.json``; past ``timeout_s`` the ranks are terminated and ``what`` is named.

    A group in which a rank is killed by a signal is run once more, on a fresh port, saying so on
    stderr: on a loaded 2-core machine gloo has aborted a rank of an otherwise passing group once in a
    full run ("terminate called without an active exception", SIGABRT), which reruns of the file did
    not repeat.  A crash that happens again, an exception in a rank and a timeout fail as before."""
    try:
        return _spawn_ranks_once(worker, world, *args, timeout_s=timeout_s, what=what)
    except mp.ProcessExitedException as e:
        if e.signal_name is None:
            raise
        print(f"{what}: rank {e.error_index} killed by {e.signal_name}; running the group once more",
              file=sys.stderr)
        return _spawn_ranks_once(worker, world, *args, timeout_s=timeout_s, what=what)


def _spawn_ranks_once(worker: Callable, world: int, *args, timeout_s: float, what: str) -> List[dict]:
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.spawn(worker, args=(world, _free_port(), *args, outdir), nprocs=world, join=False)
        deadline = time.time() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.time() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.terminate()
                raise TimeoutError(f"{what} did not finish in {timeout_s} s")
        per_rank = []
        for r in range(world):
            with open(os.path.join(outdir, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return per_rank


def run_group(world: int, sizes: List[int], backend_names: List[str], timeout_s: float = RUN_TIMEOUT_S) -> dict:
    """Spawn ``world`` ranks running every case; return {case: [error of rank r or None]}."""
    per_rank = spawn_ranks(_worker, world, sizes, backend_names, timeout_s=timeout_s,
                           what=f"distributed run with world size {world}")
    return {k: [pr[k]["error"] for pr in per_rank] for k in per_rank[0]}, per_rank


_RESULTS: Dict[int, dict] = {}
# "reference": each loss's dense reference; "composition": its fused composition on the dense
# primitives (through the kernel interface); then the kernel backends that run on CPU here.
BACKENDS = ["reference", "composition"] + _kernel_backends_for_cpu()


def _results(world: int) -> dict:
    if world not in _RESULTS:
        _RESULTS[world] = run_group(world, SIZES[world], BACKENDS)[0]
    return _RESULTS[world]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", sorted(SIZES))
def test_distributed_equals_single_process(world, name, backend):
    key = f"{backend}/{name}"
    results = _results(world)
    if key not in results:
        pytest.skip("not selected by CONTRASTIVE_OPS_DIST_ONLY")
    errors = results[key]
    if all(e is not None and e.startswith("SKIP: ") for e in errors):
        pytest.skip(errors[0][len("SKIP: "):])
    failed = [f"--- rank {r} ---\n{e}" for r, e in enumerate(errors) if e is not None]
    assert not failed, "\n".join(failed)


# --------------------------------------------------------------------------- no process group


def test_gather_helpers_without_group_are_identity():
    x = torch.randn(4, 3, requires_grad=True)
    assert codist.all_gather_with_grad(x, None) is x
    assert codist.world_size(None) == 1 and codist.rank(None) == 0
    gb = GlobalBatch(4, None, x.device)
    assert (gb.offset, gb.total, gb.sizes) == (0, 4, [4])
    v = torch.randn(5)
    torch.testing.assert_close(codist.reduce(v, "mean", None), v.mean())
    torch.testing.assert_close(codist.reduce(v, "sum", None), v.sum())
