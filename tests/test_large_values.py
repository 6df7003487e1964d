"""Huge logits: τ = 0.01 on features of norm 1e3 with ``normalize=False``.

Logits reach ‖a‖·‖b‖/τ = 1e8.  Every function with a ``normalize`` argument,
and clip_loss / siglip_loss / similarity_lse at a large logit scale, must give
a finite answer equal to the float64 reference (the library's reference
backend on float64 copies of the inputs) in fp32, and finite values in
fp16/bf16.  No error is accepted: the library raises none on purpose for
large logits (its argument checks concern shapes, dtypes and the sign of the
temperature), so any exception here is a kernel failing.

The fp32 comparison allows the rounding of the logits themselves: an fp32
dot product of norm-1e3 vectors is off by about 1e-7·‖a‖·‖b‖·√D, so the
absolute tolerance is that times 1/τ (and the gradients get the same budget
relative to their largest entry).
"""
import math

import pytest
import torch

import loss_cases as lc
from helpers import DEVICE, backend_params

NORM = 1e3
TAU = 0.01

CASES = [pytest.param(n, dict(temperature=TAU, normalize=False, norm=NORM), id=n) for n in lc.NORMALIZING]
CASES += [
    pytest.param("clip_loss", dict(logit_scale=100.0, norm=NORM), id="clip_loss-norm1e3-scale100"),
    pytest.param("clip_loss", dict(logit_scale=1e6, norm=1.0), id="clip_loss-unit-scale1e6"),
    pytest.param("siglip_loss", dict(logit_scale=100.0, neg_logit_bias=10.0, norm=NORM),
                 id="siglip_loss-norm1e3-scale100"),
    pytest.param("siglip_loss", dict(logit_scale=1e6, neg_logit_bias=10.0, norm=1.0), id="siglip_loss-unit-scale1e6"),
    pytest.param("similarity_lse", dict(scale=100.0, norm=NORM), id="similarity_lse-norm1e3-scale100"),
]
BACKENDS = [pytest.param("reference", id="reference")] + backend_params()

# mv_infonce's numerator holds both orders (l, l') and (l', l) of each view pair:
# exact ties in the maths whose fp32 dot products round ~10 apart at these
# logits, so the fp32 softmax over them is one-hot where float64's is 50/50.
# The gradient is ill-conditioned there on every backend, the reference
# included; only the loss is compared (gradients must still be finite).
TIED_GRADIENTS = {"mv_infonce"}


def _case(name, over):
    over = dict(over, N=13, D=21, seed=5)
    if name in ("mv_infonce", "mv_dhel"):
        over.update(mask="ragged")
    return lc.example(name, **over)


def _max_logit(case):
    norm = case.feature_norm or 1.0
    return case.sharpness * norm * norm


def _assert_finite(res, case, backend, dtype):
    assert torch.isfinite(res.out).all(), (
        f"{case.name} on {backend} ({dtype}): silent non-finite loss {res.out} at logits up to "
        f"{_max_logit(case):.3g}")
    for i, g in enumerate(res.grads):
        assert g is None or torch.isfinite(g).all(), (
            f"{case.name} on {backend} ({dtype}): silent non-finite gradient of input {i}")
    for k, g in res.scalar_grads.items():
        assert g is None or torch.isfinite(g).all(), f"{case.name} on {backend} ({dtype}): non-finite grad of {k}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,over", CASES)
def test_large_logits_fp32_match_float64(name, over, backend):
    case = _case(name, over)
    lc.require_backend(case, backend, torch.float32, DEVICE)
    res = lc.run_case(case, backend, torch.float32, device=DEVICE)
    _assert_finite(res, case, backend, torch.float32)
    ref = lc.run_case(case, "reference", torch.float64, device=DEVICE, weight=res.weight)
    D = case.tensors[0].shape[-1]
    atol = 1e-6 * _max_logit(case) * math.sqrt(D)
    torch.testing.assert_close(res.out.double(), ref.out, atol=atol, rtol=1e-5,
                               msg=lambda m: f"{name} on {backend}, loss vs float64: {m}")
    for i, (g, gr) in enumerate(zip(res.grads, ref.grads)):
        if gr is None or name in TIED_GRADIENTS:
            continue
        # At these logits the softmax weights are one-hot (the gaps between
        # logits are ~1e7, the fp32 rounding of a logit ~10), so an exact
        # gradient is well defined: 1e-3 of its largest entry.
        big = float(gr.abs().max())
        tol = 1e-3 * big + 1e-12
        torch.testing.assert_close(g.double(), gr, atol=tol, rtol=1e-4,
                                   msg=lambda m: f"{name} on {backend}, gradient of input {i} vs float64: {m}")


@pytest.mark.parametrize("dtype", lc.HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,over", CASES)
def test_large_logits_half_finite(name, over, backend, dtype):
    case = _case(name, over)
    lc.require_backend(case, backend, dtype, DEVICE)
    res = lc.run_case(case, backend, dtype, device=DEVICE)
    assert torch.isfinite(res.out).all(), (
        f"{name} on {backend} ({dtype}): silent non-finite loss {res.out} at logits up to {_max_logit(case):.3g}")
    # Gradients come back in the input dtype: where the exact gradient exceeds
    # the dtype's range, inf is the right rounding.  Within SPEC's range
    # (scale ≤ 100, i.e. τ ≥ 0.01) every entry whose exact value fits must be
    # finite.  Beyond it (logit_scale 1e6) a kernel may round a partial term
    # (the LSE part or the positive part of the gradient, each ~1e5) to inf
    # even where their sum fits: only NaN is an error there.
    ref = lc.run_case(case, "reference", torch.float64, device=DEVICE, weight=res.weight)
    big = torch.finfo(dtype).max / 2
    for i, (g, gr) in enumerate(zip(res.grads, ref.grads)):
        if gr is None:
            continue
        g = g.cpu()
        assert not torch.isnan(g).any(), f"{name} on {backend} ({dtype}): NaN in the gradient of input {i}"
        if case.sharpness <= 100:
            fits = gr.abs().cpu() < big
            assert torch.isfinite(g[fits]).all(), (
                f"{name} on {backend} ({dtype}): non-finite gradient of input {i} where the exact one fits the dtype")
