"""The GEMM backward of the Triton sim_lse core (``BACKWARD = "gemm"``).

dS is written block by block by ``_bwd_ds_kernel`` and the two products are
torch's; compared with the float64 reference over the cases of
test_triton_kernels.py (ragged sizes, D not a power of two, B = 1, exclusions,
q is k), with several row blocks, with outputs filled with NaN, and at logits
of 1e5 (where the backward must read exactly the S the forward summed).  Cases
with index lists or column ranges keep the dq/dk kernels.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import contrastive_ops as co
from contrastive_ops.primitives.sim_lse import sim_lse_reference
from contrastive_ops.testing import fp32_products
from helpers import DEVICE, assert_close
from contrastive_ops.backends._triton import costs, products
from contrastive_ops.backends._triton import siglip as tsiglip
from contrastive_ops.backends._triton import tiles as ttiles
from contrastive_ops.primitives.siglip_pairs import siglip_pairs_reference
from test_triton_kernels import _forward_case, _i32, _ref_dtype, _reference_grads, _siglip_inputs, tcore
from test_triton_minwork import _launches

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PRODUCTS = fp32_products("triton", DEVICE)


@pytest.fixture
def gemm(monkeypatch):
    monkeypatch.setattr(tcore, "BACKWARD", "gemm")
    monkeypatch.setattr(tcore, "POISON_OUTPUTS", True)  # a dS tile or dq row left unwritten is NaN
    return monkeypatch


def _loss_args(loss, a, b):
    """The arguments of ``loss`` (clip_loss, nt_xent or siglip_loss) for features a and b."""
    if loss == "siglip_loss":
        return a, b, torch.tensor(7.0, device=DEVICE), torch.tensor(-3.0, device=DEVICE)
    return (a, b, torch.tensor(7.0, device=DEVICE)) if loss == "clip_loss" else (a, b, 0.3)


_CASES = [("plain", True), ("plain", False), ("b1", True), ("exclude1", True), ("q_is_k_exclude_self", False)]


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,want_col", _CASES, ids=[f"{c}-{'col' if w else 'row'}" for c, w in _CASES])
def test_gemm_backward_matches_reference(gemm, case, want_col, dtype, blocks):
    if dtype != torch.float32 and case not in ("plain", "exclude1"):
        pytest.skip("16-bit dtypes on two representative cases (interpreter time)")
    if blocks == "many":  # one smallest tile of rows per block
        gemm.setattr(tcore, "GEMM_DS_BYTES", 1)
    q, k, kw, fkw, scale, row, col, g_row, g_col = _forward_case(case, dtype, want_col)
    _, _, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, kw, want_col, g_row, g_col)
    (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row,
                                                                 g_col))
    n_blocks = -(-q.shape[0] // tcore.min_block()) if blocks == "many" else 1
    # q is k (no column LSE): the Gram matrix's G = dS + dSᵀ tile kernel, then one product
    assert ran == {("gram_ds" if k is q and not want_col else "bwd_ds"): n_blocks}, ran
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dq.shape == q.shape and dk.shape == k.shape
    if k is q:
        assert_close(dq.float() + dk.float(), r_dq, dtype, what="dq + dk (q is k)", products=PRODUCTS)
    else:
        assert_close(dq.float(), r_dq, dtype, what="dq", products=PRODUCTS)
        assert_close(dk.float(), r_dk, dtype, what="dk", products=PRODUCTS)
    assert_close(ds, r_ds.float(), dtype, what="dscale", products=PRODUCTS)


@pytest.mark.parametrize("case", ["index", "range", "range_index_exclude2"])
def test_index_lists_and_ranges_keep_the_kernels(gemm, case):
    """The products of the GEMM backward need whole rows and columns: index lists and column
    ranges take the dq/dk kernels (listed in ``backward_path``'s docstring)."""
    q, k, kw, fkw, scale, row, col, g_row, g_col = _forward_case(case, torch.float32, False)
    _, ran = _launches(lambda: tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row, g_col))
    assert "bwd_ds" not in ran and ran.get("bwd_dq") == 1, ran


def test_gemm_backward_is_deterministic(gemm):
    gemm.setattr(tcore, "GEMM_DS_BYTES", 1)
    q, k, kw, fkw, scale, row, col, g_row, g_col = _forward_case("plain", torch.float32, True)
    a = tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row, g_col)
    b = tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row, g_col)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("loss", ["clip_loss", "nt_xent"])
def test_losses_on_the_gemm_backward(gemm, loss):
    """A two-tensor loss and a Gram loss (Gram forward, then the G = dS + dSᵀ tile kernel)."""
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(45, 24, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    args = _loss_args(loss, a, b)
    ref = [t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) else t for t in args]
    fn = getattr(co, loss)
    out, ran = _launches(lambda: fn(*args, backend="triton"))
    bwd = _launches(out.backward)[1]
    if loss == "clip_loss":
        assert ran == {"fwd": 1} and bwd == {"bwd_ds": 1}, (ran, bwd)
    else:
        assert ran == {"gram_fwd": 1} and bwd == {"gram_ds": 1}, (ran, bwd)
    r = fn(*ref, backend="reference")
    r.backward()
    assert_close(out, r, torch.float32, what=loss, products=PRODUCTS)
    for x, y in zip(args[:2], ref[:2]):
        assert_close(x.grad, y.grad, torch.float32, what=f"{loss} grad", products=PRODUCTS)


def test_gemm_backward_reads_the_forwards_s(gemm):
    """Logits of 1e5 (features of norm 1e3 at scale 100, q is k with the self pair excluded): one
    ulp of S is 2^-7, so a backward that rebuilt S differently from the forward would give softmax
    weights far from the forward's normalisation; the gradient equals float64's to 1e-3 of its
    largest entry (the budget of tests/test_large_values.py)."""
    gemm.setattr(tcore, "GEMM_DS_BYTES", 1)
    B, D = 70, 45
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(B, D, generator=g, dtype=torch.float64)
    Z = (Z / Z.norm(dim=1, keepdim=True) * 1e3).float().to(DEVICE)
    exclude = _i32(torch.arange(B)[:, None])
    scale = torch.tensor(100.0, device=DEVICE)
    row, col = tcore.sim_lse_forward(Z, Z, scale, exclude=exclude)
    g_row = torch.linspace(-1.5, 2.0, B, device=DEVICE)
    dq, dk, _ = tcore.sim_lse_backward(Z, Z, scale, None, None, None, None, exclude, row, col, g_row,
                                       torch.empty(0, device=DEVICE))
    Zr = Z.detach().double().requires_grad_()
    r_row, _ = sim_lse_reference(Zr, Zr, scale.double(), exclude=exclude)
    (g_row.double() * r_row).sum().backward()
    got = dq.double() + dk.double()
    assert torch.isfinite(got).all()
    tol = 1e-3 * float(Zr.grad.abs().max())
    torch.testing.assert_close(got, Zr.grad, atol=tol, rtol=1e-4)


@pytest.mark.parametrize("rows_per", [None, 32, 40], ids=["one_block", "tile_blocks", "blocks_split_tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("split", [False, True], ids=["z_is_z", "z_and_detached"])
def test_gram_gemm_backward(gemm, split, dtype, rows_per):
    """The Gram matrix's GEMM backward (``_gram_ds_kernel`` + one product): q is k (G = dS + dSᵀ),
    and k holding q's values as another tensor (dS for dq, dSᵀ for dk), with row thresholds and
    exclusion lists that are not symmetric (row a excludes b but b keeps a), over row blocks that
    are whole tiles and blocks whose edges cut a tile (40 rows against 32-row tiles)."""
    if rows_per is not None:
        gemm.setattr(tcore, "gemm_block_rows", lambda B, M, elem, budget: rows_per)
    B, D = 75, 40
    g = torch.Generator().manual_seed(21)
    Z = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    K = Z.detach() if split else Z
    exclude = _i32(torch.stack([torch.arange(B), (torch.arange(B) * 7 + 3) % B], 1))
    scale = torch.tensor(3.0, device=DEVICE)
    row_max = (torch.rand(B, generator=g) * 6 + 1).to(DEVICE)
    fwd, ran = _launches(lambda: tcore.sim_lse_forward(Z, K, scale, exclude=exclude, row_max=row_max))
    assert ran == {"gram_fwd": 1}, ran
    row = fwd[0]
    g_row = torch.linspace(-1.5, 2.0, B, device=DEVICE)
    none = torch.empty(0, device=DEVICE)
    (dq, dk, dscale), ran = _launches(lambda: tcore.sim_lse_backward(
        Z, K, scale, None, None, None, None, exclude, row, none, g_row, none, row_max=row_max))
    n_blocks = 1 if rows_per is None else -(-B // rows_per)
    assert ran == {"gram_ds": n_blocks * (2 if split else 1)}, ran
    rd = _ref_dtype(dtype)
    qr = Z.detach().to(rd).requires_grad_()
    kr = Z.detach().to(rd).requires_grad_() if split else qr
    sr = scale.to(rd).requires_grad_()
    r_row, _ = sim_lse_reference(qr, kr, sr, exclude=exclude, row_max=row_max.to(rd))
    assert_close(row, r_row.float(), dtype, what="row LSE", products=PRODUCTS)
    (g_row.to(rd) * r_row).sum().backward()
    if split:
        assert_close(dq.float(), qr.grad.float(), dtype, what="dq", products=PRODUCTS)
        assert_close(dk.float(), kr.grad.float(), dtype, what="dk", products=PRODUCTS)
    else:
        assert not dk.any()
        assert_close(dq.float(), qr.grad.float(), dtype, what="dz", products=PRODUCTS)
    assert_close(dscale, sr.grad.float(), dtype, what="dscale", products=PRODUCTS)


@pytest.mark.parametrize("blocks", ["one", "many"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70, 70, 33), (1, 1, 72), (45, 38, 40)], ids=["70x70x33", "1x1x72", "45x38x40"])
def test_siglip_gemm_backward(monkeypatch, shape, dtype, blocks):
    monkeypatch.setattr(tsiglip, "BACKWARD", "gemm")
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    if blocks == "many":
        monkeypatch.setattr(tsiglip, "GEMM_G_BYTES", 1)
    x, y, scale, bias = _siglip_inputs(*shape, dtype)
    grad = torch.tensor(0.37, device=DEVICE)
    (dx, dy, dscale, dbias), ran = _launches(lambda: tsiglip.siglip_backward(x, y, scale, bias, grad))
    n_blocks = -(-shape[0] // tcore.min_block()) if blocks == "many" else 1
    assert ran == {"siglip_bwd_g": n_blocks}, ran
    rd = _ref_dtype(dtype)
    xr, yr = x.to(rd).requires_grad_(), y.to(rd).requires_grad_()
    sr, br = scale.to(rd).requires_grad_(), bias.to(rd).requires_grad_()
    ref = siglip_pairs_reference(xr, yr, sr, br)
    r_dx, r_dy, r_ds, r_db = torch.autograd.grad(ref * grad.to(rd), (xr, yr, sr, br))
    assert dx.dtype == dtype and dy.dtype == dtype
    for got, want, what in ((dx.float(), r_dx, "dx"), (dy.float(), r_dy, "dy"), (dscale, r_ds.float(), "dscale"),
                            (dbias, r_db.float(), "dbias")):
        assert_close(got, want, dtype, what=what, products=PRODUCTS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_siglip_step_is_one_pass_under_the_gemm_backward(monkeypatch, dtype):
    """Where SigLIP takes the GEMM backward, a differentiated step computes the loss and its
    gradient in one pass of the G kernel (the gradient needs no statistic of the forward): the
    forward launches only that kernel and the backward launches none; values and the gradients of
    x, y, the learnable scale and bias (upstream gradient 3.7, several row blocks, NaN-filled
    outputs) match the float64 reference.  Without gradients the plain forward kernel runs."""
    monkeypatch.setattr(tsiglip, "BACKWARD", "gemm")
    monkeypatch.setattr(tsiglip, "GEMM_G_BYTES", 1)
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    B, D = 70, 40
    x, y, scale, bias = _siglip_inputs(B, B, D, dtype)
    x, y = x.requires_grad_(), y.requires_grad_()
    t, b = torch.tensor(2.3, device=DEVICE).requires_grad_(), torch.tensor(-1.5, device=DEVICE).requires_grad_()
    out, ran = _launches(lambda: co.siglip_loss(x, y, t, b, backend="triton"))
    assert ran == {"siglip_bwd_g": -(-B // tcore.min_block())}, ran
    _, ran = _launches(lambda: (out * 3.7).backward())
    assert ran == {}, ran
    rd = _ref_dtype(dtype)
    leaves = [v.detach().to(rd).requires_grad_() for v in (x, y, t, b)]
    ref = co.siglip_loss(*leaves, backend="reference")
    (ref * 3.7).backward()
    assert_close(out, ref.float(), dtype, what="loss", products=PRODUCTS)
    for got, want, what in zip((x.grad, y.grad, t.grad, b.grad), leaves, ("dx", "dy", "dscale", "dbias")):
        assert got.dtype == (dtype if what in ("dx", "dy") else torch.float32)
        assert_close(got.float(), want.grad.float(), dtype, what=what, products=PRODUCTS)
    with torch.no_grad():
        _, ran = _launches(lambda: co.siglip_loss(x, y, t, b, backend="triton"))
    assert ran == {"siglip_fwd": 1}, ran


def test_backward_setting_is_checked(monkeypatch):
    monkeypatch.setattr(tcore, "BACKWARD", "fast")
    with pytest.raises(ValueError, match="one of auto, deterministic, atomic, gemm"):
        tcore.backward_path(64)
    monkeypatch.setattr(tsiglip, "BACKWARD", "fast")
    x, y, scale, bias = _siglip_inputs(4, 4, 8, torch.float32)
    with pytest.raises(ValueError, match="one of auto, deterministic, atomic, gemm"):
        tsiglip.siglip_backward(x, y, scale, bias, torch.tensor(1.0, device=DEVICE))
    # One setting serves both primitives: "atomic" (sim_lse's opt-in) runs SigLIP's default kernels.
    monkeypatch.setattr(tsiglip, "BACKWARD", "atomic")
    _, ran = _launches(lambda: tsiglip.siglip_backward(x, y, scale, bias, torch.tensor(1.0, device=DEVICE)))
    assert ran == {"siglip_bwd_dx": 1, "siglip_bwd_dy": 1}, ran


# ---------------------------------------------------------------------------
# "auto": the GEMM backward where the measured-rate cost model says it pays
# ---------------------------------------------------------------------------

_PROFILE = Path(__file__).resolve().parents[1] / "benchmarks/results/nvidia-h200-2026-12-04-diag/profile.log"


def _profiled_kernel_ms():
    """{(case header, kernel name): ms} from the committed H200 profile log."""
    out, header = {}, None
    for line in _PROFILE.read_text().splitlines():
        m = re.match(r"(\w+ B=\d+ D=\d+ bf16 \w+): wall", line)
        if m:
            header = m.group(1)
            continue
        m = re.match(r"\s+([0-9.]+) ms\s+1\.0x\s+(_\w+)$", line)
        if m and header:
            out[(header, m.group(2))] = float(m.group(1))
    return out


def test_cost_model_holds_the_committed_measurements():
    """``costs.MEASURED`` is the committed profile's kernel times, and at a measured shape the
    model's fused prediction is that measurement (no hidden factor)."""
    ms = _profiled_kernel_ms()
    clip = "clip_loss B=16384 D={} bf16 triton"
    want = {
        "general_fwd": {d: (16384, 16384, ms[(clip.format(d), "_fwd_kernel")]) for d in (512, 1024)},
        "general_bwd": {d: (16384, 16384, ms[(clip.format(d), "_bwd_dq_kernel")]
                            + ms[(clip.format(d), "_bwd_dk_kernel")]) for d in (512, 1024)},
        "gram_fwd": {512: (32768, 32768, ms[("nt_xent B=16384 D=512 bf16 triton", "_gram_fwd_kernel")])},
        "gram_bwd": {512: (32768, 32768, ms[("nt_xent B=16384 D=512 bf16 triton", "_gram_bwd_kernel")])},
        "siglip_fwd": {512: (16384, 16384, ms[("siglip_loss B=16384 D=512 bf16 triton", "_siglip_fwd_kernel")])},
        "siglip_bwd": {512: (16384, 16384, ms[("siglip_loss B=16384 D=512 bf16 triton", "_siglip_bwd_dx_kernel")]
                             + ms[("siglip_loss B=16384 D=512 bf16 triton", "_siglip_bwd_dy_kernel")])},
    }
    for path, points in want.items():
        for d, (r, c, t) in points.items():
            assert costs.MEASURED[path][d][:2] == (r, c) and costs.MEASURED[path][d][2] == pytest.approx(t), path
    for kind, fwd, bwd, n in (("general", "general_fwd", "general_bwd", 16384), ("gram", "gram_fwd", "gram_bwd", 32768),
                              ("siglip", "siglip_fwd", "siglip_bwd", 16384)):
        got = costs.step_seconds("deterministic", n, n, 512, 2, kind)
        assert got == pytest.approx((want[fwd][512][2] + want[bwd][512][2]) * 1e-3, rel=1e-12), kind


def test_auto_choice_by_shape_and_dtype(monkeypatch):
    bf, fp16 = torch.bfloat16, torch.float16
    for kind in ("general", "gram", "siglip"):
        for D in (512, 768, 1024):
            assert costs.gemm_pays(16384, 16384, D, bf, kind), (kind, D)
            assert costs.gemm_pays(65536, 65536, D, fp16, kind), (kind, D)
            assert costs.gemm_pays(16384, 16384, D, torch.float32, kind), (kind, D)  # 20-36 fused units
            assert not costs.gemm_pays(1024, 1024, D, bf, kind), (kind, D)  # under MIN_PAIRS
    monkeypatch.setattr(tcore, "BACKWARD", "auto")
    monkeypatch.setattr(tsiglip, "BACKWARD", "auto")
    assert tcore.backward_path(512, 16384, 16384, bf) == "gemm"
    assert tcore.backward_path(512) == "deterministic"  # no shape: the fused kernels
    assert tcore.backward_path(512, 16384, 16384, torch.float32) == "gemm"
    assert tcore.backward_path(512, 16384, 16384, torch.float64) == "deterministic"  # no rates: the kernels
    assert tsiglip.backward_path(16384, 16384, 512, bf) == "gemm"
    assert tsiglip.backward_path(1024, 1024, 512, bf) == "deterministic"
    monkeypatch.setattr(tcore, "BACKWARD", "deterministic")
    assert tcore.backward_path(512, 16384, 16384, bf) == "deterministic"
    monkeypatch.setattr(tcore, "BACKWARD", "gemm")
    assert tcore.backward_path(64, 2, 2, torch.float32) == "gemm"
    # The margin is applied: a path predicted faster by less than it is not taken.
    g, f = costs.step_seconds("gemm", 16384, 16384, 512, 2), costs.step_seconds("deterministic", 16384, 16384, 512, 2)
    monkeypatch.setattr(costs, "MARGIN", 1.01 * f / g)
    assert not costs.gemm_pays(16384, 16384, 512, bf)
    monkeypatch.setattr(costs, "MARGIN", 0.99 * f / g)
    assert costs.gemm_pays(16384, 16384, 512, bf)


def _loss_step(loss, dtype):
    g = torch.Generator().manual_seed(11)
    a, b = (torch.randn(45, 128, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    args = _loss_args(loss, a, b)
    out, ran = _launches(lambda: getattr(co, loss)(*args, backend="triton"))
    grads, bwd_ran = _launches(lambda: torch.autograd.grad(out, (a, b)))
    ran.update(bwd_ran)
    return (out.detach(), *grads), ran


@pytest.mark.parametrize("loss", ["clip_loss", "nt_xent", "siglip_loss"])
def test_auto_takes_the_gemm_backward_where_the_model_says(monkeypatch, loss):
    """With the size floor lifted, "auto" at D = 128 routes every part of the step as "gemm" does
    (bitwise the same results; the Gram loss through its G tile kernel), for 16-bit and fp32 inputs;
    under the floor (these 45 rows), exactly as "deterministic" does."""
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    monkeypatch.setattr(tcore, "POISON_OUTPUTS", True)
    floor = costs.MIN_PAIRS
    runs = {}
    for name, path, min_pairs in (("auto, no floor", "auto", 0), ("gemm", "gemm", floor), ("auto", "auto", floor),
                                  ("deterministic", "deterministic", floor)):
        monkeypatch.setattr(costs, "MIN_PAIRS", min_pairs)
        monkeypatch.setattr(tcore, "BACKWARD", path)
        monkeypatch.setattr(tsiglip, "BACKWARD", path)
        runs[name] = {dt: _loss_step(loss, dt) for dt in (torch.float16, torch.float32)}
    want = {"siglip_loss": "siglip_bwd_g", "clip_loss": "bwd_ds", "nt_xent": "gram_ds"}[loss]
    for dt in (torch.float16, torch.float32):
        for a_name, b_name, fused in (("auto, no floor", "gemm", False), ("auto", "deterministic", True)):
            (a, a_ran), (b, b_ran) = runs[a_name][dt], runs[b_name][dt]
            assert a_ran == b_ran, (dt, a_name, a_ran, b_ran)
            assert (want in a_ran) != fused, (dt, a_name, a_ran)
            for x, y in zip(a, b):
                assert torch.equal(x, y) and torch.isfinite(x).all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="torch.compile of Triton ops needs a GPU (not under TRITON_INTERPRET)")
@pytest.mark.parametrize("loss", ["clip_loss", "nt_xent", "siglip_loss"])
def test_gemm_backward_under_torch_compile(monkeypatch, loss):
    """The GEMM backward inside the Triton custom ops traces under ``torch.compile(fullgraph=True)``
    (cuBLAS products, row blocks, the split fp32 products) and gives eager's results."""
    monkeypatch.setattr(costs, "MIN_PAIRS", 0)
    monkeypatch.setattr(tcore, "GEMM_DS_BYTES", 1)  # several row blocks
    monkeypatch.setattr(tsiglip, "GEMM_G_BYTES", 1)
    for dtype in (torch.bfloat16, torch.float32):
        torch._dynamo.reset()

        def fn(a, b):
            return getattr(co, loss)(*_loss_args(loss, a, b), backend="triton")

        def step(f):
            g = torch.Generator().manual_seed(13)
            a, b = (torch.randn(300, 128, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(2))
            out = f(a, b)
            out.backward()
            return out.detach(), a.grad, b.grad

        want = step(fn)
        got = step(torch.compile(fn, fullgraph=True))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6)


# ---------------------------------------------------------------------------
# fp32 products of the GEMM backwards on tensor cores: six bf16 products of three-term splits
# ---------------------------------------------------------------------------


def _bf16_mm_on_cpu(x, y):
    """What cuBLAS computes for two bf16 matrices with an fp32 output: exact products and their sums
    (here in fp64, rounded to fp32 once: an fp32 CPU product may round differently for another row
    count, which would make the row-chunk check below depend on the CPU's blocking)."""
    assert x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    return torch.mm(x.double(), y.double()).float()


def test_bf16x3_split_reconstructs_fp32():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1000, generator=g) * torch.logspace(-20, 20, 1000)
    h, m, l = products.split_bf16x3(x)
    assert h.dtype == m.dtype == l.dtype == torch.bfloat16
    err = (h.double() + m.double() + l.double() - x.double()).abs()
    assert (err <= 2.0 ** -23 * x.double().abs()).all()
    assert (h.double() - x.double()).abs().max() > 0  # one bf16 term alone is not enough


@pytest.mark.parametrize("shape", [(70, 300, 40), (5, 4097, 3), (33, 1, 17)], ids=str)
def test_bf16x6_products_have_fp32_error(monkeypatch, shape):
    """The six products of ``mm_bf16x6`` (here with exact bf16 products summed in fp32, as cuBLAS
    computes them) are within twice the IEEE fp32 product's error of the float64 product plus 8
    roundings of 2^-24 of Σ|a||b|; a plain bf16 product (or one term dropped) is far outside.  The
    split runs in row chunks: a chunk of 7 rows of ``a`` at a time changes nothing."""
    n, k, m = shape
    g = torch.Generator().manual_seed(n * 31 + k)
    a = torch.randn(n, k, generator=g) * torch.exp(torch.randn(n, 1, generator=g) * 3)
    b = torch.randn(k, m, generator=g)
    exact = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    bound = 2 * (torch.mm(a, b).double() - exact).abs() + 8 * 2.0 ** -24 * scale
    got = products.mm_bf16x6(a, b, mm=_bf16_mm_on_cpu)
    assert got.dtype == torch.float32 and ((got.double() - exact).abs() <= bound).all()
    monkeypatch.setattr(products, "SPLIT_ROWS_ELEMS", 7 * k)
    assert torch.equal(products.mm_bf16x6(a, b, mm=_bf16_mm_on_cpu), got)
    err = ((got.double() - exact).abs() / scale).max()
    plain = _bf16_mm_on_cpu(a.bfloat16(), b.bfloat16()).double()
    assert ((plain - exact).abs() / scale).max() > 100 * err
    ah, am, al = products.split_bf16x3(a)
    bh, bm, bl = products.split_bf16x3(b)
    no_small = sum(_bf16_mm_on_cpu(x, y) for x, y in ((am, bm), (ah, bm), (am, bh), (ah, bh))).double()
    assert ((no_small - exact).abs() / scale).max() > 4 * err  # the 2^-16 terms matter


def test_fp32_products_follow_the_tf32_switch(monkeypatch):
    """On a GPU, fp32 operands take the split unless TF32 matmuls are enabled globally; 16-bit ones
    one product with an fp32 output; on the CPU (the interpreter's tensors) fp32 products."""
    calls = []
    monkeypatch.setattr(products, "mm_bf16x6", lambda a, b: calls.append("split") or torch.mm(a, b))
    a, b = torch.randn(4, 5), torch.randn(5, 3)
    assert torch.equal(products.mm_f32(a, b), torch.mm(a, b)) and calls == []
    assert products.mm_f32(a.bfloat16(), b.bfloat16()).dtype == torch.float32
