"""fp16 and bf16 inputs: finite losses and gradients for every public function.

SPEC: "finite loss for finite inputs with τ ≥ 0.01".  Each function runs at its
sharpest setting (τ = 0.01, logit_scale = 100, ε = 0.01, scale = 100) on

* ``unit``:   features of norm 1;
* ``norm100``: features of norm 100 with ``normalize=True`` (the functions that
  take ``normalize``, and point_token_contrast, which always normalizes).

on the reference (which upcasts to fp32) and on every kernel backend that takes
the dtype on this device.  The loss must be fp32 and finite, every gradient
finite and in the input dtype.
"""
import pytest
import torch

import loss_cases as lc
from helpers import DEVICE, backend_params

# The sharpest setting each function documents as finite.
SHARPEST = {
    "clip_loss": dict(logit_scale=100.0),
    "siglip_loss": dict(logit_scale=100.0, neg_logit_bias=10.0),
    "similarity_lse": dict(scale=100.0),
    "sinkhorn_knopp": dict(epsilon=0.01),
    "swav_loss": dict(temperature=0.01, epsilon=0.01),
}
NORM100 = lc.NORMALIZING + ("point_token_contrast",)

CASES = [pytest.param(n, "unit", id=f"{n}-unit") for n in lc.LOSSES]
CASES += [pytest.param(n, "norm100", id=f"{n}-norm100") for n in NORM100]


def _case(name, kind):
    over = dict(SHARPEST.get(name, dict(temperature=0.01)))
    if name in ("mv_infonce", "mv_dhel"):
        over["mask"] = "ragged"  # instances with < 2 views ride along
    if name == "supcon_loss":
        over["labels"] = "classes"
    if kind == "unit":
        over["norm"] = 1.0
        if name in lc.NORMALIZING:
            over["normalize"] = False  # unit features used as they are: logits reach ±1/τ
    else:
        over["norm"] = 100.0
        over["normalize"] = True
    return lc.example(name, seed=3, **over)


@pytest.mark.parametrize("dtype", lc.HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference")] + backend_params())
@pytest.mark.parametrize("name,kind", CASES)
def test_half_precision_finite(name, kind, backend, dtype):
    case = _case(name, kind)
    lc.require_backend(case, backend, dtype, DEVICE)
    res = lc.run_case(case, backend, dtype, device=DEVICE)
    assert res.out.dtype == torch.float32, f"{name}: loss dtype {res.out.dtype}, SPEC says fp32 for {dtype} inputs"
    assert torch.isfinite(res.out).all(), f"{name} on {backend} ({dtype}, {kind}): non-finite loss {res.out}"
    if name == "sinkhorn_knopp":
        assert torch.allclose(res.out.sum(1), torch.ones(res.out.shape[0], device=res.out.device), atol=1e-3)
        return
    for i, g in enumerate(res.grads):
        assert g is not None, f"{name} on {backend}: no gradient for input {i}"
        assert g.dtype == dtype, f"{name} on {backend}: gradient of input {i} is {g.dtype}, not {dtype}"
        assert torch.isfinite(g).all(), f"{name} on {backend} ({dtype}, {kind}): non-finite gradient of input {i}"
    for k, g in res.scalar_grads.items():
        assert g is None or torch.isfinite(g).all(), f"{name} on {backend}: non-finite gradient of {k}"
