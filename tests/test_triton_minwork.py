"""The minimum-work paths of the Triton ``"sim_lse"`` core against the dense core.

* Gram kernels (q is k, tile pairs I ≤ J once in the forward; the mirror
  backward by default, the pair-once atomic backward on request), with
  exclusions of 1 and 2 entries per row, ragged sizes, B = 1.
* The single-recompute (atomic) backward of the general case, with index
  lists, ranges, exclusions and the column LSE.
* The one-chunk layout (D ≤ BLOCK_D: stationary tile loaded once, streamed tile
  reused for the gradient product) next to the chunked one (D > BLOCK_D).
* Which path runs (``tcore.LAUNCHES``), the fallbacks, the default backward
  being bitwise reproducible, and ``torch.are_deterministic_algorithms_enabled``
  overriding a request for the atomic path.

Outputs are allocated full of NaN (``POISON_OUTPUTS``) so an unwritten tile
fails.  On CPU these run under ``TRITON_INTERPRET=1`` (tests/conftest.py),
where BLOCK_D is capped at 32: D ≤ 32 is one chunk, larger D is chunked.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import contrastive_ops as co
from contrastive_ops.primitives.sim_lse import sim_lse, sim_lse_reference
from helpers import DEVICE
from helpers import triton_assert_close as assert_close
from test_triton_kernels import (
    _case,
    _check_lse,
    _finite,
    _forward_case,
    _full_kw,
    _i32,
    _reference_grads,
    tcore,
    ttiles,
)

pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)
    monkeypatch.setattr(tcore, "BACKWARD", "deterministic")


def _skip_unused_fp32_gram(dtype):
    """The Gram kernels are not launched for fp32 inputs on a GPU (``sim_lse.gram_kernels_take``:
    an out-of-bounds shared-memory read under Triton 3.6); their tests run where they are used."""
    if not tcore.gram_kernels_take(dtype):
        pytest.skip("fp32 Gram inputs take the general kernels on GPUs (test_fp32_gram_routing_on_gpus)")


def _launches(fn):
    """Run ``fn`` and return ``(result, kernels launched by name)``."""
    before = tcore.LAUNCHES.copy()
    out = fn()
    after = tcore.LAUNCHES.copy()
    after.subtract(before)
    return out, {k: v for k, v in after.items() if v}


def _gram_case(name, dtype):
    """``(Z, exclude or None)``: Z (B, D) is both q and k."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name == "self_d20":  # NT-Xent / MV-InfoNCE: self excluded; one D chunk
        B, D, ex = 70, 20, "self"
    elif name == "self_pos_d33":  # DCL: self and the positive excluded; chunked D, some -1 entries
        B, D, ex = 70, 33, "self_pos"
    elif name == "none_d24":  # no exclusion at all
        B, D, ex = 45, 24, None
    elif name == "b1_self":  # one row, its only column excluded: -inf, zero gradient
        B, D, ex = 1, 40, "self"
    elif name == "b1_none":
        B, D, ex = 1, 17, None
    elif name == "many_tiles":  # 5 row tiles: 15 pairs over 3 programs, runs start and end mid-row
        B, D, ex = 150, 16, "self_pos"
    else:
        raise KeyError(name)
    Z = torch.randn(B, D, generator=g).to(DEVICE, dtype)
    i = torch.arange(B)
    if ex is None:
        exclude = None
    elif ex == "self":
        exclude = _i32(i[:, None])
    else:
        pos = (i + B // 2) % B
        pos[::4] = -1  # excludes nothing
        exclude = _i32(torch.stack([i, pos], 1))
    return Z, exclude


GRAM_CASES = ["self_d20", "self_pos_d33", "none_d24", "b1_self", "b1_none", "many_tiles"]


def _check_grads(dq, dk, dscale, r_dq, r_ds, dtype, what):
    for name, t in (("dq", dq), ("dk", dk), ("dscale", dscale)):
        assert torch.isfinite(t).all(), f"{what}: {name} not finite (a tile left unwritten?)"
    assert_close(dq.float() + dk.float(), r_dq, dtype, what=f"{what}: dq + dk")
    assert_close(dscale, r_ds.float(), dtype, what=f"{what}: dscale")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRAM_CASES)
def test_gram_paths(case, dtype):
    """Gram forward, then the mirror and the atomic Gram backward, against the dense core."""
    _skip_unused_fp32_gram(dtype)
    Z, exclude = _gram_case(case, dtype)
    B = Z.shape[0]
    scale = torch.tensor(1.9, device=DEVICE)
    (row, col), ran = _launches(lambda: tcore.sim_lse_forward(Z, Z, scale, exclude=exclude))
    assert ran == {"gram_fwd": 1}
    assert col.numel() == 0
    g_row = torch.randn(B, device=DEVICE)
    kw = {} if exclude is None else {"exclude": exclude}
    r_row, _, r_dq, _, r_ds = _reference_grads(Z, Z, scale, kw, False, g_row, torch.empty(0))
    _check_lse(row, r_row, dtype, "row_lse")
    args = (Z, Z, scale, None, None, None, None, exclude, row, col, g_row, torch.empty(0, device=DEVICE))
    for atomic, kernel in ((False, "gram_bwd"), (True, "gram_bwd_atomic")):
        (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(*args, atomic=atomic))
        assert ran == {kernel: 1}
        assert dq.dtype == dtype and dq.shape == Z.shape and (dk == 0).all()
        _check_grads(dq, dk, ds, r_dq, r_ds, dtype, kernel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_autograd_through_core(dtype):
    """``core.sim_lse(Z, Z)`` (one tensor object) takes both Gram kernels; gradients equal the
    dense core's, with grad_output ≠ 1."""
    _skip_unused_fp32_gram(dtype)
    Z0, exclude = _gram_case("self_pos_d33", dtype)
    outs = {}
    for backend, dt in (("triton", dtype), ("reference", torch.float32)):
        Z = Z0.detach().to(dt).requires_grad_()
        scale = torch.tensor(2.3).requires_grad_()

        def run():
            row, _ = sim_lse(Z, Z, scale, exclude=exclude, backend=backend)
            w = torch.linspace(-1.5, 2.5, row.shape[0], device=DEVICE)
            (w * _finite(row)).sum().backward()
            return row

        row, ran = _launches(run)
        if backend == "triton":
            assert ran == {"gram_fwd": 1, "gram_bwd": 1}
        outs[backend] = (row.detach(), Z.grad, scale.grad)
    (row, dz, ds), (r_row, r_dz, r_ds) = outs["triton"], outs["reference"]
    _check_lse(row, r_row, dtype, "row_lse")
    assert dz.dtype == dtype
    assert_close(dz.float(), r_dz, dtype, what="dZ")
    assert_close(ds, r_ds, dtype, what="dscale")


def test_same_values_detached_key():
    """(z, z.detach()): the forward is a Gram matrix, but the gradient goes to q only, so the
    backward returns dq = scale·dS·K alone (not the whole Gram gradient), from the Gram kernel's
    row terms: the forward's S read the same way."""
    _skip_unused_fp32_gram(torch.float32)
    Z0, exclude = _gram_case("self_d20", torch.float32)
    Z = Z0.clone().requires_grad_()
    scale = torch.tensor(1.4)

    def run():
        row, _ = sim_lse(Z, Z.detach(), scale, exclude=exclude, backend="triton")
        (_finite(row) * 0.7).sum().backward()
        return row

    row, ran = _launches(run)
    assert ran == {"gram_fwd": 1, "gram_bwd_dq": 1, "gram_bwd_dk": 1}
    Zr = Z0.clone().requires_grad_()
    r_row, _ = sim_lse_reference(Zr, Zr.detach(), scale, exclude=exclude)
    (_finite(r_row) * 0.7).sum().backward()
    _check_lse(row.detach(), r_row.detach(), torch.float32, "row_lse")
    assert_close(Z.grad, Zr.grad, torch.float32, what="dq (key detached)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["self_pos_d33", "many_tiles", "b1_self"])
def test_gram_split_backward(case, dtype):
    """Two tensors with the same values (the forward takes the Gram kernel): dq and dk each
    against the dense core's gradients of two separate leaves."""
    _skip_unused_fp32_gram(dtype)
    Z, exclude = _gram_case(case, dtype)
    Zk = Z.as_strided(Z.shape, Z.stride())  # another tensor object, same data pointer and strides
    assert Zk is not Z and tcore.same_values(Z, Zk)
    scale = torch.tensor(1.3, device=DEVICE)
    (row, col), ran = _launches(lambda: tcore.sim_lse_forward(Z, Zk, scale, exclude=exclude))
    assert ran == {"gram_fwd": 1}
    g_row = torch.randn(Z.shape[0], device=DEVICE)
    kw = {} if exclude is None else {"exclude": exclude}
    _, _, r_dq, r_dk, r_ds = _reference_grads(Z, Z.clone(), scale, kw, False, g_row, torch.empty(0))
    args = (Z, Zk, scale, None, None, None, None, exclude, row, col, g_row, torch.empty(0, device=DEVICE))
    for atomic in (False, True):  # the atomic request falls back to the split mirror kernel
        (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(*args, atomic=atomic))
        assert ran == {"gram_bwd_dq": 1, "gram_bwd_dk": 1}
        for name, t in (("dq", dq), ("dk", dk), ("dscale", ds)):
            assert torch.isfinite(t).all(), f"{case}: {name} not finite (a tile left unwritten?)"
        assert dq.dtype == dtype and dk.dtype == dtype
        assert_close(dq.float(), r_dq, dtype, what=f"{case}: dq")
        assert_close(dk.float(), r_dk, dtype, what=f"{case}: dk")
        assert_close(ds, r_ds.float(), dtype, what=f"{case}: dscale")


@pytest.mark.parametrize("loss", ["nt_xent", "mv_infonce", "dcl"])
def test_losses_take_the_gram_path(loss):
    """The Gram compositions of the library reach the Gram kernels, and match their references."""
    g = torch.Generator().manual_seed(3)
    if loss == "nt_xent":
        fn, tensors = co.nt_xent, (torch.randn(37, 20, generator=g), torch.randn(37, 20, generator=g))
    elif loss == "mv_infonce":
        fn, tensors = co.mv_infonce, (torch.randn(3, 21, 20, generator=g),)
    else:
        fn, tensors = co.dcl_loss, (torch.randn(37, 20, generator=g), torch.randn(37, 20, generator=g))
    # drawn on the CPU (the same values whatever the device), run where the backend runs
    inputs = [t.to(DEVICE).requires_grad_() for t in tensors]
    ref_inputs = [t.to(DEVICE).requires_grad_() for t in tensors]

    def run():
        out = fn(*inputs, backend="triton")
        (out * 1.3).backward()
        return out

    out, ran = _launches(run)
    ref = fn(*ref_inputs, backend="reference")
    (ref * 1.3).backward()
    assert_close(out.detach(), ref.detach(), torch.float32, what=loss)
    for x, r in zip(inputs, ref_inputs):
        assert_close(x.grad, r.grad, torch.float32, what=f"{loss} grad")
    if tcore.gram_kernels_take(torch.float32):
        assert ran.get("gram_fwd") == 1 and ran.get("gram_bwd") == 1, ran
    else:  # fp32 on a GPU: the general kernels (test_fp32_gram_routing_on_gpus)
        assert ran.get("fwd") == 1 and "gram_fwd" not in ran and "gram_bwd" not in ran, ran


def test_gram_fallbacks():
    """Where the Gram kernels do not apply (column LSE, ranges, index lists) the general ones run."""
    Z, exclude = _gram_case("self_d20", torch.float32)
    scale = torch.tensor(1.0, device=DEVICE)
    B = Z.shape[0]
    start, end = _i32(torch.zeros(B, dtype=torch.long)), _i32(torch.full((B,), B // 2))
    idx = _i32(torch.arange(0, B, 2))
    for kw, want_col in (({}, True), (dict(col_start=start, col_end=end), False),
                         (dict(row_index=idx, col_index=idx), False)):
        fkw = _full_kw(kw)
        (row, col), ran = _launches(lambda: tcore.sim_lse_forward(Z, Z, scale, want_col=want_col, **fkw))
        assert ran == {"fwd": 1}
        r_row, r_col = sim_lse_reference(Z, Z, scale, want_col=want_col, **kw)
        _check_lse(row, r_row, torch.float32, "row_lse")
        M = B if kw.get("col_index") is None else kw["col_index"].shape[0]
        g_col = torch.randn(M, device=DEVICE) if want_col else torch.empty(0, device=DEVICE)
        _, ran = _launches(lambda: tcore.sim_lse_backward(Z, Z, scale, *fkw.values(), row, col,
                                                          torch.randn_like(row), g_col))
        assert ran == {"bwd_dq": 1, "bwd_dk": 1}


# General atomic backward: the cases of test_triton_kernels.py, with D from 16 (one chunk)
# to 72 (padded to 128 in one tile), index lists, ranges, 1 and 2 exclusions.
_ATOMIC_CASES = [("plain", True), ("b1", True), ("exclude1", True), ("index", True), ("range", False),
                 ("range_exclude2", True), ("range_index_exclude2", True), ("q_is_k_index", True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,want_col", _ATOMIC_CASES, ids=[c for c, _ in _ATOMIC_CASES])
def test_atomic_backward(case, want_col, dtype):
    if dtype != torch.float32 and case not in ("plain", "range_index_exclude2", "exclude1"):
        pytest.skip("16-bit dtypes on three representative cases (interpreter time)")
    q, k, kw, fkw, scale, row, col, g_row, g_col = _forward_case(case, dtype, want_col)
    _, _, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, kw, want_col, g_row, g_col)
    (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row,
                                                                 g_col, atomic=True))
    assert ran == {"bwd_atomic": 1}
    assert dq.dtype == q.dtype and dk.dtype == k.dtype and dq.shape == q.shape and dk.shape == k.shape
    for name, t in (("dq", dq), ("dk", dk), ("dscale", ds)):
        assert torch.isfinite(t).all(), f"{name} not finite (a tile left unwritten?)"
    if k is q:
        assert_close(dq.float() + dk.float(), r_dq, dtype, what="dq + dk (q is k)")
    else:
        assert_close(dq.float(), r_dq, dtype, what="dq")
        assert_close(dk.float(), r_dk, dtype, what="dk")
    assert_close(ds, r_ds.float(), dtype, what="dscale")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_chunk_general(dtype):
    """CLIP shape with D ≤ BLOCK_D: Q loaded once per row tile, K reused for dQ (and Q for dK)."""
    assert 24 <= tcore.chunk_d(24) and tcore.block_do(24, dtype) == tcore.chunk_d(24)
    _check_clip_d24(dtype)


def _check_clip_d24(dtype):
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(70, 24, generator=g).to(DEVICE, dtype), torch.randn(41, 24, generator=g).to(DEVICE, dtype)
    scale = torch.tensor(2.1, device=DEVICE)
    row, col = tcore.sim_lse_forward(q, k, scale, want_col=True)
    g_row, g_col = torch.randn(70, device=DEVICE), torch.randn(41, device=DEVICE)
    r_row, r_col, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, {}, True, g_row, g_col)
    _check_lse(row, r_row, dtype, "row_lse")
    _check_lse(col, r_col, dtype, "col_lse")
    dq, dk, ds = tcore.sim_lse_backward(q, k, scale, None, None, None, None, None, row, col, g_row, g_col)
    assert_close(dq.float(), r_dq, dtype, what="dq")
    assert_close(dk.float(), r_dk, dtype, what="dk")
    assert_close(ds, r_ds.float(), dtype, what="dscale")


def test_chunked_input_with_wide_output_chunk(monkeypatch):
    """One input chunk but a wider output chunk (no tile reuse), in the dq/dk and Gram kernels."""
    monkeypatch.setattr(tcore, "block_do", lambda D, dtype=None, gram=False: 64)
    _check_clip_d24(torch.float32)
    test_gram_paths("self_d20", torch.float32)


def test_backward_path_selection(monkeypatch):
    assert tcore.backward_path(64) == "deterministic"  # the default
    monkeypatch.setattr(tcore, "BACKWARD", "atomic")
    assert tcore.backward_path(64) == "atomic"
    assert tcore.backward_path(257) == "deterministic"  # accumulator too wide
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tcore.backward_path(64) == "deterministic"
        q, k, _ = _case("plain", torch.float32)
        scale = torch.tensor(1.0, device=DEVICE)
        row, col = tcore.sim_lse_forward(q, k, scale, want_col=True)
        _, ran = _launches(lambda: tcore.sim_lse_backward(q, k, scale, None, None, None, None, None, row, col,
                                                          torch.ones_like(row), torch.ones_like(col)))
        assert ran == {"bwd_dq": 1, "bwd_dk": 1}
    finally:
        torch.use_deterministic_algorithms(prev)
    # the atomic request is honoured once determinism is off, also through autograd
    q, k, _ = _case("plain", torch.float32)
    q.requires_grad_()
    _, ran = _launches(lambda: sim_lse(q, k, torch.tensor(1.0), want_col=True, backend="triton")[1].sum().backward())
    assert ran == {"fwd": 1, "bwd_atomic": 1}
    monkeypatch.setattr(tcore, "BACKWARD", "fast")
    with pytest.raises(ValueError, match="BACKWARD"):
        tcore.backward_path(64)


def test_gpu_backward_paths_of_fp32(monkeypatch):
    """On the GPU, fp32 takes no atomic kernel (they spill on sm_90a) and fp32 Gram matrices take the GEMM
    Gram backward (the fused fp32 Gram kernel spills); 16-bit keeps both choices."""
    monkeypatch.setattr(tcore, "interpreting", lambda: False)
    f32, bf = torch.float32, torch.bfloat16
    monkeypatch.setattr(tcore, "BACKWARD", "atomic")
    assert tcore.backward_path(64, dtype=bf) == tcore.backward_path(64, dtype=bf, gram=True) == "atomic"
    assert tcore.backward_path(64, dtype=f32) == "deterministic"
    assert tcore.backward_path(64, dtype=f32, gram=True) == "gemm"
    for path in ("deterministic", "auto"):
        monkeypatch.setattr(tcore, "BACKWARD", path)
        assert tcore.backward_path(64, 128, 128, f32, gram=True) == "gemm"
        assert tcore.backward_path(64, 128, 128, bf, gram=True) == "deterministic"


def test_atomic_falls_back_for_wide_d():
    """D > 256: the atomic accumulator would not fit, the deterministic kernels run."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(5, 260, generator=g), torch.randn(7, 260, generator=g)
    scale = torch.tensor(0.2, device=DEVICE)
    row, col = tcore.sim_lse_forward(q, k, scale, want_col=True)
    g_row, g_col = torch.randn(5), torch.randn(7)
    (dq, dk, ds), ran = _launches(lambda: tcore.sim_lse_backward(q, k, scale, None, None, None, None, None,
                                                                 row, col, g_row, g_col, atomic=True))
    assert ran == {"bwd_dq": 1, "bwd_dk": 1}
    _, _, r_dq, r_dk, r_ds = _reference_grads(q, k, scale, {}, True, g_row, g_col)
    assert_close(dq, r_dq, torch.float32, what="dq")
    assert_close(dk, r_dk, torch.float32, what="dk")


@pytest.mark.parametrize("which", ["general", "gram"])
def test_default_path_bitwise_deterministic(which):
    """The default forward and backward give bit-identical results on two runs."""
    if which == "gram":
        q, exclude = _gram_case("many_tiles", torch.float16)
        k, kw, want_col = q, {"exclude": exclude}, False
    else:
        q, k, kw = _case("range_exclude2", torch.float16)
        want_col = True
    fkw = _full_kw(kw)
    scale = torch.tensor(1.3, device=DEVICE)
    runs = []
    for _ in range(2):
        row, col = tcore.sim_lse_forward(q, k, scale, want_col=want_col, **fkw)
        g = torch.Generator().manual_seed(2)
        g_row = torch.randn(row.shape, generator=g).to(DEVICE)
        g_col = torch.randn(col.shape, generator=g).to(DEVICE)
        runs.append((row, col, *tcore.sim_lse_backward(q, k, scale, *fkw.values(), row, col, g_row, g_col)))
    for a, b in zip(*runs):
        assert torch.equal(a.view(torch.uint8) if a.dtype != torch.float32 else a.view(torch.int32),
                           b.view(torch.uint8) if b.dtype != torch.float32 else b.view(torch.int32))


def test_custom_ops_schema_with_flags():
    """The ops keep their schemas and fake kernels with the gram / atomic flags set."""
    Z, exclude = _gram_case("self_pos_d33", torch.float32)
    scale = torch.tensor(1.1, device=DEVICE)
    args = (Z, Z, scale, None, None, None, None, exclude, False, True)
    torch.library.opcheck(torch.ops.contrastive_ops_triton.sim_lse_fwd.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    row, col = tcore.sim_lse_forward(Z, Z, scale, exclude=exclude)
    for atomic in (False, True):
        bargs = (Z, Z, scale, None, None, None, None, exclude, row, col, torch.randn_like(row), col, True, atomic)
        torch.library.opcheck(torch.ops.contrastive_ops_triton.sim_lse_bwd.default, bargs,
                              test_utils=("test_schema", "test_faketensor"))


# Logits ~1e8 (scale 100, rows of norm 1e3): fp32's ulp there is 8, so a backward
# whose S differs from the forward's by one rounding gets P = exp(S − lse) ≫ 1.
# Every backward path must read each S value bitwise as the forward built that
# row's LSE; then the gradient equals float64's to the budget of
# tests/test_large_values.py (1e-3 of its largest entry: the softmax is one-hot).
_LARGE = [("gram", "self", 20), ("gram", "self", 45), ("gram", "self_pos", 45), ("split", "self", 45),
          ("general", "self", 20), ("general", "self", 45)]


@pytest.mark.parametrize("atomic", [False, True], ids=["deterministic", "atomic"])
@pytest.mark.parametrize("path,ex,D", _LARGE, ids=[f"{p}-{e}-d{d}" for p, e, d in _LARGE])
def test_large_logits_backward_reads_forward_s(path, ex, D, atomic):
    B = 70  # three row tiles under the interpreter: diagonal, upper and lower tile pairs
    g = torch.Generator().manual_seed(11 * D + len(ex))
    Z = torch.randn(B, D, generator=g, dtype=torch.float64)
    Z = (Z / Z.norm(dim=1, keepdim=True) * 1e3).float().to(DEVICE)
    i = torch.arange(B)
    # NT-Xent excludes the self pair; DCL also the positive (i + B/2)
    exclude = _i32(i[:, None] if ex == "self" else torch.stack([i, (i + B // 2) % B], 1))
    K = {"gram": Z, "split": Z.as_strided(Z.shape, Z.stride()), "general": Z.clone()}[path]
    scale = torch.tensor(100.0, device=DEVICE)
    row, col = tcore.sim_lse_forward(Z, K, scale, exclude=exclude)
    g_row = torch.linspace(-1.5, 2.0, B, device=DEVICE)
    dq, dk, _ = tcore.sim_lse_backward(Z, K, scale, None, None, None, None, exclude, row, col, g_row,
                                       torch.empty(0, device=DEVICE), atomic=atomic)
    Zr = Z.detach().double().requires_grad_()
    Kr = Zr if path == "gram" else Z.detach().double().requires_grad_()
    r_row, _ = sim_lse_reference(Zr, Kr, scale.double(), exclude=exclude)
    (g_row.double() * r_row).sum().backward()
    assert_close(row, r_row.float(), torch.float32, what="row_lse")
    got = [("dq + dk", dq + dk, Zr.grad)] if path == "gram" else [("dq", dq, Zr.grad), ("dk", dk, Kr.grad)]
    for what, a, r in got:
        assert torch.isfinite(a).all(), f"{path}: {what} not finite"
        tol = 1e-3 * float(r.abs().max())
        torch.testing.assert_close(a.double(), r, atol=tol, rtol=1e-4, msg=lambda m: f"{path} {what}: {m}")


# The general forward's column partials (``tiles.rows_and_cols``): one exponential per entry against
# the tile's maximum T while the tile's logits spread less than about 55, each column's own maximum
# (the fallback branch) where they spread more.  Row norms from 0.01 to 1 at scale 300: the first
# row tiles stay on the shared maximum, the last ones spread more than 110 and exp(S − T) underflows
# (below e^-103) for their weakest columns, which only the fallback gets right (under the interpreter too,
# whose exp does not flush below 2^-126).  B and M ragged: plain tiles, a masked last column tile
# and rows past B, which the plain tiles leave out of the columns per row.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", [10.0, 300.0], ids=["shared_max", "mixed_fallback"])
def test_forward_column_partials_shared_max_and_fallback(dtype, scale):
    B, M, D = 70, 77, 24
    g = torch.Generator().manual_seed(int(scale))
    q = torch.randn(B, D, generator=g, dtype=torch.float64)
    k = torch.randn(M, D, generator=g, dtype=torch.float64)
    q = q / q.norm(dim=1, keepdim=True) * torch.logspace(-2, 0, B, dtype=torch.float64)[:, None]
    k = k / k.norm(dim=1, keepdim=True)
    q, k = q.to(DEVICE, dtype), k.to(DEVICE, dtype)
    s = torch.tensor(scale, device=DEVICE)
    row, col = tcore.sim_lse_forward(q, k, s, want_col=True)
    r_row, r_col = sim_lse_reference(q.double(), k.double(), s.double(), want_col=True)
    S = scale * q.double() @ k.double().t()
    spread = (S[-32:].max() - S[-32:].max(0).values.min()).item()
    assert (spread > 110) == (scale == 300.0), spread  # exp(−110): past fp32's smallest number
    _check_lse(row, r_row, torch.float32, "row_lse")
    _check_lse(col, r_col, torch.float32, "col_lse")
