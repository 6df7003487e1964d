"""pytest-benchmark suite: every loss × implementation (backends, peers) × batch size.

Inputs, FLOP counts, the implementations (the library's backends, with the
plain-PyTorch ``"reference"`` as the baseline, and the peer adapters) all come
from ``contrastive_ops.benchmarking.cases``, the module the command line uses
too; nothing here re-implements a loss.

Run::

    PYTHONPATH=. pytest benchmarks/test_bench_losses.py --benchmark-only \
        --benchmark-json=losses.json

Environment:

* ``CONTRASTIVE_OPS_BENCH_SIZES``: comma-separated batch sizes (default
  256,1024 on CPU; 1024,4096,16384 on CUDA);
* ``CONTRASTIVE_OPS_BENCH_DIM``: feature dimension (default 128);
* ``CONTRASTIVE_OPS_BENCH_COMPILE=1``: also time ``torch.compile`` of the
  reference on CPU (on CUDA it is always included; on CPU compiling alone
  takes tens of seconds per loss and size).

``extra_info`` of each benchmark: loss, implementation, device, dtype, shapes,
``flops`` (the documented minimal count, fwd+bwd), ``flop_per_s`` (from the
median), ``peak_mem_bytes`` (one separate step; see
``contrastive_ops.benchmarking.measure``).
"""
from __future__ import annotations

import os

import pytest
import torch

from contrastive_ops.benchmarking import cases as C
from contrastive_ops.benchmarking import measure as M

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32
DIM = int(os.environ.get("CONTRASTIVE_OPS_BENCH_DIM", "128"))
_default_sizes = "1024,4096,16384" if DEVICE.type == "cuda" else "256,1024"
SIZES = [int(s) for s in os.environ.get("CONTRASTIVE_OPS_BENCH_SIZES", _default_sizes).split(",") if s.strip()]
COMPILE = DEVICE.type == "cuda" or os.environ.get("CONTRASTIVE_OPS_BENCH_COMPILE") == "1"
ROUNDS = 10 if DEVICE.type == "cuda" else 3


def _providers():
    """(loss, implementation name, reason it cannot run here or None) for every pair."""
    out = []
    for case in C.CASES.values():
        probe = case.make(8, DIM, DTYPE, DEVICE)
        for impl in C.implementations(case, probe, compile_reference=True):
            why = impl.why_not
            if why is None and impl.name == "torch.compile(reference)" and not COMPILE:
                why = "torch.compile on CPU: set CONTRASTIVE_OPS_BENCH_COMPILE=1"
            out.append((case.name, impl.name, why))
    return out


PROVIDERS = _providers()
# One Impl per (loss, implementation) for the whole session, so that compiled
# functions and peer modules are built once.
_IMPLS: dict = {}


def _impl(loss: str, name: str, inp):
    key = (loss, name)
    if key not in _IMPLS:
        _IMPLS[key] = {i.name: i for i in C.implementations(C.CASES[loss], inp)}[name]
    return _IMPLS[key]


@pytest.mark.parametrize("n", SIZES, ids=[f"N{n}" for n in SIZES])
@pytest.mark.parametrize("loss,impl_name,why", PROVIDERS, ids=[f"{l}-{i}" for l, i, _ in PROVIDERS])
def test_loss_fwd_bwd(benchmark, loss, impl_name, why, n):
    if why:
        pytest.skip(why)
    case = C.CASES[loss]
    inp = case.make(n, DIM, DTYPE, DEVICE)
    impl = _impl(loss, impl_name, inp)
    step = M.make_step(impl, inp)

    def run():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    try:
        run()  # first call: compilation, autotuning
        peak = M.peak_memory(run, DEVICE)
    except Exception as e:  # noqa: BLE001
        why = M.unrunnable(e, DEVICE)
        if why is None:
            raise
        pytest.skip(f"{why} at N={n}")
    benchmark.group = f"{loss} N={n} D={DIM} {str(DTYPE).replace('torch.', '')}"
    benchmark.extra_info.update(loss=loss, impl=impl_name, kind=impl.kind, device=str(DEVICE), dtype=str(DTYPE),
                                shapes=inp.shapes, flops=inp.flops, peak_mem_bytes=int(peak),
                                step="fwd+bwd" if inp.differentiable else "fwd")
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    if inp.flops and median:
        benchmark.extra_info["flop_per_s"] = inp.flops / median
