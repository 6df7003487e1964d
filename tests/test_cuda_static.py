"""The CUDA epilogue kernels compiled for sm_90a without a GPU (benchmarks/cuda_sass.py).

What the SASS must show for the epilogues of the sim_lse / SigLIP step (fp32 tiles, the fast path):
16-byte loads of the tile and 8/16-byte stores of dS, no spills outside the fp64 instantiations,
an instruction count per pair low enough that an H200 keeps them at HBM speed, and the counts the
performance model (benchmarks/cuda_model.py) uses.  Needs nvcc with the CUDA headers; skipped
without one unless the machine must have the CUDA backend ($CONTRASTIVE_OPS_REQUIRE_BACKENDS).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from helpers import REQUIRED_BACKENDS

_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def sass(tmp_path_factory):
    cs = _load("cuda_sass")
    if cs.find_nvcc() is None:
        if "cuda" in REQUIRED_BACKENDS:
            pytest.fail("the CUDA backend is required here but no nvcc with CUDA headers was found")
        pytest.skip("no nvcc with CUDA headers")
    cubin, log = cs.compile_cubin(str(tmp_path_factory.mktemp("sass")))
    return cs, cs.read_kernels(cubin, log), log


@pytest.fixture(scope="module")
def rows(sass):
    cs, kernels, _ = sass
    return {r["label"]: r for r in cs.count(kernels)}


def test_no_spills_outside_fp64(sass):
    cs, _, log = sass
    spilled = [(cs._demangle(n), b) for n, b in cs._spills(log) if b and "kernelId" not in cs._demangle(n)]
    assert not spilled


def test_vector_loads_and_stores(rows):
    for label, r in rows.items():
        assert set(r["loads"]) <= {"LDG.E.128.CONSTANT", "LDG.E"}, (label, r["loads"])
        assert r["loads"].get("LDG.E.128.CONSTANT", 0) >= r["pairs"] // 4, (label, r["loads"])  # 4 fp32 per load
        if "masks" not in label:
            assert "LDG.E" not in r["loads"], (label, r["loads"])  # no per-pair index or mask loads
        if "bwd" in label:
            width = "128" if "fp32 dS" in label else "64"
            assert r["stores"] == {f"STG.E.{width}.STRONG.SM": r["pairs"] // 4}, (label, r["stores"])


def test_epilogues_issue_below_the_hbm_rate(rows):
    """Reading 4 B per pair at 4.3 TB/s leaves 3.35e13 / 1.07e12 ≈ 31 instructions per pair (forward);
    the backward also writes 2 B (bf16 dS) per pair: ≈ 47."""
    assert rows["lse_fwd fp32 (no masks)"]["per_pair"] <= 31
    assert rows["lse_bwd fp32 -> bf16 dS (no masks)"]["per_pair"] <= 47
    assert rows["siglip_bwd fp32 -> bf16 dL"]["per_pair"] <= 47


def test_model_counts_match_the_build(sass, rows):
    cs = sass[0]
    model = _load("cuda_model")
    for label, key in cs.MODEL_KEYS.items():
        assert rows[label]["per_pair"] == pytest.approx(model.INSTR_PER_PAIR[key], rel=0.15), label
