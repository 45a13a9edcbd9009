"""Resuming downloads the checkpoint once per node: in two real gloo processes (no Ray), the node's local rank 0
downloads it and the node's other rank reads that copy; two ranks on two nodes download it once each. Both resume
from the checkpoint rank 0 chose."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from laren.data import storage
from laren.train import distributed as D
from laren.train import state as S

pytestmark = pytest.mark.integration


def _worker(rank: int, world: int, port: int, run_dir: str, nodes: list[int], out: str) -> None:
    """Rank ``rank`` on node ``nodes[rank]``: each node has its own temporary folder, as separate machines do."""
    tempfile.tempdir = os.path.join(out, f"node{nodes[rank]}-tmp")
    os.makedirs(tempfile.tempdir, exist_ok=True)
    local_rank = nodes[:rank].count(nodes[rank])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    calls = []
    real = storage.download_file

    def counting(url, dest):
        calls.append(url)
        return real(url, dest)

    storage.download_file = counting  # this process's storage module: count what this rank downloads
    try:
        folder = D._agreed_resume_copy(None, run_dir, rank, local_rank, torch.device("cpu"))
        doc = S.read_state(folder)
        dist.barrier()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"folder": folder, "downloads": len(calls), "step": doc["step"]}, f)
        dist.barrier()  # both have read it; then each node's local rank 0 removes its copy, as _train_fn does
        if local_rank == 0:
            shutil.rmtree(folder)
    finally:
        dist.destroy_process_group()


def _run(run_dir, nodes, tmp_path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / ("out-" + "".join(map(str, nodes)))
    out.mkdir()
    mp.spawn(_worker, args=(2, port, str(run_dir), nodes, str(out)), nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture
def run_dir(tmp_path):
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(lin.parameters())
    for step in (4, 8):
        S.save_checkpoint(tmp_path / "run" / f"checkpoint_{step:09d}", lin, None, {"g": opt}, S.TrainState(step=step))
    return tmp_path / "run"


def test_one_download_per_node(run_dir, tmp_path):
    files = 3  # weights, optimizer state, state.json
    one_node = _run(run_dir, [0, 0], tmp_path)
    assert [r["downloads"] for r in one_node] == [files, 0]
    assert one_node[0]["folder"] == one_node[1]["folder"] and [r["step"] for r in one_node] == [8, 8]
    two_nodes = _run(run_dir, [0, 1], tmp_path)
    assert [r["downloads"] for r in two_nodes] == [files, files] and [r["step"] for r in two_nodes] == [8, 8]
    assert two_nodes[0]["folder"] != two_nodes[1]["folder"]
    assert not any(os.path.exists(r["folder"]) for r in one_node + two_nodes)
