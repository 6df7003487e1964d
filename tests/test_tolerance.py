"""The comparison rule itself (``contrastive_ops.testing``): a wrong kernel cannot pass it.

A stand-in for a kernel backend runs the real ``cpu`` kernels and multiplies
the gradient of its inputs by 1.5, in fp16/bf16 only: the half-precision rule
must reject it for every differentiable function, at the default settings and
at the sharp settings where the former budget (growing with the logit scale
and 1/norm) let a gradient off by 2× through.  The same stand-in without the
factor passes, so the check is about the factor and nothing else.
"""
import pytest
import torch

import loss_cases as lc
from contrastive_ops import testing
from helpers import DEVICE, backend_params


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def _scaled(case, factor, kernel):
    """``case`` whose inputs' gradients are multiplied by ``factor`` on ``kernel`` (not on the reference)."""
    def fn(*tensors, backend, **kw):
        if backend == kernel:
            tensors = [_ScaleGrad.apply(t, factor) for t in tensors]
        return case.fn(*tensors, backend=backend, **kw)

    return lc.Case(case.name, fn, case.tensors, case.kwargs, case.scalars, case.sharpness, case.normalize,
                   case.feature_norm)


DIFFERENTIABLE = [n for n in lc.LOSSES if n != "sinkhorn_knopp"]
SHARP = [
    pytest.param("clip_loss", dict(logit_scale=100.0), id="clip_loss-scale100"),
    pytest.param("info_nce", dict(norm=0.05, temperature=0.1, normalize=True), id="info_nce-norm0.05"),
    pytest.param("nt_xent", dict(norm=30.0, temperature=0.05, normalize=True), id="nt_xent-norm30-tau0.05"),
    pytest.param("similarity_lse", dict(scale=20.0), id="similarity_lse-scale20"),
]
CASES = [pytest.param(n, {}, id=n) for n in DIFFERENTIABLE] + SHARP


@pytest.mark.parametrize("dtype", lc.HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name,over", CASES)
def test_half_gradient_off_by_1_5_fails(name, over, backend, dtype):
    case = lc.example(name, seed=1, **over)
    lc.require_backend(case, backend, dtype, DEVICE)
    lc.compare_case(_scaled(case, 1.0, backend), backend, dtype, device=DEVICE, what="control")
    with pytest.raises(AssertionError, match="grad of input"):
        lc.compare_case(_scaled(case, 1.5, backend), backend, dtype, device=DEVICE, what="gradient × 1.5")


@pytest.mark.parametrize("dtype", lc.HALF, ids=["fp16", "bf16"])
def test_rule_on_plain_tensors(dtype):
    """``compare`` by hand: within c·(the half reference's error) + atol passes, 1.5× the answer does not."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(64, 16, generator=g, dtype=torch.float64)
    low = exact.to(dtype)
    assert testing.compare("g", low, exact, dtype, low=low) is None
    off = (exact + 1.9 * (low.double() - exact)).to(dtype)  # under c = 2 times the reference's error
    assert testing.compare("g", off, exact, dtype, low=low) is None
    assert testing.compare("g", (exact * 1.5).to(dtype), exact, dtype, low=low) is not None
    assert testing.compare("g", (exact * 1.05).to(dtype), exact, dtype, low=low) is not None
    # the 1/norm term enters only where the caller says the input is normalized
    assert testing.compare("g", (exact * 1.5).to(dtype), exact, dtype, low=low, unit=1.0, inv_norm=0.0) is not None
    assert testing.HALF_C <= 3


def test_fp32_products_scale_the_fp32_tolerance():
    """tf32x3 results get 8× the fp32 tolerance, plain tf32 the fp16 one (100×); a 1.5× error fails."""
    exact = torch.linspace(-1, 1, 101, dtype=torch.float64)
    tol = testing.TOL[torch.float32]
    off = exact + 4 * (tol["atol"] + tol["rtol"] * exact.abs())  # 4 fp32 tolerances away
    assert testing.compare("x", off, exact, torch.float32) is not None
    assert testing.compare("x", off, exact, torch.float32, products="tf32x3") is None
    assert testing.compare("x", 2 * exact, exact, torch.float32, products="tf32x3") is not None
    assert testing.compare("x", 1.5 * exact, exact, torch.float32, products="tf32") is not None
    with pytest.raises(ValueError, match="products"):
        testing.compare("x", exact, exact, torch.float32, products="fp16")
    # the products scale only fp32: a half-precision comparison ignores them
    h = exact.to(torch.bfloat16)
    assert testing.compare("x", h + 1, exact, torch.bfloat16, products="tf32") is not None


def test_fp32_products_rule():
    """Only the Triton kernels on a GPU multiply fp32 on tensor cores."""
    assert testing.fp32_products("triton", "cpu") == "ieee"
    assert testing.fp32_products("cuda", "cuda") == "ieee"
    assert testing.fp32_products("cpu", torch.device("cpu")) == "ieee"
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert testing.fp32_products("triton", "cuda") == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert testing.fp32_products("triton", "cuda") == "tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
