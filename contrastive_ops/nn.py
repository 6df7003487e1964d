"""``torch.nn.Module`` wrappers of the functional losses.

Constructors take the hyperparameters (the keyword arguments of the function,
``backend`` included) plus ``gather_distributed=False``; ``forward`` takes the
tensors.  ``gather_distributed=True`` passes the default process group
(``torch.distributed.group.WORLD``) to the function, which then computes the
loss of this rank's anchors against the global batch.

``MemoryBank`` is a FIFO queue of detached features (and labels) kept as
buffers; ``InfoNCELoss``, ``NTXentLoss`` and ``SupConLoss`` own one when
built with ``memory_size > 0`` and pass it to the function as ``queue``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _checks
from . import distributed as _dist
from ._numerics import acc_dtype
from .losses.cacr import cacr_loss
from .losses.decoupled import dcl_loss, dhel_loss
from .losses.hydra import hydra_loss
from .losses.info_nce import clip_loss, info_nce, nt_xent
from .losses.multiview import mv_dhel, mv_infonce
from .losses.pixpro import pixcontrast_loss, pixpro_loss
from .losses.point_token import point_token_contrast
from .losses.selfcon import selfcon_loss
from .losses.sepclr import sepclr_loss
from .losses.siglip import siglip_loss
from .losses.supcon import supcon_loss
from .losses.supremix import supremix_loss
from .losses.swav import sinkhorn_knopp, swav_loss

__all__ = [
    "MemoryBank",
    "InfoNCELoss",
    "ClipLoss",
    "SigLIPLoss",
    "NTXentLoss",
    "DCLLoss",
    "DHELLoss",
    "MVInfoNCELoss",
    "MVDHELLoss",
    "SupConLoss",
    "SwAVLoss",
    "SinkhornKnopp",
    "PointTokenContrastLoss",
    "SelfConLoss",
    "SupReMixLoss",
    "SepCLRLoss",
    "CACRLoss",
    "PixProLoss",
    "PixContrastLoss",
    "HydraLoss",
]


def _group(gather_distributed: bool):
    if not gather_distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_distributed=True needs torch.distributed to be initialized")
    return dist.group.WORLD


class MemoryBank(torch.nn.Module):
    """A FIFO queue of ``size`` detached (``dim``,) features, and integer labels with ``with_labels``.

    A ring buffer kept as module buffers (``memory``, ``memory_labels``,
    ``head``, ``filled``: saved in ``state_dict``, moved by ``.to()``).
    ``enqueue(x)`` stores the rows of ``x`` as if one at a time, in order (row
    0 first), and drops the oldest entries once ``size`` are filled (a batch
    larger than ``size`` leaves its last ``size`` rows), as MoCo's and
    pytorch-metric-learning's ring buffers do.  ``features`` lists the entries
    newest first: after ``enqueue(x)`` it is ``cat([x.flip(0), features])[:size]``.
    ``len(bank)`` is the number of filled entries.

    Under a ``process_group`` every rank's batch is all-gathered first, in rank
    order, so the bank is identical on every rank (pass it to a loss as an
    ungathered ``queue``).  Features are stored in ``dtype`` (on the bank's
    device); a loss needs them in its features' dtype: ``bank.features.to(x.dtype)``.
    """

    def __init__(self, size: int, dim: int, *, with_labels: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.size, self.dim, self.with_labels = size, dim, bool(with_labels)
        self.register_buffer("memory", torch.zeros(size, dim, dtype=dtype))
        self.register_buffer("memory_labels", torch.zeros(size, dtype=torch.long) if with_labels else None)
        # ring position of the newest entry (entries run from there, wrapping) and the count filled
        self.register_buffer("head", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def __len__(self) -> int:
        return int(self.filled)

    def _order(self) -> torch.Tensor:
        """Ring positions of the filled entries, newest first."""
        return (self.head + torch.arange(len(self), device=self.memory.device)) % self.size

    @property
    def features(self) -> torch.Tensor:
        """The filled entries (len(bank), dim), newest first (a copy)."""
        return self.memory.index_select(0, self._order())

    @property
    def labels(self) -> Optional[torch.Tensor]:
        """Their labels (len(bank),) int64, newest first; None for a bank without labels."""
        if self.memory_labels is None:
            return None
        return self.memory_labels.index_select(0, self._order())

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: Optional[torch.Tensor] = None, process_group=None) -> None:
        """Store ``features`` (n, dim) detached, with ``labels`` (n,) when the bank keeps labels."""
        _checks.check_features("features", features)
        if features.shape[1] != self.dim:
            raise ValueError(f"features must have shape (n, {self.dim}) for this bank, got "
                             f"{_checks.shape_str(features)}")
        if features.device != self.memory.device:
            raise ValueError(f"features is on {features.device} but the bank is on {self.memory.device} "
                             f"(move the bank with .to())")
        if self.with_labels:
            if labels is None:
                raise ValueError("labels is required: this bank was built with with_labels=True")
            _checks.check_labels("labels", labels, features.shape[0], features.device)
        elif labels is not None:
            raise ValueError(f"labels (shape {_checks.shape_str(labels)}) given to a bank built with "
                             f"with_labels=False")
        if process_group is not None:
            _dist.check_group(process_group)
            sizes = _dist.gather_sizes(features.shape[0], process_group, features.device)
            features = _dist.all_gather_nograd(features.detach(), process_group, sizes)
            if labels is not None:
                labels = _dist.all_gather_nograd(labels, process_group, sizes)
        n = min(features.shape[0], self.size)
        # Reading runs from the new head forward, newest first: the last row goes to the new head.
        pos = (self.head - n + torch.arange(n, device=self.memory.device)) % self.size
        self.memory.index_copy_(0, pos, features[-n:].detach().flip(0).to(self.memory.dtype))
        if labels is not None:
            self.memory_labels.index_copy_(0, pos, labels[-n:].flip(0).long())
        self.head.copy_((self.head - n) % self.size)
        self.filled.copy_((self.filled + n).clamp_max(self.size))

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, with_labels={self.with_labels}, dtype={self.memory.dtype}, "
                f"filled={len(self)}")


def _check_memory_size(memory_size) -> int:
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 0:
        raise ValueError(f"memory_size must be an integer >= 0, got {memory_size!r}")
    return memory_size


class _LossModule(torch.nn.Module):
    """Stores keyword hyperparameters and forwards them to ``_fn``."""

    _fn = None

    def __init__(self, *, gather_distributed: bool = False, **kwargs):
        super().__init__()
        self.gather_distributed = bool(gather_distributed)
        if "exchange" in kwargs:  # "gather" | "ring" (SPEC "Scale-out"); checked when the module is built
            _dist.check_exchange(kwargs["exchange"])
        self.kwargs = kwargs

    def _call(self, *tensors):
        return type(self)._fn(*tensors, process_group=_group(self.gather_distributed), **self.kwargs)

    def extra_repr(self) -> str:
        items = dict(self.kwargs, gather_distributed=self.gather_distributed)
        if getattr(self, "memory_size", 0):
            items["memory_size"] = self.memory_size
        return ", ".join(f"{k}={v!r}" for k, v in items.items())


class _MemoryLossModule(_LossModule):
    """A loss module that may own a ``MemoryBank`` of ``memory_size`` entries (``memory_size=0``: none).

    The bank (``self.memory``) is created at the first forward, when the
    feature width is known, on the features' device and in their accumulation
    dtype (fp32; float64 for float64 features); loading a ``state_dict`` that
    holds one creates it first.
    """

    def _init_memory(self, memory_size) -> None:
        self.memory_size = _check_memory_size(memory_size)
        self.register_module("memory", None)

    def _queue(self, like: torch.Tensor, with_labels: bool):
        """(queue, queue_labels) to pass to the function: the bank's contents in ``like``'s dtype."""
        if self.memory is None:
            q = like.new_zeros((0, like.shape[-1]))
            return q, (torch.zeros(0, dtype=torch.long, device=like.device) if with_labels else None)
        return self.memory.features.to(like.dtype), self.memory.labels

    def _enqueue(self, views, labels: Optional[torch.Tensor], process_group) -> None:
        """Enqueue each (n, D) tensor of ``views`` in turn (with ``labels`` each): view by view, so that under a
        process group the memory holds the same rows in the same order as one process fed the global batch."""
        if self.memory is None:
            self.memory = MemoryBank(self.memory_size, views[0].shape[-1], with_labels=labels is not None,
                                     dtype=acc_dtype(views[0].dtype)).to(views[0].device)
        for v in views:
            self.memory.enqueue(v, labels, process_group=process_group)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "memory.memory"
        if self.memory_size and key in state_dict:
            if self.memory is None:
                saved = state_dict[key]
                self.memory = MemoryBank(self.memory_size, saved.shape[-1],
                                         with_labels=prefix + "memory.memory_labels" in state_dict,
                                         dtype=saved.dtype).to(saved.device)
        elif self.memory is not None:  # saved before any forward: an empty memory
            self.memory = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class InfoNCELoss(_MemoryLossModule):
    """``info_nce`` as a module; ``learnable_temperature=True`` owns ``log_temperature``.

    ``memory_size=K > 0``: a ``MemoryBank`` of the last K keys is every query's
    extra negatives (``queue``); the keys are enqueued after the loss.  With
    ``in_batch_negatives=False`` this is MoCo v2 (the first step, with an
    empty memory, has only the positive in the denominator: loss 0).
    """

    _fn = staticmethod(info_nce)

    def __init__(self, temperature: float = 0.07, *, symmetric: bool = False, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", learnable_temperature: bool = False,
                 gather_distributed: bool = False, in_batch_negatives: bool = True, memory_size: int = 0,
                 hard_negative_beta: float = 0.0, debias_tau_plus: float = 0.0,
                 false_negative_margin: Optional[float] = None, exchange: str = "gather"):
        super().__init__(symmetric=symmetric, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, in_batch_negatives=in_batch_negatives,
                         hard_negative_beta=hard_negative_beta, debias_tau_plus=debias_tau_plus,
                         false_negative_margin=false_negative_margin, exchange=exchange)
        self._init_memory(memory_size)
        if not in_batch_negatives and not memory_size:
            raise ValueError("in_batch_negatives=False needs negatives from a memory: set memory_size > 0")
        if memory_size and symmetric:
            raise ValueError(f"memory_size={memory_size} adds negatives to the query rows only and cannot be "
                             f"used with symmetric=True")
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(float(temperature))))
        else:
            self.temperature = float(temperature)

    def forward(self, query, key, targets=None):
        t = self.log_temperature.exp() if self.learnable_temperature else self.temperature
        group = _group(self.gather_distributed)
        queue = self._queue(key, False)[0] if self.memory_size else None
        loss = info_nce(query, key, t, targets=targets, process_group=group, queue=queue, **self.kwargs)
        if self.memory_size:
            self._enqueue([key], None, group)
        return loss


class ClipLoss(_LossModule):
    _fn = staticmethod(clip_loss)

    def __init__(self, *, backend: str = "auto", gather_distributed: bool = False, exchange: str = "gather"):
        super().__init__(backend=backend, gather_distributed=gather_distributed, exchange=exchange)

    def forward(self, image_features, text_features, logit_scale):
        return self._call(image_features, text_features, logit_scale)


class SigLIPLoss(_LossModule):
    _fn = staticmethod(siglip_loss)

    def __init__(self, *, backend: str = "auto", gather_distributed: bool = False, exchange: str = "gather"):
        super().__init__(backend=backend, gather_distributed=gather_distributed, exchange=exchange)

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        return self._call(image_features, text_features, logit_scale, logit_bias)


class NTXentLoss(_MemoryLossModule):
    """``nt_xent`` as a module; ``memory_size=K > 0`` adds the last K embeddings of both views as negatives."""

    _fn = staticmethod(nt_xent)

    def __init__(self, temperature: float = 0.5, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False, memory_size: int = 0,
                 hard_negative_beta: float = 0.0, debias_tau_plus: float = 0.0,
                 false_negative_margin: Optional[float] = None, exchange: str = "gather"):
        super().__init__(temperature=temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, hard_negative_beta=hard_negative_beta,
                         debias_tau_plus=debias_tau_plus, false_negative_margin=false_negative_margin,
                         exchange=exchange)
        self._init_memory(memory_size)

    def forward(self, z1, z2):
        if not self.memory_size:
            return self._call(z1, z2)
        group = _group(self.gather_distributed)
        loss = nt_xent(z1, z2, queue=self._queue(z1, False)[0], process_group=group, **self.kwargs)
        self._enqueue([z1, z2], None, group)
        return loss


class DCLLoss(_LossModule):
    _fn = staticmethod(dcl_loss)

    def __init__(self, temperature: float = 0.1, *, weighted: bool = False, sigma: float = 0.5,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False, exchange: str = "gather"):
        super().__init__(temperature=temperature, weighted=weighted, sigma=sigma, normalize=normalize,
                         reduction=reduction, backend=backend, gather_distributed=gather_distributed,
                         exchange=exchange)

    def forward(self, z1, z2):
        return self._call(z1, z2)


class DHELLoss(_LossModule):
    _fn = staticmethod(dhel_loss)

    def __init__(self, temperature: float = 0.3, *, include_augs: bool = True, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                 exchange: str = "gather"):
        super().__init__(temperature=temperature, include_augs=include_augs, normalize=normalize,
                         reduction=reduction, backend=backend, gather_distributed=gather_distributed,
                         exchange=exchange)

    def forward(self, z1, z2):
        return self._call(z1, z2)


class MVInfoNCELoss(_LossModule):
    _fn = staticmethod(mv_infonce)

    def __init__(self, temperature: float = 0.1, *, variant: str = "mv", normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False,
                 exchange: str = "gather"):
        super().__init__(temperature=temperature, variant=variant, normalize=normalize, reduction=reduction,
                         backend=backend, gather_distributed=gather_distributed, exchange=exchange)

    def forward(self, features, mask: Optional[torch.Tensor] = None):
        return type(self)._fn(features, mask=mask, process_group=_group(self.gather_distributed), **self.kwargs)


class MVDHELLoss(_LossModule):
    _fn = staticmethod(mv_dhel)

    def __init__(self, temperature: float = 0.2, *, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False, exchange: str = "gather"):
        super().__init__(temperature=temperature, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, exchange=exchange)

    def forward(self, features, mask: Optional[torch.Tensor] = None):
        return type(self)._fn(features, mask=mask, process_group=_group(self.gather_distributed), **self.kwargs)


class SupConLoss(_MemoryLossModule):
    """``supcon_loss`` as a module.

    ``memory_size=K > 0``: a ``MemoryBank`` of the last K features (all views,
    view-major) and their labels joins the contrast set (``queue``,
    ``queue_labels``): with labels, entries of the anchor's class are positives
    (pytorch-metric-learning ``CrossBatchMemory(SupConLoss)`` with a memory of
    K plus the batch); without labels, negatives only.
    """

    _fn = staticmethod(supcon_loss)

    def __init__(self, temperature: float = 0.07, *, base_temperature: float = 0.07, contrast_mode: str = "all",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False, memory_size: int = 0, exchange: str = "gather"):
        super().__init__(temperature=temperature, base_temperature=base_temperature, contrast_mode=contrast_mode,
                         normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed, exchange=exchange)
        self._init_memory(memory_size)

    def forward(self, features, labels: Optional[torch.Tensor] = None):
        if not self.memory_size:
            return self._call(features, labels)
        group = _group(self.gather_distributed)
        views = _checks.check_views("features", features, min_views=1, allow_single=True)  # (V, N, D)
        if self.memory is not None and self.memory.with_labels != (labels is not None):
            raise ValueError(f"labels must be {'given' if self.memory.with_labels else 'None'} on every call: "
                             f"the memory was filled {'with' if self.memory.with_labels else 'without'} labels")
        queue, queue_labels = self._queue(views, labels is not None)
        loss = supcon_loss(features, labels, queue=queue, queue_labels=queue_labels, process_group=group,
                           **self.kwargs)
        self._enqueue(views.unbind(0), labels, group)
        return loss


class SelfConLoss(_LossModule):
    """``selfcon_loss`` as a module: ``forward(features, labels=None)``, features (N, V, D) backbone last."""

    _fn = staticmethod(selfcon_loss)

    def __init__(self, temperature: float = 0.07, *, base_temperature: float = 0.07, alpha: float = 0.0,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, base_temperature=base_temperature, alpha=alpha,
                         normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, features, labels: Optional[torch.Tensor] = None):
        return self._call(features, labels)


class SupReMixLoss(_LossModule):
    """``supremix_loss`` as a module: ``forward(features, labels, mix_lambda=None)``."""

    _fn = staticmethod(supremix_loss)

    def __init__(self, temperature: float = 0.5, *, base_temperature: Optional[float] = None, window: float = 5,
                 beta=(2.0, 8.0), mix_neg: bool = True, mix_pos: bool = True, use_weight: bool = True,
                 distance: str = "L1_inv", normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, base_temperature=base_temperature, window=window,
                         beta=tuple(beta), mix_neg=mix_neg, mix_pos=mix_pos, use_weight=use_weight,
                         distance=distance, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, features, labels: torch.Tensor, mix_lambda=None):
        return type(self)._fn(features, labels, mix_lambda=mix_lambda, process_group=_group(self.gather_distributed),
                              **self.kwargs)


class SwAVLoss(_LossModule):
    _fn = staticmethod(swav_loss)

    def __init__(self, temperature: float = 0.1, *, crops_for_assign=(0, 1), epsilon: float = 0.05,
                 iterations: int = 3, backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, crops_for_assign=tuple(crops_for_assign), epsilon=epsilon,
                         iterations=iterations, backend=backend, gather_distributed=gather_distributed)

    def forward(self, scores):
        return self._call(scores)


class SinkhornKnopp(_LossModule):
    _fn = staticmethod(sinkhorn_knopp)

    def __init__(self, epsilon: float = 0.05, iterations: int = 3, *, backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(epsilon=epsilon, iterations=iterations, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, scores):
        return self._call(scores)


class PointTokenContrastLoss(_LossModule):
    _fn = staticmethod(point_token_contrast)

    def __init__(self, *, mode: str = "infonce", temperature: float = 0.1, pairing: str = "diag",
                 negatives: str = "cloud", backend: str = "auto", gather_distributed: bool = False,
                 exchange: str = "gather"):
        super().__init__(mode=mode, temperature=temperature, pairing=pairing, negatives=negatives,
                         backend=backend, gather_distributed=gather_distributed, exchange=exchange)

    def forward(self, f1, f2, mask1, mask2):
        return self._call(f1, f2, mask1, mask2)


class SepCLRLoss(_LossModule):
    """``sepclr_loss`` as a module: ``forward(common_1, common_2, salient_1, salient_2, labels)``."""

    _fn = staticmethod(sepclr_loss)

    def __init__(self, tau: float = 0.5, *, salient_term_beta: float = 1000.0, salient_reg_beta: float = 1000.0,
                 jem_lambda: float = 10.0, backend: str = "auto", gather_distributed: bool = False):
        super().__init__(tau=tau, salient_term_beta=salient_term_beta, salient_reg_beta=salient_reg_beta,
                         jem_lambda=jem_lambda, backend=backend, gather_distributed=gather_distributed)

    def forward(self, common_1, common_2, salient_1, salient_2, labels):
        return self._call(common_1, common_2, salient_1, salient_2, labels)


class CACRLoss(_LossModule):
    """``cacr_loss`` as a module: ``forward(features)``, (N, V, D) or a sequence of V (N, D) tensors."""

    _fn = staticmethod(cacr_loss)

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, tau_pos: float = 1.0, tau_neg: float = 1.0, *,
                 choice: str = "full", with_debiased: bool = False, tau_plus: float = 0.1, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False):
        super().__init__(alpha=alpha, beta=beta, tau_pos=tau_pos, tau_neg=tau_neg, choice=choice,
                         with_debiased=with_debiased, tau_plus=tau_plus, normalize=normalize, reduction=reduction,
                         backend=backend, gather_distributed=gather_distributed)

    def forward(self, features):
        return self._call(features)
class PixProLoss(_LossModule):
    """``pixpro_loss`` as a module: ``forward(pred_1, pred_2, proj_1_ng, proj_2_ng, coord1, coord2)``."""

    _fn = staticmethod(pixpro_loss)

    def __init__(self, *, pos_ratio: float = 0.7, normalize: bool = True, reduction: str = "mean",
                 backend: str = "auto", gather_distributed: bool = False):
        super().__init__(pos_ratio=pos_ratio, normalize=normalize, reduction=reduction, backend=backend,
                         gather_distributed=gather_distributed)

    def forward(self, pred_1, pred_2, proj_1_ng, proj_2_ng, coord1, coord2):
        return self._call(pred_1, pred_2, proj_1_ng, proj_2_ng, coord1, coord2)


class PixContrastLoss(_LossModule):
    """``pixcontrast_loss`` as a module: ``forward(proj_1, proj_2, proj_1_ng, proj_2_ng, coord1, coord2)``."""

    _fn = staticmethod(pixcontrast_loss)

    def __init__(self, temperature: float = 0.3, *, pos_ratio: float = 0.7, negatives: str = "image",
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather_distributed: bool = False):
        super().__init__(temperature=temperature, pos_ratio=pos_ratio, negatives=negatives, normalize=normalize,
                         reduction=reduction, backend=backend, gather_distributed=gather_distributed)

    def forward(self, proj_1, proj_2, proj_1_ng, proj_2_ng, coord1, coord2):
        return self._call(proj_1, proj_2, proj_1_ng, proj_2_ng, coord1, coord2)
class HydraLoss(_LossModule):
    """``hydra_loss`` as a module: ``forward(z1, k2, gate, y1, posy)``; the gate network stays in the model."""

    _fn = staticmethod(hydra_loss)

    def __init__(self, temperature: float = 0.1, *, positives: str = "c2", gating: str = "filter",
                 reduction: str = "mean", backend: str = "auto", gather_distributed: bool = False):
        super().__init__(temperature=temperature, positives=positives, gating=gating, reduction=reduction,
                         backend=backend, gather_distributed=gather_distributed)

    def forward(self, z1, k2, gate, y1, posy):
        return self._call(z1, k2, gate, y1, posy)
