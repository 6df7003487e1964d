"""Backend ``"cuda"``: the CUDA kernels of ``contrastive_ops._C`` on CUDA tensors.

Tiled GEMMs through cuBLAS (ATen; tensor cores with fp32 accumulation for
fp16/bf16, IEEE fp32 for fp32 whatever the global TF32 switch) plus CUDA
epilogue kernels that read each tile once (``csrc/cuda/``); never stores the
B×M similarity matrix.  Reductions go through per-block partials summed in a
fixed order (no float atomics): results are bitwise reproducible run to run.
Column tiles outside a row block's ``[min col_start, max col_end)`` are skipped.

``CONTRASTIVE_OPS_CUDA_TILE=rows,cols`` overrides the tile shape (default: up
to 2048 × 16384).  The same tiling runs on CPU for tests
(``contrastive_ops.backends._cext_tiled``); the performance model is
``benchmarks/cuda_model.py``.
"""
from __future__ import annotations

from . import _cext

PRIMITIVES = _cext.PRIMITIVES


def availability():
    return _cext.availability("cuda")


def devices():
    return {"cuda"}


def dtypes():
    return set(_cext.DTYPES)
