"""Sinkhorn-Knopp codes and the SwAV loss: every backend against SwAV's plain code, lightly and
flash-sinkhorn (CUDA only; codes only: it has no SwAV loss).

K = 3000 prototypes, 3 iterations, ε = 0.05, τ = 0.1; B from 256 up (CPU: to 8192, GPU: to 65536;
``CONTRASTIVE_OPS_BENCH_SWAV_SIZES``, comma-separated, sets them).  The codes of every provider but
flash-sinkhorn (checked in tests/test_benchmarking.py) are compared with the reference once per size,
outside the timed loop.
Run:  pytest benchmarks/test_bench_swav.py --benchmark-only [--benchmark-json out.json]
Providers that cannot run here are skipped with the reason.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses.swav import swav_released_loss, swav_released_sinkhorn

K = 3000
ITERS = 3
EPS = 0.05
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_default_sizes = "256,1024,4096,16384,65536" if DEVICE.type == "cuda" else "256,1024,4096,8192"
SIZES = [int(s) for s in os.environ.get("CONTRASTIVE_OPS_BENCH_SWAV_SIZES", _default_sizes).split(",") if s.strip()]


def _co_provider(name):
    def check():
        from contrastive_ops import backends

        try:
            avail = co.available_backends().get(name, (False, "unknown"))
            mod = backends.backend_module(name) if avail[0] else None
        except Exception as e:  # noqa: BLE001 - reported as the skip reason
            avail, mod = (False, f"{type(e).__name__}: {e}"), None
        if not avail[0]:
            pytest.skip(f"{name}: {avail[1]}")
        if DEVICE.type not in mod.devices() or "sinkhorn" not in mod.PRIMITIVES:
            pytest.skip(f"{name} backend has no sinkhorn primitive on {DEVICE.type}")
        if name == "triton" and DEVICE.type != "cuda":
            pytest.skip("Triton timings need a GPU (the interpreter is not a measure)")

    return check


def _lightly():
    mod = pytest.importorskip("lightly.loss.swav_loss")
    return mod


def _flash_sinkhorn():
    if DEVICE.type != "cuda":
        pytest.skip("flash-sinkhorn runs on CUDA tensors only")
    pytest.importorskip("flash_sinkhorn", reason="flash-sinkhorn is not installed (pip install flash-sinkhorn)")
    from contrastive_ops.benchmarking import peers

    return peers


# flash_sinkhorn: from the scores, embedded as K+1-dim points (exact for any scores, see
# peers.flash_sinkhorn_codes); flash_sinkhorn_points: from SwAV's unit-norm embeddings and
# prototypes (128-dim), the way a SwAV model would call it; its time excludes the scores' GEMM.
FLASH = ("flash_sinkhorn", "flash_sinkhorn_points")
PROVIDERS = ["swav_plain", "lightly", "reference", "cpu", "cuda", "triton", *FLASH]


def _sinkhorn_fn(provider):
    """A callable of (scores, z, prototypes) returning the codes (B, K)."""
    if provider == "flash_sinkhorn":
        peers = _flash_sinkhorn()
        return lambda s, z, c: peers.flash_sinkhorn_codes(s, EPS, ITERS)
    if provider == "flash_sinkhorn_points":
        peers = _flash_sinkhorn()
        return lambda s, z, c: peers.flash_sinkhorn_codes_from_points(c, z, s, EPS, ITERS)
    fn = _scores_sinkhorn_fn(provider)
    return lambda s, z, c: fn(s)


def _scores_sinkhorn_fn(provider):
    if provider == "swav_plain":
        return lambda s: swav_released_sinkhorn(s.float(), EPS, ITERS)
    if provider == "lightly":
        mod = _lightly()
        return lambda s: mod.sinkhorn(s, iterations=ITERS, epsilon=EPS)
    if provider != "reference":
        _co_provider(provider)()
    return lambda s: co.sinkhorn_knopp(s, EPS, ITERS, backend=provider)


def _loss_fn(provider):
    if provider in FLASH:
        pytest.skip("flash-sinkhorn computes codes only (no SwAV loss)")
    if provider == "swav_plain":
        return lambda crops: swav_released_loss([c.float() for c in crops], 0.1, (0, 1), EPS, ITERS)
    if provider == "lightly":
        loss = _lightly().SwaVLoss(temperature=0.1, sinkhorn_iterations=ITERS, sinkhorn_epsilon=EPS)
        return lambda crops: loss(crops[:2], crops[2:]).sum()
    if provider != "reference":
        _co_provider(provider)()
    return lambda crops: co.swav_loss(crops, 0.1, epsilon=EPS, iterations=ITERS, backend=provider)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _features(B, seed=0):
    """SwAV's unit-norm embeddings z (B, 128) and prototypes (K, 128)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    z = F.normalize(torch.randn(B, 128, generator=g), dim=1)
    c = F.normalize(torch.randn(K, 128, generator=g), dim=1)
    return z, c


def _scores(B, seed=0):
    z, c = _features(B, seed)
    return (z @ c.T).to(DEVICE)


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_sinkhorn(benchmark, provider, B):
    fn = _sinkhorn_fn(provider)
    z, c = (t.to(DEVICE) for t in _features(B))
    scores = z @ c.T
    benchmark.group = f"sinkhorn K={K} B={B} {DEVICE.type}"
    if provider not in FLASH:
        from contrastive_ops.primitives.sinkhorn import sinkhorn_reference

        torch.testing.assert_close(fn(scores, z, c).float(), sinkhorn_reference(scores.float(), EPS, ITERS),
                                   rtol=1e-3, atol=1e-6)

    def run():
        out = fn(scores, z, c)
        _sync()
        return out

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("B", SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_bench_swav_loss(benchmark, provider, B):
    """Forward + backward, two large crops (codes) and two small crops (predictions only)."""
    fn = _loss_fn(provider)
    crops = [_scores(B, seed=s).requires_grad_() for s in range(4)]
    benchmark.group = f"swav_loss fwd+bwd K={K} B={B} 4 crops {DEVICE.type}"

    def run():
        for c in crops:
            c.grad = None
        fn(crops).backward()
        _sync()

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
