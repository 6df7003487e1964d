"""CPU benchmark of the fused losses (backend "cpu") against plain PyTorch (backend "reference").

Workloads, forward + backward, 8192 anchors, D = 256, fp32::

    info_nce     query, key (8192, 256), τ = 0.07             plain: also F.cross_entropy(q kᵀ/τ, arange)
    clip_loss    image, text (8192, 256) unit rows, scale 1/0.07
    nt_xent      z1, z2 (4096, 256): 2N = 8192 anchors, τ = 0.5
    mv_infonce   (N, V, 256) with N·V = 8192, V = 2 and 4, τ = 0.1
    supcon       (4096, 2, 256), 100 classes, τ = 0.07, contrast_mode "all"

The "reference" backend of each loss is its exact dense PyTorch formula,
written independently of the fused core: it stores the 8192 × 8192 logits
(256 MiB) and more.

Run: ``python -m pytest benchmarks/test_bench_cpu_core.py --benchmark-only``
(``BENCH_ROUNDS`` sets the rounds, default 3).  ``test_vs_plain_pytorch``
interleaves the two backends in one process (cpu, reference, cpu, ...), takes
medians, checks that losses and gradients agree, and reports in ``extra_info``
``time_ratio`` (cpu / plain) and ``mem_ratio`` (peak extra memory, cpu / plain)
with the load average.  Goal on 2 cores: time_ratio ≤ 1, mem_ratio ≤ 0.10 (the
memory goal is asserted; time is only reported, since the machine is shared).

Peak memory probe.  PyTorch's CPU allocator keeps no statistics (and
tracemalloc does not see it), so the probe is the step's peak resident set
size: ``VmHWM`` of ``/proc/self/status``, reset before each measurement by
writing ``5`` to ``/proc/self/clear_refs`` (Linux), minus the resident size
just before the step.  For this to follow allocations, glibc must return large
blocks to the OS on ``free``: the mmap threshold is pinned at 128 KiB (which
also turns off its dynamic growth), so every tensor above that size is its own
mapping, counted while alive and unmapped when freed.  Smaller allocations are
noise at this scale (the dense step peaks at several hundred MiB).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.backends import _cext

B, D = 8192, 256
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _pin_malloc() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False


_MALLOC_PINNED = _pin_malloc()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(fn) -> float:
    """Peak resident memory (MiB) that ``fn()`` adds on top of what was resident before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) / 1024


# ---------------------------------------------------------------- workloads


def _randn(*shape, seed=0, unit=False):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return (F.normalize(x, dim=-1) if unit else x).requires_grad_()


def _info_nce():
    return (_randn(B, D, seed=0), _randn(B, D, seed=1)), lambda q, k, be: co.info_nce(q, k, 0.07, backend=be)


def _clip():
    scale = torch.tensor(1 / 0.07)
    return ((_randn(B, D, seed=2, unit=True), _randn(B, D, seed=3, unit=True)),
            lambda i, t, be: co.clip_loss(i, t, scale, backend=be))


def _nt_xent():
    return (_randn(B // 2, D, seed=4), _randn(B // 2, D, seed=5)), lambda a, b, be: co.nt_xent(a, b, 0.5, backend=be)


def _mv(V):
    def make():
        return (_randn(B // V, V, D, seed=6 + V),), lambda z, be: co.mv_infonce(z, 0.1, backend=be)
    return make


def _supcon():
    labels = torch.randint(0, 100, (B // 2,), generator=torch.Generator().manual_seed(9))
    return (_randn(B // 2, 2, D, seed=10),), lambda z, be: co.supcon_loss(z, labels, 0.07, backend=be)


WORKLOADS = {
    "info_nce": _info_nce,
    "clip_loss": _clip,
    "nt_xent": _nt_xent,
    "mv_infonce_v2": _mv(2),
    "mv_infonce_v4": _mv(4),
    "supcon": _supcon,
}


def _dense_info_nce(q, k):
    """InfoNCE as plain PyTorch is usually written (one cross-entropy over the stored logits)."""
    logits = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.07
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def _last_paths():
    """Epilogue flags of the last CPU core call (see tests/test_cext_cpu_paths.py); None on older builds."""
    op = getattr(torch.ops.contrastive_ops, "_cpu_last_path", None)
    try:
        return None if op is None else {"fwd": op(False), "bwd": op(True)}
    except (RuntimeError, AttributeError):
        return None


def _step(inputs, loss_fn):
    for t in inputs:
        t.grad = None
    loss = loss_fn(*inputs)
    loss.backward()
    return loss.detach()


def _provider(name, fn):
    if name == "torch-dense":
        return lambda *x: _dense_info_nce(*x)
    backend = {"contrastive_ops-cpu": "cpu", "reference": "reference"}[name]
    return lambda *x: fn(*x, backend)


pytestmark = pytest.mark.skipif(not _cext.availability("cpu")[0], reason=f"cpu backend: {_cext.availability('cpu')[1]}")


def _cases():
    for w in WORKLOADS:
        for p in ("contrastive_ops-cpu", "reference"):
            yield pytest.param(w, p, id=f"{w}-{p}")
    yield pytest.param("info_nce", "torch-dense", id="info_nce-torch-dense")


@pytest.mark.parametrize("workload,provider", list(_cases()))
def test_loss_step(benchmark, workload, provider):
    inputs, fn = WORKLOADS[workload]()
    loss_fn = _provider(provider, fn)
    _step(inputs, loss_fn)  # warm-up (allocator, BLAS threads)
    peak = peak_extra_mib(lambda: _step(inputs, loss_fn))
    benchmark.extra_info.update(workload=workload, anchors=B, D=D, dtype="float32", threads=torch.get_num_threads(),
                                peak_extra_mib=round(peak, 1), malloc_pinned=_MALLOC_PINNED)
    benchmark.pedantic(_step, args=(inputs, loss_fn), rounds=ROUNDS, iterations=1, warmup_rounds=0)


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_vs_plain_pytorch(benchmark, workload):
    """Same loss and gradients as plain PyTorch; interleaved timing; peak memory ≤ 10 % of it."""
    inputs, fn = WORKLOADS[workload]()
    plain = [("reference", _provider("reference", fn))]
    if workload == "info_nce":
        plain.append(("torch-dense", _provider("torch-dense", fn)))
    fused = _provider("contrastive_ops-cpu", fn)

    loss_f = _step(inputs, fused)
    grads_f = [t.grad.clone() for t in inputs]
    for _, p in plain:
        loss_p = _step(inputs, p)
        torch.testing.assert_close(loss_f, loss_p, atol=1e-4, rtol=1e-4)
        for g, t in zip(grads_f, inputs):
            torch.testing.assert_close(g, t.grad, atol=1e-6, rtol=1e-3)

    times = {"cpu": []}
    times.update({n: [] for n, _ in plain})
    load = [os.getloadavg()[0]]
    for _ in range(ROUNDS):  # interleaved: cpu, plain..., cpu, plain...
        for name, f in [("cpu", fused)] + plain:
            t0 = time.perf_counter()
            _step(inputs, f)
            times[name].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    med = {n: statistics.median(v) for n, v in times.items()}
    peak_f = peak_extra_mib(lambda: _step(inputs, fused))
    peak_p = {n: peak_extra_mib(lambda: _step(inputs, f)) for n, f in plain}
    info = dict(workload=workload, threads=torch.get_num_threads(), rounds=ROUNDS,
                loadavg_1min=[round(x, 2) for x in load], malloc_pinned=_MALLOC_PINNED,
                median_s={n: round(v, 3) for n, v in med.items()},
                peak_extra_mib={"cpu": round(peak_f, 1), **{n: round(v, 1) for n, v in peak_p.items()}},
                time_ratio=round(med["cpu"] / med["reference"], 3),
                mem_ratio=round(peak_f / peak_p["reference"], 4),
                paths=_last_paths())
    if workload == "info_nce":
        info.update(time_ratio_dense=round(med["cpu"] / med["torch-dense"], 3),
                    mem_ratio_dense=round(peak_f / peak_p["torch-dense"], 4))
    benchmark.extra_info.update(info)
    print(f"\n{workload}: {info}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    for n, v in peak_p.items():
        assert peak_f <= 0.10 * v, f"{workload}: fused peak {peak_f:.1f} MiB vs {n} {v:.1f} MiB"
