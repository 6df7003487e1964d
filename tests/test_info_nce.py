"""info_nce, clip_loss, nt_xent, similarity_lse: references, compositions, peers, kernels, bad input."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.primitives.sim_lse import DenseSimLSE
from contrastive_ops.losses.info_nce import (
    _fused_clip_loss,
    _fused_info_nce,
    _fused_nt_xent,
    _fused_similarity_lse,
    clip_loss_reference,
    info_nce_reference,
    nt_xent_reference,
    similarity_lse_reference,
)

from helpers import DEVICE, assert_close, backend_params, compare_with_reference, serve_dense_primitive

F64 = torch.float64
REDUCTIONS = ("mean", "sum", "none")


def _t(*shape, dtype=F64, grad=True, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def _tau(value, dtype=F64):
    return torch.tensor(value, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------- gradcheck of the references

# (B, M, variant): "plain" (targets = arange), "targets" (M > B, random targets), "symmetric".
INFO_CASES = [(1, 1, "plain"), (4, 6, "plain"), (5, 7, "targets"), (4, 4, "symmetric")]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("B,M,variant", INFO_CASES)
def test_info_nce_reference_gradcheck(B, M, variant, normalize, reduction):
    q, k, tau = _t(B, 3), _t(M, 3), _tau(0.7)
    targets = torch.randint(0, M, (B,)) if variant == "targets" else None
    sym = variant == "symmetric"

    def f(q, k, tau):
        return co.info_nce(q, k, tau, targets=targets, symmetric=sym, normalize=normalize, reduction=reduction,
                           backend="reference")

    assert torch.autograd.gradcheck(f, (q, k, tau))


def test_clip_loss_reference_gradcheck():
    x, y, s = _t(5, 4), _t(5, 4), _tau(1.3)
    assert torch.autograd.gradcheck(lambda x, y, s: co.clip_loss(x, y, s, backend="reference"), (x, y, s))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("N", [1, 4])
def test_nt_xent_reference_gradcheck(N, normalize, reduction):
    a, b, tau = _t(N, 3), _t(N, 3), _tau(0.6)

    def f(a, b, tau):
        return co.nt_xent(a, b, tau, normalize=normalize, reduction=reduction, backend="reference")

    assert torch.autograd.gradcheck(f, (a, b, tau))


def test_similarity_lse_reference_gradcheck():
    q, k, s = _t(4, 3), _t(6, 3), _tau(0.8)
    assert torch.autograd.gradcheck(lambda q, k, s: co.similarity_lse(q, k, s, backend="reference"), (q, k, s))


# ----------------------------------------------------------------------------- independent formulas and peers


def _grads(loss, inputs, w=None):
    if w is not None:
        loss = (loss * w).sum()
    return torch.autograd.grad(loss, inputs)


def _clones(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("variant", ["plain", "targets", "symmetric"])
def test_info_nce_matches_cross_entropy(variant, dtype, reduction):
    B, M, D = 9, (13 if variant == "targets" else 9), 6
    q0, k0, tau0 = _t(B, D, dtype=dtype), _t(M, D, dtype=dtype), _tau(0.1, dtype)
    targets = torch.randint(0, M, (B,)) if variant == "targets" else None
    sym = variant == "symmetric"
    q1, k1, tau1 = _clones(q0, k0, tau0)
    out = co.info_nce(q0, k0, tau0, targets=targets, symmetric=sym, reduction=reduction, backend="reference")
    logits = F.normalize(q1, dim=1) @ F.normalize(k1, dim=1).T / tau1
    t = torch.arange(B) if targets is None else targets
    if sym:
        exp = 0.5 * (F.cross_entropy(logits, t, reduction="none") + F.cross_entropy(logits.T, t, reduction="none"))
        exp = {"mean": exp.mean(), "sum": exp.sum(), "none": exp}[reduction]
    else:
        exp = F.cross_entropy(logits, t, reduction=reduction)
    assert out.dtype == dtype and out.shape == exp.shape
    assert_close(out, exp.detach(), dtype, what="loss")
    w = torch.randn_like(exp) if reduction == "none" else torch.tensor(2.5, dtype=dtype)
    for a, b in zip(_grads(out, (q0, k0, tau0), w.to(out.dtype)), _grads(exp, (q1, k1, tau1), w)):
        assert_close(a, b, dtype, what="grad")


def test_info_nce_fp16_inputs_return_fp32():
    q, k = torch.randn(6, 8).half(), torch.randn(6, 8).half()
    out = co.info_nce(q, k, reduction="none", backend="reference")
    assert out.dtype == torch.float32
    exp = F.cross_entropy(F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T / 0.07,
                          torch.arange(6), reduction="none")
    torch.testing.assert_close(out, exp)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("B", [1, 7])
def test_clip_loss_matches_open_clip(B, dtype):
    from open_clip.loss import ClipLoss

    x0, y0, s0 = _t(B, 5, dtype=dtype), _t(B, 5, dtype=dtype), _tau(4.2, dtype)
    x1, y1, s1 = _clones(x0, y0, s0)
    out = co.clip_loss(x0, y0, s0, backend="reference")
    exp = ClipLoss()(x1, y1, s1)
    assert out.dtype == dtype and out.shape == ()
    assert_close(out, exp.detach(), dtype, what="loss")
    for a, b in zip(_grads(out * 3.0, (x0, y0, s0)), _grads(exp * 3.0, (x1, y1, s1))):
        assert_close(a, b, dtype, what="grad")


def test_clip_loss_equals_symmetric_unnormalized_info_nce():
    x, y = torch.randn(8, 4, dtype=F64), torch.randn(8, 4, dtype=F64)
    a = co.clip_loss(x, y, 5.0, backend="reference")
    b = co.info_nce(x, y, 0.2, symmetric=True, normalize=False, backend="reference")
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("N", [1, 2, 9])
def test_nt_xent_matches_lightly(N, dtype):
    from lightly.loss import NTXentLoss

    a0, b0 = _t(N, 6, dtype=dtype), _t(N, 6, dtype=dtype)
    a1, b1 = _clones(a0, b0)
    out = co.nt_xent(a0, b0, 0.3, backend="reference")
    exp = NTXentLoss(temperature=0.3, memory_bank_size=0)(a1, b1)
    assert out.dtype == dtype and out.shape == ()
    assert_close(out, exp.detach(), dtype, what="loss")
    for g, h in zip(_grads(out * 1.7, (a0, b0)), _grads(exp * 1.7, (a1, b1))):
        assert_close(g, h, dtype, what="grad")


def test_nt_xent_none_order_and_loop():
    """Per-anchor values: view-1 anchors then view-2, each against all 2N−1 others."""
    N, tau = 4, 0.4
    a, b = torch.randn(N, 3, dtype=F64), torch.randn(N, 3, dtype=F64)
    out = co.nt_xent(a, b, tau, reduction="none", backend="reference")
    Z = F.normalize(torch.cat([a, b]), dim=1)
    exp = []
    for i in range(2 * N):
        others = [j for j in range(2 * N) if j != i]
        logits = torch.stack([Z[i] @ Z[j] / tau for j in others])
        p = others.index((i + N) % (2 * N))
        exp.append(-torch.log_softmax(logits, 0)[p])
    torch.testing.assert_close(out, torch.stack(exp))


def test_similarity_lse_matches_log_sum_exp_loop():
    q, k = torch.randn(5, 3, dtype=F64), torch.randn(7, 3, dtype=F64)
    out = co.similarity_lse(q, k, 1.5, backend="reference")
    exp = torch.stack([torch.log(sum(torch.exp(1.5 * (q[i] @ k[j])) for j in range(7))) for i in range(5)])
    torch.testing.assert_close(out, exp)
    assert co.similarity_lse(q.float(), k.float(), 1.5, backend="reference").dtype == torch.float32


def test_tensor_temperature_receives_gradient():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    tau = torch.tensor(0.2, requires_grad=True)
    co.info_nce(q, k, tau, backend="reference").backward()
    assert tau.grad is not None and torch.isfinite(tau.grad) and tau.grad != 0


# ----------------------------------------------------------------------------- compositions on the dense core


def _compare(fused_out, ref_out, inputs_f, inputs_r, dtype=F64):
    assert fused_out.dtype == ref_out.dtype and fused_out.shape == ref_out.shape
    assert_close(fused_out, ref_out.detach(), dtype, what="loss")
    w = torch.randn_like(ref_out) if ref_out.dim() else torch.tensor(-1.7, dtype=ref_out.dtype)
    gf = _grads(fused_out, inputs_f, w)
    gr = _grads(ref_out, inputs_r, w)
    for i, (a, b) in enumerate(zip(gf, gr)):
        assert_close(a, b, dtype, what=f"grad {i}")


COMPOSITION_CASES = [
    (1, 1, "plain"), (13, 13, "plain"), (13, 21, "plain"), (13, 21, "targets"), (1, 5, "targets"),
    (13, 13, "symmetric"), (1, 1, "symmetric"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("B,M,variant", COMPOSITION_CASES)
def test_fused_info_nce_on_dense_core(B, M, variant, normalize, reduction):
    q0, k0, tau0 = _t(B, 5), _t(M, 5), _tau(0.3)
    q1, k1, tau1 = _clones(q0, k0, tau0)
    kw = dict(targets=torch.randint(0, M, (B,)) if variant == "targets" else None,
              symmetric=variant == "symmetric", normalize=normalize, reduction=reduction)
    out = _fused_info_nce(q0, k0, tau0, backend="reference", **kw)
    ref = info_nce_reference(q1, k1, tau1, **kw)
    _compare(out, ref, (q0, k0, tau0), (q1, k1, tau1))


@pytest.mark.parametrize("B", [1, 11])
def test_fused_clip_loss_on_dense_core(B):
    x0, y0, s0 = _t(B, 6), _t(B, 6), _tau(3.0)
    x1, y1, s1 = _clones(x0, y0, s0)
    _compare(_fused_clip_loss(x0, y0, s0, backend="reference"), clip_loss_reference(x1, y1, s1),
             (x0, y0, s0), (x1, y1, s1))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("N", [1, 2, 11])
def test_fused_nt_xent_on_dense_core(N, normalize, reduction):
    a0, b0, tau0 = _t(N, 5), _t(N, 5), _tau(0.5)
    a1, b1, tau1 = _clones(a0, b0, tau0)
    kw = dict(normalize=normalize, reduction=reduction)
    _compare(_fused_nt_xent(a0, b0, tau0, backend="reference", **kw), nt_xent_reference(a1, b1, tau1, **kw),
             (a0, b0, tau0), (a1, b1, tau1))


@pytest.mark.parametrize("B,M", [(1, 1), (9, 4), (4, 17)])
def test_fused_similarity_lse_on_dense_core(B, M):
    q0, k0, s0 = _t(B, 3), _t(M, 3), _tau(2.0)
    q1, k1, s1 = _clones(q0, k0, s0)
    _compare(_fused_similarity_lse(q0, k0, s0, backend="reference"), similarity_lse_reference(q1, k1, s1),
             (q0, k0, s0), (q1, k1, s1))


class _DenseSimLSE(DenseSimLSE):
    """The dense "sim_lse" primitive with the kernel interface, recording its calls (tests the autograd plumbing)."""

    def __init__(self):
        self.calls = []

    def forward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
        self.calls.append(("forward", q.dtype, scale.dtype, exclude is not None, want_col))
        return super().forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max)

    def backward(self, *args, **kwargs):
        self.calls.append(("backward",))
        return super().backward(*args, **kwargs)


@pytest.fixture
def dense_sim_lse(monkeypatch):
    return serve_dense_primitive(monkeypatch, _DenseSimLSE())


@pytest.mark.parametrize("variant", ["plain", "targets", "symmetric", "nt_xent", "clip", "lse"])
def test_compositions_through_kernel_interface(dense_sim_lse, variant):
    """Compositions through primitives.sim_lse.SimLSEFunction (the kernel path) with a dense stand-in primitive."""
    B, M = 7, (10 if variant == "targets" else 7)
    q0, k0, tau0 = _t(B, 5), _t(M, 5), _tau(0.4)
    q1, k1, tau1 = _clones(q0, k0, tau0)
    targets = torch.randint(0, M, (B,))
    if variant in ("plain", "targets", "symmetric"):
        kw = dict(targets=targets if variant == "targets" else None, symmetric=variant == "symmetric",
                  reduction="none")
        out = _fused_info_nce(q0, k0, tau0, backend="dense", **kw)
        ref = info_nce_reference(q1, k1, tau1, **kw)
    elif variant == "nt_xent":
        out = _fused_nt_xent(q0, k0, tau0, backend="dense", reduction="none")
        ref = nt_xent_reference(q1, k1, tau1, reduction="none")
    elif variant == "clip":
        out = _fused_clip_loss(q0, k0, tau0, backend="dense")
        ref = clip_loss_reference(q1, k1, tau1)
    else:
        out = _fused_similarity_lse(q0, k0, tau0, backend="dense")
        ref = similarity_lse_reference(q1, k1, tau1)
    _compare(out, ref, (q0, k0, tau0), (q1, k1, tau1))
    assert [c[0] for c in dense_sim_lse.calls] == ["forward", "backward"]
    assert dense_sim_lse.calls[0][3] == (variant == "nt_xent")
    assert dense_sim_lse.calls[0][4] == (variant in ("symmetric", "clip"))


# ----------------------------------------------------------------------------- kernel backends vs reference

SHAPES = list(itertools.product([1, 37, 130], [8, 33, 64]))
LOW = [torch.float32, torch.float16, torch.bfloat16]


def _fused_as_backend(fused, public):
    """``public`` with backend="dense" mapped to the composition on the dense core.

    Emulates an exact kernel that sees inputs in the test dtype: it checks here
    that the kernel-backend tests and their tolerances are sound.
    """

    def fn(*args, backend, **kw):
        if backend == "dense":
            return fused(*args, backend="reference", **kw)
        return public(*args, backend=backend, **kw)

    return fn


KERNEL_PARAMS = backend_params() + [pytest.param("dense", id="dense-core")]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_info_nce_backend_vs_reference(backend, B, D, dtype):
    q, k = torch.randn(B, D, device=DEVICE, requires_grad=True), torch.randn(B + 3, D, device=DEVICE,
                                                                                 requires_grad=True)
    compare_with_reference(_fused_as_backend(_fused_info_nce, co.info_nce), (q, k), backend=backend, dtype=dtype,
                           temperature=0.1, reduction="none")


@pytest.mark.parametrize("variant", ["targets", "symmetric", "unnormalized"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,D", [(1, 8), (37, 33), (130, 64)])
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_info_nce_variants_backend_vs_reference(backend, B, D, dtype, variant):
    M = B + 5 if variant == "targets" else B
    # Unnormalized features are scaled to unit expected norm so logits stay in the normalized range.
    r = D ** -0.5 if variant == "unnormalized" else 1.0
    q = (torch.randn(B, D, device=DEVICE) * r).requires_grad_(True)
    k = (torch.randn(M, D, device=DEVICE) * r).requires_grad_(True)
    tau = torch.tensor(0.2, device=DEVICE, requires_grad=True)
    kw = dict(reduction="mean")
    if variant == "targets":
        kw["targets"] = torch.randint(0, M, (B,), device=DEVICE)
    elif variant == "symmetric":
        kw["symmetric"] = True
    else:
        kw["normalize"] = False
    compare_with_reference(_fused_as_backend(_fused_info_nce, co.info_nce), (q, k, tau), backend=backend,
                           dtype=dtype, sharpness=1 / 0.2, normalized=variant != "unnormalized", **kw)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_clip_loss_backend_vs_reference(backend, B, D, dtype):
    x = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).requires_grad_(True)
    y = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).requires_grad_(True)
    s = torch.tensor(10.0, device=DEVICE, requires_grad=True)
    compare_with_reference(_fused_as_backend(_fused_clip_loss, co.clip_loss), (x, y, s), backend=backend,
                           dtype=dtype, sharpness=10.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_nt_xent_backend_vs_reference(backend, B, D, dtype, reduction):
    a = torch.randn(B, D, device=DEVICE, requires_grad=True)
    b = torch.randn(B, D, device=DEVICE, requires_grad=True)
    compare_with_reference(_fused_as_backend(_fused_nt_xent, co.nt_xent), (a, b), backend=backend, dtype=dtype,
                           sharpness=1 / 0.1, normalized=True, temperature=0.1, reduction=reduction)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("B,D", SHAPES)
@pytest.mark.parametrize("backend", KERNEL_PARAMS)
def test_similarity_lse_backend_vs_reference(backend, B, D, dtype):
    q = F.normalize(torch.randn(B, D, device=DEVICE), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(B + 7, D, device=DEVICE), dim=1).requires_grad_(True)
    s = torch.tensor(5.0, device=DEVICE, requires_grad=True)
    compare_with_reference(_fused_as_backend(_fused_similarity_lse, co.similarity_lse), (q, k, s),
                           backend=backend, dtype=dtype)


# ----------------------------------------------------------------------------- bad input


def _qk(B=4, M=4, D=3, **kw):
    return torch.randn(B, D, **kw), torch.randn(M, D, **kw)


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


PAIR_FNS = [
    ("info_nce", lambda a, b, **kw: co.info_nce(a, b, **kw), ("query", "key")),
    ("clip_loss", lambda a, b, **kw: co.clip_loss(a, b, 2.0, **kw), ("image_features", "text_features")),
    ("nt_xent", lambda a, b, **kw: co.nt_xent(a, b, **kw), ("z1", "z2")),
    ("similarity_lse", lambda a, b, **kw: co.similarity_lse(a, b, 2.0, **kw), ("query", "key")),
]
PAIR_IDS = [p[0] for p in PAIR_FNS]


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_bad_rank(name, fn, args):
    q, k = _qk()
    _raises(ValueError, rf"{args[0]} must be 2-D, got shape \(4, 3, 1\)", fn, q[..., None], k)
    _raises(ValueError, rf"{args[1]} must be 2-D, got shape \(3,\)", fn, q, k[0])


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_bad_feature_dim(name, fn, args):
    q, _ = _qk()
    _raises(ValueError, rf"{args[0]} and {args[1]}.*\(4, 3\) and \(4, 5\)", fn, q, torch.randn(4, 5))


@pytest.mark.parametrize("name,fn,args", [p for p in PAIR_FNS if p[0] in ("clip_loss", "nt_xent")],
                         ids=["clip_loss", "nt_xent"])
def test_bad_row_count_paired(name, fn, args):
    q, _ = _qk()
    _raises(ValueError, r"same shape, got \(4, 3\) and \(5, 3\)", fn, q, torch.randn(5, 3))


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_bad_dtype_mismatch(name, fn, args):
    q, k = _qk()
    _raises(ValueError, rf"{args[1]} has dtype torch.float64 but {args[0]} has dtype torch.float32", fn, q,
            k.double())


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_bad_device_mismatch(name, fn, args):
    q, k = _qk()
    _raises(ValueError, rf"{args[1]} is on meta but {args[0]} is on cpu", fn, q, k.to("meta"))


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_integer_features(name, fn, args):
    q, k = _qk()
    _raises(TypeError, rf"{args[0]} must be a floating-point tensor, got dtype torch.int64", fn, q.long(), k)


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_empty_batch(name, fn, args):
    _raises(ValueError, rf"{args[0]} must be non-empty, got shape \(0, 3\)", fn, torch.randn(0, 3),
            torch.randn(0, 3))


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_unknown_backend(name, fn, args):
    q, k = _qk()
    _raises(ValueError, "backend must be one of", fn, q, k, backend="fast")


@pytest.mark.parametrize("name,fn,args", PAIR_FNS, ids=PAIR_IDS)
def test_process_group_without_distributed(name, fn, args):
    q, k = _qk()
    _raises(RuntimeError, "torch.distributed is not initialized", fn, q, k, process_group=object())


@pytest.mark.parametrize("bad", [0.0, -0.5, torch.tensor(0.0), torch.tensor(-1.0)], ids=["0", "-0.5", "t0", "t-1"])
@pytest.mark.parametrize("fn,arg", [
    (lambda q, k, t: co.info_nce(q, k, t), "temperature"),
    (lambda q, k, t: co.nt_xent(q, k, t), "temperature"),
    (lambda q, k, t: co.clip_loss(q, k, t), "logit_scale"),
    (lambda q, k, t: co.similarity_lse(q, k, t), "scale"),
], ids=["info_nce", "nt_xent", "clip_loss", "similarity_lse"])
def test_nonpositive_temperature_or_scale(fn, arg, bad):
    q, k = _qk()
    _raises(ValueError, rf"{arg} must be > 0", fn, q, k, bad)


def test_temperature_not_scalar():
    q, k = _qk()
    _raises(ValueError, r"temperature must be a float or a 0-dim tensor, got shape \(2,\)", co.info_nce, q, k,
            torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("fn", [co.info_nce, co.nt_xent], ids=["info_nce", "nt_xent"])
def test_unknown_reduction(fn):
    q, k = _qk()
    _raises(ValueError, r"reduction must be one of \('mean', 'sum', 'none'\), got 'avg'", fn, q, k,
            reduction="avg")


def test_targets_out_of_range():
    q, k = _qk(B=3, M=5)
    _raises(ValueError, r"targets must lie in \[0, 5\).*\[0, 5\]", co.info_nce, q, k, targets=torch.tensor([0, 5, 1]))
    _raises(ValueError, r"targets must lie in \[0, 5\).*\[-1, 1\]", co.info_nce, q, k,
            targets=torch.tensor([0, -1, 1]))


@pytest.mark.parametrize("targets", [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([True, False, True])],
                         ids=["float", "bool"])
def test_targets_wrong_dtype(targets):
    q, k = _qk(B=3, M=5)
    _raises(ValueError, r"targets must be an integer .*got dtype torch\.(float32|bool) with shape \(3,\)",
            co.info_nce, q, k, targets=targets)


def test_targets_not_a_tensor():
    q, k = _qk(B=3, M=5)
    _raises(ValueError, r"targets must be an int64 tensor of shape \(3,\), got list", co.info_nce, q, k,
            targets=[0, 1, 2])


@pytest.mark.parametrize("targets", [torch.tensor([0, 1]), torch.tensor([[0, 1, 2]])], ids=["short", "2d"])
def test_targets_wrong_shape(targets):
    q, k = _qk(B=3, M=5)
    _raises(ValueError, r"targets must have shape \(3,\)", co.info_nce, q, k, targets=targets)


def test_targets_wrong_device():
    q, k = _qk(B=3, M=5)
    _raises(ValueError, "targets is on meta but query is on cpu", co.info_nce, q, k,
            targets=torch.tensor([0, 1, 2], device="meta"))


def test_fewer_keys_than_queries_without_targets():
    q, k = _qk(B=5, M=4)
    _raises(ValueError, r"at least as many rows.*query \(5, 3\) and key \(4, 3\)", co.info_nce, q, k)
    co.info_nce(q, k, targets=torch.tensor([0, 1, 2, 3, 3]), backend="reference")  # fine with targets


def test_symmetric_with_targets():
    q, k = _qk()
    _raises(ValueError, r"symmetric=True .* no targets .*\(4,\)", co.info_nce, q, k, symmetric=True,
            targets=torch.arange(4))


def test_symmetric_needs_square():
    q, k = _qk(B=4, M=6)
    _raises(ValueError, r"symmetric=True needs as many keys as queries.*\(4, 3\) and key \(6, 3\)", co.info_nce, q,
            k, symmetric=True)


def test_unavailable_backend_says_why():
    q, k = _qk()
    avail = co.available_backends()
    missing = [n for n in ("cpu", "triton", "cuda") if not avail[n][0]]
    if not missing:
        pytest.skip("every backend is available here")
    _raises(RuntimeError, f"backend '{missing[0]}' cannot run info_nce", co.info_nce, q, k, backend=missing[0])


# ----------------------------------------------------------------------------- inputs are never modified


@pytest.mark.parametrize("path", ["public-reference", "dense-core"])
def test_inputs_not_modified(path):
    q, k, k2 = torch.randn(5, 4), torch.randn(7, 4), torch.randn(5, 4)
    tau = torch.tensor(0.3, requires_grad=True)
    targets = torch.tensor([6, 0, 2, 2, 1])
    inputs = [q, k, k2, tau, targets]
    before = [t.detach().clone() for t in inputs]
    versions = [t._version for t in inputs]
    if path == "public-reference":
        calls = [
            lambda: co.info_nce(q, k, tau, targets=targets, backend="reference"),
            lambda: co.info_nce(q, k2, tau, symmetric=True, backend="reference"),
            lambda: co.clip_loss(q, k2, tau, backend="reference"),
            lambda: co.nt_xent(q, k2, tau, backend="reference"),
            lambda: co.similarity_lse(q, k, tau, backend="reference").sum(),
        ]
    else:
        calls = [
            lambda: _fused_info_nce(q, k, tau, targets=targets, backend="reference"),
            lambda: _fused_info_nce(q, k2, tau, symmetric=True, backend="reference"),
            lambda: _fused_clip_loss(q, k2, tau, backend="reference"),
            lambda: _fused_nt_xent(q, k2, tau, backend="reference"),
            lambda: _fused_similarity_lse(q, k, tau, backend="reference").sum(),
        ]
    for call in calls:
        call().backward()
    for t, b, v in zip(inputs, before, versions):
        assert torch.equal(t.detach(), b)
        assert t._version == v


# ----------------------------------------------------------------------------- modules and torch.compile


def test_modules_call_the_functions():
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    t = torch.tensor([1, 0, 2, 3, 5, 4])
    torch.testing.assert_close(co.nn.InfoNCELoss(0.2, backend="reference")(q, k, t),
                               co.info_nce(q, k, 0.2, targets=t, backend="reference"))
    m = co.nn.InfoNCELoss(0.2, learnable_temperature=True, backend="reference")
    m(q, k).backward()
    assert m.log_temperature.grad is not None and m.log_temperature.grad != 0
    torch.testing.assert_close(co.nn.ClipLoss(backend="reference")(q, k, 3.0),
                               co.clip_loss(q, k, 3.0, backend="reference"))
    torch.testing.assert_close(co.nn.NTXentLoss(0.3, reduction="none", backend="reference")(q, k),
                               co.nt_xent(q, k, 0.3, reduction="none", backend="reference"))
    torch.testing.assert_close(co.nn.SigLIPLoss(backend="reference")(q, k, 3.0, -1.0),
                               co.siglip_loss(q, k, 3.0, -1.0, backend="reference"))


@pytest.mark.slow
def test_info_nce_compiles_fullgraph():
    q, k = torch.randn(6, 8), torch.randn(9, 8)
    t = torch.tensor([0, 8, 2, 3, 4, 4])
    fn = torch.compile(lambda q, k: co.info_nce(q, k, 0.1, targets=t, backend="reference"), fullgraph=True)
    torch.testing.assert_close(fn(q, k), co.info_nce(q, k, 0.1, targets=t, backend="reference"))
