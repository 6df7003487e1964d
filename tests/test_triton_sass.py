"""The Triton tile-loop model (``benchmarks/triton_sass.py``): its committed counts are those of the
kernels as they are, its calibration reproduces the H200 measurements, and the ftz exponential pays.

Compiles the CLIP forward for sm_90a under the installed Triton (in child processes without
``TRITON_INTERPRET``; a few seconds each) and compares with the committed
``benchmarks/results/triton-tile-model-sm90-<minor>.json`` of that version (regenerate with
``python benchmarks/triton_sass.py --write``).
"""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import triton_sass as ts  # noqa: E402


def _committed():
    path = ts.result_path("json")
    if not os.path.exists(path):
        pytest.fail(f"no committed tile model for this Triton: run python benchmarks/triton_sass.py --write ({path})")
    with open(path) as f:
        return json.load(f)


def _row(rep, kernel, D, block_m, fast):
    rows = [r for r in rep["rows"] if (r["kernel"], r["D"], r["block_m"], r["fast_exp"]) == (kernel, D, block_m, fast)]
    assert len(rows) == 1
    return rows[0]


@pytest.fixture(scope="module")
def loops():
    return {fast: ts.tile_loop_in_child("sim_lse_fwd", 512, 64, fast_exp=fast) for fast in (False, True)}


def test_committed_counts_are_the_kernels(loops):
    rep = _committed()
    for fast, t in loops.items():
        row = _row(rep, "sim_lse_fwd", 512, 64, fast)
        assert (t.d_loop, t.hgmma, t.epilogue) == (row["d_loop"], row["hgmma"], row["epilogue"]), \
            "the forward's machine code changed: python benchmarks/triton_sass.py --write"


def test_structure_and_ftz_exponential(loops):
    """One D loop of wgmma (HGMMA) per column tile; ex2.approx.ftz shortens the epilogue."""
    for t in loops.values():
        assert t.hgmma >= 1 and t.block_m == 64 and t.block_n == 128 and t.block_d == 64
    assert loops[True].epilogue < 0.95 * loops[False].epilogue


def test_calibration_reproduces_the_measurements():
    """The fit reproduces the two measured forward times from the measured kernel's machine code,
    which the committed table carries as its "(measured)" rows."""
    rep = _committed()
    eff, k = rep["eff_d"], rep["k_epi"]
    assert 0.3 < eff <= 1.0 and 0.5 < k < 4.0
    assert (eff, k) == pytest.approx(ts.calibrate(ts.measured_loop(512), ts.measured_loop(1024)), rel=1e-9)
    for D in (512, 1024):
        t = ts.measured_loop(D)
        row = _row(rep, "sim_lse_fwd (measured)", D, 64, False)
        assert (t.d_loop, t.epilogue) == (row["d_loop"], row["epilogue"])
        assert ts.predict(t, eff, k)["tile_clk"] == pytest.approx(ts.measured_tile_clocks(D), rel=1e-6)


def test_fallback_is_cold_and_the_epilogue_shrank(loops):
    """The forward's exact fallback (``rows_and_cols``) is a block a branch skips, left out of the
    epilogue, and the epilogue of the plain tiles is at most 60 % of the measured kernel's."""
    for fast, t in loops.items():
        assert t.cold > 0
        assert t.epilogue <= 0.6 * ts.measured_loop(512).epilogue


def test_clip_step_reaches_half_of_peak():
    """The committed model's symmetric CLIP step (forward + GEMM backward, bf16) at B = 32768 and
    65536, D = 512 and 1024: at least half of the dense bf16 peak."""
    rep = _committed()
    steps = {(s["B"], s["D"]): s for s in rep["clip"]}
    for B in (32768, 65536):
        for D in (512, 1024):
            s = steps[(B, D)]
            assert s["fraction_of_peak"] >= 0.5, s
            assert s["step_ms"] == pytest.approx(s["fwd_ms"] + s["ds_ms"] + s["products_ms"])
