"""Sinkhorn-Knopp codes and the SwAV loss: reference against SwAV's own algorithm (float64), an
independent log-domain float64 solver, lightly's implementation, and every kernel primitive."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops import backends
from contrastive_ops.losses.swav import swav_released_loss, swav_released_sinkhorn
from contrastive_ops.primitives.sinkhorn import sinkhorn_reference, sinkhorn_steps

import helpers
from helpers import TOL, compare_with_reference

LOW = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- independent oracles
# SwAV's own code is the library's transcription (swav_released_sinkhorn / swav_released_loss), run in float64.


def sinkhorn_log_f64(out, epsilon, iterations):
    """Float64 Sinkhorn on explicit row / column log-scalings (a different formulation from the reference)."""
    L = out.double() / epsilon
    B, K = L.shape
    a = torch.zeros(B, dtype=torch.float64)          # log column (sample) factors
    c = -torch.logsumexp(L.reshape(-1), 0)           # log total factor
    b = torch.zeros(K, dtype=torch.float64)          # log row (prototype) factors
    for _ in range(iterations):
        b = -math.log(K) - torch.logsumexp(L + a[:, None] + c, dim=0)
        a = -math.log(B) - torch.logsumexp(L + b[None, :] + c, dim=1)
    return torch.exp(L + a[:, None] + b[None, :] + c + math.log(B))


def cosine_scores(B, K, dtype=torch.float32, seed=0):
    """z·Cᵀ with unit z and unit prototypes C, as SwAV feeds it."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, 16, generator=g, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(K, 16, generator=g, dtype=torch.float64), dim=1)
    return (z @ c.T).to(dtype)


# --------------------------------------------------------------------------- kernel primitives


def _triton_prim():
    if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    from contrastive_ops.backends._triton.sinkhorn import SINKHORN

    return SINKHORN


def _cext_prim():
    """The extension's op through the cpu/cuda backend (skipped with the reason when not built)."""
    name = "cuda" if DEV.type == "cuda" else "cpu"
    ok, why = backends._availability(name)
    if not ok:
        pytest.skip(f"{name} backend not usable here: {why}")
    return backends.primitive(name, "sinkhorn")


PRIMS = {"triton": _triton_prim, "cext": _cext_prim}
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=list(PRIMS))
def prim(request):
    return PRIMS[request.param]()


@pytest.fixture(params=helpers.backend_params())
def kernel_backend(request):
    """A kernel backend whose ``"sinkhorn"`` primitive runs on this device."""
    return request.param


# --------------------------------------------------------------------------- reference vs SwAV


@pytest.mark.parametrize("K", [1, 7, 3000])
@pytest.mark.parametrize("B", [1, 5, 33, 130])
@pytest.mark.parametrize("epsilon", [0.02, 0.05, 0.1])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_reference_matches_swav_float64(K, B, epsilon, iterations):
    scores = cosine_scores(B, K, seed=B * 7 + K)  # |score| <= 1: exp(1/0.02) is fine in float64
    expected = swav_released_sinkhorn(scores.double(), epsilon, iterations)
    got = co.sinkhorn_knopp(scores, epsilon, iterations, backend="reference")
    assert got.dtype == torch.float32 and got.shape == (B, K)
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)
    if iterations >= 1:
        torch.testing.assert_close(got.sum(1).double(), torch.ones(B, dtype=torch.float64), rtol=0, atol=2e-5)
    else:
        torch.testing.assert_close(got.sum().double(), torch.tensor(float(B), dtype=torch.float64), rtol=2e-5, atol=0)


def test_oracles_agree():
    """The two float64 oracles (plain SwAV and the scaling form) agree where both are exact."""
    scores = cosine_scores(20, 9)
    for it in (0, 1, 3, 7):
        expected = swav_released_sinkhorn(scores.double(), 0.05, it)
        torch.testing.assert_close(sinkhorn_log_f64(scores, 0.05, it), expected)


def test_reference_keeps_float64():
    scores = cosine_scores(12, 5, dtype=torch.float64)
    got = co.sinkhorn_knopp(scores, 0.05, 3, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), swav_released_sinkhorn(scores.double(), 0.05, 3), rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------- large scores


def _large_cases():
    return [(1, 1, 50.0), (17, 7, 50.0), (64, 300, 50.0), (33, 3000, 20.0)]


def _close_to_log_answer(got, scores, epsilon, iterations):
    expected = sinkhorn_log_f64(scores.double(), epsilon, iterations)
    assert torch.isfinite(got).all()
    # fp32 rounds S/ε (|S/ε| up to a few thousand) to ~2⁻²⁴·|S/ε|: the error budget of an exact fp32 solver.
    scale = float(scores.double().abs().max()) / epsilon
    tol = 64 * scale * 2.0 ** -24 + 1e-6
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("B,K,mag", _large_cases())
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_reference_large_scores(B, K, mag, iterations):
    scores = torch.randn(B, K) * mag
    if B * K > 1:
        with torch.no_grad():  # the plain fp32 algorithm overflows here
            plain = torch.exp(scores / 0.05)
        assert not torch.isfinite(plain).all()
    _close_to_log_answer(co.sinkhorn_knopp(scores, 0.05, iterations, backend="reference"), scores, 0.05, iterations)


@pytest.mark.parametrize("iterations", [1, 3])
def test_reference_extreme_ratio(iterations):
    """|score|/ε = 2000: a global max shift alone would underflow every other prototype."""
    scores = torch.tensor([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0], [0.2, 0.1, -0.9], [1.0, 1.0, -1.0]])
    _close_to_log_answer(co.sinkhorn_knopp(scores, 5e-4, iterations, backend="reference"), scores, 5e-4, iterations)


@pytest.mark.parametrize("B,K,mag", _large_cases())
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_primitive_large_scores(prim, B, K, mag, iterations):
    scores = (torch.randn(B, K) * mag).to(DEV)
    _close_to_log_answer(prim.forward(scores, 0.05, iterations).cpu(), scores.cpu(), 0.05, iterations)


# --------------------------------------------------------------------------- kernel primitives vs reference


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,K", [(1, 1), (1, 3000), (5, 7), (37, 50), (130, 3000)])
@pytest.mark.parametrize("iterations", [0, 1, 3])
def test_primitive_matches_reference(prim, dtype, B, K, iterations):
    scores = (torch.randn(B, K) * 3).to(dtype).to(DEV)
    original = scores.clone()
    got = prim.forward(scores, 0.05, iterations)
    assert torch.equal(scores, original), "the primitive modified its input"
    assert got.dtype == torch.float32 and got.shape == (B, K) and got.device == scores.device
    # The reference sees the same values upcast to fp32: the kernel must be fp32-exact, whatever the input dtype.
    ref = sinkhorn_reference(scores.float(), 0.05, iterations)
    tol = 64 * float(scores.float().abs().max()) / 0.05 * 2.0 ** -24 + 1e-6
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # The step-wise path used under a process group gives the same codes (the CPU forward may take the
    # scaling form instead of the log domain: two fp32 solvers, the same error budget).
    steps = sinkhorn_steps(prim.col_lse, prim.codes, scores, 0.05, iterations)
    torch.testing.assert_close(steps, got, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- CPU: scaling form and log domain


def _cpu_sinkhorn(scores, epsilon, iterations):
    from contrastive_ops.backends import _cext

    ok, why = _cext.availability("cpu")
    if not ok:
        pytest.skip(f"cpu backend: {why}")
    _cext.ensure_loaded()
    with helpers.nan_filled_memory():  # an entry the kernel leaves unwritten reads NaN
        out = torch.ops.contrastive_ops.sinkhorn(scores, epsilon, iterations)
    return out, torch.ops.contrastive_ops._cpu_sinkhorn_last_path()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,K", [(1, 1), (3, 1), (1, 7), (37, 50), (130, 3000), (517, 33)])
@pytest.mark.parametrize("iterations", [1, 2, 3, 7])
def test_cpu_scaling_form(dtype, B, K, iterations):
    """SwAV-like scores (unit features, ε = 0.05): the CPU forward takes the scaling form (E = exp(L − colmax)
    stored once, then one multiply-add pass per iteration) and matches the float64 log-domain solver."""
    scores = cosine_scores(B, K, dtype, seed=B + K)
    got, path = _cpu_sinkhorn(scores, 0.05, iterations)
    assert path == 1
    _close_to_log_answer(got, scores.float(), 0.05, iterations)


def _swav_ce_cext(device="cpu"):
    from contrastive_ops.backends import _cext

    ok, why = _cext.availability(device)
    if not ok:
        pytest.skip(f"{device} backend: {why}")
    return _cext.SWAV_CE


def _swav_ce_prims():
    """(name, primitive getter, device) of every fused swapped-prediction cross-entropy."""
    return [
        pytest.param(("cpu", _swav_ce_cext, "cpu"), id="cpu"),
        pytest.param(("cuda", lambda: _swav_ce_cext("cuda"), "cuda"), id="cuda"),
        pytest.param(("triton", lambda: _triton_prim() and backends.primitive("triton", "swav_ce"), DEV),
                     id="triton"),
    ]


@pytest.fixture(params=_swav_ce_prims())
def swav_ce(request):
    name, get, device = request.param
    return name, get(), torch.device(device)


@pytest.mark.parametrize("dtype", (torch.float64,) + LOW, ids=str)
@pytest.mark.parametrize("B,K", [(1, 1), (3, 17), (37, 3000), (130, 50)])
def test_swav_ce_matches_cross_entropy(swav_ce, dtype, B, K):
    """The fused swapped-prediction cross-entropy (value, dx, dscale) against F.cross_entropy with soft targets."""
    name, prim, device = swav_ce
    if name == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take fp32/fp16/bf16")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(B * K)
    x = (torch.randn(B, K, generator=g) * 3).to(dtype).to(device)
    t = (torch.softmax(torch.randn(B, K, generator=g, dtype=acc) * 2, 1) * 2).to(device)  # two crops: rows sum to 2
    scale = torch.tensor(10.0, dtype=acc, device=device)
    grad = torch.tensor(0.7, dtype=acc, device=device)
    with helpers.nan_filled_memory():
        out, lse = prim.forward(x, t, scale)
        dx, ds = prim.backward(x, t, scale, lse, grad)
    xx = x.detach().to(acc).requires_grad_()
    ss = scale.detach().clone().requires_grad_()
    ref = F.cross_entropy(xx * ss, t, reduction="sum")
    rdx, rds = torch.autograd.grad(ref * grad, (xx, ss))
    tol = TOL[acc]
    torch.testing.assert_close(out, ref.detach(), rtol=tol["rtol"], atol=tol["atol"] * B)
    torch.testing.assert_close(lse, torch.logsumexp(xx.detach() * scale, 1), **tol)
    assert dx.dtype == dtype and dx.shape == x.shape
    # the reference in the input dtype is the exact gradient rounded to it
    helpers.assert_close(dx, rdx, dtype, low=rdx.to(dtype), what="dx")
    torch.testing.assert_close(ds, rds, rtol=tol["rtol"], atol=tol["atol"] * B)


def test_cpu_swav_ce_gradcheck():
    """The C++ ops' own autograd formula (registered on swav_ce_fwd), in float64."""
    _swav_ce_cext()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), 1)
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, s: torch.ops.contrastive_ops.swav_ce_fwd(x, t, s)[0], (x, s))


def test_swav_loss_uses_the_fused_cross_entropy(swav_ce, monkeypatch):
    """swav_loss on a backend with the primitive runs it once per predicting crop, with the reference's
    value and gradients (crops and a tensor temperature)."""
    name, prim, device = swav_ce
    calls = []
    real = prim.forward
    monkeypatch.setattr(prim, "forward", lambda *a: calls.append(a) or real(*a))
    crops = [cosine_scores(9, 11, seed=s).to(device).requires_grad_() for s in range(3)]
    tau = torch.tensor(0.1, device=device, requires_grad=True)
    got = co.swav_loss(crops, tau, backend=name)
    assert len(calls) == 3
    ref_crops = [c.detach().clone().requires_grad_() for c in crops]
    ref_tau = tau.detach().clone().requires_grad_()
    ref = co.swav_loss(ref_crops, ref_tau, backend="reference")
    torch.testing.assert_close(got, ref, **TOL[torch.float32])
    for a, b in zip(torch.autograd.grad(got, crops + [tau]), torch.autograd.grad(ref, ref_crops + [ref_tau])):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize("case", ["low_row", "wide_spread"])
def test_cpu_falls_back_to_log_domain(case, iterations):
    """A sample whose best prototype is far below that prototype's best sample (|ΔS|/ε = 60 > 23) leaves the
    scaling form's range: the log-domain passes give the codes, still equal to the float64 answer."""
    g = torch.Generator().manual_seed(3)
    if case == "low_row":
        scores = torch.randn(64, 300, generator=g) * 0.1
        scores[5] -= 3.0
    else:
        scores = torch.randn(40, 70, generator=g) * 20.0
    got, path = _cpu_sinkhorn(scores, 0.05, iterations)
    assert path == 0
    _close_to_log_answer(got, scores, 0.05, iterations)


def test_primitive_strided_input(prim):
    base = torch.randn(40, 70).to(DEV)
    scores = base[3:37, 5:64]  # row stride 70, not K
    torch.testing.assert_close(prim.forward(scores, 0.1, 3), sinkhorn_reference(scores, 0.1, 3), rtol=1e-5, atol=1e-6)


def test_triton_codes_write_every_entry():
    """NaN-poisoned output: every entry must be written by the codes kernel."""
    _triton_prim()
    from contrastive_ops.backends._triton import sinkhorn as tk

    for B, K in [(1, 1), (33, 7), (70, 1025)]:
        scores = torch.randn(B, K, device=DEV)
        out = torch.full((B, K), float("nan"), device=DEV)
        got = tk.sinkhorn_forward(scores, 0.05, 2, out=out)
        assert got.data_ptr() == out.data_ptr()
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, sinkhorn_reference(scores, 0.05, 2), rtol=1e-5, atol=1e-6)


def test_triton_col_lse_partials_every_row_block():
    """Column LSE with more row blocks than row splits and ragged column blocks, every buffer NaN-poisoned:
    each (split, column) partial must fold all of its row blocks and be written exactly once."""
    _triton_prim()
    from contrastive_ops.backends._triton import sinkhorn as tk

    g = torch.Generator().manual_seed(3)
    for B, K in [(300, 150), (33, 1), (1, 70), (257, 65)]:
        scores = (torch.randn(B, K, generator=g, dtype=torch.float64) * 2).to(DEV)
        v = torch.randn(K, generator=g, dtype=torch.float64).to(DEV)
        L = scores / 0.05
        u = -torch.logsumexp(L + v[None, :], dim=1)
        for vv, uu in ((None, torch.zeros_like(u)), (v, u)):
            with helpers.nan_filled_memory():
                got = tk.sinkhorn_col_lse(scores.float(), 0.05, None if vv is None else vv.float())
            ref = torch.logsumexp(L + uu[:, None], dim=0)
            assert got.dtype == torch.float32 and got.shape == (K,)
            tol = 16 * float(L.abs().max() + 1) * 2.0 ** -24
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)


def test_triton_fake_and_opcheck():
    """The Triton Sinkhorn launches are custom ops with fake kernels, under opcheck like the sim_lse ops."""
    _triton_prim()
    from contrastive_ops.backends._triton import sinkhorn  # noqa: F401 - registers the ops

    ops = torch.ops.contrastive_ops_triton
    # Under the interpreter the kernels cannot run on fake tensors inside aot_dispatch (no data pointer,
    # see BUILD-NOTES): there the schema, autograd-registration and fake-kernel checks; all of them on a GPU.
    utils = None if DEV.type == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")

    def opcheck(op, args):
        if utils is None:
            torch.library.opcheck(op, args)
        else:
            torch.library.opcheck(op, args, test_utils=utils)

    scores = torch.randn(37, 23, device=DEV)
    v = torch.randn(23, device=DEV)
    opcheck(ops.sinkhorn_col_lse.default, (scores, 0.05, None))
    opcheck(ops.sinkhorn_col_lse.default, (scores.half(), 0.05, v))
    opcheck(ops.sinkhorn_codes.default, (scores, 0.05, v, True))
    opcheck(ops.sinkhorn_codes.default, (scores.bfloat16(), 0.05, v, False))
    out = torch.empty(37, 23, device=DEV)
    opcheck(ops.sinkhorn_codes_out.default, (scores, 0.05, v, True, out))
    with pytest.raises(ValueError, match="out must be"):
        ops.sinkhorn_codes_out(scores, 0.05, v, True, torch.empty(37, 24, device=DEV))


def test_cext_fake_and_opcheck():
    _cext_prim()
    scores = torch.randn(19, 23)
    torch.library.opcheck(torch.ops.contrastive_ops.sinkhorn.default, (scores, 0.05, 3))
    torch.library.opcheck(torch.ops.contrastive_ops.sinkhorn_col_lse.default, (scores, 0.05, None))
    torch.library.opcheck(torch.ops.contrastive_ops.sinkhorn_col_lse.default, (scores, 0.05, torch.randn(23)))
    torch.library.opcheck(torch.ops.contrastive_ops.sinkhorn_codes.default, (scores, 0.05, torch.randn(23), True))


@pytest.mark.parametrize("iterations", [0, 3])
def test_cext_compiles_fullgraph(iterations):
    """The ops trace through their fake kernels (the primitive alone and the step-wise composition)."""
    p = _cext_prim()
    scores = torch.randn(40, 30)
    ref = sinkhorn_reference(scores, 0.05, iterations)
    f = torch.compile(lambda x: p.forward(x, 0.05, iterations), fullgraph=True, backend="aot_eager")
    g = torch.compile(lambda x: sinkhorn_steps(p.col_lse, p.codes, x, 0.05, iterations), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(scores), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g(scores), ref, rtol=1e-4, atol=1e-5)


def test_cext_op_rejects_bad_input():
    _cext_prim()
    with pytest.raises(RuntimeError, match="2-D"):
        torch.ops.contrastive_ops.sinkhorn(torch.randn(3), 0.05, 3)
    with pytest.raises(RuntimeError, match="epsilon"):
        torch.ops.contrastive_ops.sinkhorn(torch.randn(3, 4), 0.0, 3)
    with pytest.raises(RuntimeError, match="iterations"):
        torch.ops.contrastive_ops.sinkhorn(torch.randn(3, 4), 0.05, -1)


# --------------------------------------------------------------------------- public functions on kernel backends


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_sinkhorn_knopp_backend(kernel_backend, dtype):
    scores = (torch.randn(45, 301) * 2).to(dtype).to(DEV).requires_grad_()
    got = co.sinkhorn_knopp(scores, 0.05, 3, backend=kernel_backend)
    assert not got.requires_grad
    ref = co.sinkhorn_knopp(scores.detach().float(), 0.05, 3, backend="reference")
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("n_crops,assign", [(2, (0, 1)), (4, (0, 1)), (3, (2, 0)), (5, (1, 3))])
def test_swav_loss_backend(kernel_backend, dtype, n_crops, assign):
    crops = [(torch.randn(29, 67) * 2).to(DEV).requires_grad_() for _ in range(n_crops)]

    def fn(*cs, backend, **kw):
        return co.swav_loss(list(cs), backend=backend, **kw)

    compare_with_reference(fn, crops, backend=kernel_backend, dtype=dtype, temperature=0.1,
                           crops_for_assign=assign, epsilon=0.05, iterations=3)


def test_swav_loss_backend_tensor_temperature(kernel_backend):
    crops = [torch.randn(16, 40, device=DEV, requires_grad=True) for _ in range(3)]
    grads = []
    for backend in (kernel_backend, "reference"):
        # a 0-dim temperature on the host next to crops on DEV, as PyTorch scalars go: the
        # library moves it (``_checks.as_scalar``), and its gradient comes back to it
        t = torch.tensor(0.2, requires_grad=True)
        loss = co.swav_loss(crops, t, backend=backend)
        gs = torch.autograd.grad(3.0 * loss, crops + [t])
        grads.append((loss.detach(), gs))
    torch.testing.assert_close(grads[0][0], grads[1][0], **TOL[torch.float32])
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


# --------------------------------------------------------------------------- swav_loss reference


@pytest.mark.parametrize("n_crops,assign", [(2, (0, 1)), (2, (1,)), (3, (0, 1)), (6, (0, 1)), (4, (3, 0))])
@pytest.mark.parametrize("iterations", [0, 3])
def test_swav_loss_reference_matches_loop(n_crops, assign, iterations):
    crops = [cosine_scores(13, 11, seed=s).requires_grad_() for s in range(n_crops)]
    got = co.swav_loss(crops, 0.1, crops_for_assign=assign, iterations=iterations, backend="reference")
    crops64 = [c.detach().double().requires_grad_() for c in crops]
    expected = swav_released_loss(crops64, 0.1, assign, 0.05, iterations)
    assert got.dim() == 0 and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(2.5 * got, crops, allow_unused=True, materialize_grads=True)
    e = torch.autograd.grad(2.5 * expected, crops64, allow_unused=True, materialize_grads=True)
    for a, b in zip(g, e):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_swav_loss_fused_composition_matches_reference():
    """The kernel-path composition (one cross-entropy per crop) against the literal loop, on the same codes."""
    from unittest import mock

    from contrastive_ops.losses import swav

    crops = [torch.randn(21, 9, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    with mock.patch.object(swav.backends, "resolve", lambda *a, **k: "fused"), \
            mock.patch.object(swav, "sinkhorn", lambda s, e, i, backend, process_group: sinkhorn_reference(s, e, i, process_group)):
        loss_k = co.swav_loss(crops, 0.1, crops_for_assign=(0, 2))
    loss_r = co.swav_loss(crops, 0.1, crops_for_assign=(0, 2), backend="reference")
    torch.testing.assert_close(loss_k, loss_r)
    gk = torch.autograd.grad(2.0 * loss_k, crops)
    gr = torch.autograd.grad(2.0 * loss_r, crops)
    for x, y in zip(gk, gr):
        torch.testing.assert_close(x, y)


def test_swav_loss_gradcheck():
    """Gradients w.r.t. the predicting-only crops and the temperature (the codes are constants: stop-grad)."""
    fixed = [torch.randn(5, 4, dtype=torch.float64) for _ in range(2)]
    free = [torch.randn(5, 4, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(
        lambda c2, c3, tau: co.swav_loss(fixed + [c2, c3], tau, crops_for_assign=(0, 1), backend="reference"),
        (*free, t))


def test_swav_loss_codes_are_stopped():
    """An assigning crop that predicts nothing gets no gradient: its codes are detached."""
    crops = [torch.randn(6, 5, requires_grad=True) for _ in range(3)]
    loss = co.swav_loss(crops, crops_for_assign=(2,), backend="reference")
    g = torch.autograd.grad(loss, crops, allow_unused=True)
    assert g[2] is None and g[0] is not None and g[1] is not None


def test_swav_loss_accepts_stacked_tensor():
    crops = torch.randn(3, 8, 5)
    a = co.swav_loss(crops, backend="reference")
    b = co.swav_loss(list(crops.unbind(0)), backend="reference")
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- peer: lightly


def test_lightly_sinkhorn():
    swav_loss_mod = pytest.importorskip("lightly.loss.swav_loss")
    for B, K, it, eps in [(1, 1, 3, 0.05), (7, 30, 1, 0.05), (64, 3000, 3, 0.05), (33, 10, 5, 0.1)]:
        scores = cosine_scores(B, K, seed=B + K)
        expected = swav_loss_mod.sinkhorn(scores.double(), iterations=it, epsilon=eps)  # lightly omits /K
        got = co.sinkhorn_knopp(scores, eps, it, backend="reference")
        torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)


def test_lightly_sinkhorn_queue_convention():
    """lightly appends a queue after the batch and keeps the first rows: the same as codes of the concatenation."""
    swav_loss_mod = pytest.importorskip("lightly.loss.swav_loss")
    batch, queue = cosine_scores(10, 20, seed=1), cosine_scores(30, 20, seed=2)
    expected = swav_loss_mod.sinkhorn(torch.cat([batch, queue]).double())[:10]
    got = co.sinkhorn_knopp(torch.cat([batch, queue]), backend="reference")[:10]
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("n_high,n_low", [(2, 0), (2, 4), (3, 1)])
def test_lightly_swav_loss(n_high, n_low):
    swav_loss_mod = pytest.importorskip("lightly.loss.swav_loss")
    crops = [cosine_scores(24, 50, seed=10 + s).requires_grad_() for s in range(n_high + n_low)]
    crops64 = [c.detach().double().requires_grad_() for c in crops]
    peer = swav_loss_mod.SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    expected = peer(crops64[:n_high], crops64[n_high:]).reshape(())
    got = co.swav_loss(crops, 0.1, crops_for_assign=tuple(range(n_high)), backend="reference")
    torch.testing.assert_close(got.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    g = torch.autograd.grad(got, crops)
    e = torch.autograd.grad(expected, crops64)
    for a, b in zip(g, e):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- modules, process group of one


def test_modules():
    crops = [torch.randn(6, 9) for _ in range(3)]
    m = co.nn.SwAVLoss(0.2, crops_for_assign=(1,), backend="reference")
    torch.testing.assert_close(m(crops), co.swav_loss(crops, 0.2, crops_for_assign=(1,), backend="reference"))
    s = co.nn.SinkhornKnopp(0.1, 2, backend="reference")
    torch.testing.assert_close(s(crops[0]), co.sinkhorn_knopp(crops[0], 0.1, 2, backend="reference"))


@pytest.fixture
def group_of_one(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("iterations", [0, 3])
def test_process_group_of_one(group_of_one, iterations):
    scores = torch.randn(23, 40) * 10
    ref = co.sinkhorn_knopp(scores, 0.05, iterations, backend="reference")
    got = co.sinkhorn_knopp(scores, 0.05, iterations, backend="reference", process_group=group_of_one)
    torch.testing.assert_close(got, ref)
    for name in PRIMS:
        try:
            p = PRIMS[name]()
        except pytest.skip.Exception:
            continue
        steps = sinkhorn_steps(p.col_lse, p.codes, scores, 0.05, iterations, group_of_one)
        torch.testing.assert_close(steps, ref, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- bad input


SK_BAD = [
    (lambda: torch.randn(5), {}, ValueError, "scores must be 2-D.*\\(5,\\)"),
    (lambda: torch.randn(2, 3, 4), {}, ValueError, "scores must be 2-D.*\\(2, 3, 4\\)"),
    (lambda: torch.randn(0, 4), {}, ValueError, "scores must be non-empty.*\\(0, 4\\)"),
    (lambda: torch.randn(4, 0), {}, ValueError, "scores.*\\(4, 0\\)"),
    (lambda: torch.ones(3, 4, dtype=torch.int64), {}, TypeError, "scores must be a floating-point"),
    (lambda: [[1.0, 2.0]], {}, TypeError, "scores must be a torch.Tensor"),
    (lambda: torch.randn(3, 4), dict(epsilon=0.0), ValueError, "epsilon must be"),
    (lambda: torch.randn(3, 4), dict(epsilon=-0.1), ValueError, "epsilon must be"),
    (lambda: torch.randn(3, 4), dict(epsilon=float("nan")), ValueError, "epsilon must be"),
    (lambda: torch.randn(3, 4), dict(epsilon="0.05"), ValueError, "epsilon must be"),
    (lambda: torch.randn(3, 4), dict(iterations=-1), ValueError, "iterations must be"),
    (lambda: torch.randn(3, 4), dict(iterations=2.0), ValueError, "iterations must be"),
    (lambda: torch.randn(3, 4), dict(iterations=True), ValueError, "iterations must be"),
    (lambda: torch.randn(3, 4), dict(backend="nope"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make,kw,exc,match", SK_BAD)
def test_sinkhorn_bad_input(make, kw, exc, match):
    kw = dict(kw)
    eps = kw.pop("epsilon", 0.05)
    it = kw.pop("iterations", 3)
    with pytest.raises(exc, match=match):
        co.sinkhorn_knopp(make(), eps, it, **kw)


def _crops(n=3, B=4, K=5, **kw):
    return [torch.randn(B, K, **kw) for _ in range(n)]


SWAV_BAD = [
    (lambda: _crops(1), {}, ValueError, "at least 2 crops, got 1"),
    (lambda: [], {}, ValueError, "at least 2 crops, got 0"),
    (lambda: torch.randn(4, 5), {}, ValueError, "scores must be a sequence.*\\(4, 5\\)"),
    (lambda: "abc", {}, ValueError, "scores must be a sequence"),
    (lambda: [torch.randn(4, 5), torch.randn(3, 5)], {}, ValueError, "same shape.*\\(4, 5\\).*\\(3, 5\\)"),
    (lambda: [torch.randn(4, 5), torch.randn(4, 6)], {}, ValueError, "same shape.*\\(4, 5\\).*\\(4, 6\\)"),
    (lambda: [torch.randn(4, 5), torch.randn(4, 5, 1)], {}, ValueError, "scores\\[1\\] must be 2-D.*\\(4, 5, 1\\)"),
    (lambda: [torch.randn(4, 5), torch.randn(4, 5, dtype=torch.float64)], {}, ValueError,
     "scores\\[1\\] has dtype torch.float64 but scores\\[0\\] has dtype torch.float32"),
    (lambda: [torch.randn(4, 5), torch.randn(4, 5, device="meta")], {}, ValueError, "scores\\[1\\] is on meta"),
    (lambda: [torch.randn(4, 5), torch.ones(4, 5, dtype=torch.int32)], {}, TypeError, "scores\\[1\\] must be a floating"),
    (lambda: [torch.randn(0, 5), torch.randn(0, 5)], {}, ValueError, "non-empty.*\\(0, 5\\)"),
    (lambda: _crops(), dict(temperature=0.0), ValueError, "temperature must be > 0"),
    (lambda: _crops(), dict(temperature=-1.0), ValueError, "temperature must be > 0"),
    (lambda: _crops(), dict(temperature=torch.tensor(-0.1)), ValueError, "temperature must be > 0"),
    (lambda: _crops(), dict(crops_for_assign=(0, 3)), ValueError, "crops_for_assign.*out of range for 3 crops"),
    (lambda: _crops(), dict(crops_for_assign=(-1,)), ValueError, "crops_for_assign.*out of range"),
    (lambda: _crops(), dict(crops_for_assign=()), ValueError, "crops_for_assign must name at least one"),
    (lambda: _crops(), dict(crops_for_assign=(0, 0)), ValueError, "crops_for_assign must not repeat"),
    (lambda: _crops(), dict(crops_for_assign=(0.0, 1)), ValueError, "crops_for_assign must hold ints"),
    (lambda: _crops(), dict(crops_for_assign=None), ValueError, "crops_for_assign must be a sequence"),
    (lambda: _crops(), dict(epsilon=0), ValueError, "epsilon must be"),
    (lambda: _crops(), dict(iterations=-2), ValueError, "iterations must be"),
    (lambda: _crops(), dict(iterations=1.5), ValueError, "iterations must be"),
    (lambda: _crops(), dict(backend="fast"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("make,kw,exc,match", SWAV_BAD)
def test_swav_loss_bad_input(make, kw, exc, match):
    with pytest.raises(exc, match=match):
        co.swav_loss(make(), **kw)


def _check_not_modified(name):
    crops = [torch.randn(12, 30, device=DEV, requires_grad=True) for _ in range(3)]
    before = [c.detach().clone() for c in crops]
    co.sinkhorn_knopp(crops[0], backend=name)
    co.swav_loss(crops, backend=name).backward()
    for c, b in zip(crops, before):
        assert torch.equal(c.detach(), b)


def test_inputs_not_modified_reference():
    _check_not_modified("reference")


def test_inputs_not_modified_kernel(kernel_backend):
    _check_not_modified(kernel_backend)
