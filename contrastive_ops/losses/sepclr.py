r"""SepCLR: separating common from salient patterns (Louiset et al., ICLR 2024).

Official code: github.com/neurospin-projects/2024_rlouiset_sep_clr, ``losses.py``
(``align_loss``, ``uniform_loss``, ``joint_entropy_loss``) and the training
scripts ``*/sep_clr_k-jem.py`` (how the terms are combined).

Two views of N images; each has a common head c (normalized: ĉ) and a salient
head s (**not** normalized).  ``labels`` are 0 (background) or 1 (target);
s' is s with the background rows set to 0 (the "teacher", which carries no
gradient on those rows).  With the Gaussian kernel k(x, y) = e^{−‖x−y‖²/2τ}::

    align(x, y) = mean_i ‖x_i − y_i‖² / 2τ                      (the code's exponent alpha = 2)
    unif(x)     = log mean_{i<j} k(x_i, x_j)
    JEM(c, s)   = mean_i log mean_j [k(s_i, s_j)·k(c_i, c_j)]     (j = i included)

    L_c   = align(ĉ¹, ĉ²) + 2·(unif(ĉ²) + unif(ĉ¹))/2
    L_s   = align(s¹[target], s²[target]) + 2·(unif(s'²) + unif(s'¹))/2
    reg   = (align(0, s¹[bg]) + align(0, s²[bg]))/2            = mean_bg ‖s‖²/2τ, averaged over the views
    JEM   = (JEM(ĉ¹, s'¹) + JEM(ĉ², s'²))/2
    L     = L_c + salient_term_beta·L_s + salient_reg_beta·reg + jem_lambda·JEM

Defaults are the CIFAR-MNIST script's (``cifar_mnist/sep_clr_k-jem.py``):
τ = 0.5, salient_term_beta = 1000, salient_reg_beta = 1000, jem_lambda = 10;
other datasets' scripts use (100, 100, 10) and (1, 100, 10) for
(salient_term_beta, salient_reg_beta, jem_lambda).

Code and paper.  The code is followed.  Its one difference with a literal
reading of the formulas: a mean over an empty set (no target row in the
batch for the salient alignment, no background row for the regularizer) is
NaN in the code; here that term is 0 (still in the graph).  The product of
the two kernels in JEM is the kernel of the concatenated features
[c, s], which is how it is computed here.

Fused composition (kernel backends) on the ``sim_lse`` core with bias terms
(never an N×N buffer): e^{−‖x−y‖²/2τ} = e^{x·y/τ}·e^{−‖x‖²/2τ}·e^{−‖y‖²/2τ}, so

    log Σ_{j≠i} k(x_i, x_j) = LSE_{j≠i}(x_i·x_j/τ − ‖x_j‖²/2τ) − ‖x_i‖²/2τ

(one ``sim_lse`` call with scale 1/τ, a column bias and a row bias, the
squared norms of the features as the kernel reads them, i.e. rounded to the
input dtype), unif = LSE_i of that − log N(N−1), JEM's rows likewise with j = i
kept.  The expansion loses ≈ ‖x‖²·ε of a logit to rounding where the
reference's explicit differences do not: with unnormalized salient features
of large norm the fused path is less accurate than the reference.  The
alignment and regularizer terms are O(N·D) in PyTorch.

Under ``process_group`` every view is all-gathered: the uniformity and JEM
rows are this rank's instances, their candidates the global batch; the
alignment means are over the global batch.  A uniformity term is the log of
a global sum: rank r returns log S + W·(S_r/S − sg(S_r/S)) (S_r: its rows'
part, S the sum over ranks), whose mean over ranks is the loss and whose
gradients, summed over ranks, are W times the single-process ones.
"""
from __future__ import annotations

import math

import torch

from .. import _checks, backends
from .._checks import as_scalar, shape_str
from ..distributed import GlobalBatch, all_reduce_lse
from ..primitives.sim_lse import sim_lse
from ._common import kernel_operands, unit

Tensor = torch.Tensor


def _sqnorm(x: Tensor) -> Tensor:
    return (x * x).sum(-1)


def _masked_mean(values: Tensor, mask: Tensor, gb: GlobalBatch) -> Tensor:
    """This rank's share of mean over the global rows where ``mask`` (0 if there are none)."""
    return gb.reduce(torch.where(mask, values, 0), "mean", mask)


def _log_global_sum(lse_local: Tensor, gb: GlobalBatch) -> Tensor:
    """log Σ over the ranks of e^{lse_local}, as rank r's share (module docstring); lse_local 0-dim."""
    if gb.group is None:
        return lse_local
    total = all_reduce_lse(lse_local.detach().reshape(1), gb.group).reshape(())
    share = torch.exp(lse_local - total)
    return gb._anchor(total + gb.world_size * (share - share.detach()))


class _Terms:
    """The pairwise terms of SepCLR on either engine: dense (reference) or the ``sim_lse`` core."""

    def __init__(self, gb: GlobalBatch, tau: Tensor, backend: str, dtype: torch.dtype):
        self.gb, self.tau, self.backend, self.dtype = gb, tau, backend, dtype  # dtype: what the kernel reads

    def row_lse(self, x: Tensor, X: Tensor, exclude_self: bool) -> Tensor:
        """LSE_j −‖x_i − X_j‖²/2τ over the global rows X (without j = i when ``exclude_self``)."""
        gb, tau = self.gb, self.tau
        n = x.shape[0]
        self_idx = gb.offset + torch.arange(n, device=x.device)
        if self.backend == "reference":
            # explicit differences (not the ‖x‖² + ‖y‖² − 2x·y expansion), without an N×N×D buffer
            d2 = torch.cdist(x, X, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
            logits = -d2 / (2 * tau)
            if exclude_self:
                logits = logits.masked_fill(self_idx[:, None] == torch.arange(X.shape[0], device=x.device)[None, :],
                                            float("-inf"))
            return torch.logsumexp(logits, 1)
        ex = self_idx if exclude_self else None
        # the kernel reads the features rounded to the input dtype; the biases are the norms of those
        # same rounded values, so that −‖x−y‖² is exactly 0 on the diagonal up to fp32 rounding
        xk, xr = kernel_operands(x, self.dtype)
        Xk, Xr = kernel_operands(X, self.dtype)
        row, _ = sim_lse(xk, Xk, 1.0 / tau, exclude=ex, row_bias=-_sqnorm(xr) / (2 * tau),
                         col_bias=-_sqnorm(Xr) / (2 * tau), backend=self.backend)
        return row

    def unif(self, x: Tensor, X: Tensor) -> Tensor:
        """log mean_{i<j} k(X_i, X_j) = log Σ_{i≠j} k − log N(N−1), this rank's share."""
        N = X.shape[0]
        lse = torch.logsumexp(self.row_lse(x, X, True), 0)
        return _log_global_sum(lse, self.gb) - math.log(N * (N - 1))

    def jem(self, c: Tensor, C: Tensor, s: Tensor, S: Tensor) -> Tensor:
        """mean_i log mean_j k(s_i, s_j)·k(c_i, c_j), this rank's share of the global mean over i."""
        f, F_ = torch.cat([c, s], 1), torch.cat([C, S], 1)
        values = self.row_lse(f, F_, False) - math.log(F_.shape[0])
        return self.gb.reduce(values, "mean")


def _sepclr(c1, c2, s1, s2, labels, tau, salient_term_beta, salient_reg_beta, jem_lambda, backend, process_group,
            dtype):
    n = c1.shape[0]
    gb = GlobalBatch(n, process_group, c1.device)
    T = _Terms(gb, tau, backend, dtype)
    u1, u2 = unit(c1, True), unit(c2, True)
    t1, t2 = unit(s1, False), unit(s2, False)
    target = labels == 1
    bg = labels == 0
    z1 = torch.where(target[:, None], t1, 0)  # s': background rows set to 0
    z2 = torch.where(target[:, None], t2, 0)
    U1, U2, Z1, Z2 = gb.gather(u1), gb.gather(u2), gb.gather(z1), gb.gather(z2)
    cm_align = gb.reduce(_sqnorm(u1 - u2) / (2 * tau), "mean")
    cm = cm_align + T.unif(u2, U2) + T.unif(u1, U1)
    sp_align = _masked_mean(_sqnorm(t1 - t2) / (2 * tau), target, gb)
    sp = sp_align + T.unif(z2, Z2) + T.unif(z1, Z1)
    reg = (_masked_mean(_sqnorm(t1) / (2 * tau), bg, gb) + _masked_mean(_sqnorm(t2) / (2 * tau), bg, gb)) / 2
    jem = (T.jem(u1, U1, z1, Z1) + T.jem(u2, U2, z2, Z2)) / 2
    return cm + salient_term_beta * sp + salient_reg_beta * reg + jem_lambda * jem


def sepclr_reference(common_1, common_2, salient_1, salient_2, labels, tau, *, salient_term_beta=1000.0,
                     salient_reg_beta=1000.0, jem_lambda=10.0, process_group=None) -> Tensor:
    """Exact SepCLR with explicit pairwise differences (``torch.cdist`` without the matmul expansion; stores N × N)."""
    return _sepclr(common_1, common_2, salient_1, salient_2, labels, tau, salient_term_beta, salient_reg_beta,
                   jem_lambda, "reference", process_group, common_1.dtype)


def _check_weight(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
    return float(v)


def sepclr_loss(common_1, common_2, salient_1, salient_2, labels, *, tau=0.5, salient_term_beta=1000.0,
                salient_reg_beta=1000.0, jem_lambda=10.0, backend="auto", process_group=None) -> Tensor:
    r"""SepCLR with the k-JEM constraint: Gaussian-kernel alignment / uniformity on a common and a salient head.

    Args:
        common_1, common_2: (N, Dc) common-head outputs of the two views (normalized here).
        salient_1, salient_2: (N, Ds) salient-head outputs (used as they are, not normalized).
        labels: (N,) 0 (background) / 1 (target), integer or bool.
        tau: τ > 0 of the Gaussian kernels e^{−‖x−y‖²/2τ} and of the alignment (float or 0-dim tensor).
        salient_term_beta, salient_reg_beta, jem_lambda: the weights of the salient term, the
            background regularizer and the k-JEM term (the CIFAR-MNIST script's 1000, 1000, 10).

    Returns the scalar loss, fp32 (float64 for float64 inputs).  Maths in the module docstring.
    """
    names = ("common_1", "common_2", "salient_1", "salient_2")
    heads = (common_1, common_2, salient_1, salient_2)
    for nm, t in zip(names, heads):
        _checks.check_features(nm, t)
    _checks.check_same_device_dtype(list(zip(names, heads)))
    _checks.check_same_shape("common_1", common_1, "common_2", common_2)
    _checks.check_same_shape("salient_1", salient_1, "salient_2", salient_2)
    N = common_1.shape[0]
    if salient_1.shape[0] != N:
        raise ValueError(f"common and salient heads must have the same number of rows, got common_1 "
                         f"{shape_str(common_1)} and salient_1 {shape_str(salient_1)}")
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(f"labels must be an integer or bool tensor of shape ({N},) with values 0 (background) "
                         f"and 1 (target), got {got}")
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape ({N},) for heads of {N} rows, got {shape_str(labels)}")
    if labels.device != common_1.device:
        raise ValueError(f"labels is on {labels.device} but the features are on {common_1.device}")
    labels = labels.long()
    if not torch.compiler.is_compiling() and not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(f"labels must be 0 (background) or 1 (target), got values {labels.unique().tolist()}")
    gN = GlobalBatch(N, process_group, common_1.device).total if process_group is not None else N
    if gN < 2:
        raise ValueError(f"sepclr_loss needs at least 2 rows for its uniformity terms, got heads of shape "
                         f"{shape_str(common_1)}")
    tau = as_scalar("tau", tau, common_1, positive=True)
    w = [_check_weight(nm, v) for nm, v in (("salient_term_beta", salient_term_beta),
                                            ("salient_reg_beta", salient_reg_beta), ("jem_lambda", jem_lambda))]
    name = backends.resolve(backend, op="sepclr_loss", tensors=[common_1])
    return _sepclr(common_1, common_2, salient_1, salient_2, labels, tau, *w, name, process_group, common_1.dtype)
