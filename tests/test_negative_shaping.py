"""Negative shaping: ``hard_negative_beta`` (HCL) and ``debias_tau_plus`` (debiased CL) on info_nce and nt_xent.

Every backend that runs here (the reference, the fused composition on the dense core, the C++ CPU
kernels, the Triton kernels under the interpreter) is checked against brute-force float64 formulas
written below one anchor at a time from SPEC ("Negative shaping"): values and the gradients of the
features, of a queue that requires grad, and of a tensor temperature.  The NT-Xent form is also
checked against the HCL criterion as released (joshr17/HCL, ``image/main.py``), re-typed below.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import info_nce as inm
from contrastive_ops.testing import assert_close
from test_queue import BACKENDS, _RecordingDenseSimLSE, _rand, bf_info_nce, bf_nt_xent, check_against_brute_force
from helpers import compare_with_reference, serve_dense_primitive

F64 = torch.float64


# --------------------------------------------------------------------------- brute force (float64)


def _unit(x, normalize):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) if normalize else x


def _reduce(values, reduction):
    return {"none": values, "sum": values.sum(), "mean": values.mean()}[reduction]


def shaped_term(pos, negs, tau, beta, tau_plus):
    """One anchor, as SPEC writes it: p = e^{pos}; reweighted = M·Σ_j e^{(1+β)s_j} / Σ_j e^{β s_j};
    Ng = max((reweighted − τ⁺·M·p)/(1−τ⁺), M·e^{−1/τ}); ℓ = −log(p/(p + Ng)).  Also returns whether the clamp won."""
    M = len(negs)
    p = torch.exp(pos)
    if M == 0:
        return -torch.log(p / p), False
    num = sum(torch.exp((1 + beta) * s) for s in negs)
    den = sum(torch.exp(beta * s) for s in negs)
    reweighted = M * num / den
    debiased = (reweighted - tau_plus * M * p) / (1 - tau_plus)
    bound = M * torch.exp(-1 / torch.as_tensor(tau, dtype=pos.dtype))
    Ng = torch.maximum(debiased, bound)
    return -torch.log(p / (p + Ng)), bool(debiased < bound)


def bf_info_nce_shaped(query, key, temperature, queue=None, *, targets=None, symmetric=False, in_batch_negatives=True,
                       normalize=True, reduction="mean", hard_negative_beta=0.0, debias_tau_plus=0.0, clamped=None):
    """Negatives of query i: every key but its positive (if in_batch_negatives) and every queue entry.
    symmetric: ½(row + column), the column anchor key i with the other queries as negatives."""
    tau, beta, tp = temperature, hard_negative_beta, debias_tau_plus
    qn, kn = _unit(query, normalize), _unit(key, normalize)
    Qn = [] if queue is None else list(_unit(queue, normalize))
    rows = []
    for i in range(query.shape[0]):
        t = i if targets is None else int(targets[i])
        pos = qn[i] @ kn[t] / tau
        negs = [qn[i] @ kn[j] / tau for j in range(key.shape[0]) if j != t] if in_batch_negatives else []
        negs += [qn[i] @ c / tau for c in Qn]
        val, hit = shaped_term(pos, negs, tau, beta, tp)
        if symmetric:
            col, hit_c = shaped_term(pos, [kn[i] @ qn[j] / tau for j in range(query.shape[0]) if j != i], tau, beta, tp)
            val, hit = 0.5 * (val + col), hit or hit_c
        rows.append(val)
        if clamped is not None:
            clamped.append(hit)
    return _reduce(torch.stack(rows), reduction)


def bf_nt_xent_shaped(z1, z2, temperature, queue=None, *, normalize=True, reduction="mean", hard_negative_beta=0.0,
                      debias_tau_plus=0.0, clamped=None):
    """Negatives of anchor a: the 2N−2 embeddings other than itself and its other view, and every queue entry."""
    tau, N = temperature, z1.shape[0]
    Z = torch.cat([_unit(z1, normalize), _unit(z2, normalize)])
    Qn = [] if queue is None else list(_unit(queue, normalize))
    rows = []
    for a in range(2 * N):
        partner = (a + N) % (2 * N)
        negs = [Z[a] @ Z[b] / tau for b in range(2 * N) if b not in (a, partner)] + [Z[a] @ c / tau for c in Qn]
        val, hit = shaped_term(Z[a] @ Z[partner] / tau, negs, tau, hard_negative_beta, debias_tau_plus)
        rows.append(val)
        if clamped is not None:
            clamped.append(hit)
    return _reduce(torch.stack(rows), reduction)


def hcl_criterion(out_1, out_2, tau_plus, batch_size, beta, temperature):
    """``criterion`` of joshr17/HCL ``image/main.py`` (estimator="hard"), re-typed in float64 on CPU.

    Changes: ``temperature`` is an argument (a module global there), the mask is built on the inputs'
    device, the 'easy' estimator is left out.  ``out_1``/``out_2`` are the model's normalized outputs.
    """
    negative_mask = torch.ones((batch_size, 2 * batch_size), dtype=bool)
    for i in range(batch_size):
        negative_mask[i, i] = 0
        negative_mask[i, i + batch_size] = 0
    mask = torch.cat((negative_mask, negative_mask), 0)

    out = torch.cat([out_1, out_2], dim=0)
    neg = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    neg = neg.masked_select(mask).view(2 * batch_size, -1)
    pos = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos = torch.cat([pos, pos], dim=0)
    N = batch_size * 2 - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    Ng = (-tau_plus * N * pos + reweight_neg) / (1 - tau_plus)
    Ng = torch.clamp(Ng, min=N * np.e ** (-1 / temperature))
    return (-torch.log(pos / (pos + Ng))).mean()


SHAPES = [
    pytest.param(dict(hard_negative_beta=1.0), id="hcl"),
    pytest.param(dict(debias_tau_plus=0.1), id="debiased"),
    pytest.param(dict(hard_negative_beta=0.5, debias_tau_plus=0.1), id="hcl+debiased"),
    pytest.param(dict(hard_negative_beta=2.0, debias_tau_plus=0.6), id="clamped"),
]


def _aligned_keys(query, seed):
    """Keys near their queries for the first half of the rows: large positives, so that τ⁺ drives some
    Ng_i under the bound M·e^{−1/τ} while others stay above it."""
    k = _rand(*query.shape, seed=seed)
    h = query.shape[0] // 2
    return torch.cat([query[:h].detach() * 3 + 0.1 * k[:h], k[h:]])


def _assert_clamp_mix(brute, args, kw):
    """The 'clamped' cases do exercise both sides of the max (else the test could not catch a broken clamp)."""
    hits = []
    plain = {n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in args.items()}
    brute(**plain, **kw, clamped=hits)
    assert any(hits) and not all(hits), hits


# --------------------------------------------------------------------------- values and gradients

INFO_OPTIONS = [
    dict(queue=False, in_batch_negatives=True, targets=False, symmetric=False, normalize=True, reduction="mean"),
    dict(queue=True, in_batch_negatives=True, targets=True, symmetric=False, normalize=False, reduction="none"),
    dict(queue=True, in_batch_negatives=False, targets=False, symmetric=False, normalize=True, reduction="sum"),
    dict(queue=False, in_batch_negatives=True, targets=False, symmetric=True, normalize=True, reduction="none"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opt", INFO_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_info_nce_shaped_matches_brute_force(backend, shape, opt):
    B, M, K, D = 5, (7 if opt["targets"] else 5), 6, 8
    scale = 1.0 if opt["normalize"] else 0.4
    query = _rand(B, D, seed=1) * scale
    key = _aligned_keys(query, 2) if opt["targets"] is False else _rand(M, D, seed=2) * scale
    args = dict(query=query.requires_grad_(), key=key.requires_grad_(),
                temperature=torch.tensor(0.3, dtype=F64, requires_grad=True))
    if opt["queue"]:
        args["queue"] = (_rand(K, D, seed=3) * scale).requires_grad_()
    kw = dict(in_batch_negatives=opt["in_batch_negatives"], normalize=opt["normalize"], reduction=opt["reduction"],
              symmetric=opt["symmetric"], **shape)
    if opt["targets"]:
        kw["targets"] = torch.randperm(M, generator=torch.Generator().manual_seed(4))[:B]
    if shape.get("debias_tau_plus", 0) >= 0.5 and not opt["targets"]:
        _assert_clamp_mix(bf_info_nce_shaped, args, kw)
    check_against_brute_force("info_nce", backend, args, bf_info_nce_shaped, **kw)


NT_OPTIONS = [
    dict(queue=False, normalize=True, reduction="mean"),
    dict(queue=True, normalize=False, reduction="none"),
    dict(queue=True, normalize=True, reduction="sum"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opt", NT_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_nt_xent_shaped_matches_brute_force(backend, shape, opt):
    N, K, D = 4, 5, 8
    scale = 1.0 if opt["normalize"] else 0.4
    z1 = _rand(N, D, seed=1) * scale
    args = dict(z1=z1.requires_grad_(), z2=(_aligned_keys(z1, 2) * (1.0 if opt["normalize"] else 0.3)).requires_grad_(),
                temperature=torch.tensor(0.4, dtype=F64, requires_grad=True))
    if opt["queue"]:
        args["queue"] = (_rand(K, D, seed=3) * scale).requires_grad_()
    kw = dict(normalize=opt["normalize"], reduction=opt["reduction"], **shape)
    if shape.get("debias_tau_plus", 0) >= 0.5:
        _assert_clamp_mix(bf_nt_xent_shaped, args, kw)
    check_against_brute_force("nt_xent", backend, args, bf_nt_xent_shaped, **kw)


# --------------------------------------------------------------------------- the released HCL code


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "composition"])
@pytest.mark.parametrize("beta,tau_plus", [(1.0, 0.1), (0.5, 0.0), (0.0, 0.1), (2.0, 0.5)])
def test_nt_xent_is_the_hcl_criterion(backend, beta, tau_plus):
    """nt_xent(hard_negative_beta=β, debias_tau_plus=τ⁺) on normalized features is joshr17/HCL's criterion."""
    dt = F64 if backend == "reference" else torch.float32
    N, D, tau = 6, 16, 0.5
    g = torch.Generator().manual_seed(7)
    base = torch.randn(N, D, generator=g)
    z1 = F.normalize(base + 0.5 * torch.randn(N, D, generator=g), dim=1).to(dt).requires_grad_()
    z2 = F.normalize(base + 0.5 * torch.randn(N, D, generator=g), dim=1).to(dt).requires_grad_()
    ours = co.nt_xent(z1, z2, tau, hard_negative_beta=beta, debias_tau_plus=tau_plus, backend=backend)
    o1, o2 = (z.detach().double().requires_grad_() for z in (z1, z2))
    theirs = hcl_criterion(F.normalize(o1, dim=1), F.normalize(o2, dim=1), tau_plus, N, beta, tau)
    assert_close(ours, theirs, dt, what="HCL loss")
    for a, b in zip(torch.autograd.grad(ours * 2, (z1, z2)), torch.autograd.grad(theirs * 2, (o1, o2))):
        assert_close(a, b, dt, what="HCL gradient")


# --------------------------------------------------------------------------- β = τ⁺ = 0


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "composition"])
@pytest.mark.parametrize("queue", [False, True])
def test_zero_beta_and_tau_plus_is_the_plain_loss(backend, queue):
    """β = τ⁺ = 0 passed explicitly gives exactly (bitwise) what the call without them gives."""
    dt = F64 if backend == "reference" else torch.float32
    q, k = _rand(5, 8, seed=1).to(dt), _rand(5, 8, seed=2).to(dt)
    Q = _rand(4, 8, seed=3).to(dt) if queue else None
    for kw in (dict(), dict(targets=torch.tensor([4, 0, 1, 1, 2])), dict(normalize=False)):
        assert torch.equal(co.info_nce(q, k, 0.2, queue=Q, hard_negative_beta=0.0, debias_tau_plus=0.0,
                                       reduction="none", backend=backend, **kw),
                           co.info_nce(q, k, 0.2, queue=Q, reduction="none", backend=backend, **kw))
    assert torch.equal(co.nt_xent(q, k, 0.2, queue=Q, hard_negative_beta=0, debias_tau_plus=0.0, reduction="none",
                                  backend=backend),
                       co.nt_xent(q, k, 0.2, queue=Q, reduction="none", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shaped_path_tends_to_the_plain_loss(backend):
    """The shaped path itself (β = 1e-300 > 0, τ⁺ = 0) on normalized features equals the plain loss: the
    formula's β = τ⁺ = 0 limit (SPEC), not only the dispatch to the plain path."""
    dt = F64 if backend in ("reference", "composition") else torch.float32
    q, k, Q = (_rand(5, 8, seed=s).to(dt) for s in (1, 2, 3))
    tiny = dict(hard_negative_beta=1e-300)
    if backend == "composition":
        got = inm._fused_info_nce(q, k, 0.2, queue=Q, reduction="none", backend="reference", **tiny)
        got_nt = inm._fused_nt_xent(q, k, 0.2, queue=Q, reduction="none", backend="reference", **tiny)
    else:
        got = co.info_nce(q, k, 0.2, queue=Q, reduction="none", backend=backend, **tiny)
        got_nt = co.nt_xent(q, k, 0.2, queue=Q, reduction="none", backend=backend, **tiny)
    qd, kd, Qd = q.double(), k.double(), Q.double()
    assert_close(got, bf_info_nce(qd, kd, 0.2, Qd, reduction="none"), dt, what="info_nce")
    assert_close(got_nt, bf_nt_xent(qd, kd, 0.2, Qd, reduction="none"), dt, what="nt_xent")


def test_brute_force_at_zero_is_the_plain_brute_force():
    """Sanity of the oracle: the shaped brute force at β = τ⁺ = 0 (normalized) is the plain one."""
    q, k, Q = (_rand(5, 8, seed=s) for s in (1, 2, 3))
    torch.testing.assert_close(bf_info_nce_shaped(q, k, 0.2, Q, reduction="none"),
                               bf_info_nce(q, k, 0.2, Q, reduction="none"))
    torch.testing.assert_close(bf_nt_xent_shaped(q, k, 0.2, Q, reduction="none"),
                               bf_nt_xent(q, k, 0.2, Q, reduction="none"))


# --------------------------------------------------------------------------- the core calls


_RecordingSimLSE = _RecordingDenseSimLSE  # the recording dense primitive; it returns the column LSE's gradient too


@pytest.mark.parametrize("beta,tau_plus,per_block", [(1.0, 0.0, 2), (0.5, 0.2, 2), (0.0, 0.2, 1)])
@pytest.mark.parametrize("loss", ["info_nce", "moco", "nt_xent", "symmetric"])
def test_shaping_core_calls(monkeypatch, loss, beta, tau_plus, per_block):
    """Through the kernel interface: one core call per candidate block and scale ((1+β)/τ, and β/τ only when
    β > 0), each on the (n, D) block itself (no concatenation, nothing B×M), and the brute-force value."""
    prim = serve_dense_primitive(monkeypatch, _RecordingSimLSE())
    B, K, D = 5, 7, 6
    a, b = _rand(B, D, seed=1).requires_grad_(), _rand(B, D, seed=2).requires_grad_()
    Q = _rand(K, D, seed=3).requires_grad_()
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    kw = dict(hard_negative_beta=beta, debias_tau_plus=tau_plus, reduction="none")
    if loss == "nt_xent":
        out = inm._fused_nt_xent(a, b, tau, queue=Q, backend="dense", **kw)
        exact = bf_nt_xent_shaped(a, b, tau, Q, **kw)
        blocks = [(2 * B, D), (K, D)]
    elif loss == "symmetric":
        out = inm._fused_info_nce(a, b, tau, symmetric=True, backend="dense", **kw)
        exact = bf_info_nce_shaped(a, b, tau, symmetric=True, **kw)
        blocks = [(B, D)]
    else:
        ib = loss == "info_nce"
        out = inm._fused_info_nce(a, b, tau, queue=Q, in_batch_negatives=ib, backend="dense", **kw)
        exact = bf_info_nce_shaped(a, b, tau, Q, in_batch_negatives=ib, **kw)
        blocks = [(B, D), (K, D)] if ib else [(K, D)]
    assert sorted(prim.candidates) == sorted(blocks * per_block)
    assert_close(out, exact, F64, what=loss)
    w = torch.randn(exact.shape, dtype=F64, generator=torch.Generator().manual_seed(5))
    for g, e in zip(torch.autograd.grad((out * w).sum(), (a, b, Q, tau), allow_unused=True),
                    torch.autograd.grad((exact * w).sum(), (a, b, Q, tau), allow_unused=True)):
        if e is None:
            assert g is None or not g.any()
        else:
            assert_close(g, e, F64, what=f"{loss} gradient")


# --------------------------------------------------------------------------- edge cases and bad input


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] != "composition"])
def test_no_negatives_is_zero(backend):
    """MoCo with an empty queue has no negatives: Ng = 0, so ℓ = 0, still in the graph."""
    dt = F64 if backend == "reference" else torch.float32
    q, k = _rand(3, 4, seed=1).to(dt).requires_grad_(), _rand(3, 4, seed=2).to(dt)
    out = co.info_nce(q, k, queue=q.new_zeros(0, 4), in_batch_negatives=False, hard_negative_beta=1.0,
                      debias_tau_plus=0.1, backend=backend)
    assert out.item() == 0 and out.requires_grad


@pytest.mark.parametrize("fn", ["info_nce", "nt_xent"])
@pytest.mark.parametrize("name,value", [
    ("debias_tau_plus", 1.0), ("debias_tau_plus", -0.1), ("debias_tau_plus", float("nan")), ("debias_tau_plus", "0.1"),
    ("hard_negative_beta", -0.5), ("hard_negative_beta", float("inf")), ("hard_negative_beta", float("nan")),
    ("hard_negative_beta", True),
])
def test_bad_shaping_arguments(fn, name, value):
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=name):
        getattr(co, fn)(q, k, **{name: value}, backend="reference")


def test_modules_take_the_shaping_arguments():
    q, k = _rand(4, 8, seed=1), _rand(4, 8, seed=2)
    kw = dict(hard_negative_beta=1.0, debias_tau_plus=0.1, backend="reference")
    torch.testing.assert_close(co.nn.InfoNCELoss(0.2, **kw)(q, k), co.info_nce(q, k, 0.2, **kw))
    torch.testing.assert_close(co.nn.NTXentLoss(0.2, **kw)(q, k), co.nt_xent(q, k, 0.2, **kw))
    with pytest.raises(ValueError, match="debias_tau_plus"):
        co.nn.NTXentLoss(0.2, debias_tau_plus=1.5)(q, k)


def test_large_logits_stay_finite():
    """τ = 0.01 on aligned normalized features: logits near 1/τ = 100 overflow e^{(1+β)s} in fp32; the
    log-domain composition and the shifted reference stay finite and agree."""
    q = _rand(6, 8, seed=1)
    k = _aligned_keys(q, 2)
    for backend in [p.values[0] for p in BACKENDS if p.values[0] not in ("composition",) and not p.marks]:
        for tp in (0.0, 0.3):
            out = co.nt_xent(q.float(), k.float(), 0.01, hard_negative_beta=1.0, debias_tau_plus=tp,
                             reduction="none", backend=backend)
            exact = bf_nt_xent_shaped(q, k, 0.01, hard_negative_beta=1.0, debias_tau_plus=tp, reduction="none")
            assert torch.isfinite(out).all(), (backend, out)
            assert_close(out, exact, torch.float32, what=f"{backend} at tau=0.01")
    assert math.isfinite(float(co.info_nce(q.float(), k.float(), 0.01, hard_negative_beta=3.0, backend="reference")))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] not in ("reference", "composition")])
@pytest.mark.parametrize("fn", ["info_nce", "nt_xent"])
def test_half_precision_against_reference(fn, backend, dtype):
    """fp16/bf16 inputs at τ = 0.05 on the kernels: loss and gradients within the half-precision rule of
    ``compare_with_reference`` (the kernel's error against the exact loss at most a few times the
    reference's own error in the same dtype), and fp32 losses."""
    from contrastive_ops import backends

    if dtype not in backends.backend_module(backend).dtypes():
        pytest.skip(f"{backend} does not take {dtype}")
    q = _rand(6, 16, seed=1)
    k = _aligned_keys(q, 2)
    Q = _rand(5, 16, seed=3)
    tensors = [q.float().requires_grad_(), k.float().requires_grad_(), Q.float()]
    kw = dict(hard_negative_beta=1.0, debias_tau_plus=0.1, reduction="none")
    call = (lambda a, b, c, **kw_: co.info_nce(a, b, 0.05, queue=c, **kw_)) if fn == "info_nce" else \
        (lambda a, b, c, **kw_: co.nt_xent(a, b, 0.05, queue=c, **kw_))
    out, _ = compare_with_reference(call, tensors, backend=backend, dtype=dtype, sharpness=20.0, normalized=True, **kw)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("backend", [p for p in BACKENDS if p.values[0] == "cpu"])
def test_shaped_losses_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) (aot_eager) of the shaped compositions: no graph break, same values and
    gradients as eager."""
    q, k, Q = (_rand(6, 8, seed=s).float() for s in (1, 2, 3))
    kw = dict(hard_negative_beta=1.0, debias_tau_plus=0.1, backend=backend, reduction="none")
    fns = [lambda a, b: co.nt_xent(a, b, 0.2, queue=Q, **kw),
           lambda a, b: co.info_nce(a, b, 0.2, symmetric=True, **kw),
           lambda a, b: co.info_nce(a, b, 0.2, queue=Q, in_batch_negatives=False, **kw)]
    for f in fns:
        torch._dynamo.reset()
        ins = [t.clone().requires_grad_() for t in (q, k)]
        eager = [t.clone().requires_grad_() for t in (q, k)]
        got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(*ins), f(*eager)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got.sum(), ins), torch.autograd.grad(want.sum(), eager)):
            torch.testing.assert_close(a, b)
