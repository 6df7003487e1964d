"""The single dispatch point: which backend runs a loss on given tensors.

Backends
--------
``"reference"``  plain PyTorch, the exact formula of each loss, any device.
``"cpu"``        fused C++ kernels of the extension ``contrastive_ops._C`` (CPU tensors).
``"cuda"``       fused CUDA kernels of the same extension (CUDA tensors).
``"triton"``     fused Triton kernels (CUDA tensors; CPU tensors under
                 ``TRITON_INTERPRET=1``, which is how CI runs them).

A kernel backend implements a handful of *primitives* (the tiled
similarity-LSE core, the SigLIP pair sum, the Sinkhorn scalings, the SwAV
cross-entropy); every loss is a short description on top of them.  Each
primitive's contract, dense reference and autograd Function are in
``contrastive_ops.primitives``.  Each
backend module exposes ``availability() -> (bool, reason)``,
``devices() -> set of device types``, ``dtypes() -> set of torch dtypes`` and
``PRIMITIVES: dict[str, object]``.

``resolve(backend, op=..., tensors=...)`` is the one place that turns a
requested backend (or ``"auto"``) into a concrete one.  ``"auto"`` walks a
priority list per device and takes the first backend that is available, runs
on the tensors' device and implements every primitive the op needs.  It never
catches a kernel failure: once a kernel backend is chosen, its errors surface.
An explicitly requested backend that cannot run raises ``RuntimeError`` with
the reason.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
import warnings
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch

BACKENDS: Tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS
ENV_VAR = "CONTRASTIVE_OPS_BACKEND"

# Priority of "auto" per device type: the first backend that can run an op wins.  On CUDA the
# C++/CUDA kernels come first: on an H200 (bf16, B = 16k-65k, D = 512/1024; CLIP, SigLIP, NT-Xent,
# MV-InfoNCE forward + backward) they took 0.25-0.75x the time of the Triton kernels, whose
# backward runs at 75-150 TFLOP/s (benchmarks/results/nvidia-h200-2026-12-04/).
AUTO_PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}

# Primitives each public op needs from a kernel backend.
OP_PRIMITIVES: Dict[str, Tuple[str, ...]] = {
    "info_nce": ("sim_lse",),
    "clip_loss": ("sim_lse",),
    "nt_xent": ("sim_lse",),
    "similarity_lse": ("sim_lse",),
    "siglip_loss": ("siglip",),
    "mv_infonce": ("sim_lse",),
    "mv_dhel": ("sim_lse",),
    "supcon_loss": ("sim_lse",),
    "dcl_loss": ("sim_lse",),
    "dhel_loss": ("sim_lse",),
    "sinkhorn_knopp": ("sinkhorn",),
    "swav_loss": ("sinkhorn",),
    "point_token_contrast": ("sim_lse",),
    "selfcon_loss": ("sim_lse",),
    "supremix_loss": ("sim_lse",),
    "sepclr_loss": ("sim_lse",),
    "cacr_loss": ("sim_expect",),
    "pixpro_loss": ("pix_pos_sum",),
    "pixcontrast_loss": ("pix_pos_lse",),
    "hydra_loss": ("sim_lse",),
}

_MODULES = {
    "cpu": "contrastive_ops.backends.cpu",
    "cuda": "contrastive_ops.backends.cuda",
    "triton": "contrastive_ops.backends._triton",
}

_default_backend: Optional[str] = None
_lock = threading.Lock()
_warned: set = set()


def _check_name(name: str, *, allow_auto: bool = True) -> str:
    choices = _CHOICES if allow_auto else BACKENDS
    if not isinstance(name, str) or name not in choices:
        raise ValueError(f"backend must be one of {choices}, got {name!r}")
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend (``None`` restores ``"auto"``)."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name)


def get_backend() -> str:
    """The default backend: ``set_backend``'s, else ``$CONTRASTIVE_OPS_BACKEND``, else ``"auto"``."""
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"${ENV_VAR}: {e}") from None
    return "auto"


def backend_module(name: str):
    """Import and return the module of a kernel backend (raises ImportError).

    Once imported (``resolve`` does it), looking it up again is a read of
    ``sys.modules``, which ``torch.compile`` traces without a graph break.
    """
    path = _MODULES[name]
    mod = sys.modules.get(path)
    return mod if mod is not None else importlib.import_module(path)


def _availability(name: str) -> Tuple[bool, str]:
    if name == "reference":
        return True, "plain PyTorch, any device"
    try:
        mod = backend_module(name)
    except Exception as e:  # noqa: BLE001 - the reason is reported, not hidden
        return False, f"cannot import {_MODULES[name]}: {type(e).__name__}: {e}"
    return mod.availability()


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend."""
    return {name: _availability(name) for name in BACKENDS}


def _devices(name: str) -> set:
    if name == "reference":
        return {"cpu", "cuda", "mps", "xpu", "meta"}
    return set(backend_module(name).devices())


def _why_not(name: str, op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """Reason why backend ``name`` cannot run ``op`` on ``device``/``dtype`` (None if it can)."""
    ok, reason = _availability(name)
    if not ok:
        return reason
    if name == "reference":
        return None
    devs = _devices(name)
    if device.type not in devs:
        return f"runs on {sorted(devs)} tensors, got {device.type} tensors"
    mod = backend_module(name)
    if dtype is not None and dtype not in mod.dtypes():
        return f"supports {sorted(str(d) for d in mod.dtypes())} inputs, got {dtype}"
    prims = mod.PRIMITIVES
    missing = [p for p in OP_PRIMITIVES[op] if p not in prims]
    if missing:
        return f"does not implement {missing} needed by {op}"
    return None


def _device_dtype(tensors: Iterable) -> Tuple[torch.device, Optional[torch.dtype]]:
    device, dtype = None, None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            device = device or t.device
            if dtype is None and t.is_floating_point():
                dtype = t.dtype
    return device or torch.device("cpu"), dtype


def resolve(backend: Optional[str], *, op: str, tensors: Sequence) -> str:
    """Turn ``backend`` (a name, ``"auto"`` or None for the default) into a concrete backend.

    Raises ``RuntimeError`` naming the reason when an explicit backend cannot
    run ``op`` on the tensors' device.
    """
    device, dtype = _device_dtype(tensors)
    return _resolve(backend, op, device.type, dtype)


@torch.compiler.assume_constant_result
def _resolve(backend: Optional[str], op: str, device_type: str, dtype: Optional[torch.dtype]) -> str:
    # Depends only on constants (names, device type, dtype) and the process's
    # backends: under torch.compile it runs once at trace time and its answer
    # is a constant of the graph, so imports and availability probes never
    # reach the tracer.
    name = get_backend() if backend is None else _check_name(backend)
    device = torch.device(device_type)
    if name != "auto":
        why = _why_not(name, op, device, dtype)
        if why is not None:
            raise RuntimeError(f"backend {name!r} cannot run {op} on {device.type} tensors: {why}")
        return name
    reasons = []
    for cand in AUTO_PRIORITY.get(device.type, ("reference",)):
        why = _why_not(cand, op, device, dtype)
        if why is None:
            if cand == "reference" and len(AUTO_PRIORITY.get(device.type, ())) > 1:
                _warn_once(op, device, reasons)
            return cand
        reasons.append(f"{cand}: {why}")
    raise RuntimeError(f"no backend can run {op} on {device.type} tensors: " + "; ".join(reasons))


def _warn_once(op: str, device: torch.device, reasons) -> None:
    key = (op, device.type)
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(
        f"contrastive_ops: no fused kernel backend for {op} on {device.type} tensors "
        f"({'; '.join(reasons)}); using the plain-PyTorch reference, which stores the "
        "full similarity matrix. Pass backend='reference' to silence this.",
        RuntimeWarning,
        stacklevel=5,
    )


def primitive(name: str, prim: str):
    """The implementation of primitive ``prim`` in kernel backend ``name``."""
    return backend_module(name).PRIMITIVES[prim]


def has_primitive(name: str, prim: str) -> bool:
    """Whether kernel backend ``name`` implements primitive ``prim`` (a composition's optional fused step)."""
    return name in _MODULES and prim in backend_module(name).PRIMITIVES
