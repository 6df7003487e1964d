"""Gradient-carrying gathers for global-batch losses under torch.distributed."""
from __future__ import annotations
