"""Queues (negatives beyond the batch): ``queue=`` on info_nce, nt_xent and supcon_loss, MoCo v2,
``nn.MemoryBank`` and ``memory_size=`` on the modules.

Every backend that runs here (the reference, the fused composition on the dense core, the C++ CPU
kernels, the Triton kernels under the interpreter) is checked against brute-force float64 formulas
written below one anchor at a time: values and the gradients of the features, of a queue that
requires grad, and of a tensor temperature.
"""
from __future__ import annotations

import math
from typing import Dict

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import info_nce as inm
from contrastive_ops.losses import supcon as scm
from contrastive_ops.primitives.sim_lse import DenseSimLSE
from contrastive_ops.testing import assert_close
from helpers import backend_params, nan_filled_memory, serve_dense_primitive

F64 = torch.float64
# "reference": the public function's dense reference; "composition": the fused composition on the
# dense core (float64); then the kernel backends, in fp32.
BACKENDS = [pytest.param("reference", id="reference"), pytest.param("composition", id="composition")] \
    + backend_params(torch.device("cpu"))


def _rand(*shape, seed=0):
    """fp32-representable values in float64 (the kernels see exactly what the brute force sees)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).double()


# --------------------------------------------------------------------------- brute force (float64)


def _unit(x, normalize):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else x


def _lse(terms):
    return torch.logsumexp(torch.stack(terms), 0)


def _reduce(values, reduction, count=None):
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    return values.sum() / (values.numel() if count is None else max(count, 1))


def bf_info_nce(query, key, temperature, queue=None, *, targets=None, in_batch_negatives=True, normalize=True,
                reduction="mean"):
    """ℓ_i = −s(q_i,k_{t_i}) + log(Σ_{keys in the denominator} e^{s} + Σ_m e^{s(q_i,Q_m)}), one row at a time."""
    q, k, tau, Q = query, key, temperature, queue
    qn, kn = _unit(q, normalize), _unit(k, normalize)
    Qn = None if Q is None else _unit(Q, normalize)
    rows = []
    for i in range(q.shape[0]):
        t = i if targets is None else int(targets[i])
        pos = qn[i] @ kn[t] / tau
        terms = [qn[i] @ kn[j] / tau for j in range(k.shape[0])] if in_batch_negatives else [pos]
        if Qn is not None:
            terms += [qn[i] @ Qn[m] / tau for m in range(Qn.shape[0])]
        rows.append(_lse(terms) - pos)
    return _reduce(torch.stack(rows), reduction)


def bf_nt_xent(z1, z2, temperature, queue=None, *, normalize=True, reduction="mean"):
    tau, Q = temperature, queue
    N = z1.shape[0]
    Z = torch.cat([_unit(z1, normalize), _unit(z2, normalize)])
    Qn = None if Q is None else _unit(Q, normalize)
    rows = []
    for a in range(2 * N):
        terms = [Z[a] @ Z[b] / tau for b in range(2 * N) if b != a]
        if Qn is not None:
            terms += [Z[a] @ Qn[m] / tau for m in range(Qn.shape[0])]
        rows.append(_lse(terms) - Z[a] @ Z[(a + N) % (2 * N)] / tau)
    return _reduce(torch.stack(rows), reduction)


def bf_supcon(features, labels, temperature, queue=None, queue_labels=None, *, base_temperature=0.07,
              contrast_mode="all", normalize=True, reduction="mean"):
    """features (N, V, D) or (N, D).

    ℓ_a = −(τ/τ_b)·mean_{p∈P(a)}[s_ap − log Σ_{c≠a, c in batch ∪ queue} e^{s_ac}], one anchor at a time.
    """
    x, tau, Q = features, temperature, queue
    if x.dim() == 2:
        x = x[:, None]
    N, V, _ = x.shape
    u = _unit(x, normalize)
    z = [u[i, l] for l in range(V) for i in range(N)]
    y = [(i if labels is None else int(labels[i])) for _ in range(V) for i in range(N)]
    Qn = [] if Q is None else list(_unit(Q, normalize))
    yq = [None] * len(Qn) if queue_labels is None else [int(v) for v in queue_labels]
    A = N if contrast_mode == "one" else V * N
    vals, count = [], 0
    for a in range(A):
        others = [z[c] for c in range(V * N) if c != a] + Qn
        log_den = _lse([z[a] @ c / tau for c in others])
        P = [z[p] for p in range(V * N) if p != a and y[p] == y[a]]
        if labels is not None:
            P += [Qn[m] for m in range(len(Qn)) if yq[m] == y[a]]
        if not P:
            vals.append(torch.zeros((), dtype=x.dtype))
            continue
        count += 1
        vals.append(-(tau / base_temperature) * (torch.stack([z[a] @ p / tau for p in P]).mean() - log_den))
    return _reduce(torch.stack(vals), reduction, count)


# --------------------------------------------------------------------------- running a backend


def _call(loss: str, backend: str, args: Dict[str, torch.Tensor], kw: dict):
    """The public function on ``backend``; "composition" runs the fused composition on the dense core."""
    if backend != "composition":
        fn = {"info_nce": co.info_nce, "nt_xent": co.nt_xent, "supcon": co.supcon_loss}[loss]
        return fn(**args, backend=backend, **kw)
    if loss == "info_nce":
        return inm._fused_info_nce(args.pop("query"), args.pop("key"), args.pop("temperature"), backend="reference",
                                   **args, **kw)
    if loss == "nt_xent":
        return inm._fused_nt_xent(args.pop("z1"), args.pop("z2"), args.pop("temperature"), backend="reference",
                                  **args, **kw)
    kw = dict(kw)
    f = args.pop("features")
    views = f[None] if f.dim() == 2 else f.transpose(0, 1)
    base = torch.tensor(kw.pop("base_temperature", 0.07), dtype=F64)
    return scm._fused_supcon(views, args.pop("labels"), args.pop("temperature"), base, backend="reference",
                             **args, **kw)


def check_against_brute_force(loss: str, backend: str, args: Dict[str, object], brute, **kw):
    """``loss`` on ``backend`` vs ``brute`` (float64): values and every input gradient, non-unit upstream grads."""
    dtype = F64 if backend in ("reference", "composition") else torch.float32

    def leaves(dt):
        return {n: (v.detach().to(dt).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                    and v.is_floating_point() else v) for n, v in args.items()}

    ins, exact_ins = leaves(dtype), leaves(F64)
    if backend in ("reference", "composition"):
        out = _call(loss, backend, dict(ins), kw)
    else:
        with nan_filled_memory():  # a kernel that leaves part of an output unwritten shows NaN
            out = _call(loss, backend, dict(ins), kw)
    exact = brute(**exact_ins, **kw)
    assert out.dtype == (F64 if dtype == F64 else torch.float32)
    assert_close(out, exact, dtype, what=f"{loss} on {backend}")
    w = (torch.randn(exact.shape, dtype=F64, generator=torch.Generator().manual_seed(3)) if exact.dim()
         else torch.tensor(2.0, dtype=F64))
    names = [n for n, v in ins.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    if not names:
        return
    got = torch.autograd.grad((out * w.to(out.dtype)).sum(), [ins[n] for n in names], allow_unused=True)
    want = torch.autograd.grad((exact * w).sum(), [exact_ins[n] for n in names], allow_unused=True)
    for n, g, e in zip(names, got, want):
        e = torch.zeros_like(exact_ins[n]) if e is None else e
        assert g is not None, f"no gradient for {n} on {backend}"
        assert_close(g, e, dtype, what=f"{loss} on {backend}: grad of {n}")


# --------------------------------------------------------------------------- values and gradients

INFO_OPTIONS = [
    dict(in_batch_negatives=True, targets=False, normalize=True, reduction="mean", queue_grad=True),
    dict(in_batch_negatives=True, targets=True, normalize=False, reduction="none", queue_grad=False),
    dict(in_batch_negatives=False, targets=False, normalize=True, reduction="sum", queue_grad=True),
    dict(in_batch_negatives=False, targets=True, normalize=True, reduction="none", queue_grad=False),
    dict(in_batch_negatives=False, targets=False, normalize=False, reduction="mean", queue_grad=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", INFO_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_info_nce_queue_matches_brute_force(backend, opt):
    B, M, K, D = 5, (8 if opt["targets"] else 5), 6, 8
    scale = 1.0 if opt["normalize"] else 0.4
    args = dict(query=_rand(B, D, seed=1).requires_grad_(), key=_rand(M, D, seed=2).requires_grad_(),
                temperature=torch.tensor(0.3, dtype=F64, requires_grad=True),
                queue=(_rand(K, D, seed=3) * scale).requires_grad_(opt["queue_grad"]))
    args["query"] = (args["query"].detach() * scale).requires_grad_()
    kw = dict(in_batch_negatives=opt["in_batch_negatives"], normalize=opt["normalize"], reduction=opt["reduction"])
    if opt["targets"]:
        kw["targets"] = torch.randperm(M, generator=torch.Generator().manual_seed(4))[:B]
    check_against_brute_force("info_nce", backend, args, bf_info_nce, **kw)


NT_OPTIONS = [
    dict(normalize=True, reduction="mean", queue_grad=True),
    dict(normalize=False, reduction="none", queue_grad=False),
    dict(normalize=True, reduction="sum", queue_grad=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", NT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_nt_xent_queue_matches_brute_force(backend, opt):
    N, K, D = 4, 7, 8
    scale = 1.0 if opt["normalize"] else 0.4
    args = dict(z1=(_rand(N, D, seed=1) * scale).requires_grad_(), z2=(_rand(N, D, seed=2) * scale).requires_grad_(),
                temperature=torch.tensor(0.5, dtype=F64, requires_grad=True),
                queue=(_rand(K, D, seed=3) * scale).requires_grad_(opt["queue_grad"]))
    check_against_brute_force("nt_xent", backend, args, bf_nt_xent, normalize=opt["normalize"],
                              reduction=opt["reduction"])


SUPCON_OPTIONS = [
    dict(V=2, labels=True, queue_labels=True, contrast_mode="all", normalize=True, reduction="mean", queue_grad=True),
    dict(V=2, labels=True, queue_labels=False, contrast_mode="one", normalize=True, reduction="none",
         queue_grad=False),
    dict(V=1, labels=True, queue_labels=True, contrast_mode="all", normalize=False, reduction="sum",
         queue_grad=False),
    dict(V=2, labels=False, queue_labels=False, contrast_mode="all", normalize=True, reduction="none",
         queue_grad=True),
    dict(V=3, labels=True, queue_labels=True, contrast_mode="one", normalize=True, reduction="mean",
         queue_grad=False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opt", SUPCON_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_supcon_queue_matches_brute_force(backend, opt):
    N, K, D, V = 5, 6, 8, opt["V"]
    scale = 1.0 if opt["normalize"] else 0.4
    x = _rand(N, V, D, seed=1) * scale
    # class 7 only in the batch (a singleton there: positives only from the queue), class 9 only in the queue
    y = torch.tensor([0, 1, 0, 2, 7])
    yq = torch.tensor([1, 9, 0, 7, 3, 1])
    args = dict(features=(x[:, 0] if V == 1 else x).requires_grad_(), labels=y if opt["labels"] else None,
                temperature=torch.tensor(0.2, dtype=F64, requires_grad=True),
                queue=(_rand(K, D, seed=3) * scale).requires_grad_(opt["queue_grad"]),
                queue_labels=yq if opt["queue_labels"] else None)
    check_against_brute_force("supcon", backend, args, bf_supcon, base_temperature=0.1,
                              contrast_mode=opt["contrast_mode"], normalize=opt["normalize"],
                              reduction=opt["reduction"])


def test_brute_force_supcon_without_queue_is_supcon():
    """The brute-force SupCon with a queue reduces to the library's reference without one (sanity of the oracle)."""
    x, y = _rand(6, 2, 5, seed=1), torch.tensor([0, 1, 0, 2, 1, 3])
    torch.testing.assert_close(bf_supcon(x, y, 0.2, reduction="none"),
                               co.supcon_loss(x, y, 0.2, reduction="none", backend="reference"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_queue_adds_nothing(backend):
    """K = 0 (an empty MemoryBank): the plain loss; MoCo with no negatives is 0 and still in the graph."""
    if backend == "composition":
        pytest.skip("the public functions only")
    dt = F64 if backend == "reference" else torch.float32
    q, k = _rand(4, 6, seed=1).to(dt).requires_grad_(), _rand(4, 6, seed=2).to(dt)
    empty = torch.zeros(0, 6, dtype=dt)
    torch.testing.assert_close(co.info_nce(q, k, queue=empty, backend=backend), co.info_nce(q, k, backend=backend))
    torch.testing.assert_close(co.nt_xent(q, k, queue=empty, backend=backend), co.nt_xent(q, k, backend=backend))
    y = torch.tensor([0, 1, 0, 1])
    torch.testing.assert_close(
        co.supcon_loss(q, y, queue=empty, queue_labels=torch.zeros(0, dtype=torch.long), backend=backend),
        co.supcon_loss(q, y, backend=backend))
    moco = co.info_nce(q, k, queue=empty, in_batch_negatives=False, backend=backend)
    assert moco.item() == 0 and moco.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_v2_is_cross_entropy_with_the_queue(backend):
    """in_batch_negatives=False: CE of [q·k⁺, q·queueᵀ]/τ with target 0 (the MoCo v2 code)."""
    if backend == "composition":
        pytest.skip("the public functions only")
    dt = F64 if backend == "reference" else torch.float32
    B, K, D, tau = 6, 9, 8, 0.2
    q, k, Q = (_rand(B, D, seed=1).to(dt).requires_grad_(), _rand(B, D, seed=2).to(dt).requires_grad_(),
               _rand(K, D, seed=3).to(dt))
    ours = co.info_nce(q, k, tau, queue=Q, in_batch_negatives=False, backend=backend)
    qn, kn, Qn = (F.normalize(t.double(), dim=1) for t in (q, k, Q))
    logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ Qn.T], 1) / tau
    theirs = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
    assert_close(ours, theirs, dt, what="MoCo v2 loss")
    g1 = torch.autograd.grad(ours * 2, (q, k))
    g2 = torch.autograd.grad(theirs * 2, (q, k))
    for a, b in zip(g1, g2):
        assert_close(a, b, dt, what="MoCo v2 gradient")


# --------------------------------------------------------------------------- the queue is a block of its own


class _RecordingDenseSimLSE(DenseSimLSE):
    """The "sim_lse" primitive, computed densely, recording the candidate blocks it is given."""

    def __init__(self):
        self.candidates = []

    def forward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
        self.candidates.append(tuple(k.shape))
        return super().forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max)


@pytest.mark.parametrize("loss", ["info_nce", "moco", "nt_xent", "supcon"])
def test_queue_is_a_second_core_call(monkeypatch, loss):
    """Through the kernel interface the queue is its own (K, D) candidate block, never concatenated to the batch."""
    prim = serve_dense_primitive(monkeypatch, _RecordingDenseSimLSE())
    B, K, D = 5, 7, 6
    a, b = _rand(B, D, seed=1).requires_grad_(), _rand(B, D, seed=2).requires_grad_()
    Q = _rand(K, D, seed=3).requires_grad_()
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    if loss in ("info_nce", "moco"):
        ib = loss == "info_nce"
        out = inm._fused_info_nce(a, b, tau, queue=Q, in_batch_negatives=ib, backend="dense", reduction="none")
        exact = bf_info_nce(a, b, tau, Q, in_batch_negatives=ib, reduction="none")
        blocks = [(B, D), (K, D)] if ib else [(K, D)]
    elif loss == "nt_xent":
        out = inm._fused_nt_xent(a, b, tau, queue=Q, backend="dense", reduction="none")
        exact = bf_nt_xent(a, b, tau, Q, reduction="none")
        blocks = [(2 * B, D), (K, D)]
    else:
        y, yq = torch.tensor([0, 1, 0, 2, 1]), torch.tensor([1, 0, 5, 2, 2, 0, 9])
        f = torch.stack([a, b], 1)
        out = scm._fused_supcon(f.transpose(0, 1), y, tau, torch.tensor(0.07, dtype=F64), queue=Q, queue_labels=yq,
                                backend="dense", reduction="none")
        exact = bf_supcon(f, y, tau, Q, yq, reduction="none")
        blocks = [(2 * B, D), (K, D)]
    assert prim.candidates == blocks
    torch.testing.assert_close(out, exact)
    w = torch.randn(out.shape, dtype=F64)
    for x in (a, b, Q, tau):
        g1, = torch.autograd.grad((out * w).sum(), x, retain_graph=True)
        g2, = torch.autograd.grad((exact * w).sum(), x, retain_graph=True)
        torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_queue(backend):
    """bf16 features and queue on the kernel backends: within the rule for a bf16 reference run."""
    if backend in ("reference", "composition"):
        pytest.skip("kernel backends only")
    from helpers import compare_with_reference

    q, k, Q = torch.randn(6, 16).requires_grad_(), torch.randn(6, 16).requires_grad_(), torch.randn(9, 16)
    y, yq = torch.tensor([0, 1, 0, 2, 1, 3]), torch.tensor([1, 0, 5, 2, 2, 0, 9, 3, 3])

    def info(q, k, Q, *, backend):
        return co.info_nce(q, k, 0.2, queue=Q, backend=backend, reduction="none")

    def moco(q, k, Q, *, backend):
        return co.info_nce(q, k, 0.2, queue=Q, in_batch_negatives=False, backend=backend)

    def ntx(q, k, Q, *, backend):
        return co.nt_xent(q, k, 0.3, queue=Q, backend=backend)

    def sup(q, k, Q, *, backend):
        return co.supcon_loss(torch.stack([q, k], 1), y, 0.2, queue=Q, queue_labels=yq, backend=backend)

    for fn, sharp in ((info, 5.0), (moco, 5.0), (ntx, 1 / 0.3), (sup, 5.0)):
        compare_with_reference(fn, [q, k, Q], backend=backend, dtype=torch.bfloat16, sharpness=sharp,
                               normalized=True)


# --------------------------------------------------------------------------- MemoryBank


def test_memory_bank_fifo_newest_first():
    """Rows enter one at a time in order; the oldest leave first; ``features`` lists the newest first."""
    bank = co.nn.MemoryBank(6, 2, with_labels=True)
    assert len(bank) == 0 and bank.features.shape == (0, 2) and bank.labels.shape == (0,)
    seen_f, seen_y = torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
    for step, n in enumerate([3, 2, 4, 1, 6, 8]):
        f = torch.arange(n * 2, dtype=torch.float32).reshape(n, 2) + 100 * step
        y = torch.arange(n) + 10 * step
        bank.enqueue(f, y)
        seen_f, seen_y = torch.cat([f.flip(0), seen_f])[:6], torch.cat([y.flip(0), seen_y])[:6]
        assert len(bank) == min(seen_f.shape[0], 6)
        assert torch.equal(bank.features, seen_f), step
        assert torch.equal(bank.labels, seen_y), step
    assert bank.features.dtype == torch.float32


def test_memory_bank_stores_detached_copies_in_its_dtype():
    bank = co.nn.MemoryBank(4, 3, dtype=F64)
    x = torch.randn(2, 3, requires_grad=True)
    bank.enqueue(x)
    with torch.no_grad():
        x.mul_(2)
    assert bank.labels is None
    assert bank.features.dtype == F64 and not bank.features.requires_grad
    torch.testing.assert_close(bank.features, (x.detach() / 2).double().flip(0))


def test_memory_bank_state_dict_round_trip():
    bank = co.nn.MemoryBank(5, 3, with_labels=True)
    for step in range(3):
        bank.enqueue(torch.randn(2, 3), torch.tensor([step, step + 1]))
    sd = bank.state_dict()
    assert set(sd) == {"memory", "memory_labels", "head", "filled"}
    other = co.nn.MemoryBank(5, 3, with_labels=True)
    other.load_state_dict(sd)
    assert len(other) == len(bank) == 5
    assert torch.equal(other.features, bank.features) and torch.equal(other.labels, bank.labels)
    nxt = torch.randn(2, 3)
    bank.enqueue(nxt, torch.tensor([7, 8]))
    other.enqueue(nxt, torch.tensor([7, 8]))
    assert torch.equal(other.features, bank.features) and torch.equal(other.labels, bank.labels)


@pytest.mark.parametrize("make", ["info", "moco", "ntxent", "supcon", "supcon_unlabelled"])
def test_loss_module_memory_equals_function_with_manual_queue(make):
    """Over a few steps, ``memory_size=K`` equals the function with the last K keys (newest first) as queue,
    and a module restored from a state_dict continues identically."""
    K, D, N = 7, 5, 3
    torch.manual_seed(1)
    if make in ("info", "moco"):
        ib = make == "info"

        def module():
            return co.nn.InfoNCELoss(0.2, memory_size=K, in_batch_negatives=ib, backend="reference")

        def fn(a, b, y, Q, Qy):
            return co.info_nce(a, b, 0.2, queue=Q, in_batch_negatives=ib, backend="reference")

        def keys(a, b, y):
            return b, None
    elif make == "ntxent":
        def module():
            return co.nn.NTXentLoss(0.4, memory_size=K, backend="reference")

        def fn(a, b, y, Q, Qy):
            return co.nt_xent(a, b, 0.4, queue=Q, backend="reference")

        def keys(a, b, y):
            return torch.cat([a, b]), None
    else:
        labelled = make == "supcon"

        def module():
            return co.nn.SupConLoss(0.1, memory_size=K, backend="reference")

        def fn(a, b, y, Q, Qy):
            return co.supcon_loss(torch.stack([a, b], 1), y if labelled else None, 0.1, queue=Q,
                                  queue_labels=Qy if labelled else None, backend="reference")

        def keys(a, b, y):
            return torch.cat([a, b]), (torch.cat([y, y]) if labelled else None)

    mod = module()
    Q, Qy = torch.zeros(0, D, dtype=F64), torch.zeros(0, dtype=torch.long)
    restored = None
    for step in range(4):
        a, b = torch.randn(N, D, dtype=F64), torch.randn(N, D, dtype=F64)
        y = torch.randint(0, 3, (N,))
        args = (torch.stack([a, b], 1), y if make == "supcon" else None) if make.startswith("supcon") else (a, b)
        got = mod(*args)
        torch.testing.assert_close(got, fn(a, b, y, Q, Qy))
        if restored is not None:
            torch.testing.assert_close(restored(*args), got)
        f, fy = keys(a, b, y)
        Q = torch.cat([f.flip(0), Q])[:K]  # rows enqueued in order: the last one is the newest
        Qy = torch.cat([fy.flip(0), Qy])[:K] if fy is not None else Qy
        assert torch.equal(mod.memory.features, Q)
        if step == 1:
            restored = module()
            restored.load_state_dict(mod.state_dict())
            assert torch.equal(restored.memory.features, Q)


def test_module_memory_in_state_dict_and_empty_before_first_step():
    mod = co.nn.SupConLoss(memory_size=4)
    assert mod.state_dict() == {} or all(not k.startswith("memory.") for k in mod.state_dict())
    mod(torch.randn(3, 2, 5), torch.tensor([0, 1, 0]))
    assert {"memory.memory", "memory.memory_labels", "memory.head", "memory.filled"} <= set(mod.state_dict())
    assert "memory_size=4" in repr(mod)


def test_moco_module_first_step_has_no_negatives():
    mod = co.nn.InfoNCELoss(0.2, memory_size=4, in_batch_negatives=False, backend="reference")
    q = torch.randn(3, 5, requires_grad=True)
    loss = mod(q, torch.randn(3, 5))
    assert loss.item() == 0 and loss.requires_grad
    assert len(mod.memory) == 3


# --------------------------------------------------------------------------- pytorch-metric-learning


def test_supcon_memory_matches_pytorch_metric_learning_cross_batch_memory():
    """``SupConLoss(memory_size=K)`` has the value of pml ``CrossBatchMemory(SupConLoss, memory_size=K + batch)``
    at every step: pml enqueues the batch first and drops self comparisons, so its memory is the batch plus
    the K previous entries."""
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning.losses import CrossBatchMemory
    from pytorch_metric_learning.losses import SupConLoss as PmlSupCon

    N, V, D, K, tau = 6, 2, 8, 10, 0.1
    ours = co.nn.SupConLoss(tau, base_temperature=tau, memory_size=K, backend="reference")
    theirs = CrossBatchMemory(PmlSupCon(temperature=tau), embedding_size=D, memory_size=K + V * N)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(N, V, D, generator=g, dtype=F64, requires_grad=True)
        y = torch.randint(0, 4, (N,), generator=g)
        a = ours(x, y)
        emb = x.transpose(0, 1).reshape(V * N, D)  # view-major, labels repeated per view
        b = theirs(emb, y.repeat(V))
        torch.testing.assert_close(a, b, msg=lambda m: f"step {step}: {m}")
    # Gradients differ by design: pml's references are detached copies in its memory, the current
    # batch's included, so only the anchors get gradient there; here the batch's candidates get it too.


# --------------------------------------------------------------------------- bad input


def _q():
    return torch.randn(4, 6), torch.randn(4, 6)


@pytest.mark.parametrize("queue,match", [
    (torch.randn(5, 7), r"queue.*width.*\(5, 7\).*\(4, 6\)"),
    (torch.randn(5, 6, dtype=F64), r"queue.*dtype.*float64.*float32"),
    (torch.randn(5, 6, device="meta"), r"queue.*meta"),
    (torch.randn(5, 6, 1), r"queue.*2-D.*\(5, 6, 1\)"),
    (torch.ones(5, 6, dtype=torch.long), r"queue.*dtype.*int64"),
    ([[0.0] * 6], r"queue.*list"),
])
@pytest.mark.parametrize("loss", ["info_nce", "nt_xent", "supcon"])
def test_bad_queue(loss, queue, match):
    q, k = _q()
    with pytest.raises(ValueError, match=match):
        if loss == "info_nce":
            co.info_nce(q, k, queue=queue)
        elif loss == "nt_xent":
            co.nt_xent(q, k, queue=queue)
        else:
            co.supcon_loss(q, torch.arange(4), queue=queue)


def test_bad_queue_labels():
    q, _ = _q()
    y = torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"queue_labels.*without a queue"):
        co.supcon_loss(q, y, queue_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"queue_labels.*\(5,\).*\(3,\)"):
        co.supcon_loss(q, y, queue=torch.randn(5, 6), queue_labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"queue_labels.*integer.*float32"):
        co.supcon_loss(q, y, queue=torch.randn(5, 6), queue_labels=torch.zeros(5))
    with pytest.raises(ValueError, match=r"queue_labels.*needs labels"):
        co.supcon_loss(q, None, queue=torch.randn(5, 6), queue_labels=torch.zeros(5, dtype=torch.long))


def test_bad_in_batch_negatives():
    q, k = _q()
    with pytest.raises(ValueError, match=r"in_batch_negatives=False.*queue"):
        co.info_nce(q, k, in_batch_negatives=False)
    with pytest.raises(ValueError, match=r"queue.*symmetric"):
        co.info_nce(q, k, symmetric=True, queue=torch.randn(3, 6))
    with pytest.raises(ValueError, match=r"in_batch_negatives must be"):
        co.info_nce(q, k, queue=torch.randn(3, 6), in_batch_negatives="no")


@pytest.mark.parametrize("cls", [co.nn.InfoNCELoss, co.nn.NTXentLoss, co.nn.SupConLoss])
@pytest.mark.parametrize("size", [-1, 1.5, True])
def test_bad_memory_size(cls, size):
    with pytest.raises(ValueError, match=r"memory_size.*>= 0"):
        cls(memory_size=size)


def test_bad_module_memory_options():
    with pytest.raises(ValueError, match=r"in_batch_negatives=False.*memory_size"):
        co.nn.InfoNCELoss(in_batch_negatives=False)
    with pytest.raises(ValueError, match=r"memory_size.*symmetric"):
        co.nn.InfoNCELoss(symmetric=True, memory_size=4)
    mod = co.nn.SupConLoss(memory_size=4)
    mod(torch.randn(3, 2, 5), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"labels must be given"):
        mod(torch.randn(3, 2, 5))


def test_bad_memory_bank_input():
    for kw, match in ((dict(size=0, dim=3), "size"), (dict(size=4, dim=0), "dim"),
                      (dict(size=4, dim=3, dtype=torch.long), "dtype")):
        with pytest.raises(ValueError, match=match):
            co.nn.MemoryBank(**kw)
    bank = co.nn.MemoryBank(4, 3, with_labels=True)
    with pytest.raises(ValueError, match=r"features.*\(n, 3\).*\(2, 5\)"):
        bank.enqueue(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels is required"):
        bank.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"labels.*\(2,\).*\(3,\)"):
        bank.enqueue(torch.randn(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels.*with_labels=False"):
        co.nn.MemoryBank(4, 3).enqueue(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"features.*meta"):
        co.nn.MemoryBank(4, 3).enqueue(torch.randn(2, 3, device="meta"))
    assert len(bank) == 0


def test_inputs_not_modified():
    q, k = _q()
    Q = torch.randn(5, 6)
    snap = [t.clone() for t in (q, k, Q)]
    co.info_nce(q, k, queue=Q, backend="reference")
    co.nt_xent(q, k, queue=Q)
    co.supcon_loss(q, torch.arange(4), queue=Q, queue_labels=torch.arange(5))
    assert all(torch.equal(a, b) for a, b in zip((q, k, Q), snap))
    assert not math.isnan(float(co.info_nce(q, k, queue=Q, in_batch_negatives=False)))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=pytest.mark.skipif(
    not co.available_backends()["cpu"][0], reason="cpu backend not built"))])
@pytest.mark.parametrize("loss", ["info_nce", "moco", "nt_xent", "supcon"])
def test_queue_compiles_fullgraph(loss, backend):
    """The queue path has no host sync or data-dependent shape: one graph under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    B, K, D = 6, 5, 8
    lin = torch.nn.Linear(D, D)
    x1, x2, Q = torch.randn(B, D), torch.randn(B, D), torch.randn(K, D)
    y, yq = torch.tensor([0, 1, 0, 2, 1, 3]), torch.tensor([1, 0, 5, 2, 2])

    def step(x1, x2, Q):
        a, b = lin(x1), lin(x2)
        if loss == "info_nce":
            return co.info_nce(a, b, 0.2, queue=Q, backend=backend)
        if loss == "moco":
            return co.info_nce(a, b, 0.2, queue=Q, in_batch_negatives=False, backend=backend)
        if loss == "nt_xent":
            return co.nt_xent(a, b, 0.5, queue=Q, backend=backend)
        return co.supcon_loss(torch.stack([a, b], 1), y, 0.1, queue=Q, queue_labels=yq, backend=backend)

    eager = step(x1, x2, Q)
    ge = torch.autograd.grad(eager, lin.weight)[0]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x1, x2, Q)
    gc = torch.autograd.grad(compiled, lin.weight)[0]
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(gc, ge)
