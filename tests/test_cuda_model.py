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
    assert s.over_gemm > 2  # the five S-sized passes dominate


def _measured_ms(kernel, header="clip_loss B=16384 D=512 bf16 cuda"):
    """A kernel's time per step in the H200 profile of 2026-12-04 (the previous epilogues)."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "nvidia-h200-2026-12-04-diag",
                        "profile.log")
    lines = open(path).read().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    for line in lines[start + 1:]:
        if not line.strip():
            break
        if kernel in line:
            return float(line.split()[0])
    raise LookupError(kernel)


@pytest.mark.parametrize("kernel, instrs", [("lse_fwd_kernel", 179), ("lse_bwd_kernel", 125)])
def test_issue_bound_explains_the_measured_epilogues(model, kernel, instrs):
    """The previous epilogues' loop bodies (179 / 125 SASS instructions per pair, sm_90a) at the issue rate
    give the measured H200 times within 20-40 %, where the HBM bound alone is 2-5x under them."""
    pairs = 16384 * 16384
    measured = _measured_ms(kernel) * 1e-3
    issue = pairs * instrs / model.ISSUE_RATE
    hbm = pairs * (4 if kernel == "lse_fwd_kernel" else 6) / model.HBM_BW
    assert 0.8 < issue / measured < 1.4
    assert measured / hbm > 2
