"""Benchmarks of point_token_contrast (forward + backward time and peak memory).

Providers, every one a library function:

* ``reference``: the plain-PyTorch padded-and-masked loss (B×G×G similarities
  for "cloud" and the cosine modes, |S|×|S| for "batch").
* ``padded``: for ``negatives="batch"``, the plain padded-and-masked form a
  user writes without compaction: the (B·G)×(B·G) logits of all tokens, the
  columns outside S masked to −inf, the rows outside S left out of the mean.
* ``released``: the released Point-CMAE formulation (bmm F1·F2ᵀ, row mask), for
  ``mode="cosine", pairing="official"`` only.
* ``linear``: the fused composition of the cosine modes (O(B·G·D), no core call;
  the same code every kernel backend runs).
* ``cpu`` / ``triton`` / ``cuda``: the fused InfoNCE composition on that
  kernel backend; skipped where it is not available.

Run::

    PYTHONPATH=. pytest benchmarks/test_bench_point_token.py --benchmark-only \
        --benchmark-json=point_token.json

Peak memory (``extra_info["peak_bytes"]``) is measured in one separate run: on
CUDA from the caching allocator's peak, on CPU from the profiler's
allocation events (approximate: frees inside one op are netted).  Shapes: the
Point-CMAE setting (B=128, G=64, D=384, mask ratio 0.6 in each branch) and
larger G and B (G up to 1024, B up to 512 on GPU; smaller on CPU).
"""
from __future__ import annotations


import pytest
import torch

import contrastive_ops as co
from contrastive_ops import backends
from contrastive_ops.losses import point_token as pt

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RATIO = 0.6
D = 384
if DEVICE.type == "cuda":
    SHAPES = [(128, 64), (512, 64), (128, 256), (512, 256), (128, 1024), (512, 1024)]
else:
    SHAPES = [(128, 64), (32, 256), (16, 1024)]

CASES = [
    ("cosine", "diag", "cloud"),
    ("cosine", "official", "cloud"),
    ("infonce", "diag", "cloud"),
    ("infonce", "diag", "batch"),
]
PROVIDERS = ["reference", "padded", "released", "linear", "cpu", "triton", "cuda"]
# Skip a dense provider whose largest similarity buffer would exceed this.
DENSE_LIMIT_BYTES = (16 << 30) if DEVICE.type == "cuda" else (1 << 30)


def _inputs(B, G, dtype=torch.float32):
    g = torch.Generator(device="cpu").manual_seed(0)
    f1 = torch.randn(B, G, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    f2 = torch.randn(B, G, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
    m1 = (torch.rand(B, G, generator=g) < RATIO).to(DEVICE)
    m2 = (torch.rand(B, G, generator=g) < RATIO).to(DEVICE)
    return f1, f2, m1, m2


def padded_batch_infonce(f1, f2, m1, m2, temperature=0.1):
    """Symmetric InfoNCE over all co-masked tokens of the batch, padded and masked (no compaction)."""
    B, G, Dm = f1.shape
    s = (m1 & m2).reshape(-1)
    a = torch.nn.functional.normalize(f1.reshape(B * G, Dm), dim=-1)
    b = torch.nn.functional.normalize(f2.reshape(B * G, Dm), dim=-1)
    logits = (a @ b.T / temperature).masked_fill(~s[None, :], float("-inf"))
    target = torch.arange(B * G, device=f1.device)
    ce = torch.nn.functional.cross_entropy
    rows = ce(logits, target, reduction="none") + ce(logits.T.masked_fill(~s[None, :], float("-inf")), target,
                                                     reduction="none")
    return torch.where(s, 0.5 * rows, 0).sum() / s.sum().clamp(min=1)


def _why_skip(provider, mode, pairing, negatives, B, G):
    if provider == "padded":
        if (mode, negatives) != ("infonce", "batch"):
            return "padded-and-masked form of negatives='batch' (the reference of the other cases is padded)"
        if 4 * (B * G) ** 2 > DENSE_LIMIT_BYTES:
            return f"dense buffer of {4 * (B * G) ** 2 / 2**30:.1f} GiB exceeds the benchmark limit"
        return None
    if provider == "released":
        return None if (mode, pairing) == ("cosine", "official") else "released code is the cosine/official loss"
    if provider == "linear":
        return None if mode == "cosine" else "linear form is for the cosine modes"
    if provider in ("cpu", "triton", "cuda"):
        if mode != "infonce":
            return "cosine modes run the 'linear' code on every backend"
        if provider == "triton" and DEVICE.type == "cpu":
            return "triton on CPU runs under the interpreter: not a benchmark"
        ok, why = co.available_backends()[provider]
        if not ok:
            return f"{provider}: {why}"
        if DEVICE.type not in backends.backend_module(provider).devices():
            return f"{provider} does not run on {DEVICE.type} tensors"
        return None
    # reference: dense buffers
    n = int(B * G * RATIO * RATIO * 1.1)
    elems = n * n if (mode == "infonce" and negatives == "batch") else B * G * G
    if 4 * elems > DENSE_LIMIT_BYTES:
        return f"dense buffer of {4 * elems / 2**30:.1f} GiB exceeds the benchmark limit"
    return None


def _loss_fn(provider, mode, pairing, negatives):
    kw = dict(mode=mode, pairing=pairing, negatives=negatives, temperature=0.1)
    if provider == "padded":
        return padded_batch_infonce
    if provider == "released":
        return lambda f1, f2, m1, m2: pt.point_cmae_released_loss(f1, f2, m1, m2)
    if provider == "linear":
        inv_t = torch.tensor(10.0, device=DEVICE)
        return lambda f1, f2, m1, m2: pt._fused_point_token_contrast(
            f1, f2, m1, m2, inv_t, mode=mode, pairing=pairing, negatives=negatives, backend="reference")
    return lambda f1, f2, m1, m2: co.point_token_contrast(f1, f2, m1, m2, backend=provider, **kw)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(step) -> int:
    """Peak memory allocated during one call of ``step`` above what was live before."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _check_against_reference(fn, f1, f2, m1, m2, mode, pairing, negatives, B, G):
    """Once per case, untimed: the provider's loss and gradients equal the reference backend's."""
    if _why_skip("reference", mode, pairing, negatives, B, G):
        return
    kw = dict(mode=mode, pairing=pairing, negatives=negatives, temperature=0.1)
    out = []
    for f in (fn, lambda *a: co.point_token_contrast(*a, backend="reference", **kw)):
        x1, x2 = f1.detach().clone().requires_grad_(), f2.detach().clone().requires_grad_()
        loss = f(x1, x2, m1, m2)
        loss.backward()
        out.append((loss.detach(), x1.grad, x2.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("B,G", SHAPES, ids=[f"B{b}-G{g}" for b, g in SHAPES])
@pytest.mark.parametrize("mode,pairing,negatives", CASES, ids=["-".join(c) for c in CASES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_point_token_fwd_bwd(benchmark, provider, mode, pairing, negatives, B, G):
    why = _why_skip(provider, mode, pairing, negatives, B, G)
    if why:
        pytest.skip(why)
    f1, f2, m1, m2 = _inputs(B, G)
    fn = _loss_fn(provider, mode, pairing, negatives)

    def step():
        f1.grad = f2.grad = None
        fn(f1, f2, m1, m2).backward()
        _sync()

    step()  # warm-up (kernel compilation, allocator)
    _check_against_reference(fn, f1, f2, m1, m2, mode, pairing, negatives, B, G)
    peak = _peak_bytes(step)
    benchmark.group = f"point_token {mode}/{pairing if mode == 'cosine' else negatives} B={B} G={G} D={D}"
    benchmark.extra_info.update(provider=provider, device=str(DEVICE), B=B, G=G, D=D, mask_ratio=RATIO,
                                comasked=int((m1 & m2).sum()), peak_bytes=int(peak))
    rounds = 3 if DEVICE.type == "cpu" else 10
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1 if DEVICE.type == "cuda" else 0)
