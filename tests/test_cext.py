"""The C++/CUDA extension ``contrastive_ops._C``: kernels against the dense references.

Forward (row/column LSE, SigLIP sum) and every gradient (dq, dk, dscale,
dbias) with random upstream gradients, ragged sizes around the tile sizes
(CPU tiles: up to 256 rows × 512 columns for the core, 512 × 2048 for SigLIP), D not a power of two, index lists
with repeats, ranges with empty rows, one and two exclusions, q is k; float64
gradcheck; ``torch.library.opcheck`` on every op; ``torch.compile``; the
build-version check.  CUDA cases run only where a GPU is present.
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from contrastive_ops import _ext
from contrastive_ops._numerics import acc_dtype
from contrastive_ops.backends import _cext
from contrastive_ops.primitives.siglip_pairs import siglip_pairs_reference
from contrastive_ops.primitives.sim_lse import sim_lse
from helpers import TOL, assert_close, check_nan_logits, nan_filled_memory

_OK, _WHY = _cext.availability("cpu")
if not _OK and os.environ.get("CI") != "true":  # CI must have the extension: there this fails below
    pytest.skip(f"contrastive_ops._C not usable here: {_WHY}", allow_module_level=True)

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not _cext.availability("cuda")[0], reason=f"cuda backend: {_cext.availability('cuda')[1]}"),
    ]),
]
BACKEND = {"cpu": "cpu", "cuda": "cuda"}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 3), (1, 6, 5), (7, 1, 4), (600, 2100, 17)]  # (B, M, D)
CASES = ["plain", "index", "ranges", "exclude1", "exclude2", "q_is_k"]


def test_extension_loads_and_backend_protocol():
    assert _OK, _WHY
    from contrastive_ops.backends import cpu, cuda

    assert cpu.availability()[0] and cpu.devices() == {"cpu"}
    assert {torch.float32, torch.float16, torch.bfloat16} <= cpu.dtypes()
    assert set(cpu.PRIMITIVES) >= {"sim_lse", "siglip"}
    ok, why = cuda.availability()
    assert ok == (torch.cuda.is_available() and _ext.with_cuda()), why
    assert cuda.devices() == {"cuda"}


def _problem(case, B, M, D, device, gen):
    """Inputs of one core call: (q, k, kwargs, want_col); sizes B anchors × M candidates."""
    kw = {}
    if case == "index":
        nq, nk = B + 3, M + 2
        q = torch.randn(nq, D, generator=gen)
        k = torch.randn(nk, D, generator=gen)
        kw["row_index"] = torch.randint(0, nq, (B,), generator=gen)  # repeats: gradients scatter-add
        kw["col_index"] = torch.randint(0, nk, (M,), generator=gen)
    elif case == "q_is_k":
        q = torch.randn(B, D, generator=gen)
        k = q
        kw["exclude"] = torch.arange(B)[:, None]  # self pair excluded, as in NT-Xent
    else:
        q = torch.randn(B, D, generator=gen)
        k = torch.randn(M, D, generator=gen)
    if case in ("ranges", "exclude2", "ranges_exclude6"):
        start = torch.randint(0, M, (B,), generator=gen)
        end = torch.clamp(start + torch.randint(-2, M, (B,), generator=gen), 0, M)  # some start >= end: empty
        start[0], end[0] = 0, M
        kw["col_start"], kw["col_end"] = start, end
    if case == "exclude1":
        ex = torch.randint(-1, M, (B, 1), generator=gen)
        kw["exclude"] = ex
    if case == "exclude2":
        ex = torch.randint(-1, M, (B, 2), generator=gen)
        ex[::3, 1] = ex[::3, 0]  # the same candidate excluded twice
        kw["exclude"] = ex
    if case == "ranges_exclude6":  # not in CASES: a long exclusion list beside the ranges (tests of its own)
        ex = torch.randint(-1, M, (B, 6), generator=gen)
        ex[::2, 5] = ex[::2, 0]  # repeats
        ex[1::3, 2] = torch.clamp(kw["col_start"][1::3], max=M - 1)  # the first allowed column, where there is one
        kw["exclude"] = ex
    kw = {n: t.to(device) for n, t in kw.items()}
    return q.to(device), k.to(device), kw


def _run_core(q, k, scale, kw, want_col, g_row, g_col, backend, dtype):
    """Core forward + backward with upstream gradients (g_row, g_col); -inf entries get no gradient."""
    acc = acc_dtype(dtype)
    same = q is k
    qq = q.detach().to(dtype).requires_grad_()
    kk = qq if same else k.detach().to(dtype).requires_grad_()
    ss = scale.detach().to(acc).requires_grad_()
    row, col = sim_lse(qq, kk, ss, want_col=want_col, backend=backend, **kw)
    loss = (torch.where(torch.isfinite(row), row, 0) * g_row.to(row.dtype)).sum()
    if want_col:
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col.to(col.dtype)).sum()
    loss.backward()
    return row, col, qq.grad, (None if same else kk.grad), ss.grad


def _compare(device, B, M, D, case, dtype, want_col, scale_value=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, kw = _problem(case, B, M, D, device, gen)
    if dtype != torch.float64:  # the reference sees exactly the kernel's input values
        q = q.to(dtype)
        k = q if case == "q_is_k" else k.to(dtype)
    scale = torch.tensor(scale_value, device=device)
    g_row = torch.randn(B, generator=gen).to(device)
    g_col = torch.randn(M, generator=gen).to(device)
    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = _run_core(q, k, scale, kw, want_col, g_row, g_col, BACKEND[device], dtype)
    ref = _run_core(q, k, scale, kw, want_col, g_row, g_col, "reference", ref_dtype)
    acc = acc_dtype(dtype)
    assert out[0].dtype == acc and out[0].shape == (B,)
    # -inf exactly where the reference has -inf (rows/columns with no allowed candidate)
    assert torch.equal(torch.isinf(out[0]), torch.isinf(ref[0]))
    assert not torch.isnan(out[0]).any()
    for name, a, b in zip(("row_lse", "col_lse", "dq", "dk", "dscale"), out, ref):
        if a is None and b is None:
            continue
        if name == "col_lse" and not want_col:
            assert a is None and b is None
            continue
        assert a is not None and torch.isfinite(a[torch.isfinite(b)]).all(), name
        if name in ("dq", "dk"):
            assert a.dtype == dtype, f"{name} has dtype {a.dtype}, want {dtype}"
        fin = torch.isfinite(b)
        assert_close(a[fin].to(b.dtype), b[fin], dtype, what=f"{name} ({case}, {B}x{M}x{D}, {dtype})")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sim_lse_matches_reference(device, dtype, case, shape):
    B, M, D = shape
    if case == "q_is_k":
        M = B
    _compare(device, B, M, D, case, dtype, want_col=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["plain", "exclude2"])
def test_sim_lse_rows_only(device, case):
    """want_col=False: the column LSE is empty and its gradient path unused."""
    _compare(device, 600, 2100, 17, case, torch.float32, want_col=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, M", [(9, 11), (90, 2100)], ids=["9x11", "90x2100"])
def test_sim_lse_nan_logits_reach_their_lses(device, B, M):
    check_nan_logits(BACKEND[device], device, B, M)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale_value", [1 / 0.01, 1e-3, -3.0])
def test_sim_lse_extreme_scales(device, scale_value):
    """Temperature 0.01 on normalized features (logits up to ±100); tiny and negative scales too.

    At scale 100 the fp32 problem itself is ill-conditioned (the gradient of an
    LSE of logits near 100 loses ~1e-6 relative accuracy), so the error budget
    is relative to the fp32 reference: |kernel - f64| ≤ 3·|ref_fp32 - f64| + 1e-6·max|f64|.
    """
    gen = torch.Generator().manual_seed(0)
    B, M, D = 70, 530, 9
    q, k, kw = _problem("exclude2", B, M, D, device, gen)
    q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    g_row = torch.randn(B, generator=gen).to(device)
    g_col = torch.randn(M, generator=gen).to(device)
    scale = torch.tensor(scale_value, device=device)
    out = _run_core(q, k, scale, kw, True, g_row, g_col, BACKEND[device], torch.float32)
    r32 = _run_core(q, k, scale, kw, True, g_row, g_col, "reference", torch.float32)
    r64 = _run_core(q, k, scale, kw, True, g_row, g_col, "reference", torch.float64)
    for name, a, b, c in zip(("row_lse", "col_lse", "dq", "dk", "dscale"), out, r32, r64):
        fin = torch.isfinite(c)
        assert torch.equal(fin, torch.isfinite(a)), name
        err = (a[fin].double() - c[fin]).abs().max().item()
        budget = 3 * (b[fin].double() - c[fin]).abs().max().item() + 1e-6 * c[fin].abs().max().item() + 1e-7
        assert err <= budget, f"{name}: error {err:.3g} > budget {budget:.3g} (scale {scale_value})"


@pytest.mark.parametrize("case", CASES)
def test_sim_lse_gradcheck_float64(case):
    gen = torch.Generator().manual_seed(1)
    B, M, D = 6, 9, 5
    if case == "q_is_k":
        M = B
    q, k, kw = _problem(case, B, M, D, "cpu", gen)
    q = q.double().requires_grad_()
    k = q if case == "q_is_k" else k.double().requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)

    def fn(q_, k_, s_):
        row, col = sim_lse(q_, q_ if case == "q_is_k" else k_, s_, want_col=True, backend="cpu", **kw)
        return torch.where(torch.isfinite(row), row, 0), torch.where(torch.isfinite(col), col, 0)

    assert torch.autograd.gradcheck(fn, (q, k, scale), eps=1e-6, atol=1e-7)


def test_kernel_buffers_fully_written():
    """With uninitialized memory filled with NaN, every output and tile buffer must be written before use."""
    with nan_filled_memory():
        for case in ("plain", "ranges", "exclude2", "index"):
            _compare("cpu", 600, 2100, 17, case, torch.float32, want_col=True)
        _siglip_compare("cpu", 600, 2100, 17, torch.float32)


# ---------------------------------------------------------------- SigLIP pair sum


def _siglip_compare(device, B, M, D, dtype, scale_value=10.0, bias_value=-10.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(B, D, generator=gen), dim=-1).to(device=device, dtype=dtype)
    y = torch.nn.functional.normalize(torch.randn(M, D, generator=gen), dim=-1).to(device=device, dtype=dtype)
    acc = acc_dtype(dtype)
    scale = torch.tensor(scale_value, dtype=acc, device=device)
    bias = torch.tensor(bias_value, dtype=acc, device=device)
    grad = torch.tensor(-1.7, dtype=acc, device=device)
    prim = _cext.PRIMITIVES["siglip"]
    total = prim.forward(x, y, scale, bias)
    dx, dy, dscale, dbias = prim.backward(x, y, scale, bias, grad)

    ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(ref_dtype).requires_grad_() for t in (x, y, scale, bias)]
    ref = siglip_pairs_reference(*leaves)
    ref.backward(grad.to(ref_dtype))
    assert total.shape == () and total.dtype == acc
    assert dx.dtype == dtype and dy.dtype == dtype and dscale.shape == () and dbias.shape == ()
    # a sum of B·M terms: its tolerance grows with the number of terms
    assert_close(total, ref.detach(), dtype, scale=max(1.0, (B * M) ** 0.5 / 10), what="siglip sum")
    for name, a, b in zip(("dx", "dy", "dscale", "dbias"), (dx, dy, dscale, dbias), leaves):
        assert_close(a.to(ref_dtype), b.grad, dtype, scale=max(1.0, (B * M) ** 0.5 / 30), what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 3), (5, 7, 6), (9, 4, 5), (600, 2100, 17)], ids=lambda s: "x".join(map(str, s)))
def test_siglip_matches_reference(device, dtype, shape):
    _siglip_compare(device, *shape, dtype)


@pytest.mark.parametrize("scale_value,bias_value", [(100.0, -20.0), (0.5, 3.0), (-4.0, 0.0)])
def test_siglip_extreme_logits(scale_value, bias_value):
    _siglip_compare("cpu", 40, 33, 7, torch.float32, scale_value, bias_value)


def test_siglip_gradcheck_float64():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-0.7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(torch.ops.contrastive_ops.siglip_fwd, (x, y, s, b))


# ---------------------------------------------------------------- op registration, compile


def _op_samples(device):
    gen = torch.Generator().manual_seed(3)
    B, M, D = 9, 13, 5
    q = torch.randn(B, D, generator=gen).to(device)
    k = torch.randn(M, D, generator=gen).to(device)
    s = torch.tensor(1.5, device=device)
    i32 = dict(dtype=torch.int32, device=device)
    masks = (
        torch.randint(0, 11, (7,), generator=gen).to(**i32),
        torch.randint(0, 13, (M,), generator=gen).to(**i32),
        torch.randint(0, 6, (7,), generator=gen).to(**i32),
        torch.randint(6, 14, (7,), generator=gen).to(**i32),
        torch.randint(-1, M, (7, 2), generator=gen).to(**i32),
    )
    q11 = torch.randn(11, D, generator=gen).to(device)
    fwd = []
    for want_col in (False, True):
        fwd.append((q, k, s, None, None, None, None, None, want_col))
        fwd.append((q11, k, s, *masks, want_col))
    return fwd


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_sim_lse(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.contrastive_ops.sim_lse_fwd.default, args)
        q, k, s = (t.clone().requires_grad_() for t in args[:3])
        torch.library.opcheck(torch.ops.contrastive_ops.sim_lse_fwd.default, (q, k, s, *args[3:]))
        row, col = torch.ops.contrastive_ops.sim_lse_fwd(*args)
        gen = torch.Generator().manual_seed(4)
        g_row = torch.randn(row.shape, generator=gen).to(device)
        g_col = torch.randn(col.shape, generator=gen).to(device)
        torch.library.opcheck(torch.ops.contrastive_ops.sim_lse_bwd.default, (*args[:8], row, col, g_row, g_col))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_siglip(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=gen).to(device)
    y = torch.randn(8, 5, generator=gen).to(device)
    s = torch.tensor(2.0, device=device)
    b = torch.tensor(-1.0, device=device)
    g = torch.tensor(0.7, device=device)
    torch.library.opcheck(torch.ops.contrastive_ops.siglip_fwd.default, (x, y, s, b))
    torch.library.opcheck(torch.ops.contrastive_ops.siglip_fwd.default,
                          tuple(t.clone().requires_grad_() for t in (x, y, s, b)))
    torch.library.opcheck(torch.ops.contrastive_ops.siglip_bwd.default, (x, y, s, b, g))


def test_torch_compile_fullgraph():
    """The fake kernels let the ops be traced whole, forward and backward."""

    def loss_fn(q, k, s, start, end, ex):
        row, col = torch.ops.contrastive_ops.sim_lse_fwd(q, k, s, None, None, start, end, ex, True)
        sig = torch.ops.contrastive_ops.siglip_fwd(q, k, s, -s)
        return row.sum() + col.sum() + 1e-3 * sig

    gen = torch.Generator().manual_seed(6)
    B, D = 12, 7
    q = torch.randn(B, D, generator=gen, requires_grad=True)
    k = torch.randn(B, D, generator=gen, requires_grad=True)
    s = torch.tensor(1.2, requires_grad=True)
    start = torch.zeros(B, dtype=torch.int32)
    end = torch.full((B,), B, dtype=torch.int32)
    ex = torch.arange(B, dtype=torch.int32)[:, None]
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, s, start, end, ex)
    grads = torch.autograd.grad(out, (q, k, s))
    out_e = loss_fn(q, k, s, start, end, ex)
    grads_e = torch.autograd.grad(out_e, (q, k, s))
    torch.testing.assert_close(out, out_e)
    for a, b in zip(grads, grads_e):
        torch.testing.assert_close(a, b)


def test_bad_arguments_raise():
    q = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="feature sizes"):
        torch.ops.contrastive_ops.sim_lse_fwd(q, torch.randn(5, 2), torch.tensor(1.0), None, None, None, None, None, False)
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.contrastive_ops.sim_lse_fwd(q, q, torch.tensor(1.0), torch.tensor([0, 1]), None, None, None, None,
                                              False)
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16"):
        torch.ops.contrastive_ops.siglip_fwd(q.int(), q.int(), torch.tensor(1.0), torch.tensor(0.0))


# ---------------------------------------------------------------- build record / version check


def _info(**kw):
    base = dict(TORCH_VERSION=torch.__version__, CUDA_VERSION=torch.version.cuda, WITH_EXT=True, WITH_CUDA=False)
    base.update(kw)
    return types.SimpleNamespace(**base)


def test_build_info_recorded():
    import contrastive_ops._build_info as info

    assert info.TORCH_VERSION == torch.__version__
    assert info.WITH_EXT is True
    _ext.check_versions(info)  # the running build matches


@pytest.mark.parametrize("info,match", [
    (_info(TORCH_VERSION="2.0.0+cu118"), r"built against torch 2\.0\.0\+cu118 but torch .* is running"),
    (_info(WITH_CUDA=True, CUDA_VERSION="11.8"), r"built against CUDA 11\.8"),
    (_info(WITH_EXT=False), r"CONTRASTIVE_OPS_SKIP_EXT"),
    (None, r"installed without its C\+\+ extension"),
])
def test_version_mismatch_gives_actionable_error(monkeypatch, info, match):
    with pytest.raises(_ext.ExtensionError, match=match) as e:
        _ext.check_versions(info, torch.__version__, "12.9" if info is not None and info.WITH_CUDA else None)
    assert "rebuild with: pip install --no-build-isolation" in str(e.value)
    # load() checks before importing the binary, and the backends report the reason instead of crashing
    monkeypatch.setattr(_ext, "_build_info", lambda: info)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_cext, "_registered", False)
    monkeypatch.setattr(torch.version, "cuda", "12.9")
    with pytest.raises(_ext.ExtensionError, match="rebuild with"):
        _ext.load()
    ok, why = _cext.availability("cpu")
    assert not ok and "rebuild with: pip install --no-build-isolation" in why
