"""The false-negative filter ``false_negative_margin`` on info_nce and nt_xent, and the ``row_max``
threshold of the "sim_lse" primitive it runs on.

Every backend that runs here (the reference, the fused composition on the dense core, the C++ CPU
kernels, the Triton kernels under the interpreter) is checked against brute-force float64 formulas
written below one anchor at a time from SPEC ("Negative shaping"): a negative j of anchor i is left
out when cos(a_i, c_j) > cos(a_i, c_pos) + m.  The data are checked to keep every cosine at least
``GAP`` away from its threshold (no tie the rounding could decide), and to drop some negatives and
keep others, so the filter is exercised both ways.
"""
from __future__ import annotations

import pytest
import torch

import contrastive_ops as co
from contrastive_ops.primitives.sim_lse import sim_lse, sim_lse_reference
from contrastive_ops.testing import assert_close
from helpers import backend_params, nan_filled_memory
from test_negative_shaping import shaped_term
from test_queue import BACKENDS, check_against_brute_force

F64 = torch.float64
GAP = 2e-3  # fp32 kernels: every cosine at least this far from its threshold
DROPPED = []  # (dropped, kept) of the last brute-force call, checked by the tests


def _rand(*shape, seed=0, dtype=torch.float32):
    """Values representable in ``dtype``, held in float64."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).double()


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _lse(terms):
    return torch.logsumexp(torch.stack(terms), 0)


def _anchor_loss(anchor, pos_vec, neg_vecs, tau, margin, beta, tau_plus, gap, counts):
    """One anchor as SPEC writes it: the negatives with cos > cos_pos + m dropped (detached), then the plain
    or the HCL / debiased term over the kept ones."""
    cos_pos = float((anchor @ pos_vec).detach())
    kept = []
    for v in neg_vecs:
        c = float((anchor @ v).detach())
        assert abs(c - (cos_pos + margin)) > gap, "test data: a cosine within the tie gap of its threshold"
        if c > cos_pos + margin:
            counts[0] += 1
        else:
            counts[1] += 1
            kept.append(anchor @ v / tau)
    pos = anchor @ pos_vec / tau
    if beta > 0 or tau_plus > 0:
        return shaped_term(pos, kept, tau, beta, tau_plus)[0]
    return _lse([pos] + kept) - pos


def _reduce(values, reduction):
    v = torch.stack(values)
    return {"none": v, "sum": v.sum(), "mean": v.mean()}[reduction]


def bf_info_nce(query, key, temperature, queue=None, *, targets=None, symmetric=False, in_batch_negatives=True,
                reduction="mean", hard_negative_beta=0.0, debias_tau_plus=0.0, false_negative_margin=None, gap=GAP):
    qn, kn = _unit(query), _unit(key)
    Qn = [] if queue is None else list(_unit(queue))
    m, tau = false_negative_margin, temperature
    counts = [0, 0]
    kw = dict(beta=hard_negative_beta, tau_plus=debias_tau_plus, gap=gap, counts=counts)
    out = []
    for i in range(qn.shape[0]):
        if symmetric:
            row = _anchor_loss(qn[i], kn[i], [kn[j] for j in range(kn.shape[0]) if j != i], tau, m, **kw)
            col = _anchor_loss(kn[i], qn[i], [qn[j] for j in range(qn.shape[0]) if j != i], tau, m, **kw)
            out.append(0.5 * (row + col))
            continue
        t = i if targets is None else int(targets[i])
        negs = [kn[j] for j in range(kn.shape[0]) if j != t] if in_batch_negatives else []
        out.append(_anchor_loss(qn[i], kn[t], negs + Qn, tau, m, **kw))
    DROPPED[:] = counts
    return _reduce(out, reduction)


def bf_nt_xent(z1, z2, temperature, queue=None, *, reduction="mean", hard_negative_beta=0.0, debias_tau_plus=0.0,
               false_negative_margin=None, gap=GAP):
    Z = _unit(torch.cat([z1, z2], 0))
    Qn = [] if queue is None else list(_unit(queue))
    n2, N = Z.shape[0], z1.shape[0]
    counts = [0, 0]
    out = []
    for a in range(n2):
        p = (a + N) % n2
        negs = [Z[b] for b in range(n2) if b not in (a, p)] + Qn
        out.append(_anchor_loss(Z[a], Z[p], negs, temperature, false_negative_margin, hard_negative_beta,
                                debias_tau_plus, gap, counts))
    DROPPED[:] = counts
    return _reduce(out, reduction)


def _filter_ran():
    dropped, kept = DROPPED
    assert dropped > 0 and kept > 0, f"test data: the filter dropped {dropped} and kept {kept} negatives"


def _pick_data(make, brute, kw, **brute_kw):
    """``make(seed)`` for the first seed whose data have no cosine within the tie gap of its threshold and
    let the filter both drop and keep negatives (a fixed search: the same data every run)."""
    for seed in range(200):
        args = make(seed)
        plain = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in args.items()}
        try:
            brute(**plain, **kw, **brute_kw)
            _filter_ran()
        except AssertionError:
            continue
        return args
    raise AssertionError("no seed gives tie-free test data")  # pragma: no cover


B, M, D, K = 11, 13, 20, 7  # ragged: no size a multiple of a tile

INFO_CASES = [
    dict(m=0.0, queue="grad", reduction="mean"),
    dict(m=0.05, queue=None, targets=True, beta=0.5, reduction="none"),
    dict(m=-0.05, queue="nograd", in_batch_negatives=False, tau_plus=0.1, reduction="sum"),
    dict(m=0.0, queue="grad", beta=0.5, tau_plus=0.1, reduction="none", tensor_tau=True),
    dict(m=0.0, symmetric=True, reduction="mean", tensor_tau=True),
    dict(m=0.1, symmetric=True, beta=1.0, tau_plus=0.05, reduction="none"),
]


def _info_args(case, seed):
    q = _rand(B, D, seed=seed)
    k = _rand(B if case.get("symmetric") else M, D, seed=seed + 1)
    args = dict(query=q.requires_grad_(), key=k.requires_grad_())
    tau = 0.3
    args["temperature"] = torch.tensor(tau, dtype=F64, requires_grad=True) if case.get("tensor_tau") else tau
    if case.get("queue"):
        args["queue"] = _rand(K, D, seed=seed + 2).requires_grad_(case["queue"] == "grad")
    kw = dict(reduction=case["reduction"], false_negative_margin=case["m"])
    if case.get("beta"):
        kw["hard_negative_beta"] = case["beta"]
    if case.get("tau_plus"):
        kw["debias_tau_plus"] = case["tau_plus"]
    if case.get("symmetric"):
        kw["symmetric"] = True
    if "in_batch_negatives" in case:
        kw["in_batch_negatives"] = case["in_batch_negatives"]
    if case.get("targets"):
        args["targets"] = torch.tensor([(3 * i + 2) % M for i in range(B)])
    return args, kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", INFO_CASES, ids=lambda c: "-".join(f"{a}={v}" for a, v in c.items()))
def test_info_nce_margin_matches_brute_force(backend, case):
    kw = _info_args(case, 0)[1]
    args = _pick_data(lambda seed: _info_args(case, seed)[0], bf_info_nce, kw)
    check_against_brute_force("info_nce", backend, args, bf_info_nce, **kw)
    _filter_ran()


NT_CASES = [
    dict(m=0.0, queue=None, reduction="mean"),
    dict(m=0.05, queue="grad", beta=0.5, reduction="none", tensor_tau=True),
    dict(m=-0.02, queue="nograd", tau_plus=0.1, reduction="sum"),
    dict(m=0.0, queue="grad", reduction="none"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NT_CASES, ids=lambda c: "-".join(f"{a}={v}" for a, v in c.items()))
def test_nt_xent_margin_matches_brute_force(backend, case):
    N = 9

    def make(seed):
        args = dict(z1=_rand(N, D, seed=3 * seed).requires_grad_(), z2=_rand(N, D, seed=3 * seed + 1).requires_grad_())
        args["temperature"] = torch.tensor(0.4, dtype=F64, requires_grad=True) if case.get("tensor_tau") else 0.4
        if case.get("queue"):
            args["queue"] = _rand(K, D, seed=3 * seed + 2).requires_grad_(case["queue"] == "grad")
        return args

    kw = dict(reduction=case["reduction"], false_negative_margin=case["m"])
    if case.get("beta"):
        kw["hard_negative_beta"] = case["beta"]
    if case.get("tau_plus"):
        kw["debias_tau_plus"] = case["tau_plus"]
    args = _pick_data(make, bf_nt_xent, kw)
    check_against_brute_force("nt_xent", backend, args, bf_nt_xent, **kw)
    _filter_ran()


@pytest.mark.parametrize("backend", backend_params(torch.device("cpu")))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_margin(backend, dtype):
    """16-bit inputs: the brute force on the same rounded inputs, with a tie gap wider than the rounding of
    the normalized features (the kernels see them rounded to ``dtype``: a cosine of two unit vectors moves by
    at most 2·2⁻⁹ in bf16, the positive's as much again)."""
    gap = 0.01
    B, M, K = 5, 7, 4
    for loss, kw in (("info_nce", dict(false_negative_margin=0.0, hard_negative_beta=0.5)),
                     ("nt_xent", dict(false_negative_margin=0.05))):
        brute = bf_info_nce if loss == "info_nce" else bf_nt_xent

        def make(seed):
            a, b = _rand(B, D, seed=3 * seed, dtype=dtype), _rand(M, D, seed=3 * seed + 1, dtype=dtype)
            Q = _rand(K, D, seed=3 * seed + 2, dtype=dtype)
            return dict(query=a, key=b, queue=Q) if loss == "info_nce" else dict(z1=a, z2=b[:B], queue=Q)

        data = _pick_data(make, brute, dict(kw, temperature=0.3), gap=gap)
        q, Q = data.get("query", data.get("z1")), data["queue"]
        k = data.get("key", data.get("z2"))
        if loss == "info_nce":
            ins = dict(query=q.to(dtype).requires_grad_(), key=k.to(dtype).requires_grad_(), queue=Q.to(dtype))
            exact_ins = dict(query=q.clone().requires_grad_(), key=k.clone().requires_grad_(), queue=Q)
            fn, brute = co.info_nce, bf_info_nce
        else:
            ins = dict(z1=q.to(dtype).requires_grad_(), z2=k.to(dtype).requires_grad_(), queue=Q.to(dtype))
            exact_ins = dict(z1=q.clone().requires_grad_(), z2=k.clone().requires_grad_(), queue=Q)
            fn, brute = co.nt_xent, bf_nt_xent
        with nan_filled_memory():
            out = fn(**ins, temperature=0.3, reduction="none", backend=backend, **kw)
        exact = brute(**exact_ins, temperature=0.3, reduction="none", gap=gap, **kw)
        _filter_ran()
        assert_close(out, exact, dtype, what=f"{loss} on {backend} in {dtype}")
        names = [n for n, v in ins.items() if v.requires_grad]
        got = torch.autograd.grad(out.sum(), [ins[n] for n in names])
        want = torch.autograd.grad(exact.sum(), [exact_ins[n] for n in names])
        for n, g, e in zip(names, got, want):
            assert g.dtype == dtype
            assert_close(g, e, dtype, what=f"{loss} on {backend} in {dtype}: grad of {n}")


# --------------------------------------------------------------------------- the primitive's row_max


def _prim_case(seed, gram):
    g = torch.Generator().manual_seed(seed)
    Bp, Mp, Dp = 37, 45, 24
    q = torch.randn(Bp, Dp, generator=g, dtype=F64)
    k = q if gram else torch.randn(Mp, Dp, generator=g, dtype=F64)
    scale = torch.tensor(0.7, dtype=F64)
    S = (q @ k.T) * scale
    # each threshold in the widest gap between consecutive sorted logits of its row (above the 2 smallest,
    # below the 3 largest): no logit near a threshold, every thresholded row drops some and keeps some
    srt = S.sort(1).values
    gaps = srt[:, 1:] - srt[:, :-1]
    gaps[:, :2] = -1
    gaps[:, -3:] = -1
    at = gaps.argmax(1, keepdim=True)
    row_max = 0.5 * (srt.gather(1, at) + srt.gather(1, at + 1)).squeeze(1)
    row_max[::5] = float("inf")  # rows without a threshold
    assert (S - row_max[:, None]).abs().min() > 1e-3
    return q, k, scale, row_max


TILED = pytest.param("tiled", id="cuda-tiling-on-cpu")  # the CUDA backend's host tiling and epilogue maths
# The Triton backend's opt-in backwards (single-recompute atomic kernels, dS blocks + GEMMs)
TRITON_PATHS = [pytest.param(f"triton:{p}", id=f"triton-{p}", marks=m)
                for p in ("atomic", "gemm") for m in [p_.marks for p_ in backend_params(torch.device("cpu"))
                                                      if p_.values[0] == "triton"]]


@pytest.mark.parametrize("backend", backend_params(torch.device("cpu")) + [TILED] + TRITON_PATHS)
@pytest.mark.parametrize("gram,want_col,masks", [(False, True, False), (False, False, True), (True, False, True),
                                                 (True, False, False)])
def test_sim_lse_row_max_matches_reference(backend, gram, want_col, masks, monkeypatch):
    """row_max on the primitive vs ``sim_lse_reference``: row and column LSE and every gradient, for q and k
    distinct, and for q *is* k (the Gram path), with and without ranges and exclusions.  "tiled": the CUDA
    backend's tiling with the per-element maths of its epilogues, run on CPU with 3 × 5 tiles."""
    if backend == "tiled":
        from contrastive_ops.backends import _cext
        from contrastive_ops.backends._cext_tiled import TiledSimLSE

        if not co.available_backends()["cpu"][0]:
            pytest.skip("the C++ extension is not built")
        monkeypatch.setitem(_cext.PRIMITIVES, "sim_lse", TiledSimLSE(3, 5))
        backend = "cpu"
    path = None
    if backend.startswith("triton"):
        from contrastive_ops.backends._triton import sim_lse as tcore, tiles as ttiles

        backend, _, path = backend.partition(":")
        monkeypatch.setattr(ttiles, "POISON_OUTPUTS", True)  # every Triton output buffer starts as NaN
        if path:
            monkeypatch.setattr(tcore, "BACKWARD", path)
        before = dict(tcore.LAUNCHES)
    q64, k64, s64, row_max = _prim_case(3, gram)
    Bp, Mp = q64.shape[0], k64.shape[0]
    kw = {}
    if masks:
        kw["exclude"] = torch.stack([torch.arange(Bp) % Mp, (torch.arange(Bp) * 7) % Mp], 1)
        if not gram:
            kw["col_start"] = torch.arange(Bp) % 5
            kw["col_end"] = Mp - torch.arange(Bp) % 4
    dt = torch.float32
    q = q64.to(dt).requires_grad_()
    k = q if gram else k64.to(dt).requires_grad_()
    s = s64.to(dt).requires_grad_()
    if path == "atomic":  # atomic kernels run only with deterministic algorithms off (nan_filled_memory sets them)
        row, col = sim_lse(q, k, s, row_max=row_max, want_col=want_col, backend=backend, **kw)
    else:
        with nan_filled_memory():
            row, col = sim_lse(q, k, s, row_max=row_max, want_col=want_col, backend=backend, **kw)
    qe = q.detach().double().requires_grad_()
    ke = qe if gram else k.detach().double().requires_grad_()
    se = s64.clone().requires_grad_()
    row_e, col_e = sim_lse_reference(qe, ke, se, want_col=want_col, row_max=row_max,
                                     **{n: v.int() for n, v in kw.items()})
    # the threshold really drops pairs: without it the LSE differs
    plain, _ = sim_lse_reference(qe, ke, se, **{n: v.int() for n, v in kw.items()})
    assert (plain - row_e).abs().max() > 1e-2
    assert_close(row, row_e, dt, what=f"row_lse on {backend}")
    g_row = torch.randn(Bp, dtype=F64, generator=torch.Generator().manual_seed(1))
    loss, loss_e = (row * g_row.to(dt)).sum(), (row_e * g_row).sum()
    if want_col:
        assert_close(col, col_e, dt, what=f"col_lse on {backend}")
        g_col = torch.randn(Mp, dtype=F64, generator=torch.Generator().manual_seed(2))
        loss, loss_e = loss + (col * g_col.to(dt)).sum(), loss_e + (col_e * g_col).sum()
    leaves = [q, s] if gram else [q, k, s]
    leaves_e = [qe, se] if gram else [qe, ke, se]
    if path == "atomic":
        grads = torch.autograd.grad(loss, leaves)
    else:
        with nan_filled_memory():
            grads = torch.autograd.grad(loss, leaves)
    for name, g, e in zip(("q", "k", "scale") if not gram else ("q", "scale"), grads,
                          torch.autograd.grad(loss_e, leaves_e)):
        assert_close(g, e, dt, what=f"grad of {name} on {backend}")
    if backend == "triton":  # the kernels the case is meant to cover really ran
        ran = {n for n, c in tcore.LAUNCHES.items() if c > before.get(n, 0)}
        fwd = "gram_fwd" if gram and not masks_need_general(kw) else "fwd"
        bwd = {None: "gram_bwd" if fwd == "gram_fwd" else "bwd_dq",
               "atomic": "gram_bwd_atomic" if fwd == "gram_fwd" else "bwd_atomic",
               "gemm": "gram_ds" if fwd == "gram_fwd" else "bwd_ds" if not masks_need_general(kw) else "bwd_dq",
               }[path or None]
        assert {fwd, bwd} <= ran, f"expected {fwd} and {bwd} to run, ran {sorted(ran)}"


def masks_need_general(kw) -> bool:
    """Ranges keep the general kernels (the Gram kernels take exclusions only)."""
    return "col_start" in kw


def test_sim_lse_row_max_bad_shape():
    q = torch.randn(4, 8)
    with pytest.raises(ValueError, match="row_max must have shape"):
        sim_lse(q, q, torch.tensor(1.0), row_max=torch.zeros(3), backend="reference")


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.1", True, torch.tensor(0.1)])
@pytest.mark.parametrize("loss", ["info_nce", "nt_xent"])
def test_bad_margin_names_the_argument(loss, bad):
    x = torch.randn(4, 8)
    fn = co.info_nce if loss == "info_nce" else co.nt_xent
    with pytest.raises(ValueError, match="false_negative_margin"):
        fn(x, x.flip(0), false_negative_margin=bad, backend="reference")


@pytest.mark.parametrize("loss", ["info_nce", "nt_xent"])
def test_margin_needs_normalized_features(loss):
    x = torch.randn(4, 8)
    fn = co.info_nce if loss == "info_nce" else co.nt_xent
    with pytest.raises(ValueError, match="false_negative_margin.*normalize=True"):
        fn(x, x.flip(0), normalize=False, false_negative_margin=0.1, backend="reference")


def test_huge_margin_is_the_plain_loss():
    """A margin above 2 drops nothing (cosines lie in [-1, 1]): the plain loss, on every backend here."""
    q, k = _rand(B, D, seed=2).float(), _rand(M, D, seed=3).float()
    for backend in ("reference", "cpu", "triton"):
        a = co.info_nce(q, k, 0.2, false_negative_margin=2.5, backend=backend)
        b = co.info_nce(q, k, 0.2, backend=backend)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_modules_take_the_margin():
    q, k = _rand(B, D, seed=2).float(), _rand(B, D, seed=3).float()
    got = co.nn.InfoNCELoss(temperature=0.2, false_negative_margin=0.0, backend="reference")(q, k)
    want = co.info_nce(q, k, 0.2, false_negative_margin=0.0, backend="reference")
    torch.testing.assert_close(got, want)
    got = co.nn.NTXentLoss(temperature=0.2, false_negative_margin=0.0, backend="reference")(q, k)
    want = co.nt_xent(q, k, 0.2, false_negative_margin=0.0, backend="reference")
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- the kernel ops' row_max argument


def test_cext_ops_take_row_max():
    """The C++ ops: opcheck (schema, fake kernel, autograd registration) with a row threshold, and clear
    errors for a row_max of the wrong shape or dtype."""
    if not co.available_backends()["cpu"][0]:
        pytest.skip("the C++ extension is not built")
    ops = torch.ops.contrastive_ops
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 6, generator=g), torch.randn(11, 6, generator=g)
    s = torch.tensor(0.5)
    row_max = torch.full((9,), 0.3)
    for want_col in (False, True):
        args = (q, k, s, None, None, None, None, None, want_col, row_max)
        torch.library.opcheck(ops.sim_lse_fwd.default, args)
        qq, kk, ss = (t.clone().requires_grad_() for t in (q, k, s))
        torch.library.opcheck(ops.sim_lse_fwd.default, (qq, kk, ss, *args[3:]))
        row, col = ops.sim_lse_fwd(*args)
        torch.library.opcheck(ops.sim_lse_bwd.default, (q, k, s, None, None, None, None, None, row, col,
                                                        torch.ones_like(row), torch.ones_like(col), row_max))
    with pytest.raises(RuntimeError, match="row_max must have shape"):
        ops.sim_lse_fwd(q, k, s, None, None, None, None, None, False, torch.zeros(8))
    with pytest.raises(RuntimeError, match="row_max must be float32 or float64"):
        ops.sim_lse_fwd(q, k, s, None, None, None, None, None, False, torch.zeros(9, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="row_max must have shape"):
        ops._sim_lse_tiled_fwd(q, k, s, None, None, None, None, None, False, 3, 5, torch.zeros(8))


@pytest.mark.parametrize("backend", [p for p in backend_params(torch.device("cpu")) if p.values[0] == "triton"])
def test_triton_ops_take_row_max(backend):
    """The Triton custom ops: schema and fake kernels with a row threshold; a wrong shape is a ValueError."""
    from contrastive_ops.backends._triton import sim_lse as tcore

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(9, 16, generator=g), torch.randn(11, 16, generator=g)
    s, row_max = torch.tensor(0.5), torch.full((9,), 0.3)
    ops = torch.ops.contrastive_ops_triton
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.sim_lse_fwd.default, (q, k, s, None, None, None, None, None, True, False, row_max),
                          test_utils=utils)
    row, col = tcore.sim_lse_forward(q, k, s, want_col=True, row_max=row_max)
    torch.library.opcheck(ops.sim_lse_bwd.default, (q, k, s, None, None, None, None, None, row, col,
                                                    torch.ones_like(row), torch.ones_like(col), False, False, False,
                                                    row_max), test_utils=utils)
    with pytest.raises(ValueError, match=r"row_max must have shape \(9,\)"):
        tcore.sim_lse_forward(q, k, s, row_max=torch.zeros(4))
