"""Mutation check of the test suite: apply each deliberate kernel bug to a copy of the tree, run its tests.

    python tests/mutation/run.py                 # every mutant
    python tests/mutation/run.py --only ID,...   # some
    python tests/mutation/run.py --list

Run on demand (not in CI).  For each mutant of ``tests/mutation/mutants.py``:
copy the tree (tracked and untracked-but-not-ignored files, plus the built
extension) to a temporary directory, replace the mutant's snippet, rebuild
the CPU extension in the copy when the mutant is in C++ (CONTRASTIVE_OPS_CPU_ONLY=1),
and run its tests there.  Outcomes:

* ``killed``    the tests failed (a test failure or an error, including a crash);
* ``survived``  the tests passed: the suite misses this bug;
* ``stale``     the snippet is no longer in the file exactly once (the kernel
                changed): rewrite the mutant; never counted as killed;
* ``needs a GPU``  a CUDA-only mutant on a machine without a CUDA device;
* ``build failed`` the mutated C++ did not compile (fix the mutant).

The kill rate is killed / (killed + survived).  Exit status 1 if any mutant survived.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

from mutants import MUTANTS, Mutant  # noqa: E402


def _tree_files():
    out = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         check=True, capture_output=True).stdout.decode()
    files = [f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]
    pkg = os.path.join(ROOT, "contrastive_ops")
    built = [os.path.join("contrastive_ops", f) for f in os.listdir(pkg)
             if (f.startswith("_C") and f.endswith((".so", ".pyd"))) or f == "_build_info.py"]
    return files + built


def _copy_tree(dst):
    for f in _tree_files():
        os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def _gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def run_mutant(m: Mutant, *, timeout: int, keep: bool = False) -> dict:
    rec = {"id": m.id, "file": m.file, "kind": m.kind, "what": m.what, "tests": list(m.tests)}
    src = os.path.join(ROOT, m.file)
    text = open(src).read() if os.path.exists(src) else ""
    n = text.count(m.old)
    if n != 1:
        rec.update(status="stale", detail=f"snippet found {n} times in {m.file}")
        return rec
    if m.kind == "cuda" and not _gpu():
        rec.update(status="needs a GPU", detail="CUDA-only code; no CUDA device here to run it")
        return rec
    t0 = time.perf_counter()
    work = tempfile.mkdtemp(prefix=f"mutant-{m.id}-")
    try:
        _copy_tree(work)
        with open(os.path.join(work, m.file), "w") as f:
            f.write(text.replace(m.old, m.new))
        env = dict(os.environ, PYTHONPATH=work, PYTHONDONTWRITEBYTECODE="1")
        if m.kind in ("cpp", "cuda"):
            benv = dict(env, CONTRASTIVE_OPS_CPU_ONLY="1" if m.kind == "cpp" else "0",
                        MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
            b = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=work, env=benv,
                               capture_output=True, text=True, timeout=timeout)
            if b.returncode != 0:
                rec.update(status="build failed", detail=(b.stdout + b.stderr)[-2000:])
                return rec
        p = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                           cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        tail = (p.stdout + p.stderr).strip().splitlines()
        if p.returncode == 0:
            rec.update(status="survived", detail=tail[-1] if tail else "")
        elif p.returncode == 5:
            rec.update(status="no tests", detail="pytest collected no tests: fix the mutant's test selection")
        else:
            failed = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
            rec.update(status="killed", detail=(failed[0] if failed else tail[-1] if tail else "")[:300])
    except subprocess.TimeoutExpired:
        rec.update(status="killed", detail=f"timed out after {timeout} s (a hang counts as caught)")
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated mutant ids")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--timeout", type=int, default=1200, help="seconds per build and per test run")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the mutated copies")
    args = ap.parse_args(argv)
    mutants = list(MUTANTS)
    if args.only:
        ids = set(args.only.split(","))
        unknown = ids - {m.id for m in mutants}
        if unknown:
            ap.error(f"unknown mutants {sorted(unknown)}")
        mutants = [m for m in mutants if m.id in ids]
    if args.list:
        for m in mutants:
            print(f"{m.id:32s} {m.kind:6s} {m.file}: {m.what}")
        return 0
    results = []
    for m in mutants:
        rec = run_mutant(m, timeout=args.timeout, keep=args.keep)
        results.append(rec)
        print(f"{rec['status']:12s} {m.id:32s} {rec.get('seconds', 0):7.1f} s  {rec.get('detail', '')[:160]}",
              flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    survived = sum(r["status"] == "survived" for r in results)
    others = {s: sum(r["status"] == s for r in results) for s in {r["status"] for r in results}} 
    rate = killed / (killed + survived) if killed + survived else float("nan")
    print(f"\nkilled {killed} / {killed + survived} run ({rate:.0%}); all outcomes: {others}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "killed": killed, "survived": survived}, f, indent=1)
    return 1 if survived or any(r["status"] in ("build failed", "no tests") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
