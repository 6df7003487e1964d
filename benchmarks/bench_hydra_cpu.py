"""Hydra (``gating="filter"``) on CPU: the library against the official code at the paper's main configuration.

erow/hydra ``todo.sh`` (the design and model-size runs): ``main_moco.py -a vit_tiny -b 1024`` with the
default ``--moco-dim 256``; the builder's learnable logit scale starts at 20 (τ = 1/20 here).  The
classes: ImageNet-1k labels (1000 classes; y1 a sample's class, posy y1 shuffled).  One process holds
the whole batch here (B = M = N, the keys all-gathered on one rank); N = 1024 is the main configuration,
the smaller and larger N show how the official code's buffers grow: its ``Filter`` gates every key with
every anchor's gate, an (N, N, D) tensor (1 GiB at N = 1024, D = 256 in fp32), normalized into a second
one, both kept for the backward.

Providers: ``official`` (``MoCo.disparate_loss`` with ``Filter``, transcribed in ``tests/test_hydra.py``),
``reference`` (the library's dense formula, (N, N) logits), ``cpu`` (the fused composition on the C++
``gated_lse`` kernels: two column-range row LSEs over the class-sorted keys, the positive logits per
class).  Every provider's loss is checked against the reference once per size before timing.

Step = forward + ``torch.autograd.grad`` of z1, k2 and the gate; median over repeats
(``contrastive_ops.benchmarking.measure.time_step``); peak memory = the peak tensor bytes of one step on
the CPU allocator (``measure.peak_memory``, torch.profiler).  float32, one thread; the providers are
interleaved per size.  ``--official-max`` bounds the sizes at which the official code runs (its peak
grows as N²·D: see the Markdown for the measured growth and the size where it passes 24 GiB).

Run:  PYTHONPATH=.:tests python benchmarks/bench_hydra_cpu.py --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import contrastive_ops as co  # noqa: E402
from contrastive_ops.benchmarking.envinfo import cpu_run_meta, write_results  # noqa: E402
from contrastive_ops.benchmarking.measure import peak_memory, time_step  # noqa: E402
from test_hydra import builder_disparate_loss  # noqa: E402

SCALE = 20.0  # the builder's initial logit scale
CLASSES = 1000


def _inputs(N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(N, D, generator=g).requires_grad_()
    k2 = torch.randn(N, D, generator=g).requires_grad_()
    gate = torch.sigmoid(torch.randn(N, D, generator=g)).requires_grad_()
    y1 = torch.randint(0, CLASSES, (N,), generator=g)
    posy = y1[torch.randperm(N, generator=g)]
    return [z1, k2, gate], (y1, posy)


def _providers():
    tau = torch.tensor(1.0 / SCALE)
    return {
        "official": lambda xs, ys: builder_disparate_loss(*xs, *ys, torch.tensor(SCALE)),
        "reference": lambda xs, ys: co.hydra_loss(*xs, *ys, tau, backend="reference"),
        "cpu": lambda xs, ys: co.hydra_loss(*xs, *ys, tau, backend="cpu"),
    }


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def run(sizes, D, official_max, repeats):
    rows = []
    provs = _providers()
    per_elem = None  # the official peak per (anchor, key, feature), from the last size it ran at
    for N in sizes:
        xs, ys = _inputs(N, D)
        names = [p for p in provs if p != "official" or N <= official_max]
        if "official" in names and per_elem is not None and 2 * per_elem * N * N * D > _available_bytes():
            print(f"hydra N={N:5d} official skipped: its predicted peak {per_elem * N * N * D / 2**30:.1f} GiB is "
                  f"over half of the free memory ({_available_bytes() / 2**30:.1f} GiB)", flush=True)
            names.remove("official")
        ref = float(provs["reference"](xs, ys).detach())
        steps = {}
        for name in names:
            val = float(provs[name](xs, ys).detach())
            assert abs(val - ref) <= 1e-4 * max(1.0, abs(ref)), f"hydra {name} N={N}: {val} != reference {ref}"

            def step(fn=provs[name]):
                torch.autograd.grad(fn(xs, ys), xs)

            steps[name] = (step, val)
        times = {n: [] for n in names}
        for _ in range(repeats):  # interleaved: each round times every provider once
            for name in names:
                t = time_step(steps[name][0], torch.device("cpu"), warmup=1, min_repeats=1, max_repeats=5,
                              min_time=0.2, max_time=10.0)
                times[name].append(t.median)
        for name in names:
            peak = peak_memory(steps[name][0], torch.device("cpu"))
            ts = sorted(times[name])
            med = ts[len(ts) // 2]
            rows.append(dict(loss="hydra_filter", N=N, D=D, provider=name, median_s=med, rounds=len(ts),
                             min_s=ts[0], max_s=ts[-1], peak_bytes=peak, loss_value=steps[name][1]))
            if name == "official":
                per_elem = peak / (N * N * D)
            print(f"hydra N={N:5d} D={D} {name:9s} {med * 1e3:9.2f} ms  peak {peak / 2**20:9.2f} MiB", flush=True)
    return rows


def extrapolate(rows, limit=24 * 2**30):
    """The official code's peak fitted as c·N²·D on its largest measured size; the N where it passes ``limit``."""
    off = [r for r in rows if r["provider"] == "official"]
    if not off:
        return None
    last = max(off, key=lambda r: r["N"])
    c = last["peak_bytes"] / (last["N"] ** 2 * last["D"])
    return dict(bytes_per_pair_feature=c, fitted_on_N=last["N"],
                N_at_24GiB=int(math.sqrt(limit / (c * last["D"]))))


def markdown(rows, meta, fit):
    out = [f"# CPU: Hydra (filter gating) against the official code — {meta['date']}", "",
           f"{meta['cpu']}, torch {meta['torch']}, float32, {meta['threads']} thread(s); the machine was "
           "shared with other jobs (2 cores, run under `nice -n 0`, providers interleaved): times are "
           "indicative.", "",
           "Configuration: erow/hydra `todo.sh` main runs (`-b 1024`, `--moco-dim 256`), the whole batch on one "
           "process (B = M = N), 1000 classes, logit scale 20.  Step = forward + backward of z1, k2 and the "
           "gate, median ms over interleaved rounds; peak = peak tensor bytes of one step (torch.profiler, CPU "
           "allocator).", ""]
    provs = list(dict.fromkeys(r["provider"] for r in rows))
    out += ["| N | D | " + " | ".join(f"{p} ms" for p in provs) + " | " + " | ".join(f"{p} MiB" for p in provs)
            + " |", "|" + "---|" * (2 + 2 * len(provs))]
    for N in dict.fromkeys(r["N"] for r in rows):
        by = {r["provider"]: r for r in rows if r["N"] == N}
        D = next(iter(by.values()))["D"]
        cell = lambda p, f: f(by[p]) if p in by else "—"  # noqa: E731
        out.append(f"| {N} | {D} | " + " | ".join(cell(p, lambda r: f"{r['median_s'] * 1e3:.1f}") for p in provs)
                   + " | " + " | ".join(cell(p, lambda r: f"{r['peak_bytes'] / 2**20:.1f}") for p in provs) + " |")
    out.append("")
    if fit:
        out += [f"The official code's peak grows as N²·D: {fit['bytes_per_pair_feature']:.1f} bytes per (anchor, key, "
                f"feature) at N = {fit['fitted_on_N']}; it passes 24 GiB at N ≈ {fit['N_at_24GiB']} (D = "
                f"{rows[0]['D']}), below the `-b 4096` of the ViT-S/B runs on one device.  This machine has "
                f"{meta['mem_total_gib']:.1f} GiB of memory in all: at N = 2048 the official code's predicted peak "
                f"({fit['bytes_per_pair_feature'] * 2048 ** 2 * rows[0]['D'] / 2**30:.1f} GiB) cannot be allocated, "
                "while the library's kernels run to N = 4096 and beyond.  \"—\": the official code not run (past "
                "`--official-max`, or its predicted peak over half of the shared machine's free memory).", ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128,256,512,1024,2048,4096")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--official-max", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    rows = run(sizes, args.dim, args.official_max, args.rounds)
    fit = extrapolate(rows)
    meta = cpu_run_meta(args.threads, mem_total_gib=_total_bytes() / 2**30)
    write_results(args.json, args.md, meta, rows, markdown, official_fit=fit)


if __name__ == "__main__":
    main()
