"""pixcontrast_loss and the "pix_pos_lse" primitive: the reference against a float64 anchor-by-anchor
loop (values, gradients of the maps and of τ), the fused composition and the kernel backends against the
reference (fp32 and bf16, NaN-poisoned outputs, both negative sets), the backends that do not implement
the primitive, and bad input."""
import math

import pytest
import torch

import contrastive_ops as co
from contrastive_ops.backends._triton import tiles as ttiles
from contrastive_ops.losses import pixpro as px
from contrastive_ops.primitives import pix_pos
from helpers import DEVICE, backend_params, compare_with_reference, nan_filled_memory
from pix_cases import SHAPES, assert_positives, cpu_kernel_or_skip, crops, maps, pixels, positive

RATIO = 0.7
TAU = 0.3


def _loop(x1, x2, k1, k2, c1, c2, tau=TAU, negatives="image", ratio=RATIO):
    """ℓ per anchor (2·N·P,), counted flags, and the gradients of the mean over counted anchors with
    respect to x1, x2 and τ, from the formula, anchor by anchor in float64."""
    N, C, H, W = x1.shape
    P = H * W
    vals, counted = [], []
    grads = [torch.zeros(N, C, H, W, dtype=torch.float64) for _ in range(2)]
    dtau = 0.0
    raw = []
    for d, (y, k, cq, ck) in enumerate(((x1, k2, c1, c2), (x2, k1, c2, c1))):
        Y = y.detach().double().flatten(2).transpose(1, 2)
        yu, ku = pixels(y), pixels(k)
        for b in range(N):
            for i in range(P):
                cands = [(b, j) for j in range(P)]
                if negatives == "batch":
                    cands = [(c, j) for c in range(N) for j in range(P)]
                pos = [(c == b and positive(cq, ck, b, i, j, H, W, ratio)) for c, j in cands]
                s = [float(yu[b, i] @ ku[c, j]) / tau for c, j in cands]
                if not any(pos):
                    vals.append(0.0)
                    counted.append(False)
                    continue
                m = max(s)
                e = [math.exp(v - m) for v in s]
                z_all = sum(e)
                z_pos = sum(v for v, p in zip(e, pos) if p)
                vals.append(math.log(z_all) - math.log(z_pos))
                counted.append(True)
                dl_ds = [v / z_all - (v / z_pos if p else 0.0) for v, p in zip(e, pos)]
                raw.append((d, b, i, Y[b, i], yu[b, i], dl_ds, [ku[c, j] for c, j in cands], s))
    n = max(1, sum(counted))
    for d, b, i, yraw, u, dl_ds, keys, s in raw:
        gu = sum(g * kk for g, kk in zip(dl_ds, keys)) / tau / n
        grads[d][b, :, i // W, i % W] = (gu - (u @ gu) * u) / yraw.norm()
        dtau += sum(g * (-v / tau) for g, v in zip(dl_ds, s)) / n
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(counted), grads, dtau


@pytest.mark.parametrize("N,H,W", SHAPES)
@pytest.mark.parametrize("negatives", px.NEGATIVES)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused_dense_primitive"])
def test_against_loop_float64(N, H, W, negatives, fused):
    c1, c2 = crops(N, far=1, dtype=torch.float64)
    assert_positives(c1, c2, H, W, far=1)
    f = maps(N, H, W, dtype=torch.float64)
    tau = torch.tensor(TAU, dtype=torch.float64, requires_grad=True)
    vals, counted, grads, dtau = _loop(*f, c1, c2, negatives=negatives)
    assert counted.any() and not counted.all()  # pixels outside the other crop have no positive
    if fused:
        per, cnt = px._pixcontrast_fused(*f, c1, c2, 1 / tau, pos_ratio=RATIO, negatives=negatives,
                                         normalize=True, backend="reference")
        assert torch.equal(cnt, counted)
        loss = per.sum() / cnt.sum()
    else:
        per = co.pixcontrast_loss(*f, c1, c2, tau.detach(), negatives=negatives, reduction="none",
                                  backend="reference")
        loss = co.pixcontrast_loss(*f, c1, c2, tau, negatives=negatives, backend="reference")
    torch.testing.assert_close(per, vals, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, vals.sum() / counted.sum(), rtol=1e-12, atol=1e-12)
    loss.backward()
    for t, g in zip(f[:2], grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(tau.grad, torch.tensor(dtau, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert f[2].grad is None and f[3].grad is None  # momentum keys: stop-grad


def test_no_positive_anywhere_is_zero_in_graph():
    N, H, W = 2, 5, 5
    c1, c2 = crops(N, far=N)
    f = maps(N, H, W)
    for backend in ["reference"] + [p.values[0] for p in _kernel_backends() if not p.marks]:
        for t in f[:2]:
            t.grad = None
        loss = co.pixcontrast_loss(*f, c1, c2, backend=backend)
        assert float(loss.detach()) == 0.0 and loss.requires_grad
        loss.backward()
        assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in f[:2])


# ----------------------------------------------------------------------------- kernel backends


def _kernel_backends():
    """The kernel backends that implement "pix_pos_lse" (C++ on CPU, Triton)."""
    return [p for p in backend_params() if p.values[0] in ("cpu", "triton")]


@pytest.mark.parametrize("backend", backend_params())
def test_unimplemented_backends_raise(backend):
    N, H, W = SHAPES[0]
    c1, c2 = crops(N)
    f = [t.to(DEVICE) for t in maps(N, H, W, grad=False)]
    if "pix_pos_lse" in co.backends.backend_module(backend).PRIMITIVES:
        co.pixcontrast_loss(*f, c1.to(DEVICE), c2.to(DEVICE), backend=backend)
        return
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run pixcontrast_loss.*pix_pos_lse"):
        co.pixcontrast_loss(*f, c1.to(DEVICE), c2.to(DEVICE), backend=backend)


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("N,H,W", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("negatives", px.NEGATIVES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backend_matches_reference(backend, N, H, W, dtype, negatives, reduction, monkeypatch):
    if dtype not in co.backends.backend_module(backend).dtypes():
        pytest.skip(f"{backend} does not take {dtype}")
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)  # an output row left unwritten is NaN (Triton)
    c1, c2 = crops(N, seed=H * W, far=1)
    assert_positives(c1, c2, H, W, far=1)
    c1, c2 = c1.to(DEVICE), c2.to(DEVICE)
    f = [t.to(DEVICE).detach().requires_grad_(t.requires_grad) for t in maps(N, H, W)]

    def fn(p1, p2, k1, k2, *, backend):
        return co.pixcontrast_loss(p1, p2, k1, k2, c1, c2, TAU, negatives=negatives, reduction=reduction,
                                   backend=backend)

    with nan_filled_memory():  # torch.empty / at::empty outputs start as NaN (C++)
        compare_with_reference(fn, f, backend=backend, dtype=dtype, sharpness=1 / TAU, normalized=True)


@pytest.mark.parametrize("backend", _kernel_backends())
def test_temperature_gradient(backend, monkeypatch):
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    N, H, W = 3, 7, 7
    c1, c2 = crops(N, seed=4, far=1)
    f = maps(N, H, W)
    out = {}
    for b in ("reference", backend):
        tau = torch.tensor(0.2, requires_grad=True)
        loss = co.pixcontrast_loss(*[t.to(DEVICE) for t in f], c1.to(DEVICE), c2.to(DEVICE), tau,
                                   negatives="batch", backend=b)
        loss.backward()
        out[b] = (loss.detach(), tau.grad)
    torch.testing.assert_close(out[backend][0], out["reference"][0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out[backend][1], out["reference"][1], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("batch,offset,Bk", [(False, 0, 3), (True, 0, 3), (False, 2, 6), (True, 2, 6)])
def test_primitive_against_dense(backend, batch, offset, Bk, monkeypatch):
    """Both LSEs (the −inf of anchors without positive exactly), dq and dscale; candidates from a larger
    (gathered) batch with the anchors' images at an offset."""
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    N, H, W, D = 3, 5, 7, 24
    c1, c2 = crops(N, seed=11, far=1)
    dx, dy, dg = pix_pos.geometry(c1.to(DEVICE), c2.to(DEVICE), H, W)
    ratio = torch.tensor(RATIO, device=DEVICE)
    q = torch.randn(N, H * W, D, device=DEVICE, requires_grad=True)
    k = torch.randn(Bk, H * W, D, device=DEVICE)
    scale = torch.tensor(2.5, device=DEVICE, requires_grad=True)
    res = {}
    for b in ("reference", backend):
        with nan_filled_memory():
            lp, la = pix_pos.pix_pos_lse(q, k, scale, dx, dy, dg, ratio, H, W, batch_negatives=batch, offset=offset,
                                         backend=b)
            has = torch.isfinite(lp)
            gp, ga = torch.linspace(-1, 2, lp.numel()).reshape(lp.shape), torch.linspace(1, -0.5, la.numel())
            total = (torch.where(has, lp, 0) * gp.to(DEVICE)).sum() + (la * ga.reshape(la.shape).to(DEVICE)).sum()
            res[b] = (lp.detach(), la.detach(), *torch.autograd.grad(total, (q, scale)))
    r, kk = res["reference"], res[backend]
    assert torch.equal(torch.isinf(r[0]), torch.isinf(kk[0])) and torch.isinf(r[0]).any()
    torch.testing.assert_close(kk[0][torch.isfinite(r[0])], r[0][torch.isfinite(r[0])], rtol=2e-5, atol=2e-5)
    for a, b in zip(kk[1:], r[1:]):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5)


def test_primitive_refuses_keys_with_grad():
    N, H, W = 2, 5, 5
    c1, c2 = crops(N)
    dx, dy, dg = pix_pos.geometry(c1, c2, H, W)
    q = torch.randn(N, H * W, 8)
    with pytest.raises(ValueError, match="no gradient to k"):
        pix_pos.pix_pos_lse(q, q.clone().requires_grad_(), torch.tensor(1.0), dx, dy, dg, torch.tensor(0.7), H, W,
                            batch_negatives=False, backend="reference")


# ----------------------------------------------------------------------------- API


def test_reductions_and_module():
    N, H, W = 3, 5, 5
    c1, c2 = crops(N, far=1)
    f = maps(N, H, W, grad=False)
    per = co.pixcontrast_loss(*f, c1, c2, reduction="none", backend="reference")
    assert per.shape == (2 * N * H * W,)
    _, counted = px.pixcontrast_reference(*f, c1, c2, torch.tensor(1 / TAU))
    torch.testing.assert_close(co.pixcontrast_loss(*f, c1, c2, backend="reference"), per.sum() / counted.sum())
    torch.testing.assert_close(co.pixcontrast_loss(*f, c1, c2, reduction="sum", backend="reference"), per.sum())
    m = co.nn.PixContrastLoss(0.3, negatives="batch", backend="reference")
    torch.testing.assert_close(m(*f, c1, c2), co.pixcontrast_loss(*f, c1, c2, 0.3, negatives="batch",
                                                                  backend="reference"))
    assert "negatives='batch'" in repr(m)


def test_bad_input():
    N, H, W = 3, 5, 5
    c1, c2 = crops(N)
    f = maps(N, H, W, grad=False)
    with pytest.raises(ValueError, match="negatives must be one of"):
        co.pixcontrast_loss(*f, c1, c2, negatives="cloud")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        co.pixcontrast_loss(*f, c1, c2, 0.0)
    with pytest.raises(ValueError, match="proj_1_ng and proj_2_ng|proj_1 and proj_2_ng"):
        co.pixcontrast_loss(*f[:3], f[3][:, :5], c1, c2)
    with pytest.raises(ValueError, match=r"coord2 must be a floating-point tensor of shape \(3, 4\)"):
        co.pixcontrast_loss(*f, c1, c2[:2])
    with pytest.raises(ValueError, match="coord1 is on"):
        co.pixcontrast_loss(*f, c1.to("meta"), c2)


def test_cpu_ops_opcheck():
    """Schema, fake kernels and AOT dispatch of the C++ ops (the Triton ops' fake mode is a GPU matter)."""
    cpu_kernel_or_skip("pix_pos_lse")
    N, H, W = 3, 5, 7
    c1, c2 = crops(N, far=1)
    dx, dy, dg = pix_pos.geometry(c1, c2, H, W)
    q, k = torch.randn(N, H * W, 8), torch.randn(N + 2, H * W, 8)
    geo = (dx, dy, dg, torch.tensor(0.7), H, W)
    for batch, offset in ((False, 1), (True, 2)):
        args = (q, k, torch.tensor(2.0)) + geo + (batch, offset)
        utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
        torch.library.opcheck(torch.ops.contrastive_ops.pix_pos_lse_fwd.default, args, test_utils=utils)
        lp, la = torch.ops.contrastive_ops.pix_pos_lse_fwd(*args)
        torch.library.opcheck(torch.ops.contrastive_ops.pix_pos_lse_bwd.default,
                              args + (lp, la, torch.randn(N, H * W), torch.randn(N, H * W)), test_utils=utils)


def test_compile_fullgraph_cpu():
    cpu_kernel_or_skip("pix_pos_lse")
    N, H, W = 3, 5, 7
    c1, c2 = crops(N, far=1)
    f = maps(N, H, W)
    g = [t.detach().clone().requires_grad_(t.requires_grad) for t in f]
    fn = torch.compile(lambda *a: co.pixcontrast_loss(*a, negatives="batch", backend="cpu"), fullgraph=True)
    out = fn(*f, c1, c2)
    ref = co.pixcontrast_loss(*g, c1, c2, negatives="batch", backend="reference")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    (2 * out).backward()
    (2 * ref).backward()
    for a, b in zip(f[:2], g[:2]):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-4, atol=2e-6)
