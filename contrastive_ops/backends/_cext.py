"""Shared part of the ``"cpu"`` and ``"cuda"`` backends: the ops of the extension ``contrastive_ops._C``.

The one Python module of extension glue.  The C++ side declares every op
schema once (``csrc/ops.cpp``) and registers CPU and CUDA kernels; dispatch
to the right device is done by the PyTorch dispatcher.  This module adds,
once the library is loaded:

* fake (meta) kernels, ``torch.library.register_fake``, so that
  ``torch.compile(fullgraph=True)`` can trace through the ops: shape logic and
  ``torch._check`` only, never reading data;
* autograd formulas for the forward ops (``register_autograd``), so that the
  ops are differentiable on their own as well as through the primitives;
* the primitive objects the backends expose (``PRIMITIVES``): one class per
  primitive, whose contract is the docstring of its module in
  ``contrastive_ops.primitives`` (``sim_lse``, ``siglip_pairs``, ``sinkhorn``,
  ``swav_ce``; CPU only: ``sim_expect``, ``pix_pos``, ``gated_lse``).  All tensors on one device.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from .. import _ext
from .._numerics import acc_dtype

Tensor = torch.Tensor

DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}

_lock = threading.Lock()
_registered = False


def ensure_loaded() -> None:
    """Load ``contrastive_ops._C`` and register the Python-side pieces (once); raises ``ExtensionError``."""
    global _registered
    if _registered:
        return
    _ext.load()
    with _lock:
        if not _registered:
            _register()
            _registered = True


def availability(device_type: str) -> Tuple[bool, str]:
    try:
        ensure_loaded()
    except _ext.ExtensionError as e:
        return False, str(e)
    if device_type == "cuda":
        if not _ext.with_cuda():
            return False, "contrastive_ops._C was built without CUDA kernels (no nvcc at build time, or CPU-only build)"
        if not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        return True, f"CUDA kernels of contrastive_ops._C (torch {torch.__version__}, CUDA {torch.version.cuda})"
    return True, f"C++ kernels of contrastive_ops._C (torch {torch.__version__})"


# ---------------------------------------------------------------- fake kernels


def _fake_sim_lse_fwd(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
    torch._check(q.dim() == 2 and k.dim() == 2, lambda: f"q and k must be 2-D, got {q.shape} and {k.shape}")
    torch._check(q.shape[1] == k.shape[1], lambda: f"q {q.shape} and k {k.shape} have different feature sizes")
    torch._check(q.dtype == k.dtype, lambda: f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    torch._check(scale.dim() == 0, lambda: f"scale must be 0-dim, got {scale.shape}")
    B = q.shape[0] if row_index is None else row_index.shape[0]
    M = k.shape[0] if col_index is None else col_index.shape[0]
    for name, t in (("col_start", col_start), ("col_end", col_end), ("exclude", exclude), ("row_max", row_max)):
        if t is not None:
            torch._check(t.shape[0] == B, lambda: f"{name} must have {B} rows, got {t.shape}")
    acc = acc_dtype(q.dtype)
    return q.new_empty((B,), dtype=acc), q.new_empty((M if want_col else 0,), dtype=acc)


def _fake_sim_lse_bwd(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                      row_lse, col_lse, grad_row, grad_col, row_max=None):
    torch._check(q.dim() == 2 and k.dim() == 2, lambda: f"q and k must be 2-D, got {q.shape} and {k.shape}")
    B = q.shape[0] if row_index is None else row_index.shape[0]
    torch._check(row_lse.shape[0] == B and grad_row.shape[0] == B, lambda: f"row_lse/grad_row must have {B} entries")
    return (q.new_empty(q.shape), k.new_empty(k.shape), scale.new_empty(()))


def _fake_siglip_fwd(x, y, scale, bias):
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: f"x and y must be 2-D, got {x.shape} and {y.shape}")
    torch._check(x.shape[1] == y.shape[1], lambda: f"x {x.shape} and y {y.shape} have different feature sizes")
    torch._check(scale.dim() == 0 and bias.dim() == 0, lambda: "scale and bias must be 0-dim")
    return x.new_empty((), dtype=acc_dtype(x.dtype))


def _fake_siglip_bwd(x, y, scale, bias, grad):
    torch._check(x.shape[1] == y.shape[1], lambda: f"x {x.shape} and y {y.shape} have different feature sizes")
    return x.new_empty(x.shape), y.new_empty(y.shape), scale.new_empty(()), bias.new_empty(())


def _fake_swav_ce_fwd(x, t, scale):
    torch._check(x.dim() == 2, lambda: f"swav_ce_fwd: x must be 2-D, got {x.shape}")
    torch._check(t.shape == x.shape, lambda: f"swav_ce_fwd: t {t.shape} must have the shape of x {x.shape}")
    torch._check(scale.dim() == 0, lambda: "swav_ce_fwd: scale must be 0-dim")
    return t.new_empty(()), t.new_empty((x.shape[0],))


def _fake_swav_ce_bwd(x, t, scale, lse, grad):
    torch._check(t.shape == x.shape, lambda: f"swav_ce_bwd: t {t.shape} must have the shape of x {x.shape}")
    return x.new_empty(x.shape), t.new_empty(())


def _fake_pix_pos_sum(x, dxt, dyt, diag, ratio, H, W):
    torch._check(x.dim() == 3, lambda: f"pix_pos_sum: x must be (B, H·W, D), got {x.shape}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape, dtype=acc), x.new_empty(x.shape[:2], dtype=acc)


def _fake_pix_pos_lse_fwd(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset):
    torch._check(q.dim() == 3, lambda: f"pix_pos_lse_fwd: q must be (B, H·W, D), got {q.shape}")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape[:2], dtype=acc), q.new_empty(q.shape[:2], dtype=acc)


def _fake_pix_pos_lse_bwd(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset, lse_pos, lse_all,
                          g_pos, g_all):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty_like(q), q.new_empty((), dtype=acc)


def _fake_sinkhorn(scores, epsilon, iterations):
    torch._check(scores.dim() == 2, lambda: f"sinkhorn: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty(scores.shape, dtype=torch.float32)


def _fake_sinkhorn_col_lse(scores, epsilon, v):
    torch._check(scores.dim() == 2, lambda: f"sinkhorn_col_lse: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty((scores.shape[1],), dtype=acc_dtype(scores.dtype))


def _fake_sinkhorn_codes(scores, epsilon, v, normalize):
    torch._check(scores.dim() == 2, lambda: f"sinkhorn_codes: scores must be 2-D, got {scores.dim()}-D")
    return scores.new_empty(scores.shape, dtype=torch.float32)


# ---------------------------------------------------------------- autograd of the forward ops


def _sim_lse_setup(ctx, inputs, output):
    q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col = inputs[:9]
    row_max = inputs[9] if len(inputs) > 9 else None
    ctx.save_for_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_max, *output)
    ctx.want_col = want_col


def _sim_lse_backward(ctx, g_row, g_col):
    q, k, scale, row_index, col_index, col_start, col_end, exclude, row_max, row_lse, col_lse = ctx.saved_tensors
    if not ctx.want_col:
        g_col = torch.zeros_like(col_lse)
    dq, dk, dscale = torch.ops.contrastive_ops.sim_lse_bwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude,
        row_lse, col_lse, g_row.contiguous(), g_col.contiguous(), row_max,
    )
    return dq, dk, dscale, None, None, None, None, None, None, None


def _siglip_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _siglip_backward(ctx, grad):
    x, y, scale, bias = ctx.saved_tensors
    return tuple(torch.ops.contrastive_ops.siglip_bwd(x, y, scale, bias, grad))


def _swav_ce_setup(ctx, inputs, output):
    x, t, scale = inputs
    ctx.save_for_backward(x, t, scale, output[1])


def _swav_ce_backward(ctx, grad, _grad_lse):
    # lse is a by-product saved for this backward; it carries no gradient.
    x, t, scale, lse = ctx.saved_tensors
    dx, dscale = torch.ops.contrastive_ops.swav_ce_bwd(x, t, scale, lse, grad)
    return dx, None, dscale


def _fake_sim_expect_fwd(q, k, scale, exclude):
    torch._check(q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1],
                 lambda: f"sim_expect_fwd: q and k must be 2-D with one feature size, got {q.shape} and {k.shape}")
    torch._check(scale.dim() == 0, lambda: "sim_expect_fwd: scale must be 0-dim")
    acc = acc_dtype(q.dtype)
    return q.new_empty((q.shape[0],), dtype=acc), q.new_empty((q.shape[0],), dtype=acc)


def _fake_sim_expect_bwd(q, k, scale, exclude, lse, mean, grad_lse, grad_mean):
    torch._check(q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1],
                 lambda: f"sim_expect_bwd: q and k must be 2-D with one feature size, got {q.shape} and {k.shape}")
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=acc_dtype(q.dtype))


def _fake_gated_lse_fwd(a, w, k, scale, col_start, col_end):
    torch._check(a.dim() == 2 and w.shape == a.shape and k.dim() == 2 and k.shape[1] == a.shape[1],
                 lambda: f"gated_lse_fwd: a and w must be (B, D) and k (M, D), got {a.shape}, {w.shape} and {k.shape}")
    torch._check(scale.dim() == 0, lambda: "gated_lse_fwd: scale must be 0-dim")
    return a.new_empty((a.shape[0],))


def _fake_gated_lse_bwd(a, w, k, scale, col_start, col_end, lse, grad_lse):
    torch._check(a.dim() == 2 and w.shape == a.shape and k.dim() == 2 and k.shape[1] == a.shape[1],
                 lambda: f"gated_lse_bwd: a and w must be (B, D) and k (M, D), got {a.shape}, {w.shape} and {k.shape}")
    return torch.empty_like(a), torch.empty_like(w, dtype=a.dtype), torch.empty_like(k), a.new_empty(())


def _fake_label_lse_fwd(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, row_term,
                        row_ids, col_ids, seed, beta_a, beta_b):
    torch._check(q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1],
                 lambda: f"label_lse_fwd: q and k must be 2-D with one feature size, got {q.shape} and {k.shape}")
    torch._check(scale.dim() == 0, lambda: "label_lse_fwd: scale must be 0-dim")
    for name, t in (("y_row", y_row), ("coef", coef), ("col_start", col_start), ("col_end", col_end),
                    ("exclude", exclude), ("row_term", row_term), ("row_ids", row_ids)):
        if t is not None:
            torch._check(t.dim() == 1 and t.shape[0] == q.shape[0],
                         lambda: f"label_lse_fwd: {name} must have {q.shape[0]} rows, got {t.shape}")
    for name, t in (("y_col", y_col), ("col_ids", col_ids)):
        if t is not None:
            torch._check(t.dim() == 1 and t.shape[0] == k.shape[0],
                         lambda: f"label_lse_fwd: {name} must have {k.shape[0]} entries, got {t.shape}")
    return q.new_empty((q.shape[0],), dtype=acc_dtype(q.dtype))


def _fake_label_lse_bwd(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, row_term,
                        row_ids, col_ids, seed, beta_a, beta_b, lse, grad):
    torch._check(q.dim() == 2 and k.dim() == 2 and q.shape[1] == k.shape[1],
                 lambda: f"label_lse_bwd: q and k must be 2-D with one feature size, got {q.shape} and {k.shape}")
    torch._check(lse.shape == (q.shape[0],) and grad.shape == (q.shape[0],),
                 lambda: f"label_lse_bwd: lse and grad must have shape ({q.shape[0]},)")
    acc = acc_dtype(q.dtype)
    return torch.empty_like(q), torch.empty_like(k), q.new_empty((), dtype=acc), q.new_empty((q.shape[0],), dtype=acc)


def _fake_label_lse_uniforms(seed, rows, cols, draw):
    torch._check(rows.dim() == 1 and cols.dim() == 1, lambda: "label_lse_uniforms: rows and cols must be 1-D")
    return rows.new_empty((rows.shape[0], cols.shape[0]), dtype=torch.float32)


_FAKES = {
    "sim_lse_fwd": _fake_sim_lse_fwd,
    "sim_lse_bwd": _fake_sim_lse_bwd,
    "siglip_fwd": _fake_siglip_fwd,
    "siglip_bwd": _fake_siglip_bwd,
    "swav_ce_fwd": _fake_swav_ce_fwd,
    "swav_ce_bwd": _fake_swav_ce_bwd,
    "pix_pos_sum": _fake_pix_pos_sum,
    "pix_pos_lse_fwd": _fake_pix_pos_lse_fwd,
    "pix_pos_lse_bwd": _fake_pix_pos_lse_bwd,
    "sinkhorn": _fake_sinkhorn,
    "sinkhorn_col_lse": _fake_sinkhorn_col_lse,
    "sinkhorn_codes": _fake_sinkhorn_codes,
    "sim_expect_fwd": _fake_sim_expect_fwd,
    "sim_expect_bwd": _fake_sim_expect_bwd,
    "gated_lse_fwd": _fake_gated_lse_fwd,
    "gated_lse_bwd": _fake_gated_lse_bwd,
    "label_lse_fwd": _fake_label_lse_fwd,
    "label_lse_bwd": _fake_label_lse_bwd,
    "label_lse_uniforms": _fake_label_lse_uniforms,
}
_AUTOGRAD = {
    "sim_lse_fwd": (_sim_lse_backward, _sim_lse_setup),
    "siglip_fwd": (_siglip_backward, _siglip_setup),
    "swav_ce_fwd": (_swav_ce_backward, _swav_ce_setup),
}


def _register() -> None:
    for name, fake in _FAKES.items():
        torch.library.register_fake(f"contrastive_ops::{name}", fake)
    for name, (backward, setup) in _AUTOGRAD.items():
        torch.library.register_autograd(f"contrastive_ops::{name}", backward, setup_context=setup)


# ---------------------------------------------------------------- primitives


class SimLSE:
    """Primitive ``"sim_lse"`` (contract in ``contrastive_ops.primitives.sim_lse``).

    When ``q`` and ``k`` are one tensor object, the CPU ``backward`` returns
    the whole gradient of that tensor (dq + dk) in ``dq`` and zeros in ``dk``.
    """

    @staticmethod
    def forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
        ensure_loaded()
        return torch.ops.contrastive_ops.sim_lse_fwd(
            q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col), row_max)

    @staticmethod
    def backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col,
                 row_max=None):
        ensure_loaded()
        return torch.ops.contrastive_ops.sim_lse_bwd(
            q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col,
            row_max)


class SigLIP:
    """Primitive ``"siglip"`` (contract in ``contrastive_ops.primitives.siglip_pairs``)."""

    @staticmethod
    def forward(x, y, scale, bias):
        ensure_loaded()
        return torch.ops.contrastive_ops.siglip_fwd(x, y, scale, bias)

    @staticmethod
    def backward(x, y, scale, bias, grad):
        ensure_loaded()
        return torch.ops.contrastive_ops.siglip_bwd(x, y, scale, bias, grad)


class SwAVCE:
    """Primitive ``"swav_ce"`` (contract in ``contrastive_ops.primitives.swav_ce``)."""

    @staticmethod
    def forward(x, t, scale):
        ensure_loaded()
        return torch.ops.contrastive_ops.swav_ce_fwd(x, t, scale)

    @staticmethod
    def backward(x, t, scale, lse, grad):
        ensure_loaded()
        return torch.ops.contrastive_ops.swav_ce_bwd(x, t, scale, lse, grad)


class Sinkhorn:
    """Primitive ``"sinkhorn"`` (contract in ``contrastive_ops.primitives.sinkhorn``)."""

    @staticmethod
    def forward(scores: Tensor, epsilon: float, iterations: int) -> Tensor:
        ensure_loaded()
        return torch.ops.contrastive_ops.sinkhorn(scores, float(epsilon), int(iterations))

    @staticmethod
    def col_lse(scores: Tensor, epsilon: float, v: Optional[Tensor]) -> Tensor:
        ensure_loaded()
        return torch.ops.contrastive_ops.sinkhorn_col_lse(scores, float(epsilon), v)

    @staticmethod
    def codes(scores: Tensor, epsilon: float, v: Tensor, normalize: bool) -> Tensor:
        ensure_loaded()
        return torch.ops.contrastive_ops.sinkhorn_codes(scores, float(epsilon), v, bool(normalize))


class SimExpect:
    """Primitive ``"sim_expect"`` (contract in ``contrastive_ops.primitives.sim_expect``): CPU kernels only."""

    @staticmethod
    def forward(q, k, scale, exclude):
        ensure_loaded()
        return torch.ops.contrastive_ops.sim_expect_fwd(q, k, scale, exclude)

    @staticmethod
    def backward(q, k, scale, exclude, lse, mean, grad_lse, grad_mean):
        ensure_loaded()
        return torch.ops.contrastive_ops.sim_expect_bwd(q, k, scale, exclude, lse, mean, grad_lse, grad_mean)


class LabelLSE:
    """Primitive ``"label_lse"`` (contract in ``contrastive_ops.primitives.label_lse``): CPU kernels only."""

    @staticmethod
    def _mix(mix):
        if mix is None:
            return None, None, None, 0, 0, 0
        row_term, row_ids, col_ids, seed, beta_a, beta_b = mix
        return row_term, row_ids, col_ids, int(seed), int(beta_a), int(beta_b)

    @staticmethod
    def forward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix=None):
        ensure_loaded()
        return torch.ops.contrastive_ops.label_lse_fwd(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude,
                                                       int(kind), bool(skip_equal), *LabelLSE._mix(mix))

    @staticmethod
    def backward(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude, kind, skip_equal, mix, lse, grad):
        ensure_loaded()
        return torch.ops.contrastive_ops.label_lse_bwd(q, k, scale, y_row, y_col, coef, col_start, col_end, exclude,
                                                       int(kind), bool(skip_equal), *LabelLSE._mix(mix), lse, grad)


class PixPosSum:
    """Primitive ``"pix_pos_sum"`` (contract in ``contrastive_ops.primitives.pix_pos``); CPU kernel only."""

    @staticmethod
    def forward(x, dxt, dyt, diag, ratio, H, W):
        ensure_loaded()
        return torch.ops.contrastive_ops.pix_pos_sum(x.contiguous(), dxt, dyt, diag, ratio, int(H), int(W))


class PixPosLSE:
    """Primitive ``"pix_pos_lse"`` (contract in ``contrastive_ops.primitives.pix_pos``); CPU kernel only."""

    @staticmethod
    def forward(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset):
        ensure_loaded()
        return torch.ops.contrastive_ops.pix_pos_lse_fwd(q, k, scale, dxt, dyt, diag, ratio, int(H), int(W),
                                                         bool(batch_negatives), int(offset))

    @staticmethod
    def backward(q, k, scale, dxt, dyt, diag, ratio, H, W, batch_negatives, offset, lse_pos, lse_all, g_pos, g_all):
        ensure_loaded()
        return torch.ops.contrastive_ops.pix_pos_lse_bwd(q, k, scale, dxt, dyt, diag, ratio, int(H), int(W),
                                                         bool(batch_negatives), int(offset), lse_pos, lse_all,
                                                         g_pos, g_all)


class GatedLSE:
    """Primitive ``"gated_lse"`` (contract in ``contrastive_ops.primitives.gated_lse``); CPU kernels only.

    Also takes float64 ``a``, ``w`` and ``k`` (computed in float64)."""

    @staticmethod
    def forward(a, w, k, scale, col_start, col_end):
        ensure_loaded()
        return torch.ops.contrastive_ops.gated_lse_fwd(a, w, k, _scale_like(scale, a), col_start.to(torch.int32),
                                                       col_end.to(torch.int32))

    @staticmethod
    def backward(a, w, k, scale, col_start, col_end, lse, grad_lse):
        ensure_loaded()
        return torch.ops.contrastive_ops.gated_lse_bwd(a, w, k, _scale_like(scale, a), col_start.to(torch.int32),
                                                       col_end.to(torch.int32), lse, grad_lse)


def _scale_like(scale, a: Tensor) -> Tensor:
    """The 0-dim scale in the accumulation dtype of ``a`` (fp32, float64 for float64 ``a``)."""
    return torch.as_tensor(scale, device=a.device).to(acc_dtype(a.dtype)).reshape(())


SWAV_CE = SwAVCE()
SINKHORN = Sinkhorn()
PRIMITIVES = {"sim_lse": SimLSE(), "siglip": SigLIP(), "sinkhorn": SINKHORN, "swav_ce": SWAV_CE}
# Primitives with a CPU kernel and no CUDA one (the "cuda" backend does not list them).
CPU_ONLY_PRIMITIVES = {"sim_expect": SimExpect(), "pix_pos_sum": PixPosSum(), "pix_pos_lse": PixPosLSE()}
CPU_ONLY_PRIMITIVES["gated_lse"] = GatedLSE()
CPU_ONLY_PRIMITIVES["label_lse"] = LabelLSE()
# Their ops (csrc/ops.cpp): a CPU kernel and, by design, no CUDA one.
CPU_ONLY_OPS = ("sim_expect_fwd", "sim_expect_bwd", "pix_pos_sum", "pix_pos_lse_fwd", "pix_pos_lse_bwd")
CPU_ONLY_OPS += ("gated_lse_fwd", "gated_lse_bwd")
CPU_ONLY_OPS += ("label_lse_fwd", "label_lse_bwd", "label_lse_uniforms")
