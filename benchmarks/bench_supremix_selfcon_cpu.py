"""SupReMix and SelfCon on CPU: the library against the official code at the papers' main configurations.

* SupReMix, AgeDB-DIR (``agedb-dir/train_supremix.py`` of Mixup-Your-Own-Pairs, the README's command,
  i.e. its defaults): batch 128, ``--pool 1`` (one loss over the whole batch), 2 views, 128-d
  projection head (``--dim``), τ = τ_b = 0.5, window n = 5, λ ~ Beta(2, 8) (``--beta 0``), integer ages
  drawn uniformly from AgeDB's range 1–101.  Two settings:

  (a) the official defaults: ``use_weight=True`` (``L1_inv``), one λ per pair: ours with
      ``mix_lambda=None`` (λ drawn per pair inside the kernels from a counter-based generator, seeded
      from torch's generator, reset to one seed before every call), the official code with the (M, M)
      matrix of those same λ (``label_lse.pair_lambda``), M = 2B, so that every provider sees the same λ;
  (b) ``use_weight=False`` with one λ per anchor (an (M,) tensor): the configuration the fused
      composition computes.

  Providers: ``official`` (the official ``mixing_func`` + ``SupConLoss_v2``, transcribed in
  ``tests/test_supremix.py``: it builds the (2B, (2B)², D) mixture tensor), ``reference`` (the
  library's dense formula), ``cpu`` (the fused composition on the C++ sim_lse kernels) wherever
  ``supremix_loss(..., backend="cpu")`` accepts the arguments, skipped with its reason otherwise.
  Besides the paper's batch, the first batch whose mixture tensor alone, (2B)³·D·4 bytes, exceeds this
  machine's memory (MemTotal): there the official code cannot run (it is not tried: its allocation is
  computed from its shapes) and ``reference`` and ``cpu`` are measured.  The official code is run only
  where its predicted peak fits under ``--official-limit-gib`` and the memory available now.
* SelfCon, CIFAR-100 (``scripts/selfcon_represent.sh`` of Self-Contrastive-Learning): batch 1024, one
  augmented view, ResNet-18 with ``selfcon_pos [False,True,False]`` (one sub-network exit after the
  second block) + the backbone: V = 2 "views", 128-d heads (``--feat_dim``), τ = 0.1, τ_b = 0.07 (the
  ``ConLoss`` default), labels (100 classes), ``alpha = 0``; also at batch 4096.  Providers:
  ``official`` (``ConLoss`` as ``main_represent.py`` calls it, ``tests/test_selfcon.py``),
  ``reference``, ``cpu`` (one sim_lse call over the V·B samples).

The official transcriptions live in the tests (the code they come from is not in the package);
this script imports them from there.  Every provider's loss is checked against the reference
once per size before timing.  SupReMix's official code max-shifts its real and mixture logits
separately (loss-notes §4; ``test_official_code_shifts_mixtures_separately``), a different loss once
mixtures are in: its value is recorded with its difference to the reference, and it is checked
against the reference with the mixtures off (same inputs, same weights), where the two coincide.

Step = forward + ``torch.autograd.grad`` of every input; each provider's first step (its check)
is the warm-up; then the providers of a size are timed in turns (interleaved, one step each per
round, ``contrastive_ops.benchmarking.measure.time_step``) so that the machine's load falls on all
alike; median over the repeats.  Peak memory = the peak tensor bytes of one step on the CPU
allocator (``measure.peak_memory``, torch.profiler).  float32, one thread.

Run:  nice -n 0 python benchmarks/bench_supremix_selfcon_cpu.py --json out.json --md out.md
(``--supremix-sizes 64,128,256`` for more batches; ``--official-limit-gib`` caps the official runs).
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
from contrastive_ops.losses.supremix import draw_seed  # noqa: E402
from contrastive_ops.primitives.label_lse import pair_lambda  # noqa: E402
from contrastive_ops.benchmarking.envinfo import cpu_run_meta, write_results  # noqa: E402
from contrastive_ops.benchmarking.measure import peak_memory, summarize, time_step  # noqa: E402
from test_selfcon import official_selfcon  # noqa: E402
from test_supremix import official_supremix  # noqa: E402

GiB = 2**30
CPU = torch.device("cpu")
# Tensor bytes per (i, j, k) triple the official SupReMix code holds besides the mixture tensor
# (myop_mask, myop_label, the (2B, (2B)²) logits, masks, weights and their products): measured
# 58 at B = 64 and 128; 64 keeps the prediction on the safe side.
OFFICIAL_BYTES_PER_TRIPLE = 64


def _meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mixture_bytes(B, D):
    """The official code's mixture tensor: (2B, 2B, 2B, D) float32."""
    return (2 * B) ** 3 * D * 4


def official_predicted_bytes(B, D):
    return (2 * B) ** 3 * (4 * D + OFFICIAL_BYTES_PER_TRIPLE)


def first_batch_over(nbytes, D):
    """The smallest B whose mixture tensor alone exceeds ``nbytes``."""
    B = max(1, int((nbytes / (4 * D)) ** (1 / 3) / 2) - 2)
    while mixture_bytes(B, D) <= nbytes:
        B += 1
    return B


# ---------------------------------------------------------------------------------------------
# SupReMix
# ---------------------------------------------------------------------------------------------

SUPREMIX_SETTINGS = {
    "a": dict(use_weight=True, lam="pair", title="official defaults: use_weight=True (L1_inv), one λ per pair"),
    "b": dict(use_weight=False, lam="anchor", title="use_weight=False, one λ per anchor (fusable)"),
}
SUPREMIX_KW = dict(window=5, beta=(2.0, 8.0), mix_neg=True, mix_pos=True)


LAMBDA_SEED = 1234  # torch.manual_seed before every per-pair call of ours: the λ the official code gets


def _drawn_lambda(M):
    """The (M, M) λ that ``supremix_loss(mix_lambda=None)`` draws in one process after
    ``torch.manual_seed(LAMBDA_SEED)`` (rows: the view-major anchors, columns: the samples)."""
    torch.manual_seed(LAMBDA_SEED)
    ids = torch.arange(M)
    return pair_lambda(draw_seed(), ids, ids, (2, 8))


def _supremix_inputs(B, lam_kind, D=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 2, D, generator=g).requires_grad_()
    y = torch.randint(1, 102, (B,), generator=g)  # integer ages, AgeDB's range
    M = 2 * B
    if lam_kind == "pair":
        return x, y, _drawn_lambda(M)
    beta = torch.distributions.Beta(torch.tensor(2.0), torch.tensor(8.0))
    torch.manual_seed(seed)
    return x, y, beta.sample((M,))


def _supremix_providers(use_weight):
    def official(x, y, lam, mixtures=True):
        M = 2 * x.shape[0]
        lam_mat = lam if lam.dim() == 2 else lam[:, None].expand(M, M)
        return official_supremix(x, y, 0.5, window=5, lam=lam_mat, mix_neg=mixtures, mix_pos=mixtures,
                                 use_weight=use_weight)

    def ours(backend):
        def fn(x, y, lam, mixtures=True):
            kw = dict(SUPREMIX_KW, mix_neg=mixtures, mix_pos=mixtures)
            if lam.dim() == 2:  # per pair: drawn inside the call (the kernels' generator), as `lam` holds
                torch.manual_seed(LAMBDA_SEED)
                lam = None
            return co.supremix_loss(x, y, 0.5, use_weight=use_weight, mix_lambda=lam, backend=backend, **kw)
        return fn

    return {"official": official, "reference": ours("reference"), "cpu": ours("cpu")}


# ---------------------------------------------------------------------------------------------
# SelfCon
# ---------------------------------------------------------------------------------------------


def _selfcon_inputs(B, V=2, D=128, classes=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, D, generator=g).requires_grad_(), torch.randint(0, classes, (B,), generator=g)


def _selfcon_providers():
    return {
        "official": lambda x, y: official_selfcon(x, y, 0.1, 0.0),
        "reference": lambda x, y: co.selfcon_loss(x, y, 0.1, base_temperature=0.07, backend="reference"),
        "cpu": lambda x, y: co.selfcon_loss(x, y, 0.1, base_temperature=0.07, backend="cpu"),
    }


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _close(val, ref):
    return abs(val - ref) <= 1e-4 * max(1.0, abs(ref))


def interleaved(steps, *, min_repeats=3, max_repeats=15, min_time=1.0, max_time=20.0):
    """Time the ``steps`` in turns, one step each per round, until each has ``min_repeats`` and
    ``min_time`` (or ``max_repeats``; or ``max_time`` after one): ``time_step``'s rule, interleaved."""
    times = {k: [] for k in steps}
    active = list(steps)
    while active:
        for name in list(active):
            times[name].append(time_step(steps[name], CPU, warmup=0, min_repeats=1, max_repeats=1, min_time=0.0,
                                         max_time=math.inf).median)
            n, spent = len(times[name]), sum(times[name])
            if n >= max_repeats or (n >= min_repeats and spent >= min_time) or spent >= max_time:
                active.remove(name)
    return {k: summarize(v) for k, v in times.items()}


def measure(loss, setting, N, args, providers, *, check, skip=None, extra=None, timing=None):
    """Check every provider against the reference (its warm-up step), time them interleaved, then
    take each one's peak memory.  ``check(name, fn)`` returns (value, note) or raises; ``skip`` maps
    a provider to the reason it does not run."""
    skip = dict(skip or {})
    rows, steps, vals, notes = [], {}, {}, {}
    for name, fn in providers.items():
        if name in skip:
            continue
        try:
            vals[name], notes[name] = check(name, fn)
        except _Unsupported as e:
            skip[name] = str(e)
            continue

        def step(fn=fn):
            torch.autograd.grad(fn(*args), [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad])
        steps[name] = step
    times = interleaved(steps, **(timing or {}))
    for name in providers:
        row = dict(loss=loss, setting=setting, N=N, provider=name, **(extra or {}))
        if name in skip:
            rows.append(dict(row, status="skipped", reason=skip[name]))
            print(f"{loss:8s} {setting:2s} N={N:5d} {name:9s} skipped: {skip[name]}", flush=True)
            continue
        t = times[name]
        peak = peak_memory(steps[name], CPU)
        rows.append(dict(row, status="ok", median_s=t.median, q25_s=t.q25, q75_s=t.q75, repeats=t.repeats,
                         peak_bytes=peak, loss_value=vals[name], **notes[name]))
        print(f"{loss:8s} {setting:2s} N={N:5d} {name:9s} {t.median * 1e3:10.2f} ms ({t.repeats:2d}) "
              f"peak {peak / 2**20:10.2f} MiB", flush=True)
    return rows


class _Unsupported(Exception):
    pass


def run_supremix(sizes, args, D=128):
    rows = []
    limit = args.official_limit_gib * GiB
    for key in args.supremix_settings:
        st = SUPREMIX_SETTINGS[key]
        providers = _supremix_providers(st["use_weight"])
        for B in sizes:
            x, y, lam = _supremix_inputs(B, st["lam"], D)
            skip = {}
            pred = official_predicted_bytes(B, D)
            avail = _meminfo("MemAvailable")
            total = _meminfo("MemTotal")
            mix = mixture_bytes(B, D)
            if total is not None and mix > total:
                skip["official"] = (f"out of memory: its mixture tensor (2B)^3*D*4 = {mix / GiB:.1f} GiB "
                                    f"exceeds this machine's {total / GiB:.1f} GiB (not tried)")
            elif pred > limit or (avail is not None and pred > avail - 2 * GiB):
                skip["official"] = (f"predicted peak {pred / GiB:.1f} GiB (mixture tensor {mix / GiB:.1f} GiB) over "
                                    f"the limit {limit / GiB:.0f} GiB or the {(avail or 0) / GiB:.1f} GiB available "
                                    "now (not tried)")
            ref_fn = providers["reference"]
            ref = float(ref_fn(x, y, lam).detach())

            def check(name, fn):
                if name == "reference":
                    torch.autograd.grad(fn(x, y, lam), x)
                    if lam.dim() == 2:  # the λ drawn inside the call are the matrix the official code gets
                        given = float(co.supremix_loss(x, y, 0.5, use_weight=st["use_weight"], mix_lambda=lam,
                                                       backend="reference", **SUPREMIX_KW).detach())
                        assert _close(given, ref), f"supremix B={B}: drawn λ {ref} != the given matrix {given}"
                    return ref, {}
                try:
                    out = fn(x, y, lam)
                except RuntimeError as e:
                    if "cannot run supremix_loss" in str(e):
                        raise _Unsupported(str(e)) from None
                    raise
                torch.autograd.grad(out, x)
                val = float(out.detach())
                if name == "official":
                    # the separate max-shifts: compare with the mixtures off, where the losses coincide
                    plain = float(fn(x, y, lam, mixtures=False).detach())
                    plain_ref = float(ref_fn(x, y, lam, mixtures=False).detach())
                    assert _close(plain, plain_ref), f"supremix official B={B} without mixtures: {plain} != {plain_ref}"
                    return val, dict(delta_vs_reference=val - ref, check="without mixtures")
                assert _close(val, ref), f"supremix {name} B={B}: {val} != reference {ref}"
                return val, {}

            rows += measure("supremix", key, B, (x, y, lam), providers, check=check, skip=skip,
                            extra=dict(V=2, D=D, mixture_bytes=mixture_bytes(B, D),
                                       official_predicted_bytes=pred), timing=args.timing)
    return rows


def run_selfcon(sizes, args, V=2, D=128):
    rows = []
    providers = _selfcon_providers()
    for B in sizes:
        x, y = _selfcon_inputs(B, V, D)
        ref = float(providers["reference"](x, y).detach())

        def check(name, fn):
            out = fn(x, y)
            torch.autograd.grad(out, x)
            val = float(out.detach())
            assert _close(val, ref), f"selfcon {name} B={B}: {val} != reference {ref}"
            return val, {}

        rows += measure("selfcon", "", B, (x, y), providers, check=check, extra=dict(V=V, D=D), timing=args.timing)
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _table(sub, provs):
    out = ["| B | " + " | ".join(f"{p} ms" for p in provs) + " | " + " | ".join(f"{p} MiB" for p in provs) + " |",
           "|" + "---|" * (1 + 2 * len(provs))]
    for N in dict.fromkeys(r["N"] for r in sub):
        by = {r["provider"]: r for r in sub if r["N"] == N}

        def cell(p, key, f):
            r = by.get(p)
            if r is None:
                return ""
            if r["status"] != "ok":
                return "oom" if r["reason"].startswith("out of memory") else "—"
            return f(r[key])
        out.append(f"| {N} | " + " | ".join(cell(p, "median_s", lambda v: f"{v * 1e3:.1f}") for p in provs) + " | "
                   + " | ".join(cell(p, "peak_bytes", lambda v: f"{v / 2**20:.1f}") for p in provs) + " |")
    return out


def markdown(rows, meta):
    out = [f"# CPU: SupReMix and SelfCon against the official code — {meta['date']}", "",
           f"{meta['cpu']}, {meta['mem_gib']:.1f} GiB, torch {meta['torch']}, float32, {meta['threads']} thread(s); "
           "the machine was shared with other jobs (2 cores; load average "
           f"{meta['load_avg'][1]:.1f} over the last 5 minutes of the run): times are indicative.", "",
           "Step = forward + backward of every input, median ms over the repeats (providers timed in turns); "
           "peak = peak tensor bytes of one step (torch.profiler, CPU allocator).", ""]
    sup = [r for r in rows if r["loss"] == "supremix"]
    for key in dict.fromkeys(r["setting"] for r in sup):
        sub = [r for r in sup if r["setting"] == key]
        provs = list(dict.fromkeys(r["provider"] for r in sub))
        out += [f"## supremix ({key}): {SUPREMIX_SETTINGS[key]['title']}", ""] + _table(sub, provs) + [""]
        for r in sub:
            if r["status"] == "ok" and "delta_vs_reference" in r:
                out.append(f"* B = {r['N']}, `official` loss {r['loss_value']:.4f} vs reference "
                           f"{r['loss_value'] - r['delta_vs_reference']:.4f} (its separate max-shifts); equal to the "
                           "reference with the mixtures off")
        skipped = {}
        for r in sub:
            if r["status"] != "ok":
                skipped.setdefault((r["provider"], r["reason"]), []).append(str(r["N"]))
        for (prov, reason), Ns in skipped.items():
            out.append(f"* B = {', '.join(Ns)}, `{prov}` not run: {reason}")
        out.append("")
    sc = [r for r in rows if r["loss"] == "selfcon"]
    if sc:
        provs = list(dict.fromkeys(r["provider"] for r in sc))
        out += [f"## selfcon (V = {sc[0]['V']}, D = {sc[0]['D']})", ""] + _table(sc, provs) + [""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--supremix-sizes", default="64,128",
                    help="batches (B instances, 2 views); the first batch the official code cannot hold is added")
    ap.add_argument("--no-oom-point", action="store_true",
                    help="do not add the first batch the official code cannot run")
    ap.add_argument("--supremix-settings", default="a,b")
    ap.add_argument("--official-limit-gib", type=float, default=12.0,
                    help="run the official SupReMix code only where its predicted peak is below this")
    ap.add_argument("--selfcon-sizes", default="1024,4096")
    ap.add_argument("--selfcon-views", type=int, default=2)
    ap.add_argument("--max-time", type=float, default=20.0, help="seconds of timing per provider and size, at most")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    args.supremix_settings = [s for s in args.supremix_settings.split(",") if s.strip()]
    args.timing = dict(max_time=args.max_time)
    total = _meminfo("MemTotal")
    sup_sizes = sizes(args.supremix_sizes)
    if total is not None and not args.no_oom_point:
        b_oom = first_batch_over(total, 128)
        print(f"official SupReMix: the mixture tensor exceeds MemTotal {total / GiB:.1f} GiB from B = {b_oom} "
              f"({mixture_bytes(b_oom, 128) / GiB:.1f} GiB); B = {b_oom - 1}: "
              f"{mixture_bytes(b_oom - 1, 128) / GiB:.1f} GiB", flush=True)
        sup_sizes = sorted(set(sup_sizes) | {b_oom})
    rows = run_supremix(sup_sizes, args) if sup_sizes and args.supremix_settings else []
    rows += run_selfcon(sizes(args.selfcon_sizes), args, V=args.selfcon_views)
    meta = cpu_run_meta(args.threads, mem_gib=(total or 0) / GiB, load_avg=os.getloadavg())
    write_results(args.json, args.md, meta, rows, markdown)


if __name__ == "__main__":
    main()
