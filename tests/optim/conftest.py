"""The optimizer tests use tiny tensors: one intra-op thread is faster and, on a busy machine, far
more predictable than several (thread hand-off dominates ops of a few dozen elements)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
