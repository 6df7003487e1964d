"""Test configuration.

Triton's interpreter must be switched on before ``import triton``: without a
GPU the Triton kernels run on CPU tensors under ``TRITON_INTERPRET=1``.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from helpers import kernel_backends  # noqa: E402


def pytest_report_header(config):
    import contrastive_ops as co

    lines = [f"contrastive_ops backends: {co.available_backends()}"]
    lines.append(f"kernel backends under test: {kernel_backends()}")
    return lines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
