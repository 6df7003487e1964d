r"""Peers: adapters from a benchmark case's inputs to another library's loss.

Each ``Peer`` names the module it needs (its availability), the devices it
runs on and a ``build(kwargs) -> callable(*args)`` that feeds the *same*
inputs as the case (``contrastive_ops.benchmarking.cases``) to the other
library.  ``PEERS`` maps a loss name to its peers.  Also the flash-sinkhorn
adapters that turn SwAV scores into point clouds (exact for any scores).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Peer:
    name: str
    module: str  # import needed (availability)
    build: Callable[[dict], Callable]  # kwargs of the case -> callable(*args)
    devices: Tuple[str, ...] = ("cpu", "cuda")
    # (atol, rtol) of the float32 check of a CUDA-only peer against the reference
    # (tests/test_benchmarking.py); looser where the peer's fp32 products use TF32.
    check_tol: Tuple[float, float] = (2e-5, 2e-4)


def _open_clip_clip(kw):
    from open_clip.loss import ClipLoss

    loss = ClipLoss()
    return lambda img, txt, scale: loss(img, txt, scale)


def _open_clip_siglip(kw):
    from open_clip.loss import SigLipLoss

    loss = SigLipLoss()
    return lambda img, txt, scale, bias: loss(img, txt, scale, bias)


def _lightly(cls_name, **fixed):
    def build(kw):
        import lightly.loss as ll

        loss = getattr(ll, cls_name)(temperature=kw["temperature"], **fixed)
        return lambda z1, z2: loss(z1, z2)

    return build


def _lightly_swav(kw):
    from lightly.loss import SwaVLoss

    loss = SwaVLoss(temperature=kw.get("temperature", 0.1), sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    # crops_for_assign=(0, 1): the first two crops are the high-resolution ones.
    # lightly returns shape (1,); the library's losses are 0-dim.
    return lambda scores: loss(list(scores[:2]), list(scores[2:])).reshape(())


def _pml_supcon(kw):
    from pytorch_metric_learning.losses import SupConLoss

    loss = SupConLoss(temperature=kw["temperature"])

    def call(features, labels):
        n, v, d = features.shape
        if labels is None:
            labels = torch.arange(n, device=features.device)
        # view-major anchors, as contrastive_ops orders them
        return loss(features.transpose(0, 1).reshape(v * n, d), labels.repeat(v))

    return call


def _inf_cl_head_dim(d):
    for h in (256, 128, 64, 32, 16):
        if d % h == 0:
            return h
    raise ValueError(f"Inf-CL needs D divisible by 16, got {d}")


def _one_process_group() -> None:
    """Inf-CL's loss reads the default process group even on one GPU: make a one-process one
    (NCCL on CUDA, else gloo; a file store in a temporary directory, no port) unless one exists.
    contrastive_ops itself is unaffected: its losses gather only with an explicit process_group."""
    import tempfile

    import torch.distributed as dist

    if dist.is_initialized():
        return
    store = os.path.join(tempfile.mkdtemp(prefix="co-peers-"), "store")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", init_method=f"file://{store}",
                            world_size=1, rank=0)


def _inf_cl_clip(kw):
    from inf_cl import cal_inf_loss

    _one_process_group()

    def call(img, txt, scale):
        h = _inf_cl_head_dim(img.shape[1])
        return 0.5 * (cal_inf_loss(img, txt, scale=scale, head_dim=h) + cal_inf_loss(txt, img, scale=scale, head_dim=h))

    return call


def _inf_cl_info_nce(kw):
    from inf_cl import cal_inf_loss

    _one_process_group()

    tau = kw["temperature"]

    def call(q, k):
        return cal_inf_loss(F.normalize(q, dim=-1), F.normalize(k, dim=-1), scale=1.0 / tau,
                            head_dim=_inf_cl_head_dim(q.shape[1]))

    return call


def _siglip_kernel(kw):
    from siglip_kernel import fused_siglip_loss

    # Conventions bridged (siglip-kernel 0.1.x, ``fused_siglip_loss(img, txt, log_temperature, bias)``):
    # its "temperature" multiplies the logits (logits = img·txtᵀ·exp(log_temperature) + bias), so it
    # takes log(logit_scale) where contrastive_ops takes logit_scale itself; the log is taken inside the
    # graph, so the gradient reaches logit_scale.  Same labels (2I − 1), same reduction (sum over the
    # B² pairs divided by B), no normalization inside.  It routes by dtype (bf16/fp16: cuBLAS GEMM +
    # Triton BCE; fp32: fused Triton kernel whose products are TF32) and imports only where a GPU is.
    def call(img, txt, scale, bias):
        scale = torch.as_tensor(scale, dtype=torch.float32, device=img.device)
        bias = torch.as_tensor(bias, dtype=torch.float32, device=img.device)
        return fused_siglip_loss(img, txt, torch.log(scale), bias)

    return call


def flash_sinkhorn_solve(x: Tensor, y: Tensor, epsilon: float, iterations: int) -> Tuple[Tensor, Tensor]:
    """flash-sinkhorn's potentials (f on ``x``, g on ``y``) after ``iterations`` alternating updates.

    ``SamplesLoss(backend="alternating")`` at a fixed ε, cost ½‖x − y‖² (``half_cost``), uniform
    weights, fp32 products (no TF32, no TF32 rounding of the coordinates).  GeomLoss convention: the
    plan is P[i,j] = a_i·b_j·exp((f_i + g_j − C_ij)/ε); each iteration updates f (rows of x sum to a)
    and then g (columns of y sum to b), both from f = g = 0.
    """
    from flash_sinkhorn import SamplesLoss

    solver = SamplesLoss("sinkhorn", backend="alternating", use_epsilon_scaling=False, eps=float(epsilon),
                         n_iters=int(iterations), half_cost=True, potentials=True, debias=False,
                         allow_tf32=False, truncate_tf32=False)
    return solver(x, y)


def flash_sinkhorn_codes_from_points(prototypes: Tensor, z: Tensor, dots: Tensor, epsilon: float,
                                     iterations: int, solve=flash_sinkhorn_solve) -> Tensor:
    """SwAV codes (B, K) from flash-sinkhorn run on prototypes (K, D) and embeddings z (B, D).

    ``dots`` = z·prototypesᵀ (the SwAV scores).  Exact when every ‖z_b‖ is the same (SwAV
    normalizes z): then C = ½‖c_k − z_b‖² = ½‖c_k‖² + const − dots[b,k], the per-prototype term
    ½‖c_k‖² is absorbed by every f update, and SwAV's Sinkhorn (prototype sums first, then sample
    sums, from exp(S/ε)) and flash-sinkhorn's alternating updates (f on the prototypes first, then g
    on the samples, from f = g = 0) give the same plan after each iteration.  The codes are SwAV's
    B·Pᵀ = (1/K)·exp((f_k + g_b − C[k,b])/ε), whose rows sum to 1.
    """
    if iterations < 1:
        raise ValueError(f"flash-sinkhorn needs iterations >= 1, got {iterations}")
    B, K = dots.shape
    f, g = solve(prototypes, z, epsilon, iterations)
    half_c = 0.5 * (prototypes.to(f.dtype) ** 2).sum(1)  # (K,)
    half_z = 0.5 * (z.to(g.dtype) ** 2).sum(1)  # (B,)
    logp = ((g - half_z)[:, None] + (f - half_c)[None, :] + dots.to(f.dtype)) / epsilon
    return torch.exp(logp - math.log(K))


def flash_sinkhorn_codes(scores: Tensor, epsilon: float = 0.05, iterations: int = 3,
                         solve=flash_sinkhorn_solve) -> Tensor:
    """``sinkhorn_knopp(scores)`` computed by flash-sinkhorn, exactly, for any scores (B, K).

    flash-sinkhorn solves OT between point clouds (squared Euclidean cost); it never sees a score
    matrix.  Scores become points with the same dot products: prototype k is the unit vector e_k and
    sample b is (S[b,:], p_b) in K+1 dimensions, with the padding p_b = √(R² − ‖S[b,:]‖²) giving
    every sample the same norm R (the condition of ``flash_sinkhorn_codes_from_points``).  The price:
    its products are K+1 wide instead of SwAV's feature width, and ½R²/ε (R² ≈ K·Var(S)) is cancelled
    in its fp32 potentials, which costs digits at large K·Var(S)/ε.
    """
    s = scores.detach()
    if s.dtype != torch.float64:
        s = s.float()
    B, K = s.shape
    sq = (s * s).sum(1)
    pad = (sq.max() - sq).clamp_min(0).sqrt()
    z = torch.cat([s, pad[:, None]], 1)
    protos = torch.eye(K, K + 1, device=s.device, dtype=s.dtype)
    return flash_sinkhorn_codes_from_points(protos, z, s, epsilon, iterations, solve)


def _flash_sinkhorn(kw):
    import flash_sinkhorn  # noqa: F401 - fail at build time when absent

    eps, iters = kw.get("epsilon", 0.05), kw.get("iterations", 3)
    return lambda scores: flash_sinkhorn_codes(scores, eps, iters)


PEERS: Dict[str, Tuple[Peer, ...]] = {
    "clip_loss": (
        Peer("open_clip.ClipLoss", "open_clip", _open_clip_clip),
        Peer("inf_cl", "inf_cl", _inf_cl_clip, devices=("cuda",), check_tol=(1e-2, 1e-2)),
    ),
    "siglip_loss": (
        Peer("open_clip.SigLipLoss", "open_clip", _open_clip_siglip),
        Peer("siglip_kernel", "siglip_kernel", _siglip_kernel, devices=("cuda",), check_tol=(1e-2, 1e-2)),
    ),
    "sinkhorn_knopp": (Peer("flash_sinkhorn", "flash_sinkhorn", _flash_sinkhorn, devices=("cuda",)),),
    "nt_xent": (Peer("lightly.NTXentLoss", "lightly", _lightly("NTXentLoss")),),
    "dcl_loss": (Peer("lightly.DCLLoss", "lightly", _lightly("DCLLoss")),),
    "swav_loss": (Peer("lightly.SwaVLoss", "lightly", _lightly_swav),),
    "supcon_loss": (Peer("pml.SupConLoss", "pytorch_metric_learning", _pml_supcon),),
    "info_nce": (Peer("inf_cl", "inf_cl", _inf_cl_info_nce, devices=("cuda",), check_tol=(1e-2, 1e-2)),),
}
