"""The CPU kernels' epilogue paths, each taken and checked against the dense core.

The CPU core picks, per call (``csrc/cpu/sim_lse.cpp``):

* the shifted-exponential epilogue when R = |scale|·max‖Q‖·max‖K‖ ≤ 40 (fp32), the
  exact one (running maxima) otherwise;
* the symmetric Gram (each tile pair once) when Q and K are the same rows and no
  column LSE is asked for; in the backward only when q and k are one tensor,
  whose gradient (dq + dk) is then returned whole in dq.

``torch.ops.contrastive_ops._cpu_last_path`` reports the flags of the last call
(1 shifted, 2 symmetric, 4 summed gradient), so every test here asserts the path it
meant to exercise.  Also: results for 1, 2 and 4 threads agree, and are bitwise
equal from run to run for a fixed thread count.
"""
from __future__ import annotations

import pytest
import torch

from contrastive_ops._numerics import acc_dtype
from contrastive_ops.primitives.sim_lse import sim_lse, sim_lse_reference
from contrastive_ops.backends import _cext
from helpers import TOL, assert_close, nan_filled_memory

_OK, _WHY = _cext.availability("cpu")
pytestmark = pytest.mark.skipif(not _OK, reason=f"cpu backend: {_WHY}")

FAST, SYM, SUMMED = 1, 2, 4


def _path(backward: bool) -> int:
    return torch.ops.contrastive_ops._cpu_last_path(backward)


def _sym_problem(case, N, D, gen):
    """Q and K the same rows (one tensor z); masks of every kind on the symmetric Gram."""
    z = torch.randn(N, D, generator=gen)
    kw = {}
    B = N
    if case == "index":  # the same index list for rows and columns, with repeats
        B = N + 5
        idx = torch.randint(0, N, (B,), generator=gen)
        kw["row_index"], kw["col_index"] = idx, idx.clone()
    if case == "identity_rows":  # row_index = arange, no col_index: still the same rows (SupCon "all")
        kw["row_index"] = torch.arange(N)
    if case in ("ranges", "index"):
        start = torch.randint(0, B, (B,), generator=gen)
        end = torch.clamp(start + torch.randint(-2, B, (B,), generator=gen), 0, B)
        start[0], end[0] = 0, B
        kw["col_start"], kw["col_end"] = start, end
    if case in ("self", "identity_rows", "ranges"):
        kw["exclude"] = torch.arange(B)[:, None]
    if case in ("two", "index"):
        ex = torch.randint(-1, B, (B, 2), generator=gen)
        ex[:, 0] = torch.arange(B)
        ex[::4, 1] = ex[::4, 0]
        kw["exclude"] = ex
    return z, kw, B


def _core(z, k, scale, kw, g_row, g_col=None, backend="cpu", dtype=torch.float32):
    """Forward + backward of the core; returns (row, col, grad of z[, grad of k], dscale)."""
    zz = z.detach().to(dtype).requires_grad_()
    kk = zz if k is None else k.detach().to(dtype).requires_grad_()
    ss = scale.detach().to(acc_dtype(dtype)).requires_grad_()
    want_col = g_col is not None
    row, col = sim_lse(zz, kk, ss, want_col=want_col, backend=backend, **kw)
    loss = (torch.where(torch.isfinite(row), row, 0) * g_row).sum()
    if want_col:
        loss = loss + (torch.where(torch.isfinite(col), col, 0) * g_col).sum()
    loss.backward()
    out = [row, col, zz.grad] + ([] if k is None else [kk.grad]) + [ss.grad]
    return [t for t in out if t is not None]


def _check(out, ref, dtype=torch.float32):
    for i, (a, b) in enumerate(zip(out, ref)):
        fin = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), fin), f"output {i}: -inf pattern differs"
        assert_close(a[fin].to(b.dtype), b[fin], dtype, what=f"output {i}")


@pytest.mark.parametrize("N", [1, 7, 600])
@pytest.mark.parametrize("case", ["none", "self", "two", "ranges", "index", "identity_rows"])
# (scale, norm of the features, shifted epilogue expected): R = scale·norm² is 14.3 or 49 (> 40: exact)
@pytest.mark.parametrize("scale_value,norm,fast", [(1 / 0.07, 1.0, True), (1.0, 7.0, False)])
def test_symmetric_gram(case, N, scale_value, norm, fast):
    """q is k: the symmetric path (shifted epilogue) or the general exact one, same results as the dense core."""
    gen = torch.Generator().manual_seed(N)
    z, kw, B = _sym_problem(case, N, 19, gen)
    z = torch.nn.functional.normalize(z, dim=-1) * norm
    scale = torch.tensor(scale_value)
    g_row = torch.randn(B, generator=gen)
    out = _core(z, None, scale, kw, g_row)
    assert _path(False) == (FAST | SYM if fast else 0)
    assert _path(True) == (FAST | SYM | SUMMED if fast else 0)
    ref = _core(z, None, scale, kw, g_row, backend="reference")
    _check(out, ref)


@pytest.mark.parametrize("case", ["self", "ranges"])
def test_symmetric_gram_half_precision(case):
    gen = torch.Generator().manual_seed(3)
    z, kw, B = _sym_problem(case, 300, 24, gen)
    z = torch.nn.functional.normalize(z, dim=-1)
    g_row = torch.randn(B, generator=gen)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        zd = z.to(dtype)
        out = _core(zd, None, torch.tensor(5.0), kw, g_row, dtype=dtype)
        assert _path(True) == FAST | SYM | SUMMED
        ref_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        ref = _core(zd, None, torch.tensor(5.0), kw, g_row, backend="reference", dtype=ref_dtype)
        assert out[1].dtype == dtype  # (row, grad of z, dscale)
        _check(out, ref, dtype)


def test_symmetric_rows_without_summed_gradient():
    """Same rows but two tensors (a view of q as k): symmetric forward, general backward with dq and dk apart."""
    gen = torch.Generator().manual_seed(5)
    z = torch.nn.functional.normalize(torch.randn(300, 16, generator=gen), dim=-1)
    ex = torch.arange(300, dtype=torch.int32)[:, None]
    s = torch.tensor(1 / 0.1)
    row, _ = torch.ops.contrastive_ops.sim_lse_fwd(z, z.view(300, 16), s, None, None, None, None, ex, False)
    assert _path(False) == FAST | SYM
    g = torch.randn(300, generator=gen)
    empty = torch.empty(0)
    dq, dk, ds = torch.ops.contrastive_ops.sim_lse_bwd(z, z.view(300, 16), s, None, None, None, None, ex, row, empty,
                                                       g, empty)
    assert _path(True) == FAST
    dz, dk0, ds1 = torch.ops.contrastive_ops.sim_lse_bwd(z, z, s, None, None, None, None, ex, row, empty, g, empty)
    assert _path(True) == FAST | SYM | SUMMED
    assert torch.equal(dk0, torch.zeros_like(z))  # one tensor: the whole gradient is in dq
    torch.testing.assert_close(dz, dq + dk, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ds1, ds, rtol=1e-5, atol=1e-6)
    zr = z.clone().requires_grad_()
    sr = s.clone().requires_grad_()
    (sim_lse_reference(zr, zr, sr, exclude=ex)[0] * g).sum().backward()
    torch.testing.assert_close(dz, zr.grad, **{k: TOL[torch.float32][k] for k in ("rtol", "atol")})


@pytest.mark.parametrize("case", ["plain", "ranges_exclude", "index"])
@pytest.mark.parametrize("want_col", [False, True])
@pytest.mark.parametrize("scale_value,norm,fast", [(1 / 0.07, 1.0, True), (1.0, 7.0, False), (-20.0, 1.0, True)])
def test_general_paths(case, want_col, scale_value, norm, fast):
    """q and k different: shifted or exact epilogue, ragged blocks (600 × 2100 over 128 × 1024 tiles)."""
    gen = torch.Generator().manual_seed(11)
    B, M, D = 600, 2100, 17
    q = torch.nn.functional.normalize(torch.randn(B + 3, D, generator=gen), dim=-1) * norm
    k = torch.nn.functional.normalize(torch.randn(M + 2, D, generator=gen), dim=-1) * norm
    kw = {}
    if case == "index":
        kw["row_index"] = torch.randint(0, B + 3, (B,), generator=gen)
        kw["col_index"] = torch.randint(0, M + 2, (M,), generator=gen)
    else:
        q, k = q[:B], k[:M]
    if case == "ranges_exclude":
        start = torch.randint(0, M, (B,), generator=gen)
        end = torch.clamp(start + torch.randint(-2, M, (B,), generator=gen), 0, M)
        kw["col_start"], kw["col_end"] = start, end
        kw["exclude"] = torch.randint(-1, M, (B, 2), generator=gen)
    g_row = torch.randn(B, generator=gen)
    g_col = torch.randn(M, generator=gen) if want_col else None
    out = _core(q, k, torch.tensor(scale_value), kw, g_row, g_col)
    assert _path(False) == (FAST if fast else 0)
    assert _path(True) == (FAST if fast else 0)
    ref = _core(q, k, torch.tensor(scale_value), kw, g_row, g_col, backend="reference")
    _check(out, ref)


def _with_threads(n, fn):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("problem", ["general", "symmetric", "exact"])
def test_thread_count_and_determinism(problem):
    """1 vs 2 threads: equal within fp32 rounding; the same thread count twice: bitwise equal."""
    gen = torch.Generator().manual_seed(2)
    # several row blocks / tile pairs per part; D = 160 caps the backward at 2 parts (its dK
    # accumulators), so with 4 threads each part's GEMMs run on 2 BLAS threads
    N, D = 1100, 160
    norm = 7.0 if problem == "exact" else 1.0  # R = 49 > 40: exact epilogue
    z = torch.nn.functional.normalize(torch.randn(N, D, generator=gen), dim=-1) * norm
    k = None
    if problem != "symmetric":
        k = torch.nn.functional.normalize(torch.randn(N, D, generator=gen), dim=-1) * norm
    kw = {"exclude": torch.arange(N)[:, None]}
    scale = torch.tensor(1.0 if problem == "exact" else 10.0)
    g_row = torch.randn(N, generator=gen)
    g_col = None if problem == "symmetric" else torch.randn(N, generator=gen)

    def run():
        out = _core(z, k, scale, kw, g_row, g_col)
        assert _path(True) == {"general": FAST, "symmetric": FAST | SYM | SUMMED, "exact": 0}[problem]
        # the parts really ran on that many threads (a build without OpenMP runs them all inline)
        assert torch.ops.contrastive_ops._cpu_last_threads() == min(2, torch.get_num_threads())
        return out

    one = _with_threads(1, run)
    two = _with_threads(2, run)
    again = _with_threads(2, run)
    four = _with_threads(4, run)
    for a, b, c, d in zip(one, two, again, four):
        assert torch.equal(b, c), "not bitwise reproducible for a fixed thread count"
        assert_close(a, b, torch.float32, what=f"1 vs 2 threads ({problem})")
        assert_close(a, d, torch.float32, what=f"1 vs 4 threads ({problem})")


def test_fast_paths_write_every_output():
    """Uninitialized memory filled with NaN: the shifted and symmetric paths write every output they return."""
    with nan_filled_memory():
        test_symmetric_gram("ranges", 600, 1 / 0.07, 1.0, True)
        test_symmetric_gram("index", 600, 1 / 0.07, 1.0, True)
        for case in ("plain", "ranges_exclude", "index"):
            test_general_paths(case, True, 1 / 0.07, 1.0, True)


def _gram_losses():
    import contrastive_ops as co

    return {
        "nt_xent": lambda z, z1, z2, y: co.nt_xent(z1, z2, backend="cpu"),
        "mv_infonce": lambda z, z1, z2, y: co.mv_infonce(z, backend="cpu"),
        "mv_dhel": lambda z, z1, z2, y: co.mv_dhel(z, backend="cpu"),
        "supcon_loss": lambda z, z1, z2, y: co.supcon_loss(z, y, backend="cpu"),
        "dcl_loss": lambda z, z1, z2, y: co.dcl_loss(z1, z2, backend="cpu"),
        "dhel_loss": lambda z, z1, z2, y: co.dhel_loss(z1, z2, backend="cpu"),
        "dhel_loss(include_augs=False)": lambda z, z1, z2, y: co.dhel_loss(z1, z2, include_augs=False, backend="cpu"),
    }


@pytest.mark.parametrize("name", list(_gram_losses()))
def test_gram_losses_take_the_symmetric_path(name):
    """Losses whose anchors are their candidates hand the core one tensor in one process, so both
    directions run the symmetric Gram (each tile pair once; dq holds the whole gradient)."""
    g = torch.Generator().manual_seed(11)
    z = torch.randn(40, 3, 24, generator=g, requires_grad=True)
    z1 = torch.randn(40, 24, generator=g, requires_grad=True)
    z2 = torch.randn(40, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (40,), generator=g)
    _gram_losses()[name](z, z1, z2, y).backward()
    assert _path(False) == FAST | SYM
    assert _path(True) == FAST | SYM | SUMMED
