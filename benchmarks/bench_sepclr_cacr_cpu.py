"""SepCLR and CACR on CPU: the library against the official code at the papers' main configurations.

* SepCLR (CIFAR-MNIST script, ``cifar_mnist/sep_clr_k-jem.py``): batch 512, common and salient
  heads of 32, τ = 0.5, weights 1000/1000/10; also at batch 4096 to show how the N×N buffers grow.
  Providers: ``official`` (the official code, transcribed in ``tests/test_sepclr.py``),
  ``reference`` (the library's dense formula), ``cpu`` (the fused composition on the C++ sim_lse
  kernels with bias terms).
* CACR (``small_scale_experiments``, CIFAR-10): Ns = 128 instances, Ny + 1 = 5 views, 128-d
  features, α = β = τ⁺ = τ⁻ = 1; also at 512 instances (the official code holds an N×N×D
  difference tensor per view pair for the backward: 1.3 GB at 512).  Providers: ``official``
  (``tests/test_cacr.py``), ``reference``, ``cpu`` (the fused repulsion on the C++ kernels of the
  ``sim_expect`` primitive).  The Triton kernels run on CPU only in Triton's interpreter: not a
  measure, not timed.

The official transcriptions live in the tests (the code they come from is not in the package);
this script imports them from there.  Every provider's loss is checked against the reference
once per size before timing.

Step = forward + ``torch.autograd.grad`` of every input; median over repeats
(``contrastive_ops.benchmarking.measure.time_step``); peak memory = the peak tensor bytes of
one step on the CPU allocator (``measure.peak_memory``, torch.profiler).  float32, one thread.

Run:  PYTHONPATH=.:tests python benchmarks/bench_sepclr_cacr_cpu.py --json out.json --md out.md
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import contrastive_ops as co  # noqa: E402
from contrastive_ops.benchmarking.envinfo import cpu_run_meta, write_results  # noqa: E402
from contrastive_ops.benchmarking.measure import peak_memory, time_step  # noqa: E402
from test_cacr import our_loss1, our_loss2  # noqa: E402
from test_sepclr import official_sepclr  # noqa: E402


def _sepclr_inputs(N, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(N, D, generator=g).requires_grad_() for _ in range(4)]
    y = torch.randint(0, 2, (N,), generator=g)
    return xs, y


def _sepclr_providers():
    return {
        "official": lambda xs, y: official_sepclr(*xs, y),
        "reference": lambda xs, y: co.sepclr_loss(*xs, y, backend="reference"),
        "cpu": lambda xs, y: co.sepclr_loss(*xs, y, backend="cpu"),
    }


def _cacr_inputs(N, V=5, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, D, generator=g).requires_grad_() for _ in range(V)], None


def _cacr_official(views):
    zs = [F.normalize(v, dim=1) for v in views]  # the official encoder's last layer
    return our_loss1(zs)[0] + our_loss2(zs)[0]


def _cacr_providers():
    return {
        "official": lambda xs, _: _cacr_official(xs),
        "reference": lambda xs, _: co.cacr_loss(xs, backend="reference"),
        "cpu": lambda xs, _: co.cacr_loss(xs, backend="cpu"),
    }


def run(loss, sizes, make, providers):
    rows = []
    for N in sizes:
        xs, y = make(N)
        ref = float(providers["reference"](xs, y).detach())
        for name, fn in providers.items():
            val = float(fn(xs, y).detach())
            assert abs(val - ref) <= 1e-4 * max(1.0, abs(ref)), f"{loss} {name} N={N}: {val} != reference {ref}"

            def step(fn=fn):
                torch.autograd.grad(fn(xs, y), xs)

            t = time_step(step, torch.device("cpu"), warmup=1, min_repeats=3, max_repeats=20, min_time=0.5,
                          max_time=20.0)
            peak = peak_memory(step, torch.device("cpu"))
            rows.append(dict(loss=loss, N=N, provider=name, median_s=t.median, q25_s=t.q25, q75_s=t.q75,
                             repeats=t.repeats, peak_bytes=peak, loss_value=val))
            print(f"{loss:7s} N={N:5d} {name:9s} {t.median * 1e3:9.2f} ms  peak {peak / 2**20:9.2f} MiB", flush=True)
    return rows


def markdown(rows, meta):
    out = [f"# CPU: SepCLR and CACR against the official code — {meta['date']}", "",
           f"{meta['cpu']}, torch {meta['torch']}, float32, {meta['threads']} thread(s); "
           "the machine was shared with other jobs (2 cores): times are indicative.", "",
           "Step = forward + backward of every input, median ms; peak = peak tensor bytes of one step "
           "(torch.profiler, CPU allocator).", ""]
    for loss in ("sepclr", "cacr"):
        sub = [r for r in rows if r["loss"] == loss]
        if not sub:
            continue
        provs = list(dict.fromkeys(r["provider"] for r in sub))
        out += [f"## {loss}", "", "| N | " + " | ".join(f"{p} ms" for p in provs) + " | "
                + " | ".join(f"{p} MiB" for p in provs) + " |", "|" + "---|" * (1 + 2 * len(provs))]
        for N in dict.fromkeys(r["N"] for r in sub):
            by = {r["provider"]: r for r in sub if r["N"] == N}
            out.append(f"| {N} | " + " | ".join(f"{by[p]['median_s'] * 1e3:.2f}" for p in provs) + " | "
                       + " | ".join(f"{by[p]['peak_bytes'] / 2**20:.2f}" for p in provs) + " |")
        out.append("")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sepclr-sizes", default="512,4096")
    ap.add_argument("--cacr-sizes", default="128,512")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    rows = run("sepclr", sizes(args.sepclr_sizes), _sepclr_inputs, _sepclr_providers())
    rows += run("cacr", sizes(args.cacr_sizes), _cacr_inputs, _cacr_providers())
    write_results(args.json, args.md, cpu_run_meta(args.threads), rows, markdown)


if __name__ == "__main__":
    main()
