"""Short GPU timing of the core losses: each kernel backend against plain PyTorch and the GEMM floor.

    python benchmarks/gpu_quick.py [--sizes 16384,32768,65536] [--dims 512,1024] [--json out.json]

For each (loss, B, D) in bf16: the median time of one forward + backward
(CUDA events, after warm-up; fresh random inputs, never zeros), the peak extra
memory, and the "GEMM floor": cuBLAS time of the products plain PyTorch does
for the same step (S = Q·Kᵀ, dS·K, dSᵀ·Q; for a Gram loss Z·Zᵀ and dS·Z).
Model FLOPs count those products (6·B·M·D for two-tensor losses, 4·B²·D for
Gram losses, whose backward is one product; ``mv_infonce`` is a Gram loss
over B rows, B/4 instances of 4 views; ``info_nce_queue`` is MoCo v2, B
queries against their key and a detached 65,536-entry queue, 4·B·K·D); the fraction of peak is model
FLOP/s over the dense bf16 peak (989.5 TFLOP/s, H100/H200 SXM datasheet) and
over the measured cuBLAS rate.  Values are checked against the reference once
per point (relative error of the loss).  ``--peers`` adds the other libraries'
losses that import here (open_clip, Inf-CL, siglip-kernel: the adapters of
``contrastive_ops.benchmarking.peers``) on the same inputs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

import contrastive_ops as co
from contrastive_ops.benchmarking.measure import peak_memory, time_step

PEAK_BF16 = 989.5e12


QUEUE = 65536  # queue entries of the info_nce_queue case
TIME_PER_POINT = 1.0  # seconds of timed calls per measurement (--time-per-point)


def _time(fn, warmup=2, reps=10, max_s=None):
    """Median seconds per call (CUDA events, after warm-up): the library's timing loop."""
    max_s = TIME_PER_POINT if max_s is None else max_s
    return time_step(fn, "cuda", warmup=warmup, min_repeats=min(3, reps), max_repeats=reps,
                     min_time=max_s, max_time=max_s).median


def _gemm_rate(n=8192):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = _time(lambda: a @ b, warmup=3, reps=10)
    return 2 * n ** 3 / t


def _cases(B, D, dtype):
    g = torch.Generator(device="cuda").manual_seed(B + D)

    def feat(n):
        x = torch.randn(n, D, device="cuda", dtype=torch.float32, generator=g)
        return torch.nn.functional.normalize(x, dim=1).to(dtype).requires_grad_(True)

    img, txt = feat(B), feat(B)
    scale = torch.tensor(1 / 0.07, device="cuda", requires_grad=True)
    z1, z2 = feat(B), feat(B)
    bias = torch.tensor(-10.0, device="cuda", requires_grad=True)
    mv = feat(B).detach().view(B // 4, 4, D).requires_grad_(True)  # B rows in all: B/4 instances, 4 views
    queue = feat(QUEUE).detach()  # a MoCo queue: unit rows, no gradient
    return {
        # loss name: (callable(backend), leaves, gram?, M): a Gram loss has M rows and columns
        "clip_loss": (lambda be: co.clip_loss(img, txt, scale, backend=be), [img, txt, scale], False, B),
        "info_nce": (lambda be: co.info_nce(img, txt, 0.07, backend=be), [img, txt], False, B),
        "siglip_loss": (lambda be: co.siglip_loss(img, txt, scale, bias, backend=be), [img, txt, scale, bias],
                        False, B),
        "nt_xent": (lambda be: co.nt_xent(z1, z2, 0.5, backend=be), [z1, z2], True, 2 * B),
        "mv_infonce": (lambda be: co.mv_infonce(mv, 0.1, backend=be), [mv], True, B),
        # MoCo v2: B queries against their own key and the queue; M = K, no gradient for the queue
        "info_nce_queue": (lambda be: co.info_nce(img, txt, 0.2, queue=queue, in_batch_negatives=False, backend=be),
                           [img, txt], False, QUEUE),
    }


def _peer_runners(loss, cases, B):
    """(name, zero-argument callable) for each peer of ``loss`` that imports here."""
    import importlib

    from contrastive_ops.benchmarking.peers import PEERS

    _, leaves, _, _ = cases[loss]
    args = {"clip_loss": lambda: leaves[:3], "siglip_loss": lambda: leaves[:4],
            "info_nce": lambda: leaves[:2], "nt_xent": lambda: leaves[:2], "mv_infonce": lambda: leaves,
            "info_nce_queue": lambda: leaves}[loss]()
    kw = {"temperature": 0.07 if loss == "info_nce" else 0.5}
    out = []
    for peer in PEERS.get(loss, ()):
        try:
            importlib.import_module(peer.module)
            call = peer.build(kw)
        except Exception as e:  # listed, not hidden
            print(f"{loss:12s} B={B:6d} peer {peer.name}: not run ({type(e).__name__}: {e})", flush=True)
            continue
        out.append((f"peer:{peer.name}", (lambda call=call: call(*args))))
    return out


@contextlib.contextmanager
def _backward_path(backend):
    """``triton:<path>``: the Triton backend with that backward path (``BACKWARD`` of sim_lse and siglip) for the
    whole measurement (forward and backward); any other name: nothing changes."""
    _, _, path = backend.partition(":")
    if not path or backend.startswith("peer:"):
        yield
        return
    from contrastive_ops.backends._triton import siglip as tsiglip
    from contrastive_ops.backends._triton import sim_lse as tcore

    before = tcore.BACKWARD, tsiglip.BACKWARD
    tcore.BACKWARD = tsiglip.BACKWARD = path
    try:
        yield
    finally:
        tcore.BACKWARD, tsiglip.BACKWARD = before


def _gemm_floor(B, M, D, gram, dtype, products=3):
    """cuBLAS time of the step's products and their FLOPs: a Gram loss Z·Zᵀ and dS·Z; otherwise Q·Kᵀ, dS·K and,
    when ``products`` is 3, dSᵀ·Q (2 for candidates without gradient, e.g. a queue)."""
    q = torch.randn(B, D, device="cuda", dtype=dtype)
    k = torch.randn(M, D, device="cuda", dtype=dtype)
    s = torch.randn(B, M, device="cuda", dtype=dtype)

    def two():
        q @ k.T
        s @ k
        if products == 3:
            s.T @ q

    def one():
        q @ q.T
        s @ q

    if gram:
        return _time(one, reps=5), 4 * B * B * D
    return _time(two, reps=5), 2 * products * B * M * D


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16384,32768,65536")
    p.add_argument("--dims", default="512,1024")
    p.add_argument("--losses", default="clip_loss,info_nce,siglip_loss,nt_xent,info_nce_queue")
    p.add_argument("--backends", default="triton,triton:deterministic,cuda,reference",
                   help="backends; triton:<path> is the Triton backend with that backward path (triton: "
                        "auto, which takes the GEMM backward at these shapes; triton:deterministic, the fused one)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--peers", action="store_true", help="also time the peers of each loss that import here")
    p.add_argument("--json", default=None)
    p.add_argument("--budget", type=float, default=240.0, help="seconds; no new point starts after it")
    p.add_argument("--time-per-point", type=float, default=TIME_PER_POINT,
                   help="seconds of timed calls per measurement (after warm-up)")
    a = p.parse_args(argv)
    globals()["TIME_PER_POINT"] = a.time_per_point
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    rate = _gemm_rate()
    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  cuBLAS bf16 8192^3: "
          f"{rate / 1e12:.0f} TFLOP/s", flush=True)
    rows = []
    avail = co.available_backends()
    backends = [b for b in a.backends.split(",") if avail.get(b.split(":")[0], (False,))[0]]
    print(f"backends: {backends}  (asked {a.backends}; availability {avail})", flush=True)
    for D in [int(x) for x in a.dims.split(",")]:
        for B in [int(x) for x in a.sizes.split(",")]:
            cases = _cases(B, D, dtype)
            for loss in a.losses.split(","):
                fn, leaves, gram, M = cases[loss]
                floor_t, model_flops = _gemm_floor(M if gram else B, M, D, gram, dtype,
                                                   products=2 if loss == "info_nce_queue" else 3)
                ref_val = None
                runners = [(be, (lambda be=be: fn(be.split(":")[0]))) for be in backends]
                if a.peers:
                    runners += _peer_runners(loss, cases, B)
                for be, run in runners:
                    if time.perf_counter() - t0 > a.budget:
                        print("budget reached", flush=True)
                        break
                    row = dict(loss=loss, B=B, D=D, dtype=a.dtype, backend=be, gemm_floor_s=floor_t,
                               model_flops=model_flops)

                    def step():
                        out = run()
                        torch.autograd.grad(out, leaves)

                    try:
                        with _backward_path(be):
                            val = run().item()
                            if be == "reference":
                                ref_val = val
                            row["loss_value"] = val
                            row["time_s"] = _time(step)
                            if not be.startswith("peer:"):  # where the time goes: the forward alone
                                with torch.no_grad():
                                    row["fwd_time_s"] = _time(run, reps=5, max_s=TIME_PER_POINT / 2)
                            row["peak_bytes"] = peak_memory(step, "cuda")
                        row["model_tflops"] = model_flops / row["time_s"] / 1e12
                        row["frac_peak"] = model_flops / row["time_s"] / PEAK_BF16
                        row["frac_cublas"] = model_flops / row["time_s"] / rate
                        row["x_gemm_floor"] = row["time_s"] / floor_t
                        row["status"] = "ok"
                    except torch.cuda.OutOfMemoryError as e:
                        row["status"] = "oom"
                        row["error"] = str(e).splitlines()[0]
                    except Exception as e:  # recorded, not hidden: the table shows it
                        row["status"] = "error"
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    torch.cuda.empty_cache()
                    rows.append(row)
                    msg = (f"{loss:12s} B={B:6d} D={D:5d} {be:9s} " +
                           (f"{row['time_s'] * 1e3:9.2f} ms  {row['model_tflops']:6.0f} TFLOP/s "
                            f"{100 * row['frac_peak']:5.1f}% peak  {row['x_gemm_floor']:5.2f}x GEMM floor  "
                            f"mem {row['peak_bytes'] / 2**20:8.0f} MiB  loss {row['loss_value']:.6g}" +
                            (f"  fwd {row['fwd_time_s'] * 1e3:.2f} ms" if "fwd_time_s" in row else "")
                            if row["status"] == "ok" else f"{row['status']}: {row.get('error', '')}"))
                    print(msg, flush=True)
                for r in rows:
                    if r["loss"] == loss and r["B"] == B and r["D"] == D and ref_val is not None and "loss_value" in r:
                        r["rel_err_vs_reference"] = abs(r["loss_value"] - ref_val) / max(abs(ref_val), 1e-30)
    out = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cublas_bf16_flops=rate,
               peak_bf16_flops=PEAK_BF16, rows=rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
