"""CPU benchmark of the fused similarity-LSE core (backend "cpu") against plain PyTorch.

Workload: an InfoNCE-like step, forward + backward, B = 8192 anchors × 8192
candidates, D = 256, fp32::

    fused:  row_lse = core.sim_lse(q, k, scale, backend="cpu");  loss = mean(row_lse - scale·q_i·k_i)
    dense:  loss = F.cross_entropy(scale · q kᵀ, arange(B))       (stores the 256 MiB logits, and more)

Run: ``python -m pytest benchmarks/test_bench_cpu_core.py --benchmark-only``.
Goal on 2 cores: time ≤ 1× the dense step, peak memory ≤ 10 % of it.

Peak memory probe.  PyTorch's CPU allocator keeps no statistics (and
tracemalloc does not see it), so the probe is the kernel's peak resident set
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

import pytest
import torch
import torch.nn.functional as F

from contrastive_ops import core
from contrastive_ops.backends import _cext

B, D = 8192, 256
SCALE = 1 / 0.07

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


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, D, generator=g), dim=-1).requires_grad_()
    return q, k


def fused_step(q, k):
    q.grad = k.grad = None
    scale = torch.tensor(SCALE)
    row, _ = core.sim_lse(q, k, scale, backend="cpu")
    loss = (row - SCALE * (q * k).sum(-1)).mean()
    loss.backward()
    return loss.detach()


def dense_step(q, k):
    q.grad = k.grad = None
    logits = (q @ k.T) * SCALE
    loss = F.cross_entropy(logits, torch.arange(B))
    loss.backward()
    return loss.detach()


PROVIDERS = {"contrastive_ops-cpu": fused_step, "torch-dense": dense_step}

pytestmark = pytest.mark.skipif(not _cext.availability("cpu")[0], reason=f"cpu backend: {_cext.availability('cpu')[1]}")


@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_core_info_nce_fwd_bwd(benchmark, provider):
    fn = PROVIDERS[provider]
    q, k = _inputs()
    fn(q, k)  # warm-up (allocator, BLAS threads)
    peak = peak_extra_mib(lambda: fn(q, k))
    benchmark.extra_info.update(
        B=B, D=D, dtype="float32", threads=torch.get_num_threads(), peak_extra_mib=round(peak, 1),
        malloc_pinned=_MALLOC_PINNED,
    )
    benchmark.pedantic(fn, args=(q, k), rounds=3, iterations=1, warmup_rounds=0)


def test_core_memory_vs_dense(benchmark):
    """Same loss and gradients as the dense step, at ≤ 10 % of its peak memory."""
    q, k = _inputs()
    fused_step(q, k)
    dense_step(q, k)
    loss_f = fused_step(q, k)
    gq, gk = q.grad.clone(), k.grad.clone()
    loss_d = dense_step(q, k)
    torch.testing.assert_close(loss_f, loss_d, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.grad, gq, atol=1e-6, rtol=1e-3)
    torch.testing.assert_close(k.grad, gk, atol=1e-6, rtol=1e-3)
    peak_f = peak_extra_mib(lambda: fused_step(q, k))
    peak_d = peak_extra_mib(lambda: dense_step(q, k))
    benchmark.extra_info.update(peak_fused_mib=round(peak_f, 1), peak_dense_mib=round(peak_d, 1),
                                ratio=round(peak_f / peak_d, 4))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert peak_f <= 0.10 * peak_d, f"fused peak {peak_f:.1f} MiB vs dense {peak_d:.1f} MiB"
