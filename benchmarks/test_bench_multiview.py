r"""Multi-view losses (``mv_infonce``, ``mv_dhel``): every provider, forward + backward, time and peak memory.

Providers:

* ``cpu`` / ``cuda`` / ``triton``: the library's fused composition on that
  kernel backend (never stores a (V·N)² matrix).  Skipped, with the dispatch
  point's reason, where the backend cannot run here; Triton is timed on CUDA
  only (under the interpreter its timings mean nothing).
* ``reference``: the plain-PyTorch backend, the dense formula; the baseline.
* ``compile``: ``torch.compile(dynamic=True)`` of the reference
  (``contrastive_ops.benchmarking.cases``: one compilation per loss, its cost in
  the first, untimed call).
* ``official``: the official naive code (``mv_infonce_released`` /
  ``mv_dhel_released`` of ``contrastive_ops.losses.multiview``): the
  (V·N)×(V·N) exp-Gram with its diagonal removed (MV-DHEL: V exp-Grams of N×N,
  the official ``CL_2`` sum-of-logs form, which does not overflow).  Inputs in
  bf16/fp16 run it under ``torch.autocast`` (Gram product in that dtype, exp,
  sum and log in fp32), as AMP training runs that code.

Dense providers (``reference``, ``compile``, ``official``) whose estimated peak
(``DENSE_BYTES_PER_ELEM`` fp32-sized buffers of every similarity entry, measured
at small sizes: 4.4-5.3× for the references, 2.4-6.8× for the official code, with a
margin) exceeds ``DENSE_LIMIT_BYTES`` are skipped with the bytes in the reason.

Correctness: once per case, outside the timed loop (the provider's first,
untimed call), its forward value is compared with the reference's; the reference
itself, and every provider where the dense reference does not fit, with the
same loss computed in fp32 by row blocks (``_blocked_value``, no (V·N)²
buffer).  Per-dtype tolerances; a wrong provider fails its test.

Grid (``NV`` = N·V, the number of embeddings; N = NV / V instances):

* CUDA: axes NV ∈ {8192, 32768, 131072, 262144}, V ∈ {2, 4, 8}, D ∈ {128, 512},
  dtype ∈ {bfloat16, float32}.  The full product (48 points × 2 losses × 6
  providers) does not fit a run of a few minutes, so the default is a star
  around NV=32768, V=4, D=128, bf16: every NV at that V, D, dtype, plus one
  axis changed at a time (V=2, V=8, D=512, fp32).  8 points; the cheap ones
  first, so that a deadline cuts the largest.
* CPU: NV=8192, V ∈ {2, 4}, D=128, float32.

Environment (the conventions of ``test_bench_losses.py``):

* ``CONTRASTIVE_OPS_BENCH_MV_NV``, ``..._MV_VIEWS``, ``..._MV_DIMS``,
  ``..._MV_DTYPES``: comma-separated axis values (dtypes by name: bfloat16,
  float16, float32); when any is set, or ``CONTRASTIVE_OPS_BENCH_MV_GRID=full``,
  the grid is the full product of the axes (unset axes keep their defaults).
  NV values not divisible by V are left out;
* ``CONTRASTIVE_OPS_BENCH_MV_LOSSES``: ``mv_infonce,mv_dhel`` (default both);
* ``CONTRASTIVE_OPS_BENCH_COMPILE=1``: also time ``torch.compile`` on CPU
  (always on CUDA; on CPU compiling takes tens of seconds per shape);
* ``CONTRASTIVE_OPS_BENCH_ROUNDS``: timed rounds (default 5 on CUDA, 3 on CPU);
* ``CONTRASTIVE_OPS_BENCH_DENSE_LIMIT_GIB``: the dense limit (default 40 on
  CUDA, 4 on CPU);
* ``CONTRASTIVE_OPS_BENCH_DEADLINE_S``: seconds after the module's import
  after which the remaining benchmarks are skipped ("deadline"), so that a run
  under a time limit still ends and writes its JSON;
* ``CONTRASTIVE_OPS_BENCH_THREADS``: ``torch.set_num_threads`` (CPU timings on
  a machine loaded beyond its cores mean little with several threads).

``extra_info`` of each benchmark: loss, provider, device, dtype, N, V, D, NV,
``flops`` (the minimal count of ``cases``: 6·(V·N)²·D for MV-InfoNCE, V·6·N²·D
for MV-DHEL) and ``flop_per_s`` (from the median), ``peak_mem_bytes`` (one
separate step, ``contrastive_ops.benchmarking.measure.peak_memory``), the
checked ``loss_value`` and what it was ``checked_against``, and, when the
reference ran earlier in the session on the same case, ``time_ratio`` and
``mem_ratio`` (provider / reference; the CPU goal is time_ratio ≤ 1 and
mem_ratio ≤ 0.10).

Run::

    PYTHONPATH=. pytest benchmarks/test_bench_multiview.py --benchmark-only \
        --benchmark-json=multiview.json

``--benchmark-disable`` runs each case once (correctness check and one step;
no peak memory), as a quick test of the file: unless
``CONTRASTIVE_OPS_BENCH_MV_NV`` is set, at NV=512 on CPU (8192 on CUDA) only.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

from contrastive_ops.benchmarking import cases as C
from contrastive_ops.benchmarking import measure as M
from contrastive_ops.losses import multiview as mv

_START = time.monotonic()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
TAU = {"mv_infonce": 0.1, "mv_dhel": 0.2}  # the library's defaults
# Per case the reference first (the ratios need its median), torch.compile last (its compilations
# are the longest first calls).
PROVIDERS = ("reference", "cpu", "cuda", "triton", "official", "compile")
DENSE = ("reference", "compile", "official")
# Peak bytes of a dense fwd+bwd step per similarity entry: measured 4.4-5.3 fp32 buffers (references),
# 2.4-3.6 (official code) at N·V = 1024-2048 (up to 6.8 at N·V = 512); 8 leaves a margin.
DENSE_BYTES_PER_ELEM = 8 * 4
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def _env_list(name, default, conv=int):
    raw = os.environ.get(name)
    return [conv(s.strip()) for s in raw.split(",") if s.strip()] if raw else list(default)


def _dtype(name):
    return getattr(torch, name.replace("torch.", ""))


if CUDA:
    _NV, _VIEWS, _DIMS, _DTYPES = [8192, 32768, 131072, 262144], [2, 4, 8], [128, 512], ["bfloat16", "float32"]
else:
    _NV, _VIEWS, _DIMS, _DTYPES = [8192], [2, 4], [128], ["float32"]
_AXES = ("CONTRASTIVE_OPS_BENCH_MV_NV", "CONTRASTIVE_OPS_BENCH_MV_VIEWS", "CONTRASTIVE_OPS_BENCH_MV_DIMS",
         "CONTRASTIVE_OPS_BENCH_MV_DTYPES")
NV_AXIS = _env_list(_AXES[0], _NV)
V_AXIS = _env_list(_AXES[1], _VIEWS)
D_AXIS = _env_list(_AXES[2], _DIMS)
DTYPE_AXIS = [_dtype(s) for s in _env_list(_AXES[3], _DTYPES, str)]
FULL = not CUDA or os.environ.get("CONTRASTIVE_OPS_BENCH_MV_GRID") == "full" or any(os.environ.get(a) for a in _AXES)
LOSSES = _env_list("CONTRASTIVE_OPS_BENCH_MV_LOSSES", ["mv_infonce", "mv_dhel"], str)
COMPILE = CUDA or os.environ.get("CONTRASTIVE_OPS_BENCH_COMPILE") == "1"
ROUNDS = int(os.environ.get("CONTRASTIVE_OPS_BENCH_ROUNDS", "5" if CUDA else "3"))
DENSE_LIMIT_BYTES = int(float(os.environ.get("CONTRASTIVE_OPS_BENCH_DENSE_LIMIT_GIB", "40" if CUDA else "4")) * 2**30)
DEADLINE_S = float(os.environ.get("CONTRASTIVE_OPS_BENCH_DEADLINE_S", "inf"))
if os.environ.get("CONTRASTIVE_OPS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["CONTRASTIVE_OPS_BENCH_THREADS"]))


# Without timing (--benchmark-disable) and without axes given, one small size: a quick check of every provider.
_QUICK_NV = [8192] if CUDA else [512]


def _grid(nv_axis):
    """(NV, V, D, dtype) points, cheapest first."""
    if FULL:
        pts = [(nv, v, d, dt) for nv in nv_axis for v in V_AXIS for d in D_AXIS for dt in DTYPE_AXIS]
    else:  # star around the centre point (see the module docstring)
        nv0 = 32768 if 32768 in nv_axis else min(nv_axis)
        v0, d0, dt0 = 4, 128, torch.bfloat16
        pts = [(nv, v0, d0, dt0) for nv in nv_axis]
        pts += [(nv0, v, d0, dt0) for v in V_AXIS if v != v0]
        pts += [(nv0, v0, d, dt0) for d in D_AXIS if d != d0]
        pts += [(nv0, v0, d0, dt) for dt in DTYPE_AXIS if dt != dt0]
    pts = [p for p in dict.fromkeys(pts) if p[0] % p[1] == 0]
    return sorted(pts, key=lambda p: (p[0] * p[0] * p[2] * p[3].itemsize, p[1]))


def pytest_generate_tests(metafunc):
    if "prov" not in metafunc.fixturenames:
        return
    quick = metafunc.config.getoption("benchmark_disable", False) and not os.environ.get(_AXES[0])
    params = [(loss, *pt, prov) for pt in _grid(_QUICK_NV if quick else NV_AXIS) for loss in LOSSES
              for prov in PROVIDERS]
    metafunc.parametrize("loss,nv,v,d,dt,prov", params, ids=[_id(*p) for p in params])


def _size(b):
    return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _id(loss, nv, v, d, dt, prov):
    return f"{loss}-NV{nv}-V{v}-D{d}-{str(dt).replace('torch.', '')}-{prov}"


# ---------------------------------------------------------------------------------------------
# Inputs, implementations, the expected value
# ---------------------------------------------------------------------------------------------


def _inputs(loss, nv, v, d, dt) -> C.Inputs:
    n = nv // v
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, v, d, generator=g).to(DEVICE, dt).requires_grad_(True)
    inp = C.Inputs((feats,), dict(temperature=TAU[loss]), {"features": [n, v, d]}, None)
    flops = C._mv_infonce_flops if loss == "mv_infonce" else C._mv_dhel_flops
    inp.flops = flops(inp, n, d, "default")
    return inp


def _dense_elems(loss, nv, v):
    n = nv // v
    return nv * nv if loss == "mv_infonce" else v * n * n


def _official(loss, dt):
    fn = mv.mv_infonce_released if loss == "mv_infonce" else mv.mv_dhel_released
    amp = dt in (torch.float16, torch.bfloat16)

    def run(inp):
        with torch.autocast(DEVICE.type, dtype=dt, enabled=amp):
            return fn(*inp.args, inp.kwargs["temperature"])

    return C.Impl("official", "peer", run)


_IMPLS: dict = {}  # (loss, provider, dtype) -> Impl, so that compiled functions are built once


def _impl(loss, prov, inp, dt):
    """The provider's Impl, or the reason it cannot run here (str)."""
    if prov == "official":
        return _official(loss, dt)
    if prov == "triton" and not CUDA:
        return "Triton is timed on CUDA only (the interpreter is not a measure)"
    if prov == "compile" and not COMPILE:
        return "torch.compile on CPU: set CONTRASTIVE_OPS_BENCH_COMPILE=1"
    key = (loss, prov, dt)
    if key not in _IMPLS:
        name = "torch.compile(reference)" if prov == "compile" else prov
        impls = {i.name: i for i in C.implementations(C.CASES[loss], inp, peers=False, only=[name])}
        _IMPLS[key] = impls[name]
    impl = _IMPLS[key]
    return impl.why_not or impl


@torch.no_grad()
def _blocked_value(loss, x, tau):
    """The loss in fp32 by row blocks of the similarity (no (V·N)² buffer): the check where the dense
    reference does not fit.  x (N, V, D); the formulas of ``contrastive_ops.losses.multiview``."""
    n, v, _ = x.shape
    u = F.normalize(x.float(), dim=-1).transpose(0, 1).contiguous()  # (V, N, D) view-major
    scale = 1.0 / tau
    off = ~torch.eye(v, dtype=torch.bool, device=x.device)
    pair = torch.einsum("lnd,mnd->nlm", u, u) * scale  # (N, V, V)
    if loss == "mv_infonce":
        z = u.reshape(v * n, -1)
        rows = []
        blk = max(1, (1 << 28) // z.shape[0])
        for s in range(0, z.shape[0], blk):
            S = z[s:s + blk] @ z.T * scale
            S[torch.arange(S.shape[0], device=S.device), torch.arange(s, s + S.shape[0], device=S.device)] = -torch.inf
            rows.append(torch.logsumexp(S, 1))
        den = torch.logsumexp(torch.cat(rows).view(v, n), 0)
        num = torch.logsumexp(pair.masked_fill(~off, -torch.inf).reshape(n, v * v), 1)
        return (den - num).mean()
    unif = torch.zeros(n, device=x.device)
    blk = max(1, (1 << 28) // n)
    for l in range(v):
        for s in range(0, n, blk):
            S = u[l, s:s + blk] @ u[l].T * scale
            S[torch.arange(S.shape[0], device=S.device), torch.arange(s, s + S.shape[0], device=S.device)] = -torch.inf
            unif[s:s + blk] += torch.logsumexp(S, 1)
    upper = torch.ones(v, v, dtype=torch.bool, device=x.device).triu(1)
    align = torch.logsumexp(pair.masked_fill(~upper, -torch.inf).reshape(n, v * v), 1)
    return (unif - align).mean()


_EXPECTED: dict = {}  # case -> (value, what it is)
_BASELINE: dict = {}  # case -> (median s, peak bytes) of "reference"


def _expected(case, loss, inp, nv, v, prov):
    """What ``prov``'s value must equal: the dense reference where it fits, else (and for the reference
    itself) the row-block evaluation."""
    blocked = prov == "reference" or DENSE_BYTES_PER_ELEM * _dense_elems(loss, nv, v) > DENSE_LIMIT_BYTES
    key = (case, blocked)
    if key not in _EXPECTED:
        if blocked:
            val = _blocked_value(loss, inp.args[0].detach(), inp.kwargs["temperature"])
            _EXPECTED[key] = (float(val), "fp32 row-block evaluation")
        else:
            with torch.no_grad():
                val = C.CASES[loss].call("reference", inp)
            _EXPECTED[key] = (float(val), "reference")
    return _EXPECTED[key]


# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------


def test_multiview_fwd_bwd(benchmark, loss, nv, v, d, dt, prov):
    if time.monotonic() - _START > DEADLINE_S:
        pytest.skip(f"deadline of {DEADLINE_S:.0f}s (CONTRASTIVE_OPS_BENCH_DEADLINE_S) reached")
    if prov in DENSE:
        need = DENSE_BYTES_PER_ELEM * _dense_elems(loss, nv, v)
        if need > DENSE_LIMIT_BYTES:
            pytest.skip(f"dense similarity buffers: about {_size(need)} ({need} bytes) estimated, over the limit "
                        f"of {_size(DENSE_LIMIT_BYTES)} (CONTRASTIVE_OPS_BENCH_DENSE_LIMIT_GIB)")
    inp = _inputs(loss, nv, v, d, dt)
    impl = _impl(loss, prov, inp, dt)
    if isinstance(impl, str):
        pytest.skip(f"{prov}: {impl}")
    case = (loss, nv, v, d, dt)
    step = M.make_step(impl, inp)

    def run():
        step()
        if CUDA:
            torch.cuda.synchronize()

    try:
        expected, against = _expected(case, loss, inp, nv, v, prov)
        # First call (compilation, autotuning), with autograd on: the graph the timed steps run.
        value = float(impl.run(inp).detach())
        peak = None
        if not benchmark.disabled:
            run()
            peak = M.peak_memory(run, DEVICE)
    except Exception as e:  # noqa: BLE001
        why = M.unrunnable(e, DEVICE)
        if why is None:
            raise
        pytest.skip(f"{why}: {loss} NV={nv} V={v} D={d} {dt}")
    tol = TOL[dt]
    assert abs(value - expected) <= tol["atol"] + tol["rtol"] * abs(expected), (
        f"{prov} gives {loss} = {value!r}, {against} {expected!r} ({dt}, NV={nv}, V={v}, D={d})")

    benchmark.group = f"{loss} NV={nv} V={v} D={d} {str(dt).replace('torch.', '')} {DEVICE.type}"
    benchmark.extra_info.update(
        loss=loss, provider=prov, device=str(DEVICE), dtype=str(dt).replace("torch.", ""), N=nv // v, V=v, D=d,
        NV=nv, flops=inp.flops, step="fwd+bwd", loss_value=value, checked_against=against, expected=expected,
        threads=torch.get_num_threads())
    if peak is not None:
        benchmark.extra_info["peak_mem_bytes"] = int(peak)
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1 if CUDA else 0)
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    if median:
        benchmark.extra_info["flop_per_s"] = inp.flops / median
        if prov == "reference":
            _BASELINE[case] = (median, peak)
        elif case in _BASELINE:
            base_t, base_peak = _BASELINE[case]
            benchmark.extra_info["time_ratio"] = median / base_t
            if peak is not None and base_peak:
                benchmark.extra_info["mem_ratio"] = peak / base_peak
