"""The CUDA kernels on a GPU: what the CPU instantiation of their tiling cannot show.

Several tiles in both directions (CONTRASTIVE_OPS_CUDA_TILE), fp16 gradients
at M = 32k with mean reduction (σ-scaled dS tiles), IEEE fp32 GEMMs under the
global TF32 switch, the bitwise recompute of S at large logits, run-to-run
reproducibility without float atomics, the Sinkhorn shared-memory limits at
K = 6144 fp32 / 3072 fp64, and clear errors for tensors on the wrong device.
Marked ``gpu``; skipped without a CUDA device and the CUDA build.
"""
from __future__ import annotations

import pytest
import torch

from contrastive_ops.backends import _cext

import test_cext as tc  # the suite's sim_lse / SigLIP cases and comparisons

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _cext.availability("cuda")[0], reason=f"cuda backend: {_cext.availability('cuda')[1]}"),
]


@pytest.fixture(autouse=True)
def _cublas_deterministic_config(monkeypatch):
    """nan_filled_memory switches deterministic algorithms on: cuBLAS then needs this setting."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 × 96 (rows × columns): the cases below span several tiles in both directions."""
    monkeypatch.setenv("CONTRASTIVE_OPS_CUDA_TILE", "64,96")


@pytest.mark.parametrize("want_col", [True, False], ids=["rows+cols", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", tc.CASES)
def test_several_tiles_match_reference(small_tiles, case, dtype, want_col):
    with tc.nan_filled_memory():
        tc._compare("cuda", 300, 300 if case == "q_is_k" else 700, 33, case, dtype, want_col)


@pytest.mark.parametrize("tile", ["64,97", "70,2048"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["plain", "exclude1", "ranges"])
def test_epilogue_widths(monkeypatch, tile, case, dtype):
    """The epilogues' two column layouts: 4 columns per thread where a tile's width is a multiple of 4
    (70 × 2048: two thread blocks across, 1024 columns each, and a 52-column last tile), 1 where it is
    not (64 × 97); row tiles that end inside a chunk of 8 rows (300 = 4·70 + 20); masks and none."""
    monkeypatch.setenv("CONTRASTIVE_OPS_CUDA_TILE", tile)
    with tc.nan_filled_memory():
        tc._compare("cuda", 300, 2100, 33, case, dtype, True)
        tc._siglip_compare("cuda", 300, 2100, 33, dtype)


@pytest.mark.parametrize("tile", ["64,96", "64,97"])
def test_long_exclusion_lists(monkeypatch, tile):
    """Six exclusions per row beside column ranges, in both column layouts of the epilogues."""
    monkeypatch.setenv("CONTRASTIVE_OPS_CUDA_TILE", tile)
    with tc.nan_filled_memory():
        tc._compare("cuda", 300, 700, 33, "ranges_exclude6", torch.float32, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_siglip_several_tiles(small_tiles, dtype):
    with tc.nan_filled_memory():
        tc._siglip_compare("cuda", 300, 700, 33, dtype)


def test_tile_override_is_checked(monkeypatch):
    monkeypatch.setenv("CONTRASTIVE_OPS_CUDA_TILE", "64x96")
    with pytest.raises(RuntimeError, match="CONTRASTIVE_OPS_CUDA_TILE"):
        tc._compare("cuda", 10, 12, 4, "plain", torch.float32, False)


def test_fp16_mean_reduction_at_32k_keeps_gradients():
    """B = M = 32768 fp16, mean over rows: dS ≈ 1/(B·M) ≈ 1e-9, below fp16's subnormals (6e-8)."""
    B = M = 32768
    D = 64
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(B, D, device="cuda", generator=gen), dim=-1).half()
    k = torch.nn.functional.normalize(torch.randn(M, D, device="cuda", generator=gen), dim=-1).half()
    scale = torch.tensor(10.0, device="cuda")
    g_row = torch.full((B,), 1.0 / B, device="cuda")
    g_col = torch.zeros(M, device="cuda")
    out = tc._run_core(q, k, scale, {}, False, g_row, g_col, "cuda", torch.float16)
    ref = tc._run_core(q, k, scale, {}, False, g_row, g_col, "reference", torch.float32)
    for name, a, b in zip(("dq", "dk", "dscale"), out[2:], ref[2:]):
        a = a.float()
        rel = ((a - b).norm() / b.norm()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g} (zero gradients would give 1)"
    assert (out[3] != 0).float().mean() > 0.99  # dk: no flushed rows


@pytest.mark.filterwarnings("ignore:torch.backends.cuda.preferred_blas_library")
@pytest.mark.parametrize("blas", ["cublas", "cublaslt"])
def test_fp32_ignores_the_global_tf32_switch(small_tiles, blas):
    """torch.set_float32_matmul_precision("high") must not give the fp32 logits TF32's 10 bits.

    Error budget against float64: 10× the error of the fp32 reference computed
    with TF32 off (TF32 logits are ~1000× worse at D = 512).
    """
    gen = torch.Generator().manual_seed(3)
    q, k, kw = tc._problem("plain", 300, 700, 512, "cuda", gen)
    g_row, g_col = torch.randn(300, generator=gen).cuda(), torch.randn(700, generator=gen).cuda()
    scale = torch.tensor(0.2, device="cuda")
    before = torch.get_float32_matmul_precision()
    library = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library(blas)
        torch.set_float32_matmul_precision("high")
        out = tc._run_core(q, k, scale, kw, True, g_row, g_col, "cuda", torch.float32)
        assert torch.get_float32_matmul_precision() == "high"
        assert torch.backends.cuda.matmul.allow_tf32
        torch.set_float32_matmul_precision("highest")
        r32 = tc._run_core(q, k, scale, kw, True, g_row, g_col, "reference", torch.float32)
        r64 = tc._run_core(q, k, scale, kw, True, g_row, g_col, "reference", torch.float64)
    finally:
        torch.set_float32_matmul_precision(before)
        torch.backends.cuda.preferred_blas_library(library)
    for name, a, b, c in zip(("row_lse", "col_lse", "dq", "dk", "dscale"), out, r32, r64):
        err = (a.double() - c).abs().max().item()
        budget = 10 * (b.double() - c).abs().max().item() + 1e-7 * c.abs().max().item()
        assert err <= budget, f"{name}: error {err:.3g} > budget {budget:.3g}"


def test_large_logits_backward_recomputes_S_bitwise():
    """Logits ~1e8: the backward's scale·G - lse must use the forward's rounded product."""
    gen = torch.Generator().manual_seed(4)
    B, M, D = 40, 70, 16
    q = torch.randn(B, D, generator=gen) * 100
    k = torch.randn(M, D, generator=gen) * 100
    scale = torch.tensor(1e4)
    g_row, g_col = torch.randn(B, generator=gen), torch.randn(M, generator=gen)
    out = tc._run_core(q.cuda(), k.cuda(), scale.cuda(), {}, True, g_row.cuda(), g_col.cuda(), "cuda",
                       torch.float32)
    ref = tc._run_core(q, k, scale, {}, True, g_row, g_col, "cpu", torch.float32)
    # Each softmax row is one-hot at these logits: the gradients are those of the argmax pairs.
    for name, a, b in zip(("dq", "dk"), out[2:4], ref[2:4]):
        torch.testing.assert_close(a.cpu(), b, atol=1e-3 * b.abs().max().item(), rtol=1e-3, msg=name)


def test_run_to_run_bitwise(small_tiles):
    """No float atomics: dscale, dq, dk and the SigLIP sums are bitwise equal across runs."""
    gen = torch.Generator().manual_seed(8)
    q, k, kw = tc._problem("exclude2", 300, 700, 33, "cuda", gen)
    g_row, g_col = torch.randn(300).cuda(), torch.randn(700).cuda()
    scale = torch.tensor(3.0, device="cuda")
    a = tc._run_core(q, k, scale, kw, True, g_row, g_col, "cuda", torch.float16)
    b = tc._run_core(q, k, scale, kw, True, g_row, g_col, "cuda", torch.float16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    prim = _cext.PRIMITIVES["siglip"]
    s, bias, g = (torch.tensor(v, device="cuda") for v in (10.0, -10.0, 0.3))
    r1 = (prim.forward(q, k, s, bias), *prim.backward(q, k, s, bias, g))
    r2 = (prim.forward(q, k, s, bias), *prim.backward(q, k, s, bias, g))
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)


@pytest.mark.parametrize("K,dtype", [(6144, torch.float32), (6141, torch.float32), (3072, torch.float64),
                                     (3069, torch.float64), (12000, torch.float32)])
def test_sinkhorn_col_lse_shared_memory_limits(K, dtype):
    """K at the 48 KiB dynamic shared-memory boundary (static shared memory included) launches and is right."""
    gen = torch.Generator().manual_seed(K)
    scores = torch.randn(300, K, generator=gen, dtype=dtype)
    v = torch.randn(K, generator=gen, dtype=dtype)
    for vv in (None, v):
        got = torch.ops.contrastive_ops.sinkhorn_col_lse(scores.cuda(), 0.05, None if vv is None else vv.cuda())
        want = torch.ops.contrastive_ops.sinkhorn_col_lse(scores, 0.05, vv)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-4)


def test_wrong_device_arguments_raise():
    """row_lse, grad_row, grad (SigLIP, SwAV CE) and lse on the CPU: a clear error, not an illegal access."""
    _cext.ensure_loaded()
    ops = torch.ops.contrastive_ops
    q = torch.randn(9, 5, device="cuda")
    k = torch.randn(11, 5, device="cuda")
    s = torch.tensor(1.0, device="cuda")
    row, col = ops.sim_lse_fwd(q, k, s, None, None, None, None, None, True)
    g_row, g_col = torch.randn(9, device="cuda"), torch.randn(11, device="cuda")
    with pytest.raises(RuntimeError, match="row_lse"):
        ops.sim_lse_bwd(q, k, s, None, None, None, None, None, row.cpu(), col, g_row, g_col)
    with pytest.raises(RuntimeError, match="grad_row"):
        ops.sim_lse_bwd(q, k, s, None, None, None, None, None, row, col, g_row.cpu(), g_col)
    with pytest.raises(RuntimeError, match="grad_col"):
        ops.sim_lse_bwd(q, k, s, None, None, None, None, None, row, col, g_row, g_col.cpu())
    b = torch.tensor(0.0, device="cuda")
    with pytest.raises(RuntimeError, match="grad"):
        ops.siglip_bwd(q, q, s, b, torch.tensor(1.0))
    x = torch.randn(9, 7, device="cuda")
    t = torch.softmax(torch.randn(9, 7, device="cuda"), -1)
    _, lse = ops.swav_ce_fwd(x, t, s)
    with pytest.raises(RuntimeError, match="CUDA tensors on one device"):
        ops.swav_ce_bwd(x, t, s, lse.cpu(), torch.tensor(1.0, device="cuda"))
    with pytest.raises(RuntimeError, match="CUDA tensors on one device"):
        ops.swav_ce_bwd(x, t, s, lse, torch.tensor(1.0))
