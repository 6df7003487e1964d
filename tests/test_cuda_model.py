"""The CUDA performance model (benchmarks/cuda_model.py): its accounting and its claim at D ≥ 512."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cuda_model.py")


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("cuda_model", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("B", [16384, 65536])
@pytest.mark.parametrize("D", [512, 1024])
def test_step_within_twice_the_gemms_at_large_D(model, B, D):
    s = model.predict(B, B, D, "bf16")
    assert 1.0 < s.over_gemm < 2.0


def test_hbm_bytes_per_pair(model):
    """22 B/pair for 16-bit inputs: forward GEMM write + epilogue read, backward write, read, dS write, 2 dS reads."""
    B = M = 65536
    D = 512
    s = model.predict(B, M, D, "bf16")
    per_pair = s.hbm_bytes / (B * M)
    br, bc = model.tile_shape(B, M)
    operands = (1 / br + 1 / bc) * D * (3 * 2 + 2 * 4)  # Q_b, K_b reads (3 GEMMs + 1) and dQ_b, dK_b read + write
    assert per_pair == pytest.approx(22 + operands)
    assert s.flops == pytest.approx(8 * B * M * D)


def test_small_D_is_memory_bound(model):
    s = model.predict(65536, 65536, 128, "bf16")
    assert s.over_gemm > 2  # the five S-sized passes dominate: why a 16-bit S tile is the next step
