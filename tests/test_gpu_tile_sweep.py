"""benchmarks/gpu_tile_sweep.py under the Triton interpreter: every launch well-formed, results checked.

On a GPU machine the sweep itself is the measurement (gpu_run.sh's ``tiles`` step); here one small
config per kernel runs on CPU tensors and its result is compared with the fp32 formula, so that the
next GPU run does not spend its time on a broken launch.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

from contrastive_ops.backends import backend_module

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1"
    or not backend_module("triton").availability()[0],
    reason="a launch check under TRITON_INTERPRET=1 on CPU (the GPU runs the sweep itself)")


def _sweep_module():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_tile_sweep.py")
    spec = importlib.util.spec_from_file_location("gpu_tile_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_sweep_launches_and_checks_both_kernels():
    mod = _sweep_module()
    rows = mod.sweep([(40, 50, 24), (33, 20, 40)], ["fwd", "ds"], reps=1, log=lambda *a: None)
    assert [(r["kernel"], r["D"]) for r in rows] == [("fwd", 24), ("ds", 24), ("fwd", 40), ("ds", 40)]
    for r in rows:
        assert "error" not in r, r
        assert not r["wrong"] and r["error_vs_fp32"] <= mod.TOL[r["kernel"]], r


def test_sweep_marks_a_wrong_result(monkeypatch):
    mod = _sweep_module()
    monkeypatch.setitem(mod.TOL, "fwd", -1.0)  # no error is small enough: every result counts as wrong
    rows = mod.sweep([(40, 50, 24)], ["fwd"], reps=1, log=lambda *a: None)
    assert rows and all(r["wrong"] for r in rows)
