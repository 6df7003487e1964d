"""point_token_contrast: reference against a per-token loop and the released
Point-CMAE code, the fused composition against the reference, kernel backends
against the reference, and bad input."""
import math

import pytest
import torch

import contrastive_ops as co
from contrastive_ops.losses import _present_first as present_first
from contrastive_ops.losses import point_token as pt
from helpers import DEVICE, backend_params, compare_with_reference

COMBOS = [
    ("cosine", "diag", "cloud"),
    ("cosine", "official", "cloud"),
    ("infonce", "diag", "cloud"),
    ("infonce", "diag", "batch"),
]
# pairing only matters for "cosine", negatives only for "infonce": the loop
# test still runs the full cross product to show that.

ALL_COMBOS = [(m, p, n) for m in pt.MODES for p in pt.PAIRINGS for n in pt.NEGATIVES]


@pytest.fixture(params=[False, True], ids=["eager_cut", "static"])
def static_lists(request, monkeypatch):
    """The fused composition's token list cut to the co-masked tokens (eager default) or whole
    (static length, as under torch.compile, the other tokens with empty ranges)."""
    monkeypatch.setattr(present_first, "STATIC", request.param)
    return request.param


def _loop(f1, f2, m1, m2, mode, pairing, negatives, tau):
    """The formulas of SPEC, token by token, in float64 Python."""
    B, G, _ = f1.shape

    def unit(x):
        x = x.double()
        return x / max(float(x.norm()), 1e-12)

    u = [[unit(f1[b, i]) for i in range(G)] for b in range(B)]
    v = [[unit(f2[b, i]) for i in range(G)] for b in range(B)]
    S = [(b, i) for b in range(B) for i in range(G) if bool(m1[b, i]) and bool(m2[b, i])]
    if not S:
        return 0.0

    def dot(x, y):
        return float((x * y).sum())

    total = 0.0
    if mode == "cosine":
        for b, i in S:
            if pairing == "diag":
                total += 1 - dot(u[b][i], v[b][i])
            else:
                total += sum(1 - dot(u[b][i], v[b][j]) for j in range(G)) / G
        return total / len(S)
    for b, i in S:
        cands = [(c, j) for (c, j) in S if negatives == "batch" or c == b]
        pos = dot(u[b][i], v[b][i]) / tau
        l12 = -pos + math.log(sum(math.exp(dot(u[b][i], v[c][j]) / tau) for c, j in cands))
        l21 = -pos + math.log(sum(math.exp(dot(u[c][j], v[b][i]) / tau) for c, j in cands))
        total += 0.5 * (l12 + l21)
    return total / len(S)


def _masks(B, G, kind, ratio=0.6, device="cpu"):
    """(mask1, mask2) with a chosen co-mask pattern."""
    if kind == "random":
        return torch.rand(B, G, device=device) < ratio, torch.rand(B, G, device=device) < ratio
    if kind == "empty":
        m1 = torch.zeros(B, G, dtype=torch.bool, device=device)
        m1[:, ::2] = True
        return m1, ~m1
    if kind == "single":
        m1 = torch.zeros(B, G, dtype=torch.bool, device=device)
        m2 = torch.zeros(B, G, dtype=torch.bool, device=device)
        m1[B - 1, G - 1] = m2[B - 1, G - 1] = True
        m1[0, 0] = True  # masked in one branch only: not co-masked
        return m1, m2
    if kind == "ragged":  # cloud 0 none, cloud 1 one token, cloud 2 all, the rest random
        m1 = torch.rand(B, G, device=device) < ratio
        m2 = torch.rand(B, G, device=device) < ratio
        m1[0] = False
        m1[1] = False
        m1[1, G // 2] = m2[1, G // 2] = True
        m1[2] = m2[2] = True
        return m1, m2
    raise ValueError(kind)


def _features(B, G, D, dtype=torch.float64):
    f1 = torch.randn(B, G, D, dtype=dtype)
    f2 = torch.randn(B, G, D, dtype=dtype)
    f2 = f2 + 0.5 * f1  # correlated, as two decoders of the same cloud
    return f1, f2


# ----------------------------------------------------------------------------- reference vs loop


@pytest.mark.parametrize("mode,pairing,negatives", ALL_COMBOS)
@pytest.mark.parametrize("kind,B,G,D", [("random", 3, 9, 5), ("ragged", 4, 7, 6), ("single", 2, 5, 3),
                                        ("random", 2, 37, 12)])
def test_reference_matches_loop(mode, pairing, negatives, kind, B, G, D):
    f1, f2 = _features(B, G, D)
    m1, m2 = _masks(B, G, kind)
    tau = 0.2
    out = co.point_token_contrast(f1, f2, m1, m2, mode=mode, pairing=pairing, negatives=negatives,
                                  temperature=tau, backend="reference")
    assert out.dtype == torch.float64 and out.shape == ()
    expected = _loop(f1, f2, m1, m2, mode, pairing, negatives, tau)
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64), atol=1e-12, rtol=1e-10)


def test_reference_zero_vector_uses_eps():
    """A zero token normalizes to zero (eps 1e-12), not NaN."""
    f1, f2 = _features(2, 5, 4)
    f1[0, 1] = 0
    m1 = torch.ones(2, 5, dtype=torch.bool)
    for mode in pt.MODES:
        out = co.point_token_contrast(f1, f2, m1, m1, mode=mode, backend="reference")
        expected = _loop(f1, f2, m1, m1, mode, "diag", "cloud", 0.1)
        torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("mode,pairing,negatives", COMBOS + [("infonce", "diag", "batch")])
def test_reference_gradcheck(mode, pairing, negatives):
    f1, f2 = _features(2, 5, 3)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    m1, m2 = _masks(2, 5, "random")
    m1[0, :2] = m2[0, :2] = True
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    kw = dict(mode=mode, pairing=pairing, negatives=negatives, backend="reference")
    if mode == "cosine":
        assert torch.autograd.gradcheck(lambda a, b: co.point_token_contrast(a, b, m1, m2, **kw), (f1, f2))
    else:
        assert torch.autograd.gradcheck(
            lambda a, b, t: co.point_token_contrast(a, b, m1, m2, temperature=t, **kw), (f1, f2, tau))


def test_reference_official_matches_released_code():
    """Peer check: the released Point-CMAE formulation at its G = 64."""
    B, G, D = 5, 64, 384
    f1, f2 = _features(B, G, D, dtype=torch.float32)
    m1, m2 = _masks(B, G, "random")
    ours = co.point_token_contrast(f1, f2, m1, m2, mode="cosine", pairing="official", backend="reference")
    released = pt.point_cmae_released_loss(f1, f2, m1, m2)
    torch.testing.assert_close(ours, released, atol=2e-6, rtol=1e-5)
    fused = co.point_token_contrast(f1.double(), f2.double(), m1, m2, mode="cosine", pairing="official",
                                    backend="reference")
    torch.testing.assert_close(fused.float(), released, atol=2e-6, rtol=1e-5)
    # The diag pairing is a different loss: the peer check would see a swap.
    diag = co.point_token_contrast(f1, f2, m1, m2, mode="cosine", pairing="diag", backend="reference")
    assert (diag - released).abs() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_reference_accumulates_in_fp32(dtype):
    f1, f2 = _features(2, 6, 4, dtype=dtype)
    m1, m2 = _masks(2, 6, "random")
    out = co.point_token_contrast(f1, f2, m1, m2, backend="reference")
    assert out.dtype == torch.float32
    expected = co.point_token_contrast(f1.double(), f2.double(), m1, m2, backend="reference")
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- fused vs reference


def _run(impl, f1, f2, m1, m2, tau, **kw):
    if impl == "reference":
        return pt.point_token_contrast_reference(f1, f2, m1, m2, 1.0 / tau, **kw)
    return pt._fused_point_token_contrast(f1, f2, m1, m2, 1.0 / tau, backend="reference", **kw)


@pytest.mark.parametrize("mode,pairing,negatives", ALL_COMBOS)
@pytest.mark.parametrize("kind,B,G,D", [("random", 3, 37, 12), ("ragged", 5, 64, 20), ("random", 2, 70, 7),
                                        ("single", 3, 6, 5), ("ragged", 3, 1, 3)])
def test_fused_with_dense_core_matches_reference(mode, pairing, negatives, kind, B, G, D, static_lists):
    f1, f2 = _features(B, G, D)
    m1, m2 = _masks(B, G, kind)
    kw = dict(mode=mode, pairing=pairing, negatives=negatives)
    outs, grads = [], []
    for impl in ("reference", "fused"):
        a = f1.clone().requires_grad_(True)
        b = f2.clone().requires_grad_(True)
        tau = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
        out = _run(impl, a, b, m1, m2, tau, **kw)
        (2.5 * out).backward()  # grad_output != 1
        outs.append(out.detach())
        grads.append((a.grad, b.grad, tau.grad))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=1e-10)
    for g_fused, g_ref, name in zip(grads[1], grads[0], ("f1", "f2", "temperature")):
        if mode == "cosine" and name == "temperature":
            assert g_fused is None and g_ref is None
            continue
        torch.testing.assert_close(g_fused, g_ref, atol=1e-12, rtol=1e-10, msg=lambda m: f"grad {name}: {m}")


def test_fused_non_contiguous_inputs():
    B, G, D = 3, 11, 6
    base1 = torch.randn(B, D, G, dtype=torch.float64)
    base2 = torch.randn(B, D, G, dtype=torch.float64)
    f1, f2 = base1.transpose(1, 2), base2.transpose(1, 2)
    m1, m2 = _masks(B, G, "random")
    for negatives in pt.NEGATIVES:
        a = _run("fused", f1, f2, m1, m2, torch.tensor(0.1, dtype=torch.float64), negatives=negatives)
        b = _run("reference", f1.contiguous(), f2.contiguous(), m1, m2, torch.tensor(0.1, dtype=torch.float64),
                 negatives=negatives)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("static", [False, True], ids=["eager_cut", "static"])
def test_fused_calls_core_once_on_present_first_lists(monkeypatch, static):
    """InfoNCE: one core call on the listed tokens, gathered and then normalized: the co-masked
    tokens first (per-cloud ranges), then, in a static-length list, the other tokens with empty
    ranges; no index lists; cosine: no call."""
    calls = []
    real = pt.sim_lse

    def spy(q, k, scale, **kw):
        calls.append((q.detach().clone(), k.detach().clone(), kw))
        return real(q, k, scale, **kw)

    monkeypatch.setattr(pt, "sim_lse", spy)
    monkeypatch.setattr(present_first, "STATIC", static)
    B, G, D = 4, 10, 3
    f1, f2 = _features(B, G, D)
    m1, m2 = _masks(B, G, "ragged")
    S = m1 & m2
    n = int(S.sum())
    tau = torch.tensor(0.1, dtype=torch.float64)
    expect_idx = S.reshape(-1).nonzero().squeeze(1)
    others = (~S).reshape(-1).nonzero().squeeze(1)
    if static:
        expect_idx = torch.cat([expect_idx, others])
    on = torch.arange(expect_idx.numel()) < n
    _run("fused", f1, f2, m1, m2, tau, negatives="cloud")
    assert len(calls) == 1
    q, k, kw = calls[0]
    assert q.shape == (expect_idx.numel(), D) and k.shape == (expect_idx.numel(), D)  # the listed tokens only
    unit = torch.nn.functional.normalize
    torch.testing.assert_close(q, unit(f1.detach().reshape(B * G, D)[expect_idx], dim=1))
    torch.testing.assert_close(k, unit(f2.detach().reshape(B * G, D)[expect_idx], dim=1))
    assert kw["want_col"] is True
    assert kw.get("row_index") is None and kw.get("col_index") is None
    counts = S.sum(1)
    ends = counts.cumsum(0)
    cloud = expect_idx // G
    assert torch.equal(kw["col_start"].long(), (ends - counts)[cloud])
    assert torch.equal(kw["col_end"].long(), torch.where(on, ends[cloud], (ends - counts)[cloud]))
    calls.clear()
    _run("fused", f1, f2, m1, m2, tau, negatives="batch")
    assert len(calls) == 1 and calls[0][2]["col_start"] is None
    assert torch.equal(calls[0][2]["col_end"].long(), torch.where(on, n, 0))
    calls.clear()
    for pairing in pt.PAIRINGS:
        _run("fused", f1, f2, m1, m2, tau, mode="cosine", pairing=pairing)
    assert calls == []


# ----------------------------------------------------------------------------- empty co-mask


@pytest.mark.parametrize("mode,pairing,negatives", ALL_COMBOS)
@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_empty_comask_is_zero_in_graph(mode, pairing, negatives, impl, static_lists):
    B, G, D = 3, 8, 5
    f1, f2 = _features(B, G, D)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    m1, m2 = _masks(B, G, "empty")
    tau = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    out = _run(impl, f1, f2, m1, m2, tau, mode=mode, pairing=pairing, negatives=negatives)
    assert out.dtype == torch.float64 and out.shape == ()
    assert out.item() == 0.0
    assert out.requires_grad
    (3 * out).backward()
    for g in (f1.grad, f2.grad):
        assert g is not None and torch.equal(g, torch.zeros_like(g))
    if mode == "infonce":
        assert tau.grad is not None and tau.grad.item() == 0.0


# ----------------------------------------------------------------------------- kernel backends


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,pairing,negatives", COMBOS)
@pytest.mark.parametrize("kind,B,G,D", [("random", 6, 37, 24), ("ragged", 4, 70, 20), ("single", 2, 5, 8)])
def test_kernel_backend_matches_reference(backend, dtype, mode, pairing, negatives, kind, B, G, D):
    f1 = torch.randn(B, G, D, device=DEVICE).requires_grad_(True)
    f2 = torch.randn(B, G, D, device=DEVICE).requires_grad_(True)
    m1, m2 = _masks(B, G, kind, device=DEVICE)
    compare_with_reference(co.point_token_contrast, [f1, f2, m1, m2], backend=backend, dtype=dtype,
                           sharpness=1 / 0.1 if mode == "infonce" else 1.0, normalized=True,
                           mode=mode, pairing=pairing, negatives=negatives, temperature=0.1)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("negatives", pt.NEGATIVES)
@pytest.mark.parametrize("kind,B,G,D", [("ragged", 4, 70, 20), ("single", 2, 5, 8), ("empty", 2, 6, 5)])
def test_kernel_backend_static_lists_match_reference(backend, negatives, kind, B, G, D, monkeypatch):
    """Whole static-length token lists (as under torch.compile): the tokens outside S, with empty
    ranges in the kernels, change no value and get no gradient."""
    monkeypatch.setattr(present_first, "STATIC", True)
    f1 = torch.randn(B, G, D, device=DEVICE).requires_grad_(True)
    f2 = torch.randn(B, G, D, device=DEVICE).requires_grad_(True)
    m1, m2 = _masks(B, G, kind, device=DEVICE)
    compare_with_reference(co.point_token_contrast, [f1, f2, m1, m2], backend=backend, dtype=torch.float32,
                           mode="infonce", negatives=negatives, temperature=0.1)


# ----------------------------------------------------------------------------- bad input


def _good():
    f1 = torch.randn(2, 5, 4)
    f2 = torch.randn(2, 5, 4)
    m = torch.ones(2, 5, dtype=torch.bool)
    return f1, f2, m, m.clone()


@pytest.mark.parametrize("change,exc,words", [
    (lambda a: a.update(f1=torch.randn(2, 5)), ValueError, ["f1", "(2, 5)"]),
    (lambda a: a.update(f2=torch.randn(2, 6, 4)), ValueError, ["f1", "f2", "(2, 6, 4)"]),
    (lambda a: a.update(f2=torch.randn(2, 5, 3)), ValueError, ["f2", "(2, 5, 3)"]),
    (lambda a: a.update(f2=torch.randn(2, 5, 4, dtype=torch.float64)), ValueError, ["f2", "float64"]),
    (lambda a: a.update(f1=torch.ones(2, 5, 4, dtype=torch.int64)), TypeError, ["f1", "int64", "(2, 5, 4)"]),
    (lambda a: a.update(f1=torch.randn(0, 5, 4), f2=torch.randn(0, 5, 4),
                        mask1=torch.ones(0, 5, dtype=torch.bool), mask2=torch.ones(0, 5, dtype=torch.bool)),
     ValueError, ["f1", "(0, 5, 4)"]),
    (lambda a: a.update(mask1=torch.ones(2, 5)), ValueError, ["mask1", "float32"]),
    (lambda a: a.update(mask2=torch.ones(2, 4, dtype=torch.bool)), ValueError, ["mask2", "(2, 4)", "(2, 5)"]),
    (lambda a: a.update(mask1=None), ValueError, ["mask1", "(2, 5)"]),
    (lambda a: a.update(mode="dot"), ValueError, ["mode", "'dot'"]),
    (lambda a: a.update(pairing="all"), ValueError, ["pairing", "'all'"]),
    (lambda a: a.update(negatives="global"), ValueError, ["negatives", "'global'"]),
    (lambda a: a.update(backend="gpu"), ValueError, ["backend", "'gpu'"]),
    (lambda a: a.update(temperature=0.0), ValueError, ["temperature"]),
    (lambda a: a.update(temperature=-0.1), ValueError, ["temperature"]),
    (lambda a: a.update(temperature=torch.tensor(-1.0)), ValueError, ["temperature"]),
])
def test_bad_input(change, exc, words):
    f1, f2, m1, m2 = _good()
    args = dict(f1=f1, f2=f2, mask1=m1, mask2=m2)
    change(args)
    kw = {k: args.pop(k) for k in list(args) if k not in ("f1", "f2", "mask1", "mask2")}
    kw.setdefault("backend", "reference")
    with pytest.raises(exc) as info:
        co.point_token_contrast(args["f1"], args["f2"], args["mask1"], args["mask2"], **kw)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_bad_input_device():
    f1, f2, m1, m2 = _good()
    meta = torch.empty(2, 5, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="mask2"):
        co.point_token_contrast(f1, f2, m1, meta, backend="reference")
    with pytest.raises(ValueError, match="f2"):
        co.point_token_contrast(f1, f2.to("meta"), m1, m2, backend="reference")


def test_process_group_without_distributed():
    f1, f2, m1, m2 = _good()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        co.point_token_contrast(f1, f2, m1, m2, backend="reference", process_group=object())


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("mode,pairing,negatives", COMBOS + [("cosine", "official", "cloud")])
def test_inputs_not_modified(impl, mode, pairing, negatives):
    f1, f2 = _features(3, 9, 5)
    m1, m2 = _masks(3, 9, "random")
    tau = torch.tensor(0.1, dtype=torch.float64)
    saved = [t.clone() for t in (f1, f2, m1, m2, tau)]
    a, b = f1.clone().requires_grad_(True), f2.clone().requires_grad_(True)
    _run(impl, a, b, m1, m2, tau, mode=mode, pairing=pairing, negatives=negatives).backward()
    _run(impl, f1, f2, m1, m2, tau, mode=mode, pairing=pairing, negatives=negatives)
    for t, s in zip((f1, f2, m1, m2, tau), saved):
        assert torch.equal(t, s)
    assert torch.equal(a.detach(), f1) and torch.equal(b.detach(), f2)


# ----------------------------------------------------------------------------- defaults and module


def test_auto_backend_and_module_match_reference():
    import warnings

    f1, f2 = _features(3, 12, 10, dtype=torch.float32)
    m1, m2 = _masks(3, 12, "random")
    ref = co.point_token_contrast(f1, f2, m1, m2, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reference fallback notice where no kernel exists
        auto = co.point_token_contrast(f1, f2, m1, m2)
        mod = co.nn.PointTokenContrastLoss(mode="infonce", temperature=0.1)(f1, f2, m1, m2)
    torch.testing.assert_close(auto, ref, atol=2e-5, rtol=2e-4)
    torch.testing.assert_close(mod, ref, atol=2e-5, rtol=2e-4)
    cos = co.nn.PointTokenContrastLoss(mode="cosine", pairing="official", backend="reference")(f1, f2, m1, m2)
    torch.testing.assert_close(cos, co.point_token_contrast(f1, f2, m1, m2, mode="cosine", pairing="official",
                                                            backend="reference"))
