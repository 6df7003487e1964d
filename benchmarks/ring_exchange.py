"""Gather vs ring exchange: time and peak memory per rank as the global batch grows.

Runs ``clip_loss`` (or ``nt_xent``) forward + backward under a process group
with ``exchange="gather"`` and ``exchange="ring"`` for each global batch size
and world size, and writes JSON and a markdown table.

CPU (gloo, one process per rank, the ``cpu`` kernel)::

    python benchmarks/ring_exchange.py --world 2 3 4 --global-batch 1024 4096 16384 --dim 256 \\
        --out benchmarks/results/ring-exchange-cpu

GPUs (NCCL, one GPU per rank, one node)::

    python benchmarks/ring_exchange.py --dist nccl --kernel triton --world 8 \\
        --global-batch 32768 131072 524288 --dim 768 --dtype bfloat16 --out benchmarks/results/ring-exchange-nccl

Memory per rank: on CUDA ``torch.cuda.max_memory_allocated`` above what was
allocated before the step; on CPU the peak of the bytes of live tensors that
ATen ops allocate during the step (a ``TorchDispatchMode`` that counts each
new storage once and releases it when the tensor that brought it dies), in a
separate, untimed step.  Local batches are uneven when the world size does
not divide the global batch (the last ranks get one row fewer).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import contrastive_ops as co  # noqa: E402
from contrastive_ops.benchmarking.measure import LiveBytes  # noqa: E402


def _sizes(N: int, W: int):
    return [N // W + (1 if r < N % W else 0) for r in range(W)]


def _step(args, x, y, scale, group, exchange):
    if args.loss == "clip_loss":
        loss = co.clip_loss(x, y, scale, backend=args.kernel, process_group=group, exchange=exchange)
    else:
        loss = co.nt_xent(x, y, 0.5, backend=args.kernel, process_group=group, exchange=exchange)
    loss.backward()
    return loss


def _worker(rank, world, port, args, outdir):
    torch.set_num_threads(max(1, args.threads))
    cuda = args.dist == "nccl"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(args.dist, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    group = dist.group.WORLD
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    for N in args.global_batch:
        n = _sizes(N, world)[rank]
        g = torch.Generator().manual_seed(rank)
        x0 = torch.randn(n, args.dim, generator=g).to(device=device, dtype=dtype)
        y0 = torch.randn(n, args.dim, generator=g).to(device=device, dtype=dtype)
        x0, y0 = torch.nn.functional.normalize(x0, dim=1), torch.nn.functional.normalize(y0, dim=1)
        scale = torch.tensor(10.0, device=device)
        for exchange in ("gather", "ring"):
            def fresh():
                return x0.clone().requires_grad_(True), y0.clone().requires_grad_(True)

            x, y = fresh()
            _step(args, x, y, scale, group, exchange)  # warm-up
            times = []
            for _ in range(args.reps):
                x, y = fresh()
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                _step(args, x, y, scale, group, exchange)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            x, y = fresh()
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                _step(args, x, y, scale, group, exchange)
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
            else:
                with LiveBytes() as mb:
                    _step(args, x, y, scale, group, exchange)
                peak = mb.peak
            rows.append(dict(world=world, rank=rank, global_batch=N, local_batch=n, exchange=exchange,
                             seconds=statistics.median(times), peak_bytes=int(peak)))
    out = [None] * world
    dist.all_gather_object(out, rows)
    if rank == 0:
        with open(os.path.join(outdir, f"world{world}.json"), "w") as f:
            json.dump([r for rs in out for r in rs], f)
    dist.barrier()  # every rank done before any closes its connections (gloo aborts a peer otherwise)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _markdown(rows, args) -> str:
    lines = [f"# Gather vs ring exchange: `{args.loss}` forward + backward",
             "",
             f"dist `{args.dist}`, kernel `{args.kernel}`, D = {args.dim}, {args.dtype}, median of {args.reps} "
             f"steps; time and peak memory are the maxima over the ranks (the slowest rank sets the step).",
             "",
             "| W | global batch | gather ms | ring ms | ring / gather time | gather peak MiB | ring peak MiB | "
             "ring / gather memory |",
             "|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["world"], r["global_batch"]) for r in rows})
    for W, N in keys:
        sel = {ex: [r for r in rows if r["world"] == W and r["global_batch"] == N and r["exchange"] == ex]
               for ex in ("gather", "ring")}
        t = {ex: max(r["seconds"] for r in v) for ex, v in sel.items()}
        m = {ex: max(r["peak_bytes"] for r in v) for ex, v in sel.items()}
        lines.append(f"| {W} | {N} | {t['gather'] * 1e3:.1f} | {t['ring'] * 1e3:.1f} | "
                     f"{t['ring'] / t['gather']:.2f} | {m['gather'] / 2**20:.2f} | {m['ring'] / 2**20:.2f} | "
                     f"{m['ring'] / max(m['gather'], 1):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--global-batch", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--loss", choices=["clip_loss", "nt_xent"], default="clip_loss")
    p.add_argument("--dist", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--kernel", default="cpu", help="contrastive_ops backend: cpu, triton, cuda, reference")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (CPU)")
    p.add_argument("--out", default="benchmarks/results/ring-exchange-cpu")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for W in args.world:
        mp.spawn(_worker, args=(W, _free_port(), args, str(out)), nprocs=W, join=True)
        part = out / f"world{W}.json"  # what rank 0 of that group wrote
        rows += json.loads(part.read_text())
        part.unlink()
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    md = _markdown(rows, args)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
