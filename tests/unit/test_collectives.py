"""Collectives on the training device (laren/train/collectives.py).

Two tests. (1) A real 2-worker run (gloo, two processes, the plain-Python loop) and a 1-worker run with a process
group: every ``torch.distributed`` call is wrapped in a recorder that notes the device of the tensor it gets; none
may be off the training device, and the world-size-1 run must make the same kinds of calls. (2) On CPU the training
device is the CPU too, so (1) alone could not see a collective tensor made on the host. The unit test therefore
runs each collective with ``meta`` as the "training device" (no real collective: the recorder stops the call
after noting its tensor), which a host-made tensor would fail; and a CPU tensor on a ``meta`` run is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _recorded_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    from laren.config import RunConfig
    from laren.train.loop import WorkerContext, train_worker

    torch.set_num_threads(1)
    seen: list[list[str]] = []

    def wrap(name, fn, device_of):
        def op(*a, **kw):
            seen.append([name, device_of(*a, **kw)])
            return fn(*a, **kw)

        return op

    for name in TENSOR_OPS:
        setattr(dist, name, wrap(name, getattr(dist, name), lambda t, *a, **kw: str(t.device)))
    # Object collectives: the device torch stages the pickled bytes on (the given one, else the CPU under gloo).
    dist.all_gather_object = wrap("all_gather_object", dist.all_gather_object, lambda *a, **kw: "cpu")
    dist.broadcast_object_list = wrap("broadcast_object_list", dist.broadcast_object_list,
                                      lambda *a, device=None, **kw: str(device or "cpu"))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dev = torch.device("cpu")
        res = train_worker(RunConfig.model_validate(cfg_dict), WorkerContext(rank=rank, world_size=world, device=dev,
                                                                             run_id=f"w{world}", checkpoint_root=out + "/ck"))
        C.broadcast_object("resume choice", dev)
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}-of-{world}.json").write_text(json.dumps({"seen": seen, "device": str(dev), "result": res}))


@pytest.mark.slow
def test_two_worker_run_gives_collectives_only_training_device_tensors(tmp_path):
    import torch.multiprocessing as mp

    from laren.services import free_port
    from tests.unit.test_train_loop import make_tiny_dataset, tiny_config

    data = make_tiny_dataset(str(tmp_path / "shards"), tmp_path)
    cfg = tiny_config(data, f"sqlite:///{tmp_path}/mlflow.db", resources=dict(num_workers=2),
                      train=dict(total_kimg=0.016, log_every_kimg=0.004, eval_every_kimg=0.016, checkpoint_every_kimg=0.008))
    for world in (2, 1):
        mp.spawn(_recorded_worker, args=(world, free_port(), cfg.to_dict(), str(tmp_path)), nprocs=world, join=True)
    runs = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")}
    assert set(runs) == {"rank0-of-2", "rank1-of-2", "rank0-of-1"}
    for name, run in runs.items():
        ops = [op for op, _ in run["seen"]]
        assert {op for op, dev in run["seen"] if dev != run["device"]} == set(), name
        # broadcasts of both modules, sums at log and eval steps (the gradients: DDP's reducer, in C++, on the
        # parameters' device), RNG states and data positions at each checkpoint
        assert ops.count("all_reduce") >= 4 + 1 and ops.count("broadcast") > 10, name
        assert ops.count("all_gather_object") == 2 * 2 and ops.count("broadcast_object_list") == 1, name
    assert runs["rank0-of-2"]["seen"] == runs["rank1-of-2"]["seen"]  # same calls in the same order on every rank
    rate = ("mlflow_run_id", "perf/images_per_s", "perf/tflops_per_gpu")  # over each rank's own clock
    same = lambda r: {k: v for k, v in r["result"].items() if k not in rate}  # noqa: E731
    assert same(runs["rank0-of-2"]) == same(runs["rank1-of-2"])
    assert runs["rank0-of-2"]["result"]["step"] == 4
