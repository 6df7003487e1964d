"""siglip_loss: reference, open_clip peer, the "siglip" primitive interface, kernels, bad input."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses.siglip import _fused_siglip_loss, siglip_loss_reference
from contrastive_ops.primitives.siglip_pairs import siglip_pairs_reference

from helpers import DEVICE, assert_close, backend_params, compare_with_reference, serve_dense_primitive

F64 = torch.float64


def _t(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _s(v, dtype=F64):
    return torch.tensor(v, dtype=dtype, requires_grad=True)


def _clones(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("B", [1, 2, 5])
def test_siglip_reference_gradcheck(B):
    args = (_t(B, 3), _t(B, 3), _s(1.7), _s(-0.8))
    assert torch.autograd.gradcheck(lambda x, y, s, b: co.siglip_loss(x, y, s, b, backend="reference"), args)


def test_siglip_pairs_reference_gradcheck():
    args = (_t(4, 3), _t(4, 3), _s(1.2), _s(0.3))
    assert torch.autograd.gradcheck(siglip_pairs_reference, args)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B", [1, 9])
def test_siglip_matches_open_clip(B, dtype):
    from open_clip.loss import SigLipLoss

    x0 = F.normalize(torch.randn(B, 6, dtype=dtype), dim=1).requires_grad_(True)
    y0 = F.normalize(torch.randn(B, 6, dtype=dtype), dim=1).requires_grad_(True)
    s0, b0 = _s(10.0, dtype), _s(-10.0, dtype)
    x1, y1, s1, b1 = _clones(x0, y0, s0, b0)
    out = co.siglip_loss(x0, y0, s0, b0, backend="reference")
    exp = SigLipLoss()(x1, y1, s1, b1)
    assert out.dtype == dtype and out.shape == ()
    assert_close(out, exp.detach(), dtype, what="loss")
    g0 = torch.autograd.grad(out * 2.5, (x0, y0, s0, b0))
    g1 = torch.autograd.grad(exp * 2.5, (x1, y1, s1, b1))
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert_close(a, b, dtype, what=f"grad {i}")


def test_siglip_float_scalars_and_loop():
    """Python-float scale/bias, against a loop over pairs: divided by B, not B²."""
    B = 4
    x, y = torch.randn(B, 3, dtype=F64), torch.randn(B, 3, dtype=F64)
    out = co.siglip_loss(x, y, 3.0, -2.0, backend="reference")
    total = 0.0
    for i, j in itertools.product(range(B), range(B)):
        z = 1.0 if i == j else -1.0
        total += -torch.log(torch.sigmoid(z * (3.0 * (x[i] @ y[j]) - 2.0)))
    torch.testing.assert_close(out, total / B)


def test_siglip_sum_is_b_times_loss():
    x, y = torch.randn(7, 5, dtype=F64), torch.randn(7, 5, dtype=F64)
    s, b = torch.tensor(4.0, dtype=F64), torch.tensor(-3.0, dtype=F64)
    torch.testing.assert_close(siglip_pairs_reference(x, y, s, b), 7 * siglip_loss_reference(x, y, s, b))


def test_siglip_fp16_inputs_return_fp32():
    x, y = torch.randn(5, 4).half(), torch.randn(5, 4).half()
    out = co.siglip_loss(x, y, 2.0, -1.0, backend="reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, co.siglip_loss(x.float(), y.float(), 2.0, -1.0, backend="reference"))


@pytest.mark.parametrize("B", [1, 13])
def test_fused_siglip_on_dense_primitive_maths(B):
    x0, y0, s0, b0 = _t(B, 5), _t(B, 5), _s(5.0), _s(-2.0)
    x1, y1, s1, b1 = _clones(x0, y0, s0, b0)
    out = _fused_siglip_loss(x0, y0, s0, b0, backend="reference")
    ref = siglip_loss_reference(x1, y1, s1, b1)
    assert_close(out, ref.detach(), F64, what="loss")
    for a, b in zip(torch.autograd.grad(out * -1.3, (x0, y0, s0, b0)), torch.autograd.grad(ref * -1.3, (x1, y1, s1, b1))):
        assert_close(a, b, F64, what="grad")


class _DenseSigLIP:
    """A "siglip" primitive with the kernel interface, computed densely (tests SigLIPPairsFunction)."""

    def __init__(self):
        self.calls = []

    def forward(self, x, y, scale, bias):
        self.calls.append(("forward", x.dtype, scale.dtype, scale.shape, bias.shape, x.is_contiguous()))
        with torch.no_grad():
            return siglip_pairs_reference(x, y, scale, bias)

    def backward(self, x, y, scale, bias, grad):
        self.calls.append(("backward", grad.dtype, grad.shape, float(grad)))
        with torch.enable_grad():
            xs, ys, ss, bs = (t.detach().requires_grad_(True) for t in (x, y, scale, bias))
            dx, dy, ds, db = torch.autograd.grad(siglip_pairs_reference(xs, ys, ss, bs), (xs, ys, ss, bs), grad)
        return dx.to(x.dtype), dy.to(y.dtype), ds, db


@pytest.fixture
def dense_siglip(monkeypatch):
    return serve_dense_primitive(monkeypatch, _DenseSigLIP())


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16], ids=str)
def test_siglip_through_kernel_interface(dense_siglip, dtype):
    B = 6
    x0 = torch.randn(B, 4, dtype=F64)
    y0 = torch.randn(4, B, dtype=F64).T  # non-contiguous: the Function hands the primitive contiguous rows
    x0, y0 = x0.to(dtype).requires_grad_(True), y0.to(dtype).requires_grad_(True)
    s0, b0 = _s(3.0), _s(-1.5)
    acc = F64 if dtype == F64 else torch.float32
    x1, y1 = (t.detach().to(acc).requires_grad_(True) for t in (x0, y0))
    s1, b1 = _clones(s0, b0)
    out = _fused_siglip_loss(x0, y0, s0, b0, backend="dense")
    ref = siglip_loss_reference(x1, y1, s1, b1)
    assert out.dtype == acc and out.shape == ()
    assert_close(out, ref.detach(), acc, what="loss")
    go = 2.5
    g0 = torch.autograd.grad(out * go, (x0, y0, s0, b0))
    g1 = torch.autograd.grad(ref * go, (x1, y1, s1, b1))
    assert g0[0].dtype == dtype and g0[1].dtype == dtype
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert_close(a.to(b.dtype), b, acc if dtype != torch.float16 else torch.float16, what=f"grad {i}")
    fwd, bwd = dense_siglip.calls
    assert fwd == ("forward", dtype, acc, torch.Size([]), torch.Size([]), True)
    assert bwd[:3] == ("backward", acc, torch.Size([])) and bwd[3] == pytest.approx(go / B)


def test_siglip_through_kernel_interface_float_scalars(dense_siglip):
    x, y = _t(5, 3), _t(5, 3)
    out = _fused_siglip_loss(x, y, 2.0, 0.5, backend="dense")
    torch.testing.assert_close(out, siglip_loss_reference(x, y, 2.0, 0.5))
    out.backward()
    assert x.grad is not None and y.grad is not None


# ----------------------------------------------------------------------------- kernel backends vs reference


def _as_backend(*args, backend, **kw):
    if backend == "dense":
        return _fused_siglip_loss(*args, backend="reference", **kw)
    return co.siglip_loss(*args, backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,D", list(itertools.product([1, 37, 130], [8, 33, 64])))
@pytest.mark.parametrize("backend", backend_params() + [pytest.param("dense", id="dense-core")])
def test_siglip_backend_vs_reference(backend, B, D, dtype):
    x = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).requires_grad_(True)
    y = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).requires_grad_(True)
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    b = torch.tensor(-10.0, device=DEVICE, requires_grad=True)
    compare_with_reference(_as_backend, (x, y, s, b), backend=backend, dtype=dtype)


# ----------------------------------------------------------------------------- bad input


def _xy(B=4, D=3):
    return torch.randn(B, D), torch.randn(B, D)


def _raises(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        co.siglip_loss(*args, **kw)


def test_bad_rank():
    x, y = _xy()
    _raises(ValueError, r"image_features must be 2-D, got shape \(4, 3, 1\)", x[..., None], y, 1.0, 0.0)
    _raises(ValueError, r"text_features must be 2-D, got shape \(3,\)", x, y[0], 1.0, 0.0)


def test_bad_shapes():
    x, _ = _xy()
    _raises(ValueError, r"image_features and text_features must have the same shape, got \(4, 3\) and \(5, 3\)", x,
            torch.randn(5, 3), 1.0, 0.0)
    _raises(ValueError, r"same shape, got \(4, 3\) and \(4, 2\)", x, torch.randn(4, 2), 1.0, 0.0)


def test_bad_dtype_and_device():
    x, y = _xy()
    _raises(ValueError, r"text_features has dtype torch.float16 but image_features has dtype torch.float32", x,
            y.half(), 1.0, 0.0)
    _raises(ValueError, "text_features is on meta but image_features is on cpu", x, y.to("meta"), 1.0, 0.0)


def test_integer_features():
    x, y = _xy()
    _raises(TypeError, "image_features must be a floating-point tensor, got dtype torch.int64", x.long(), y, 1.0, 0.0)


def test_empty_batch():
    _raises(ValueError, r"image_features must be non-empty, got shape \(0, 3\)", torch.randn(0, 3), torch.randn(0, 3),
            1.0, 0.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, torch.tensor(0.0), torch.tensor(-2.0)], ids=["0", "-1", "t0", "t-2"])
def test_nonpositive_logit_scale(bad):
    _raises(ValueError, "logit_scale must be > 0", *_xy(), bad, 0.0)


def test_bad_scalars():
    _raises(ValueError, r"logit_bias must be a float or a 0-dim tensor, got shape \(2,\)", *_xy(), 1.0,
            torch.zeros(2))
    _raises(ValueError, "logit_bias must be a float or a 0-dim tensor, got str", *_xy(), 1.0, "0")
    _raises(ValueError, "logit_bias must be finite", *_xy(), 1.0, float("nan"))


def test_unknown_backend():
    _raises(ValueError, "backend must be one of", *_xy(), 1.0, 0.0, backend="fast")


def test_process_group_without_distributed():
    _raises(RuntimeError, "torch.distributed is not initialized", *_xy(), 1.0, 0.0, process_group=object())


@pytest.mark.parametrize("path", ["public-reference", "dense-primitive-maths"])
def test_inputs_not_modified(path):
    x, y = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    s, b = torch.tensor(3.0, requires_grad=True), torch.tensor(-1.0, requires_grad=True)
    inputs = [x, y, s, b]
    before = [t.detach().clone() for t in inputs]
    versions = [t._version for t in inputs]
    if path == "public-reference":
        out = co.siglip_loss(x, y, s, b, backend="reference")
    else:
        out = _fused_siglip_loss(x, y, s, b, backend="reference")
    out.backward()
    for t, bef, v in zip(inputs, before, versions):
        assert torch.equal(t.detach(), bef)
        assert t._version == v
