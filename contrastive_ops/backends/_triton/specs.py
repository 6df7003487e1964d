r"""The sm_90a compile gate's collector: every Triton kernel of the backend, compiled without a GPU.

Interface of a kernel module: ``compile_specs() -> list[dict]``, one dict per
compiled variant the dispatcher can launch::

    name        str           the kernel's name in the gate's table
    fn          JITFunction   the ``@triton.jit`` function (``.fn`` of an Autotuner)
    args        dict          runtime argument name -> Triton type ("*bf16", "*fp16", "*fp32",
                              "*i32", "*i64", "i32", "fp32")
    constexprs  dict          constexpr name -> value (BLOCK sizes included)
    num_warps   int
    num_stages  int
    dtype       str           "bf16" | "fp16" | "fp32": the dtype of the feature operands
    D           int | None    the feature width the variant is for (None: no D)

Optional keys: ``streaming`` (bool: the kernel streams its operands through a
loop, so the gate requires ``cp.async`` or TMA; default: the kernel has a
``tl.dot``), ``default`` (bool: the config ``CONTRASTIVE_OPS_TRITON_CONFIGS=
default`` launches; the gate's quick mode keeps only these; default True) and
``expect_fail`` (str: why this variant is known not to meet the gate; the test
marks it ``xfail(strict=True)``) and ``divisible_by_16`` (list of argument names
Triton's launcher specializes as multiples of 16 for contiguous, aligned inputs;
``tiles.spec`` fills it; default: every pointer, every ``stride*`` and ``D``).
The gate compiles with them as ``tt.divisibility`` attrs (``tiles.spec_attrs``):
without them the compiler cannot vectorize the loads (no ``cp.async``) and the
registers and spills are not those of the binary that runs.

:func:`collect` imports every module of this package that defines
``compile_specs``.

Compiling (:func:`compile_spec`) needs ``TRITON_INTERPRET`` unset *before*
``import triton``; the gate runs it in separate processes:

    python -m contrastive_ops.backends._triton.specs --write      # regenerate cache + table
    python -m contrastive_ops.backends._triton.specs --faults     # the fault tables' entries
    python -m contrastive_ops.backends._triton.specs --list       # the variants, as JSON

Each Triton minor version compiles with its own ptxas and allocates registers
differently (a variant that spills under one may not under another), so the
gate keeps one of everything per minor version: the expected faults
(``_GATE_FAULTS[version]`` of the kernel modules, ``tiles.mark_known_faults``),
the cache ``benchmarks/results/triton-sm90-static-<version>.json`` and the
table ``benchmarks/results/triton-sm90-static-<version>.md``.  ``--write`` and
``--faults`` measure the installed Triton; run them under each supported one
(3.6: the venv of ``.ci/oldest``).  Results are cached by (kernel source hash,
spec with its divisibility attrs, Triton version): a variant whose key is in
the cache is not compiled again.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

TARGET = ("cuda", 90, 32)
SM90_SHARED_LIMIT = 232448          # bytes of shared memory one block may use on sm_90
SM90_REGS = 65536                   # 32-bit registers per SM
SM90_MAX_WARPS = 64
SM90_MAX_BLOCKS = 32
ARG_TYPES = {"*bf16", "*fp16", "*fp32", "*i32", "*i64", "i32", "fp32"}
DTYPES = ("bf16", "fp16", "fp32")
GATE_DS = (64, 128, 256, 512, 768, 1024)   # the feature widths the gate covers
_REQUIRED = ("name", "fn", "args", "constexprs", "num_warps", "num_stages", "dtype", "D")

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_RESULTS = os.path.join(_ROOT, "benchmarks", "results")


def cache_path(version: Optional[str] = None) -> str:
    """The committed result cache of a Triton minor version (default: the installed one)."""
    from .tiles import triton_minor

    return os.path.join(_RESULTS, f"triton-sm90-static-{triton_minor(version)}.json")


def table_path(version: Optional[str] = None) -> str:
    """The gate's table (``render_table``) of a Triton minor version (default: the installed one)."""
    from .tiles import triton_minor

    return os.path.join(_RESULTS, f"triton-sm90-static-{triton_minor(version)}.md")


# --------------------------------------------------------------------------- collection


def _modules():
    from .tiles import kernel_modules

    return kernel_modules()


def _check_spec(spec: dict, where: str) -> None:
    missing = [k for k in _REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"{where}: compile spec lacks {missing}")
    fn = spec["fn"]
    if not hasattr(fn, "arg_names") or hasattr(fn, "configs"):
        raise TypeError(f"{where}: 'fn' of {spec['name']} must be the @triton.jit function (an Autotuner's .fn)")
    bad = {k: v for k, v in spec["args"].items() if v not in ARG_TYPES}
    if bad:
        raise ValueError(f"{where}: {spec['name']} has argument types outside {sorted(ARG_TYPES)}: {bad}")
    if spec["dtype"] not in DTYPES:
        raise ValueError(f"{where}: {spec['name']} dtype must be one of {DTYPES}, got {spec['dtype']!r}")
    names = list(fn.arg_names)
    unknown = set(spec["args"]) | set(spec["constexprs"])
    unknown -= set(names)
    if unknown:
        raise ValueError(f"{where}: {spec['name']} names arguments the kernel does not have: {sorted(unknown)}")
    not_args = [n for n in spec.get("divisible_by_16", ()) if n not in spec["args"]]
    if not_args:
        raise ValueError(f"{where}: {spec['name']} divisible_by_16 names non-runtime arguments {not_args}")
    absent = [n for n in names if n not in spec["args"] and n not in spec["constexprs"]]
    if absent:
        raise ValueError(f"{where}: {spec['name']} gives no type or value for {absent}")


def _default_div16(args: dict) -> List[str]:
    return [n for n, t in args.items() if t.startswith("*") or n.startswith("stride") or n == "D"]


def _config_str(spec: dict) -> str:
    blocks = ",".join(f"{k}={v}" for k, v in spec["constexprs"].items() if k.startswith("BLOCK"))
    return f"{blocks} w{spec['num_warps']} s{spec['num_stages']}"


def _spec_id(spec: dict) -> str:
    flags = ",".join(f"{k}={_short(v)}" for k, v in spec["constexprs"].items() if not k.startswith("BLOCK"))
    ds = spec["Ds"]
    d = "-" if ds == [None] else "D" + "/".join(str(x) for x in ds)
    return f"{spec['module']}.{spec['name']}[{spec['dtype']},{d},{_config_str(spec).replace(' ', ',')}" + \
        (f",{flags}]" if flags else "]")


def _short(v):
    return {True: "T", False: "F"}.get(v, v) if isinstance(v, bool) else v


def spec_key(spec: dict) -> str:
    """Hash of what determines the compiled binary: kernel source (with the functions it calls),
    argument types and their divisibility, constexprs, warps, stages, target and Triton version."""
    import triton

    ident = dict(module=spec["module"], name=spec["name"], src=spec["fn"].cache_key, args=spec["args"],
                 div16=sorted(spec["divisible_by_16"]),
                 constexprs={k: repr(v) for k, v in spec["constexprs"].items()}, num_warps=spec["num_warps"],
                 num_stages=spec["num_stages"], target=list(TARGET), triton=triton.__version__)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def collect(all_configs: bool = False) -> List[dict]:
    """Every compile spec of the package (deduplicated: one entry per distinct binary, with the
    list of D it serves in ``Ds``), each with ``module``, ``id`` and ``key`` added."""
    raw = []
    for mname, mod in sorted(_modules().items()):
        fn = getattr(mod, "compile_specs", None)
        if callable(fn):
            for s in fn():
                raw.append(dict(s, module=mname))
                raw[-1].setdefault("divisible_by_16", _default_div16(s.get("args", {})))
    out: Dict[str, dict] = {}
    for s in raw:
        _check_spec(s, f"backends/_triton/{s['module']}.py")
        if not all_configs and not s.get("default", True):
            continue
        key = spec_key(s)
        if key in out:
            if s["D"] not in out[key]["Ds"]:
                out[key]["Ds"].append(s["D"])
            out[key]["pruned"] = out[key].get("pruned", False) and s.get("pruned", False)  # at every D
            continue
        out[key] = dict(s, key=key, Ds=[s["D"]])
    specs = list(out.values())
    for s in specs:
        s["id"] = _spec_id(s)
    return specs


# --------------------------------------------------------------------------- compiling


def _ast_source(fn, signature: dict, constexprs: dict, attrs: dict):
    """``ASTSource`` of Triton 3.2+ (3.6 and 3.8 included): ``constexprs`` and ``attrs`` keyed by
    argument-path tuples, ``attrs`` values ``[["tt.divisibility", 16]]``."""
    import inspect

    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" not in params or "attrs" not in params:
        import triton

        raise RuntimeError(f"the compile gate needs Triton >= 3.2 (ASTSource with constexprs/attrs), "
                           f"not {triton.__version__}")
    names = list(fn.arg_names)
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    return ASTSource(fn, signature, constexprs=consts, attrs=attrs)


def spec_attrs(spec: dict) -> dict:
    """``attrs`` of the compile: ``tiles.spec_attrs`` (``tt.divisibility`` 16 on every argument of
    the spec's ``divisible_by_16``), what Triton's launcher specializes for a contiguous launch."""
    from .tiles import spec_attrs as _attrs

    return _attrs(spec)


def _ptxas_numbers(log: str) -> Optional[dict]:
    regs = re.findall(r"Used (\d+) registers", log)
    if not regs:
        return None
    st = re.findall(r"(\d+) bytes spill stores", log)
    ld = re.findall(r"(\d+) bytes spill loads", log)
    stack = re.findall(r"(\d+) bytes stack frame", log)
    return dict(registers=int(regs[-1]), spill_stores=int(st[-1]) if st else 0,
                spill_loads=int(ld[-1]) if ld else 0, stack=int(stack[-1]) if stack else 0)


def _run_ptxas(ptx: str) -> str:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        tool = get_ptxas(TARGET[1])
    except TypeError:  # Triton versions whose get_ptxas takes no architecture
        tool = get_ptxas()
    path = tool.path if hasattr(tool, "path") else tool[0]
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([path, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    return r.stdout + r.stderr


def blocks_per_sm(registers: int, shared: int, warps: int) -> int:
    """Resident blocks per sm_90 SM from registers (allocated per warp in 256s), shared memory, warps."""
    per_warp = int(math.ceil(max(registers, 1) * 32 / 256.0)) * 256
    by_regs = SM90_REGS // (per_warp * warps)
    by_smem = SM90_SHARED_LIMIT // shared if shared > 0 else SM90_MAX_BLOCKS
    return max(0, min(by_regs, by_smem, SM90_MAX_WARPS // warps, SM90_MAX_BLOCKS))


def compile_spec(spec: dict) -> dict:
    """Compile one spec for sm_90a; return the numbers the gate checks (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_spec needs TRITON_INTERPRET unset before triton is imported")
    fn = spec["fn"]
    sig = {n: ("constexpr" if n in spec["constexprs"] else spec["args"][n]) for n in fn.arg_names}
    row = dict(key=spec["key"], id=spec["id"], module=spec["module"], name=spec["name"], fn_name=fn.__name__,
               dtype=spec["dtype"],
               Ds=spec["Ds"], config=_config_str(spec), num_warps=spec["num_warps"], num_stages=spec["num_stages"],
               streaming_declared=spec.get("streaming"), vector_stores_declared=spec.get("vector_stores"), error=None)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        knobs = getattr(triton, "knobs", None)
        ctx = contextlib.nullcontext()
        if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
            ctx = knobs.nvidia.scope() if hasattr(knobs.nvidia, "scope") else contextlib.nullcontext()
        with ctx, contextlib.redirect_stdout(log):
            if knobs is not None and hasattr(knobs.nvidia, "dump_ptxas_log"):
                knobs.nvidia.dump_ptxas_log = True
            src = _ast_source(fn, sig, spec["constexprs"], spec_attrs(spec))
            k = triton.compile(src, target=GPUTarget(*TARGET),
                               options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    except Exception as e:  # noqa: BLE001 - a failed compile is a row of the table
        row["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        return row
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    ptx = k.asm["ptx"]
    nums = _ptxas_numbers(log.getvalue())
    if nums is None:  # this Triton does not print ptxas's log: run ptxas -v on the PTX
        try:
            nums = _ptxas_numbers(_run_ptxas(ptx))
        except Exception as e:  # noqa: BLE001 - reported in the row
            row["error"] = f"ptxas -v failed: {type(e).__name__}: {e}"
            return row
    if nums is None:
        row["error"] = "no ptxas resource line"
        return row
    ttir = k.asm.get("ttir", "")
    has_dot = " tt.dot " in ttir or "tt.dot_scaled" in ttir or re.search(r"\btt\.dot\b", ttir) is not None
    shared = int(getattr(k.metadata, "shared", 0))
    n_wgmma = len(re.findall(r"wgmma\.mma_async", ptx))
    n_mma = len(re.findall(r"\bmma\.sync", ptx))
    n_cp = len(re.findall(r"\bcp\.async\.(?:ca|cg)", ptx))
    n_tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    n_st_vec = len(re.findall(r"\bst\.global\.v[248]\.", ptx))
    kind = "wgmma" if n_wgmma else "mma.sync" if n_mma else ("fma" if has_dot else "-")
    row.update(nums, shared=shared, has_dot=has_dot, wgmma=n_wgmma, mma_sync=n_mma, cp_async=n_cp, tma=n_tma,
               st_vector=n_st_vec, kind=kind,
               blocks_per_sm=blocks_per_sm(nums["registers"], shared, spec["num_warps"]))
    return row


def problems(row: dict) -> List[str]:
    """What a compiled variant violates: empty when it meets the gate."""
    if row.get("error"):
        return [f"does not compile: {row['error']}"]
    out = []
    if row["has_dot"] and not row["wgmma"]:
        out.append(f"tl.dot compiles to {row['kind']}, not wgmma.mma_async")
    if row["spill_stores"] or row["spill_loads"]:
        out.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    if row["shared"] > SM90_SHARED_LIMIT:
        out.append(f"shared memory {row['shared']} B > {SM90_SHARED_LIMIT} B")
    streaming = row["streaming_declared"] if row.get("streaming_declared") is not None else row["has_dot"]
    if streaming and not (row["cp_async"] or row["tma"]):
        out.append("streaming loop without cp.async or TMA (not pipelined)")
    if row.get("vector_stores_declared") and not row.get("st_vector"):
        out.append("matrix stores not vectorized (no st.global.v2/v4)")
    return out


# --------------------------------------------------------------------------- cache, pool, table


def load_cache(path: Optional[str] = None) -> Dict[str, dict]:
    """The rows of a result cache (default: the installed Triton's ``cache_path``), by key."""
    path = path or cache_path()
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f).get("rows", {})


_WORKER_SPECS: Dict[str, dict] = {}


def _worker_init(all_configs: bool) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    for s in collect(all_configs):
        _WORKER_SPECS[s["key"]] = s


def _worker_compile(key: str) -> dict:
    return compile_spec(_WORKER_SPECS[key])


def run_gate(all_configs: bool = False, jobs: Optional[int] = None, cache: Optional[Dict[str, dict]] = None,
             log=None) -> List[dict]:
    """Rows for every spec: from ``cache`` where the key is there, compiled (in ``jobs`` processes) otherwise."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from .tiles import spec_config

    specs = collect(all_configs)
    cache = cache or {}
    rows = {s["key"]: dict(cache[s["key"]], id=s["id"], Ds=s["Ds"], fn_name=s["fn"].__name__, cached=True)
            for s in specs if s["key"] in cache}
    todo = [s["key"] for s in specs if s["key"] not in rows]
    if todo:
        jobs = jobs or int(os.environ.get("CONTRASTIVE_OPS_COMPILE_JOBS", 0)) or os.cpu_count() or 1
        jobs = max(1, min(jobs, len(todo)))
        # A private Triton cache: an on-disk hit would skip ptxas and its resource report.
        with tempfile.TemporaryDirectory() as tcache:
            old = os.environ.get("TRITON_CACHE_DIR")
            os.environ["TRITON_CACHE_DIR"] = tcache
            try:
                # Longest first (fp32, wide tiles) so the pool's tail is short.
                order = sorted(todo, key=lambda k: -_cost_guess(next(s for s in specs if s["key"] == k)))
                with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                         initargs=(all_configs,)) as pool:
                    for row in pool.map(_worker_compile, order):
                        row["cached"] = False
                        rows[row["key"]] = row
                        if log:
                            print(f"{row.get('compile_s', 0):6.1f} s  {row['id']}  {'; '.join(problems(row)) or 'ok'}",
                                  file=log, flush=True)
            finally:
                if old is None:
                    os.environ.pop("TRITON_CACHE_DIR", None)
                else:
                    os.environ["TRITON_CACHE_DIR"] = old
    return [dict(rows[s["key"]], expect_fail=s.get("expect_fail"), pruned=s.get("pruned", False),
                 table_config=spec_config(s)) for s in specs]


def _cost_guess(spec: dict) -> float:
    c = spec["constexprs"]
    area = 1
    for k, v in c.items():
        if k.startswith("BLOCK") and isinstance(v, int):
            area *= v
    return area * (8 if spec["dtype"] == "fp32" else 1)


def write_cache(rows: List[dict], path: Optional[str] = None) -> None:
    import triton

    path = path or cache_path()
    keep = {}
    for r in rows:
        r = {k: v for k, v in r.items() if k not in ("cached", "expect_fail", "pruned", "id", "Ds", "table_config")}
        keep[r["key"]] = r
    with open(path, "w") as f:
        json.dump(dict(triton=triton.__version__, target=list(TARGET), rows=dict(sorted(keep.items()))), f, indent=1)
        f.write("\n")


def _ds(ds) -> str:
    return "-" if ds == [None] else ",".join(str(d) for d in ds)


def render_table(rows: List[dict]) -> str:
    import triton

    lines = [
        "# Triton kernels compiled for sm_90a (H100/H200), without a GPU",
        "",
        f"Triton {triton.__version__}, target `GPUTarget(\"cuda\", 90, 32)`, ptxas from Triton's "
        "`backends/nvidia/bin`. Written by the compile gate (`tests/test_triton_compile.py`); regenerate with",
        "",
        "    python -m contrastive_ops.backends._triton.specs --write            # default configs (CI)",
        "    python -m contrastive_ops.backends._triton.specs --write --all-configs",
        "",
        "One row per distinct binary; `D` lists the feature widths that launch it (D is a runtime argument, "
        "so the chunked layouts serve several). Registers per thread; spills = spill stores + loads (bytes); "
        "shared = bytes of shared memory per block (limit 232448); blocks/SM from registers, shared memory "
        "and warps; instr = the tensor-core instruction of the kernel's `tl.dot` (`fma`: none, `-`: no dot); "
        "cp.async/TMA = asynchronous copies in the PTX; gate = the checks of `specs.problems` "
        "(xfail: a known failure the gate expects, with its reason below the table; pruned: a known failure "
        "the autotuner never launches, because a clean config of the same kernel, dtype and D is left, "
        "`tiles.gate_faulty`).",
        "",
        "| kernel | dtype | D | config | regs | spills | shared | warps | blocks/SM | instr | cp.async/TMA "
        "| compile s | gate |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    reasons = {}
    for r in sorted(rows, key=lambda r: (r["module"], r["name"], DTYPES.index(r["dtype"]),
                                         [d or 0 for d in r["Ds"]], r["config"])):
        probs = problems(r)
        known = ("pruned" if r.get("pruned") else "xfail") if r.get("expect_fail") else "FAIL"
        verdict = "ok" if not probs else known + ": " + "; ".join(probs)
        if r.get("expect_fail") and probs and not r.get("pruned"):
            reasons[r["expect_fail"]] = True
        if r.get("error"):
            lines.append(f"| {r['module']}.{r['name']} | {r['dtype']} | {_ds(r['Ds'])} | {r['config']} | | | | "
                         f"{r['num_warps']} | | | | {r.get('compile_s', '')} | {verdict[:200]} |")
            continue
        lines.append(
            f"| {r['module']}.{r['name']} | {r['dtype']} | {_ds(r['Ds'])} | {r['config']} | {r['registers']} | "
            f"{r['spill_stores'] + r['spill_loads']} | {r['shared']} | {r['num_warps']} | {r['blocks_per_sm']} | "
            f"{r['kind']} | {r['cp_async']}/{r['tma']} | {r.get('compile_s', '')} | {verdict} |")
    n_ok = sum(1 for r in rows if not problems(r))
    n_p = sum(1 for r in rows if problems(r) and r.get("expect_fail") and r.get("pruned"))
    n_x = sum(1 for r in rows if problems(r) and r.get("expect_fail")) - n_p
    n_f = len(rows) - n_ok - n_x - n_p
    lines += ["", f"{len(rows)} binaries: {n_ok} ok, {n_p} known failures pruned (never launched), "
                  f"{n_x} expected failures the dispatcher can launch, {n_f} failures."]
    if reasons:
        lines += ["", "Expected failures the dispatcher can launch (no clean config of that kernel, dtype and D):",
                  ""] + [f"- {r}" for r in reasons]
    return "\n".join(lines) + "\n"


def _fault_tables(rows: List[dict]) -> Dict[str, List[str]]:
    """Module name -> the lines of its ``"<version>": {...},`` entry for the installed Triton, from the
    gate's rows: every variant that fails a check, keyed as ``tiles.mark_known_faults`` reads it."""
    from .tiles import triton_minor

    by_module: Dict[str, List[str]] = {}
    for r in sorted(rows, key=lambda r: (r["module"], r["name"], DTYPES.index(r["dtype"]),
                                         [d or 0 for d in r["Ds"]], r["table_config"])):
        probs = problems(r)
        if probs:
            ds = "(" + ", ".join(str(d) for d in r["Ds"]) + ("," if len(r["Ds"]) == 1 else "") + ")"
            key, why = f'("{r["name"]}", "{r["dtype"]}", {ds}, "{r["table_config"]}"):', f'"{"; ".join(probs)}",'
            line = f"        {key} {why}"
            if len(line) > 120:
                line = f"        {key}\n            {why}"
            by_module.setdefault(r["module"], []).append(line)
    v = triton_minor()
    return {module: [f'    "{v}": {{'] + lines + ["    },"] for module, lines in by_module.items()}


def render_faults(rows: List[dict]) -> str:
    """The ``_GATE_FAULTS`` entries of each kernel module for the installed Triton (``_fault_tables``)."""
    from .tiles import triton_minor

    out = []
    for module, lines in _fault_tables(rows).items():
        out += [f"# backends/_triton/{module}.py, _GATE_FAULTS"] + lines + [""]
    return "\n".join(out) if out else f"# no variant fails the gate under Triton {triton_minor()}\n"


def replace_fault_table(src: List[str], version: str, block: List[str]) -> List[str]:
    """The lines ``src`` of a kernel module with the ``"<version>": {...},`` entry of its
    ``_GATE_FAULTS`` replaced by ``block`` (appended after the last table for a new version)."""
    start = next((i for i, line in enumerate(src) if line.startswith(f'    "{version}": {{')), None)
    if start is None:
        start = end = next(i for i in range(len(src) - 1, -1, -1) if src[i] == "    },") + 1
    else:
        end = start + 1 if src[start].endswith("{},") else src.index("    },", start) + 1
    return src[:start] + block + src[end:]


def write_faults(rows: List[dict]) -> List[str]:
    """Rewrite the installed Triton's table in the ``_GATE_FAULTS`` of every kernel module from the
    gate's rows (what ``--faults`` prints); return the files changed.  A module with faults but no
    ``_GATE_FAULTS`` is an error (add the dict below its kernels first)."""
    from .tiles import triton_minor

    v = triton_minor()
    blocks = _fault_tables(rows)
    changed = []
    for name, mod in sorted(_modules().items()):
        path = mod.__file__
        with open(path) as f:
            src = f.read().split("\n")
        new = blocks.get(name, [f'    "{v}": {{', "    },"])
        if not hasattr(mod, "_GATE_FAULTS"):
            if name in blocks:
                raise ValueError(f"{path}: variants fail the gate but the module has no _GATE_FAULTS")
            continue
        out = replace_fault_table(src, v, new)
        if out != src:
            with open(path, "w") as f:
                f.write("\n".join(out))
            changed.append(path)
    return changed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", action="store_true", help="print the specs as JSON and exit")
    p.add_argument("--all-configs", action="store_true", help="every autotune config, not only the defaults")
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU count)")
    p.add_argument("--no-cache", action="store_true", help="compile everything, ignoring the committed cache")
    p.add_argument("--write", action="store_true",
                   help="update the committed cache and table of the installed Triton's minor version")
    p.add_argument("--faults", action="store_true",
                   help="print the _GATE_FAULTS entries of the installed Triton's minor version")
    p.add_argument("--write-faults", action="store_true",
                   help="rewrite the installed Triton minor version's table in each module's _GATE_FAULTS")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("unset TRITON_INTERPRET: the gate compiles for the GPU", file=sys.stderr)
        return 2
    if a.faults or a.write_faults:  # measuring: no fault table applies (the tables are being made)
        os.environ["CONTRASTIVE_OPS_GATE_MEASURE"] = "1"
    if a.list:
        json.dump([dict(id=s["id"], key=s["key"], module=s["module"], name=s["name"], dtype=s["dtype"], Ds=s["Ds"],
                        expect_fail=s.get("expect_fail"), pruned=s.get("pruned", False))
                   for s in collect(a.all_configs)], sys.stdout)
        return 0
    t0 = time.perf_counter()
    cache = {} if a.no_cache else load_cache()
    rows = run_gate(a.all_configs, a.jobs, cache, log=sys.stderr)
    wall = time.perf_counter() - t0
    n_new = sum(1 for r in rows if not r["cached"])
    print(f"{len(rows)} specs, {n_new} compiled, {len(rows) - n_new} from the cache, {wall:.1f} s", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, wall_s=wall, compiled=n_new), f)
    if a.write:
        merged = dict(load_cache())
        merged.update({r["key"]: r for r in rows})
        write_cache(list(merged.values()) if a.all_configs else rows)
        with open(table_path(), "w") as f:
            f.write(render_table(rows))
    if a.faults:
        print(render_faults(rows))
    if a.write_faults:
        changed = write_faults(rows)
        for path in changed:
            print(f"rewrote the fault table of {path}", file=sys.stderr)
        if changed and a.write:  # the table's verdicts read the fault tables: render it again with the new ones
            env = {k: v for k, v in os.environ.items() if k != "CONTRASTIVE_OPS_GATE_MEASURE"}
            again = [sys.executable, "-m", __spec__.name, "--write"] + (["--all-configs"] if a.all_configs else [])
            if subprocess.run(again, env=env).returncode != 0:
                print("the table, rendered with the new fault tables, lists failures", file=sys.stderr)
                return 1
        return 0
    bad = [r for r in rows if problems(r) and not r.get("expect_fail")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
