"""Gradient caching: the batch a loss sees is no longer bounded by the encoder's activation memory.

``GradCache(models, loss_fn, chunk_size=c).cache(*inputs, **loss_kwargs)``
does one training step's forward and backward in three passes (Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"; luyug/GradCache)::

    (1) for each input, for each chunk x_c of ``c`` rows, in order:
            save the CPU and CUDA RNG states R_c
            e_c = model(x_c)                      under torch.no_grad()
    (2) E = cat_c(e_c), a leaf that requires grad
            L = loss_fn(*E_inputs, **loss_kwargs);  L.backward()
        → G = dL/dE (cached), and the gradients of whatever else L depends on
          (a learnable temperature or logit scale the loss owns)
    (3) for each input, for each chunk, in the same order:
            restore R_c;  e_c = model(x_c) with grad;  e_c.backward(G_c)

Why it is exact: L depends on the encoder's parameters θ only through E, so
dL/dθ = Σ_c (∂e_c/∂θ)ᵀ G_c — the sum over chunks of vector-Jacobian products,
which is what step (3) accumulates into ``θ.grad``. Step (3) recomputes
e_c exactly as step (1) did because the inputs, the parameters, the RNG state
(dropout masks) and the module buffers (reset to their state before step (1))
are the same. Peak activation memory is one chunk's graph; the loss sees the
whole batch.

Under DistributedDataParallel each model's chunks except its last run forward
and backward inside ``model.no_sync()``: the gradients accumulate locally and
are all-reduced once, by the last backward.
"""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["GradCache"]

_Input = Union[torch.Tensor, Mapping, tuple, list]


class _RNGState:
    """The CPU generator's state and the states of the given CUDA devices' generators."""

    def __init__(self, cuda_devices: Sequence[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, state in self.cuda:
            torch.cuda.set_rng_state(state, d)


def _tensors_of(x: _Input) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Mapping):
        return list(x.values())
    return list(x)


def _cuda_devices(inputs: Sequence[_Input], models: Sequence[nn.Module]) -> List[int]:
    """CUDA devices whose generators a forward may draw from: those of the inputs, the models'
    parameters and buffers, and the current device (when CUDA is already initialized)."""
    if not torch.cuda.is_available():
        return []
    found = set()
    for x in inputs:
        found.update(t.device.index for t in _tensors_of(x) if t.is_cuda)
    for m in models:
        found.update(t.device.index for t in m.parameters() if t.is_cuda)
        found.update(t.device.index for t in m.buffers() if t.is_cuda)
    if found or torch.cuda.is_initialized():
        found.add(torch.cuda.current_device())
    return sorted(found)


def _check_input(x: Any, i: int) -> int:
    """The number of rows of input ``i`` (a tensor, or a dict / tuple / list of tensors of equal length)."""
    what = f"inputs[{i}]"
    if isinstance(x, torch.Tensor):
        items: List[Tuple[str, Any]] = [(what, x)]
    elif isinstance(x, Mapping):
        items = [(f"{what}[{k!r}]", v) for k, v in x.items()]
    elif isinstance(x, (tuple, list)):
        items = [(f"{what}[{j}]", v) for j, v in enumerate(x)]
    else:
        raise TypeError(f"GradCache: {what} must be a tensor or a dict/tuple of tensors, got {type(x).__name__}")
    if not items:
        raise ValueError(f"GradCache: {what} is empty: it needs at least one tensor")
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"GradCache: {name} must be a tensor (inputs are split along dim 0), "
                            f"got {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"GradCache: {name} is 0-dim: inputs are split along dim 0")
    lengths = {name: t.shape[0] for name, t in items}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"GradCache: the tensors of {what} are split along dim 0 together and must have "
                         f"the same length, got {lengths}")
    n = items[0][1].shape[0]
    if n == 0:
        raise ValueError(f"GradCache: {what} has no rows")
    return n


def _chunk(x: _Input, start: int, stop: int) -> _Input:
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return type(x)(v[start:stop] for v in x) if isinstance(x, list) else tuple(v[start:stop] for v in x)


def _call(model: nn.Module, x: _Input, what: str) -> torch.Tensor:
    """``model(x)`` for a tensor, ``model(**x)`` for a dict, ``model(*x)`` for a tuple or list."""
    if isinstance(x, torch.Tensor):
        out = model(x)
    elif isinstance(x, Mapping):
        out = model(**x)
    else:
        out = model(*x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"GradCache: the model of {what} must return a tensor of embeddings, got "
                        f"{type(out).__name__}; wrap it in a module that returns the embedding tensor")
    if out.dim() == 0:
        raise ValueError(f"GradCache: the model of {what} returned a 0-dim tensor: embeddings have one row "
                         "per input row")
    return out


class GradCache:
    """One contrastive training step with gradient caching (see the module docstring for the maths).

    Args:
        models: one ``nn.Module`` shared by every input, or a sequence with one module per input
            (a module may appear more than once). DDP-wrapped modules are supported.
        loss_fn: ``loss_fn(*embeddings, **loss_kwargs)`` → a 0-dim loss tensor. ``embeddings[i]``
            is the concatenation, in row order, of the model's outputs on the chunks of input ``i``.
        chunk_size: rows per forward pass (a positive int); the last chunk may be shorter.

    ``cache(*inputs, **loss_kwargs)`` (also ``gc(*inputs, ...)``) runs the step: the parameters'
    ``.grad`` (and those of anything ``loss_fn`` owns) accumulate the gradient of the loss, as
    ``loss.backward()`` would; it returns the loss, detached, 0-dim. Each input is a tensor (the
    model is called as ``model(x)``), a dict of tensors (``model(**x)``) or a tuple/list of
    tensors (``model(*x)``), split along dim 0 together. Different inputs may have different
    lengths (e.g. B queries and 2B keys with hard negatives).

    The gradients equal those of the plain step that forwards the same chunks in order with grad
    and backpropagates ``loss_fn`` of the concatenated embeddings once: the RNG states (CPU and
    CUDA) are restored per chunk so dropout draws the same masks twice, and module buffers
    (BatchNorm running statistics) are reset before the second pass so they are updated once
    per chunk, as in the plain step. BatchNorm normalizes each chunk with its own statistics,
    as the plain chunked step does.

    Under DDP, every chunk of a model except its last runs forward and backward inside
    ``model.no_sync()``, so gradients are all-reduced once per step. DDP synchronizes buffers on
    every forward: with buffers and ``broadcast_buffers=True`` all ranks must run the same number
    of chunks. A parameter that ``loss_fn`` owns (a logit scale) is outside every DDP module:
    average its gradient over the ranks yourself. ``process_group`` losses work unchanged.
    """

    def __init__(self, models: Union[nn.Module, Sequence[nn.Module]], loss_fn: Callable[..., torch.Tensor], *,
                 chunk_size: int):
        if isinstance(models, nn.Module):
            self.models: Optional[Tuple[nn.Module, ...]] = None
            self.model: Optional[nn.Module] = models
        elif isinstance(models, (list, tuple)) and models and all(isinstance(m, nn.Module) for m in models):
            self.models, self.model = tuple(models), None
        else:
            raise ValueError("GradCache: models must be an nn.Module or a non-empty sequence of nn.Modules "
                             f"(one per input), got {type(models).__name__}")
        if not callable(loss_fn):
            raise ValueError(f"GradCache: loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"GradCache: chunk_size must be a positive int, got {chunk_size!r}")
        self.loss_fn = loss_fn
        self.chunk_size = int(chunk_size)

    def __call__(self, *inputs: _Input, **loss_kwargs: Any) -> torch.Tensor:
        return self.cache(*inputs, **loss_kwargs)

    def _models_for(self, n_inputs: int) -> List[nn.Module]:
        if self.models is None:
            return [self.model] * n_inputs
        if len(self.models) != n_inputs:
            raise ValueError(f"GradCache: models has {len(self.models)} modules but cache() got {n_inputs} "
                             "inputs: pass one module per input, or a single module shared by every input")
        return list(self.models)

    def cache(self, *inputs: _Input, **loss_kwargs: Any) -> torch.Tensor:
        if not inputs:
            raise ValueError("GradCache: cache() needs at least one input")
        models = self._models_for(len(inputs))
        lengths = [_check_input(x, i) for i, x in enumerate(inputs)]
        c = self.chunk_size
        # (input index, start, stop) in the order of the forward passes.
        chunks = [(i, s, min(s + c, n)) for i, n in enumerate(lengths) for s in range(0, n, c)]
        # The last chunk of each distinct model is the one whose backward synchronizes under DDP.
        last = {}
        for k, (i, _, _) in enumerate(chunks):
            last[id(models[i])] = k
        distinct = list({id(m): m for m in models}.values())
        cuda_devices = _cuda_devices(inputs, distinct)
        buffers = [b for m in distinct for b in m.buffers()]
        with torch.no_grad():
            saved_buffers = [b.clone() for b in buffers]

        # (1) forward every chunk without a graph, remembering the RNG state it started from.
        states: List[_RNGState] = []
        outputs: List[List[torch.Tensor]] = [[] for _ in inputs]
        with torch.no_grad():
            for i, s, e in chunks:
                states.append(_RNGState(cuda_devices))
                outputs[i].append(_call(models[i], _chunk(inputs[i], s, e), f"inputs[{i}]"))

        # (2) the loss on the whole batch, with the embeddings as leaves.
        embeddings = []
        for i, outs in enumerate(outputs):
            try:
                emb = torch.cat(outs)
            except RuntimeError as err:
                raise ValueError(f"GradCache: the model's outputs on the chunks of inputs[{i}] cannot be "
                                 f"concatenated along dim 0 ({[tuple(o.shape) for o in outs]}): {err}") from err
            if emb.shape[0] != lengths[i]:
                raise ValueError(f"GradCache: the model of inputs[{i}] returned {emb.shape[0]} rows for "
                                 f"{lengths[i]} input rows; embeddings need one row per input row")
            embeddings.append(emb.detach().requires_grad_(emb.is_floating_point() or emb.is_complex()))
        del outputs
        with torch.enable_grad():
            loss = self.loss_fn(*embeddings, **loss_kwargs)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise ValueError(f"GradCache: loss_fn must return a 0-dim tensor (a scalar loss), got {got}")
            if not loss.requires_grad:
                raise ValueError("GradCache: loss_fn's result does not require grad: it must be computed from "
                                 "the embeddings it is given")
            loss.backward()
        grads = [e.grad if e.grad is not None else torch.zeros_like(e) for e in embeddings]
        del embeddings
        after_loss = _RNGState(cuda_devices)

        # (3) forward each chunk again with a graph, from the same RNG state and buffers, and backpropagate
        # its cached gradient.
        with torch.no_grad():
            for b, v in zip(buffers, saved_buffers):
                b.copy_(v)
        try:
            with torch.enable_grad():
                for k, (i, s, e) in enumerate(chunks):
                    model = models[i]
                    sync = k == last[id(model)]
                    no_sync = getattr(model, "no_sync", None)
                    ctx = contextlib.nullcontext() if sync or no_sync is None else no_sync()
                    with ctx:
                        states[k].restore()
                        out = _call(model, _chunk(inputs[i], s, e), f"inputs[{i}]")
                        grad = grads[i][s:e]
                        if out.shape != grad.shape:
                            raise RuntimeError(f"GradCache: the model of inputs[{i}] returned shape "
                                               f"{tuple(out.shape)} on rows {s}:{e} in the second pass and "
                                               f"{tuple(grad.shape)} in the first")
                        if out.requires_grad:
                            out.backward(grad)
        finally:
            # Leave the generators where the plain step would: after every chunk's forward and the loss.
            after_loss.restore()
        return loss.detach()
