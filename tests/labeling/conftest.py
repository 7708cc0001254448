"""Fixtures of the labelling tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for the module: on a busy 2-core machine two OpenMP threads wait on
    each other (measured: the SAM training fixture took 682 s with 2 threads, 40 s with 1)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
