r"""How long the Triton kernels take to compile in a GPU test run, from what the tests launch.

A GPU run compiles one binary per kernel and specialization it launches: the
dtypes of the tensor arguments, Triton's classes of the integer arguments (1,
divisible by 16, other), the constexprs, and — per autotune key — one config
with ``CONTRASTIVE_OPS_TRITON_CONFIGS=default`` (all of the kernel's list with
``tune``).  This script runs pytest under Triton's interpreter on this CPU
machine and records every launch as the key the GPU would compile for: the
constexprs that follow D (``BLOCK_D``, ``BLOCK_DO``, ``ONE_CHUNK``, ``REUSE``,
``BLOCK_DP``) are replaced by the GPU's D layout from the modules' own helpers,
and the autotuned block sizes are dropped (one config per key with
``default``).  The count times the per-config compile time measured by the
sm_90a compile gate (the medians per dtype in
``benchmarks/results/triton-sm90-static-<minor>.json`` of the installed
Triton, on this 2-core machine) is the model of the test step's compile time.

    python benchmarks/compile_time_model.py tests/test_triton_kernels.py tests/test_swav.py -x -q
    python benchmarks/compile_time_model.py --from-keys keys.json     # reuse a recorded run

It is a model: the GPU machine's CPU may compile faster, the interpreter tests
choose their own shapes (a GPU run of the same files launches the same
dtypes, flags and D values), and configs per key with ``tune`` come from the
kernels' lists (``--tune``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import Counter
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_D_DERIVED = ("BLOCK_D", "BLOCK_DO", "ONE_CHUNK", "REUSE", "BLOCK_DP", "BLOCK_K", "BLOCK_B")
_AUTOTUNED = ("BLOCK_M", "BLOCK_N", "BLOCK")


def _int_class(v: int) -> str:
    return "1" if v == 1 else "16" if v % 16 == 0 else "x"


def _gpu_layout(D: int, dtype: str) -> str:
    """The GPU's D layout of the sim_lse / SigLIP kernels for feature dtype ``dtype`` ("bf16", "fp16",
    "fp32"), from the tile library's GPU helpers (the ones the compile specs use)."""
    from contrastive_ops.backends._triton import sim_lse, tiles

    dp = tiles.d_pad(D) if D <= sim_lse._ATOMIC_MAX_D else 0
    return f"D:{tiles.gpu_chunk_d(D, dtype)}/{tiles.gpu_block_do(D, dtype)}/{dp}"


def _key(fn, args, kwargs) -> str:
    import torch

    names = list(fn.arg_names)
    parts = [fn.__name__]
    # Arguments the kernel does not specialize (do_not_specialize; the interpreter keeps the
    # decorator's keywords in .kwargs) compile once whatever their value.
    fixed = set(getattr(fn, "do_not_specialize", None) or (getattr(fn, "kwargs", None) or {}).get(
        "do_not_specialize", ()) or ())
    bound = dict(zip(names, args))
    bound.update(kwargs)
    # The feature dtype: the first 16-bit tensor argument, else fp32 (as in _dtype_of).
    dts = {str(v.dtype).replace("torch.", "") for v in bound.values() if isinstance(v, torch.Tensor)}
    feat = "bf16" if "bfloat16" in dts else "fp16" if "float16" in dts else "fp32"
    for n in names:
        v = bound.get(n)
        if n in _AUTOTUNED:
            continue
        if n in _D_DERIVED or n in fixed:
            continue
        if isinstance(v, torch.Tensor):
            parts.append(f"{n}:{str(v.dtype).replace('torch.', '')}")
        elif isinstance(v, bool) or not isinstance(v, int):
            parts.append(f"{n}={v}")
        elif n == "D":
            parts.append(_gpu_layout(v, feat))
        elif n == "K":
            parts.append(f"K:{min(1 << max(v - 1, 0).bit_length(), 1024)}/{_int_class(v)}")
        else:
            parts.append(f"{n}:{_int_class(v)}")
    return " ".join(parts)


class Recorder:
    """pytest plugin: records the GPU compile key of every interpreted kernel launch."""

    def __init__(self):
        self.keys: Counter = Counter()

    def pytest_configure(self, config):
        import triton.runtime.interpreter as interp

        orig = interp.InterpretedFunction.run
        rec = self.keys

        def run(fn_self, *args, grid, warmup, **kwargs):
            try:
                rec[_key(fn_self, args, kwargs)] += 1
            except Exception as e:  # noqa: BLE001 - a launch the model cannot key is counted as such
                rec[f"{getattr(fn_self, '__name__', '?')} (unkeyed: {type(e).__name__})"] += 1
            return orig(fn_self, *args, grid=grid, warmup=warmup, **kwargs)

        interp.InterpretedFunction.run = run


def _compile_seconds() -> Dict[tuple, float]:
    """Median compile time of one config per (kernel, dtype) and per dtype, from the compile gate's cache of
    the installed Triton's minor version."""
    from contrastive_ops.backends._triton.specs import cache_path

    with open(cache_path()) as f:
        rows = [r for r in json.load(f)["rows"].values() if r.get("compile_s")]
    out = {}
    for dt in ("bf16", "fp16", "fp32"):
        ts = [r["compile_s"] for r in rows if r["dtype"] == dt]
        if ts:
            out[(None, dt)] = statistics.median(ts)
        for fn in {r.get("fn_name") for r in rows}:
            ts = [r["compile_s"] for r in rows if r["dtype"] == dt and r.get("fn_name") == fn]
            if fn and ts:
                out[(fn, dt)] = statistics.median(ts)
    return out


def _dtype_of(key: str) -> str:
    """The feature dtype of a key: the first 16-bit tensor argument, else fp32."""
    if ":bfloat16" in key:
        return "bf16"
    if ":float16" in key:
        return "fp16"
    return "fp32"


def _n_configs(kernel: str) -> int:
    """Configs per autotune key with CONTRASTIVE_OPS_TRITON_CONFIGS=tune (the kernels' GPU lists)."""
    from contrastive_ops.backends._triton import tiles as t

    # The dk kernel's wide form (_bwd_dk_wide_kernel) is the same function with DK_WIDE_GPU.
    lists = {"_fwd_kernel": t.FWD_N_GPU, "_bwd_dq_kernel": t.BWD_DQ_GPU, "_bwd_dk_kernel": t.BWD_GPU,
             "_bwd_atomic_kernel": t.BWD_ATOMIC_GPU, "_gram_fwd_kernel": t.SYM_FWD_GPU,
             "_gram_bwd_kernel": t.SYM_BWD_GPU, "_gram_bwd_atomic_kernel": t.SYM_ATOMIC_GPU,
             "_siglip_fwd_kernel": t.FWD_GPU, "_siglip_bwd_dx_kernel": t.BWD_DQ_GPU, "_siglip_bwd_dy_kernel": t.BWD_GPU}
    return len(lists.get(kernel, [None]))


def report(keys: List[str], tune: bool = False, limit_s: float = 120.0) -> str:
    secs = _compile_seconds()
    per_kernel: Counter = Counter()
    total = 0.0
    n = 0
    for k in keys:
        kern = k.split(" ", 1)[0]
        c = _n_configs(kern) if tune else 1
        per_kernel[kern] += c
        n += c
        dt = _dtype_of(k)
        total += c * secs.get((kern, dt), secs.get((None, dt), max(secs.values()) if secs else 5.0))
    lines = [f"{'kernel':<36} {'configs':>8}"]
    lines += [f"{k:<36} {v:>8}" for k, v in sorted(per_kernel.items())]
    lines.append(f"\n{n} configs compiled ({'tune: every config of the lists' if tune else 'default: one per key'}); "
                 f"compile time per config (median, this machine): "
                 + ", ".join(f"{d} {s:.1f} s" for (k, d), s in secs.items() if k is None)
                 + " (per kernel where the gate compiled it)")
    lines.append(f"model of the compile time: {total:.0f} s serial "
                 f"({'within' if total <= limit_s else 'OVER'} a {limit_s:.0f} s test step)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--from-keys", help="a keys JSON written by an earlier run (--keys-out)")
    p.add_argument("--keys-out", help="write the recorded keys here")
    p.add_argument("--tune", action="store_true", help="count every config of the autotune lists")
    p.add_argument("--limit", type=float, default=120.0, help="the test step's time limit (gpu_run.sh: 120 s)")
    a, pytest_args = p.parse_known_args(argv)
    if a.from_keys:
        with open(a.from_keys) as f:
            keys = json.load(f)
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        sys.path.insert(0, ROOT)
        import pytest

        rec = Recorder()
        rc = pytest.main(["-p", "no:cacheprovider", *pytest_args], plugins=[rec])
        keys = sorted(rec.keys)
        if rc not in (0, 1):
            print(f"pytest exited with {rc}", file=sys.stderr)
    if a.keys_out:
        with open(a.keys_out, "w") as f:
            json.dump(keys, f, indent=0)
    print(report(keys, a.tune, a.limit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
