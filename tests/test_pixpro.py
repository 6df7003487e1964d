"""pixpro_loss and the "pix_pos_sum" primitive: the reference against a float64 pair-by-pair loop and
against the released PixPro loss (transcribed in the library), the fused composition and the kernel backends
against the reference (values and gradients, fp32 and bf16, NaN-poisoned outputs), the backends that do
not implement the primitive, and bad input."""
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


# ----------------------------------------------------------------------------- oracles


def _loop(pred_1, pred_2, k1, k2, c1, c2, ratio=RATIO):
    """Per-image values ℓ_b (N,) and d ℓ_b / d pred (unnormalized) from the formula, pair by pair in float64."""
    N, C, H, W = pred_1.shape
    P = H * W
    vals = [0.0] * N
    grads = [torch.zeros(N, C, H, W, dtype=torch.float64) for _ in range(2)]
    for d, (y, k, cq, ck) in enumerate(((pred_1, k2, c1, c2), (pred_2, k1, c2, c1))):
        Y = y.detach().double().flatten(2).transpose(1, 2)  # raw, for the normalization's Jacobian
        yu, ku = pixels(y), pixels(k)
        for b in range(N):
            num, cnt = 0.0, 0
            Z = torch.zeros(P, C, dtype=torch.float64)
            for i in range(P):
                for j in range(P):
                    if positive(cq, ck, b, i, j, H, W, ratio):
                        num += float(yu[b, i] @ ku[b, j])
                        cnt += 1
                        Z[i] += ku[b, j]
            den = cnt + 1e-6
            vals[b] += -2 * num / den
            for i in range(P):
                # d/dy of ŷ·z = (z − (ŷ·z) ŷ) / ‖y‖
                u, z = yu[b, i], Z[i]
                g = -2 / den * (z - (u @ z) * u) / Y[b, i].norm()
                grads[d][b, :, i // W, i % W] = g
    return torch.tensor(vals, dtype=torch.float64), grads


# The released loss, transcribed in the library (``contrastive_ops.losses.pixpro``, commit noted there):
# zdaxie/PixPro, contrast/models/PixPro.py @ 6689c383d559f507b429fc73fb08388139916f2e.
released_pos_mask = px.released_pos_mask
_released = px.pixpro_released_loss


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("N,H,W", SHAPES)
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused_dense_primitive"])
def test_against_loop_float64(N, H, W, fused):
    c1, c2 = crops(N, far=1, dtype=torch.float64)
    f = maps(N, H, W, dtype=torch.float64)
    vals, grads = _loop(*f, c1, c2)
    assert (vals[:-1] != 0).all() and vals[-1] == 0  # positives exist, and an image without any gives 0
    if fused:  # the composition on the dense primitive (the kernels' contract, without a kernel)
        per = px._pixpro_fused(*f, c1, c2, pos_ratio=RATIO, normalize=True, backend="reference")
    else:
        per = co.pixpro_loss(*f, c1, c2, reduction="none", backend="reference")
    torch.testing.assert_close(per, vals, rtol=1e-12, atol=1e-12)
    per.sum().backward()
    for t, g in zip(f[:2], grads):
        torch.testing.assert_close(t.grad, g, rtol=1e-10, atol=1e-12)
    assert f[2].grad is None and f[3].grad is None  # momentum keys: stop-grad


@pytest.mark.parametrize("N,H,W", SHAPES)
@pytest.mark.parametrize("ratio", [0.7, 0.5, 1.3])
def test_equals_released_code_float64(N, H, W, ratio):
    c1, c2 = crops(N, seed=N + H, dtype=torch.float64)
    assert_positives(c1, c2, H, W)
    f = maps(N, H, W, dtype=torch.float64)
    ours = co.pixpro_loss(*f, c1, c2, pos_ratio=ratio, backend="reference")
    f2 = [t.detach().clone().requires_grad_(t.requires_grad) for t in f]
    theirs = _released(*f2, c1, c2, ratio)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ours.backward()
    theirs.backward()
    for a, b in zip(f[:2], f2[:2]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)


def test_mask_bit_identical_to_released_fp32():
    """The predicate built from the per-axis tables equals the released mask bit for bit in fp32 and
    float64 (the kernels evaluate the same tables with IEEE square root and division)."""
    for dtype in (torch.float32, torch.float64):
        for seed in range(20):
            N, H, W = 4, 7, 5
            c1, c2 = crops(N, seed=seed, dtype=dtype)
            dx, dy, dg = pix_pos.geometry(c1, c2, H, W)
            ours = pix_pos.pos_mask(dx, dy, dg, torch.tensor(0.7, dtype=dtype), H, W)
            assert torch.equal(ours, released_pos_mask(c1, c2, H, W, 0.7).bool())


# ----------------------------------------------------------------------------- kernel backends


@pytest.mark.parametrize("backend", backend_params())
def test_unimplemented_backends_raise(backend):
    N, H, W = SHAPES[0]
    c1, c2 = crops(N)
    f = [t.to(DEVICE) for t in maps(N, H, W, grad=False)]
    if "pix_pos_sum" in co.backends.backend_module(backend).PRIMITIVES:
        co.pixpro_loss(*f, c1.to(DEVICE), c2.to(DEVICE), backend=backend)
        return
    with pytest.raises(RuntimeError, match=f"backend '{backend}' cannot run pixpro_loss.*pix_pos_sum"):
        co.pixpro_loss(*f, c1.to(DEVICE), c2.to(DEVICE), backend=backend)


def _kernel_backends():
    """The kernel backends that implement "pix_pos_sum" (C++ on CPU, Triton)."""
    return [p for p in backend_params() if p.values[0] in ("cpu", "triton")]


def _skip_dtype(backend, dtype):
    if dtype not in co.backends.backend_module(backend).dtypes():
        pytest.skip(f"{backend} does not take {dtype}")


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("N,H,W", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backend_matches_reference(backend, N, H, W, dtype, reduction, monkeypatch):
    _skip_dtype(backend, dtype)
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)  # an output tile left unwritten is NaN (Triton)
    c1, c2 = crops(N, seed=H * W, far=1)
    assert_positives(c1, c2, H, W, far=1)
    c1, c2 = c1.to(DEVICE), c2.to(DEVICE)
    f = [t.to(DEVICE).detach().requires_grad_(t.requires_grad) for t in maps(N, H, W)]

    def fn(p1, p2, k1, k2, *, backend):
        return co.pixpro_loss(p1, p2, k1, k2, c1, c2, reduction=reduction, backend=backend)

    with nan_filled_memory():  # torch.empty / at::empty outputs start as NaN (C++)
        compare_with_reference(fn, f, backend=backend, dtype=dtype, normalized=True)


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("N,H,W", SHAPES)
@pytest.mark.parametrize("geo", [torch.float32, torch.float64], ids=["coord_fp32", "coord_fp64"])
def test_primitive_against_dense(backend, N, H, W, geo, monkeypatch):
    """Z and the counts equal the dense primitive (counts exactly: the predicate is bit-identical), and
    the backward (the same kernel on the transposed tables) equals the dense mask's transpose."""
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    c1, c2 = crops(N, seed=7, far=1, dtype=geo)
    assert_positives(c1, c2, H, W, far=1)
    dx, dy, dg = pix_pos.geometry(c1.to(DEVICE), c2.to(DEVICE), H, W)
    ratio = torch.tensor(RATIO, dtype=geo, device=DEVICE)
    x = torch.randn(N, H * W, 40, device=DEVICE, requires_grad=True)  # D = 40: one ragged 64-wide block
    with nan_filled_memory():
        Z, cnt = pix_pos.pix_pos_sum(x, dx, dy, dg, ratio, H, W, backend=backend)
    Zr, cr = pix_pos.pix_pos_sum(x, dx, dy, dg, ratio, H, W, backend="reference")
    assert torch.equal(cnt, cr)
    assert cr[-1].sum() == 0 and cr.sum() > 0
    torch.testing.assert_close(Z, Zr, rtol=2e-5, atol=2e-5)
    g = torch.randn_like(Zr)
    with nan_filled_memory():
        gk, = torch.autograd.grad(Z, x, g)
    gr, = torch.autograd.grad(Zr, x, g)
    torch.testing.assert_close(gk, gr, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", _kernel_backends())
def test_wide_features_several_d_chunks(backend, monkeypatch):
    """C = 300 > the 128-wide D chunk of the kernel: three chunks, the last one ragged."""
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    N, H, W = 2, 5, 5
    c1, c2 = crops(N, seed=3)
    g = torch.Generator().manual_seed(5)
    f = [torch.randn(N, 300, H, W, generator=g, device="cpu").to(DEVICE).requires_grad_(i < 2) for i in range(4)]
    with nan_filled_memory():
        out = co.pixpro_loss(*f, c1.to(DEVICE), c2.to(DEVICE), reduction="none", backend=backend)
    ref = co.pixpro_loss(*f, c1.to(DEVICE), c2.to(DEVICE), reduction="none", backend="reference")
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-5)


# ----------------------------------------------------------------------------- API


def test_reductions_and_module():
    N, H, W = 3, 5, 5
    c1, c2 = crops(N, far=1)
    f = maps(N, H, W, grad=False)
    per = co.pixpro_loss(*f, c1, c2, reduction="none", backend="reference")
    assert per.shape == (N,)
    torch.testing.assert_close(co.pixpro_loss(*f, c1, c2, backend="reference"), per.mean())
    torch.testing.assert_close(co.pixpro_loss(*f, c1, c2, reduction="sum", backend="reference"), per.sum())
    m = co.nn.PixProLoss(pos_ratio=0.7, backend="reference")
    torch.testing.assert_close(m(*f, c1, c2), per.mean())
    assert "pos_ratio=0.7" in repr(m)
    # normalize=False on already normalized maps is the same loss
    fn = [torch.nn.functional.normalize(t, dim=1) for t in f]
    torch.testing.assert_close(co.pixpro_loss(*fn, c1, c2, normalize=False, backend="reference"), per.mean())


def test_inputs_not_modified_and_bf16_returns_fp32():
    N, H, W = 2, 5, 5
    c1, c2 = crops(N)
    f = [t.to(torch.bfloat16) for t in maps(N, H, W, grad=False)]
    before = [t.clone() for t in f]
    out = co.pixpro_loss(*f, c1, c2, backend="reference")
    assert out.dtype == torch.float32
    for a, b in zip(f, before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad,match", [
    (lambda f, c: (f[0][0], *f[1:], *c), "pred_1 must be 4-D"),
    (lambda f, c: (f[0], f[1][:, :, :4], *f[2:], *c), r"pred_1 and pred_2 must have the same shape"),
    (lambda f, c: (*f[:3], f[3].double(), *c), "proj_2_ng has dtype"),
    (lambda f, c: (*f, c[0][:, :3], c[1]), r"coord1 must be a floating-point tensor of shape \(3, 4\)"),
    (lambda f, c: (*f, c[0], c[1].long()), "coord2 must be a floating-point tensor"),
    (lambda f, c: (*f, c[0], c[1].double()), "coord1 and coord2 must have one dtype"),
])
def test_bad_input(bad, match):
    N, H, W = 3, 5, 5
    c = crops(N)
    f = maps(N, H, W, grad=False)
    with pytest.raises(ValueError, match=match):
        co.pixpro_loss(*bad(f, c), backend="reference")


def test_bad_options():
    N, H, W = 3, 5, 5
    c1, c2 = crops(N)
    f = maps(N, H, W, grad=False)
    with pytest.raises(ValueError, match="pos_ratio must be a finite float > 0"):
        co.pixpro_loss(*f, c1, c2, pos_ratio=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        co.pixpro_loss(*f, c1, c2, reduction="avg")
    with pytest.raises(ValueError, match="backend must be one of"):
        co.pixpro_loss(*f, c1, c2, backend="gpu")
    with pytest.raises(TypeError, match="pred_1 must be a floating-point tensor"):
        co.pixpro_loss(f[0].long(), *f[1:], c1, c2)


@pytest.mark.parametrize("backend", _kernel_backends())
def test_fused_path_never_builds_the_dense_mask(backend, monkeypatch):
    """The fused path never builds the (N, HW, HW) mask: the dense builder is made to fail."""
    def boom(*a, **k):
        raise AssertionError("dense mask built")

    monkeypatch.setattr(pix_pos, "pos_mask", boom)
    monkeypatch.setattr(px, "pos_mask", boom)
    N, H, W = 2, 5, 5
    c1, c2 = crops(N)
    f = [t.to(DEVICE).detach().requires_grad_(t.requires_grad) for t in maps(N, H, W)]
    out = co.pixpro_loss(*f, c1.to(DEVICE), c2.to(DEVICE), backend=backend)
    out.backward()
    assert math.isfinite(float(out.detach()))


def test_cpu_op_opcheck():
    """Schema, fake kernel and AOT dispatch of the C++ op (the Triton ops' fake mode is a GPU matter)."""
    cpu_kernel_or_skip("pix_pos_sum")
    N, H, W = 3, 5, 7
    c1, c2 = crops(N, far=1)
    dx, dy, dg = pix_pos.geometry(c1, c2, H, W)
    for x in (torch.randn(N, H * W, 8), torch.randn(N, H * W, 8, dtype=torch.bfloat16)):
        torch.library.opcheck(torch.ops.contrastive_ops.pix_pos_sum.default, (x, dx, dy, dg, torch.tensor(0.7), H, W),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_cpu():
    cpu_kernel_or_skip("pix_pos_sum")
    N, H, W = 3, 5, 7
    c1, c2 = crops(N, far=1)
    f = maps(N, H, W)
    g = [t.detach().clone().requires_grad_(t.requires_grad) for t in f]
    fn = torch.compile(lambda *a: co.pixpro_loss(*a, backend="cpu"), fullgraph=True)
    out = fn(*f, c1, c2)
    ref = co.pixpro_loss(*g, c1, c2, backend="reference")
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)
    (2 * out).backward()
    (2 * ref).backward()
    for a, b in zip(f[:2], g[:2]):
        torch.testing.assert_close(a.grad, b.grad, rtol=2e-4, atol=2e-6)
