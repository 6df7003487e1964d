"""CPU benchmark of ``info_nce`` with a MoCo queue against plain PyTorch's ``[q·k⁺, q·Qᵀ]`` logits.

Workload, forward + backward, fp32, τ = 0.2, a detached queue of K = 65,536
entries, B = 4,096 queries and keys, D = 128 and 256::

    moco     in_batch_negatives=False: candidates = own key ∪ queue (MoCo v2)
             plain: l_pos = Σ q̂·k̂ (B,1), l_neg = q̂ Q̂ᵀ (B,K), CE(cat/τ, 0)
    batch    in_batch_negatives=True: candidates = all keys ∪ queue
             plain: CE(cat(q̂ k̂ᵀ, q̂ Q̂ᵀ)/τ, arange(B))

The plain form stores B×(K+1) logits (1 GiB in fp32 at these sizes) and their
softmax and gradient; the fused one never forms a B×K tile larger than the
kernel's blocks.  Peak memory is the step's peak resident set size above the
one before it (``peak_extra_mib`` of ``test_bench_cpu_core.py``: VmHWM reset
by ``/proc/self/clear_refs``, glibc's mmap threshold pinned so freed tensors
leave the resident set).  Timing interleaves the providers (fused, plain,
fused, ...) and takes medians, since the machine is shared.

Run: ``PYTHONPATH=. python -m pytest benchmarks/test_bench_queue.py --benchmark-only -s``
(``BENCH_ROUNDS`` sets the rounds, default 3; ``BENCH_QUEUE_DIMS=128,256``).
Results: ``benchmarks/results/cpu-queue-<date>.md``.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.backends import _cext

from test_bench_cpu_core import _MALLOC_PINNED, peak_extra_mib

B, K, TAU = 4096, 65536, 0.2
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
DIMS = [int(d) for d in os.environ.get("BENCH_QUEUE_DIMS", "128,256").split(",")]

pytestmark = pytest.mark.skipif(not _cext.availability("cpu")[0], reason=f"cpu backend: {_cext.availability('cpu')[1]}")


def _inputs(d: int):
    g = torch.Generator().manual_seed(d)
    q = torch.randn(B, d, generator=g).requires_grad_()
    k = torch.randn(B, d, generator=g).requires_grad_()
    queue = F.normalize(torch.randn(K, d, generator=g), dim=-1)  # a MoCo queue: unit rows, no grad
    return q, k, queue


def _plain(q, k, queue, in_batch: bool):
    qn, kn, Qn = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(queue, dim=-1)
    if in_batch:
        logits = torch.cat([qn @ kn.T, qn @ Qn.T], dim=1) / TAU
        return F.cross_entropy(logits, torch.arange(q.shape[0]))
    l_pos = (qn * kn).sum(dim=1, keepdim=True)
    logits = torch.cat([l_pos, qn @ Qn.T], dim=1) / TAU
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def _fused(q, k, queue, in_batch: bool):
    return co.info_nce(q, k, TAU, queue=queue, in_batch_negatives=in_batch, backend="cpu")


def _step(fn, q, k, queue, in_batch):
    q.grad = k.grad = None
    loss = fn(q, k, queue, in_batch)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("mode", ["moco", "batch"])
def test_queue_vs_plain_pytorch(benchmark, mode, d):
    """Same loss and gradients as the plain logits; interleaved timing; peak memory ≤ 10 % of plain's."""
    q, k, queue = _inputs(d)
    in_batch = mode == "batch"
    providers = {"cpu": _fused, "plain": _plain}
    loss_f = _step(_fused, q, k, queue, in_batch)
    gq, gk = q.grad.clone(), k.grad.clone()
    loss_p = _step(_plain, q, k, queue, in_batch)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gq, q.grad, atol=1e-7, rtol=1e-3)
    torch.testing.assert_close(gk, k.grad, atol=1e-7, rtol=1e-3)

    times = {n: [] for n in providers}
    load = [os.getloadavg()[0]]
    for _ in range(ROUNDS):
        for name, fn in providers.items():
            t0 = time.perf_counter()
            _step(fn, q, k, queue, in_batch)
            times[name].append(time.perf_counter() - t0)
    load.append(os.getloadavg()[0])
    med = {n: statistics.median(v) for n, v in times.items()}
    peak = {n: peak_extra_mib(lambda fn=fn: _step(fn, q, k, queue, in_batch)) for n, fn in providers.items()}
    info = dict(mode=mode, B=B, K=K, D=d, dtype="float32", threads=torch.get_num_threads(), rounds=ROUNDS,
                loadavg_1min=[round(x, 2) for x in load], malloc_pinned=_MALLOC_PINNED,
                median_s={n: round(v, 3) for n, v in med.items()},
                peak_extra_mib={n: round(v, 1) for n, v in peak.items()},
                time_ratio=round(med["cpu"] / med["plain"], 3), mem_ratio=round(peak["cpu"] / peak["plain"], 4))
    benchmark.extra_info.update(info)
    print(f"\nqueue {mode} D={d}: {info}")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert peak["cpu"] <= 0.10 * peak["plain"], f"fused peak {peak['cpu']:.1f} MiB vs plain {peak['plain']:.1f} MiB"
