"""Argument checking, done once in the public functions before any backend.

Every failure is a ``ValueError`` (``TypeError`` for integer features) whose
message names the argument and the shapes seen.
"""
from __future__ import annotations

from numbers import Real
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from ._numerics import acc_dtype

Tensor = torch.Tensor
REDUCTIONS = ("mean", "sum", "none")


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def shape_str(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_features(name: str, t, ndims: Sequence[int] = (2,)) -> None:
    """A floating-point, non-empty tensor of one of the ranks in ``ndims``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype} with shape {shape_str(t)}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {shape_str(t)}")
    if t.numel() == 0 or t.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {shape_str(t)}")


def check_same_device_dtype(named: Iterable[Tuple[str, Tensor]]) -> None:
    named = [(n, t) for n, t in named if t is not None]
    n0, t0 = named[0]
    for n, t in named[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device} (shapes {shape_str(t)}, {shape_str(t0)})")
        if t.is_floating_point() and t0.is_floating_point() and t.dtype != t0.dtype:
            raise ValueError(f"{n} has dtype {t.dtype} but {n0} has dtype {t0.dtype} (shapes {shape_str(t)}, {shape_str(t0)})")


def check_same_shape(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} and {b_name} must have the same shape, got {shape_str(a)} and {shape_str(b)}")


def check_same_dim(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} must have the same feature dimension, got {shape_str(a)} and {shape_str(b)}"
        )


def check_choice(name: str, value, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    return check_choice("reduction", reduction, REDUCTIONS)


def as_scalar(name: str, value: Union[float, Tensor], like: Tensor, *, positive: bool = False) -> Tensor:
    """A float or 0-dim tensor as a 0-dim tensor in the accumulation dtype on ``like``'s device.

    Keeps the autograd graph of a tensor argument.  ``positive`` rejects
    values <= 0 (checked on the host except under ``torch.compile``).
    """
    dt = acc_dtype(like.dtype)
    if isinstance(value, Tensor):
        if value.dim() != 0 and value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape {shape_str(value)}")
        if not value.is_floating_point():
            value = value.to(dt)
        if positive and not _compiling():
            v = float(value.detach().reshape(()).item())
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        return value.reshape(()).to(device=like.device, dtype=dt)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    v = float(value)
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    return torch.tensor(v, dtype=dt, device=like.device)


def check_pair(a_name: str, a, b_name: str, b, *, same_rows: bool) -> None:
    """Two feature matrices of one device and dtype: the same shape (``same_rows``) or the same feature size."""
    check_features(a_name, a)
    check_features(b_name, b)
    check_same_device_dtype([(a_name, a), (b_name, b)])
    if same_rows:
        check_same_shape(a_name, a, b_name, b)
    else:
        check_same_dim(a_name, a, b_name, b)


def check_labels(name: str, labels: Tensor, n: int, device) -> None:
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({n},), got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype} with shape {shape_str(labels)}")
    if labels.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {shape_str(labels)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the features are on {device}")


def check_queue(queue, like_name: str, like: Tensor) -> None:
    """A (K, D) floating queue of extra candidates (K may be 0) on ``like``'s device, in its dtype and width."""
    if not isinstance(queue, Tensor):
        raise ValueError(f"queue must be a (K, {like.shape[-1]}) tensor, got {type(queue).__name__}")
    if queue.dim() != 2:
        raise ValueError(f"queue must be 2-D (K, {like.shape[-1]}), got shape {shape_str(queue)}")
    if queue.shape[1] != like.shape[-1]:
        raise ValueError(
            f"queue must have the feature width of {like_name}, got queue {shape_str(queue)} and "
            f"{like_name} {shape_str(like)}"
        )
    if queue.dtype != like.dtype:
        raise ValueError(
            f"queue has dtype {queue.dtype} but {like_name} has dtype {like.dtype} "
            f"(shapes {shape_str(queue)}, {shape_str(like)})"
        )
    if queue.device != like.device:
        raise ValueError(
            f"queue is on {queue.device} but {like_name} is on {like.device} "
            f"(shapes {shape_str(queue)}, {shape_str(like)})"
        )


def check_queue_labels(queue_labels, queue: Optional[Tensor]) -> None:
    """Integer labels (K,) of the queue's entries, on its device; only together with a queue."""
    if queue_labels is None:
        return
    if queue is None:
        raise ValueError(f"queue_labels (shape {shape_str(queue_labels)}) was given without a queue")
    check_labels("queue_labels", queue_labels, queue.shape[0], queue.device)


def check_mask(name: str, mask: Optional[Tensor], shape: Tuple[int, ...], device) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = f"dtype {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a bool tensor of shape {shape}, got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {shape_str(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the features are on {device}")


def reduce(values: Tensor, reduction: str, count: Optional[Tensor] = None) -> Tensor:
    """Reduce per-anchor values; ``count`` (a tensor) is the number of anchors that count for "mean".

    With ``count`` = 0 the mean is 0 and stays in the graph.
    """
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    if count is None:
        return total / values.numel()
    return total / count.clamp_min(1).to(total.dtype)


def check_views(name: str, features, *, min_views: int = 2, allow_single: bool = False) -> Tensor:
    """Multi-view features as a view-major (V, N, D) tensor.

    Accepts an (N, V, D) tensor (returned transposed, no copy), a sequence of V
    (N, D) tensors (stacked), and with ``allow_single`` an (N, D) tensor as one
    view.  Fewer than ``min_views`` views is an error.
    """
    if isinstance(features, Tensor):
        check_features(name, features, (2, 3) if allow_single else (3,))
        views = features.unsqueeze(0) if features.dim() == 2 else features.transpose(0, 1)
        if views.shape[0] < min_views:
            raise ValueError(
                f"{name} must hold at least {min_views} views (shape (N, V, D) with V >= {min_views}), "
                f"got shape {shape_str(features)}"
            )
        return views
    if not isinstance(features, (list, tuple)):
        raise TypeError(f"{name} must be a tensor of shape (N, V, D) or a sequence of (N, D) tensors, "
                        f"got {type(features).__name__}")
    if len(features) < max(min_views, 1):
        raise ValueError(f"{name} must hold at least {max(min_views, 1)} views, got a sequence of {len(features)}")
    for i, t in enumerate(features):
        check_features(f"{name}[{i}]", t, (2,))
    t0 = features[0]
    for i, t in enumerate(features[1:], 1):
        if t.shape != t0.shape:
            raise ValueError(f"{name}[{i}] and {name}[0] must have the same shape, got {shape_str(t)} and {shape_str(t0)}")
    check_same_device_dtype([(f"{name}[{i}]", t) for i, t in enumerate(features)])
    return torch.stack(list(features), 0)
