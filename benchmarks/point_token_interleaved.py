"""point_token_contrast, forward + backward: a kernel backend against the plain-PyTorch reference, interleaved.

On a shared machine the load changes from one minute to the next, so two providers timed one after the
other (as pytest-benchmark does) can see different machines.  Here both run in one process, alternately
(the order flipping every round), and the medians are compared; the ratio is what the load changes least.
Inputs are those of ``test_bench_point_token.py`` (mask ratio 0.6 in each branch, seed 0).

    PYTHONPATH=. nice python benchmarks/point_token_interleaved.py --reps 15
    PYTHONPATH=. nice python benchmarks/point_token_interleaved.py --B 32 --G 256 --negatives cloud
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import contrastive_ops as co

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_bench_point_token as tb  # noqa: E402  (the inputs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=128)
    p.add_argument("--G", type=int, default=64)
    p.add_argument("--negatives", choices=("batch", "cloud"), default="batch")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args(argv)
    f1, f2, m1, m2 = tb._inputs(a.B, a.G)
    kw = dict(mode="infonce", negatives=a.negatives, temperature=0.1)
    names = [a.backend, "reference"]

    def step(name):
        f1.grad = f2.grad = None
        co.point_token_contrast(f1, f2, m1, m2, backend=name, **kw).backward()

    for name in names:  # warm-up
        step(name)
    times = {n: [] for n in names}
    for r in range(a.reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) * 1e3 for n, t in times.items()}
    print(f"B={a.B} G={a.G} D={tb.D} negatives={a.negatives} |S|={int((m1 & m2).sum())} threads="
          f"{torch.get_num_threads()} reps={a.reps}: " + " ".join(f"{n}={m:.1f} ms" for n, m in med.items())
          + f"  ratio {a.backend}/reference={med[a.backend] / med['reference']:.3f}")


if __name__ == "__main__":
    main()
