"""Lazy loading of the compiled extension ``contrastive_ops._C``, with a version check.

Importing ``contrastive_ops`` never loads the extension; the first use of the
``"cpu"``/``"cuda"`` backends does (``load()``).  Before importing the shared
library, the torch (and CUDA) version recorded by ``setup.py`` in
``contrastive_ops/_build_info.py`` is compared with the running torch: a
binary built against another torch would fail with an undefined-symbol error
or worse, so a mismatch raises ``ExtensionError`` saying how to rebuild.
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType
from typing import Optional

import torch

REBUILD_HINT = (
    "rebuild with: pip install --no-build-isolation --no-deps --force-reinstall . "
    "(from the contrastive_ops source tree, in the environment of the torch you run)"
)

_lock = threading.Lock()
_module: Optional[ModuleType] = None
_error: Optional["ExtensionError"] = None


class ExtensionError(RuntimeError):
    """The C++/CUDA extension is missing, was skipped at build time, or does not match the running torch."""


def _build_info():
    try:
        return importlib.import_module("contrastive_ops._build_info")
    except ImportError:
        return None


def check_versions(info, torch_version: str = None, cuda_version: Optional[str] = None) -> None:
    """Raise ``ExtensionError`` if ``info`` (the build record) does not match the running torch.

    ``torch_version`` / ``cuda_version`` default to the running ``torch.__version__`` / ``torch.version.cuda``.
    """
    if torch_version is None:
        torch_version = torch.__version__
        cuda_version = torch.version.cuda
    if info is None:
        raise ExtensionError(
            "contrastive_ops was installed without its C++ extension (no contrastive_ops/_build_info.py); "
            + REBUILD_HINT
        )
    if not getattr(info, "WITH_EXT", False):
        raise ExtensionError(
            "contrastive_ops was built without its C++ extension (CONTRASTIVE_OPS_SKIP_EXT=1); "
            "unset it and " + REBUILD_HINT
        )
    built = str(info.TORCH_VERSION)
    if built != str(torch_version):
        raise ExtensionError(
            f"contrastive_ops._C was built against torch {built} but torch {torch_version} is running; "
            + REBUILD_HINT
        )
    if info.WITH_CUDA and info.CUDA_VERSION != cuda_version:
        raise ExtensionError(
            f"contrastive_ops._C was built against CUDA {info.CUDA_VERSION} but the running torch uses "
            f"CUDA {cuda_version}; " + REBUILD_HINT
        )


def load() -> ModuleType:
    """Import ``contrastive_ops._C`` once (registering its ops); raise ``ExtensionError`` if unusable."""
    global _module, _error
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        if _error is not None:
            raise _error
        try:
            check_versions(_build_info())
            try:
                mod = importlib.import_module("contrastive_ops._C")
            except ImportError as e:
                raise ExtensionError(f"cannot import contrastive_ops._C ({e}); " + REBUILD_HINT) from e
        except ExtensionError as e:
            _error = e
            raise
        _module = mod
        return mod


def with_cuda() -> bool:
    """Whether the build record says the CUDA kernels were compiled."""
    info = _build_info()
    return bool(info is not None and getattr(info, "WITH_CUDA", False))

