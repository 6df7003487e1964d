r"""Primitive ``"label_lse"``: a row LSE of similarities plus a per-pair label-distance log-weight, never B×M.

Maths
-----
Anchors are the rows of ``q`` (B, D) with labels y (B,) and coefficients c
(B,); candidates the rows of ``k`` (M, D) with labels ŷ (M,)::

    G[i, j]  = q_i·k_j                                   (B, M, unscaled)
    d[i, j]  = c_i·|y_i − ŷ_j|
    φ(d)     = log1p(d)  (kind 0, "L1_inv": w = d + 1)     log1p(d²)  (kind 1, "L2_inv": w = d² + 1)
               −log1p(d) (kind 2, "L1":  w = 1/(d + 1))    −log1p(d²) (kind 3, "L2":  w = 1/(d² + 1))
    allowed  = start_i <= j < end_i,  j != exclude_i  (exclude_i < 0: none),
               and, with ``skip_equal``, ŷ_j != y_i
    lse[i]   = LSE_{j allowed} (scale·G[i, j] + φ(d[i, j]))     (B,)   −inf if nothing is allowed

i.e. log Σ_j w(c_i·|y_i − ŷ_j|)·e^{scale·G_ij}: SupReMix's "distance
magnifying" denominator (``losses/supremix.py``): real pairs with c = 1 and
the anchor excluded; hard negatives with c_i = 1 − λ_i (a mixture's label is
λ_i y_i + (1−λ_i) y_k, so its distance is (1−λ_i)|y_i − y_k|) and equal
labels skipped.  Labels and c are data: they receive no gradient.

Backward, with upstream gradient γ (B,) and P[i, j] = e^{scale·G_ij + φ_ij − lse_i}
on allowed pairs (0 elsewhere, and on rows with nothing allowed)::

    dG = γ_i·scale·P_ij          dq = dG k,   dk = dGᵀ q
    dscale = Σ_i γ_i Σ_j P_ij·G_ij

Only the row statistics (lse and γ) are needed to recompute P tile by tile,
so a kernel needs no B×M buffer.

Mixture mode (SupReMix's hard negatives with λ drawn per pair)
---------------------------------------------------------------
Given a row term b (B,) (SupReMix: b_i = z_i·sg(z_i)/τ; it receives a gradient),
a seed, integer Beta parameters (a, b) and the pairs' counters (row ids (B,),
column ids (M,): global anchor and sample indices, so a pair's λ is the same on
any number of ranks and for any order of the columns)::

    λ_ij     = pair_lambda(seed, row_id_i, col_id_j)                 ~ Beta(a, b)
    S[i, j]  = λ_ij·b_i + (1 − λ_ij)·scale·G_ij + φ((1 − λ_ij)·c_i·|y_i − ŷ_j|)

(the logit of the detached mixture λ_ij z_i + (1−λ_ij) z_j, whose label is
(1−λ_ij)|y_i − y_j| away from y_i).  c stays: SupReMix passes c = 1 with its
weights and c = 0 without them (φ(0) = 0: the unweighted mixture, through the
same kernels).  Backward: dG = γ_i·scale·(1 − λ_ij)·P_ij (dq, dk as above),
dscale = Σ_i γ_i Σ_j P_ij·(1 − λ_ij)·G_ij and db_i = γ_i·Σ_j P_ij·λ_ij.  The
kernels recompute λ in every tile of every pass (forward, dq, dk) and never
store it.

The generator (``pair_key``, ``pair_uniform``, ``pair_lambda``) is
counter-based and written identically here (int64 arithmetic masked to 32 bits,
the tensor version the reference uses), in C++ (uint32_t) and in Triton
(uint32): key = fmix(fmix(seed ⊕ i·K_r) ⊕ j·K_c), draw t is
u_t = ((fmix(key ⊕ (t+1)·K_t) >> 9) + ½)·2⁻²³ ∈ (0, 1) (fmix: murmur3's
32-bit finalizer; 23 bits so that u is exact in fp32 and bitwise the same
everywhere), and for integer a, b >= 1 with a + b <= 32::

    λ = G_a/(G_a + G_b),  G_a = −Σ_{t<a} log u_t,  G_b = −Σ_{t<b} log u_{a+t}

(a + b uniforms per pair: 10 for SupReMix's Beta(2, 8)).  The uniforms agree
bit for bit across backends; λ to the rounding of the logs in the
accumulation dtype.  Other Beta parameters (non-integer, or a + b > 32) are
not drawn by the kernels.

Why a primitive of its own and not an option of ``sim_lse``: ``sim_lse`` has
a dozen kernels (CPU row-block, symmetric-Gram and tiled-CUDA-host paths; the
Triton general, Gram, atomic and GEMM-backward kernels; the CUDA kernels),
each with its own epilogue; a per-pair label term would have to enter every
one of them or make each raise, for one loss.  The term needs only the row
LSE (no column LSE, no index lists, no row threshold), so, like
``sim_expect``, it is a small primitive with one forward and two backward
passes per backend, and ``sim_lse`` stays as it is.

Kernel backends implement ``"label_lse"`` as an object with::

    forward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix) -> lse (B,)
    backward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix, lse, grad)
        -> (dq like q, dk like k, dscale 0-dim, db (B,))

with ``scale`` a 0-dim tensor of the accumulation dtype, ``y_row``, ``coef``
(B,) and ``y_col`` (M,) in the accumulation dtype (fp32; float64 for float64
inputs), ``col_start``, ``col_end``, ``exclude`` (B,) int32, ``kind`` an int
(the index in ``KINDS``) and ``skip_equal`` a bool; ``mix`` None, or the
mixture mode's (row_term (B,) in the accumulation dtype, row_ids (B,) int32,
col_ids (M,) int32, seed int in [0, 2³¹), beta_a int, beta_b int); lse,
dscale and db in the accumulation dtype (db is 0 without ``mix``).  Kernels:
``backends/_triton/label_lse.py`` and ``csrc/cpu/label_lse.cpp`` (ops
``label_lse_fwd`` / ``label_lse_bwd`` with the mixture arguments flattened:
``Tensor? row_term, Tensor? row_ids, Tensor? col_ids, int seed, int beta_a,
int beta_b``; ``label_lse_uniforms`` and the Triton ``pair_uniforms`` expose
the generator's uniforms to the tests).  The ``"cuda"`` backend does not
implement it: a loss that needs it names what is missing there, and ``"auto"``
takes Triton on CUDA tensors.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import backends
from .._numerics import acc_dtype, masked_lse

Tensor = torch.Tensor
KINDS = ("L1_inv", "L2_inv", "L1", "L2")  # the weight kinds, in the order of the kernels' ``kind``


# ---------------------------------------------------------------------------- the per-pair mixture λ
# A counter-based generator written identically here (int64 arithmetic masked to 32 bits), in C++
# (uint32_t, csrc/cpu/label_lse.cpp) and in Triton (uint32, backends/_triton/label_lse.py): the uniforms
# of a pair are a function of (seed, row id, column id, draw index) only, so every backend, the forward
# and the backward, and any split of the rows over ranks draw the same λ.
_M32 = 0xFFFFFFFF
_FMIX1, _FMIX2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's 32-bit finalizer
_KROW, _KCOL, _KDRAW = 0x9E3779B1, 0x7FEB352D, 0x846CA68B  # odd multipliers of the three counters
MAX_BETA = 32  # integer Beta(a, b) with a + b <= MAX_BETA: what the kernels draw


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x·c) mod 2³² for int64 x in [0, 2³²) and a 32-bit constant c, with no int64 overflow."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _FMIX1)
    h = h ^ (h >> 13)
    h = _mul32(h, _FMIX2)
    return h ^ (h >> 16)


def pair_key(seed: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The 32-bit key of the pairs (rows[i], cols[j]) (int64 (R, C)): fmix(fmix(seed ⊕ i·K_r) ⊕ j·K_c)."""
    r = rows.long()[:, None] & _M32
    c = cols.long()[None, :] & _M32
    return _fmix32(_fmix32((seed & _M32) ^ _mul32(r, _KROW)) ^ _mul32(c, _KCOL))


def pair_uniform(key: Tensor, t: int, dtype=torch.float32) -> Tensor:
    """Draw t of the pairs of ``key``: u = ((h >> 9) + 1/2)·2⁻²³ in (0, 1) with h = fmix(key ⊕ (t+1)·K_t)
    (23 bits, so u is exact in fp32 and every backend gets bitwise the same u)."""
    h = _fmix32(key ^ _mul32(torch.full_like(key, t + 1), _KDRAW))
    return ((h >> 9).to(dtype) + 0.5) * 2.0 ** -23


def kernel_beta(beta) -> bool:
    """Whether the kernels can draw Beta(a, b): integers a, b >= 1 with a + b <= ``MAX_BETA``."""
    a, b = beta
    return all(float(v) == int(v) and int(v) >= 1 for v in (a, b)) and int(a) + int(b) <= MAX_BETA


def pair_lambda(seed: int, rows: Tensor, cols: Tensor, beta=(2, 8), dtype=torch.float32) -> Tensor:
    """λ (R, C) ~ Beta(a, b) of the pairs (rows[i], cols[j]) (global ids) for integer a, b (``kernel_beta``):
    λ = G_a/(G_a + G_b), G_a = −Σ_{t<a} log u_t, G_b = −Σ_{t<b} log u_{a+t}; what the kernels draw."""
    if not kernel_beta(beta):
        raise ValueError(f"the counter-based lambda needs integer Beta(a, b) with a, b >= 1 and a + b <= {MAX_BETA}, "
                         f"got {tuple(beta)}")
    a, b = int(beta[0]), int(beta[1])
    key = pair_key(int(seed), rows, cols)
    ga = sum(-torch.log(pair_uniform(key, t, dtype)) for t in range(a))
    gb = sum(-torch.log(pair_uniform(key, a + t, dtype)) for t in range(b))
    return ga / (ga + gb)


def log_weight(d: Tensor, kind: int) -> Tensor:
    """φ(d) = log w(d) of weight kind ``kind`` (an index in ``KINDS``) for distances d >= 0."""
    if kind in (1, 3):
        d = d * d
    w = torch.log1p(d)
    return -w if kind >= 2 else w


def allowed_pairs(B: int, M: int, y_row: Tensor, y_col: Tensor, col_start: Tensor, col_end: Tensor,
                  exclude: Tensor, skip_equal: bool) -> Tensor:
    """The (B, M) bool mask of allowed pairs (dense; the reference's)."""
    cols = torch.arange(M, device=y_row.device)[None, :]
    ok = (cols >= col_start.long()[:, None]) & (cols < col_end.long()[:, None]) & (cols != exclude.long()[:, None])
    if skip_equal:
        ok = ok & (y_row[:, None] != y_col[None, :])
    return ok


def label_lse_reference(q: Tensor, k: Tensor, scale: Tensor, y_row: Tensor, y_col: Tensor, coef: Tensor,
                        col_start: Tensor, col_end: Tensor, exclude: Tensor, kind: int, skip_equal: bool,
                        mix: Optional[tuple] = None) -> Tensor:
    """Dense PyTorch version (differentiable by autograd in q, k, scale and the mixture's row term); stores B×M.

    ``mix``: None, or (row_term (B,), row_ids (B,), col_ids (M,), seed, beta_a, beta_b) (mixture mode)."""
    dt = acc_dtype(q.dtype)
    yr, yc, c = y_row.to(dt), y_col.to(dt), coef.to(dt)
    G = (q.to(dt) @ k.to(dt).T) * scale.to(dt)
    d = c[:, None] * (yr[:, None] - yc[None, :]).abs()
    if mix is None:
        S = G + log_weight(d, kind)
    else:
        row_term, row_ids, col_ids, seed, beta_a, beta_b = mix
        lam = pair_lambda(seed, row_ids, col_ids, (beta_a, beta_b), dt)
        S = lam * row_term.to(dt)[:, None] + (1 - lam) * G + log_weight((1 - lam) * d, kind)
    ok = allowed_pairs(q.shape[0], k.shape[0], yr, yc, col_start, col_end, exclude, skip_equal)
    return masked_lse(S, ok, 1)


class LabelLSEFunction(torch.autograd.Function):
    """Autograd over a kernel backend's ``"label_lse"`` primitive (contract in the module docstring).

    ``k`` is None when the candidates are the anchors' own matrix (q is k): one autograd input, whose
    gradient is dq + dk (``torch.compile`` cannot trace one tensor passed as two inputs).  ``row_term`` is
    None outside mixture mode (then ``mix_args`` is None too)."""

    @staticmethod
    def forward(ctx, q, k, scale, row_term, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal,
                mix_args, backend):
        prim = backends.primitive(backend, "label_lse")
        mix = None if row_term is None else (row_term,) + tuple(mix_args)
        lse = prim.forward(q, q if k is None else k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind,
                           skip_equal, mix)
        ctx.prim, ctx.kind, ctx.skip_equal, ctx.same, ctx.mix_args = prim, kind, skip_equal, k is None, mix_args
        ctx.save_for_backward(q, k, scale, row_term, y_row, y_col, coef, col_start, col_end, exclude, lse)
        return lse

    @staticmethod
    def backward(ctx, g):
        q, k, scale, row_term, y_row, y_col, coef, col_start, col_end, exclude, lse = ctx.saved_tensors
        mix = None if row_term is None else (row_term,) + tuple(ctx.mix_args)
        dq, dk, dscale, db = ctx.prim.backward(q, q if ctx.same else k, scale, y_row, y_col, coef, col_start,
                                               col_end, exclude, ctx.kind, ctx.skip_equal, mix, lse, g.contiguous())
        if ctx.same:
            dq, dk = dq + dk, None
        n = ctx.needs_input_grad
        return ((dq if n[0] else None, dk if n[1] else None, dscale if n[2] else None, db if n[3] else None)
                + (None,) * 10)


def _rows(name: str, t, B: int, device, dtype, default) -> Tensor:
    if t is None:
        return torch.full((B,), default, dtype=dtype, device=device)
    t = torch.as_tensor(t, device=device)
    if t.dim() == 0:
        t = t.expand(B)
    if tuple(t.shape) != (B,):
        raise ValueError(f"label_lse: {name} must have shape ({B},) (or be a scalar), got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def _ids(name: str, t, n: int, device) -> Tensor:
    if t is None:
        return torch.arange(n, dtype=torch.int32, device=device)
    t = torch.as_tensor(t, device=device)
    if tuple(t.shape) != (n,) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"label_lse: {name} must be an integer tensor of shape ({n},), got {t.dtype} "
                         f"{tuple(t.shape)}")
    if not torch.compiler.is_compiling() and n > 0 and not bool(((t >= 0) & (t.long() < 2 ** 31)).all()):
        raise ValueError(f"label_lse: {name} must lie in [0, 2**31)")
    return t.to(torch.int32).contiguous()


def label_lse(q: Tensor, k: Tensor, scale, y_row: Tensor, y_col: Tensor, *, kind, coef=None,
              col_start=None, col_end=None, exclude=None, skip_equal: bool = False, row_term=None, seed=None,
              beta=(2, 8), row_ids=None, col_ids=None, backend: str) -> Tensor:
    """Row LSE of ``scale·q·kᵀ + φ(coef_i·|y_row_i − y_col_j|)`` over the allowed candidates (module docstring).

    ``kind``: a name in ``KINDS`` or its index.  ``coef`` (B,) or scalar (default 1); ``col_start`` /
    ``col_end`` (B,) or scalar (default 0 / M); ``exclude`` (B,) (< 0: none; default none);
    ``skip_equal`` leaves out the candidates whose label equals the row's.  ``backend`` is a concrete
    backend name; ``"reference"`` is the dense version.  fp32 (float64 for float64 inputs), differentiable
    in q, k and scale.

    Mixture mode (``row_term`` given, (B,), differentiable): each pair's logit is
    ``λ_ij·row_term_i + (1−λ_ij)·scale·q_i·k_j + φ((1−λ_ij)·coef_i·|y_row_i − y_col_j|)`` with λ_ij ~
    Beta(``beta``) drawn by ``pair_lambda(seed, row_ids, col_ids, beta)`` (integer a, b >= 1, a + b <= 32;
    ``seed`` an int in [0, 2**31); ``row_ids`` (B,) / ``col_ids`` (M,) the pairs' counters, default
    0..B−1 / 0..M−1).
    """
    if q.dim() != 2 or k.dim() != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"label_lse: q and k must be 2-D with one feature size, got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    kind_i = KINDS.index(kind) if isinstance(kind, str) and kind in KINDS else kind
    if not isinstance(kind_i, int) or isinstance(kind_i, bool) or kind_i not in range(len(KINDS)):
        raise ValueError(f"label_lse: kind must be one of {KINDS} or its index, got {kind!r}")
    B, M = q.shape[0], k.shape[0]
    dt = acc_dtype(q.dtype)
    dev = q.device
    scale = torch.as_tensor(scale, device=dev).to(dt).reshape(())
    yr = _rows("y_row", y_row, B, dev, dt, 0.0)
    if y_col is None or tuple(torch.as_tensor(y_col).shape) != (M,):
        raise ValueError(f"label_lse: y_col must have shape ({M},), got "
                         f"{None if y_col is None else tuple(torch.as_tensor(y_col).shape)}")
    yc = y_col.to(device=dev, dtype=dt).contiguous()
    c = _rows("coef", coef, B, dev, dt, 1.0)
    start = _rows("col_start", col_start, B, dev, torch.int32, 0)
    end = _rows("col_end", col_end, B, dev, torch.int32, M)
    ex = _rows("exclude", exclude, B, dev, torch.int32, -1)
    mix_args = None
    if row_term is None:
        if seed is not None or row_ids is not None or col_ids is not None:
            raise ValueError("label_lse: seed, row_ids and col_ids belong to mixture mode: pass row_term too")
    else:
        if not isinstance(row_term, Tensor) or tuple(row_term.shape) != (B,):
            raise ValueError(f"label_lse: row_term must be a tensor of shape ({B},), got "
                             f"{tuple(row_term.shape) if isinstance(row_term, Tensor) else type(row_term).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 31:
            raise ValueError(f"label_lse: mixture mode needs an int seed in [0, 2**31), got {seed!r}")
        if not (isinstance(beta, (tuple, list)) and len(beta) == 2 and kernel_beta(beta)):
            raise ValueError(f"label_lse: beta must be integers (a, b) >= 1 with a + b <= {MAX_BETA}, got {beta!r}")
        mix_args = (_ids("row_ids", row_ids, B, dev), _ids("col_ids", col_ids, M, dev), int(seed), int(beta[0]),
                    int(beta[1]))
    if backend == "reference":
        mix = None if mix_args is None else (row_term,) + mix_args
        return label_lse_reference(q, k, scale, yr, yc, c, start, end, ex, kind_i, bool(skip_equal), mix)
    rt = None if row_term is None else row_term.to(device=dev, dtype=dt).contiguous()
    return LabelLSEFunction.apply(q.contiguous(), None if k is q else k.contiguous(), scale, rt, yr, yc, c, start, end,
                                  ex, kind_i, bool(skip_equal), mix_args, backend)
