"""The CUDA backend's host tiling and epilogue maths, run on CPU in CI.

``csrc/cpu/sim_lse_tiled.cpp`` instantiates the tiling of ``csrc/tiling.h``
that the CUDA kernels use, with the same per-element and partial-merge lines
(``csrc/cuda/tile_math.cuh``), on tiles as small as 1 × 1: here the suite's
sim_lse cases (masks, ranges, exclusions, index lists, q is k, row and column
LSE, every gradient including dscale) and SigLIP run through it against the
dense references, with uninitialized memory NaN-poisoned, so that every merge
across tiles (row statistics across column tiles, column statistics across row
tiles, dQ / dK accumulation, partial sums, column ranges per row block, σ-scaled
fp16 dS tiles) is exercised without a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from contrastive_ops.backends import _cext
from contrastive_ops.backends._cext_tiled import TiledSigLIP, TiledSimLSE
from helpers import check_nan_logits, nan_filled_memory

import test_cext as tc  # the suite's sim_lse / SigLIP cases and comparisons (skips without the extension)

TILES = [(3, 5), (1, 1), (4, 2), (5, 3)]
SHAPES = [(13, 17, 6), (1, 6, 5), (7, 1, 4)]


class _Counting:
    """Wraps a primitive and counts its forward and backward calls (the tiled path really ran)."""

    def __init__(self, prim):
        self.prim, self.calls = prim, 0

    def forward(self, *a, **kw):
        self.calls += 1
        return self.prim.forward(*a, **kw)

    def backward(self, *a, **kw):
        self.calls += 1
        return self.prim.backward(*a, **kw)


@pytest.fixture
def tiled(monkeypatch):
    """serve(rows, cols): the CPU backend's sim_lse / siglip primitives become the CUDA tiling on CPU."""

    def serve(rows=3, cols=5):
        sim = _Counting(TiledSimLSE(rows, cols))
        sig = _Counting(TiledSigLIP(rows, cols))
        monkeypatch.setitem(_cext.PRIMITIVES, "sim_lse", sim)
        monkeypatch.setitem(_cext.PRIMITIVES, "siglip", sig)
        return sim, sig

    return serve


@pytest.mark.parametrize("want_col", [True, False], ids=["rows+cols", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", tc.CASES)
@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_sim_lse_tiled_matches_reference(tiled, tile, case, dtype, want_col):
    sim, _ = tiled(*tile)
    with nan_filled_memory():
        for B, M, D in SHAPES:
            if case == "q_is_k":
                M = B
            tc._compare("cpu", B, M, D, case, dtype, want_col, seed=B)
    assert sim.calls == 2 * len(SHAPES)
    # several tiles in both directions for the first shape
    assert math.ceil(SHAPES[0][0] / tile[0]) > 1 and math.ceil(SHAPES[0][1] / tile[1]) > 1


@pytest.mark.parametrize("scale_value", [1 / 0.01, 1e-3, -3.0])
def test_sim_lse_tiled_extreme_scales(tiled, scale_value, monkeypatch):
    """Logits up to ±100 (online max/sum merged across tiles), tiny and negative scales."""
    tiled(3, 5)
    tc.test_sim_lse_extreme_scales("cpu", scale_value)


def test_sim_lse_tiled_gradcheck_float64(tiled):
    tiled(2, 3)
    for case in tc.CASES:
        tc.test_sim_lse_gradcheck_float64(case)


def test_sim_lse_tiled_empty_row_blocks_and_narrow_ranges(tiled):
    """Whole row blocks with no allowed column, and blocks whose rows all use a narrow window.

    The tiling visits only the columns [min start, max end) of each row block: a
    range too narrow would lose entries (wrong LSE), one too wide only costs time.
    """
    sim, _ = tiled(3, 5)
    B, M, D = 12, 40, 6
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(B, D, generator=gen), torch.randn(M, D, generator=gen)
    start = torch.randint(0, M, (B,), generator=gen)
    end = torch.clamp(start + torch.randint(1, 9, (B,), generator=gen), 0, M)
    start[3:6], end[3:6] = 20, 20  # a whole row block allows nothing
    start[6:9] = torch.tensor([10, 11, 12])
    end[6:9] = torch.tensor([12, 17, 13])  # a block that needs columns 10..16 only (tiles 2 and 3)
    start[9], end[9] = 39, 40  # the last column only
    kw = dict(col_start=start, col_end=end)
    scale = torch.tensor(1.3)
    g_row, g_col = torch.randn(B, generator=gen), torch.randn(M, generator=gen)
    with nan_filled_memory():
        out = tc._run_core(q, k, scale, kw, True, g_row, g_col, "cpu", torch.float32)
    ref = tc._run_core(q, k, scale, kw, True, g_row, g_col, "reference", torch.float32)
    assert sim.calls == 2
    for name, a, b in zip(("row_lse", "col_lse", "dq", "dk", "dscale"), out, ref):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), name
        tc.assert_close(a[fin], b[fin], torch.float32, what=name)


@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_sim_lse_tiled_long_exclusion_lists(tiled, tile):
    """Six exclusions per row (repeats, -1, a row's first allowed column) beside column ranges: the
    exclusion loop of tile_allowed_bits over every sub-block and tile."""
    sim, _ = tiled(*tile)
    with nan_filled_memory():
        for B, M, D in [(13, 17, 6), (40, 33, 5)]:
            tc._compare("cpu", B, M, D, "ranges_exclude6", torch.float32, True, seed=B)
    assert sim.calls == 4


@pytest.mark.parametrize("tile", [(3, 5), (1, 1), (5, 3), (100, 100)], ids=lambda t: f"{t[0]}x{t[1]}")
def test_sim_lse_tiled_nan_logits_reach_their_lses(tiled, tile):
    """A NaN logit reaches its row's and its column's LSE whichever sub-block or row fold holds it."""
    sim, _ = tiled(*tile)
    check_nan_logits("cpu", "cpu", 9, 11)
    assert sim.calls == 2  # the general case and q is k


def test_fp16_ds_tiles_keep_tiny_gradients(tiled):
    """fp16 dS tiles are stored as σ·dS: entries below fp16's subnormals are not flushed.

    Mean reduction over B = 8192 rows against M = 4096 near-uniform candidates:
    every dS entry is ≈ 1/(B·M) ≈ 3e-8, which plain fp16 rounds to 0 or 6e-8
    (its smallest subnormal).  dq, dk are fp16 outputs themselves, so they are
    compared to fp16's relative tolerance plus two subnormal quanta.
    """
    sim, _ = tiled(512, 1024)
    B, M, D = 8192, 4096, 8
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(B, D, generator=gen).half()
    k = torch.randn(M, D, generator=gen).half()
    scale = torch.tensor(0.5)
    g_row = torch.full((B,), 1.0 / B)
    g_col = torch.zeros(M)
    with nan_filled_memory():
        out = tc._run_core(q, k, scale, {}, False, g_row, g_col, "cpu", torch.float16)
    ref = tc._run_core(q, k, scale, {}, False, g_row, g_col, "reference", torch.float32)
    assert sim.calls == 2
    for name, a, b in zip(("dq", "dk"), out[2:4], ref[2:4]):
        assert b.abs().max() > 1e-6, name  # gradients to lose
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2 * 2.0**-24, msg=lambda m: f"{name}: {m}")
    tc.assert_close(out[4], ref[4], torch.float16, what="dscale")


@pytest.mark.filterwarnings("ignore:torch.backends.cuda.preferred_blas_library")
@pytest.mark.parametrize("blas", ["cublas", "cublaslt"])
@pytest.mark.parametrize("precision", ["high", "medium", "highest"])
def test_fp32_gemm_guard_restores_the_global_switch(tiled, precision, blas):
    """The tiling runs its fp32 GEMMs with TF32 off and gives the caller's setting back: with cuBLAS
    through a thread-local guard, with cuBLASLt preferred through the global switch, restored."""
    tiled(3, 5)
    before = torch.get_float32_matmul_precision()
    library = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(blas)
        torch.set_float32_matmul_precision(precision)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        tc._compare("cpu", 7, 9, 4, "plain", torch.float32, True)
        assert torch.get_float32_matmul_precision() == precision
        assert torch.backends.cuda.matmul.allow_tf32 == tf32
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.preferred_blas_library(library)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tile", TILES, ids=lambda t: f"{t[0]}x{t[1]}")
def test_siglip_tiled_matches_reference(tiled, tile, dtype):
    _, sig = tiled(*tile)
    with nan_filled_memory():
        for shape in [(1, 1, 3), (5, 7, 6), (9, 4, 5), (13, 17, 6)]:
            tc._siglip_compare("cpu", *shape, dtype)
    assert sig.calls == 2 * 4


@pytest.mark.parametrize("scale_value,bias_value", [(100.0, -20.0), (0.5, 3.0), (-4.0, 0.0)])
def test_siglip_tiled_extreme_logits(tiled, scale_value, bias_value):
    tiled(3, 5)
    tc._siglip_compare("cpu", 40, 33, 7, torch.float32, scale_value, bias_value)


def test_tile_shape_must_be_positive():
    _cext.ensure_loaded()
    q = torch.randn(4, 3)
    # the whole message, numbers included: an extension carrying its own libstdc++ cut it at the first one
    with pytest.raises(RuntimeError, match="tile_rows and tile_cols must be positive, got 0, 5"):
        torch.ops.contrastive_ops._sim_lse_tiled_fwd(q, q, torch.tensor(1.0), None, None, None, None, None,
                                                     False, 0, 5)


def test_tiled_results_are_those_of_one_tile(tiled):
    """Cross-tile merges change only rounding: 1 × 1 tiles agree with one tile to fp32 accuracy."""
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(11, 5, generator=gen), torch.randn(14, 5, generator=gen)
    s = torch.tensor(2.0)
    outs = []
    for tile in [(1, 1), (100, 100)]:
        prim = TiledSimLSE(*tile)
        row, col = prim.forward(q, k, s, None, None, None, None, None, True)
        outs.append((row, col))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6)


def test_cuda_tile_shape_default_and_override(monkeypatch):
    """The CUDA tile: at most 2048 × 16384, never more than the problem; CONTRASTIVE_OPS_CUDA_TILE overrides it."""
    _cext.ensure_loaded()
    shape = torch.ops.contrastive_ops._cuda_tile_shape
    monkeypatch.delenv("CONTRASTIVE_OPS_CUDA_TILE", raising=False)
    assert list(shape(65536, 65536, 512)) == [2048, 16384]
    assert list(shape(600, 2100, 17)) == [600, 2100]
    monkeypatch.setenv("CONTRASTIVE_OPS_CUDA_TILE", "64,96")
    assert list(shape(600, 2100, 17)) == [64, 96]
    assert list(shape(10, 20, 17)) == [10, 20]
    for bad in ["64x96", "64,", ",96", "0,96", "64,-1", "64,96,1", "a,b"]:
        monkeypatch.setenv("CONTRASTIVE_OPS_CUDA_TILE", bad)
        with pytest.raises(RuntimeError, match="CONTRASTIVE_OPS_CUDA_TILE"):
            shape(600, 2100, 17)
