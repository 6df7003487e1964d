"""Command line: ``python -m contrastive_ops`` and ``python -m contrastive_ops bench --out DIR``."""
from __future__ import annotations


def main(argv=None) -> int:
    raise NotImplementedError
