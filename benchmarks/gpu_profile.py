"""Where a fused step's GPU time goes: the kernels of one forward + backward, and what the compiler made.

    python benchmarks/gpu_profile.py [--cases clip_loss:16384:512,nt_xent:16384:512] [--backends triton,cuda]
                                     [--json out.json]

For each case (loss:B:D, bf16, the inputs of ``gpu_quick``) and backend: the
step is run twice (compiles, autotunes), then three times under
``torch.profiler``; each kernel's name, launches per step and device time per
step are printed, with the sum of kernel time against the step's wall time
(CUDA events) — a large gap is launch overhead or host work.  At the end, for
every Triton kernel of the package that was compiled: the config the
autotuner chose per key and, per compiled variant, registers, spills, shared
memory, warps and stages (``CompiledKernel`` metadata).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_quick import _cases  # noqa: E402 - the same inputs as the timing script

STEPS = 3


def _device_us(evt) -> float:
    for name in ("device_time_total", "cuda_time_total", "self_device_time_total"):
        v = getattr(evt, name, None)
        if v:
            return float(v)
    return 0.0


def profile_case(loss: str, B: int, D: int, backend: str) -> dict:
    cases = _cases(B, D, torch.bfloat16)
    fn, leaves, _, _ = cases[loss]

    def step():
        torch.autograd.grad(fn(backend), leaves)

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(STEPS):
        step()
    t1.record()
    torch.cuda.synchronize()
    wall_ms = t0.elapsed_time(t1) / STEPS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = _device_us(evt)
        if us <= 0:
            continue
        rows.append(dict(kernel=evt.key, launches=evt.count / STEPS, ms=us / 1e3 / STEPS))
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    print(f"\n{loss} B={B} D={D} bf16 {backend}: wall {wall_ms:.2f} ms/step, kernels {total:.2f} ms/step", flush=True)
    for r in rows[:14]:
        print(f"  {r['ms']:9.3f} ms  {r['launches']:5.1f}x  {r['kernel'][:110]}", flush=True)
    return dict(loss=loss, B=B, D=D, backend=backend, wall_ms=wall_ms, kernel_ms=total, kernels=rows)


def compiled_kernels() -> list:
    """The autotuner's choices and the compiled variants of every Triton kernel of the package."""
    import importlib

    out = []
    for mod_name in ("sim_lse_fwd", "sim_lse_bwd", "siglip", "sinkhorn", "swav_ce"):
        try:
            mod = importlib.import_module(f"contrastive_ops.backends._triton.{mod_name}")
        except Exception as e:  # listed, not hidden
            print(f"{mod_name}: not imported ({e})")
            continue
        for name, obj in sorted(vars(mod).items()):
            try:
                row = _kernel_row(mod_name, name, obj)
            except Exception as e:  # listed, not hidden
                print(f"{mod_name}.{name}: not read ({type(e).__name__}: {e})")
                continue
            if row is not None:
                out.append(row)
    return out


def _kernel_row(mod_name: str, name: str, obj):
    """One kernel's autotune choices and compiled variants (None if it has none)."""
    fn = getattr(obj, "fn", obj)
    caches = getattr(fn, "device_caches", None)
    if caches is None:
        return None
    chosen = {str(k): str(v) for k, v in getattr(obj, "cache", {}).items()}
    variants = []
    for dev_cache in caches.values():
        kernel_cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
        for key, ck in getattr(kernel_cache, "items", lambda: [])():
            try:
                ck._init_handles()
            except Exception:
                pass
            md = getattr(ck, "metadata", None)
            variants.append(dict(
                regs=getattr(ck, "n_regs", None), spills=getattr(ck, "n_spills", None),
                shared=getattr(md, "shared", None), warps=getattr(md, "num_warps", None),
                stages=getattr(md, "num_stages", None),
                key=str(key)[:400],
            ))
    if not (chosen or variants):
        return None
    print(f"\n{mod_name}.{name}: {len(variants)} compiled")
    for k, v in chosen.items():
        print(f"  chosen {v}  for key {k[:140]}")
    for v in variants:
        print(f"  regs {v['regs']} spills {v['spills']} smem {v['shared']} w{v['warps']} s{v['stages']}  {v['key'][:200]}")
    return dict(module=mod_name, kernel=name, chosen=chosen, variants=variants)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="clip_loss:16384:512,nt_xent:16384:512,siglip_loss:16384:512")
    p.add_argument("--backends", default="triton,cuda")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"configs {os.environ.get('CONTRASTIVE_OPS_TRITON_CONFIGS', 'tune')}", flush=True)
    results = []
    for case in a.cases.split(","):
        loss, B, D = case.split(":")
        for be in a.backends.split(","):
            try:
                results.append(profile_case(loss, int(B), int(D), be))
            except Exception as e:  # recorded, not hidden
                print(f"\n{loss} B={B} D={D} {be}: {type(e).__name__}: {e}", flush=True)
                results.append(dict(loss=loss, B=int(B), D=int(D), backend=be, error=f"{type(e).__name__}: {e}"))
            torch.cuda.empty_cache()
    kernels = compiled_kernels()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cases=results,
                           compiled=kernels), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
