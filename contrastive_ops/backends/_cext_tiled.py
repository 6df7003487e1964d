"""The CUDA backend's tiling run on CPU, for tests: primitives with a chosen tile shape.

``csrc/cpu/sim_lse_tiled.cpp`` instantiates the device-generic tiling of
``csrc/tiling.h`` for CPU tensors with the per-element and partial-merge maths
of the CUDA epilogues (``csrc/cuda/tile_math.cuh``).  With tiny tiles (3 × 5
by default) every cross-tile merge of the CUDA host code runs on small inputs:
row statistics across column tiles, column statistics across row tiles, dQ / dK
accumulation, the dscale / SigLIP partial sums, column ranges per row block and
σ-scaled fp16 dS tiles.

``TiledSimLSE`` and ``TiledSigLIP`` have the interface of the ``"sim_lse"`` and
``"siglip"`` primitives (``contrastive_ops.backends._cext.SimLSE`` / ``SigLIP``);
tests serve them in place of the CPU backend's primitives.  Not public API.
"""
from __future__ import annotations

import torch

from . import _cext


class TiledSimLSE:
    """Primitive ``"sim_lse"`` through the CUDA tiling on CPU, tiles of ``rows`` × ``cols``."""

    def __init__(self, rows: int = 3, cols: int = 5):
        self.rows, self.cols = int(rows), int(cols)

    def forward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, want_col, row_max=None):
        _cext.ensure_loaded()
        return torch.ops.contrastive_ops._sim_lse_tiled_fwd(
            q, k, scale, row_index, col_index, col_start, col_end, exclude, bool(want_col), self.rows, self.cols,
            row_max)

    def backward(self, q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse,
                 grad_row, grad_col, row_max=None):
        _cext.ensure_loaded()
        return torch.ops.contrastive_ops._sim_lse_tiled_bwd(
            q, k, scale, row_index, col_index, col_start, col_end, exclude, row_lse, col_lse, grad_row, grad_col,
            self.rows, self.cols, row_max)


class TiledSigLIP:
    """Primitive ``"siglip"`` through the CUDA tiling on CPU, tiles of ``rows`` × ``cols``."""

    def __init__(self, rows: int = 3, cols: int = 5):
        self.rows, self.cols = int(rows), int(cols)

    def forward(self, x, y, scale, bias):
        _cext.ensure_loaded()
        return torch.ops.contrastive_ops._siglip_tiled_fwd(x, y, scale, bias, self.rows, self.cols)

    def backward(self, x, y, scale, bias, grad):
        _cext.ensure_loaded()
        return torch.ops.contrastive_ops._siglip_tiled_bwd(x, y, scale, bias, grad, self.rows, self.cols)
