"""The sm_90a compile gate: every Triton kernel variant the dispatcher launches, compiled for an H100/H200.

Triton's interpreter runs code the GPU compiler rejects or compiles badly, so
the interpreter tests alone do not show that the kernels build, use the tensor
cores, stay in registers and pipeline.  The variants come from each kernel
module's ``compile_specs()`` (``contrastive_ops/backends/_triton/specs.py``);
they are compiled for ``GPUTarget("cuda", 90, 32)`` with Triton's bundled ptxas
in separate processes without ``TRITON_INTERPRET`` (``tests/conftest.py`` sets
it for this one), in parallel, and each must have:

* ``wgmma.mma_async`` wherever it has a ``tl.dot`` (fp32 included);
* no register spills;
* shared memory within the sm_90 limit (232448 B per block);
* ``cp.async`` or TMA where it streams tiles through a loop (every dot kernel);
* vectorized global stores (``st.global.v2/v4``) in the kernels that write the GEMM backwards'
  dS / G blocks (``tiles.matrix_writer``: compiled for B and M multiples of 16, as Triton's
  launcher specializes them).

Variants whose (kernel source hash, spec, Triton version) is in the committed
cache ``benchmarks/results/triton-sm90-static-<minor>.json`` of the installed
Triton (3.6, 3.8: each bundles its own ptxas) are not compiled again: a CI run
compiles only what changed.  Regenerate the cache and the table
``benchmarks/results/triton-sm90-static-<minor>.md`` with
``python -m contrastive_ops.backends._triton.specs --write`` under each Triton
(3.6: the venv of ``.ci/oldest``, which runs this gate too).

Each variant is compiled with the ``tt.divisibility`` attrs of its spec's
``divisible_by_16`` (``tiles.spec_attrs``), as Triton's launcher specializes a
contiguous launch; without them the loads are not vectorized (no ``cp.async``).
Cost on the 2-core development machine: every variant from scratch about 4
minutes (0.3–19 s each); with the committed cache a few seconds.  Known
failures are ``xfail(strict=True)`` with the measured fault as the reason
(``expect_fail``, set in each kernel module's ``compile_specs`` from the
installed Triton's table in its ``_GATE_FAULTS``), so the gate turns red if a
kernel regresses and asks for the entry to go when one is fixed, under each
Triton it has a table for.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from contrastive_ops.backends._triton.specs import (SM90_SHARED_LIMIT, _check_spec, blocks_per_sm, problems,
                                                    spec_attrs, spec_key)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MOD = "contrastive_ops.backends._triton.specs"


def _env() -> dict:
    # no TRITON_INTERPRET (the gate compiles), no measuring mode (the fault tables apply)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CONTRASTIVE_OPS_GATE_MEASURE")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _list_specs():
    proc = subprocess.run([sys.executable, "-m", _MOD, "--list"], env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        return None, proc.stderr[-4000:]
    return json.loads(proc.stdout), None


_SPECS, _LIST_ERROR = _list_specs()


def _params():
    if _SPECS is None:
        return [pytest.param(None, id="collect")]
    out = []
    for s in _SPECS:
        why = ("pruned, never launched: " if s.get("pruned") else "") + (s["expect_fail"] or "")
        marks = [pytest.mark.xfail(strict=True, reason=why)] if s["expect_fail"] else []
        out.append(pytest.param(s, id=s["id"], marks=marks))
    return out


@pytest.fixture(scope="module")
def gate_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "rows.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", _MOD, "--json", str(out)], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=3000)
    if not out.exists():
        pytest.fail(f"the compile gate did not run (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    data = json.loads(out.read_text())
    print(f"\ncompile gate: {len(data['rows'])} variants, {data['compiled']} compiled "
          f"(the rest from the committed cache), {time.perf_counter() - t0:.1f} s")
    return {r["key"]: r for r in data["rows"]}


@pytest.mark.parametrize("spec", _params())
def test_kernel_meets_sm90a_gate(spec, gate_rows):
    assert spec is not None, f"listing the compile specs failed:\n{_LIST_ERROR}"
    row = gate_rows[spec["key"]]
    assert not problems(row), f"{spec['id']}: " + "; ".join(problems(row))


def test_every_primitive_has_specs():
    """sim_lse (general and Gram, forward and backward), SigLIP, Sinkhorn and SwAV CE are all in the gate."""
    assert _SPECS is not None, _LIST_ERROR
    names = {(s["module"], s["name"]) for s in _SPECS}
    text = " ".join(f"{m}.{n}" for m, n in names)
    for needle in ("fwd", "bwd", "gram", "siglip", "sinkhorn", "swav_ce"):
        assert needle in text, f"no compile spec matches {needle!r}: {sorted(names)}"
    assert {s["dtype"] for s in _SPECS} == {"bf16", "fp16", "fp32"}
    assert {d for s in _SPECS for d in s["Ds"] if d} >= {64, 128, 256, 512, 768, 1024}


def test_dispatcher_launches_no_failing_variant():
    """Every variant the gate measured failing (spills, mma.sync, shared memory, ...) under the installed
    Triton has a clean config of the same kernel, dtype and D, so the autotuner never launches it
    (``pruned``): a change that leaves some kernel with only failing configs turns this red."""
    assert _SPECS is not None, _LIST_ERROR
    launchable = [s["id"] for s in _SPECS if s["expect_fail"] and not s.get("pruned")]
    assert not launchable, launchable


def test_gate_checks_catch_each_defect():
    """Each check of the gate fails on a row that has its defect (a gate that cannot fail is no gate)."""
    good = dict(error=None, has_dot=True, wgmma=4, mma_sync=0, kind="wgmma", spill_stores=0, spill_loads=0,
                shared=65536, streaming_declared=None, cp_async=6, tma=0)
    assert problems(good) == []
    bad = [dict(good, wgmma=0, mma_sync=8, kind="mma.sync"), dict(good, wgmma=0, kind="fma"),
           dict(good, spill_stores=8), dict(good, spill_loads=4), dict(good, shared=SM90_SHARED_LIMIT + 1),
           dict(good, cp_async=0), dict(good, has_dot=False, wgmma=0, streaming_declared=True, cp_async=0),
           dict(good, error="CompilationError: ...")]
    for row in bad:
        assert problems(row), row
    assert problems(dict(good, has_dot=False, wgmma=0, kind="-", cp_async=0)) == []  # no dot, no stream: ok
    assert problems(dict(good, cp_async=0, tma=2)) == []                               # TMA counts as async


def test_blocks_per_sm():
    assert blocks_per_sm(255, 0, 4) == 2            # 255 regs → 256/thread, 32K regs a 4-warp block
    assert blocks_per_sm(128, 0, 4) == 4
    assert blocks_per_sm(32, 100000, 4) == 2        # shared memory bound
    assert blocks_per_sm(16, 0, 1) == 32            # block count bound


def test_spec_interface_is_checked():
    class Fn:
        arg_names = ["X", "N", "BLOCK"]

    ok = dict(name="k", fn=Fn(), args={"X": "*bf16", "N": "i32"}, constexprs={"BLOCK": 64}, num_warps=4,
              num_stages=2, dtype="bf16", D=None)
    _check_spec(ok, "t")
    for broken, err in [(dict(ok, args={"X": "*bf16"}), ValueError), (dict(ok, args={"X": "bf16", "N": "i32"}),
                                                                       ValueError),
                        (dict(ok, dtype="float16"), ValueError), ({k: v for k, v in ok.items() if k != "D"}, ValueError),
                        (dict(ok, args=dict(ok["args"], Y="*fp32")), ValueError)]:
        with pytest.raises(err):
            _check_spec(broken, "t")

    with pytest.raises(ValueError, match="divisible_by_16"):
        _check_spec(dict(ok, divisible_by_16=["BLOCK"]), "t")   # a constexpr has no runtime alignment

    class Tuner(Fn):
        configs = []

    with pytest.raises(TypeError, match="Autotuner"):
        _check_spec(dict(ok, fn=Tuner()), "t")


def test_divisibility_is_compiled_and_keyed():
    """The divisible_by_16 arguments become tt.divisibility attrs and part of the cache key (an
    unaligned compile is another binary: no vectorized loads, no cp.async)."""
    class Fn:
        arg_names = ["X", "stride_x", "N", "BLOCK"]
        cache_key = "src"

    sp = dict(module="m", name="k", fn=Fn(), args={"X": "*bf16", "stride_x": "i32", "N": "i32"},
              constexprs={"BLOCK": 64}, num_warps=4, num_stages=2, dtype="bf16", D=None,
              divisible_by_16=["X", "stride_x"])
    assert spec_attrs(sp) == {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]}
    assert spec_key(sp) != spec_key(dict(sp, divisible_by_16=["X"]))


def test_known_faults_must_match_a_spec():
    """A fault entry that names no variant (a renamed kernel, a dropped config) is an error, not a silent no-op,
    in the table of any Triton version."""
    from contrastive_ops.backends._triton.tiles import mark_known_faults, spec_config

    sp = dict(name="k", dtype="bf16", D=128, constexprs={"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    assert spec_config(sp) == "64x32 w4 s2"
    fault = {("k", "bf16", (128,), "64x32 w4 s2"): "spills 8 B"}
    stale = {("k", "bf16", (256,), "64x32 w4 s2"): "spills 8 B"}
    out = mark_known_faults([dict(sp)], {"3.6": fault, "3.8": {}}, "t", version="3.6.0")
    assert out[0]["expect_fail"].startswith("k bf16 D=128 64x32 w4 s2: spills 8 B (Triton 3.6 ")
    with pytest.raises(ValueError, match="match no spec"):
        mark_known_faults([dict(sp)], {"3.6": stale, "3.8": {}}, "t", version="3.6")
    with pytest.raises(ValueError, match="match no spec"):       # stale under the other version
        mark_known_faults([dict(sp)], {"3.6": fault, "3.8": stale}, "t", version="3.6")


def test_known_faults_with_a_clean_sibling_are_pruned():
    """A failing variant is 'pruned' when a clean config of the same kernel, dtype and D exists (the
    autotuner never launches it); a kernel whose every config fails keeps its expected failures."""
    from contrastive_ops.backends._triton.tiles import mark_known_faults

    base = dict(name="k", dtype="bf16", constexprs={"BLOCK": 64}, num_stages=2)
    specs = [dict(base, D=128, num_warps=4), dict(base, D=128, num_warps=8), dict(base, D=256, num_warps=4)]
    faults = {"3.6": {("k", "bf16", (128, 256), "64 w4 s2"): "spills 8 B"}}
    out = mark_known_faults(specs, faults, "t", version="3.6")
    assert [bool(sp.get("expect_fail")) for sp in out] == [True, False, True]
    assert [sp["pruned"] for sp in out] == [True, False, False]   # D = 256 has no clean config


def test_fault_tables_are_rewritten_per_version():
    """``specs --write-faults`` replaces the installed version's table of a module, leaves the others, and
    appends a table for a version the module had none for."""
    from contrastive_ops.backends._triton.specs import replace_fault_table

    src = ["_GATE_FAULTS = {", '    "3.6": {', '        ("k", "bf16", (64,), "64 w4 s2"): "spills 8 B",', "    },",
           '    "3.8": {},', "}"]
    new38 = ['    "3.8": {', '        ("k", "fp32", (64,), "64 w8 s2"): "spills 4 B",', "    },"]
    assert replace_fault_table(src, "3.8", new38) == src[:4] + new38 + src[5:]
    assert replace_fault_table(src, "3.6", ['    "3.6": {', "    },"]) == src[:1] + ['    "3.6": {', "    },"] + src[4:]
    assert replace_fault_table(src, "3.9", ['    "3.9": {', "    },"]) == src[:4] + ['    "3.9": {', "    },"] + src[4:]


def _config_of(sp):
    import triton

    c = sp["constexprs"]
    return triton.Config({k: c[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK") if k in c},
                         num_warps=sp["num_warps"], num_stages=sp["num_stages"])


def test_autotuner_prunes_the_gate_faults():
    """``tiles._prune`` drops every config the installed Triton's fault tables mark for that kernel, dtype
    and blocks while a clean one is left, and keeps a failing config that is the only one: what the
    gate table calls pruned is what the dispatcher never launches."""
    import torch

    from contrastive_ops.backends._triton import siglip, sim_lse, tiles

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    n_pruned = n_kept = 0
    for mod in (sim_lse, siglip):
        specs = mod.compile_specs()
        groups = {}
        for sp in specs:
            groups.setdefault((sp["name"], sp["dtype"], sp["D"]), []).append(sp)
        for sp in specs:
            if not sp.get("expect_fail"):
                continue
            args = {"Q": torch.empty(0, dtype=dtypes[sp["dtype"]])}
            kw = {k: v for k, v in sp["constexprs"].items() if k not in ("BLOCK_M", "BLOCK_N", "BLOCK")}
            bad = _config_of(sp)
            clean = [_config_of(o) for o in groups[(sp["name"], sp["dtype"], sp["D"])] if not o.get("expect_fail")]
            assert bool(clean) == sp["pruned"]
            got = tiles._prune([bad] + clean, args, fn=sp["fn"], **kw)
            if sp["pruned"]:
                assert bad not in got and got and all(c in clean for c in got), sp["expect_fail"]
                n_pruned += 1
            else:
                assert got == [bad]
                n_kept += 1
            assert tiles._prune(clean or [bad], args, fn=sp["fn"], **kw)  # never empty
    assert n_pruned > 0


def test_unreadable_or_missing_fault_tables_are_said(monkeypatch):
    """Without fault tables (an unmeasured Triton, or specs that fail to build) the autotuner prunes
    nothing and says so once, rather than silently."""
    from contrastive_ops.backends._triton import tiles

    def broken():
        raise RuntimeError("stale entry")

    for measured, match in ((broken, "could not be read"), (dict, "no compile-gate fault table")):
        monkeypatch.setattr(tiles, "_FAULTY", None)
        monkeypatch.setattr(tiles, "_measured_faults", measured)
        monkeypatch.setattr(tiles, "interpreting", lambda: False)
        with pytest.warns(RuntimeWarning, match=match):
            pred = tiles.gate_faulty(object(), {}, {})
        assert not pred(_config_of(dict(constexprs={"BLOCK": 64}, num_warps=4, num_stages=2)))


def test_known_faults_are_per_triton_version(monkeypatch):
    """Each Triton minor version has its own table (its own ptxas): a variant that spills only under 3.6 is
    expected to fail there and to pass under 3.8; an unmeasured Triton or an unversioned table raises."""
    from contrastive_ops.backends._triton import siglip, sim_lse
    from contrastive_ops.backends._triton.tiles import mark_known_faults, triton_minor

    monkeypatch.delenv("CONTRASTIVE_OPS_GATE_MEASURE", raising=False)
    assert [triton_minor(v) for v in ("3.6.0", "3.8.0+git1a2b3c4", "3.10.1")] == ["3.6", "3.8", "3.10"]
    with pytest.raises(ValueError, match="minor version"):
        triton_minor("nightly")
    sp = dict(name="k", dtype="bf16", D=128, constexprs={"BLOCK": 64}, num_warps=4, num_stages=2)
    faults = {"3.6": {("k", "bf16", (128,), "64 w4 s2"): "spills 8 B"}, "3.8": {}}
    assert "expect_fail" in mark_known_faults([dict(sp)], faults, "t", version="3.6")[0]
    assert "expect_fail" not in mark_known_faults([dict(sp)], faults, "t", version="3.8")[0]
    with pytest.raises(ValueError, match="no compile-gate fault table for Triton 3.7"):
        mark_known_faults([dict(sp)], faults, "t", version="3.7.1")
    monkeypatch.setenv("CONTRASTIVE_OPS_GATE_MEASURE", "1")     # specs --faults measuring a new Triton
    assert "expect_fail" not in mark_known_faults([dict(sp)], faults, "t", version="3.7.1")[0]
    with pytest.raises(ValueError, match="keyed by Triton minor version"):
        mark_known_faults([dict(sp)], faults["3.6"], "t", version="3.6")
    # the kernel modules' tables: the same versions, each with its committed cache and table
    versions = set(sim_lse._GATE_FAULTS)
    assert set(siglip._GATE_FAULTS) == versions and {"3.6", "3.8"} <= versions
    from contrastive_ops.backends._triton.specs import cache_path, table_path

    for v in sorted(versions):
        assert os.path.exists(table_path(v)), table_path(v)
        with open(cache_path(v)) as f:
            assert triton_minor(json.load(f)["triton"]) == v, cache_path(v)
