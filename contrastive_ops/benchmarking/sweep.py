r"""The timing/memory sweep: every loss × implementation × batch size.

Sizes run in increasing order, all losses at one size before the next, so
that a time budget cut leaves every loss measured at the small sizes.  The
library's backends run first (until 55% of the budget when peers follow),
then the peers (until 70%), then ``torch.compile`` of the reference loss by
loss (compilation takes long; a cut leaves whole curves for the first
losses).  For each (loss, implementation), a point is

* ``ok``: timed and measured;
* ``oom``: out of memory (the larger sizes are then ``skipped``);
* ``too_slow``: the previous point predicts (time ∝ N²) more than
  ``max_point_s`` seconds per step (the larger sizes too);
* ``error``: any other exception, recorded with its message (a failure);
* ``not_implemented``: a peer raised ``NotImplementedError`` (from one of
  contrastive_ops' own implementations it is an ``error``);
* ``skipped``: the time budget ran out, a predicted peak above the memory cap,
  or an earlier ``oom``/``too_slow``/``error``.

Implementations that cannot run here are listed once, with the reason, under
``implementations``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from . import cases as C
from .envinfo import environment
from .measure import MEMORY_METHOD, free_memory, is_oom, make_step, peak_memory, time_step

SCHEMA_VERSION = 1
PHASE_SHARES = (0.55, 0.7, 1.0)  # cumulative budget shares of the phases of run_sweep
COMPILED = "torch.compile(reference)"

TIMING_METHOD = ("forward + torch.autograd.grad of every input that requires grad (forward only where the "
                 "loss has no gradient); after warm-up, repeated until min_repeats and min_time are reached; "
                 "CUDA events on CUDA, perf_counter on CPU; median, quartiles, min, max in seconds")


def default_sizes(device) -> List[int]:
    if torch.device(device).type == "cuda":
        return [1024, 2048, 4096, 8192, 16384, 32768, 65536]
    return [256, 512, 1024, 2048, 4096]


def quick_sizes(device) -> List[int]:
    if torch.device(device).type == "cuda":
        return [1024, 4096]
    return [64, 128]


@dataclass
class SweepConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    dim: int = 128
    sizes: Sequence[int] = ()
    losses: Sequence[str] = tuple(C.CASES)
    only: Optional[Sequence[str]] = None  # implementation names to keep (None: all)
    peers: bool = True
    compile_reference: bool = True
    budget_s: float = 600.0
    max_point_s: float = 10.0
    mem_cap_bytes: Optional[int] = None  # CPU: skip points predicted above this
    warmup: int = 1
    min_repeats: int = 3
    max_repeats: int = 30
    min_time: float = 0.2
    memory: bool = True
    extra: dict = field(default_factory=dict)

    def as_dict(self):
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""), "dim": self.dim,
                "sizes": list(self.sizes), "losses": list(self.losses), "only": self.only, "peers": self.peers,
                "compile_reference": self.compile_reference, "budget_s": self.budget_s,
                "max_point_s": self.max_point_s, "mem_cap_bytes": self.mem_cap_bytes, "warmup": self.warmup,
                "min_repeats": self.min_repeats, "max_repeats": self.max_repeats, "min_time": self.min_time,
                **self.extra}


def default_mem_cap() -> Optional[int]:
    """A quarter of the available RAM (CPU sweeps share the machine)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 4
    except OSError:
        pass
    return None


def _short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


def run_sweep(cfg: SweepConfig, *, progress=None) -> Dict:
    """Run the sweep and return the results document (see ``write_results``)."""
    device = torch.device(cfg.device)
    sizes = sorted(set(int(s) for s in cfg.sizes))
    losses = [C.CASES[name] for name in cfg.losses]
    impls: Dict[str, List[C.Impl]] = {}
    listing: Dict[str, Dict[str, dict]] = {}
    for case in losses:
        probe = case.make(8, cfg.dim, cfg.dtype, device)
        impls[case.name] = C.implementations(case, probe, peers=cfg.peers, compile_reference=cfg.compile_reference,
                                             only=cfg.only)
        listing[case.name] = {i.name: {"kind": i.kind, "available": i.why_not is None, "reason": i.why_not}
                              for i in impls[case.name]}
    runnable = {name: [i for i in lst if i.why_not is None] for name, lst in impls.items()}
    records: List[dict] = []
    stop: Dict[tuple, str] = {}  # (loss, impl) -> why larger sizes are skipped
    last: Dict[tuple, dict] = {}
    start = time.perf_counter()
    # Phases, each with a deadline (a share of the budget, when later phases have work):
    # 1. the library's backends (the reference included), sizes outer;
    # 2. the peers' losses, sizes outer;
    # 3. torch.compile of the reference, loss by loss (compiling takes seconds to minutes, so a
    #    budget cut should leave whole curves for some losses rather than one point for each).
    groups = [
        (lambda i: i.kind == "backend", "sizes"),
        (lambda i: i.kind == "peer" and i.name != COMPILED, "sizes"),
        (lambda i: i.name == COMPILED, "losses"),
    ]
    present = [any(sel(i) for lst in runnable.values() for i in lst) for sel, _ in groups]
    shares = []
    for k in range(len(groups)):
        later = any(present[k + 1:])
        shares.append(PHASE_SHARES[k] if later else 1.0)
    for (sel, order), share in zip(groups, shares):
        deadline = start + cfg.budget_s * share
        if order == "sizes":
            points = [(n, c, i) for n in sizes for c in losses for i in runnable[c.name] if sel(i)]
        else:
            points = [(n, c, i) for c in losses for i in runnable[c.name] if sel(i) for n in sizes]
        for n, case, impl in points:
            key = (case.name, impl.name)
            rec = {"loss": case.name, "impl": impl.name, "kind": impl.kind, "size": n,
                   "dtype": str(cfg.dtype).replace("torch.", ""), "status": None, "detail": None}
            records.append(rec)
            note = f"{case.name} {impl.name} N={n}"
            if progress is not None:
                progress.update(0, note=note)
            if key in stop:
                rec.update(status="skipped", detail=stop[key])
            elif time.perf_counter() > deadline:
                rec.update(status="skipped", detail=f"time budget of {cfg.budget_s:g} s used up")
            else:
                _measure_point(cfg, case, impl, n, device, rec, last.get(key))
                if rec["status"] == "ok":
                    last[key] = rec
                elif rec["status"] == "not_implemented":
                    stop[key] = "not implemented"
                elif rec["status"] in ("oom", "too_slow", "error") or (
                        rec["status"] == "skipped" and "cap" in (rec["detail"] or "")):
                    stop[key] = f"{rec['status']} at N={n}"
            if progress is not None:
                progress.update(1, note=note)
    order = {(c.name, i.name): k for c in losses for k, i in enumerate(runnable[c.name])}
    records.sort(key=lambda r: (r["size"], cfg.losses.index(r["loss"]) if r["loss"] in cfg.losses else 0,
                                order[(r["loss"], r["impl"])]))
    env = environment(device)
    return {
        "schema_version": SCHEMA_VERSION,
        "date": env["date"],
        "device": env["device"]["name"],
        "environment": env,
        "backends": {k: {"available": ok, "reason": why} for k, (ok, why) in _backends().items()},
        "config": cfg.as_dict(),
        "methods": {"timing": TIMING_METHOD, "memory": MEMORY_METHOD[device.type], "flops": _flop_doc()},
        "cases": {c.name: {"flops": c.flops_formula, "kwargs": _kwargs_doc(c, cfg),
                           "shapes": {str(n): _shapes(c, n, cfg) for n in sizes}}
                  for c in losses},
        "implementations": listing,
        "results": records,
        "elapsed_s": time.perf_counter() - start,
    }


def _shapes(case, n, cfg):
    return case.make(n, cfg.dim, cfg.dtype, "meta").shapes


def _kwargs_doc(case, cfg):
    kw = case.make(8, cfg.dim, cfg.dtype, "meta").kwargs
    return {k: (v if isinstance(v, (int, float, str, bool)) else repr(type(v).__name__)) for k, v in kw.items()}


def _flop_doc() -> str:
    doc = C.__doc__
    i = doc.index("FLOP convention")
    return " ".join(doc[i:].split())


def _backends():
    import contrastive_ops as co

    return co.available_backends()


def _measure_point(cfg, case, impl, n, device, rec, prev) -> None:
    if prev is not None:
        r = (n / prev["size"]) ** 2
        t_pred = prev["time_s"]["min"] * r  # the minimum: least disturbed by other load
        if t_pred > cfg.max_point_s:
            rec.update(status="too_slow", detail=f"predicted {t_pred:.1f} s per step > {cfg.max_point_s:g} s limit")
            return
        if cfg.mem_cap_bytes and prev.get("peak_mem_bytes") and device.type != "cuda":
            m_pred = prev["peak_mem_bytes"] * r
            if m_pred > cfg.mem_cap_bytes:
                rec.update(status="skipped", detail=f"predicted peak {m_pred / 2**30:.1f} GiB > memory cap "
                                                    f"{cfg.mem_cap_bytes / 2**30:.1f} GiB")
                return
    inp = None
    try:
        inp = case.make(n, cfg.dim, cfg.dtype, device)
        rec["shapes"] = inp.shapes
        rec["flops"] = inp.flops
        rec["pass"] = "fwd+bwd" if inp.differentiable else "fwd"
        step = make_step(impl, inp)
        t0 = time.perf_counter()
        step()  # first call: compilation, autotuning, lazy initialization
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rec["first_step_s"] = time.perf_counter() - t0
        timing = time_step(step, device, warmup=cfg.warmup, min_repeats=cfg.min_repeats,
                           max_repeats=cfg.max_repeats, min_time=cfg.min_time, max_time=max(cfg.max_point_s, 1.0))
        rec["time_s"] = timing.as_dict()
        rec["flop_per_s"] = inp.flops / timing.median if inp.flops and timing.median > 0 else None
        rec["peak_mem_bytes"] = peak_memory(step, device) if cfg.memory else None
        rec["status"] = "ok"
    except NotImplementedError as e:
        # only a peer may lack a variant; the library's own implementations all exist
        rec.update(status="not_implemented" if impl.kind == "peer" else "error", detail=_short_error(e))
    except Exception as e:  # noqa: BLE001 - recorded; an error of our own backends fails the run
        rec.update(status="oom" if is_oom(e) else "error", detail=_short_error(e))
    finally:
        del inp
        if rec["status"] != "ok":
            free_memory(device)


def write_results(doc: Dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
        f.write("\n")
    return path


# ---------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------

def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    if b < 2**20:
        return f"{b / 2**10:.0f}K"
    if b < 2**30:
        return f"{b / 2**20:.1f}M"
    return f"{b / 2**30:.2f}G"


_SHORT = {"ok": None, "oom": "OOM", "too_slow": "slow", "error": "ERROR", "not_implemented": "n/i",
          "skipped": "skip"}


def format_tables(doc: Dict) -> List[str]:
    """Per loss: rows = batch size, columns = implementations, cells = median time / peak memory."""
    lines: List[str] = []
    by_loss: Dict[str, List[dict]] = {}
    for r in doc["results"]:
        by_loss.setdefault(r["loss"], []).append(r)
    # reasons shared by every loss (a backend missing here, the Triton interpreter) are said once, at the end
    absent = {k for k, v in doc.get("backends", {}).items() if not v["available"]}
    seen: Dict[tuple, int] = {}
    for impls in doc["implementations"].values():
        for k, v in impls.items():
            if not v["available"] and k not in absent:
                seen[(k, v["reason"])] = seen.get((k, v["reason"]), 0) + 1
    common = {key for key, count in seen.items() if count >= 2}
    dtype, dim = doc["config"]["dtype"], doc["config"]["dim"]
    for loss, recs in by_loss.items():
        impls = list(dict.fromkeys(r["impl"] for r in recs))
        sizes = sorted(set(r["size"] for r in recs))
        if all(r["status"] == "not_implemented" or (r["status"] == "skipped" and r["detail"] == "not implemented")
               for r in recs):
            lines.append(f"{loss}: not implemented")
            continue
        cell = {(r["impl"], r["size"]): r for r in recs}
        width = max(18, *(len(i) + 1 for i in impls))
        lines.append(f"{loss}  (median time / peak extra memory, {dtype}, D={dim})")
        lines.append("  " + f"{'N':>7}  " + "".join(f"{i:>{width}}" for i in impls))
        for n in sizes:
            row = []
            for i in impls:
                r = cell.get((i, n))
                if r is None:
                    row.append("")
                elif r["status"] == "ok":
                    row.append(f"{_fmt_time(r['time_s']['median'])} / {_fmt_bytes(r.get('peak_mem_bytes'))}")
                else:
                    row.append(_SHORT.get(r["status"], r["status"]))
            lines.append("  " + f"{n:>7}  " + "".join(f"{c:>{width}}" for c in row))
        ref_ok = {r["size"]: r for r in recs if r["impl"] == "reference" and r["status"] == "ok"}
        for i in impls:
            if i == "reference":
                continue
            both = [(n, cell[(i, n)]) for n in sorted(ref_ok) if cell.get((i, n), {}).get("status") == "ok"]
            if both:
                n, r = both[-1]
                ref = ref_ok[n]
                speed = ref["time_s"]["median"] / r["time_s"]["median"]
                line = f"  N={n}, {i} vs reference: " + (f"{speed:.1f}x faster" if speed >= 1
                                                             else f"{1 / speed:.1f}x slower")
                if r.get("peak_mem_bytes") and ref.get("peak_mem_bytes"):
                    m = ref["peak_mem_bytes"] / r["peak_mem_bytes"]
                    line += f", {m:.1f}x less memory" if m >= 1 else f", {1 / m:.1f}x more memory"
                lines.append(line)
        errs = [r for r in recs if r["status"] == "error"]
        for r in errs:
            lines.append(f"  ERROR {r['impl']} N={r['size']}: {r['detail']}")
        unavailable = {k: v["reason"] for k, v in doc["implementations"].get(loss, {}).items()
                       if not v["available"] and k not in absent and (k, v["reason"]) not in common}
        if unavailable:
            lines.append("  not run: " + "; ".join(f"{k} ({v})" for k, v in unavailable.items()))
        lines.append("")
    why_skipped = sorted({r["detail"] for r in doc["results"] if r["status"] == "skipped" and r["detail"]
                          and r["detail"] != "not implemented"})
    if why_skipped:
        lines.append("skip: " + "; ".join(why_skipped))
    if common:
        lines.append("not run: " + "; ".join(f"{k} ({why})" for k, why in sorted(common)))
    return lines


def backend_errors(doc: Dict) -> List[dict]:
    """Error records of the library's own implementations (a failed run)."""
    return [r for r in doc["results"] if r["status"] == "error" and r["kind"] == "backend"]
