"""The Triton backend's primitives against the dense references.

``"sim_lse"`` is checked against ``core.sim_lse_reference`` (forward row and
column LSEs, dq, dk, dscale) both through the launchers directly and through
``core.sim_lse(..., backend="triton")`` with autograd; ``"siglip"`` against
``primitives.siglip_pairs.siglip_pairs_reference``.  Every kernel output is allocated full
of NaN (``POISON_OUTPUTS``), so a tile a kernel forgets to write fails.  On
CPU these run under ``TRITON_INTERPRET=1`` (tests/conftest.py).
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import contrastive_ops as co
from contrastive_ops import backends
from contrastive_ops.primitives.sim_lse import sim_lse, sim_lse_reference
from contrastive_ops.primitives.siglip_pairs import siglip_pairs_reference as siglip_sum_reference
from helpers import DEVICE, TOL, check_nan_logits
from helpers import triton_assert_close as assert_close

_OK, _WHY = co.available_backends()["triton"]
_RUNS_HERE = _OK and DEVICE.type in backends.backend_module("triton").devices()
if not _RUNS_HERE and not (os.environ.get("CI") == "true" and DEVICE.type == "cpu"):
    pytest.skip(f"triton backend not usable here: {_WHY}", allow_module_level=True)

from contrastive_ops.backends._triton import sim_lse as tcore  # noqa: E402
from contrastive_ops.backends._triton import tiles as ttiles  # noqa: E402
from contrastive_ops.backends._triton import siglip as tsiglip  # noqa: E402

# log(0) = -inf for empty sets is intended; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)


def _i32(t):
    return t.to(device=DEVICE, dtype=torch.int32).contiguous()


def _case(name, dtype):
    """``(q, k, kwargs)`` of a named case; ``k is q`` where the case says so."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    def ranges(B, M, empty_every=5):
        start = torch.randint(0, M, (B,), generator=g)
        end = torch.minimum(start + torch.randint(1, M, (B,), generator=g), torch.tensor(M))
        end[::empty_every] = start[::empty_every]  # empty rows: row_lse = -inf
        return _i32(start), _i32(end)

    kw = {}
    if name == "plain":  # ragged B, M (not block multiples), D not a power of two
        q, k = randn(70, 33), randn(45, 33)
    elif name == "b1":
        q, k = randn(1, 72), randn(37, 72)
    elif name == "large":
        q, k = randn(300, 72), randn(260, 72)
    elif name == "q_is_k_exclude_self":  # NT-Xent / MV-InfoNCE shape of the core
        q = randn(50, 20)
        k = q
        kw["exclude"] = _i32(torch.arange(50).reshape(50, 1))
    elif name == "index":
        q, k = randn(80, 40), randn(60, 40)
        kw["row_index"] = _i32(torch.randperm(80, generator=g)[:45])
        kw["col_index"] = _i32(torch.randperm(60, generator=g)[:33])
    elif name == "q_is_k_index":  # view blocks of one feature tensor (MV-DHEL style)
        q = randn(90, 24)
        k = q
        kw["row_index"] = _i32(torch.arange(0, 90, 2))
        kw["col_index"] = _i32(torch.arange(1, 90, 2))
    elif name == "range":
        q, k = randn(66, 33), randn(70, 33)
        kw["col_start"], kw["col_end"] = ranges(66, 70)
    elif name == "exclude1":
        q, k = randn(40, 16), randn(40, 16)
        ex = torch.arange(40)
        ex[::3] = -1  # nothing excluded
        kw["exclude"] = _i32(ex.reshape(40, 1))
    elif name == "range_exclude2":
        q, k = randn(64, 33), randn(50, 33)
        kw["col_start"], kw["col_end"] = ranges(64, 50, empty_every=7)
        ex = torch.randint(-1, 50, (64, 2), generator=g)
        ex[5] = torch.tensor([3, 3])
        kw["exclude"] = _i32(ex)
    elif name == "range_index_exclude2":  # everything at once
        q, k = randn(50, 40), randn(70, 40)
        kw["row_index"] = _i32(torch.randperm(50, generator=g)[:35])
        kw["col_index"] = _i32(torch.randperm(70, generator=g)[:41])
        kw["col_start"], kw["col_end"] = ranges(35, 41)
        kw["exclude"] = _i32(torch.randint(-1, 41, (35, 2), generator=g))
    else:
        raise KeyError(name)
    return q, k, kw


CASES = ["plain", "b1", "q_is_k_exclude_self", "index", "q_is_k_index", "range", "exclude1",
         "range_exclude2", "range_index_exclude2"]


def _ref_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(t):
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _check_lse(actual, expected, dtype, what):
    assert actual.dtype == torch.float32, what
    assert not torch.isnan(actual).any(), f"{what}: NaN (a tile left unwritten?)"
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected)), f"{what}: -inf pattern differs"
    assert_close(_finite(actual), _finite(expected).float(), dtype, what=what)


def _reference_grads(q, k, scale, kw, want_col, g_row, g_col):
    rd = _ref_dtype(q.dtype)
    same = k is q
    qr = q.detach().to(rd).requires_grad_()
    kr = qr if same else k.detach().to(rd).requires_grad_()
    sr = scale.detach().to(rd).requires_grad_()
    row, col = sim_lse_reference(qr, kr, sr, want_col=want_col, **kw)
    loss = (g_row.to(rd) * _finite(row)).sum()
    if want_col:
        loss = loss + (g_col.to(rd) * _finite(col)).sum()
    if same:
        dq, ds = torch.autograd.grad(loss, (qr, sr))
        return row, col, dq, None, ds
    dq, dk, ds = torch.autograd.grad(loss, (qr, kr, sr))
    return row, col, dq, dk, ds


def _full_kw(kw):
    return {n: kw.get(n) for n in ("row_index", "col_index", "col_start", "col_end", "exclude")}


def _forward_case(case, dtype, want_col):
    """A case's inputs, the kernel forward at scale 1.7 and random output gradients.

    Returns ``(q, k, kw, fkw, scale, row, col, g_row, g_col)``; ``g_col`` is
    empty when ``want_col`` is False.
    """
    q, k, kw = _case(case, dtype)
    fkw = _full_kw(kw)
    scale = torch.tensor(1.7, device=DEVICE)
    row, col = tcore.sim_lse_forward(q, k, scale, want_col=want_col, **fkw)
    B, M = row.shape[0], (k.shape[0] if kw.get("col_index") is None else kw["col_index"].shape[0])
    g_row = torch.randn(B, device=DEVICE)
    g_col = torch.randn(M, device=DEVICE) if want_col else torch.empty(0, device=DEVICE)
    return q, k, kw, fkw, scale, row, col, g_row, g_col


# Column LSE on every case; row-only (want_col=False) on a few.
_PRIM_CASES = [(c, True) for c in CASES] + [(c, False) for c in ("plain", "range_exclude2", "q_is_k_index")]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,want_col", _PRIM_CASES, ids=[f"{c}-{'col' if w else 'rowonly'}" for c, w in _PRIM_CASES])
def test_sim_lse_primitive(case, dtype, want_col):
    q, k, kw, fkw, scale, row, col, g_row, g_col = _forward_case(case, dtype, want_col)
    r_row, r_col, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, kw, want_col, g_row, g_col)

    _check_lse(row, r_row, dtype, "row_lse")
    if want_col:
        _check_lse(col, r_col, dtype, "col_lse")
    else:
        assert col.numel() == 0

    dq, dk, dscale = tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row, g_col)
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dq.shape == q.shape and dk.shape == k.shape
    for name, t in (("dq", dq), ("dk", dk), ("dscale", dscale)):
        assert torch.isfinite(t).all(), f"{name} not finite (a tile left unwritten?)"
    if k is q:
        assert_close((dq.float() + dk.float()), r_dq, dtype, what="dq + dk (q is k)")
    else:
        assert_close(dq.float(), r_dq, dtype, what="dq")
        assert_close(dk.float(), r_dk, dtype, what="dk")
    assert_close(dscale, r_ds.float(), dtype, what="dscale")


@pytest.mark.parametrize("dtype", [torch.float32])
def test_sim_lse_primitive_large(dtype):
    q, k, _ = _case("large", dtype)
    scale = torch.tensor(0.6, device=DEVICE)
    row, col = tcore.sim_lse_forward(q, k, scale, want_col=True)
    g_row, g_col = torch.randn(300, device=DEVICE), torch.randn(260, device=DEVICE)
    r_row, r_col, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, {}, True, g_row, g_col)
    _check_lse(row, r_row, dtype, "row_lse")
    _check_lse(col, r_col, dtype, "col_lse")
    dq, dk, dscale = tcore.sim_lse_backward(q, k, scale, None, None, None, None, None, row, col, g_row, g_col)
    assert_close(dq, r_dq, dtype, what="dq")
    assert_close(dk, r_dk, dtype, what="dk")
    assert_close(dscale, r_ds, dtype, what="dscale")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["plain", "b1", "q_is_k_exclude_self", "q_is_k_index", "range_index_exclude2"])
def test_sim_lse_autograd(case, dtype):
    """``core.sim_lse(backend="triton")`` through ``_SimLSE``, against the dense core."""
    q0, k0, kw = _case(case, dtype)
    same = k0 is q0
    scale0 = torch.tensor(2.3)
    outs = {}
    for backend, dt in (("triton", dtype), ("reference", torch.float32)):
        q = q0.detach().to(dt).requires_grad_()
        k = q if same else k0.detach().to(dt).requires_grad_()
        scale = scale0.clone().requires_grad_()
        row, col = sim_lse(q, k, scale, want_col=True, backend=backend, **kw)
        g = torch.Generator().manual_seed(1)
        w_row = torch.randn(row.shape, generator=g).to(DEVICE)
        w_col = torch.randn(col.shape, generator=g).to(DEVICE)
        ((w_row * _finite(row)).sum() + (w_col * _finite(col)).sum()).backward()
        outs[backend] = (row, col, q.grad, None if same else k.grad, scale.grad)
    (row, col, dq, dk, ds), (r_row, r_col, r_dq, r_dk, r_ds) = outs["triton"], outs["reference"]
    _check_lse(row, r_row.detach(), dtype, "row_lse")
    _check_lse(col, r_col.detach(), dtype, "col_lse")
    assert dq.dtype == dtype
    assert_close(dq.float(), r_dq, dtype, what="dq")
    if not same:
        assert_close(dk.float(), r_dk, dtype, what="dk")
    assert_close(ds, r_ds, dtype, what="dscale")


@pytest.mark.parametrize("B, M", [(9, 11), (90, 300)], ids=["9x11", "90x300"])
def test_sim_lse_nan_logits_reach_their_lses(B, M):
    check_nan_logits("triton", DEVICE, B, M)


def test_sim_lse_all_rows_empty():
    """Every set empty: -inf everywhere, zero gradients, no NaN."""
    q = torch.randn(20, 17, device=DEVICE)
    k = torch.randn(30, 17, device=DEVICE)
    start = _i32(torch.full((20,), 5))
    scale = torch.tensor(1.0, device=DEVICE)
    row, col = tcore.sim_lse_forward(q, k, scale, col_start=start, col_end=start, want_col=True)
    assert torch.isneginf(row).all() and torch.isneginf(col).all()
    dq, dk, ds = tcore.sim_lse_backward(q, k, scale, None, None, start, start, None, row, col,
                                        torch.randn(20, device=DEVICE), torch.randn(30, device=DEVICE))
    assert (dq == 0).all() and (dk == 0).all() and ds == 0


def _siglip_inputs(B, M, D, dtype, scale=10.0, bias=-10.0, normalize=True):
    x, y = torch.randn(B, D), torch.randn(M, D)
    if normalize:
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return x.to(DEVICE, dtype), y.to(DEVICE, dtype), torch.tensor(scale, device=DEVICE), torch.tensor(bias, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(70, 70, 33), (1, 1, 72), (45, 38, 40)], ids=["70x70x33", "1x1x72", "45x38x40"])
def test_siglip_primitive(shape, dtype):
    x, y, scale, bias = _siglip_inputs(*shape, dtype)
    grad = torch.tensor(0.37, device=DEVICE)
    loss = tsiglip.siglip_forward(x, y, scale, bias)
    dx, dy, dscale, dbias = tsiglip.siglip_backward(x, y, scale, bias, grad)
    rd = _ref_dtype(dtype)
    xr, yr = x.to(rd).requires_grad_(), y.to(rd).requires_grad_()
    sr, br = scale.to(rd).requires_grad_(), bias.to(rd).requires_grad_()
    ref = siglip_sum_reference(xr, yr, sr, br)
    r_dx, r_dy, r_ds, r_db = torch.autograd.grad(ref * grad.to(rd), (xr, yr, sr, br))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close(loss, ref.detach().float(), dtype, what="siglip sum")
    assert dx.dtype == dtype and dy.dtype == dtype
    assert torch.isfinite(dx).all() and torch.isfinite(dy).all(), "unwritten gradient tile"
    assert_close(dx.float(), r_dx, dtype, what="dx")
    assert_close(dy.float(), r_dy, dtype, what="dy")
    assert_close(dscale, r_ds.float(), dtype, what="dscale")
    assert_close(dbias, r_db.float(), dtype, what="dbias")


def test_siglip_extreme_logits():
    """Large |logits| (unnormalized features, scale 30): softplus and sigmoid stay exact and finite."""
    x, y, scale, bias = _siglip_inputs(40, 40, 24, torch.float32, scale=30.0, bias=-5.0, normalize=False)
    loss = tsiglip.siglip_forward(x, y, scale, bias)
    ref = siglip_sum_reference(x.double(), y.double(), scale.double(), bias.double())
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-3)
    dx, dy, ds, db = tsiglip.siglip_backward(x, y, scale, bias, torch.tensor(1.0, device=DEVICE))
    assert all(torch.isfinite(t).all() for t in (dx, dy, ds, db))



def test_scalar_arguments_on_the_host():
    """A 0-dim CPU tensor (scale, bias, upstream gradient) next to the inputs is taken as a scalar, as
    PyTorch's own ops take it, and gives what the same value on the inputs' device gives; any other
    tensor on another device is a clear error, not a Triton launch failure."""
    from contrastive_ops.backends._triton.args import same_device, scalar_on
    from contrastive_ops.backends._triton import swav_ce as tswav

    x, y, scale, bias = _siglip_inputs(9, 7, 16, torch.float32)
    grad = torch.tensor(0.5, device=DEVICE)
    want = tsiglip.siglip_backward(x, y, scale, bias, grad)
    got = tsiglip.siglip_backward(x, y, scale.cpu(), bias.cpu(), grad.cpu())
    for w, g in zip(want, got):
        assert g.device == w.device and torch.equal(g, w)
    assert torch.equal(tsiglip.siglip_forward(x, y, scale.cpu(), bias.cpu()), tsiglip.siglip_forward(x, y, scale, bias))
    t = torch.softmax(torch.randn(9, 7, device=DEVICE), 1)
    loss, lse = tswav.SWAV_CE.forward(x[:, :7].contiguous(), t, scale)
    dx, ds = tswav.SWAV_CE.backward(x[:, :7].contiguous(), t, scale, lse, grad)
    dx_h, ds_h = torch.ops.contrastive_ops_triton.swav_ce_bwd(x[:, :7].contiguous(), t, scale.cpu(), lse, grad.cpu())
    assert torch.equal(dx_h, dx) and torch.equal(ds_h, ds)
    q, k = x[:, :8].contiguous(), y[:, :8].contiguous()
    row, col = tcore.sim_lse_forward(q, k, scale, want_col=True)
    row_h, col_h = tcore.sim_lse_forward(q, k, scale.cpu(), want_col=True)
    assert torch.equal(row_h, row) and torch.equal(col_h, col)
    g_row, g_col = torch.randn_like(row), torch.randn_like(col)
    bwd = tcore.sim_lse_backward(q, k, scale, None, None, None, None, None, row, col, g_row, g_col)
    bwd_h = tcore.sim_lse_backward(q, k, scale.cpu(), None, None, None, None, None, row, col, g_row, g_col)
    for w, g in zip(bwd, bwd_h):
        assert torch.equal(g, w)
    # The rules themselves, with "meta" standing in for another device:
    meta = torch.device("meta")
    assert scalar_on("op", "grad", torch.tensor(2.0), meta).device == meta
    with pytest.raises(ValueError, match="op: grad is on meta"):
        scalar_on("op", "grad", torch.tensor(2.0, device=meta), torch.device("cpu"))
    with pytest.raises(ValueError, match="op: grad must be a 0-dim tensor"):
        scalar_on("op", "grad", torch.ones(2), torch.device("cpu"))
    with pytest.raises(ValueError, match="op: v is on meta"):
        same_device("op", torch.device("cpu"), v=torch.ones(3, device=meta))
    if DEVICE.type == "cuda":  # a vector on the host next to CUDA inputs
        with pytest.raises(ValueError, match="swav_ce_bwd: lse is on cpu"):
            torch.ops.contrastive_ops_triton.swav_ce_bwd(x[:, :7].contiguous(), t, scale, lse.cpu(), grad)
        with pytest.raises(ValueError, match="sim_lse_bwd: row_lse is on cpu"):
            tcore.sim_lse_backward(q, k, scale, None, None, None, None, None, row.cpu(), col, g_row, g_col)


def test_siglip_tiny_terms_kept():
    """softplus(t) for t ≪ 0 is ≈ eᵗ, far below fp32's epsilon next to 1: the log1p must keep it."""
    x, y, scale, _ = _siglip_inputs(1, 1, 16, torch.float32, scale=1.0)
    bias = torch.tensor(30.0, device=DEVICE)  # one positive pair: softplus(-(x·y + 30)) ≈ 1e-13
    loss = tsiglip.siglip_forward(x, y, scale, bias)
    ref = siglip_sum_reference(x.double(), y.double(), scale.double(), bias.double())
    assert 0 < ref < 1e-12
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_backend_declarations():
    mod = backends.backend_module("triton")
    assert set(mod.PRIMITIVES) >= {"sim_lse", "siglip"}
    assert mod.dtypes() == {torch.float32, torch.float16, torch.bfloat16}
    ok, why = mod.availability()
    assert ok and isinstance(why, str)
    assert DEVICE.type in mod.devices()
    x = torch.randn(4, 8, device=DEVICE)
    assert backends.resolve("triton", op="info_nce", tensors=[x]) == "triton"
    with pytest.raises(RuntimeError, match="supports"):
        backends.resolve("triton", op="info_nce", tensors=[x.double()])


def test_custom_ops_fake_and_schema():
    """The registered ops have consistent schemas and fake kernels (what torch.compile traces)."""
    q, k, kw = _case("range_exclude2", torch.float32)
    fkw = _full_kw(kw)
    scale = torch.tensor(1.1, device=DEVICE)
    args = (q, k, scale, *fkw.values(), True)
    torch.library.opcheck(torch.ops.contrastive_ops_triton.sim_lse_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    row, col = tcore.sim_lse_forward(q, k, scale, want_col=True, **fkw)
    bargs = (q, k, scale, *fkw.values(), row, col, torch.randn_like(row), torch.randn_like(col))
    torch.library.opcheck(torch.ops.contrastive_ops_triton.sim_lse_bwd.default, bargs,
                          test_utils=("test_schema", "test_faketensor"))
    # Traced with fake tensors the op stays one graph node (no data read, no kernel run).
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(lambda *a: tcore.sim_lse_forward(*a, want_col=True), tracing_mode="fake")(q, k, scale, *fkw.values())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.contrastive_ops_triton.sim_lse_fwd.default in targets
    x, y, s, b = _siglip_inputs(20, 20, 16, torch.float32)
    torch.library.opcheck(torch.ops.contrastive_ops_triton.siglip_fwd.default, (x, y, s, b),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.contrastive_ops_triton.siglip_bwd.default, (x, y, s, b, torch.tensor(0.5, device=DEVICE)),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="torch.compile of Triton ops needs a GPU (not the interpreter)")
def test_sim_lse_compiles_fullgraph():
    q, k, kw = _case("range_exclude2", torch.float16)
    q.requires_grad_()
    scale = torch.tensor(1.3, device=DEVICE)

    def f(q, k, scale):
        row, col = sim_lse(q, k, scale, want_col=True, backend="triton", **kw)
        return _finite(row).sum() + _finite(col).sum()

    out = torch.compile(f, fullgraph=True)(q, k, scale)
    out.backward()
    ref = f(q.detach().float(), k.float(), scale)
    assert_close(out, ref, torch.float16, what="compiled")


def test_backward_one_wide_output_chunk(monkeypatch):
    """The GPU layout of the backward (one output chunk of width 128 ≠ BLOCK_D) on the same data."""
    monkeypatch.setattr(tcore, "block_do", lambda D, dtype=None, gram=False: 128)
    monkeypatch.setattr(tsiglip, "block_do", lambda D, dtype=None, gram=False: 128)
    test_sim_lse_primitive("range_index_exclude2", torch.float32, True)
    test_siglip_primitive((45, 38, 72), torch.float32)
