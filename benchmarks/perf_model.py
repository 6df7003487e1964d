r"""Performance model of the Triton sim_lse / SigLIP kernels on an H200, from measured ceilings.

For each path and shape: FLOPs, exponentials and memory bytes (HBM: what a
step must read and write at least once; L2: the streamed operand re-read by
every row tile), the work ratio to the minimal 8·B·M·D of a CLIP step
(2 forward + 2 recompute + 4 for dQ and dK), and the predicted time

    t = max(FLOPs / 790 TFLOP/s,  HBM bytes / 4.3 TB/s,  exps / (16 ex2/clk/SM · 132 SMs · 1.98 GHz))

— the measured dense bf16 matmul rate on random data, the measured device
copy bandwidth, and the MUFU rate (no overlap penalty: a lower bound the
kernels can approach when they are compute-bound and pipelined).  L2 bytes
are listed but not timed (no measured L2 ceiling yet).

Paths (``PATHS``): ``general_fwd`` (row and column LSE of S = scale·Q·Kᵀ),
``general_bwd`` (dQ and dK), ``gram_fwd`` / ``gram_bwd`` (q is k, M = B:
NT-Xent, SupCon, MV-InfoNCE, DCL), ``siglip_fwd`` / ``siglip_bwd``.

The work follows the kernels: each kernel module of ``backends/_triton``
declares ``WORK_UNITS = {path: units or callable(D[, dtype]) -> units}`` (FLOPs
in units of B·M·D, a multiply-add counted as 2; dtype "bf16" | "fp16" | "fp32")
and ``S_EVALS = {path: evaluations of S per (i, j) pair, or a callable}``;
``sim_lse.py`` and ``siglip.py`` compute them with the launchers' own output
chunking (``tiles.out_chunks``, ``sim_lse.dk_wide``).  A path declared by two
modules, or by none, is an error.

    python benchmarks/perf_model.py                  # the table, and the CLIP fraction-of-peak summary
    python benchmarks/perf_model.py --json out.json  # the same rows as JSON (a GPU run compares with them)
    python benchmarks/perf_model.py --markdown benchmarks/results/perf-model-h200.md   # the committed CLIP table
    python benchmarks/perf_model.py --measured m.json  # predicted vs measured: {"<path> B=.. M=.. D=.. <dtype>": s,
                                                       #   "clip B=.. D=.. bf16": s (a whole fwd+bwd step)}
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import sys
from typing import Callable, Dict, List, Optional

# Measured ceilings of the H200 (BUILD-NOTES: the GPU machine) and its dense bf16 peak.
DENSE_BF16_MEASURED = 790e12     # FLOP/s, torch.matmul on random bf16 data
DENSE_BF16_PEAK = 989.4e12       # FLOP/s, the datasheet dense bf16 peak the performance goal refers to
HBM_BYTES_PER_S = 4.3e12         # device-to-device copy
SMS = 132
CLOCK_HZ = 1.98e9
EX2_PER_CLK_PER_SM = 16
EXP_PER_S = EX2_PER_CLK_PER_SM * SMS * CLOCK_HZ
MINIMAL_UNITS = 8                # 2 forward + 2 recompute + 4 for dQ and dK, units of B·M·D
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# fp32 inputs: tf32x3 runs three tensor-core products per product at the dense tf32 rate (half of bf16).
FLOP_RATE_FACTOR = {"bf16": 1.0, "fp16": 1.0, "fp32": 1.0 / 6.0}

PATHS = ("general_fwd", "general_bwd", "gram_fwd", "gram_bwd", "siglip_fwd", "siglip_bwd",
         "general_bwd_gemm", "gram_bwd_gemm", "siglip_bwd_gemm")
# The GEMM backwards' buffer of dS (G for SigLIP and the Gram matrices) in HBM: written once, read by
# each cuBLAS product.
GEMM_PRODUCTS = {"general_bwd_gemm": 2, "gram_bwd_gemm": 1, "siglip_bwd_gemm": 2}
# MUFU operations (ex2, lg2) per evaluated S element: the forward's row and column LSE need one
# exponential each, the backward's P for the row and the column term one each; SigLIP's softplus
# is one ex2 and one lg2 in the forward, its sigmoid one ex2 in the backward.
MUFU_PER_EVAL = {"general_fwd": 2, "general_bwd": 2, "gram_fwd": 2, "gram_bwd": 2, "siglip_fwd": 2,
                 "siglip_bwd": 1, "general_bwd_gemm": 2, "gram_bwd_gemm": 2, "siglip_bwd_gemm": 1}
TILE_M = 128                     # row-tile height assumed for the L2 re-reads


# --------------------------------------------------------------------------- where the work comes from


def _kernel_modules() -> Dict[str, object]:
    import contrastive_ops.backends._triton as pkg

    out = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("__") or info.name == "specs":
            continue
        try:
            out[info.name] = importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception:  # noqa: BLE001 - a module that does not import declares nothing
            continue
    return out


def _as_fn(v) -> Callable[..., float]:
    """``f(D, dtype="bf16")`` from a number, a callable of D, or a callable of (D, dtype)."""
    if not callable(v):
        return lambda D, dtype="bf16", v=v: v
    try:
        two = len(inspect.signature(v).parameters) >= 2
    except (TypeError, ValueError):
        two = False
    return (lambda D, dtype="bf16": v(D, dtype)) if two else (lambda D, dtype="bf16": v(D))


def work_tables() -> Dict[str, Dict[str, Callable[..., float]]]:
    """``{"units": {path: f(D, dtype)}, "s_evals": {path: f(D, dtype)}, "source": {path: module}}``
    from the kernel modules' ``WORK_UNITS`` / ``S_EVALS``."""
    units, evals, source = {}, {}, {}
    for name, mod in sorted(_kernel_modules().items()):
        for table, out in (("WORK_UNITS", units), ("S_EVALS", evals)):
            for path, v in (getattr(mod, table, None) or {}).items():
                if path not in PATHS:
                    raise ValueError(f"{name}.{table} names an unknown path {path!r} (known: {PATHS})")
                if path in out:
                    where = source.get(path) if table == "WORK_UNITS" else "another module"
                    raise ValueError(f"{table}[{path!r}] is declared by both {where} and {name}")
                out[path] = _as_fn(v)
                if table == "WORK_UNITS":
                    source[path] = name
    missing = [p for p in PATHS if p not in units]
    if missing:
        raise RuntimeError(f"no kernel module declares WORK_UNITS for {missing}")
    for p in PATHS:  # a module that declares units but not evaluations: one S per pair
        evals.setdefault(p, lambda D, dtype="bf16": 1)
    return dict(units=units, s_evals=evals, source=source)


# --------------------------------------------------------------------------- the model


def predict(path: str, B: int, M: int, D: int, dtype: str = "bf16", tables=None) -> dict:
    """Counts and predicted time of one path at one shape (M = B for the Gram paths)."""
    tables = tables or work_tables()
    if path.startswith("gram"):
        M = B
    units = float(tables["units"][path](D, dtype))
    evals = float(tables["s_evals"][path](D, dtype))
    pairs = B * M
    flops = units * B * M * D
    exps = MUFU_PER_EVAL[path] * evals * pairs
    b = BYTES[dtype]
    operands = (B + (0 if path.startswith("gram") else M)) * D * b
    if path.endswith("fwd"):
        hbm = operands + 4 * (B + M)                       # read Q, K; write row / column LSE (fp32)
    else:
        hbm = 2 * operands + 4 * 2 * (B + M)               # read Q, K, write dQ, dK; LSE and upstream grads
        if path in GEMM_PRODUCTS:                          # the GEMM backwards' dS: written, read per product
            hbm += (1 + GEMM_PRODUCTS[path]) * pairs * b
    streamed = (M if not path.startswith("gram") else B) * D * b
    l2 = math.ceil(B / TILE_M) * streamed * (max(evals, 1.0) if not path.endswith("fwd") else 1.0)
    rate = FLOP_RATE_FACTOR[dtype]
    t_flop = flops / (DENSE_BF16_MEASURED * rate)
    t_hbm = hbm / HBM_BYTES_PER_S
    t_exp = exps / EXP_PER_S
    t = max(t_flop, t_hbm, t_exp)
    bound = {t_flop: "tensor", t_hbm: "hbm", t_exp: "exp"}[t]
    return dict(path=path, B=B, M=M, D=D, dtype=dtype, units=units, work_ratio=units / MINIMAL_UNITS,
                flops=flops, exps=exps, hbm_bytes=hbm, l2_bytes=l2, t_flop_s=t_flop, t_hbm_s=t_hbm,
                t_exp_s=t_exp, predicted_s=t, bound=bound, source=tables["source"][path])


def clip_step(B: int, D: int, dtype: str = "bf16", tables=None, backward: str = "general_bwd") -> dict:
    """Symmetric CLIP forward + backward (M = B): predicted time and fraction of the dense bf16 peak
    (the minimal 8·B²·D FLOPs over the predicted time, against 989 TFLOP/s); ``backward``: the
    fused kernels' path or ``"general_bwd_gemm"``."""
    tables = tables or work_tables()
    f = predict("general_fwd", B, B, D, dtype, tables)
    g = predict(backward, B, B, D, dtype, tables)
    t = f["predicted_s"] + g["predicted_s"]
    useful = MINIMAL_UNITS * B * B * D
    return dict(B=B, D=D, dtype=dtype, units=f["units"] + g["units"], predicted_s=t,
                fraction_of_peak=useful / t / DENSE_BF16_PEAK)


def rows(shapes=None, dtypes=("bf16",), tables=None) -> List[dict]:
    tables = tables or work_tables()
    shapes = shapes or [(B, D) for B in (16384, 32768, 65536) for D in (128, 512, 1024)]
    out = []
    for dtype in dtypes:
        for B, D in shapes:
            for p in PATHS:
                out.append(predict(p, B, B, D, dtype, tables))
    return out


def key(r: dict) -> str:
    return f"{r['path']} B={r['B']} M={r['M']} D={r['D']} {r['dtype']}"


def _fmt_table(rs: List[dict], measured: Optional[Dict[str, float]] = None) -> str:
    head = (f"{'path':<12} {'B':>6} {'D':>5} {'dtype':<5} {'units':>6} {'ratio':>6} {'TFLOP':>8} {'Gexp':>7} "
            f"{'HBM MB':>8} {'L2 GB':>7} {'pred ms':>8} {'bound':<6}")
    if measured is not None:
        head += f" {'meas ms':>8} {'meas/pred':>9}"
    lines = [head, "-" * len(head)]
    for r in rs:
        line = (f"{r['path']:<12} {r['B']:>6} {r['D']:>5} {r['dtype']:<5} {r['units']:>6.1f} {r['work_ratio']:>6.2f} "
                f"{r['flops'] / 1e12:>8.2f} {r['exps'] / 1e9:>7.2f} {r['hbm_bytes'] / 1e6:>8.1f} "
                f"{r['l2_bytes'] / 1e9:>7.2f} {r['predicted_s'] * 1e3:>8.3f} {r['bound']:<6}")
        if measured is not None:
            m = measured.get(key(r))
            line += f" {m * 1e3:>8.3f} {m / r['predicted_s']:>9.2f}" if m else f" {'-':>8} {'-':>9}"
        lines.append(line)
    return "\n".join(lines)


# What the one GPU run measured against this model (kept in the committed table's file).
MEASURED_NOTE = """## Measured on an H200 (2026-12-04): the model is 3-6x optimistic

`nvidia-h200-2026-12-04/quick.json` and `nvidia-h200-2026-12-04-diag/profile.log`
(default configs; autotuning picked the same ones): CLIP at B = 16384, D = 512
took 10.6 ms (model: 1.74 ms), of which forward 1.16 ms (model 0.35: 237 TFLOP/s,
30 % of the measured cuBLAS rate) and backward dq + dk 4.24 + 3.72 ms (model
1.39: 130 and 148 TFLOP/s counting the recompute). At D = 1024: forward 1.68 ms,
dq + dk 14.6 + 13.6 ms (75 TFLOP/s). The model's assumption that a tile loop
runs at the dense matmul rate does not hold for these kernels: 64 x 64 tiles
beside a 64 x 512 fp32 accumulator (255 registers, 8 warps, 2 stages) keep
wgmma far from saturated. Use the measured rates above, not the table, until
the kernels change. The GEMM backward (README, "How it works") moves the
backward's products to cuBLAS for that reason; the next section predicts it from
these measured rates, and `auto` takes it where that prediction says so."""


def clip_markdown(clip: List[dict], tables) -> str:
    """The symmetric CLIP table of ``benchmarks/results/perf-model-h200.md``."""
    lines = [
        "# Performance model: symmetric CLIP forward + backward on an H200 (Triton kernels, bf16)",
        "",
        "Written by `benchmarks/perf_model.py`; regenerate with",
        "",
        "    python benchmarks/perf_model.py --markdown benchmarks/results/perf-model-h200.md",
        "",
        f"A model, not a measurement: t = max(FLOPs / {DENSE_BF16_MEASURED / 1e12:.0f} TFLOP/s (measured dense bf16 "
        f"matmul), HBM bytes / {HBM_BYTES_PER_S / 1e12:.1f} TB/s, exponentials / {EXP_PER_S / 1e12:.2f} T/s (MUFU)) "
        "per kernel path, summed over the forward and the backward, with no overlap penalty (a lower bound). "
        "Work in units of B·M·D FLOPs (a multiply-add is 2) from the kernel modules' `WORK_UNITS` "
        f"({', '.join(sorted(set(tables['source'][p] for p in ('general_fwd', 'general_bwd'))))}: the launchers' "
        "own output D-chunking); the minimal step is 8 units (2 forward + 2 recompute + 4 for dQ and dK). "
        "Two backwards: the fused dq/dk kernels and the GEMM backward (dS kernel + cuBLAS, with the dS "
        "buffer's HBM traffic), which `auto` takes at these shapes. "
        f"Fraction of peak = 8·B²·D / predicted time / {DENSE_BF16_PEAK / 1e12:.1f} TFLOP/s (dense bf16 datasheet).",
        "",
        "| B | D | backward | units (fwd + bwd) | predicted fwd ms | predicted bwd ms | predicted step ms | bound | "
        "fraction of peak |",
        "|---:|---:|---|---|---:|---:|---:|---|---:|",
    ]
    for c in clip:
        for bwd, label in (("general_bwd", "fused"), ("general_bwd_gemm", "GEMM")):
            f = predict("general_fwd", c["B"], c["B"], c["D"], c["dtype"], tables)
            g = predict(bwd, c["B"], c["B"], c["D"], c["dtype"], tables)
            t = f["predicted_s"] + g["predicted_s"]
            frac = MINIMAL_UNITS * c["B"] ** 2 * c["D"] / t / DENSE_BF16_PEAK
            lines.append(f"| {c['B']} | {c['D']} | {label} | {f['units']:.0f} + {g['units']:.0f} | "
                         f"{f['predicted_s'] * 1e3:.2f} | {g['predicted_s'] * 1e3:.2f} | {t * 1e3:.2f} | "
                         f"{f['bound']} / {g['bound']} | {100 * frac:.1f}% |")
    return "\n".join(lines) + "\n\n" + MEASURED_NOTE + "\n"


# --------------------------------------------------------------------------- calibrated by the H200 run

# The losses of the quick sweep for each kind of the calibrated model, and their rows: CLIP and SigLIP
# have B rows and B columns, NT-Xent (a Gram loss) 2B of each.
CALIBRATED_LOSSES = (("clip_loss", "general", 1), ("nt_xent", "gram", 2), ("siglip_loss", "siglip", 1))
QUICK_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "nvidia-h200-2026-12-04",
                          "quick.json")


def _quick_walls(path: str = QUICK_JSON) -> Dict[tuple, float]:
    """{(loss, B, D, backend): seconds} of the committed H200 sweep (bf16)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError:
        return {}
    return {(r["loss"], r["B"], r["D"], r["backend"]): r["time_s"] for r in data["rows"]
            if r.get("status") == "ok" and r.get("dtype") == "bfloat16"}


def calibrated_rows(Bs=(16384, 32768, 65536), Ds=(128, 256, 512, 768, 1024)) -> List[dict]:
    """The cost model that chooses the Triton backward (``contrastive_ops.backends._triton.costs``:
    kernel rates measured on the H200, cuBLAS for the GEMM path's products): predicted kernel time
    of a forward + backward step on the fused and on the GEMM backward, and which one "auto" takes."""
    import torch

    from contrastive_ops.backends._triton import costs, siglip, sim_lse  # noqa: F401 - they declare their work

    walls = _quick_walls()
    out = []
    for loss, kind, mult in CALIBRATED_LOSSES:
        for B in Bs:
            for D in Ds:
                n = mult * B
                fused = costs.step_seconds("deterministic", n, n, D, 2, kind)
                gemm = costs.step_seconds("gemm", n, n, D, 2, kind)
                auto = "gemm" if costs.gemm_pays(n, n, D, torch.bfloat16, kind) else "deterministic"
                peers = {k[3]: v for k, v in walls.items() if k[:3] == (loss, B, D) and k[3].startswith("peer:")}
                out.append(dict(loss=loss, B=B, D=D, rows=n, fused_s=fused, gemm_s=gemm, auto=auto,
                                auto_s=gemm if auto == "gemm" else fused,
                                measured_triton_s=walls.get((loss, B, D, "triton")),
                                measured_cuda_s=walls.get((loss, B, D, "cuda")),
                                measured_best_peer=min(peers.items(), key=lambda kv: kv[1]) if peers else None))
    return out


def calibrated_markdown(rs: List[dict]) -> str:
    def ms(v):
        return "-" if v is None else f"{v * 1e3:.2f}"

    lines = [
        "## Calibrated by the H200 run: the backward that `auto` takes",
        "",
        "`contrastive_ops/backends/_triton/costs.py` predicts each path from the kernel times the H200 run measured "
        "(`nvidia-h200-2026-12-04-diag/profile.log`: the forward tile loop at 237 TFLOP/s at D = 512 and 326 at "
        "1024, the fused dq + dk at 138 and 98, the Gram backward at 126, SigLIP's at 153; cuBLAS at 760; "
        "D < 512 takes D = 512's rates, an extrapolation). The GEMM backward is the dS kernel at the forward's "
        "rate, the write of dS, and the two products at cuBLAS speed (SigLIP: that one pass also sums the loss, so a "
        "differentiated step has no separate forward). Kernel time only (the measured steps add "
        "about 1 ms of elementwise work at B = 16384). `auto` takes the GEMM backward where it is predicted "
        "1.25x faster (at least 2^22 pairs; fp32 as in costs.py, with assumed rates). Measured wall times of the "
        "same step are from "
        "`nvidia-h200-2026-12-04/quick.json` (fused Triton backward, the CUDA backend and the fastest peer).",
        "",
        "| loss | B | D | predicted fused ms | predicted GEMM ms | auto | measured triton (fused) ms | "
        "measured cuda ms | fastest peer ms |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rs:
        peer = r["measured_best_peer"]
        peer_s = "-" if peer is None else f"{peer[1] * 1e3:.2f} ({peer[0][5:]})"
        lines.append(f"| {r['loss']} | {r['B']} | {r['D']} | {ms(r['fused_s'])} | {ms(r['gemm_s'])} | {r['auto']} | "
                     f"{ms(r['measured_triton_s'])} | {ms(r['measured_cuda_s'])} | {peer_s} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="H200 performance model of the Triton sim_lse / SigLIP kernels")
    p.add_argument("--json", help="write the rows and the CLIP summary to this file")
    p.add_argument("--measured", help="JSON {\"<path> B=.. M=.. D=.. <dtype>\": seconds} to compare with")
    p.add_argument("--dtypes", default="bf16", help="comma-separated (bf16,fp16,fp32)")
    p.add_argument("--markdown", help="write the symmetric CLIP table (bf16) as Markdown to this file")
    a = p.parse_args(argv)
    tables = work_tables()
    rs = rows(dtypes=tuple(a.dtypes.split(",")), tables=tables)
    measured = None
    if a.measured:
        with open(a.measured) as f:
            measured = {k: float(v) for k, v in json.load(f).items()}
    print("Work per path (units of B·M·D) from:")
    for k, v in tables["source"].items():
        print(f"  {k:<12} {v}")
    print(_fmt_table(rs, measured))
    clip = [clip_step(B, D, "bf16", tables) for B in (16384, 32768, 65536) for D in (512, 1024)]
    print("\nSymmetric CLIP forward + backward, bf16 (fraction of the 989 TFLOP/s dense peak, minimal 8·B²·D FLOPs):")
    for c in clip:
        line = (f"  B={c['B']:>6} D={c['D']:>5}: {c['units']:.0f} units, {c['predicted_s'] * 1e3:8.2f} ms, "
                f"{100 * c['fraction_of_peak']:5.1f}% of peak")
        m = (measured or {}).get(f"clip B={c['B']} D={c['D']} bf16")
        if m:
            line += f"; measured {m * 1e3:.2f} ms ({m / c['predicted_s']:.2f}x the prediction)"
        print(line)
    cal = calibrated_rows()
    print("\nCalibrated by the H200 run (costs.py), predicted kernel ms of a bf16 step: fused / GEMM backward -> auto")
    for r in cal:
        print(f"  {r['loss']:<12} B={r['B']:>6} D={r['D']:>5}: {r['fused_s'] * 1e3:8.2f} / {r['gemm_s'] * 1e3:8.2f}"
              f" -> {r['auto']}")
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(clip_markdown(clip, tables) + "\n" + calibrated_markdown(cal))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(ceilings=dict(dense_bf16=DENSE_BF16_MEASURED, peak=DENSE_BF16_PEAK, hbm=HBM_BYTES_PER_S,
                                         exp_per_s=EXP_PER_S),
                           rows={key(r): r for r in rs}, clip=clip), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
