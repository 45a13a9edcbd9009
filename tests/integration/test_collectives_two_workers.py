"""Collectives on the training device, in a real run (laren/train/collectives.py): a 2-worker run (gloo, two
processes, the plain-Python loop) and a 1-worker run with a process group; every ``torch.distributed`` call is
wrapped in a recorder that notes the device of the tensor it gets; none may be off the training device, and the
world-size-1 run must make the same kinds of calls. (Host-made tensors on another device: tests/unit/test_collectives.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from laren.train import collectives as C
from tests.unit.test_collectives import TENSOR_OPS


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
