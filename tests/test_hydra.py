"""hydra_loss: a float64 loop over anchors, positives and negatives (values and gradients of features,
gates and temperature), the official code re-typed (its row-mean centring: same loss, overflows), the
fused composition (``gating="simlap"``) on every kernel backend, ``gating="filter"`` on the triton and
cpu backends (the ``gated_lse`` primitive, its kernels against the float64 reference) and the error of
the backend without it (cuda), the module, bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import hydra as hy
from helpers import DEVICE, backend_params, compare_with_reference

F64 = torch.float64


def _batch(B=10, D=6, classes=4, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, dtype=F64)
    k = torch.randn(B, D, generator=g, dtype=F64)
    gate = torch.rand(B, D, generator=g, dtype=F64) * 0.9 + 0.05
    y1 = torch.randint(0, classes, (B,), generator=g)
    posy = y1[torch.randperm(B, generator=g)]
    return [t.to(dtype) for t in (z, k, gate)] + [y1, posy]


def loop_hydra(z, k, gate, y1, posy, tau, *, positives="c2", gating="filter"):
    """Per anchor i and key j, literally: the gated, normalized pair, its logit, the classes; for each
    positive j: log(e^{l_ij} + Σ_{neg} e^{l_ik}) − l_ij.  Returns (per-anchor sums (B,), sum / #pairs)."""
    B, M = z.shape[0], k.shape[0]

    def logit(i, j):
        if gating == "filter":
            a = F.normalize(z[i] * gate[i], dim=0)
            b = F.normalize(k[j] * gate[i], dim=0)
            return a @ b / tau
        return (F.normalize(z[i], dim=0) * gate[i] * gate[i]) @ F.normalize(k[j], dim=0) / tau

    vals, npairs = [], 0
    for i in range(B):
        c1 = [int(y1[j]) == int(y1[i]) for j in range(M)]
        c2 = [int(y1[j]) == int(posy[i]) for j in range(M)]
        l = [logit(i, j) for j in range(M)]
        neg = [l[j] for j in range(M) if not (c1[j] or c2[j])]
        pos = [j for j in range(M) if (c2[j] if positives == "c2" else (c1[j] or c2[j]))]
        v = z.new_zeros(())
        for j in pos:
            v = v + torch.log(torch.exp(l[j]) + sum(torch.exp(x) for x in neg)) - l[j]
        npairs += len(pos)
        vals.append(v)
    vals = torch.stack(vals)
    return vals, vals.sum() / max(npairs, 1)


# ------------------------------------------------------------------------------------------
# The official code, re-typed line by line (float64 here).
#   erow/hydra moco/builder.py @ d3cdb34a7e575fff29f191ca8153e5c9f1ef8ee5: MoCo.disparate_loss,
#     multipos_ce_loss; an earlier revision of the same file: multipos_ce_loss(logits, class_mask, class_mask)
#   erow/hydra moco/filter.py @ 1b2d26ed7e5c9c200c543e99a7803b083605111f: Filter.forward, Filter.contrast
#   erow/vitookit simlap.py @ f6a80579c478a19e69625ed9e9a1887701ddff68: SimLAP.disparate_loss,
#     multipos_ce_loss(logits, pos_mask, neg_mask), contrast
# (one process: concat_all_gather is the identity; the gate network's output is passed in.)
# ------------------------------------------------------------------------------------------


def builder_multipos_ce_loss(logits, pos_mask, exclude_mask=None):
    if exclude_mask is None:
        exclude_mask = pos_mask
    logits = logits - logits.mean(1, keepdim=True)
    similarity = logits.exp()
    neg = (similarity * (~exclude_mask)).sum(1, keepdim=True)
    loss = torch.sum(pos_mask * (torch.log(similarity + neg) - logits)) / pos_mask.sum()
    return loss.mean()


def filter_forward(x1, x2, gate):
    x1 = torch.einsum("bk,bk->bk", x1, gate)
    x2 = torch.einsum("nk,bk->bnk", x2, gate)
    x1 = F.normalize(x1, p=2, dim=-1)
    x2 = F.normalize(x2, p=2, dim=-1)
    return x1, x2


def filter_contrast(x1, x2):
    return torch.einsum("bj,bnj->bn", x1, x2)


def builder_disparate_loss(z1, k2, gate, y1, posy, scale, *, union=False):
    fz1, fz2 = filter_forward(z1, k2, gate)
    logits = scale * filter_contrast(fz1, fz2)
    c1_mask = (y1.unsqueeze(1) == y1.unsqueeze(0))  # exclude samples from y1
    c2_mask = (posy.unsqueeze(1) == y1.unsqueeze(0))  # exclude samples from y2
    class_mask = c1_mask | c2_mask
    if union:  # the earlier revision
        return builder_multipos_ce_loss(logits, class_mask, class_mask)
    return builder_multipos_ce_loss(logits, c2_mask, class_mask)


def simlap_multipos_ce_loss(logits, pos_mask, neg_mask=None):
    if neg_mask is None:
        neg_mask = ~pos_mask
    logits = logits - logits.mean(1, keepdim=True)
    similarity = logits.exp()
    neg = (similarity * neg_mask).sum(1, keepdim=True)
    loss = torch.sum(pos_mask * (torch.log(similarity + neg) - logits)) / pos_mask.sum()
    return loss.mean()


def simlap_disparate_loss(z1, k2, gate, y1, posy, s):
    z1 = F.normalize(z1, p=2, dim=-1)
    k2 = F.normalize(k2, p=2, dim=-1)
    logits = (z1 * gate * gate) @ k2.t() * s
    c1_mask = (y1.unsqueeze(1) == y1.unsqueeze(0))
    c2_mask = (posy.unsqueeze(1) == y1.unsqueeze(0))
    class_mask = c1_mask | c2_mask
    neg_mask = ~class_mask
    return simlap_multipos_ce_loss(logits, c2_mask, neg_mask)


# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gating", ["filter", "simlap"])
@pytest.mark.parametrize("positives", ["c2", "class"])
@pytest.mark.parametrize("seed", [0, 1])
def test_reference_matches_loop(gating, positives, seed):
    z, k, g, y1, posy = _batch(seed=seed)
    z, k, g = (t.requires_grad_(True) for t in (z, k, g))
    tau = torch.tensor(0.3, dtype=F64, requires_grad=True)
    vals, mean = loop_hydra(z, k, g, y1, posy, tau, positives=positives, gating=gating)
    ours = lambda red: co.hydra_loss(z, k, g, y1, posy, tau, positives=positives, gating=gating,  # noqa: E731
                                     reduction=red, backend="reference")
    torch.testing.assert_close(ours("none"), vals.detach())
    torch.testing.assert_close(ours("sum"), vals.sum().detach())
    out = ours("mean")
    torch.testing.assert_close(out, mean.detach())
    for a, b in zip(torch.autograd.grad(2 * out, (z, k, g, tau)), torch.autograd.grad(2 * mean, (z, k, g, tau))):
        torch.testing.assert_close(a, b)


def test_gradcheck_reference_filter():
    z, k, g, y1, posy = _batch(B=6, D=3, classes=3, seed=4)
    inputs = tuple(t.requires_grad_(True) for t in (z, k, g))
    assert torch.autograd.gradcheck(lambda a, b, c: co.hydra_loss(a, b, c, y1, posy, 0.5, backend="reference"),
                                    inputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_official_code(seed):
    """Builder (filter gating; c2 positives, and the earlier revision's class positives) and simlap equal
    the reference; the code's learnable scale is a temperature tensor 1/scale."""
    z, k, g, y1, posy = _batch(B=12, seed=seed)
    scale = torch.tensor(20.0, dtype=F64)
    tau = 1 / scale
    torch.testing.assert_close(co.hydra_loss(z, k, g, y1, posy, tau, backend="reference"),
                               builder_disparate_loss(z, k, g, y1, posy, scale))
    torch.testing.assert_close(co.hydra_loss(z, k, g, y1, posy, tau, positives="class", backend="reference"),
                               builder_disparate_loss(z, k, g, y1, posy, scale, union=True))
    torch.testing.assert_close(co.hydra_loss(z, k, g, y1, posy, 0.1, gating="simlap", backend="reference"),
                               simlap_disparate_loss(z, k, g, y1, posy, 1 / 0.1))
    # the two gatings are different losses
    assert (co.hydra_loss(z, k, g, y1, posy, 0.1, backend="reference")
            - co.hydra_loss(z, k, g, y1, posy, 0.1, gating="simlap", backend="reference")).abs() > 1e-3


def test_official_code_overflows_where_the_lse_does_not():
    """Row-mean centring then exp: in fp32 a row spread over ~90 around its mean overflows (inf/nan);
    the LSE form stays finite and equals the float64 loss."""
    z, k, g, y1, posy = _batch(B=12, seed=3)
    g = torch.ones_like(g)
    tau = 0.005
    code = simlap_disparate_loss(z.float(), k.float(), g.float(), y1, posy, 1 / tau)
    assert not torch.isfinite(code)
    exact = co.hydra_loss(z, k, g, y1, posy, tau, gating="simlap", backend="reference")
    for backend in ["reference"] + [p.values[0] for p in backend_params() if not p.marks]:
        out = co.hydra_loss(z.float().to(DEVICE), k.float().to(DEVICE), g.float().to(DEVICE), y1.to(DEVICE),
                            posy.to(DEVICE), tau, gating="simlap", backend=backend)
        assert torch.isfinite(out), backend
        torch.testing.assert_close(out.double().cpu(), exact, rtol=1e-5, atol=1e-4)


def _edge_labels():
    """Anchors whose posy equals y1, a posy absent from the keys (no positive), rows without negatives."""
    y1 = torch.tensor([0, 0, 1, 1, 2, 3, 3, 0])
    posy = torch.tensor([0, 1, 1, 3, 7, 0, 2, 3])
    return y1, posy


@pytest.mark.parametrize("positives", ["c2", "class"])
@pytest.mark.parametrize("labels", ["random", "edge"])
def test_reference_edge_labels(positives, labels):
    z, k, g, y1, posy = _batch(B=8, seed=5)
    if labels == "edge":
        y1, posy = _edge_labels()
    z.requires_grad_(True)
    vals, mean = loop_hydra(z, k, g, y1, posy, 0.2, positives=positives, gating="simlap")
    out = co.hydra_loss(z, k, g, y1, posy, 0.2, positives=positives, gating="simlap", backend="reference")
    torch.testing.assert_close(out, mean.detach())
    torch.testing.assert_close(torch.autograd.grad(out, z)[0], torch.autograd.grad(mean, z)[0])


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("positives", ["c2", "class"])
@pytest.mark.parametrize("labels", ["random", "edge", "one_class"])
def test_kernel_backends_match_loop(backend, positives, labels):
    B = 8 if labels == "edge" else 13
    z, k, g, y1, posy = _batch(B=B, D=5, classes=4, seed=6)
    if labels == "edge":
        y1, posy = _edge_labels()
    elif labels == "one_class":  # every key is a positive: no negatives anywhere
        y1 = posy = torch.zeros(B, dtype=torch.long)
    z64, k64, g64 = (t.clone().requires_grad_(True) for t in (z, k, g))
    vals, mean = loop_hydra(z64, k64, g64, y1, posy, 0.2, positives=positives, gating="simlap")
    dev = [t.float().to(DEVICE).requires_grad_(True) for t in (z, k, g)]
    yd, pd = y1.to(DEVICE), posy.to(DEVICE)
    kw = dict(positives=positives, gating="simlap", backend=backend)
    out = co.hydra_loss(*dev, yd, pd, 0.2, reduction="none", **kw)
    torch.testing.assert_close(out.double().cpu(), vals.detach(), rtol=1e-5, atol=1e-5)
    out = co.hydra_loss(*dev, yd, pd, 0.2, **kw)
    torch.testing.assert_close(out.double().cpu(), mean.detach(), rtol=1e-5, atol=1e-5)
    (2 * out).backward()
    (2 * mean).backward()
    for a, b in zip(dev, (z64, k64, g64)):
        torch.testing.assert_close(a.grad.double().cpu(), b.grad, rtol=1e-4, atol=1e-5)


def test_no_positive_pair_gives_zero_in_the_graph():
    z, k, g, _, _ = _batch(B=4)
    z.requires_grad_(True)
    y1, posy = torch.tensor([0, 1, 2, 3]), torch.tensor([9, 9, 9, 9])
    for backend in ["reference"] + [p.values[0] for p in backend_params() if not p.marks]:
        out = co.hydra_loss(z.float(), k.float(), g.float(), y1, posy, gating="simlap", backend=backend)
        assert out.item() == 0.0 and out.requires_grad


def _hydra(z, k, g, y1, posy, *, backend, **kw):
    return co.hydra_loss(z, k, g, y1, posy, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_backends_match_reference(backend, dtype):
    B = 37
    z, k, g, y1, posy = _batch(B=B, D=16, classes=6, seed=7, dtype=torch.float32)
    ts = [t.to(DEVICE).requires_grad_(True) for t in (z, k, g)] + [y1.to(DEVICE), posy.to(DEVICE)]
    for reduction in ("mean", "none"):
        for positives in ("c2", "class"):
            compare_with_reference(_hydra, ts, backend=backend, dtype=dtype, temperature=0.1, gating="simlap",
                                   positives=positives, reduction=reduction, sharpness=10.0, normalized=True)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.values[0] not in ("triton", "cpu")])
def test_kernel_backend_names_what_the_primitive_lacks(backend):
    z, k, g, y1, posy = _batch(B=6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="per-pair norm.*gated_lse primitive, which backend"):
        co.hydra_loss(z.to(DEVICE), k.to(DEVICE), g.to(DEVICE), y1.to(DEVICE), posy.to(DEVICE), backend=backend)


def test_auto_takes_the_reference_for_the_filter_gating(monkeypatch):
    """With no kernel backend of the priority that has gated_lse (here the cpu backend's table without
    it), "auto" takes the reference, with a warning given once."""
    from contrastive_ops import backends
    from contrastive_ops.backends import _cext

    if backends.resolve("auto", op="hydra_loss", tensors=[torch.zeros(1, device=DEVICE)]) == "reference":
        pytest.skip("no kernel backend here")
    monkeypatch.delitem(_cext.CPU_ONLY_PRIMITIVES, "gated_lse", raising=False)
    monkeypatch.setitem(backends.AUTO_PRIORITY, DEVICE.type,
                        tuple(b for b in backends.AUTO_PRIORITY[DEVICE.type] if b != "triton"))
    monkeypatch.setattr(hy, "_WARNED", set())
    ts = [t.to(DEVICE) for t in _batch(B=6, dtype=torch.float32)]
    with pytest.warns(RuntimeWarning, match="gating='filter'"):
        out = co.hydra_loss(*ts, backend="auto")
    torch.testing.assert_close(out, co.hydra_loss(*ts, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        co.hydra_loss(*ts, backend="auto")  # said once
        co.hydra_loss(*ts, gating="simlap", backend="auto")  # composed: no warning


def test_module():
    ts = _batch(B=8, dtype=torch.float32)
    m = co.nn.HydraLoss(0.2, positives="class", gating="simlap", backend="reference")
    torch.testing.assert_close(m(*ts), co.hydra_loss(*ts, 0.2, positives="class", gating="simlap",
                                                     backend="reference"))
    assert "gating='simlap'" in repr(m)


def test_inputs_not_modified():
    z, k, g, y1, posy = _batch(B=8, dtype=torch.float32)
    z.requires_grad_(True)
    before = [t.detach().clone() for t in (z, k, g, y1, posy)]
    for backend in ["reference"] + [p.values[0] for p in backend_params() if not p.marks]:
        co.hydra_loss(z, k, g, y1, posy, gating="simlap", backend=backend).backward()
    for a, b in zip(before, (z, k, g, y1, posy)):
        assert torch.equal(a, b.detach())


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


def test_bad_features():
    z, k, g, y1, posy = _batch(B=6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"z1.*\(6,\)"):
        co.hydra_loss(z[:, 0], k, g, y1, posy)
    with pytest.raises(ValueError, match=r"\(6, 6\).*\(5, 6\)"):
        co.hydra_loss(z, k[:5], g, y1, posy)
    with pytest.raises(ValueError, match="dtype"):
        co.hydra_loss(z, k.double(), g, y1, posy)
    with pytest.raises(TypeError, match="floating"):
        co.hydra_loss(z.long(), k.long(), g, y1, posy)
    with pytest.raises(ValueError, match=r"gate must have the shape of z1 \(6, 6\), got \(6, 5\)"):
        co.hydra_loss(z, k, g[:, :5], y1, posy)
    with pytest.raises(TypeError, match="gate must be a floating-point"):
        co.hydra_loss(z, k, (g > 0.5).long(), y1, posy)


@pytest.mark.parametrize("which", ["y1", "posy"])
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(5, dtype=torch.long), r"must have shape \(6,\), got \(5,\)"),
    (torch.zeros(6), "must be an integer tensor"),
])
def test_bad_labels(which, bad, match):
    z, k, g, y1, posy = _batch(B=6, dtype=torch.float32)
    args = dict(dict(y1=y1, posy=posy), **{which: bad})
    with pytest.raises(ValueError, match=f"{which} {match}"):
        co.hydra_loss(z, k, g, args["y1"], args["posy"])


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(positives="y2"), "positives"),
    (dict(gating="none"), "gating"),
    (dict(reduction="avg"), "reduction"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        co.hydra_loss(*_batch(B=6, dtype=torch.float32), **kw)


# ------------------------------------------------------------------------------------------
# gating="filter" on the gated_lse primitive (triton backend)
# ------------------------------------------------------------------------------------------

TRITON = [p for p in backend_params() if p.values[0] == "triton"]


def _gated_case(B=19, M=37, D=5, seed=0):
    """Ragged column ranges over two column blocks and more: empty ranges, a range ending at M, one
    row whose gate is zero (every key norm clamped, logits 0) and a key that is all zero."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, D, generator=g)
    w = torch.rand(B, D, generator=g) * 0.9 + 0.05
    w[4] = 0
    a[4] = 0  # as in hydra, where a = n(z ⊙ g) ⊙ g
    k = torch.randn(M, D, generator=g)
    k[16] = 0
    cs = torch.randint(0, M, (B,), generator=g)
    ce = torch.minimum(cs + torch.randint(0, 25, (B,), generator=g), torch.tensor(M))
    ce[2] = cs[2]  # empty
    cs[5], ce[5] = 0, M  # all
    cs[7], ce[7] = 15, 17  # across the block edge at 16 (interpreter blocks), over the zero key
    # the last row block (rows 16-18) ends one column into the second column block, the zero key's
    cs[16:], ce[16:] = torch.tensor([10, 3, 17]), torch.tensor([17, 9, 17])
    return a, w, k, cs, ce


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("kdtype", [torch.float32, torch.bfloat16])
def test_gated_lse_primitive_matches_reference(backend, kdtype):
    from contrastive_ops.backends._triton import tiles
    from contrastive_ops.primitives.gated_lse import gated_lse

    a, w, k, cs, ce = _gated_case()
    k = k.to(kdtype)
    gv = torch.randn(a.shape[0], generator=torch.Generator().manual_seed(9))
    res = {}
    for be in ("reference", backend):
        ins = [t.clone().requires_grad_(True) for t in (a, w, k)] + [torch.tensor(2.5, requires_grad=True)]
        old = tiles.POISON_OUTPUTS
        tiles.POISON_OUTPUTS = True
        try:
            lse = gated_lse(*ins, col_start=cs, col_end=ce, backend=be)
            grads = torch.autograd.grad((torch.where(torch.isfinite(lse), lse, 0) * gv).sum(), ins)
        finally:
            tiles.POISON_OUTPUTS = old
        res[be] = (lse.detach(),) + tuple(grads)
    empty = ce <= cs
    assert torch.equal(torch.isinf(res[backend][0]), empty) and (res[backend][0][empty] < 0).all()
    for x, y in zip(res["reference"], res[backend]):
        assert not torch.isnan(y).any()
        # dk is stored in k's dtype by both: one rounding apart at most (2^-7 relative for bf16)
        rtol = 2.0 ** -7 if y.dtype == torch.bfloat16 else 1e-5
        x, y = x.float(), y.float()
        torch.testing.assert_close(torch.where(torch.isinf(x), 0, x), torch.where(torch.isinf(y), 0, y),
                                   rtol=rtol, atol=1e-5)
    # a zero gate's row: every key norm clamped, every logit 0
    torch.testing.assert_close(res[backend][0][4], torch.tensor(float(ce[4] - cs[4])).log())


def _filter_case(B, labels, positives):
    """A gating='filter' batch (random, edge or one-class labels), its float64 loop values and mean over the
    float64 leaves, and fp32 leaves for a kernel backend (features, keys, gates; a tensor temperature)."""
    z, k, g, y1, posy = _batch(B=B, D=5, classes=4, seed=11)
    if labels == "edge":
        y1, posy = _edge_labels()
    elif labels == "one_class":
        y1 = posy = torch.zeros(B, dtype=torch.long)
    z64, k64, g64 = (t.clone().requires_grad_(True) for t in (z, k, g))
    tau64 = torch.tensor(0.2, dtype=F64, requires_grad=True)
    vals, mean = loop_hydra(z64, k64, g64, y1, posy, tau64, positives=positives, gating="filter")
    dev = [t.float().requires_grad_(True) for t in (z, k, g)]
    tau = torch.tensor(0.2, requires_grad=True)
    return y1, posy, z64, k64, g64, tau64, vals, mean, dev, tau


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("positives", ["c2", "class"])
@pytest.mark.parametrize("labels", ["random", "edge", "one_class"])
def test_triton_filter_matches_loop(backend, positives, labels):
    """gating='filter' on the triton backend against the float64 loop: values, and gradients of the
    features, keys, gates and a tensor temperature; outputs NaN-poisoned."""
    from contrastive_ops.backends._triton import tiles

    B = 8 if labels == "edge" else 21  # > one interpreter row block
    y1, posy, z64, k64, g64, tau64, vals, mean, dev, tau = _filter_case(B, labels, positives)
    old = tiles.POISON_OUTPUTS
    tiles.POISON_OUTPUTS = True
    try:
        kw = dict(positives=positives, gating="filter", backend=backend)
        out = co.hydra_loss(*dev, y1, posy, 0.2, reduction="none", **kw)
        torch.testing.assert_close(out.double(), vals.detach(), rtol=1e-5, atol=1e-5)
        out = co.hydra_loss(*dev, y1, posy, tau, **kw)
        torch.testing.assert_close(out.double(), mean.detach(), rtol=1e-5, atol=1e-5)
        (2 * out).backward()
    finally:
        tiles.POISON_OUTPUTS = old
    (2 * mean).backward()
    for a, b in zip(dev + [tau], (z64, k64, g64, tau64)):
        assert not torch.isnan(a.grad).any()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_filter_matches_reference(backend, dtype):
    z, k, g, y1, posy = _batch(B=37, D=16, classes=6, seed=7, dtype=torch.float32)
    ts = [t.requires_grad_(True) for t in (z, k, g)] + [y1, posy]
    for positives, reduction in (("c2", "mean"), ("class", "none")):
        compare_with_reference(_hydra, ts, backend=backend, dtype=dtype, temperature=0.1, gating="filter",
                               positives=positives, reduction=reduction, sharpness=10.0, normalized=True)


@pytest.mark.parametrize("backend", TRITON)
def test_auto_takes_gated_lse_past_a_backend_without_it(backend, monkeypatch):
    """Under "auto" the first kernel backend of the priority that lacks gated_lse (the cuda backend on
    CUDA tensors; here the cpu backend with its table lacking it) gives way to the next one that has it
    (triton), without a warning."""
    from contrastive_ops import backends
    from contrastive_ops.backends import _cext
    from contrastive_ops.backends._triton import tiles

    if not co.available_backends()["cpu"][0]:
        pytest.skip("needs the cpu backend ahead of triton")
    monkeypatch.delitem(_cext.CPU_ONLY_PRIMITIVES, "gated_lse", raising=False)
    monkeypatch.setitem(backends.AUTO_PRIORITY, "cpu", ("cpu", "triton", "reference"))
    ts = [t.float() for t in _batch(B=6, D=4, classes=3, seed=2)[:3]] + _batch(B=6, D=4, classes=3, seed=2)[3:]
    before = tiles.LAUNCHES["gated_lse_fwd"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = co.hydra_loss(*ts, backend="auto")
    assert tiles.LAUNCHES["gated_lse_fwd"] == before + 2
    torch.testing.assert_close(out, co.hydra_loss(*ts, backend="reference"))


# ------------------------------------------------------------------------------------------
# gating="filter" on the cpu backend's gated_lse kernels (csrc/cpu/gated_lse.cpp: 64-row blocks,
# 128-column tiles)
# ------------------------------------------------------------------------------------------

CPU = [p for p in backend_params(torch.device("cpu")) if p.values[0] == "cpu"]


def _has_cpu_gated_lse():
    from contrastive_ops import backends

    return co.available_backends()["cpu"][0] and backends.has_primitive("cpu", "gated_lse")


def _gated_case_tiles(B=70, M=300, D=33, seed=0):
    """Ragged sizes over two row blocks and three column tiles: empty ranges, full ranges, ranges that
    start or end at a tile edge (127/128/129, 255/256), one column, a row with a zero gate (every key
    norm clamped) and a zero key (its norm clamped for every row)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(B, D, generator=g)
    w = torch.rand(B, D, generator=g) * 0.9 + 0.05
    w[4] = 0
    a[4] = 0  # as in hydra, where a = n(z ⊙ g) ⊙ g
    w[B - 4] = 0  # zero gate, nonzero a: the clamped norm scales its logits by 1e12 (finite: small a)
    a[B - 4] *= 1e-13
    k = torch.randn(M, D, generator=g)
    k[128] = 0
    cs = torch.randint(0, M, (B,), generator=g)
    ce = torch.minimum(cs + torch.randint(0, 200, (B,), generator=g), torch.tensor(M))
    fixed = {2: (40, 40), 5: (0, M), 7: (127, 129), 8: (128, 129), 9: (0, 128), 10: (128, 256), 11: (255, 257),
             12: (299, 300), 13: (M, M), 63: (0, 1), 64: (126, 130), 69: (256, M)}
    for i, (s, e) in fixed.items():
        if i < B:
            cs[i], ce[i] = min(s, M), min(e, M)
    return a, w, k, cs, ce


def _gated_grads(a, w, k, s, cs, ce, gv, backend):
    from contrastive_ops.primitives.gated_lse import gated_lse

    ins = [t.detach().clone().requires_grad_(True) for t in (a, w, k, s)]
    lse = gated_lse(*ins, col_start=cs, col_end=ce, backend=backend)
    grads = torch.autograd.grad((torch.where(torch.isfinite(lse), lse, 0) * gv.to(lse.dtype)).sum(), ins)
    return (lse.detach(),) + tuple(grads)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("kdtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(70, 300, 33), (19, 37, 5), (1, 1, 3), (1, 129, 7)])
@pytest.mark.parametrize("scale", [2.5, 10.0])
def test_gated_lse_cpu_matches_float64_reference(backend, kdtype, shape, scale):
    """Forward and every gradient (a, w, k, scale) against the float64 reference on the same (rounded)
    keys; in fp16/bf16 the error may be HALF_C times the reference's own in that dtype (fp32 a, w and
    the keys in the dtype, dk rounded to it).  Outputs NaN-poisoned; γ nonzero on empty rows too."""
    from contrastive_ops.testing import assert_close
    from helpers import nan_filled_memory

    B, M, D = shape
    if shape == (19, 37, 5):
        a, w, k, cs, ce = _gated_case()
    elif B == 70:
        a, w, k, cs, ce = _gated_case_tiles()
    else:
        g = torch.Generator().manual_seed(M)
        a, w, k = torch.randn(B, D, generator=g), torch.rand(B, D, generator=g), torch.randn(M, D, generator=g)
        cs, ce = torch.tensor([0]), torch.tensor([M])
    k = k.to(kdtype)
    s = torch.tensor(scale)
    gv = torch.randn(B, generator=torch.Generator().manual_seed(9))
    with nan_filled_memory():
        out = _gated_grads(a, w, k, s, cs, ce, gv, backend)
    exact = _gated_grads(a.double(), w.double(), k.double(), s.double(), cs, ce, gv, "reference")
    low = _gated_grads(a, w, k, s, cs, ce, gv, "reference") if kdtype != torch.float32 else (None,) * 5
    empty = ce <= cs
    assert torch.equal(torch.isinf(out[0]), empty) and (out[0][empty] < 0).all()
    assert out[3].dtype == kdtype and out[1].dtype == out[2].dtype == out[4].dtype == torch.float32
    fin = lambda t: None if t is None else torch.where(torch.isinf(t), 0, t)  # noqa: E731
    for name, x, e, lo in zip(("lse", "da", "dw", "dk", "dscale"), out, exact, low):
        assert not torch.isnan(x).any(), name
        if name == "da" and B == 70:
            # row B − 4 (zero gate, a ~ 1e-13): its key norms clamped, its da of size 1e12·|k|: compared
            # relative to its own size, the other rows as every output
            big = torch.arange(B) == B - 4
            assert float(e[big].abs().max()) > 1e9
            torch.testing.assert_close(x[big].double(), e[big], rtol=1e-5, atol=1e-5 * float(e[big].abs().max()))
            x, e, lo = x[~big], e[~big], None if lo is None else lo[~big]
        assert_close(fin(x), fin(e), kdtype, low=fin(lo), what=name)
    if B >= 19:  # a zero gate and zero a: every key norm clamped, every logit 0
        torch.testing.assert_close(out[0][4], torch.tensor(float(ce[4] - cs[4])).log())


@pytest.mark.parametrize("backend", CPU)
def test_gated_lse_cpu_float64(backend):
    """float64 a, w, k run in float64 (tight tolerance) and pass gradcheck."""
    from contrastive_ops.primitives.gated_lse import gated_lse

    a, w, k, cs, ce = (t.double() if t.is_floating_point() else t for t in _gated_case_tiles(B=67, M=260, D=9))
    w[63] = 1  # (no 1e12-scaled row: gradcheck's finite differences)
    gv = torch.randn(67, dtype=F64, generator=torch.Generator().manual_seed(3))
    s = torch.tensor(1.7, dtype=F64)
    out = _gated_grads(a, w, k, s, cs, ce, gv, backend)
    ref = _gated_grads(a, w, k, s, cs, ce, gv, "reference")
    for x, y in zip(out, ref):
        assert x.dtype == F64
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(5)
    small = [torch.randn(5, 3, generator=g, dtype=F64), torch.rand(5, 3, generator=g, dtype=F64) + 0.1,
             torch.randn(7, 3, generator=g, dtype=F64), s]
    small = [t.clone().requires_grad_(True) for t in small]
    cs5, ce5 = torch.tensor([0, 2, 1, 3, 1]), torch.tensor([7, 2, 7, 6, 4])  # row 1 empty: left out

    def f(a, w, k, s):
        return gated_lse(a, w, k, s, col_start=cs5, col_end=ce5, backend=backend)[[0, 2, 3, 4]]

    assert torch.autograd.gradcheck(f, small)


@pytest.mark.parametrize("backend", CPU)
def test_gated_lse_cpu_is_deterministic(backend):
    """Two runs bitwise equal, with one thread and with several (the tiles do not depend on the thread
    count, so the results are equal across thread counts too)."""
    a, w, k, cs, ce = _gated_case_tiles(B=300, M=700, D=24, seed=4)
    cs[:], ce[:] = torch.randint(0, 350, (300,)), torch.randint(350, 701, (300,))
    gv = torch.randn(300, generator=torch.Generator().manual_seed(1))
    s = torch.tensor(3.0)
    prev = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 1, 4, 4):
            torch.set_num_threads(threads)
            runs.append(_gated_grads(a, w, k.bfloat16(), s, cs, ce, gv, backend))
    finally:
        torch.set_num_threads(prev)
    for r in runs[1:]:
        for x, y in zip(runs[0], r):
            assert torch.equal(x, y)


@pytest.mark.parametrize("backend", CPU)
def test_gated_lse_cpu_bad_input(backend):
    from contrastive_ops.backends import _cext

    a, w, k, cs, ce = _gated_case()
    s = torch.tensor(1.0)
    op = torch.ops.contrastive_ops.gated_lse_fwd
    _cext.ensure_loaded()
    with pytest.raises(RuntimeError, match=r"col_start and col_end must lie in \[0, 37\]"):
        op(a, w, k, s, cs.int(), (ce + 1).int())
    with pytest.raises(RuntimeError, match="a and w must be float32"):
        op(a.half(), w.half(), k, s, cs.int(), ce.int())
    with pytest.raises(RuntimeError, match="k must be float32, float16 or bfloat16"):
        op(a, w, k.double(), s, cs.int(), ce.int())
    with pytest.raises(RuntimeError, match=r"a and w must be \(B, D\) and k \(M, D\)"):
        op(a, w[:, :4], k, s, cs.int(), ce.int())
    with pytest.raises(RuntimeError, match="int32"):
        op(a, w, k, s, cs, ce)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("positives", ["c2", "class"])
@pytest.mark.parametrize("labels", ["random", "edge", "one_class"])
def test_cpu_filter_matches_loop(backend, positives, labels):
    """gating='filter' on the cpu backend against the float64 loop: values, and gradients of the
    features, keys, gates and a tensor temperature; outputs NaN-poisoned.  B = 70: two row blocks and
    2·70 sorted keys over two column tiles."""
    from helpers import nan_filled_memory

    B = 8 if labels == "edge" else 70
    y1, posy, z64, k64, g64, tau64, vals, mean, dev, tau = _filter_case(B, labels, positives)
    kw = dict(positives=positives, gating="filter", backend=backend)
    with nan_filled_memory():
        out = co.hydra_loss(*dev, y1, posy, 0.2, reduction="none", **kw)
        torch.testing.assert_close(out.double(), vals.detach(), rtol=1e-5, atol=1e-5)
        out = co.hydra_loss(*dev, y1, posy, tau, **kw)
        torch.testing.assert_close(out.double(), mean.detach(), rtol=1e-5, atol=1e-5)
        (2 * out).backward()
    (2 * mean).backward()
    for a, b in zip(dev + [tau], (z64, k64, g64, tau64)):
        assert not torch.isnan(a.grad).any()
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
    # float64 inputs run the float64 kernels: the loop's values to float64 precision
    out64 = co.hydra_loss(*(t.detach() for t in (z64, k64, g64)), y1, posy, 0.2, reduction="none", **kw)
    assert out64.dtype == F64
    torch.testing.assert_close(out64, vals.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_filter_matches_reference(backend, dtype):
    z, k, g, y1, posy = _batch(B=37, D=16, classes=6, seed=7, dtype=torch.float32)
    ts = [t.requires_grad_(True) for t in (z, k, g)] + [y1, posy]
    for positives, reduction in (("c2", "mean"), ("class", "none")):
        compare_with_reference(_hydra, ts, backend=backend, dtype=dtype, temperature=0.1, gating="filter",
                               positives=positives, reduction=reduction, sharpness=10.0, normalized=True)


def test_auto_on_cpu_tensors_takes_the_cpu_kernels(monkeypatch):
    """Under "auto" CPU tensors run gating='filter' on the cpu backend's gated_lse, without a warning."""
    from contrastive_ops.backends import _cext

    if not _has_cpu_gated_lse():
        pytest.skip("the cpu backend is not available here")
    from contrastive_ops import backends

    monkeypatch.setitem(backends.AUTO_PRIORITY, "cpu", ("cpu", "reference"))
    calls = []
    real = _cext.CPU_ONLY_PRIMITIVES["gated_lse"]

    class Counting:
        def forward(self, *args):
            calls.append("fwd")
            return real.forward(*args)

        def backward(self, *args):
            calls.append("bwd")
            return real.backward(*args)

    monkeypatch.setitem(_cext.CPU_ONLY_PRIMITIVES, "gated_lse", Counting())
    z, k, g, y1, posy = _batch(B=12, D=4, classes=3, seed=2, dtype=torch.float32)
    z.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = co.hydra_loss(z, k, g, y1, posy, backend="auto")
        out.backward()
    assert calls == ["fwd", "fwd", "bwd", "bwd"]
    torch.testing.assert_close(out, co.hydra_loss(z, k, g, y1, posy, backend="reference"))
