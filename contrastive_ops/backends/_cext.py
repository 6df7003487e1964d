"""Shared part of the ``"cpu"`` and ``"cuda"`` backends: the ops of the extension ``contrastive_ops._C``.

The C++ side declares the op schemas (``csrc/ops.cpp``) and registers CPU and
CUDA kernels; dispatch to the right device is done by the PyTorch dispatcher.
This module adds, once the library is loaded:

* fake (meta) kernels, ``torch.library.register_fake``, so that
  ``torch.compile(fullgraph=True)`` can trace through the ops: shape logic and
  ``torch._check`` only, never reading data;
* autograd formulas for the forward ops (``register_autograd``), so that the
  ops are differentiable on their own as well as through ``core.sim_lse``;
* the primitive objects the backends expose (``PRIMITIVES``).

Primitive contracts (all tensors on one device):

``sim_lse``  see ``contrastive_ops.core``.  When ``q`` and ``k`` are one tensor object, ``backward`` may
             return the whole gradient of that tensor (dq + dk) in ``dq`` and zeros in ``dk`` (the CPU
             kernel does, computing each pair of the symmetric Gram once); autograd sums the two anyway.
``sinkhorn`` see ``backends._cext_sinkhorn`` and ``losses.swav``.
``swav_ce``  ``forward(x, t, scale) -> (0-dim, lse (B,))``: Σ_b of
             F.cross_entropy(scale·x, t) with soft targets t; ``backward(x, t, scale, lse, grad) -> (dx, dscale)``
             (``csrc/cpu/swav_ce.cpp``).
``siglip``   ``forward(x, y, scale, bias) -> 0-dim`` Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias)), z = 2I − 1
             (``losses.siglip.siglip_sum_reference``), fp32 (float64 for float64);
             ``backward(x, y, scale, bias, grad) -> (dx like x, dy like y, dscale like scale, dbias like bias)``
             with ``scale``, ``bias``, ``grad`` 0-dim in the accumulation dtype.
"""
from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from .. import _ext
from . import _cext_sinkhorn

Tensor = torch.Tensor

DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64}

_lock = threading.Lock()
_registered = False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def _fake_sim_lse_fwd(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
    torch._check(q.dim() == 2 and k.dim() == 2, lambda: f"q and k must be 2-D, got {q.shape} and {k.shape}")
    torch._check(q.shape[1] == k.shape[1], lambda: f"q {q.shape} and k {k.shape} have different feature sizes")
    torch._check(q.dtype == k.dtype, lambda: f"q and k dtypes differ: {q.dtype} vs {k.dtype}")
    torch._check(scale.dim() == 0, lambda: f"scale must be 0-dim, got {scale.shape}")
    B = q.shape[0] if row_index is None else row_index.shape[0]
    M = k.shape[0] if col_index is None else col_index.shape[0]
    for name, t in (("col_start", col_start), ("col_end", col_end), ("exclude", exclude)):
        if t is not None:
            torch._check(t.shape[0] == B, lambda: f"{name} must have {B} rows, got {t.shape}")
    acc = _acc(q.dtype)
    return q.new_empty((B,), dtype=acc), q.new_empty((M if want_col else 0,), dtype=acc)


def _fake_sim_lse_bwd(q, k, scale, row_index, col_index, col_start, col_end, exclude,
                      row_lse, col_lse, grad_row, grad_col):
    torch._check(q.dim() == 2 and k.dim() == 2, lambda: f"q and k must be 2-D, got {q.shape} and {k.shape}")
    B = q.shape[0] if row_index is None else row_index.shape[0]
    torch._check(row_lse.shape[0] == B and grad_row.shape[0] == B, lambda: f"row_lse/grad_row must have {B} entries")
    return (q.new_empty(q.shape), k.new_empty(k.shape), scale.new_empty(()))


def _fake_siglip_fwd(x, y, scale, bias):
    torch._check(x.dim() == 2 and y.dim() == 2, lambda: f"x and y must be 2-D, got {x.shape} and {y.shape}")
    torch._check(x.shape[1] == y.shape[1], lambda: f"x {x.shape} and y {y.shape} have different feature sizes")
    torch._check(scale.dim() == 0 and bias.dim() == 0, lambda: "scale and bias must be 0-dim")
    return x.new_empty((), dtype=_acc(x.dtype))


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


# ---------------------------------------------------------------- autograd of the forward ops


def _sim_lse_setup(ctx, inputs, output):
    q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col = inputs
    ctx.save_for_backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, *output)
    ctx.want_col = want_col


def _sim_lse_backward(ctx, g_row, g_col):
    q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse = ctx.saved_tensors
    if not ctx.want_col:
        g_col = torch.zeros_like(col_lse)
    dq, dk, dscale = torch.ops.contrastive_ops.sim_lse_bwd(
        q, k, scale, row_index, col_index, col_start, col_end, exclude,
        row_lse, col_lse, g_row.contiguous(), g_col.contiguous(),
    )
    return dq, dk, dscale, None, None, None, None, None, None


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


def _register() -> None:
    lib = "contrastive_ops::"
    torch.library.register_fake(lib + "sim_lse_fwd", _fake_sim_lse_fwd)
    torch.library.register_fake(lib + "sim_lse_bwd", _fake_sim_lse_bwd)
    torch.library.register_fake(lib + "siglip_fwd", _fake_siglip_fwd)
    torch.library.register_fake(lib + "siglip_bwd", _fake_siglip_bwd)
    torch.library.register_autograd(lib + "sim_lse_fwd", _sim_lse_backward, setup_context=_sim_lse_setup)
    torch.library.register_autograd(lib + "siglip_fwd", _siglip_backward, setup_context=_siglip_setup)
    torch.library.register_fake(lib + "swav_ce_fwd", _fake_swav_ce_fwd)
    torch.library.register_fake(lib + "swav_ce_bwd", _fake_swav_ce_bwd)
    torch.library.register_autograd(lib + "swav_ce_fwd", _swav_ce_backward, setup_context=_swav_ce_setup)
    _cext_sinkhorn.register_fakes()


# ---------------------------------------------------------------- primitives


class SimLSE:
    """Primitive ``"sim_lse"``: the tiled similarity-LSE core (contract in ``contrastive_ops.core``)."""

    @staticmethod
    def forward(q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col):
        ensure_loaded()
        return torch.ops.contrastive_ops.sim_lse_fwd(
            q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col))

    @staticmethod
    def backward(q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col):
        ensure_loaded()
        return torch.ops.contrastive_ops.sim_lse_bwd(
            q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col)


class SigLIP:
    """Primitive ``"siglip"``: Σ_ij softplus(−z_ij·(scale·x_i·y_j + bias)), tiled (contract above)."""

    @staticmethod
    def forward(x, y, scale, bias):
        ensure_loaded()
        return torch.ops.contrastive_ops.siglip_fwd(x, y, scale, bias)

    @staticmethod
    def backward(x, y, scale, bias, grad):
        ensure_loaded()
        return torch.ops.contrastive_ops.siglip_bwd(x, y, scale, bias, grad)


class SwAVCE:
    """Primitive ``"swav_ce"``: Σ_b of the soft-target cross-entropy of scale·x against t.

    ``forward(x, t, scale) -> (loss 0-dim, lse (B,))`` and ``backward(x, t, scale, lse, grad) -> (dx like x,
    dscale)``, t, scale and grad in the accumulation dtype; maths in ``csrc/cpu/swav_ce.cpp`` (CUDA kernels:
    ``csrc/cuda/swav_ce.cu``).
    """

    @staticmethod
    def forward(x, t, scale):
        ensure_loaded()
        return torch.ops.contrastive_ops.swav_ce_fwd(x, t, scale)

    @staticmethod
    def backward(x, t, scale, lse, grad):
        ensure_loaded()
        return torch.ops.contrastive_ops.swav_ce_bwd(x, t, scale, lse, grad)


SWAV_CE = SwAVCE()
PRIMITIVES = {"sim_lse": SimLSE(), "siglip": SigLIP(), "sinkhorn": _cext_sinkhorn.SINKHORN, "swav_ce": SWAV_CE}
