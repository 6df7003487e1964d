"""Command line: ``python -m contrastive_ops`` and ``python -m contrastive_ops bench --out DIR``.

``python -m contrastive_ops`` (also ``contrastive-ops``)
    1. prints the environment and ``available_backends()`` with reasons;
    2. checks every loss on every available kernel backend against the
       reference on small random data, forward and gradients, with per-dtype
       tolerances (PASS/FAIL table; exit status 1 on any mismatch or error);
    3. times forward+backward and measures peak memory of each kernel backend
       against the plain-PyTorch reference at growing batch sizes.

``python -m contrastive_ops bench --out DIR``
    the full sweep (every loss × backend, ``torch.compile`` of the reference,
    and installed peers), written to ``DIR/results.json`` and ``DIR/<loss>.png``.

Without a CUDA device, ``TRITON_INTERPRET=1`` is set (unless already set) so
that the Triton kernels are checked on CPU tensors; they are not timed there.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional, Sequence

DTYPES = ("float32", "float16", "bfloat16", "float64")


def _csv(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _sizes(s: str) -> List[int]:
    try:
        out = [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes comma-separated integers, got {s!r}") from None
    if not out or min(out) < 2:
        raise argparse.ArgumentTypeError(f"--sizes must be integers >= 2, got {s!r}")
    return out


def _add_common(p: argparse.ArgumentParser, *, sub: bool = False) -> None:
    # ``sub``: the parser of "bench", created with argument_default=SUPPRESS, so that an option
    # given before "bench" keeps its value unless repeated after it.
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: small sizes, few repeats, no torch.compile, only the default variant "
                        "of each loss checked")
    p.add_argument("--sizes", type=_sizes, help="comma-separated batch sizes to time, e.g. 256,1024,4096")
    p.add_argument("--losses", type=_csv, help="comma-separated loss names (default: every loss of the library)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="device to time on (default: cuda if present)")
    p.add_argument("--dim", type=int, default=argparse.SUPPRESS if sub else 128,
                   help="feature dimension D of the timed inputs (default 128)")
    p.add_argument("--budget", type=float, help="time budget of the timing sweep in seconds")
    p.add_argument("--max-point-s", type=float, default=None,
                   help="skip larger sizes once a step is predicted to take longer than this (seconds)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m contrastive_ops",
        description="Environment, self-check of every loss on every backend against the reference, and a "
                    "time/memory comparison with plain PyTorch.  'bench --out DIR' runs the full sweep.")
    _add_common(p)
    p.add_argument("--dtype", type=_csv, default=None,
                   help=f"comma-separated dtypes to check ({', '.join(DTYPES)}); the first one is timed "
                        "(default: float32 on CPU, float32,float16,bfloat16 on CUDA)")
    p.add_argument("--backends", type=_csv, help="kernel backends to check and time (default: all available)")
    p.add_argument("--no-check", action="store_true", help="skip the self-check")
    p.add_argument("--no-bench", action="store_true", help="skip the timing table")
    p.add_argument("--verbose", "-v", action="store_true", help="print tracebacks of failures")
    sub = p.add_subparsers(dest="command")
    b = sub.add_parser("bench", help="full sweep with peers; writes results.json and PNG charts",
                       argument_default=argparse.SUPPRESS)
    _add_common(b, sub=True)
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--dtype", choices=DTYPES, help="dtype of the sweep (default float32)")
    b.add_argument("--impls", type=_csv, default=None, help="implementation names to keep (default: all available)")
    b.add_argument("--no-peers", action="store_true", default=False, help="leave out other libraries' losses")
    b.add_argument("--no-compile", action="store_true", default=False,
                   help="leave out torch.compile of the reference")
    b.add_argument("--no-charts", action="store_true", default=False, help="write the JSON only")
    return p


def _prepare_triton_env(argv: Sequence[str]) -> None:
    """Without a CUDA device, switch Triton's interpreter on so that the Triton backend is checked on CPU.

    Triton reads ``TRITON_INTERPRET`` when it is imported, and importing
    contrastive_ops has already imported it (through ``torch._dynamo``): the
    flag then takes effect only in a fresh interpreter, so the command runs
    again in one (once: the flag is set there).  An explicit
    ``TRITON_INTERPRET`` is left as it is.
    """
    import torch

    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "contrastive_ops", *argv])


def _device(args):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _losses(args) -> List[str]:
    from .benchmarking.cases import CASES

    names = args.losses or list(CASES)
    bad = [n for n in names if n not in CASES]
    if bad:
        raise SystemExit(f"--losses: unknown {bad}; choose from {list(CASES)}")
    return names


def _check_backend_names(names):
    from .backends import BACKENDS

    bad = [n for n in names or () if n not in BACKENDS or n == "reference"]
    if bad:
        raise SystemExit(f"--backends: unknown {bad}; choose from {[b for b in BACKENDS if b != 'reference']}")


def _dtype(name: str):
    import torch

    if name not in DTYPES:
        raise SystemExit(f"--dtype: unknown {name!r}; choose from {DTYPES}")
    return getattr(torch, name)


def _progress(args, total, label):
    from .benchmarking.measure import ProgressBar

    return ProgressBar(total, label=label, enabled=not args.no_progress)


# ---------------------------------------------------------------------------
# Self-check
# ---------------------------------------------------------------------------

def check_targets(only=None):
    """``(backend, device)`` pairs to check: every available kernel backend on each device it runs on here."""
    import torch

    import contrastive_ops as co
    from contrastive_ops import backends

    present = {"cpu"} | ({"cuda"} if torch.cuda.is_available() else set())
    out = []
    for name, (ok, _why) in co.available_backends().items():
        if name == "reference" or not ok or (only is not None and name not in only):
            continue
        for dev in sorted(set(backends.backend_module(name).devices()) & present):
            out.append((name, dev))
    return out


def _aggregate(results) -> str:
    """One table cell for the variants of a loss on one backend/device/dtype."""
    from .benchmarking import selfcheck as S

    st = [r.status for r in results]
    if S.FAIL in st:
        return f"FAIL ({st.count(S.FAIL)}/{len(st)})"
    parts = []
    if S.PASS in st:
        parts.append(f"PASS ({st.count(S.PASS)})")
    if S.UNAVAILABLE in st:
        parts.append("n/a")
    return ", ".join(parts)


def run_selfcheck(args, out=None) -> dict:
    """Print the PASS/FAIL table; return the number of failures and the results."""
    out = sys.stdout if out is None else out
    import torch

    from .benchmarking import selfcheck as S
    from .benchmarking.cases import CASES

    names = _losses(args)
    cases = [CASES[n] for n in names]
    targets = check_targets(args.backends)
    if args.dtype:
        dtypes = [_dtype(d) for d in args.dtype]
    else:
        dtypes = [torch.float32] + ([torch.float16, torch.bfloat16] if torch.cuda.is_available() else [])
    print(f"\nSelf-check against the reference (N={S.CHECK_N}, D={S.CHECK_D}, forward and gradients, "
          f"grad_output != 1):", file=out)
    results = []
    if not targets:
        print("  no kernel backend is available: only the reference is exercised (finite loss and gradients).",
              file=out)
        bar = _progress(args, len(cases), "check")
        for c in cases:
            results.append(S.reference_smoke(c, "cuda" if torch.cuda.is_available() else "cpu"))
            bar.update(1, note=c.name)
        bar.close()
        cols = [("reference", None, None)]
    else:
        total = sum(len(c.variants) if not args.quick else 1 for c in cases) * len(targets) * len(dtypes)
        bar = _progress(args, total, "check")
        results = S.run_checks(cases, targets, dtypes, progress=bar, all_variants=not args.quick)
        bar.close()
        cols = [(b, d, dt) for b, d in targets for dt in dtypes]
    # table: one row per loss, one column per backend/device/dtype, variants aggregated
    heads = ["loss"] + [b if d is None else f"{b}/{d}/{str(dt).replace('torch.', '')}" for b, d, dt in cols]
    rows = []
    for c in cases:
        row = [c.name]
        for b, d, dt in cols:
            sel = [r for r in results if r.loss == c.name and r.backend == b and (d is None or (
                r.device == d and r.dtype == str(dt).replace("torch.", "")))]
            row.append(_aggregate(sel) if sel else "")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) + 2 for i, h in enumerate(heads)]
    print("  " + "".join(h.ljust(w) for h, w in zip(heads, widths)), file=out)
    for r in rows:
        print("  " + "".join(x.ljust(w) for x, w in zip(r, widths)), file=out)
    fails = [r for r in results if r.status == S.FAIL]
    na = {(r.backend, r.device, r.detail) for r in results if r.status == S.UNAVAILABLE}
    for r in fails:
        print(f"  FAIL {r.loss}[{r.variant}] on {r.backend}/{r.device}/{r.dtype}: {r.detail}", file=out)
        if args.verbose and r.traceback:
            print("    " + r.traceback.rstrip().replace("\n", "\n    "), file=out)
    for b, d, why in sorted(na):
        print(f"  n/a on {b}/{d}: {why}", file=out)
    print(f"  {sum(r.status == S.PASS for r in results)} passed, {len(fails)} failed, "
          f"{sum(r.status == S.UNAVAILABLE for r in results)} not applicable", file=out)
    return {"fail": len(fails), "results": results}


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def _sweep_config(args, device, dtype, *, full: bool):
    from .benchmarking import sweep as W

    cuda = device.type == "cuda"
    if args.sizes:
        sizes = args.sizes
    elif args.quick:
        sizes = W.quick_sizes(device)
    elif full:
        sizes = W.default_sizes(device)
    else:
        sizes = [1024, 4096, 16384] if cuda else [256, 512, 1024]
    if args.budget is not None:
        budget = args.budget
    elif args.quick:
        budget = 30.0
    elif full:
        budget = 240.0 if cuda else 600.0
    else:
        budget = 60.0 if cuda else 35.0
    cfg = W.SweepConfig(
        device=str(device), dtype=dtype, dim=args.dim, sizes=sizes, losses=_losses(args),
        only=(getattr(args, "impls", None) if full else None),
        peers=full and not getattr(args, "no_peers", False),
        # compiling takes tens of seconds per loss: not part of a quick run
        compile_reference=full and not getattr(args, "no_compile", False) and not args.quick,
        budget_s=budget,
        max_point_s=args.max_point_s if args.max_point_s is not None else 5.0,
        mem_cap_bytes=None if cuda else W.default_mem_cap(),
        min_repeats=2 if args.quick else (5 if cuda else 3),
        max_repeats=5 if args.quick else (30 if cuda else 20),
        min_time=0.02 if args.quick else (0.1 if cuda else 0.15),
    )
    if not full and args.backends is not None:  # the default command compares backends only
        cfg.only = ["reference"] + list(args.backends)
    return cfg


def run_timing(args, device, dtype, *, full: bool, out=None):
    out = sys.stdout if out is None else out
    from .benchmarking import sweep as W

    cfg = _sweep_config(args, device, dtype, full=full)
    from .benchmarking.cases import CASES, implementations

    n_impl = 0
    for name in cfg.losses:
        probe = CASES[name].make(8, cfg.dim, dtype, device)
        n_impl += sum(i.why_not is None for i in implementations(
            CASES[name], probe, peers=cfg.peers, compile_reference=cfg.compile_reference, only=cfg.only))
    print(f"\nTiming forward+backward and peak memory on {device.type} ({str(dtype).replace('torch.', '')}, "
          f"D={cfg.dim}), "
          f"N = {', '.join(map(str, cfg.sizes))}; budget {cfg.budget_s:g} s:", file=out)
    bar = _progress(args, n_impl * len(cfg.sizes), "time ")
    doc = W.run_sweep(cfg, progress=bar)
    bar.close()
    for line in W.format_tables(doc):
        print(line, file=out)
    return doc


# ---------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------

def _set_threads(args, device) -> Optional[str]:
    """Apply ``--threads``; on a CPU busier than its core count, time with 1 thread unless told otherwise.

    With other processes on every core, torch's OpenMP threads wait for one
    another at each parallel region, and a 1 ms step takes 100+ ms.  Returns
    the note to print (None when nothing was decided).
    """
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
        return None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load >= (os.cpu_count() or 1) and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        return (f"note: load average {load:.1f} on {os.cpu_count()} cores: timing with 1 torch thread, as "
                "competing threads make CPU timings meaningless (pass --threads N to override)")
    return None


def _print_env(device, out=None, busy=None):
    out = sys.stdout if out is None else out
    import contrastive_ops as co

    from .benchmarking.envinfo import environment, format_environment

    for line in format_environment(environment(device), co.available_backends()):
        print(line, file=out)
    if busy:
        print(busy, file=out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _prepare_triton_env(argv)
    import torch

    device = _device(args)
    _check_backend_names(getattr(args, "backends", None))
    busy = _set_threads(args, device)
    t0 = time.perf_counter()
    if args.command == "bench":
        return _bench(args, device, busy)
    _print_env(device, busy=busy)
    failed = False
    if not args.no_check:
        res = run_selfcheck(args)
        failed |= res["fail"] > 0
    if not args.no_bench:
        from .benchmarking.sweep import backend_errors

        dtype = _dtype(args.dtype[0]) if args.dtype else torch.float32
        doc = run_timing(args, device, dtype, full=False)
        errs = backend_errors(doc)
        failed |= bool(errs)
    print(f"\n{'FAILED' if failed else 'OK'} in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


def _bench(args, device, busy=None) -> int:
    from .benchmarking.charts import write_charts
    from .benchmarking.sweep import backend_errors, write_results

    _print_env(device, busy=busy)
    dtype = args.dtype[0] if isinstance(args.dtype, list) else (args.dtype or "float32")
    doc = run_timing(args, device, _dtype(dtype), full=True)
    path = write_results(doc, args.out)
    print(f"wrote {path}")
    if not args.no_charts:
        for p in write_charts(doc, args.out):
            print(f"wrote {p}")
    errs = backend_errors(doc)
    if errs:
        print(f"FAILED: {len(errs)} error(s) in contrastive_ops backends", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
