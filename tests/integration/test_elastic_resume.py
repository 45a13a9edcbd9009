"""Elastic resume: a run checkpointed by 2 workers continues on 1 (a smaller worker group after a preemption, as Ray
Train's elastic ScalingConfig allows). Two real gloo processes (no Ray) train the tiny LAREN job to its step-5
checkpoint; one process resumes from it: the step, weights and optimizer state carry over, the data pass goes on
from the saved batch count with fresh streams (the saved per-worker positions belong to the 2-worker layout), and
training continues to the end."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from laren.config import RunConfig
from laren.models.build import build_discriminator, build_model
from laren.train import state as S
from laren.train.loop import WorkerContext, train_worker
from tests.unit.test_train_loop import loss_curve, make_tiny_dataset, tiny_config

pytestmark = pytest.mark.integration


def _worker(rank: int, world: int, port: int, cfg: dict, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_worker(RunConfig.model_validate(cfg), WorkerContext(rank=rank, world_size=world, run_id="two",
                                                                  checkpoint_root=root))
    finally:
        dist.destroy_process_group()


def test_two_worker_checkpoint_resumes_on_one_worker(tmp_path):
    data = make_tiny_dataset(str(tmp_path / "shards"), tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    half = tiny_config(data, uri, resources=dict(num_workers=2), train=dict(total_kimg=0.02))  # 5 steps of 4 images
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, half.to_dict(), str(tmp_path / "ck")), nprocs=2, join=True)
    ck = tmp_path / "ck" / "checkpoint_000000005"
    saved = S.read_state(ck)
    assert saved["step"] == 5 and len(saved["rng"]) == 2 and len(saved["data_ranks"]) == 2

    full = tiny_config(data, uri, train=dict(total_kimg=0.04))  # one worker, the same global batch of 4
    out = train_worker(full, WorkerContext(run_id="one", checkpoint_root=str(tmp_path / "ck1"), resume_dir=str(ck)))
    assert out["step"] == 10 and out["kimg"] == pytest.approx(0.04)
    two, one = loss_curve(uri, "tiny", "two", "train/loss_pix"), loss_curve(uri, "tiny", "one", "train/loss_pix")
    assert [s for s, _ in two] == [1, 2, 3, 4, 5] and [s for s, _ in one] == [6, 7, 8, 9, 10]
    # The optimizers went on from the 2-worker state: Adam has counted all 10 steps (5 there, 5 here).
    model, disc = build_model(full.model), build_discriminator(full.model)
    opts = {"g": torch.optim.Adam([p for p in model.parameters() if p.requires_grad]),
            "d": torch.optim.Adam(disc.parameters())}
    assert S.load_checkpoint(tmp_path / "ck1" / "checkpoint_000000010", model, disc, opts).step == 10
    assert {float(st["step"]) for st in opts["g"].state.values()} == {10.0}
