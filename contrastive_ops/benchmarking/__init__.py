"""Benchmarking and self-checking of contrastive_ops.

* ``cases``: input generators, FLOP counts and the implementations of every
  loss: the one module that the command line and ``benchmarks/`` share.
* ``peers``: adapters from a case's inputs to other libraries' losses.
* ``measure``: timing, peak memory, progress bar.
* ``selfcheck``: every loss on every kernel backend against the reference.
* ``sweep``: the loss × implementation × batch-size sweep and its JSON.
* ``charts``: PNG charts from the JSON.
* ``envinfo``: versions, device, extension build.

Used by ``python -m contrastive_ops`` (see ``contrastive_ops.cli``).
"""
from .cases import CASES, Impl, Inputs, LossCase, implementations  # noqa: F401
