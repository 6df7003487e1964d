"""PixPro's loss on CPU: the released implementation against ``pixpro_loss`` on the C++ kernel backend.

The released loss (``contrastive_ops.losses.pixpro.pixpro_released_loss``, transcribed from
zdaxie/PixPro) builds (N, HW, HW) distances, mask and logits; ``pixpro_loss(backend="cpu")``
evaluates the positive predicate pair by pair in ``csrc/cpu/pix_pos.cpp`` and stores O(N·HW·C).
Forward + backward (the online maps' gradients; the momentum keys are stop-grad), one thread.

Each measurement runs in a fresh subprocess: peak memory is the high-water RSS there minus the RSS
once the inputs exist, under an address-space cap (RLIMIT_AS = the process's size after the inputs
+ ``--cap-gib``), so a configuration that does not fit fails with an allocation error instead of
waking the OOM killer.

    python benchmarks/bench_pixpro_cpu.py --out benchmarks/results/<dir>/pixpro_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

# (N, H, W, C): the paper's 7×7 map with C = 256 at 128 images (its per-GPU batch: 1024 over 8
# GPUs) and at the global 1024, then larger maps, where the (N, HW, HW) tensors grow as HW².
CONFIGS = [(128, 7, 7, 256), (1024, 7, 7, 256), (128, 14, 14, 256), (64, 28, 28, 256), (32, 56, 56, 256)]
IMPLS = ("released", "contrastive_ops_cpu")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def one(impl: str, N: int, H: int, W: int, C: int, reps: int, cap_gib: float) -> dict:
    import torch

    import contrastive_ops as co
    from contrastive_ops.losses.pixpro import pixpro_released_loss

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(N, C, H, W, generator=g).requires_grad_(i < 2) for i in range(4)]
    w = 0.3 + 0.6 * torch.rand(2, N, generator=g)
    x0 = (1 - w) * torch.rand(2, N, generator=g)
    y0 = (1 - w) * torch.rand(2, N, generator=g)
    coords = [torch.stack([x0[v], y0[v], x0[v] + w[v], y0[v] + w[v]], 1) for v in range(2)]

    if impl == "released":
        def step():
            return pixpro_released_loss(*maps, *coords, 0.7)
    else:
        def step():
            return co.pixpro_loss(*maps, *coords, pos_ratio=0.7, backend="cpu")

    base_rss = _rss_kib()
    cap = _vm_bytes() + int(cap_gib * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    times, value = [], None
    try:
        for _ in range(reps):
            for t in maps[:2]:
                t.grad = None
            t0 = time.perf_counter()
            loss = step()
            loss.backward()
            times.append(time.perf_counter() - t0)
            value = float(loss.detach())
    except (RuntimeError, MemoryError) as e:
        return dict(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, high-water since start
    return dict(ok=True, loss=value, median_s=statistics.median(times), min_s=min(times),
                peak_extra_mib=max(0, peak - base_rss) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--cap-gib", type=float, default=4.0, help="address space allowed beyond the inputs")
    ap.add_argument("--one", nargs=6, metavar=("IMPL", "N", "H", "W", "C", "REPS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        impl, N, H, W, C, reps = args.one
        print(json.dumps(one(impl, int(N), int(H), int(W), int(C), int(reps), args.cap_gib)))
        return
    rows = []
    for N, H, W, C in CONFIGS:
        reps = 5 if N * (H * W) ** 2 < 5e7 else 3
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--cap-gib", str(args.cap_gib), "--one", impl, str(N), str(H), str(W),
                   str(C), str(reps)]
            root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's package first
            env = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            try:
                res = json.loads(out.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                res = dict(ok=False, error=f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1:]}")
            dense_mib = N * (H * W) ** 2 * 4 / 2 ** 20
            rows.append(dict(impl=impl, N=N, H=H, W=W, C=C, dense_tensor_mib=dense_mib, **res))
            r = rows[-1]
            what = (f"{r['median_s'] * 1e3:9.1f} ms  peak +{r['peak_extra_mib']:8.1f} MiB  loss {r['loss']:.6f}"
                    if r["ok"] else r["error"])
            print(f"N={N:5d} {H:2d}x{W:<2d} C={C}  {impl:20s} {what}", flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        meta = dict(machine=platform.processor() or platform.machine(), cpus=os.cpu_count(), threads=1,
                    cap_gib_beyond_inputs=args.cap_gib, python=platform.python_version())
        try:
            import torch

            meta["torch"] = torch.__version__
        except ImportError:
            pass
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
