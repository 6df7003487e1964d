"""co.GradCache: the step's parameter gradients equal the plain step's.

The plain step forwards the same chunks in order with grad, concatenates the
embeddings and backpropagates ``loss_fn`` once. Both run in float64 from the
same seed on copies of the same models, with dropout (the RNG restore makes
the masks equal), BatchNorm (buffers updated once per chunk), a learnable
temperature or logit scale owned by the loss, shared and separate encoders,
tensor / dict / tuple inputs and chunk sizes that do not divide the batch.

Under DDP (2 gloo processes, uneven local batches): the gradients after the
step equal the plain DDP step's and the single-process step's on the
concatenated batch, the gradient all-reduce runs once per step (counted with a
communication hook), and ``process_group`` losses work inside ``loss_fn``.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import sys
import traceback
from typing import Callable, Dict, List, NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import contrastive_ops as co
from contrastive_ops import distributed as codist
from test_distributed import COLLECTIVE_TIMEOUT_S, spawn_ranks

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- models and the plain step


class Tower(nn.Module):
    """A small MLP encoder; optional dropout and BatchNorm."""

    def __init__(self, d_in: int = 5, d_out: int = 4, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        layers: List[nn.Module] = [nn.Linear(d_in, 8)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(8))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(8, d_out))
        self.net = nn.Sequential(*layers).to(DT)

    def forward(self, x):
        return self.net(x)


class MaskedTower(Tower):
    """Takes two tensors, as a text encoder takes ids and an attention mask: ``model(x, mask)``."""

    def forward(self, x, mask):
        return self.net(x * mask.unsqueeze(-1).to(x.dtype))


def _chunks(x, c: int):
    n = (next(iter(x.values())) if isinstance(x, dict) else x[0] if isinstance(x, tuple) else x).shape[0]
    for s in range(0, n, c):
        if isinstance(x, dict):
            yield {k: v[s:s + c] for k, v in x.items()}
        elif isinstance(x, tuple):
            yield tuple(v[s:s + c] for v in x)
        else:
            yield x[s:s + c]


def _call(m, x):
    return m(**x) if isinstance(x, dict) else m(*x) if isinstance(x, tuple) else m(x)


def plain_step(models, loss_fn, inputs, chunk_size, **loss_kwargs):
    """Forward the same chunks in order with grad, concatenate, one backward of ``loss_fn``."""
    models = list(models) if isinstance(models, (list, tuple)) else [models] * len(inputs)
    embs = [torch.cat([_call(m, x) for x in _chunks(inp, chunk_size)]) for m, inp in zip(models, inputs)]
    loss = loss_fn(*embs, **loss_kwargs)
    loss.backward()
    return loss.detach()


class Setup(NamedTuple):
    models: object  # a module or a list of modules
    loss_fn: Callable
    params: Dict[str, torch.Tensor]  # every parameter whose gradient is compared


def _compare(make: Callable[[], Setup], inputs, chunk_size: int, **loss_kwargs):
    """GradCache and the plain step from the same seed on identical copies; returns the GradCache setup."""
    torch.manual_seed(11)
    a = make()
    torch.manual_seed(11)
    b = make()
    torch.manual_seed(5)
    la = co.GradCache(a.models, a.loss_fn, chunk_size=chunk_size).cache(*inputs, **loss_kwargs)
    after_a = torch.rand(4)
    torch.manual_seed(5)
    lb = plain_step(b.models, b.loss_fn, inputs, chunk_size, **loss_kwargs)
    after_b = torch.rand(4)

    assert la.dim() == 0 and not la.requires_grad and la.grad_fn is None
    torch.testing.assert_close(la, lb, **TOL)
    assert a.params.keys() == b.params.keys()
    for name in a.params:
        ga, gb = a.params[name].grad, b.params[name].grad
        assert ga is not None and gb is not None, name
        torch.testing.assert_close(ga, gb, **TOL, msg=lambda m: f"gradient of {name}: {m}")
    assert any(g.grad.abs().sum() > 0 for g in a.params.values())
    # The generator ends where the plain step leaves it (after every chunk's forward and the loss).
    torch.testing.assert_close(after_a, after_b)
    return a, b


def _named(prefix: str, m: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": p for k, p in m.named_parameters()}


def _x(n: int, d: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --------------------------------------------------------------------------- one process


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_simclr_shared_encoder_with_dropout(chunk_size, backend):
    """One encoder for both views, dropout in it; chunk sizes that divide 10, do not, and exceed it."""

    def make():
        m = Tower(dropout=0.3)
        return Setup(m, lambda z1, z2: co.nt_xent(z1, z2, 0.5, backend=backend), _named("m", m))

    _compare(make, [_x(10), _x(10, seed=1)], chunk_size)


def test_dropout_masks_differ_between_chunks_and_steps():
    """The RNG restore is what makes the dropout test pass: without it the second pass draws other masks."""
    torch.manual_seed(0)
    m = Tower(dropout=0.5)
    x = _x(6)
    torch.manual_seed(1)
    first = m(x)
    second = m(x)
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("chunk_size", [3, 8, 100])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_clip_separate_encoders_learnable_logit_scale(chunk_size, backend):
    """Two towers with dropout; the logit scale lives in ``loss_fn`` and gets its gradient from step (2)."""

    def make():
        img, txt = Tower(d_in=5, dropout=0.2), Tower(d_in=3, dropout=0.1)
        log_scale = nn.Parameter(torch.tensor(2.0, dtype=DT))

        def loss_fn(i, t):
            return co.clip_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), log_scale.exp(), backend=backend)

        return Setup([img, txt], loss_fn, {**_named("img", img), **_named("txt", txt), "log_scale": log_scale})

    _compare(make, [_x(9), _x(9, d=3, seed=1)], chunk_size)


def test_info_nce_module_owns_the_temperature_and_inputs_differ_in_length():
    """``InfoNCELoss(learnable_temperature=True)`` as ``loss_fn``; 6 queries against 12 keys (hard negatives)."""

    def make():
        q, k = Tower(), Tower()
        crit = co.nn.InfoNCELoss(0.1, learnable_temperature=True, backend="reference").to(DT)
        return Setup([q, k], crit, {**_named("q", q), **_named("k", k), **_named("loss", crit)})

    a, _ = _compare(make, [_x(6), _x(12, seed=1)], 4)
    assert a.loss_fn.log_temperature.grad.abs() > 0


def test_loss_that_draws_random_numbers():
    """A loss with its own dropout: computed once (step 2) in both steps, and the generator ends after it."""

    def make():
        m = Tower(dropout=0.2)
        return Setup(m, lambda a, b: co.nt_xent(F.dropout(a, 0.3), b, 0.5, backend="reference"), _named("m", m))

    _compare(make, [_x(7), _x(7, seed=1)], 3)


def test_loss_kwargs_are_passed_to_the_loss():
    def make():
        m = Tower()
        return Setup([m, m], lambda q, k, targets: co.info_nce(q, k, 0.2, targets=targets, backend="reference"),
                     _named("m", m))

    _compare(make, [_x(5), _x(8, seed=1)], 2, targets=torch.tensor([7, 0, 3, 3, 1]))


def test_without_randomness_equals_the_full_batch_step():
    torch.manual_seed(0)
    m = Tower()
    full = copy.deepcopy(m)
    x1, x2 = _x(7), _x(7, seed=1)
    loss = co.GradCache(m, lambda a, b: co.nt_xent(a, b, backend="reference"), chunk_size=3)(x1, x2)
    ref = co.nt_xent(full(x1), full(x2), backend="reference")
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    for (name, p), q in zip(m.named_parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("kind", ["dict", "tuple"])
def test_dict_and_tuple_inputs_split_together(kind):
    """``model(**x)`` for a dict, ``model(*x)`` for a tuple; every tensor of the input is split along dim 0."""
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    x = _x(8)
    inp = {"x": x, "mask": mask} if kind == "dict" else (x, mask)

    def make():
        txt, img = MaskedTower(dropout=0.2), Tower(d_in=3)
        return Setup([txt, img], lambda t, i: co.clip_loss(t, i, 3.0, backend="reference"),
                     {**_named("txt", txt), **_named("img", img)})

    _compare(make, [inp, _x(8, d=3, seed=1)], 3)


def test_batchnorm_buffers_updated_once_per_chunk():
    """BatchNorm: gradients equal, and the running statistics end as after the plain step (not doubled)."""

    def make():
        m = Tower(batchnorm=True, dropout=0.1)
        return Setup(m, lambda a, b: co.nt_xent(a, b, 0.3, backend="reference"), _named("m", m))

    a, b = _compare(make, [_x(10), _x(10, seed=1)], 4)
    for (name, ba), bb in zip(a.models.named_buffers(), b.models.buffers()):
        torch.testing.assert_close(ba, bb, **TOL, msg=lambda m: f"buffer {name}: {m}")
    assert int(a.models.net[1].num_batches_tracked) == 6  # 3 chunks per view, 2 views


def test_gradients_accumulate_like_backward():
    """Like ``loss.backward()``, the step adds to existing ``.grad`` (gradient accumulation over steps)."""
    torch.manual_seed(0)
    m = Tower()
    gc = co.GradCache(m, lambda a, b: co.nt_xent(a, b, backend="reference"), chunk_size=4)
    gc(_x(6), _x(6, seed=1))
    once = [p.grad.clone() for p in m.parameters()]
    gc(_x(6), _x(6, seed=1))
    for p, g in zip(m.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, **TOL)


class _SyncRecorder(Tower):
    """Records, per forward with grad, whether it ran inside ``no_sync()`` (the DDP interface)."""

    def __init__(self):
        super().__init__()
        self.syncing, self.calls = True, []

    @contextlib.contextmanager
    def no_sync(self):
        old, self.syncing = self.syncing, False
        try:
            yield
        finally:
            self.syncing = old

    def forward(self, x):
        if torch.is_grad_enabled():
            self.calls.append(self.syncing)
        return super().forward(x)


def test_no_sync_on_every_chunk_but_the_last_of_each_model():
    shared = _SyncRecorder()
    co.GradCache(shared, lambda a, b: co.nt_xent(a, b, backend="reference"), chunk_size=2)(_x(5), _x(5, seed=1))
    assert shared.calls == [False] * 5 + [True]  # 3 + 3 chunks, only the very last synchronizes
    a, b = _SyncRecorder(), _SyncRecorder()
    co.GradCache([a, b], lambda x, y: co.clip_loss(x, y, 2.0, backend="reference"), chunk_size=2)(_x(5), _x(5, seed=1))
    assert a.calls == [False, False, True] and b.calls == [False, False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_dropout_rng_restored():
    """Dropout on a CUDA model draws from the CUDA generator: its state is saved and restored per chunk."""
    dev = torch.device("cuda")

    def make():
        m = Tower(dropout=0.3).to(dev)
        return Setup(m, lambda z1, z2: co.nt_xent(z1, z2, 0.5, backend="reference"), _named("m", m))

    _compare(make, [_x(10).to(dev), _x(10, seed=1).to(dev)], 3)


# --------------------------------------------------------------------------- bad input


def _loss(a, b):
    return co.nt_xent(a, b, backend="reference")


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, "4", None, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        co.GradCache(Tower(), _loss, chunk_size=chunk_size)


def test_bad_models_and_loss_fn():
    with pytest.raises(ValueError, match="models"):
        co.GradCache([], _loss, chunk_size=2)
    with pytest.raises(ValueError, match="models"):
        co.GradCache([Tower(), "not a module"], _loss, chunk_size=2)
    with pytest.raises(ValueError, match="loss_fn"):
        co.GradCache(Tower(), None, chunk_size=2)


def test_wrong_number_of_models():
    gc = co.GradCache([Tower(), Tower(), Tower()], _loss, chunk_size=2)
    with pytest.raises(ValueError, match="models has 3 modules but cache.. got 2 inputs"):
        gc(_x(4), _x(4, seed=1))


def test_inputs_of_different_lengths():
    gc = co.GradCache([MaskedTower(), Tower()], _loss, chunk_size=2)
    with pytest.raises(ValueError, match=r"inputs\[0\].*same length"):
        gc({"x": _x(4), "mask": torch.ones(3, dtype=torch.bool)}, _x(4))
    with pytest.raises(ValueError, match=r"inputs\[0\].*same length"):
        gc((_x(4), torch.ones(5, dtype=torch.bool)), _x(4))
    with pytest.raises(ValueError, match=r"inputs\[1\] has no rows"):
        co.GradCache(Tower(), _loss, chunk_size=2)(_x(4), _x(0))
    with pytest.raises(ValueError, match="at least one input"):
        co.GradCache(Tower(), _loss, chunk_size=2)()
    with pytest.raises(TypeError, match=r"inputs\[1\]"):
        co.GradCache(Tower(), _loss, chunk_size=2)(_x(4), [[1.0] * 5] * 4)


@pytest.mark.parametrize("bad", [
    lambda a, b: co.nt_xent(a, b, reduction="none", backend="reference"),
    lambda a, b: co.nt_xent(a, b, backend="reference").reshape(1),
    lambda a, b: 1.0,
])
def test_loss_fn_must_return_a_scalar(bad):
    m = Tower()
    with pytest.raises(ValueError, match="loss_fn must return a 0-dim tensor"):
        co.GradCache(m, bad, chunk_size=2)(_x(4), _x(4, seed=1))
    assert all(p.grad is None for p in m.parameters())


def test_loss_fn_detached_from_the_embeddings():
    with pytest.raises(ValueError, match="does not require grad"):
        co.GradCache(Tower(), lambda a, b: torch.tensor(1.0), chunk_size=2)(_x(4), _x(4, seed=1))


def test_model_must_return_a_tensor():
    class Pair(Tower):
        def forward(self, x):
            return {"emb": super().forward(x)}

    with pytest.raises(TypeError, match="must return a tensor"):
        co.GradCache(Pair(), _loss, chunk_size=2)(_x(4), _x(4, seed=1))


# --------------------------------------------------------------------------- DDP, 2 gloo processes

SIZES = [5, 3]  # uneven local batches: 3 and 2 chunks of 2 rows
CHUNK = 2
RUN_TIMEOUT_S = 120


def _global(seed: int, d: int = 5) -> torch.Tensor:
    return _x(sum(SIZES), d, seed)


def _counting_hook(counter: List[int]):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        counter[0] += 1
        return default_hooks.allreduce_hook(state, bucket)

    return hook


def _close(actual, expected, what, rank):
    torch.testing.assert_close(actual, expected, **TOL, msg=lambda m: f"rank {rank}: {what}: {m}")


def _ddp_simclr(rank: int, world: int):
    """Shared DDP encoder, nt_xent over the global batch: GradCache == plain DDP step == one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    lo, n = sum(SIZES[:rank]), SIZES[rank]
    x1, x2 = _global(0), _global(1)
    torch.manual_seed(0)
    base = Tower()
    single, plain_m, gc_m = (copy.deepcopy(base) for _ in range(3))
    plain, gc = DDP(plain_m), DDP(gc_m)
    calls_plain, calls_gc = [0], [0]
    plain.register_comm_hook(dist.group.WORLD, _counting_hook(calls_plain))
    gc.register_comm_hook(dist.group.WORLD, _counting_hook(calls_gc))

    def loss_fn(z1, z2, group=dist.group.WORLD):
        return co.nt_xent(z1, z2, 0.5, process_group=group, backend="reference")

    for step in range(2):  # the second step runs after DDP has rebuilt its buckets
        for m in (single, plain, gc):
            m.zero_grad()
        calls_plain[0] = calls_gc[0] = 0
        ref = loss_fn(single(x1), single(x2), group=None)
        ref.backward()
        h = plain(torch.cat([x1[lo:lo + n], x2[lo:lo + n]]))  # one DDP forward per backward
        lp = loss_fn(h[:n], h[n:])
        lp.backward()
        lg = co.GradCache(gc, loss_fn, chunk_size=CHUNK)(x1[lo:lo + n], x2[lo:lo + n])
        assert calls_plain[0] >= 1
        assert calls_gc[0] == calls_plain[0] == 1, (calls_gc[0], calls_plain[0])
        _close(lg, lp.detach(), f"step {step}: loss vs plain DDP", rank)
        _close(codist.all_reduce_sum(lg.clone(), dist.group.WORLD) / world, ref.detach(),
               f"step {step}: mean loss vs one process", rank)
        for (name, p), q, s in zip(gc_m.named_parameters(), plain_m.parameters(), single.parameters()):
            _close(p.grad, q.grad, f"step {step}: {name} vs plain DDP", rank)
            _close(p.grad, s.grad, f"step {step}: {name} vs one process", rank)


def _ddp_clip(rank: int, world: int):
    """Two DDP towers, clip_loss(process_group=...) with a learnable logit scale, against one process."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    lo, n = sum(SIZES[:rank]), SIZES[rank]
    xi, xt = _global(2), _global(3, d=3)
    torch.manual_seed(1)
    img, txt = Tower(), Tower(d_in=3)
    s_img, s_txt = copy.deepcopy(img), copy.deepcopy(txt)
    d_img, d_txt = DDP(img), DDP(txt)
    counts = ([0], [0])
    d_img.register_comm_hook(dist.group.WORLD, _counting_hook(counts[0]))
    d_txt.register_comm_hook(dist.group.WORLD, _counting_hook(counts[1]))
    log_scale = nn.Parameter(torch.tensor(2.5, dtype=DT))
    s_log_scale = nn.Parameter(torch.tensor(2.5, dtype=DT))

    def loss_fn(i, t, scale=log_scale, group=dist.group.WORLD):
        return co.clip_loss(F.normalize(i, dim=-1), F.normalize(t, dim=-1), scale.exp(), process_group=group,
                            backend="cpu")

    ref = loss_fn(s_img(xi), s_txt(xt), scale=s_log_scale, group=None)
    ref.backward()
    loss = co.GradCache([d_img, d_txt], loss_fn, chunk_size=CHUNK).cache(xi[lo:lo + n], xt[lo:lo + n])
    assert counts[0][0] == 1 and counts[1][0] == 1, counts
    tol = dict(rtol=1e-9, atol=1e-11)  # the cpu kernels sum in another order than the reference
    torch.testing.assert_close(codist.all_reduce_sum(loss.clone(), dist.group.WORLD) / world, ref.detach(), **tol)
    torch.testing.assert_close(codist.all_reduce_sum(log_scale.grad.clone(), dist.group.WORLD) / world,
                               s_log_scale.grad, **tol)
    for tower, single in ((img, s_img), (txt, s_txt)):
        for (name, p), q in zip(tower.named_parameters(), single.parameters()):
            torch.testing.assert_close(p.grad, q.grad, **tol, msg=lambda m: f"rank {rank}: {name}: {m}")


def _ddp_dropout(rank: int, world: int):
    """A DDP encoder with dropout: GradCache equals the plain chunked step with its gradients averaged over ranks."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    lo, n = sum(SIZES[:rank]), SIZES[rank]
    x1, x2 = _global(4)[lo:lo + n], _global(5)[lo:lo + n]
    torch.manual_seed(2)
    gc_m = Tower(dropout=0.3)
    plain_m = copy.deepcopy(gc_m)
    gc = DDP(gc_m)

    def loss_fn(z1, z2):
        return co.nt_xent(z1, z2, 0.5, process_group=dist.group.WORLD, backend="cpu")

    torch.manual_seed(100 + rank)  # each rank draws its own dropout masks
    lg = co.GradCache(gc, loss_fn, chunk_size=CHUNK)(x1, x2)
    torch.manual_seed(100 + rank)
    lp = plain_step(plain_m, loss_fn, [x1, x2], CHUNK)
    tol = dict(rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lg, lp, **tol)
    for (name, p), q in zip(gc_m.named_parameters(), plain_m.parameters()):
        averaged = codist.all_reduce_sum(q.grad.clone(), dist.group.WORLD) / world
        torch.testing.assert_close(p.grad, averaged, **tol, msg=lambda m: f"rank {rank}: {name}: {m}")


DDP_CASES = {"simclr_shared_encoder": _ddp_simclr, "clip_two_towers_process_group": _ddp_clip,
             "dropout_vs_plain_chunked_step": _ddp_dropout}


def _worker(rank: int, world: int, port: int, outdir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    results = {}
    try:
        for name, fn in DDP_CASES.items():
            try:
                fn(rank, world)
                results[name] = None
            except Exception:  # noqa: BLE001 - reported to the parent
                results[name] = traceback.format_exc()
                print(f"rank {rank}: {name} failed:\n{results[name]}", file=sys.stderr, flush=True)
            dist.barrier()
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results():
    world = len(SIZES)
    return spawn_ranks(_worker, world, timeout_s=RUN_TIMEOUT_S, what="the GradCache DDP run")


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(DDP_CASES))
def test_ddp(ddp_results, name):
    failed = [f"--- rank {r} ---\n{res[name]}" for r, res in enumerate(ddp_results) if res[name] is not None]
    assert not failed, "\n".join(failed)
