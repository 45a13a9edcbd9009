"""Collectives on the training device (laren/train/collectives.py).

A real 2-worker run records the device of every collective's tensor (tests/integration/test_collectives_two_workers.py);
on CPU the training device is the CPU too, so that run alone could not see a collective tensor made on the host.
This test therefore runs each collective with ``meta`` as the "training device" (no real collective: the recorder
stops the call after noting its tensor), which a host-made tensor would fail; and a CPU tensor on a ``meta`` run is
refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from laren.train import collectives as C

TENSOR_OPS = ("all_reduce", "broadcast")
OBJECT_OPS = ("all_gather_object", "broadcast_object_list")


class _Stop(Exception):
    pass


@pytest.fixture
def fake_group(monkeypatch):
    """A 2-rank process group that records each collective's tensor device and stops the call."""
    seen: list[tuple[str, str]] = []

    def recorder(name):
        def op(t, *a, **kw):
            seen.append((name, str(t.device)))
            raise _Stop

        return op

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    for name in TENSOR_OPS:
        monkeypatch.setattr(dist, name, recorder(name))
    return seen


def test_every_collective_tensor_is_made_on_the_training_device(fake_group):
    meta = torch.device("meta")
    lin = torch.nn.Linear(3, 2).to(meta)
    lin.weight.grad = torch.zeros_like(lin.weight)  # the bias has no grad: its zeros must be made on the device too
    for call in (lambda: C.allreduce_mean_grads(list(lin.parameters()), meta), lambda: C.broadcast_module(lin, meta),
                 lambda: C.sum_across([1.0, 2.0], meta)):
        with pytest.raises(_Stop):
            call()
    assert fake_group == [("all_reduce", "meta"), ("broadcast", "meta"), ("all_reduce", "meta")]
    with pytest.raises(RuntimeError, match="training device is meta"):
        C.broadcast_module(torch.nn.Linear(3, 2), meta)  # parameters on the CPU of a run on another device


def test_no_process_group_no_collective():
    assert not C.active()
    assert C.sum_across([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    assert C.gather_objects({"a": 1}, torch.device("cpu")) == [{"a": 1}]
    assert C.broadcast_object([3], torch.device("cpu")) == [3]
