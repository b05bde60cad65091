"""Shared test set-up: the project root on sys.path and one torch thread for every test.

The tests use tiny models; on a shared 2-core machine two intra-op threads ran them 3-30x slower than one
(the same reason train.py defaults to --threads 1).
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
