"""Inputs shared by the PixPro / PixContrast tests: crop boxes as PixPro's data pipeline draws them,
feature maps, and the positive predicate written from the formula in float64 Python."""
from __future__ import annotations

import math

import pytest
import torch

import contrastive_ops as co

# (N, H, W): the paper's 7×7 map, a 5×5 map and a non-square one; P = H·W is never a multiple of the
# kernels' 16-wide tiles, so every tile edge is ragged.
SHAPES = [(3, 5, 5), (3, 7, 7), (3, 5, 7)]
C = 20  # not a power of two: ragged D blocks


def crops(N: int, *, seed: int = 0, far: int = 0, dtype=torch.float32) -> tuple:
    """Two boxes (N, 4) = (x0, y0, x1, y1) per image in [0, 1] coordinates, overlapping as random resized
    crops of one image do; the last ``far`` images get disjoint boxes (no positive pair)."""
    g = torch.Generator().manual_seed(seed)

    def box(n, centre=None):
        w = 0.3 + 0.6 * torch.rand(n, generator=g, dtype=torch.float64)
        h = 0.3 + 0.6 * torch.rand(n, generator=g, dtype=torch.float64)
        if centre is None:
            x0 = (1 - w) * torch.rand(n, generator=g, dtype=torch.float64)
            y0 = (1 - h) * torch.rand(n, generator=g, dtype=torch.float64)
        else:  # around the other crop's centre, shifted by up to ±0.15: the crops overlap
            x0 = centre[0] - w / 2 + 0.3 * (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
            y0 = centre[1] - h / 2 + 0.3 * (torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
        return torch.stack([x0, y0, x0 + w, y0 + h], 1)

    c1 = box(N)
    c2 = box(N, ((c1[:, 0] + c1[:, 2]) / 2, (c1[:, 1] + c1[:, 3]) / 2))
    for b in range(N - far, N):
        c1[b] = torch.tensor([0.0, 0.0, 0.3, 0.3], dtype=torch.float64)
        c2[b] = torch.tensor([0.6, 0.6, 1.0, 0.95], dtype=torch.float64)
    return c1.to(dtype), c2.to(dtype)


def maps(N: int, H: int, W: int, n: int = 4, *, dtype=torch.float32, grad=True, seed: int = 1) -> list:
    """``n`` feature maps (N, C, H, W); the first two (the online ones) require grad."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype)
        out.append(t.requires_grad_(grad and i < 2))
    return out


def positive(cq, ck, b: int, i: int, j: int, H: int, W: int, ratio: float) -> bool:
    """pos_ij of image b (pixel i of view q, pixel j of view k), from the formula, in float64 Python."""
    x0, y0, x1, y1 = (float(v) for v in cq[b])
    u0, v0, u1, v1 = (float(v) for v in ck[b])
    bw_q, bh_q = (x1 - x0) / W, (y1 - y0) / H
    bw_k, bh_k = (u1 - u0) / W, (v1 - v0) / H
    diag = max(math.sqrt(bw_q * bw_q + bh_q * bh_q), math.sqrt(bw_k * bw_k + bh_k * bh_k))
    ri, ai = divmod(i, W)
    rj, aj = divmod(j, W)
    dx = ((ai + 0.5) * bw_q + x0) - ((aj + 0.5) * bw_k + u0)
    dy = ((ri + 0.5) * bh_q + y0) - ((rj + 0.5) * bh_k + v0)
    return math.sqrt(dx * dx + dy * dy) / diag < ratio


def pixels(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H·W, C) float64, each pixel L2-normalized."""
    p = x.detach().double().flatten(2).transpose(1, 2)
    return p / p.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def positive_counts(c1, c2, H: int, W: int, ratio: float = 0.7) -> list:
    """Positive pairs per image (view 1 against view 2), from the dense mask."""
    from contrastive_ops.primitives import pix_pos

    dx, dy, dg = pix_pos.geometry(c1, c2, H, W)
    return pix_pos.pos_mask(dx, dy, dg, torch.tensor(ratio, dtype=c1.dtype), H, W).sum((1, 2)).tolist()


def assert_positives(c1, c2, H: int, W: int, far: int = 0) -> None:
    """The test inputs have positives where they should (else a broken predicate could go unseen)."""
    n = positive_counts(c1, c2, H, W)
    N = len(n)
    assert all(v > 0 for v in n[:N - far]) and all(v == 0 for v in n[N - far:]), n


def cpu_kernel_or_skip(primitive: str) -> None:
    """Skip unless the C++ extension is loaded and serves ``primitive`` on the cpu backend."""
    ok, why = co.available_backends()["cpu"]
    if not ok or primitive not in co.backends.backend_module("cpu").PRIMITIVES:
        pytest.skip(f"cpu backend without {primitive}: {why}")
