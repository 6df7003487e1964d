r"""Benchmark cases: input generators, FLOP counts and the implementations to compare.

This is the one module that the command line (``python -m contrastive_ops``),
the sweep (``python -m contrastive_ops bench``) and the pytest-benchmark suite
(``benchmarks/test_bench_losses.py``) read.  The plain-PyTorch baseline is the
library's own ``backend="reference"`` (the dense formula that stores the full
similarity matrix); peers are thin adapters that feed the *same* inputs to
other libraries' losses (``contrastive_ops.benchmarking.peers``).

Size
----
Every case is parametrized by one integer ``n``, the batch size N (the number of
instances; each has V views where the loss is multi-view).  ``Inputs.shapes``
records the tensor shapes that ``n`` gives.

FLOP convention
---------------
Only the matrix products that touch a B×M similarity matrix are counted, at
2·B·M·D FLOPs each.  Everything else (normalization, exp, reductions) is O(B·M)
or O((B+M)·D) and is left out, so the count is a lower bound on the work of
*any* implementation:

* one-sided loss (each row needs only its own row statistic: InfoNCE, NT-Xent,
  DCL, DHEL, SupCon, MV-InfoNCE, MV-DHEL, SigLIP, similarity_lse)::

      6·B·M·D = 2·B·M·D (S = Q·Kᵀ) + 2·B·M·D (dQ = dS·K) + 2·B·M·D (dK = dSᵀ·Q)

  A chunked implementation can form dS for a block of rows as soon as the
  block's row LSE is known, so S is needed once.
* symmetric loss (rows *and* columns are softmax-normalized: ``clip_loss``,
  ``info_nce(symmetric=True)``, ``point_token_contrast`` in InfoNCE mode)::

      8·B·M·D = the above + 2·B·M·D

  The column LSE needs a complete pass over all rows before any dS entry is
  known, so an implementation that does not store S computes it twice.

Losses made of several similarity blocks sum the blocks' counts (e.g. MV-DHEL:
V blocks of N×N; DCL: two directions of N×2N).  ``sinkhorn_knopp`` and
``swav_loss`` take precomputed scores and have no similarity product: no FLOP
count, no FLOP/s.  Achieved FLOP/s = count / median time; the dense reference
and the fused kernels are measured against the same count.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import contrastive_ops as co
from contrastive_ops import backends

from .peers import PEERS, Peer

Tensor = torch.Tensor

# Views of the multi-view cases, prototypes of the SwAV cases, tokens per cloud
# of the point-token case (Point-CMAE: 64 groups).
VIEWS = 4
SUPCON_VIEWS = 2
SELFCON_EXITS = 3  # two sub-network exits and the backbone
CACR_VIEWS = 5  # the official small-scale setting: a query and four positives
PIX_MAP = 7  # PixPro's 7×7 feature map
PROTOTYPES = 3000
SWAV_CROPS = 4
TOKENS = 64


@dataclass
class Inputs:
    """Positional and keyword arguments of one call, plus what the reports need."""

    args: tuple
    kwargs: dict
    shapes: Dict[str, list]
    flops: Optional[int]  # fwd+bwd, see the FLOP convention above; None if not a similarity loss
    differentiable: bool = True
    needs: Tuple[str, ...] = ()  # primitives this configuration needs beyond the loss's own (OP_PRIMITIVES)

    def tensors(self) -> List[Tensor]:
        return [t for t in _flatten((self.args, self.kwargs)) if isinstance(t, Tensor)]

    def leaves(self) -> List[Tensor]:
        """Tensors whose gradient a fwd+bwd step computes."""
        return [t for t in self.tensors() if t.requires_grad]


def _flatten(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _flatten(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flatten(v)
    else:
        yield x


def map_tensors(x, fn):
    """Apply ``fn`` to every tensor of a nested args/kwargs structure."""
    if isinstance(x, dict):
        return {k: map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(map_tensors(v, fn) for v in x)
    if isinstance(x, list):
        return [map_tensors(v, fn) for v in x]
    if isinstance(x, Tensor):
        return fn(x)
    return x


def cast_inputs(inp: Inputs, dtype: torch.dtype) -> Inputs:
    """Fresh leaf copies of ``inp`` with floating *features* in ``dtype``.

    0-dim scalars (temperatures, logit scales) stay in their own dtype, as a
    user's learnable scale does.
    """

    def fn(t):
        if t.is_floating_point():
            dt = dtype if t.dim() > 0 else t.dtype
            return t.detach().to(dt).clone().requires_grad_(t.requires_grad)
        return t

    return Inputs(map_tensors(inp.args, fn), map_tensors(inp.kwargs, fn), inp.shapes, inp.flops, inp.differentiable)


# ---------------------------------------------------------------------------
# Generators.  Values are drawn on the CPU from a seeded generator in float32,
# then moved and cast, so every device and dtype sees the same numbers.
# ---------------------------------------------------------------------------

class _Draw:
    def __init__(self, device, dtype, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.device, self.dtype = torch.device(device), dtype

    def feat(self, *shape, normalize=False, grad=True):
        t = torch.randn(*shape, generator=self.g)
        if normalize:
            t = F.normalize(t, dim=-1)
        return t.to(self.device, self.dtype).requires_grad_(grad)

    def scalar(self, value, grad=True):
        return torch.tensor(float(value), device=self.device).requires_grad_(grad)

    def randint(self, high, *shape):
        return torch.randint(0, high, shape, generator=self.g).to(self.device)

    def bernoulli(self, p, *shape, move=True):
        t = torch.rand(*shape, generator=self.g) < p
        return t.to(self.device) if move else t


def _mm(b, m, d) -> int:
    return 2 * b * m * d


def _make_info_nce(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    q, k = r.feat(n, d), r.feat(n, d)
    sym = variant == "symmetric"
    kw = dict(temperature=0.07)
    if sym:
        kw["symmetric"] = True
    if variant == "targets":  # more keys than queries, shuffled targets
        k = r.feat(n + 3, d)
        kw["targets"] = torch.randperm(n + 3, generator=r.g)[:n].to(dev)
    m = k.shape[0]
    return Inputs((q, k), kw, {"query": [n, d], "key": [m, d]}, (4 if sym else 3) * _mm(n, m, d))


def _make_clip(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    img, txt = r.feat(n, d, normalize=True), r.feat(n, d, normalize=True)
    return Inputs((img, txt, r.scalar(1 / 0.07)), {}, {"image_features": [n, d], "text_features": [n, d]},
                  4 * _mm(n, n, d))


def _make_siglip(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    img, txt = r.feat(n, d, normalize=True), r.feat(n, d, normalize=True)
    return Inputs((img, txt, r.scalar(10.0), r.scalar(-10.0)), {},
                  {"image_features": [n, d], "text_features": [n, d]}, 3 * _mm(n, n, d))


def _make_nt_xent(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    return Inputs((r.feat(n, d), r.feat(n, d)), dict(temperature=0.5), {"z1": [n, d], "z2": [n, d]},
                  3 * _mm(2 * n, 2 * n, d))


def _make_mv(tau):
    def make(n, d, dt, dev, seed, variant, small):
        r = _Draw(dev, dt, seed)
        v = 3 if small else VIEWS
        feats = r.feat(n, v, d)
        kw = dict(temperature=tau)
        if variant == "mask":
            mask = r.bernoulli(0.8, n, v)
            mask[0] = False
            mask[1, 1:] = False  # one instance with no view, one with a single view
            kw["mask"] = mask
        if variant == "pairwise":
            kw["variant"] = "pairwise"
        if variant == "list":
            feats = [f.detach().requires_grad_() for f in feats.detach().unbind(1)]
        return Inputs((feats,), kw, {"features": [n, v, d]}, None)

    return make


def _with_flops(make, flops):
    def wrapped(n, d, dt, dev, seed, variant, small):
        inp = make(n, d, dt, dev, seed, variant, small)
        inp.flops = flops(inp, n, d, variant)
        return inp

    return wrapped


def _mv_infonce_flops(inp, n, d, variant):
    v = inp.shapes["features"][1]
    if variant == "pairwise":  # V·(V−1) ordered pairs of N×N cross-entropies
        return v * (v - 1) * 3 * _mm(n, n, d)
    return 3 * _mm(v * n, v * n, d)


def _mv_dhel_flops(inp, n, d, variant):
    v = inp.shapes["features"][1]
    return v * 3 * _mm(n, n, d)  # V same-view blocks


def _make_supcon(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    v = SUPCON_VIEWS
    feats = r.feat(n, v, d)
    labels = None if variant == "unlabeled" else r.randint(max(2, n // 8), n)
    kw = dict(temperature=0.07)
    if variant == "one":
        kw["contrast_mode"] = "one"
    anchors = n if variant == "one" else v * n
    shapes = {"features": [n, v, d]} if labels is None else {"features": [n, v, d], "labels": [n]}
    return Inputs((feats, labels), kw, shapes, 3 * _mm(anchors, v * n, d))


def _make_selfcon(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    v = SELFCON_EXITS
    feats = r.feat(n, v, d)
    labels = None if variant == "unlabeled" else r.randint(max(2, n // 8), n)
    kw = dict(temperature=0.07)
    flops = 3 * _mm(v * n, v * n, d)
    if variant == "alpha":  # sub-exit anchors against all exits, and the backbone view against itself
        kw["alpha"] = 0.5
        flops = 3 * _mm((v - 1) * n, v * n, d) + 3 * _mm(n, n, d)
    shapes = {"features": [n, v, d]} if labels is None else {"features": [n, v, d], "labels": [n]}
    return Inputs((feats, labels), kw, shapes, flops)


def _make_supremix(n, d, dt, dev, seed, variant, small):
    """No hard positives, one λ; ``"weighted"``: the official distance-magnifying weights (``label_lse``)."""
    r = _Draw(dev, dt, seed)
    feats = r.feat(n, 2, d)
    labels = 18.0 + r.randint(max(2, n // 8), n).float()
    weighted = variant == "weighted"
    kw = dict(temperature=0.5, mix_pos=False, use_weight=weighted, mix_lambda=0.3, mix_neg=variant != "no_mix")
    # real pairs: S, dQ, dK; hard negatives against detached samples: S, dQ
    flops = 3 * _mm(2 * n, 2 * n, d) + (2 * _mm(2 * n, 2 * n, d) if kw["mix_neg"] else 0)
    return Inputs((feats, labels), kw, {"features": [n, 2, d], "labels": [n]}, flops,
                  needs=("label_lse",) if weighted else ())


def _make_sepclr(n, d, dt, dev, seed, variant, small):
    """Common heads (N, D) and salient heads (N, D/2, scaled 0.1 as unnormalized outputs), labels 0/1."""
    r = _Draw(dev, dt, seed)
    ds = max(1, d // 2)
    c1, c2 = r.feat(n, d), r.feat(n, d)
    s1 = (0.1 * torch.randn(n, ds, generator=r.g)).to(r.device, dt).requires_grad_(True)
    s2 = (0.1 * torch.randn(n, ds, generator=r.g)).to(r.device, dt).requires_grad_(True)
    labels = r.randint(2, n)
    # uniformity of four heads and two k-JEM terms: six N×N core calls (S, dQ, dK each)
    flops = 4 * 3 * _mm(n, n, d) + 2 * 3 * _mm(n, n, d + ds)
    shapes = {"common_1": [n, d], "common_2": [n, d], "salient_1": [n, ds], "salient_2": [n, ds], "labels": [n]}
    return Inputs((c1, c2, s1, s2, labels), {}, shapes, flops)


def _make_cacr(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    v = CACR_VIEWS
    # repulsion: one softmax-weighted row mean per view pair x < y (S, dQ, dK each)
    return Inputs((r.feat(n, v, d),), {}, {"features": [n, v, d]}, v * (v - 1) // 2 * 3 * _mm(n, n, d))


def _make_hydra(n, d, dt, dev, seed, variant, small):
    """Features, a gate in (0, 1), the anchors' and positive classes; SimLAP gating (every backend) or
    ``"filter"`` (hydra's default: the ``gated_lse`` primitive, two products per tile)."""
    r = _Draw(dev, dt, seed)
    z1, k2 = r.feat(n, d), r.feat(n, d)
    gate = torch.sigmoid(torch.randn(n, d, generator=r.g)).to(r.device, dt).requires_grad_(True)
    classes = max(2, n // 8)
    y1, posy = r.randint(classes, n), r.randint(classes, n)
    gating = "filter" if variant == "filter" else "simlap"
    kw = dict(temperature=0.1, gating=gating)
    shapes = {"z1": [n, d], "k2": [n, d], "gate": [n, d], "y1": [n], "posy": [n]}
    per_lse = 3 * _mm(n, 2 * n, d) * (2 if gating == "filter" else 1)
    return Inputs((z1, k2, gate, y1, posy), kw, shapes, 2 * per_lse,
                  needs=("gated_lse",) if gating == "filter" else ())


def _crop_boxes(r, n):
    """Two overlapping crop boxes (N, 4) = (x0, y0, x1, y1) in [0, 1] per image, as random resized crops."""
    wh = 0.4 + 0.5 * torch.rand(2, n, 2, generator=r.g)
    c = 0.3 + 0.4 * torch.rand(n, 2, generator=r.g)
    c2 = c + 0.2 * (torch.rand(n, 2, generator=r.g) - 0.5)
    b1 = torch.cat([c - wh[0] / 2, c + wh[0] / 2], 1)
    b2 = torch.cat([c2 - wh[1] / 2, c2 + wh[1] / 2], 1)
    return b1.to(r.device), b2.to(r.device)


def _make_pix(temperature):
    def make(n, d, dt, dev, seed, variant, small):
        """n images, (n, C=D, 7, 7) maps as PixPro's: two online maps (with grad) and two momentum maps."""
        r = _Draw(dev, dt, seed)
        H = W = PIX_MAP
        maps = [r.feat(n, d, H, W, grad=i < 2) for i in range(4)]
        c1, c2 = _crop_boxes(r, n)
        kw = {} if temperature is None else dict(temperature=temperature)
        shapes = {"maps": [n, d, H, W], "coords": [n, 4]}
        return Inputs((*maps, c1, c2), kw, shapes, None)
    return make


def _make_dcl(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    kw = dict(temperature=0.1)
    if variant == "weighted":
        kw["weighted"] = True
    # Two directions, each N anchors against the 2N candidates of both views.
    return Inputs((r.feat(n, d), r.feat(n, d)), kw, {"z1": [n, d], "z2": [n, d]}, 2 * 3 * _mm(n, 2 * n, d))


def _make_dhel(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    aug = variant != "no_augs"
    kw = dict(temperature=0.3)
    if not aug:
        kw["include_augs"] = False
    return Inputs((r.feat(n, d), r.feat(n, d)), kw, {"z1": [n, d], "z2": [n, d]},
                  (2 if aug else 1) * 3 * _mm(n, n, d))


def _swav_scores(r, n, k, crops, grad):
    # Scores of SwAV: normalized embeddings against normalized prototypes, in [-1, 1].
    protos = F.normalize(torch.randn(k, 16, generator=r.g), dim=1)
    out = []
    for _ in range(crops):
        z = F.normalize(torch.randn(n, 16, generator=r.g), dim=1)
        out.append((z @ protos.T).to(r.device, r.dtype).requires_grad_(grad))
    return out


def _make_sinkhorn(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    k = 23 if small else PROTOTYPES
    (scores,) = _swav_scores(r, n, k, 1, grad=False)
    if variant == "large":  # |score|/ε up to 60: underflows a plain max shift in fp32
        scores = scores * 3
    return Inputs((scores,), {}, {"scores": [n, k]}, None, differentiable=False)


def _make_swav(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    k = 23 if small else PROTOTYPES
    crops = 3 if small else SWAV_CROPS
    scores = _swav_scores(r, n, k, crops, grad=True)
    return Inputs((scores,), dict(temperature=0.1), {"scores": [crops, n, k]}, None)


def _make_point_token(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    g = TOKENS if n >= 2 * TOKENS else max(1, n // 2)
    b = max(1, n // g)
    f1, f2 = r.feat(b, g, d), r.feat(b, g, d)
    m1, m2 = r.bernoulli(0.6, b, g, move=False), r.bernoulli(0.6, b, g, move=False)
    kw = {}
    if variant in ("cosine", "official"):
        kw["mode"] = "cosine"
        kw["pairing"] = "diag" if variant == "cosine" else "official"
    if variant == "batch":
        kw["negatives"] = "batch"
    co_masked = (m1 & m2).sum(1)
    if kw.get("mode") == "cosine":
        flops = None
    elif variant == "batch":
        c = int(co_masked.sum())
        flops = 4 * _mm(c, c, d)
    else:
        flops = 4 * 2 * d * int((co_masked.long() ** 2).sum())
    return Inputs((f1, f2, m1.to(r.device), m2.to(r.device)), kw, {"f1": [b, g, d], "f2": [b, g, d], "mask1": [b, g], "mask2": [b, g]},
                  flops)


def _make_similarity_lse(n, d, dt, dev, seed, variant, small):
    r = _Draw(dev, dt, seed)
    q, k = r.feat(n, d, normalize=True), r.feat(n + (5 if variant == "rect" else 0), d, normalize=True)
    return Inputs((q, k, 10.0), {}, {"query": [n, d], "key": [k.shape[0], d]}, 3 * _mm(n, k.shape[0], d))


# ---------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LossCase:
    name: str
    make_fn: Callable
    variants: Tuple[str, ...] = ("default",)  # the self-check runs every variant
    peers: Tuple[Peer, ...] = ()
    flops_formula: str = ""

    @property
    def fn(self) -> Callable:
        return getattr(co, self.name)

    def make(self, n: int, dim: int = 128, dtype=torch.float32, device="cpu", *, seed: int = 0,
             variant: str = "default", small: bool = False) -> Inputs:
        """Inputs at batch size ``n`` (``small=True``: tiny prototype/view counts for self-checks)."""
        return self.make_fn(n, dim, dtype, device, seed, variant, small)

    def call(self, backend: str, inp: Inputs):
        return self.fn(*inp.args, backend=backend, **inp.kwargs)


def _case(name, make, variants=("default",), formula=""):
    return LossCase(name, make, tuple(variants), PEERS.get(name, ()), formula)


CASES: Dict[str, LossCase] = {c.name: c for c in [
    _case("info_nce", _make_info_nce, ("default", "symmetric", "targets"), "6·N·N·D (symmetric: 8·N·N·D)"),
    _case("clip_loss", _make_clip, formula="8·N·N·D"),
    _case("siglip_loss", _make_siglip, formula="6·N·N·D"),
    _case("nt_xent", _make_nt_xent, formula="6·(2N)·(2N)·D"),
    _case("mv_infonce", _with_flops(_make_mv(0.1), _mv_infonce_flops), ("default", "mask", "pairwise", "list"),
          f"6·(VN)·(VN)·D, V={VIEWS}"),
    _case("mv_dhel", _with_flops(_make_mv(0.2), _mv_dhel_flops), ("default", "mask"), f"V·6·N·N·D, V={VIEWS}"),
    _case("supcon_loss", _make_supcon, ("default", "unlabeled", "one"), f"6·(VN)·(VN)·D, V={SUPCON_VIEWS}"),
    _case("dcl_loss", _make_dcl, ("default", "weighted"), "2·6·N·(2N)·D"),
    _case("dhel_loss", _make_dhel, ("default", "no_augs"), "2·6·N·N·D"),
    _case("sinkhorn_knopp", _make_sinkhorn, ("default", "large"), f"none (scores N×K given, K={PROTOTYPES})"),
    _case("swav_loss", _make_swav, formula=f"none ({SWAV_CROPS} crops of N×K scores, K={PROTOTYPES})"),
    _case("point_token_contrast", _make_point_token, ("default", "batch", "cosine", "official"),
          f"8·Σ_clouds |co-masked|²·D, G={TOKENS} tokens per cloud, N tokens in all"),
    _case("similarity_lse", _make_similarity_lse, ("default", "rect"), "6·N·N·D"),
    _case("supremix_loss", _make_supremix, ("default", "no_mix", "weighted"),
          "6·(2N)·(2N)·D + 4·(2N)·(2N)·D (hard negatives; no hard positives)"),
    _case("selfcon_loss", _make_selfcon, ("default", "alpha", "unlabeled"),
          f"6·(VN)·(VN)·D, V={SELFCON_EXITS} exits (alpha: 6·((V−1)N)·(VN)·D + 6·N·N·D)"),
    _case("sepclr_loss", _make_sepclr, formula="4·6·N·N·D + 2·6·N·N·(D + D/2) (uniformity and k-JEM LSEs)"),
    _case("cacr_loss", _make_cacr, formula=f"V(V−1)/2·6·N·N·D, V={CACR_VIEWS} (repulsion)"),
    _case("hydra_loss", _make_hydra, ("default", "filter"),
          "2·6·N·(2N)·D (simlap gating: keys twice, two LSEs; filter: ×2, a second product per tile)"),
    _case("pixpro_loss", _make_pix(None), formula=f"none (N maps of {PIX_MAP}×{PIX_MAP} pixels)"),
    _case("pixcontrast_loss", _make_pix(0.3), formula=f"none (N maps of {PIX_MAP}×{PIX_MAP} pixels)"),
]}


# ---------------------------------------------------------------------------
# Implementations: backends and peers, each with the reason it cannot run here.
# ---------------------------------------------------------------------------

@dataclass
class Impl:
    """One provider of a loss: ``run(inputs)`` returns the loss tensor."""

    name: str
    kind: str  # "backend" or "peer"
    run: Optional[Callable[[Inputs], Tensor]]
    why_not: Optional[str] = None  # None: it can run here
    _state: dict = field(default_factory=dict, repr=False)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def backend_why_not(case: LossCase, backend: str, inp: Inputs) -> Optional[str]:
    """Why ``backend`` cannot run ``case`` on these inputs (the dispatch point's own reason)."""
    try:
        backends.resolve(backend, op=case.name, tensors=inp.tensors())
    except RuntimeError as e:
        return str(e)
    missing = [p for p in inp.needs if backend != "reference" and not backends.has_primitive(backend, p)]
    if missing:
        return f"backend {backend!r} does not implement {missing}, needed by {case.name} with these arguments"
    return None


def _module_missing(mod: str) -> Optional[str]:
    import importlib.util

    try:
        found = importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"{mod} is not installed"


def implementations(case: LossCase, inp: Inputs, *, for_timing: bool = True, peers: bool = True,
                    compile_reference: bool = True, only: Optional[Sequence[str]] = None) -> List[Impl]:
    """Every implementation of ``case`` for inputs like ``inp`` (same device and dtype).

    Backends come first (``"reference"`` is the plain-PyTorch baseline), then
    ``torch.compile`` of the reference, then installed peers.  Entries that cannot
    run here carry ``why_not``.  With ``for_timing``, the Triton backend under
    the interpreter is listed as not timeable (its timings mean nothing).
    """
    device = inp.tensors()[0].device.type
    out: List[Impl] = []
    for b in backends.BACKENDS:
        why = backend_why_not(case, b, inp)
        if why is None and for_timing and b == "triton" and triton_interpreted():
            why = "Triton interpreter (TRITON_INTERPRET=1): checked for correctness, not timed"
        out.append(Impl(b, "backend", (lambda i, b=b: case.call(b, i)) if why is None else None, why))
    if compile_reference:
        state: dict = {}

        def run_compiled(i, state=state):
            if "fn" not in state:
                # dynamic=True: one compilation serves every batch size of a sweep.  The loss's own
                # function is compiled (not a shared wrapper), so that every loss has its own
                # dynamo cache and none falls back to eager at the recompile limit.
                state["fn"] = torch.compile(functools.partial(case.fn, backend="reference"), dynamic=True)
            return state["fn"](*i.args, **i.kwargs)

        out.append(Impl("torch.compile(reference)", "peer", run_compiled, None, state))
    if peers:
        for p in case.peers:
            why = _module_missing(p.module)
            if why is None and device not in p.devices:
                why = f"runs on {list(p.devices)} tensors only"
            run = None
            if why is None:
                def run(i, p=p, memo={}):
                    if "fn" not in memo:
                        memo["fn"] = p.build(i.kwargs)
                    return memo["fn"](*i.args)
            out.append(Impl(p.name, "peer", run, why))
    if only is not None:
        out = [i for i in out if i.name in only]
    return out
