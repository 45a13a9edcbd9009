"""The unit tier: small tensors, one intra-op thread per test.

Two OpenMP threads wait for each other at every op; on a busy 2-core machine (the suite's own services, other work)
that waiting burned 7x the CPU of one thread in a tiny training run (47.6 s against 6.4 s; 58 s against 9 s of wall
time), and on an idle one the small ops of these tests gain nothing from a second thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
