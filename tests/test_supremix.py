"""supremix_loss: a float64 loop over anchors, samples and mixtures (values and gradients, mixtures
detached), the official code transcribed (its separate max-shifts against the paper's joint LSE), the
fused composition on every kernel backend (with λ given, and with the official per-pair draw: the kernels and
the reference draw the same λ from one seed), the configurations the kernels cannot express, bad input."""
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops.losses import supremix as sm
from contrastive_ops.primitives.label_lse import pair_lambda
from helpers import DEVICE, backend_params, compare_with_reference

F64 = torch.float64
LABELS = torch.tensor([20.0, 21.0, 23.0, 20.0, 25.0, 22.0])  # ages: classes of 1 and 2, gaps inside the window


def _w(d, distance):
    return {"L1_inv": d + 1, "L2_inv": d * d + 1, "L1": 1 / (d + 1), "L2": 1 / (d * d + 1)}[distance]


def loop_supremix(x, labels, tau, base_tau=None, *, window=5, lam=None, mix_neg=True, mix_pos=True,
                  use_weight=True, distance="L1_inv", normalize=True, code_shift=False, code_l2_inv=False):
    """Per anchor, literally: candidates (real samples, hard-negative and hard-positive mixtures built as
    vectors and detached), their weights and logits, then −(τ/τ_b)·mean_{p∈P}[s_p − log Σ_c w_c e^{s_c}].

    ``lam`` (M, M): the hard-negative λ_ik.  ``code_shift``: the official code's maths instead — real
    logits shifted by their max (self included), mixture logits by theirs (the M² slots, empty ones 0).
    ``code_l2_inv``: the code's ``L2_inv`` weight of a mixture, (y_i − ỹ + 1)² + 1.
    Returns (per-anchor values (M,), mean over anchors with a positive).
    """
    N, V, _ = x.shape
    u = F.normalize(x, dim=-1) if normalize else x
    z = [u[i, l] for l in range(V) for i in range(N)]
    y = [float(labels[i]) for _ in range(V) for i in range(N)]
    M = V * N
    factor = 1.0 if base_tau is None else tau / base_tau
    vals, kept = [], []
    for i in range(M):
        real = []  # (logit, log weight, positive)
        for a in range(M):
            if a != i:
                d = abs(y[i] - y[a])
                real.append((z[i] @ z[a] / tau, _w(d, distance) if use_weight else 1.0, d == 0))
        mix = []
        slots = [x.new_zeros(())] * (M * M)  # the code's mixture slots (j, k), logit 0 when empty
        if mix_neg:
            for k in range(M):
                if y[k] != y[i]:
                    m = (lam[i, k] * z[i] + (1 - lam[i, k]) * z[k]).detach()
                    ym = float(lam[i, k]) * y[i] + (1 - float(lam[i, k])) * y[k]
                    s = z[i] @ m / tau
                    w = (y[i] - ym + 1) ** 2 + 1 if code_l2_inv else _w(abs(y[i] - ym), distance)
                    mix.append((s, w if use_weight else 1.0, False))
                    slots[i * M + k] = s
        if mix_pos:
            for j, k in itertools.product(range(M), range(M)):
                if y[j] < y[i] < y[k] and y[i] - y[j] < window and y[k] - y[i] < window:
                    lp = (y[k] - y[i]) / (y[k] - y[j])
                    m = (lp * z[j] + (1 - lp) * z[k]).detach()
                    s = z[i] @ m / tau
                    mix.append((s, 2.0 if code_l2_inv and use_weight else 1.0, True))
                    slots[j * M + k] = s
        if code_shift:
            m_r = max(float(z[i] @ z[a] / tau) for a in range(M))
            m_m = max(float(s) for s in slots)
            real = [(s - m_r, w, p) for s, w, p in real]
            mix = [(s - m_m, w, p) for s, w, p in mix]
        cands = real + mix
        log_den = torch.log(sum(w * torch.exp(s) for s, w, _ in cands))
        P = [s for s, _, p in cands if p]
        if not P:
            vals.append(x.new_zeros(()))
            continue
        v = -factor * sum(s - log_den for s in P) / len(P)
        vals.append(v)
        kept.append(v)
    return torch.stack(vals), (sum(kept) / len(kept) if kept else x.new_zeros(()))


def official_supremix(x, labels, tau, *, window, lam, mix_neg, mix_pos, use_weight, distance="L1_inv"):
    """Mixup-Your-Own-Pairs ``agedb-dir``: ``mixing_func`` (λ_ik from ``lam`` instead of Beta draws; no
    ``compress_mixtures``) and ``SupConLoss_v2.forward`` with τ_b = τ, on normalized (N, 2, D) features."""
    features = F.normalize(x, dim=-1)
    bsz = features.shape[0]
    labels = labels.to(x.dtype)
    target = labels.view(-1, 1).repeat(2, 1).squeeze(1)
    feature = torch.cat([features[:, 0, :], features[:, 1, :]], dim=0)
    T = target.shape[0]
    mixtures = torch.zeros((T, T, T, feature.shape[1]), dtype=x.dtype)
    myop_label = torch.zeros((T, T, T), dtype=x.dtype)
    myop_mask = torch.zeros((T, T, T), dtype=x.dtype) - 1
    i = torch.arange(T).reshape(-1, 1, 1)
    j = torch.arange(T).reshape(1, -1, 1)
    k = torch.arange(T).reshape(1, 1, -1)
    t_i, t_j, t_k = target.reshape(-1, 1, 1), target.reshape(1, -1, 1), target.reshape(1, 1, -1)
    neg_condition = torch.eq(i, j) & ~torch.eq(i, k) & ~torch.eq(t_j, t_k)
    myop_mask[neg_condition] = 0
    pos_condition = ((torch.lt(t_i, t_k) & (torch.abs(t_i - t_k) < window).int())
                     & (torch.lt(t_j, t_i) & (torch.abs(t_j - t_i) < window).int())).bool()
    myop_mask[pos_condition] = 1
    if mix_neg:
        idx = torch.nonzero(myop_mask == 0).t()
        alpha = lam[idx[0], idx[2]].reshape(-1, 1)
        mixtures[idx[0], idx[1], idx[2]] = alpha * feature[idx[1]] + (1 - alpha) * feature[idx[2]]
        myop_label[idx[0], idx[1], idx[2]] = (alpha.squeeze(1) * target[idx[1]]
                                              + (1 - alpha.squeeze(1)) * target[idx[2]]).detach()
    if mix_pos:
        ii, jj, kk = torch.nonzero(myop_mask == 1).T
        alpha = torch.clamp((target[kk] - target[ii]) / torch.clamp(target[kk] - target[jj], min=1e-9), 0, 1).view(-1, 1)
        mixtures[ii, jj, kk] = alpha * feature[jj] + (1 - alpha) * feature[kk]
        myop_label[ii, jj, kk] = target[ii]
    mixtures = mixtures.reshape(T, T * T, -1).detach()
    myop_mask = myop_mask.reshape(T, T * T)
    myop_label = myop_label.reshape(T, T * T)
    # SupConLoss_v2.forward(features, labels, mixtures, myop_mask, myop_label, use_weight, distance)
    lab = labels.contiguous().view(-1, 1)
    mask = torch.eq(lab, lab.T).to(x.dtype)
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_feature, anchor_count, contrast_count = contrast_feature, 2, 2
    anchor_dot_contrast = anchor_feature @ contrast_feature.T / tau
    logits = anchor_dot_contrast - anchor_dot_contrast.max(1, keepdim=True).values.detach()
    mask = mask.repeat(anchor_count, contrast_count)
    logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(bsz * anchor_count).view(-1, 1), 0)
    mask = mask * logits_mask
    if mix_neg or mix_pos:
        anchor_dot_mixture = torch.bmm(mixtures, anchor_feature.unsqueeze(2)).squeeze(2) / tau
        myop_logits = anchor_dot_mixture - anchor_dot_mixture.max(1, keepdim=True).values.detach()
        logits = torch.cat([logits, myop_logits], dim=1)
        mask = torch.cat([mask, myop_mask], dim=1)
        logits_mask = torch.cat([logits_mask, torch.where(myop_mask != -1, 1, 0).to(x.dtype)], dim=1)
    if use_weight:
        y2 = lab.repeat(2, 1).squeeze(1)
        weights = _w(torch.abs(y2.view(-1, 1) - y2.view(1, -1)), distance)
        if (mix_neg or mix_pos) and distance == "L2_inv":
            weights = torch.cat([weights, torch.pow((y2.unsqueeze(1).expand_as(myop_label) - myop_label + 1), 2)
                                 + 1], dim=1)
        elif mix_neg or mix_pos:
            weights = torch.cat([weights, _w(torch.abs(y2.unsqueeze(1).expand_as(myop_label) - myop_label),
                                             distance)], dim=1)
        exp_logits = torch.exp(logits) * logits_mask * weights
    else:
        exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = ((mask == 1) * log_prob).sum(1) / (mask == 1).sum(1)
    return (-(tau / tau) * mean_log_prob_pos).view(anchor_count, bsz).mean()


def _lam(M, seed=0):
    return torch.rand(M, M, generator=torch.Generator().manual_seed(seed), dtype=F64)


CONFIGS = [  # (mix_neg, mix_pos, use_weight, distance)
    (True, True, True, "L1_inv"),
    (True, True, False, "L1_inv"),
    (True, False, True, "L2_inv"),
    (False, True, True, "L1"),
    (False, False, True, "L2"),
    (False, False, False, "L1_inv"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("V", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_loop(cfg, V, normalize):
    mix_neg, mix_pos, use_weight, distance = cfg
    N = LABELS.numel()
    x = (torch.randn(N, V, 4, dtype=F64) * (1 if normalize else 0.5)).requires_grad_(True)
    lam = _lam(V * N)
    kw = dict(window=3, mix_neg=mix_neg, mix_pos=mix_pos, use_weight=use_weight, distance=distance,
              normalize=normalize)
    vals, mean = loop_supremix(x, LABELS, 0.5, 0.7, lam=lam, **kw)
    ours = lambda red: co.supremix_loss(x, LABELS, 0.5, base_temperature=0.7, mix_lambda=lam, reduction=red,  # noqa: E731
                                        backend="reference", **kw)
    torch.testing.assert_close(ours("none"), vals.detach())
    torch.testing.assert_close(ours("sum"), vals.sum().detach())
    out = ours("mean")
    torch.testing.assert_close(out, mean.detach())
    # gradients: into every real pair's both sides, into the anchor only through a mixture
    torch.testing.assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(mean, x)[0])


def test_reference_hard_positive_blocks(monkeypatch):
    """The hard positives stream over anchor blocks: a tiny block gives the same loss and gradient."""
    x = torch.randn(6, 2, 4, dtype=F64, requires_grad=True)
    lam = _lam(12)
    out = co.supremix_loss(x, LABELS, mix_lambda=lam, backend="reference")
    g, = torch.autograd.grad(out, x)
    monkeypatch.setattr(sm, "_BLOCK", 1)
    out1 = co.supremix_loss(x, LABELS, mix_lambda=lam, backend="reference")
    torch.testing.assert_close(out1, out)
    torch.testing.assert_close(torch.autograd.grad(out1, x)[0], g)


@pytest.mark.parametrize("use_weight", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_official_code_shifts_mixtures_separately(use_weight, seed):
    """The code's separate max-shifts are a different loss: it equals the loop with those shifts, and the
    paper's joint LSE (ours) differs from it once mixtures are in; without mixtures all three agree.

    (``--contrastive_method supremix``: both kinds of mixtures.  With one kind only, the code keeps the
    other kind's slots in its mask as zero vectors, i.e. extra logits of 0; not reproduced.)"""
    x = torch.randn(6, 2, 4, dtype=F64, generator=torch.Generator().manual_seed(seed)) * 3
    lam = _lam(12, 1)
    kw = dict(window=3, mix_neg=True, mix_pos=True, use_weight=use_weight)
    code = official_supremix(x, LABELS, 0.5, lam=lam, **kw)
    torch.testing.assert_close(code, loop_supremix(x, LABELS, 0.5, lam=lam, code_shift=True, **kw)[1])
    ours = co.supremix_loss(x, LABELS, 0.5, mix_lambda=lam, backend="reference", **kw)
    assert (ours - code).abs() > 1e-3, (float(ours), float(code))
    no_mix = dict(kw, mix_neg=False, mix_pos=False)
    torch.testing.assert_close(co.supremix_loss(x, LABELS, 0.5, backend="reference", **no_mix),
                               official_supremix(x, LABELS, 0.5, lam=lam, **no_mix))


def test_official_code_l2_inv_weight_of_mixtures():
    """``distance="L2_inv"``: the code weighs a mixture by (y_i − ỹ + 1)² + 1 (2 for a hard positive), a real
    pair by (y_i − y_a)² + 1; here (y_i − ỹ)² + 1 for both, so a hard positive weighs 1 like a real one."""
    x = torch.randn(6, 2, 4, dtype=F64)
    lam = _lam(12, 2)
    kw = dict(window=3, mix_neg=True, mix_pos=True, use_weight=True, distance="L2_inv")
    code = official_supremix(x, LABELS, 0.5, lam=lam, **kw)
    torch.testing.assert_close(code, loop_supremix(x, LABELS, 0.5, lam=lam, code_shift=True, code_l2_inv=True,
                                                   **kw)[1])
    assert (code - loop_supremix(x, LABELS, 0.5, lam=lam, code_shift=True, **kw)[1]).abs() > 1e-3
    ours = co.supremix_loss(x, LABELS, 0.5, mix_lambda=lam, backend="reference", **kw)
    torch.testing.assert_close(ours, loop_supremix(x, LABELS, 0.5, lam=lam, **kw)[1])


def _drawn_lambda(torch_seed, M, beta=(2, 8), dtype=F64):
    """The (M, M) λ that a call after ``torch.manual_seed(torch_seed)`` draws: one seed from torch's
    generator, then the counter-based generator over (global anchor, global sample)."""
    torch.manual_seed(torch_seed)
    seed = int(torch.randint(0, 2 ** 31 - 1, ()))
    return pair_lambda(seed, torch.arange(M), torch.arange(M), beta, dtype)


def test_lambda_drawn_per_pair_from_beta():
    """mix_lambda=None: λ_ik per pair (every (anchor, sample) its own) from the counter-based generator keyed by
    one seed from torch's generator; reproducible under torch.manual_seed, a new draw per call otherwise; a
    Beta the kernels cannot draw (non-integer) keeps torch.distributions.Beta per pair."""
    x = torch.randn(6, 2, 4)
    lam = _drawn_lambda(3, 12, dtype=torch.float32)
    assert lam.unique().numel() == 144  # one λ per pair
    assert abs(float(lam.mean()) - 0.2) < 0.05
    torch.manual_seed(3)
    drawn = co.supremix_loss(x, LABELS, backend="reference")
    torch.testing.assert_close(drawn, co.supremix_loss(x, LABELS, mix_lambda=lam, backend="reference"))
    assert (drawn - co.supremix_loss(x, LABELS, mix_lambda=0.2, backend="reference")).abs() > 1e-4
    # per anchor, the same λ for every sample would be another loss
    assert (drawn - co.supremix_loss(x, LABELS, mix_lambda=lam[:, 0], backend="reference")).abs() > 1e-4
    torch.manual_seed(3)
    assert torch.equal(co.supremix_loss(x, LABELS, backend="reference"), drawn)
    assert (co.supremix_loss(x, LABELS, backend="reference") - drawn).abs() > 1e-6  # the next call draws anew
    # Beta(2.5, 8): torch.distributions.Beta on torch's generator, per pair
    torch.manual_seed(4)
    lam = torch.distributions.Beta(torch.tensor(2.5), torch.tensor(8.0)).sample((12, 12))
    torch.manual_seed(4)
    drawn = co.supremix_loss(x, LABELS, beta=(2.5, 8.0), backend="reference")
    torch.testing.assert_close(drawn, co.supremix_loss(x, LABELS, mix_lambda=lam, backend="reference"))


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("use_weight, distance", [(True, "L1_inv"), (True, "L2"), (False, "L1_inv")])
@pytest.mark.parametrize("mix_pos", [False, True])
@pytest.mark.parametrize("beta", [(2, 8), (3, 1)])
def test_drawn_lambda_kernel_backends_match_loop(backend, use_weight, distance, mix_pos, beta):
    """mix_lambda=None on the kernels (λ drawn per pair inside them) against the float64 loop given the λ
    matrix of the same seed: values, per-anchor values and gradients."""
    N = LABELS.numel()
    M = 2 * N
    x64 = torch.randn(N, 2, 5, dtype=F64, generator=torch.Generator().manual_seed(9))
    kw = dict(mix_neg=True, mix_pos=mix_pos, use_weight=use_weight, distance=distance, window=3)
    labels = LABELS.long() if mix_pos else LABELS
    x_loop = x64.clone().requires_grad_(True)
    vals, mean = loop_supremix(x_loop, labels, 0.2, lam=_drawn_lambda(21, M, beta), **kw)
    x = x64.float().to(DEVICE).requires_grad_(True)
    y = labels.to(DEVICE)
    torch.manual_seed(21)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="contrastive_ops")  # no fallback to the reference
        out = co.supremix_loss(x, y, 0.2, reduction="none", beta=beta, backend=backend, **kw)
    torch.testing.assert_close(out.double().cpu(), vals.detach(), rtol=1e-5, atol=1e-5)
    torch.manual_seed(21)
    out = co.supremix_loss(x, y, 0.2, beta=beta, backend=backend, **kw)
    torch.testing.assert_close(out.double().cpu(), mean.detach(), rtol=1e-5, atol=1e-5)
    (2 * out).backward()
    (2 * mean).backward()
    torch.testing.assert_close(x.grad.double().cpu(), x_loop.grad, rtol=1e-4, atol=1e-5)


def _seeded(*args, torch_seed=13, **kw):
    torch.manual_seed(torch_seed)
    return co.supremix_loss(*args, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_arguments_kernel_backends_match_reference(backend, dtype):
    """The official defaults (mix_lambda=None: λ ~ Beta(2, 8) per pair, use_weight=True, both mixtures; integer
    labels) on the kernels against the reference for the same torch.manual_seed."""
    N = 21
    g = torch.Generator().manual_seed(12)
    x = torch.randn(N, 2, 16, generator=g).to(DEVICE).requires_grad_(True)
    y = torch.randint(18, 30, (N,), generator=g).to(DEVICE)
    for reduction in ("mean", "none"):
        for labels, mix_pos in ((y, True), (y.float(), False)):
            compare_with_reference(_seeded, [x, labels], backend=backend, dtype=dtype, mix_pos=mix_pos,
                                   reduction=reduction, sharpness=2.0, normalized=True)


def _fusable(lam_kind, M):
    return {"float": 0.3, "anchor": torch.rand(M, generator=torch.Generator().manual_seed(2), dtype=F64)}[lam_kind]


def _match_loop(backend, x64, labels, lam, lam_kind, kw):
    """Values (per anchor and mean) and the features' gradient of the fp32 kernel path against the float64
    loop, λ a float or one per anchor (the loop gets it as its (M, M) matrix)."""
    M = x64.shape[0] * x64.shape[1]
    lam_mat = torch.full((M, M), lam, dtype=F64) if lam_kind == "float" else lam[:, None].expand(M, M)
    x_loop = x64.clone().requires_grad_(True)
    vals, mean = loop_supremix(x_loop, labels, 0.2, lam=lam_mat, **kw)
    x = x64.float().to(DEVICE).requires_grad_(True)
    lam_d = lam if lam_kind == "float" else lam.float().to(DEVICE)
    y = labels.to(DEVICE)
    out = co.supremix_loss(x, y, 0.2, mix_lambda=lam_d, reduction="none", backend=backend, **kw)
    torch.testing.assert_close(out.double().cpu(), vals.detach(), rtol=1e-5, atol=1e-5)
    out = co.supremix_loss(x, y, 0.2, mix_lambda=lam_d, backend=backend, **kw)
    torch.testing.assert_close(out.double().cpu(), mean.detach(), rtol=1e-5, atol=1e-5)
    (2 * out).backward()
    (2 * mean).backward()
    torch.testing.assert_close(x.grad.double().cpu(), x_loop.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mix_neg", [True, False])
@pytest.mark.parametrize("lam_kind", ["float", "anchor"])
@pytest.mark.parametrize("V", [1, 2])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mix_pos", [False, True])
def test_kernel_backends_match_loop(backend, mix_neg, lam_kind, V, normalize, mix_pos):
    """Hard positives are composed for integer labels (one λ per offset class, ``window=3``: 4 classes)."""
    N = LABELS.numel()
    M = V * N
    lam = _fusable(lam_kind, M)
    x64 = torch.randn(N, V, 5, dtype=F64) * (1 if normalize else 0.5)
    kw = dict(mix_neg=mix_neg, mix_pos=mix_pos, use_weight=False, normalize=normalize, window=3)
    labels = LABELS.long() if mix_pos else LABELS
    _match_loop(backend, x64, labels, lam, lam_kind, kw)


def _sup(x, labels, *, backend, **kw):
    return co.supremix_loss(x, labels, backend=backend, **kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_backends_match_reference(backend, dtype):
    N = 21
    x = torch.randn(N, 2, 16, device=DEVICE).requires_grad_(True)
    y = torch.randint(18, 30, (N,)).to(DEVICE)
    lam = torch.rand(2 * N, device=DEVICE)
    for reduction in ("mean", "none"):
        for mix_neg, mix_pos, labels in ((True, False, y.float()), (False, False, y.float()), (True, True, y)):
            compare_with_reference(_sup, [x, labels], backend=backend, dtype=dtype, temperature=0.2, mix_lambda=lam,
                                   mix_neg=mix_neg, mix_pos=mix_pos, use_weight=False, reduction=reduction,
                                   sharpness=5.0, normalized=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("distance", sm.DISTANCES)
@pytest.mark.parametrize("mix_neg, lam_kind", [(True, "float"), (True, "anchor"), (False, "float")])
@pytest.mark.parametrize("mix_pos", [False, True])
def test_weighted_kernel_backends_match_loop(backend, distance, mix_neg, lam_kind, mix_pos):
    """``use_weight=True`` (the official default) on the label_lse primitive: real pairs w(|y_i − y_a|), hard
    negatives w((1−λ_i)|y_i − y_k|), hard positives unweighted (integer labels: composed too)."""
    N = LABELS.numel()
    M = 2 * N
    lam = _fusable(lam_kind, M)
    x64 = torch.randn(N, 2, 5, dtype=F64, generator=torch.Generator().manual_seed(7))
    kw = dict(mix_neg=mix_neg, mix_pos=mix_pos, use_weight=True, distance=distance, window=3)
    labels = LABELS.long() if mix_pos else LABELS
    _match_loop(backend, x64, labels, lam, lam_kind, kw)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("distance", sm.DISTANCES)
def test_weighted_kernel_backends_match_reference(backend, dtype, distance):
    N = 21
    g = torch.Generator().manual_seed(11)
    x = torch.randn(N, 2, 16, generator=g).to(DEVICE).requires_grad_(True)
    y = torch.randint(18, 30, (N,), generator=g).to(DEVICE)
    lam = torch.rand(2 * N, generator=g).to(DEVICE)
    for reduction in ("mean", "none"):
        for mix_neg, mix_pos, labels in ((True, False, y.float()), (False, False, y.float()), (True, True, y)):
            compare_with_reference(_sup, [x, labels], backend=backend, dtype=dtype, temperature=0.2, mix_lambda=lam,
                                   mix_neg=mix_neg, mix_pos=mix_pos, use_weight=True, distance=distance,
                                   reduction=reduction, sharpness=5.0, normalized=True)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kw, missing", [
    (dict(mix_lambda=0.3), "mix_pos=True with floating-point labels needs an LSE over pairs"),
    (dict(use_weight=False, mix_lambda=0.3), "mix_pos=True with floating-point labels needs an LSE over pairs"),
    (dict(use_weight=False, mix_pos=False, beta=(2.5, 8.0)), r"beta=\(2.5, 8.0\).*integers a, b >= 1"),
    (dict(mix_pos=False, beta=(20, 13)), r"beta=\(20, 13\).*a \+ b <= 32"),
    (dict(use_weight=False, mix_pos=False, mix_lambda=torch.full((12, 12), 0.3)), r"\(A, M\) mix_lambda"),
    (dict(mix_pos=False, mix_lambda=torch.full((12, 12), 0.3)), r"\(A, M\) mix_lambda"),
])
def test_kernel_backend_names_what_the_primitive_lacks(backend, kw, missing):
    x = torch.randn(6, 2, 4, device=DEVICE)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises(RuntimeError, match=missing):
        co.supremix_loss(x, LABELS.to(DEVICE), backend=backend, **kw)


def test_backend_without_label_lse_names_it(monkeypatch):
    """A kernel backend without the label_lse primitive (the "cuda" one) refuses use_weight=True by name."""
    from contrastive_ops import backends

    name = next((p.values[0] for p in backend_params() if not p.marks), None)
    if name is None:
        pytest.skip("no kernel backend here")
    real = backends.has_primitive
    monkeypatch.setattr(backends, "has_primitive", lambda b, p: False if p == "label_lse" else real(b, p))
    x = torch.randn(6, 2, 4, device=DEVICE)
    with pytest.raises(RuntimeError, match=f"label_lse primitive.*backend '{name}' does not implement"):
        co.supremix_loss(x, LABELS.to(DEVICE), mix_pos=False, mix_lambda=0.3, backend=name)
    # λ drawn per pair goes through label_lse's mixture mode, with or without the weights
    with pytest.raises(RuntimeError, match=f"mix_lambda=None.*mixture mode.*backend '{name}' does not implement"):
        co.supremix_loss(x, LABELS.to(DEVICE), mix_pos=False, use_weight=False, backend=name)
    co.supremix_loss(x, LABELS.to(DEVICE), mix_pos=False, use_weight=False, mix_lambda=0.3, backend=name)


def test_auto_takes_a_backend_with_label_lse(monkeypatch):
    """Under "auto", a first choice without label_lse (the "cuda" backend on CUDA tensors) gives way to the
    next kernel backend that has it (Triton), here simulated on CPU tensors with the cpu backend."""
    from contrastive_ops import backends

    avail = co.available_backends()
    if DEVICE.type != "cpu" or not (avail["cpu"][0] and avail["triton"][0]):
        pytest.skip("needs the cpu and the (interpreted) triton backends")
    from contrastive_ops.backends._triton import tiles

    monkeypatch.setitem(backends.AUTO_PRIORITY, "cpu", ("cpu", "triton", "reference"))
    real = backends.has_primitive
    monkeypatch.setattr(backends, "has_primitive", lambda b, p: False if (b, p) == ("cpu", "label_lse") else real(b, p))
    x = torch.randn(6, 2, 4)
    y = LABELS.long()
    before = tiles.LAUNCHES["label_lse_fwd"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="contrastive_ops")  # no fallback to the reference
        out = co.supremix_loss(x, y, mix_lambda=0.3, window=3, backend="auto")
    assert tiles.LAUNCHES["label_lse_fwd"] == before + 2  # real pairs and hard negatives
    torch.testing.assert_close(out, co.supremix_loss(x, y, mix_lambda=0.3, window=3, backend="reference"))


def test_auto_takes_the_reference_for_what_kernels_lack(monkeypatch):
    from contrastive_ops import backends

    if backends.resolve("auto", op="supremix_loss", tensors=[torch.zeros(1, device=DEVICE)]) == "reference":
        pytest.skip("no kernel backend here")
    monkeypatch.setattr(sm, "_WARNED", set())
    x = torch.randn(6, 2, 4, device=DEVICE)
    y = LABELS.to(DEVICE)
    with pytest.warns(RuntimeWarning, match="mix_pos=True with floating-point labels"):
        out = co.supremix_loss(x, y, mix_lambda=0.3, backend="auto")
    torch.testing.assert_close(out, co.supremix_loss(x, y, mix_lambda=0.3, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        co.supremix_loss(x, y, mix_lambda=0.3, backend="auto")  # said once
        # the official weights with integer labels: fused, no warning
        out = co.supremix_loss(x, y.long(), mix_lambda=0.3, window=3, backend="auto")
    torch.testing.assert_close(out, co.supremix_loss(x, y.long(), mix_lambda=0.3, window=3, backend="reference"))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="contrastive_ops")
        # the official defaults (λ drawn per pair) with integer labels: fused, no warning, the reference's λ
        out = _seeded(x, y.long(), window=3, backend="auto")
    torch.testing.assert_close(out, _seeded(x, y.long(), window=3, backend="reference"))
    with pytest.warns(RuntimeWarning, match=r"beta=\(2.5, 8.0\)"):
        co.supremix_loss(x, y.long(), window=3, beta=(2.5, 8.0), backend="auto")


def test_module():
    x = torch.randn(6, 2, 5)
    m = co.nn.SupReMixLoss(0.5, window=3, backend="reference")
    torch.testing.assert_close(m(x, LABELS, mix_lambda=0.2),
                               co.supremix_loss(x, LABELS, 0.5, window=3, mix_lambda=0.2, backend="reference"))
    assert "window=3" in repr(m)


def test_inputs_not_modified():
    x = torch.randn(6, 2, 4, requires_grad=True)
    x0, y0 = x.detach().clone(), LABELS.clone()
    co.supremix_loss(x, LABELS, mix_lambda=0.3, backend="reference").backward()
    assert torch.equal(x.detach(), x0) and torch.equal(LABELS, y0)


# ------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labels, match", [
    (torch.zeros(5), r"labels must have shape \(6,\).*\(5,\)"),
    (torch.zeros(6, 1), r"labels must have shape \(6,\).*\(6, 1\)"),
    (torch.zeros(6, dtype=torch.bool), "labels must be real"),
    (torch.tensor([1.0, 2, float("nan"), 4, 5, 6]), r"labels must be finite.*\(6,\)"),
    ([1, 2, 3, 4, 5, 6], r"labels must be a tensor of shape \(6,\)"),
])
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        co.supremix_loss(torch.randn(6, 2, 4), labels, backend="reference")


@pytest.mark.parametrize("lam, match", [
    (1.5, r"mix_lambda must lie in \[0, 1\]"),
    (torch.zeros(5), r"mix_lambda must be.*\(12,\) or \(12, 12\).*\(5,\)"),
    (torch.zeros(12, 6), r"mix_lambda.*\(12, 6\)"),
    ("0.3", "mix_lambda must be a float or a tensor"),
])
def test_bad_mix_lambda(lam, match):
    with pytest.raises(ValueError, match=match):
        co.supremix_loss(torch.randn(6, 2, 4), LABELS, mix_lambda=lam, backend="reference")


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=0.0), "temperature"),
    (dict(base_temperature=-1.0), "base_temperature"),
    (dict(window=0), "window"),
    (dict(beta=(2.0,)), "beta"),
    (dict(distance="L3"), "distance"),
    (dict(reduction="avg"), "reduction"),
    (dict(backend="gpu"), "backend"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        co.supremix_loss(torch.randn(6, 2, 4), LABELS, **kw)


def test_bad_features():
    with pytest.raises(ValueError, match=r"features.*\(6,\)"):
        co.supremix_loss(torch.randn(6), LABELS)
    with pytest.raises(TypeError, match="floating"):
        co.supremix_loss(torch.zeros(6, 2, 4, dtype=torch.long), LABELS)


@pytest.mark.parametrize("backend", [p for p in backend_params(torch.device("cpu")) if p.values[0] == "cpu"])
def test_weighted_fused_path_stores_no_anchor_by_sample_buffer(backend):
    """use_weight=True on the kernels, λ fixed or drawn per pair: peak tensor bytes of forward + backward far
    below one A × M fp32 matrix (the reference holds several)."""
    from contrastive_ops.benchmarking.measure import peak_memory

    N = 2048  # the kernel's tiles are O(64·M) per thread: M = 4096 leaves a clear gap to A × M
    M = 2 * N
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 2, 8, generator=g, requires_grad=True)
    y = torch.randint(18, 60, (N,), generator=g)

    for lam in (0.3, None):  # None: λ drawn per pair (in the kernels: recomputed per tile, never stored)
        def step(be):
            return lambda: torch.autograd.grad(co.supremix_loss(x, y, mix_lambda=lam, mix_pos=False, backend=be), x)

        assert peak_memory(step("reference"), torch.device("cpu")) >= M * M * 4
        fused = peak_memory(step(backend), torch.device("cpu"))
        assert fused < M * M * 4 / 4, f"fused peak {fused} bytes vs one A x M fp32 matrix {M * M * 4} (lam {lam})"
