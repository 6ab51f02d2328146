"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def two_threads():
    """Two torch threads for the test (what the suite's machines have), restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
