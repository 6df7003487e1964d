"""Valid argument spaces of the 13 public functions, shared by the reliability tests
(fuzz, half precision, compile, determinism, large values).

Each public function has a *builder* ``build(d) -> Case``.  ``d`` is a drawer
that names every choice it makes: the fuzz tests hand in a Hypothesis drawer
(every choice is drawn and shrinks), the other tests a ``FixedDrawer`` that
takes the builder's defaults and any overrides (``normalize=False``,
``temperature=0.01``, ``norm=1e3``, ...).  A ``Case`` knows how to call its
function on any backend and in any dtype, which inputs are differentiable, and
how sharp its logits can get (the scale of low-precision errors).

``run_case`` runs one case; ``compare_case`` runs it on a kernel backend and
on the reference and checks values and gradients (the same contract as
``helpers.compare_with_reference``, extended to scalar tensor arguments that
stay in the accumulation dtype and receive their gradient).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch

import contrastive_ops as co
from contrastive_ops import backends
from contrastive_ops.testing import HALF, assert_close, fp32_products

Tensor = torch.Tensor

# The public functions, in SPEC order.
LOSSES = (
    "info_nce", "clip_loss", "siglip_loss", "nt_xent", "mv_infonce", "mv_dhel", "supcon_loss",
    "dcl_loss", "dhel_loss", "sinkhorn_knopp", "swav_loss", "point_token_contrast", "similarity_lse",
    "supremix_loss", "selfcon_loss",
)
# Functions with a ``normalize`` argument.
NORMALIZING = ("info_nce", "nt_xent", "mv_infonce", "mv_dhel", "supcon_loss", "dcl_loss", "dhel_loss",
               "supremix_loss", "selfcon_loss")


# ----------------------------------------------------------------------------- drawers


class FixedDrawer:
    """Takes each choice's default unless ``overrides`` names it."""

    def __init__(self, seed: int = 0, **overrides):
        self._seed = seed
        self.overrides = overrides

    def int(self, name, lo, hi, default):
        return self.overrides.get(name, default)

    def float(self, name, lo, hi, default):
        return self.overrides.get(name, default)

    def pick(self, name, options, default=None):
        return self.overrides.get(name, options[0] if default is None else default)

    def seed(self):
        return self.overrides.get("seed", self._seed)


class HypothesisDrawer:
    """Draws every choice with Hypothesis; ``limits`` caps integer ranges by name (e.g. ``N``)."""

    def __init__(self, data, limits: Optional[Dict[str, int]] = None, fixed: Optional[dict] = None):
        self.data = data
        self.limits = limits or {}
        self.fixed = fixed or {}

    def int(self, name, lo, hi, default):
        from hypothesis import strategies as st

        if name in self.fixed:
            return self.fixed[name]
        hi = max(lo, min(hi, self.limits.get(name, hi)))
        return self.data.draw(st.integers(lo, hi), label=name)

    def float(self, name, lo, hi, default):
        from hypothesis import strategies as st

        if name in self.fixed:
            return self.fixed[name]
        # Log-uniform over [lo, hi]: small temperatures are as likely as large ones.
        x = self.data.draw(st.floats(math.log(lo), math.log(hi)), label=f"log {name}")
        return float(math.exp(x))

    def pick(self, name, options, default=None):
        from hypothesis import strategies as st

        if name in self.fixed:
            return self.fixed[name]
        return self.data.draw(st.sampled_from(list(options)), label=name)

    def seed(self):
        from hypothesis import strategies as st

        return self.data.draw(st.integers(0, 2**16), label="seed")


# ----------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    """One call of a public function.

    ``fn(*tensors, backend=..., **scalars, **kwargs)``.  ``tensors`` are the
    floating inputs (cast to the dtype under test; gradients compared for
    those with ``requires_grad``); ``scalars`` are 0-dim floating tensors
    (temperature, logit_scale, ...) that stay in the accumulation dtype;
    ``kwargs`` everything else (masks, labels, options, Python floats).
    """

    name: str
    fn: Callable
    tensors: List[Tensor]
    kwargs: dict
    scalars: Dict[str, Tensor]
    sharpness: float  # largest logit scale: 1/τ, logit_scale or 1/ε
    normalize: Optional[bool] = None
    feature_norm: Optional[float] = None  # row norm of the features when drawn at a set norm

    @property
    def op(self) -> str:
        return self.name

    def describe(self) -> str:
        shapes = [tuple(t.shape) for t in self.tensors]
        kw = {k: (tuple(v.shape) if isinstance(v, Tensor) else v) for k, v in self.kwargs.items()}
        sc = {k: float(v) for k, v in self.scalars.items()}
        return f"{self.name}{shapes} kwargs={kw} scalars={sc}"


def _gen(d) -> torch.Generator:
    return torch.Generator().manual_seed(d.seed())


def feats(shape, g, *, unit=False, norm=None) -> Tensor:
    """Gaussian features; ``unit`` rows of norm 1, ``norm`` rows of that norm, else norm about 1."""
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if unit or norm is not None:
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        if norm is not None:
            x = x * norm
    else:
        x = x / math.sqrt(shape[-1])
    return x.float()


def _temperature(d, name="temperature", lo=0.05, hi=2.0, default=0.1):
    """A temperature as a float or a 0-dim tensor; returns (kwargs part, scalars part, value)."""
    t = d.float(name, lo, hi, default)
    if d.pick(f"{name}_as", ("tensor", "float"), default="float") == "tensor":
        return {}, {name: torch.tensor(t, dtype=torch.float64)}, t
    return {name: t}, {}, t


def _norm_opts(d):
    """normalize flag and the feature norm: any norm when normalizing, about 1 otherwise."""
    normalize = d.pick("normalize", (True, False), default=True)
    norm = d.overrides.get("norm") if isinstance(d, FixedDrawer) else None
    if norm is None and normalize:
        # Unnormalized inputs of assorted norms: normalization must absorb them.
        norm = d.pick("norm", (None, 0.05, 5.0, 30.0), default=None)
    return normalize, norm


def _mask(d, g, N, V):
    """(N, V) bool mask or None; some instances keep fewer than 2 views, one keeps none."""
    kind = d.pick("mask", (None, "random", "ragged"), default=None)
    if kind is None:
        return None
    m = torch.rand(N, V, generator=g) < 0.7
    if kind == "ragged":
        m[0] = False
        m[0, 0] = True  # one present view: leaves the mean, stays a negative
        if N > 1:
            m[1] = False  # no view at all
        if N > 2:
            m[2] = True
    return m


def _labels(d, g, N):
    kind = d.pick("labels", (None, "classes", "singletons"), default="classes")
    if kind is None:
        return None
    if kind == "singletons":
        return torch.arange(N)[torch.randperm(N, generator=g)]  # every class of size 1
    n_cls = max(1, N // 3)
    lab = torch.randint(0, n_cls, (N,), generator=g)
    lab[-1] = n_cls + 7  # at least one singleton class
    return lab


def build_info_nce(d) -> Case:
    g = _gen(d)
    B, D = d.int("N", 1, 40, 12), d.int("D", 1, 40, 19)
    mode = d.pick("info_mode", ("plain", "targets", "symmetric"), default="plain")
    M = B + d.int("extra_keys", 0, 9, 3) if mode == "plain" else (B if mode == "symmetric" else d.int("M", 1, 40, 7))
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.07)
    kw = dict(normalize=normalize, reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"))
    if mode == "targets":
        kw["targets"] = torch.randint(0, M, (B,), generator=g)
    if mode == "symmetric":
        kw["symmetric"] = True
    q, k = feats((B, D), g, norm=norm), feats((M, D), g, norm=norm)
    return Case("info_nce", co.info_nce, [q, k], {**kw, **tk}, ts, 1 / t, normalize, feature_norm=norm)


def build_clip_loss(d) -> Case:
    g = _gen(d)
    B, D = d.int("N", 1, 40, 12), d.int("D", 1, 40, 19)
    s = d.float("logit_scale", 1.0, 100.0, 14.3)
    norm = d.overrides.get("norm") if isinstance(d, FixedDrawer) else None
    x, y = feats((B, D), g, unit=True, norm=norm), feats((B, D), g, unit=True, norm=norm)
    if d.pick("logit_scale_as", ("tensor", "float"), default="float") == "tensor":
        sc = {"logit_scale": torch.tensor(s, dtype=torch.float64)}
        return Case("clip_loss", co.clip_loss, [x, y], {}, sc, s, feature_norm=norm)
    return Case("clip_loss", co.clip_loss, [x, y], {"logit_scale": s}, {}, s, feature_norm=norm)


def build_siglip_loss(d) -> Case:
    g = _gen(d)
    B, D = d.int("N", 1, 40, 12), d.int("D", 1, 40, 19)
    s = d.float("logit_scale", 1.0, 30.0, 10.0)
    b = -d.float("neg_logit_bias", 0.01, 10.0, 10.0)
    norm = d.overrides.get("norm") if isinstance(d, FixedDrawer) else None
    x, y = feats((B, D), g, unit=True, norm=norm), feats((B, D), g, unit=True, norm=norm)
    if d.pick("logit_scale_as", ("tensor", "float"), default="float") == "tensor":
        sc = {"logit_scale": torch.tensor(s, dtype=torch.float64), "logit_bias": torch.tensor(b, dtype=torch.float64)}
        return Case("siglip_loss", co.siglip_loss, [x, y], {}, sc, s, feature_norm=norm)
    return Case("siglip_loss", co.siglip_loss, [x, y], {"logit_scale": s, "logit_bias": b}, {}, s, feature_norm=norm)


def build_nt_xent(d) -> Case:
    g = _gen(d)
    N, D = d.int("N", 1, 40, 12), d.int("D", 1, 40, 19)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.5)
    kw = dict(normalize=normalize, reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    return Case("nt_xent", co.nt_xent, [feats((N, D), g, norm=norm), feats((N, D), g, norm=norm)], kw, ts,
                1 / t, normalize, feature_norm=norm)


def _mv_views(d, g, N, V, D, norm):
    """(N, V, D) tensor, or V separate (N, D) tensors (the sequence form)."""
    form = d.pick("features_form", ("stacked", "sequence"), default="stacked")
    if form == "stacked":
        return [feats((N, V, D), g, norm=norm)], False
    return [feats((N, D), g, norm=norm) for _ in range(V)], True


def build_mv_infonce(d) -> Case:
    g = _gen(d)
    N, V, D = d.int("N", 1, 40, 9), d.int("V", 2, 5, 3), d.int("D", 1, 40, 19)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.1)
    tensors, seq = _mv_views(d, g, N, V, D, norm)
    kw = dict(mask=_mask(d, g, N, V), variant=d.pick("variant", ("mv", "pairwise"), default="mv"),
              normalize=normalize, reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    fn = (lambda *views, **k: co.mv_infonce(list(views), **k)) if seq else co.mv_infonce
    return Case("mv_infonce", fn, tensors, kw, ts, 1 / t, normalize, feature_norm=norm)


def build_mv_dhel(d) -> Case:
    g = _gen(d)
    N, V, D = d.int("N", 1, 40, 9), d.int("V", 2, 5, 3), d.int("D", 1, 40, 19)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.2)
    tensors, seq = _mv_views(d, g, N, V, D, norm)
    kw = dict(mask=_mask(d, g, N, V), normalize=normalize,
              reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    fn = (lambda *views, **k: co.mv_dhel(list(views), **k)) if seq else co.mv_dhel
    return Case("mv_dhel", fn, tensors, kw, ts, 1 / t, normalize, feature_norm=norm)


def build_supcon_loss(d) -> Case:
    g = _gen(d)
    N, D = d.int("N", 1, 40, 10), d.int("D", 1, 40, 19)
    V = d.int("V", 1, 5, 2)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.07)
    x = feats((N, D) if V == 1 and d.pick("single_view_2d", (True, False), default=True) else (N, V, D), g, norm=norm)
    tb = d.float("base_temperature", 0.05, 2.0, 0.07)
    kw = dict(labels=_labels(d, g, N), base_temperature=tb,
              contrast_mode=d.pick("contrast_mode", ("all", "one"), default="all"), normalize=normalize,
              reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    return Case("supcon_loss", co.supcon_loss, [x], kw, ts, 1 / t, normalize, feature_norm=norm)


def build_selfcon_loss(d) -> Case:
    g = _gen(d)
    N, V, D = d.int("N", 1, 40, 10), d.int("V", 2, 5, 3), d.int("D", 1, 40, 19)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.07)
    tensors, seq = _mv_views(d, g, N, V, D, norm)
    kw = dict(labels=_labels(d, g, N), base_temperature=d.float("base_temperature", 0.05, 2.0, 0.07),
              alpha=d.pick("alpha", (0.0, 0.5), default=0.0), normalize=normalize,
              reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    fn = (lambda *views, **k: co.selfcon_loss(list(views), **k)) if seq else co.selfcon_loss
    return Case("selfcon_loss", fn, tensors, kw, ts, 1 / t, normalize, feature_norm=norm)


def build_supremix_loss(d) -> Case:
    """The configurations the kernel backends compute (with or without weights, a float or per-anchor λ, hard
    positives with integer labels); the others run on the reference only and are tested in ``test_supremix.py``."""
    g = _gen(d)
    N, D = d.int("N", 1, 40, 10), d.int("D", 1, 40, 19)
    V = d.int("V", 1, 3, 2)
    normalize, norm = _norm_opts(d)
    if D == 1 and normalize:
        # A 1-D feature normalizes to ±1: each gradient entry is exactly 0, a cancellation of terms of size
        # |upstream|/|x| that leaves about one ulp of them, past the fixed fp32 atol for rows of norm
        # ~0.005 (seen at N = 19, V = 3) in any summation order but the reference's own.  Unit rows.
        norm = 1.0
    tk, ts, t = _temperature(d, default=0.5)
    x = feats((N, D) if V == 1 and d.pick("single_view_2d", (True, False), default=True) else (N, V, D), g, norm=norm)
    # regression labels with repeats: integer ages (hard positives composed), or a half-year grid (not)
    ages = torch.randint(0, max(2, N // 2), (N,), generator=g)
    integer = d.pick("integer_labels", (True, False), default=True)
    labels = 18 + ages if integer else 18 + 0.5 * ages.float()
    lam = (torch.rand(V * N, generator=g) if d.pick("mix_lambda_as", ("float", "anchor"), default="float") == "anchor"
           else d.float("mix_lambda", 0.01, 1.0, 0.3))
    kw = dict(labels=labels, mix_neg=d.pick("mix_neg", (True, False), default=True),
              mix_pos=integer and d.pick("mix_pos", (True, False), default=True), window=d.int("window", 1, 4, 3),
              use_weight=d.pick("use_weight", (True, False), default=True),
              distance=d.pick("distance", ("L1_inv", "L2_inv", "L1", "L2"), default="L1_inv"),
              mix_lambda=lam, normalize=normalize,
              reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    if d.pick("base_temperature_as", ("none", "float"), default="none") == "float":
        kw["base_temperature"] = d.float("base_temperature", 0.05, 2.0, 0.5)
    fn = lambda x, **k: co.supremix_loss(x, k.pop("labels"), **k)  # noqa: E731
    return Case("supremix_loss", fn, [x], kw, ts, 1 / t, normalize, feature_norm=norm)


def build_dcl_loss(d) -> Case:
    g = _gen(d)
    N, D = d.int("N", 1, 40, 12), d.int("D", 1, 40, 19)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.1)
    kw = dict(weighted=d.pick("weighted", (False, True), default=False), sigma=d.float("sigma", 0.1, 2.0, 0.5),
              normalize=normalize, reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    return Case("dcl_loss", co.dcl_loss, [feats((N, D), g, norm=norm), feats((N, D), g, norm=norm)], kw, ts,
                1 / t, normalize, feature_norm=norm)


def build_dhel_loss(d) -> Case:
    g = _gen(d)
    N, D = d.int("N", 1, 40, 12), d.int("D", 1, 40, 19)
    normalize, norm = _norm_opts(d)
    tk, ts, t = _temperature(d, default=0.3)
    kw = dict(include_augs=d.pick("include_augs", (True, False), default=True), normalize=normalize,
              reduction=d.pick("reduction", ("mean", "sum", "none"), default="mean"), **tk)
    return Case("dhel_loss", co.dhel_loss, [feats((N, D), g, norm=norm), feats((N, D), g, norm=norm)], kw, ts,
                1 / t, normalize, feature_norm=norm)


def _scores(d, g, B, K, D):
    """SwAV scores z·Cᵀ of unit z and unit prototypes: values in [-1, 1] (scaled by ``score_scale``)."""
    z, c = feats((B, D), g, unit=True), feats((K, D), g, unit=True)
    return (z @ c.T) * d.float("score_scale", 1.0, 1.0, 1.0)


def build_sinkhorn_knopp(d) -> Case:
    g = _gen(d)
    B, K, D = d.int("N", 1, 40, 12), d.int("K", 1, 40, 17), d.int("D", 1, 40, 19)
    eps = d.float("epsilon", 0.02, 0.5, 0.05)
    s = _scores(d, g, B, K, D)
    kw = dict(epsilon=eps, iterations=d.int("iterations", 1, 5, 3))
    return Case("sinkhorn_knopp", co.sinkhorn_knopp, [s.requires_grad_(False)], kw, {},
                d.float("score_scale", 1.0, 1.0, 1.0) / eps)


def build_swav_loss(d) -> Case:
    g = _gen(d)
    B, K, D = d.int("N", 1, 40, 8), d.int("K", 1, 40, 13), d.int("D", 1, 40, 19)
    n = d.int("n_crops", 2, 5, 3)
    assign = d.pick("crops_for_assign", ((0, 1), (0,), (1,), tuple(range(n))), default=(0, 1))
    tk, ts, t = _temperature(d, default=0.1)
    crops = [_scores(d, g, B, K, D) for _ in range(n)]
    eps = d.float("epsilon", 0.02, 0.5, 0.05)
    kw = dict(crops_for_assign=assign, epsilon=eps, iterations=d.int("iterations", 1, 5, 3), **tk)
    fn = lambda *cs, **k: co.swav_loss(list(cs), **k)  # noqa: E731
    return Case("swav_loss", fn, crops, kw, ts, max(1 / t, 1 / eps))


def build_point_token_contrast(d) -> Case:
    g = _gen(d)
    B, G, D = d.int("B", 1, 6, 3), d.int("G", 1, 12, 7), d.int("D", 1, 40, 19)
    mode = d.pick("mode", ("infonce", "cosine"), default="infonce")
    kw = dict(mode=mode, pairing=d.pick("pairing", ("diag", "official"), default="diag"),
              negatives=d.pick("negatives", ("cloud", "batch"), default="cloud"))
    tk, ts, t = _temperature(d, default=0.1)
    ratio = d.pick("mask_ratio", (0.6, 0.0, 1.0, 0.3), default=0.6)
    m1 = torch.rand(B, G, generator=g) < ratio
    m2 = torch.rand(B, G, generator=g) < ratio
    norm = d.overrides.get("norm") if isinstance(d, FixedDrawer) else d.pick("norm", (None, 0.05, 30.0))
    f1, f2 = feats((B, G, D), g, norm=norm), feats((B, G, D), g, norm=norm)
    fn = lambda f1, f2, **k: co.point_token_contrast(f1, f2, k.pop("mask1"), k.pop("mask2"), **k)  # noqa: E731
    return Case("point_token_contrast", fn, [f1, f2], dict(mask1=m1, mask2=m2, **kw, **tk), ts,
                1 / t if mode == "infonce" else 1.0, True, feature_norm=norm)


def build_similarity_lse(d) -> Case:
    g = _gen(d)
    B, M, D = d.int("N", 1, 40, 12), d.int("M", 1, 40, 9), d.int("D", 1, 40, 19)
    s = d.float("scale", 0.5, 20.0, 5.0)
    norm = d.overrides.get("norm") if isinstance(d, FixedDrawer) else None
    q, k = feats((B, D), g, norm=norm), feats((M, D), g, norm=norm)
    if d.pick("scale_as", ("tensor", "float"), default="float") == "tensor":
        sc = {"scale": torch.tensor(s, dtype=torch.float64)}
        return Case("similarity_lse", co.similarity_lse, [q, k], {}, sc, s, feature_norm=norm)
    return Case("similarity_lse", co.similarity_lse, [q, k], {"scale": s}, {}, s, feature_norm=norm)


BUILDERS: Dict[str, Callable] = {name: globals()[f"build_{name}"] for name in LOSSES}


def example(name: str, seed: int = 0, **overrides) -> Case:
    """The default case of ``name`` with ``overrides`` (FixedDrawer)."""
    return BUILDERS[name](FixedDrawer(seed, **overrides))


# ----------------------------------------------------------------------------- running


def _supcon_counted(labels, N: int, V: int, anchors_per_instance: int) -> int:
    """Anchors (``anchors_per_instance`` of each instance) with another of the V·N samples sharing their label."""
    inst = torch.arange(N) if labels is None else labels.cpu()
    same = inst[:, None] == inst[None, :]  # (N, N) instances sharing a label
    # anchor (v, i) has a positive if another sample (v', j) != (v, i) shares its label
    per_instance = same.sum(1) * V - 1  # same-label samples other than the anchor itself
    return int((per_instance > 0).sum()) * anchors_per_instance


def counted_anchors(case: Case) -> Optional[int]:
    """The number of anchors that count in ``reduction="mean"`` (SPEC, Reductions): ``"mean"`` = ``"sum"`` / this.

    info_nce: B; nt_xent: 2N; dcl_loss, dhel_loss: N; mv_infonce, mv_dhel: the
    instances with at least two views present; supcon_loss: the anchors
    (all V·N, or view 0's N with ``contrast_mode="one"``) with at least one positive;
    supremix_loss: likewise over all V·N anchors, plus those with a hard positive; selfcon_loss: as
    supcon_loss for ``alpha=0``, None for ``alpha > 0`` (its mean is the backbone term's mean plus
    α times the sub-exit anchors' mean, not one sum over one count).
    """
    x = case.tensors[0]
    if case.name == "info_nce":
        return x.shape[0]
    if case.name == "nt_xent":
        return 2 * x.shape[0]
    if case.name in ("dcl_loss", "dhel_loss"):
        return x.shape[0]
    if case.name in ("mv_infonce", "mv_dhel"):
        mask = case.kwargs.get("mask")
        N = x.shape[0]
        return N if mask is None else int((mask.sum(1) >= 2).sum())
    if case.name == "supcon_loss":
        N = x.shape[0]
        V = 1 if x.dim() == 2 else x.shape[1]
        anchors_per_instance = V if case.kwargs.get("contrast_mode", "all") == "all" else 1
        return _supcon_counted(case.kwargs.get("labels"), N, V, anchors_per_instance)
    if case.name == "supremix_loss":
        N = x.shape[0]
        V = 1 if x.dim() == 2 else x.shape[1]
        y = case.kwargs["labels"].cpu().double()
        real = (y[:, None] == y[None, :]).sum(1) * V - 1 > 0
        if case.kwargs.get("mix_pos", True):
            n = case.kwargs.get("window", 5)
            lower = ((y[None, :] < y[:, None]) & (y[:, None] - y[None, :] < n)).any(1)
            upper = ((y[None, :] > y[:, None]) & (y[None, :] - y[:, None] < n)).any(1)
            real = real | (lower & upper)
        return int(real.sum()) * V
    if case.name == "selfcon_loss":
        N, V = x.shape[0], (len(case.tensors) if x.dim() == 2 else x.shape[1])
        if case.kwargs.get("alpha", 0.0) > 0:
            return None
        return _supcon_counted(case.kwargs.get("labels"), N, V, V)
    raise ValueError(f"{case.name} has no reduction")


def require_backend(case: Case, backend: str, dtype: torch.dtype, device) -> None:
    """Skip when ``backend`` cannot run ``case.op`` on this device/dtype (a primitive it lacks, say)."""
    if backend == "reference":
        return
    probe = torch.empty(0, dtype=dtype, device=device)
    why = backends._why_not(backend, case.op, torch.device(device), probe.dtype)
    if why is not None:
        pytest.skip(f"backend {backend!r} cannot run {case.op} ({dtype}, {torch.device(device).type}): {why}")


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass
class Result:
    out: Tensor
    grads: List[Optional[Tensor]]  # per tensor input (None where not differentiable)
    scalar_grads: Dict[str, Optional[Tensor]]
    weight: Optional[Tensor] = None


def run_case(case: Case, backend: str, dtype: torch.dtype, *, device=None, grad=True, weight=None,
             scalar_dtype=None, fn=None) -> Result:
    """Call ``case`` on ``backend`` with its tensors in ``dtype`` (scalars in the accumulation dtype).

    With ``grad``, backpropagate ``(out * weight).sum()`` (``weight`` random for a
    non-scalar output, 2.0 for a scalar one, unless given) and collect input gradients.
    """
    device = device or torch.device("cpu")
    sdt = scalar_dtype or ref_dtype(dtype)
    diff = grad and case.name != "sinkhorn_knopp"
    ins = [t.detach().to(device=device, dtype=dtype).clone().requires_grad_(diff) for t in case.tensors]
    scal = {k: v.detach().to(device=device, dtype=sdt).clone().requires_grad_(diff) for k, v in case.scalars.items()}
    kw = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in case.kwargs.items()}
    out = (fn or case.fn)(*ins, backend=backend, **scal, **kw)
    res = Result(out, [None] * len(ins), {k: None for k in scal})
    if diff and out.requires_grad:
        if weight is None:
            weight = (torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
                      if out.dim() > 0 else torch.tensor(2.0, dtype=torch.float64))
        res.weight = weight
        (out * weight.to(device=device, dtype=out.dtype)).sum().backward()
        res.grads = [t.grad for t in ins]
        res.scalar_grads = {k: v.grad for k, v in scal.items()}
    return res


def tol_scale(case: Case) -> float:
    """fp32/fp64: how much the elementwise tolerance of ``TOL`` widens (with the logit scale past 20)."""
    return max(1.0, case.sharpness / 20.0)


def _mean_count(case: Case) -> int:
    """What the upstream gradient of each anchor is divided by: the anchors a ``"mean"`` counts (1 otherwise)."""
    red = case.kwargs.get("reduction", "mean")
    if case.name in ("similarity_lse", "sinkhorn_knopp") or red != "mean":
        return 1
    if case.name in ("clip_loss", "siglip_loss", "swav_loss"):
        return case.tensors[0].shape[0]
    if case.name == "point_token_contrast":
        return int((case.kwargs["mask1"] & case.kwargs["mask2"]).sum())
    if case.name == "selfcon_loss" and case.kwargs.get("alpha", 0.0) > 0:
        x = case.tensors[0]
        V = len(case.tensors) if x.dim() == 2 else x.shape[1]
        return (V - 1) * x.shape[0]  # the sub-exit anchors of the α term
    return counted_anchors(case)


def _half_terms(case: Case, i: int, weight: Optional[Tensor]):
    """``unit`` and ``inv_norm`` of the half-precision rule (``contrastive_ops.testing``) for input ``i``'s gradient.

    ``unit`` = |upstream gradient of one anchor| · logit scale · |features|:
    the size of the terms of a gradient entry, which are rounded to the input
    dtype before autograd sums them and may cancel to an exact 0 (a loss with
    one pair is constant).  ``inv_norm`` = 1/‖x‖ (the smallest row norm) for
    the gradient of an input the loss normalizes, since the backward of
    x ↦ x/‖x‖ divides by ‖x‖; 1 for an input used as it is.
    """
    w = 1.0 if weight is None else float(weight.abs().max())
    feat = 1.0 if case.normalize else max(float(t.norm(dim=-1).max()) for t in case.tensors)
    unit = w * case.sharpness * feat / max(1, _mean_count(case))
    inv_norm = 1.0
    if case.normalize:
        inv_norm = 1.0 / float(case.tensors[i].norm(dim=-1).min().clamp_min(1e-12))
    return unit, inv_norm


def compare_case(case: Case, backend: str, dtype: torch.dtype, *, device=None, what=""):
    """``backend`` in ``dtype`` against the reference on the same values in fp32 (fp64 for fp64).

    fp16/bf16: the half-precision rule of ``contrastive_ops.testing`` (the
    kernel's error at most ``HALF_C`` times the error of the reference run in
    the same dtype, plus a small atol), per output.
    """
    rdt = ref_dtype(dtype)
    k = run_case(case, backend, dtype, device=device)
    r = run_case(case, "reference", rdt, device=device, weight=k.weight)
    low = run_case(case, "reference", dtype, device=device, weight=k.weight) if dtype in HALF else None
    scale = tol_scale(case)
    products = fp32_products(backend, k.out.device)
    tag = f"{what} {backend} {dtype} {case.describe()}"
    assert k.out.dtype == rdt, f"{tag}: loss dtype {k.out.dtype}, SPEC says {rdt}"
    # the loss: an LSE minus a positive logit, each of size sharpness·|features|², may cancel to 0
    feat = 1.0 if case.normalize else max(float(t.norm(dim=-1).max()) for t in case.tensors)
    assert_close(k.out, r.out, dtype, low=None if low is None else low.out, scale=scale,
                 unit=case.sharpness * feat * feat, inv_norm=1.0, what=f"loss [{tag}]", products=products)
    for i, (gk, gr) in enumerate(zip(k.grads, r.grads)):
        if gr is None:
            assert gk is None or not gk.abs().sum(), f"input {i}: gradient on {backend} but not on the reference"
            continue
        assert gk is not None, f"{tag}: no gradient for input {i}"
        assert gk.dtype == dtype, f"{tag}: gradient of input {i} is {gk.dtype}, SPEC says the input dtype {dtype}"
        unit, inv_norm = _half_terms(case, i, k.weight)
        assert_close(gk, gr, dtype, low=None if low is None else low.grads[i], scale=scale, unit=unit,
                     inv_norm=inv_norm, what=f"grad of input {i} [{tag}]", products=products)
    for name, gr in r.scalar_grads.items():
        gk = k.scalar_grads[name]
        if gr is None:
            continue
        assert gk is not None, f"{tag}: no gradient for {name}"
        # terms of d/dτ of x/τ are x/τ² (sharpness² · |features|²); of d/ds of s·x, x; of d/db, 1
        w = 1.0 if k.weight is None else float(k.weight.abs().max())
        unit = w * feat * feat * (case.sharpness ** 2 if name == "temperature" else 1.0)
        assert_close(gk, gr, dtype, low=None if low is None else low.scalar_grads[name], scale=scale,
                     unit=unit, inv_norm=1.0, what=f"grad of {name} [{tag}]", products=products)
    return k, r


def backends_for(dtype: torch.dtype, device) -> List[str]:
    """The reference plus every kernel backend that runs ``dtype`` on ``device`` here."""
    out = ["reference"]
    for name, (ok, _why) in co.available_backends().items():
        if name == "reference" or not ok:
            continue
        mod = backends.backend_module(name)
        if torch.device(device).type in mod.devices() and dtype in mod.dtypes():
            out.append(name)
    return out


def all_backend_params(device) -> list:
    """``pytest.param`` for the reference plus ``helpers.backend_params`` (missing kernels skip with reason)."""
    from helpers import backend_params

    return [pytest.param("reference", id="reference")] + backend_params(device)


def flatten_outputs(res: Result) -> List[Tensor]:
    """The loss and every gradient of a result, for bitwise comparisons."""
    out = [res.out]
    out += [g for g in res.grads if g is not None]
    out += [g for g in res.scalar_grads.values() if g is not None]
    return out


def cases_for_dtypes(names: Sequence[str], dtypes: Sequence[torch.dtype]):
    return [(n, dt) for n in names for dt in dtypes]
