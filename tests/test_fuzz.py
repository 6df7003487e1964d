"""Property-based tests: every public function, every kernel backend, against the reference.

Hypothesis draws the whole valid argument space of each function (see
``loss_cases``): tiny and ragged shapes (N from 1, D from 1, never only powers
of two), V from 2 to 5, masks that leave instances with fewer than 2 views,
labels with singleton classes, temperatures 0.05..2 as floats or 0-dim tensors
(which then receive a gradient), every reduction and option, fp32 always and
fp16/bf16 under the half-precision rule of ``contrastive_ops.testing`` (at
most twice the error of the reference run in the same dtype, plus a small
atol).  Values and gradients
(upstream gradient 2, or random weights for ``reduction="none"``) are
compared with the reference.

Bounded by a profile chosen with ``$CONTRASTIVE_OPS_FUZZ_PROFILE``:

``ci`` (default)   a few examples per (function, backend, dtype), small
                   shapes under Triton's interpreter.
``dev``            more examples, full shape ranges.
``thorough``       hundreds of examples; for a nightly run or a GPU.

``derandomize=True``: the same examples every run, so a failure reproduces.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loss_cases as lc
from helpers import DEVICE, backend_params

PROFILES = {
    #            fp32 examples, half examples, reference-invariant examples, interpreter caps
    "ci": dict(fp32=5, half=2, ref=8, interp={"N": 10, "D": 20, "M": 10, "K": 10, "G": 6, "B": 3, "V": 4}),
    "dev": dict(fp32=30, half=10, ref=40, interp={"N": 24, "D": 40, "M": 24, "K": 24}),
    "thorough": dict(fp32=300, half=100, ref=300, interp={}),
}
PROFILE_NAME = os.environ.get("CONTRASTIVE_OPS_FUZZ_PROFILE", "ci")
if PROFILE_NAME not in PROFILES:
    raise ValueError(f"$CONTRASTIVE_OPS_FUZZ_PROFILE must be one of {tuple(PROFILES)}, got {PROFILE_NAME!r}")
PROFILE = PROFILES[PROFILE_NAME]


def _settings(n):
    return settings(
        max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
    )


def _limits(backend):
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return PROFILE["interp"] if interpreted else {}


def _fuzz(name, backend, dtype, data):
    case = lc.BUILDERS[name](lc.HypothesisDrawer(data, _limits(backend)))
    lc.require_backend(case, backend, dtype, DEVICE)
    lc.compare_case(case, backend, dtype, device=DEVICE, what="fuzz")


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", lc.LOSSES)
@_settings(PROFILE["fp32"])
@given(data=st.data())
def test_fuzz_fp32(name, backend, data):
    _fuzz(name, backend, torch.float32, data)


@pytest.mark.parametrize("dtype", lc.HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("name", lc.LOSSES)
@_settings(PROFILE["half"])
@given(data=st.data())
def test_fuzz_half(name, backend, dtype, data):
    _fuzz(name, backend, dtype, data)


# ----------------------------------------------------------------------------- the Triton GEMM backward


def _triton_param():
    return [p for p in backend_params() if p.values[0] == "triton"]


@pytest.mark.parametrize("dtype", [torch.float32, *lc.HALF], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("backend", _triton_param())
@pytest.mark.parametrize("name", lc.LOSSES)
@_settings(PROFILE["fp32"])
@given(data=st.data())
def test_fuzz_triton_gemm_backward(name, backend, dtype, data):
    """Every function through the Triton backend with its GEMM backward forced (``auto`` takes it
    only for large problems, which the interpreter cannot run): the dS / G blocks and cuBLAS-style
    products over the whole argument space, against the reference."""
    from contrastive_ops.backends._triton import siglip as tsiglip
    from contrastive_ops.backends._triton import sim_lse as tcore

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tcore, "BACKWARD", "gemm")
        mp.setattr(tsiglip, "BACKWARD", "gemm")
        _fuzz(name, backend, dtype, data)


# ----------------------------------------------------------------------------- the reference itself


def _reduction_variant(case, reduction):
    return lc.Case(case.name, case.fn, case.tensors, {**case.kwargs, "reduction": reduction}, case.scalars,
                   case.sharpness, case.normalize)


@pytest.mark.parametrize("name", lc.LOSSES)
@_settings(PROFILE["ref"])
@given(data=st.data())
def test_fuzz_reference_invariants(name, data):
    """On the reference (no kernel needed): finite values and gradients, inputs untouched,
    ``"sum"`` = Σ ``"none"``, ``"mean"`` = ``"sum"`` / the counted anchors, and a 0-dim tensor argument gives the value of the same float."""
    case = lc.BUILDERS[name](lc.HypothesisDrawer(data))
    before = [t.clone() for t in case.tensors]
    res = lc.run_case(case, "reference", torch.float32, device=DEVICE)
    assert torch.isfinite(res.out).all(), f"non-finite loss {res.out} for {case.describe()}"
    for i, g in enumerate(res.grads):
        assert g is None or torch.isfinite(g).all(), f"non-finite gradient of input {i} for {case.describe()}"
    for k, g in res.scalar_grads.items():
        assert g is None or torch.isfinite(g).all(), f"non-finite gradient of {k} for {case.describe()}"
    for a, b in zip(before, case.tensors):
        assert torch.equal(a, b), f"inputs modified in place by {case.describe()}"

    if "reduction" in case.kwargs:
        none = lc.run_case(_reduction_variant(case, "none"), "reference", torch.float32, grad=False).out
        total = lc.run_case(_reduction_variant(case, "sum"), "reference", torch.float32, grad=False).out
        torch.testing.assert_close(none.sum(), total, atol=1e-5, rtol=1e-5)
        mean = lc.run_case(_reduction_variant(case, "mean"), "reference", torch.float32, grad=False).out
        assert mean.dim() == 0 and torch.isfinite(mean)
        # "mean" = "sum" / the number of anchors that count (0 when none counts)
        count = lc.counted_anchors(case)  # None: a mean of several terms (selfcon_loss with alpha > 0)
        if count is not None:
            expected = total / count if count else torch.zeros_like(total)
            torch.testing.assert_close(mean, expected, atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"mean != sum / {count} counted anchors for {case.describe()}: {m}")

    if case.scalars:  # the same numbers passed as Python floats
        as_float = lc.Case(case.name, case.fn, case.tensors,
                           {**case.kwargs, **{k: float(v) for k, v in case.scalars.items()}}, {},
                           case.sharpness, case.normalize)
        out_f = lc.run_case(as_float, "reference", torch.float32, grad=False).out
        torch.testing.assert_close(out_f, res.out.detach(), atol=1e-6, rtol=1e-6)
