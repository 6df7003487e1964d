"""How fast the Triton tile loops can run: the forward and the dS kernel over a wider config space.

    python benchmarks/gpu_tile_sweep.py [--cases 16384:16384:512,16384:16384:1024] [--kernels fwd,ds]
                                        [--blocks 64,128] [--warps 4,8] [--stages 2,3] [--reps 5]
                                        [--json out.json]

The cost model of the Triton backward (``contrastive_ops/backends/_triton/costs.py``)
takes the tile loop's rate from the H200 run of 2026-12-04: the forward at 237
TFLOP/s (D = 512) and 326 (D = 1024), with the default configs of the short
autotune lists.  Both the GEMM backward (the dS kernel runs the same loop) and
the "≥ 50 % of peak" goal hang on that rate.  This script times the two
kernels directly (their jitted functions, bypassing the autotuner) for every
candidate of a wider space: BLOCK_M and BLOCK_N in {64, 128}, 4 or 8 warps,
2 or 3 stages by default (``--blocks``, ``--warps``, ``--stages``), those whose
shared memory fits sm_90 (``tiles.fwd_smem``), with the
CLIP flags (bf16, column LSE, no masks) and the launcher's own split of the
columns (``fwd_plan`` with the given BLOCK_M).  Per case and kernel it
prints each candidate's time (median of ``--reps`` CUDA-event timings after two
warm-ups), TFLOP/s (2·B·M·D per pass) and its error against the fp32 formula
(a config with a wrong result is marked WRONG and never the best), the default
config's, and the best.  Failures (resources, compile errors) are listed, not
fatal; the exit status is 1 when a result is wrong or nothing ran.

On CPU (no CUDA) it runs under ``TRITON_INTERPRET=1`` on the shapes given, with
wall-clock times: a check that every launch is well-formed, not a measurement.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import torch
import triton

from contrastive_ops.backends._triton import sim_lse as ts
from contrastive_ops.backends._triton import tiles as tt

SPACE = dict(blocks=(64, 128), warps=(4, 8), stages=(2, 3))


def candidates(block_d: int, elem: int, interpreted: bool, space=None):
    """(BLOCK_M, BLOCK_N, warps, stages) with the forward tiles' shared memory within sm_90's limit."""
    if interpreted:
        return [(16, 16, 1, 1)]
    sp = space or SPACE
    out = []
    for bm, bn, w, s in itertools.product(sp["blocks"], sp["blocks"], sp["warps"], sp["stages"]):
        if tt.fwd_smem(bm, bn, block_d, s, elem) <= tt.SMEM_LIMIT:
            out.append((bm, bn, w, s))
    return out


def _timer(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e-3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _inputs(B: int, M: int, D: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = torch.bfloat16
    q = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).to(device, dtype)
    k = torch.nn.functional.normalize(torch.randn(M, D, generator=g), dim=1).to(device, dtype)
    scale = torch.tensor(1 / 0.07, device=device)
    return q, k, scale


def _launch(q, k, cfg):
    """What both launchers need: sizes, the CLIP flags (column LSE, no masks), the D chunk and the
    config's meta-parameters."""
    bm, bn, w, s = cfg
    B, D = q.shape
    meta = dict(BLOCK_D=tt.chunk_d(D, q.dtype), ONE_CHUNK=D <= tt.chunk_d(D, q.dtype), BLOCK_M=bm, BLOCK_N=bn,
                num_warps=w, num_stages=s, **ts._flags(q, None, None, None, None, None, True))
    return B, k.shape[0], D, meta


def fwd_launcher(q, k, scale, cfg):
    """The general forward (CLIP flags) with one explicit config and the launcher's column split."""
    B, M, D, meta = _launch(q, k, cfg)
    bm = meta["BLOCK_M"]
    _, n_split, cps = ts.fwd_plan(B, M, q.device, block_m=bm)
    t_b = triton.cdiv(B, bm)
    row_part = torch.empty((n_split, B), dtype=torch.float32, device=q.device)
    col_part = torch.empty((t_b, M), dtype=torch.float32, device=q.device)
    col_ref = torch.empty((t_b, triton.cdiv(M, int(tt.COL_REF_GROUP))), dtype=torch.float32, device=q.device)
    fn = ts._fwd_kernel.fn

    def run():
        fn[(t_b, n_split)](
            q, k, scale, scale, scale, scale, scale, scale, scale, row_part, col_part, col_ref,
            B, M, D, q.stride(0), k.stride(0), cps, tt.log2_bucket(B), tt.log2_bucket(M), **meta,
        )

    def error(S):
        """Largest difference of the row and column LSEs from the fp32 reference."""
        row, col = torch.logsumexp(row_part, 0), ts.merge_col_part(col_part, col_ref)
        return max((row - torch.logsumexp(S, 1)).abs().max().item(), (col - torch.logsumexp(S, 0)).abs().max().item())

    return run, error


def ds_launcher(q, k, scale, cfg):
    """The GEMM backward's dS kernel (CLIP flags) over all rows with one explicit config."""
    B, M, D, meta = _launch(q, k, cfg)
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    full = lambda n, v: torch.full((n,), v, device=q.device)  # noqa: E731
    row_lse, g_row = ts.ds_stats(full(B, 5.0), full(B, 1.0 / B))  # padded, as the launcher passes them
    col_lse, g_col = ts.ds_stats(full(M, 5.0), full(M, 1.0 / M))
    ds = torch.empty((B, M), dtype=q.dtype, device=q.device)
    fn = ts._bwd_ds_kernel.fn

    def run():
        fn[(triton.cdiv(B, bm), triton.cdiv(M, bn))](
            q, k, scale, scale, scale, scale, scale, scale, scale, row_lse, col_lse, g_row, g_col, ds,
            B, M, D, q.stride(0), k.stride(0), ds.stride(0), tt.log2_bucket(B), tt.log2_bucket(M), **meta,
        )

    def error(S):
        """Largest difference of dS from the fp32 formula, relative to its largest entry."""
        ref = g_row[:B, None] * torch.exp(S - 5.0) + g_col[None, :M] * torch.exp(S - 5.0)
        return ((ds.float() - ref).abs().max() / ref.abs().max()).item()

    return run, error


LAUNCHERS = {"fwd": fwd_launcher, "ds": ds_launcher}
# Largest error a correct result shows: LSEs (absolute, fp32 accumulation over M terms) and dS
# (relative to its largest entry, rounded to bf16).
TOL = {"fwd": 1e-3, "ds": 1e-2}
# The config each kernel's autotune list starts with (its default): tiles.FWD_N_GPU / DS_GPU.
DEFAULTS = {"fwd": lambda B: (ts.fwd_plan(B, B, torch.device("cuda"))[0],) + tt.FWD_N_GPU[0][0] + tt.FWD_N_GPU[0][1:],
            "ds": lambda B: tt.DS_GPU[0][0] + tt.DS_GPU[0][1:]}


def sweep(cases, kernels, reps: int, log=print, space=None) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interpreted = tt.interpreting()
    if device.type == "cpu" and not interpreted:
        raise SystemExit("no CUDA device: run under TRITON_INTERPRET=1 for a launch check")
    rows = []
    for B, M, D in cases:
        q, k, scale = _inputs(B, M, D, device)
        S = scale * (q.float() @ k.float().t())  # the reference logits (fp32 products of the bf16 inputs)
        flops = 2.0 * B * M * D
        for kern in kernels:
            cands = candidates(tt.chunk_d(D, q.dtype), q.element_size(), interpreted, space)
            default = None if interpreted else DEFAULTS[kern](B)
            log(f"\n{kern}  B={B} M={M} D={D} bf16: {len(cands)} candidates"
                + ("" if default is None else f" (default {default})"))
            for cfg in cands:
                rec = dict(kernel=kern, B=B, M=M, D=D, BLOCK_M=cfg[0], BLOCK_N=cfg[1], warps=cfg[2], stages=cfg[3],
                           default=cfg == default)
                try:
                    run, error = LAUNCHERS[kern](q, k, scale, cfg)
                    t = _timer(run, reps)
                    err = error(S)
                    rec.update(ms=t * 1e3, tflops=flops / t / 1e12, error_vs_fp32=err, wrong=not err <= TOL[kern])
                    log(f"  {cfg[0]:>4} x {cfg[1]:<4} w{cfg[2]} s{cfg[3]}  {t * 1e3:8.3f} ms  "
                        f"{flops / t / 1e12:7.1f} TFLOP/s  err {err:.1e}{'  WRONG' if rec['wrong'] else ''}"
                        f"{'  (default)' if rec['default'] else ''}")
                except Exception as e:  # noqa: BLE001 - a config the GPU refuses is a result too
                    rec.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                    log(f"  {cfg[0]:>4} x {cfg[1]:<4} w{cfg[2]} s{cfg[3]}  FAILED {rec['error']}")
                rows.append(rec)
            ok = [r for r in rows if r["kernel"] == kern and (r["B"], r["M"], r["D"]) == (B, M, D) and "ms" in r
                  and not r["wrong"]]
            if ok:
                best = min(ok, key=lambda r: r["ms"])
                log(f"  best: {best['BLOCK_M']} x {best['BLOCK_N']} w{best['warps']} s{best['stages']} "
                    f"{best['tflops']:.1f} TFLOP/s")
    return rows


def _cases(text: str):
    return [tuple(int(x) for x in c.split(":")) for c in text.split(",") if c]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="16384:16384:512,16384:16384:1024",
                    help="B:M:D,... (default: CLIP at B = 16384, D = 512 and 1024)")
    ap.add_argument("--kernels", default="fwd,ds")
    ap.add_argument("--blocks", default="64,128", help="BLOCK_M and BLOCK_N values")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    kernels = [k for k in a.kernels.split(",") if k]
    unknown = set(kernels) - set(LAUNCHERS)
    if unknown:
        ap.error(f"unknown kernels {sorted(unknown)}; known: {sorted(LAUNCHERS)}")
    meta = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (interpreter)",
                torch=torch.__version__, triton=triton.__version__)
    print(meta)
    ints = lambda t: tuple(int(x) for x in t.split(",") if x)  # noqa: E731
    space = dict(blocks=ints(a.blocks), warps=ints(a.warps), stages=ints(a.stages))
    rows = sweep(_cases(a.cases), kernels, a.reps, space=space)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
    return 0 if any("ms" in r and not r["wrong"] for r in rows) and not any(r.get("wrong") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
