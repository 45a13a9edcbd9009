"""Checkpoints: safetensors + JSON round trip (weights, Adam states, RNG), atomic writes, refusal of incomplete ones."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from laren.jobs.grid import latest_checkpoint
from laren.train import state as S


def _modules(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[0].bias.requires_grad_(False)  # a frozen parameter travels too
    disc = torch.nn.Linear(5, 1)
    og = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
    od = torch.optim.Adam(disc.parameters(), lr=2e-4)
    return model, disc, {"g": og, "d": od}


def _train_a_bit(model, disc, opts):
    for _ in range(3):
        loss = model(torch.randn(2, 3, 6, 6)).pow(2).mean() + disc(torch.randn(2, 5)).pow(2).mean()
        for o in opts.values():
            o.zero_grad()
        loss.backward()
        for o in opts.values():
            o.step()


def test_round_trip_restores_weights_optimizers_and_rng(tmp_path):
    model, disc, opts = _modules(0)
    _train_a_bit(model, disc, opts)
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    pos = {"epoch": 1, "layout": [1, 2], "items": [2, 2], "at": [[0, "shard-000000.tar", 4], None], "bad": [[0, 0, 1, 1]]}
    st = S.TrainState(step=7, images_seen=56, data_epoch=1, data_batch=3, data_ranks=[pos], mlflow_run_id="abc",
                      rng=[S.capture_rng()])
    S.write_checkpoint_dir(tmp_path / "ck", model, disc, opts, st, config={"name": "x"})
    expected_draws = (torch.rand(3), np.random.rand(2), random.random())

    m2, d2, o2 = _modules(1)  # different init: everything must come from the checkpoint
    got = S.load_checkpoint(tmp_path / "ck", m2, d2, o2)
    assert (got.step, got.images_seen, got.kimg, got.data_epoch, got.data_batch, got.mlflow_run_id) == (7, 56, 0.056, 1, 3, "abc")
    assert got.data_ranks == [pos]
    # a checkpoint from before the loader workers' positions were saved loads without them (the pass is replayed)
    doc = {k: v for k, v in S.read_state(tmp_path / "ck").items() if k != "data_ranks"}
    assert S.train_state_from_doc(doc).data_ranks == [] and S.train_state_from_doc(doc).data_batch == 3
    for a, b in zip(list(model.state_dict().values()) + list(disc.state_dict().values()),
                    list(m2.state_dict().values()) + list(d2.state_dict().values())):
        assert torch.equal(a, b)
    for name in opts:
        sa, sb = opts[name].state_dict(), o2[name].state_dict()
        assert sa["param_groups"] == [dict(g, betas=tuple(g["betas"])) for g in sb["param_groups"]]
        for i in sa["state"]:
            for k in sa["state"][i]:
                assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    # The optimizers continue identically.
    torch.manual_seed(5)
    _train_a_bit(model, disc, opts)
    torch.manual_seed(5)
    _train_a_bit(m2, d2, o2)
    assert torch.equal(model[0].weight, m2[0].weight) and torch.equal(disc.weight, d2.weight)
    # RNG states come back.
    S.restore_rng(got.rng[0])
    assert torch.equal(torch.rand(3), expected_draws[0])
    assert np.array_equal(np.random.rand(2), expected_draws[1]) and random.random() == expected_draws[2]
    doc = json.loads((tmp_path / "ck" / "state.json").read_text())
    assert doc["kimg"] == 0.056 and doc["config"] == {"name": "x"} and doc["format"] == S.FORMAT


def test_incomplete_or_corrupt_checkpoint_is_refused(tmp_path):
    model, disc, opts = _modules(0)
    d = S.save_checkpoint(tmp_path / "ck", model, disc, opts, S.TrainState(step=1))
    # corrupt weights: checksum mismatch
    data = bytearray((d / S.WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (d / S.WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(S.CheckpointError, match="checksum"):
        S.load_checkpoint(d, *_modules(0))
    # no state.json (a writer that died before its commit marker)
    (d / S.STATE_FILE).unlink()
    with pytest.raises(S.CheckpointError, match="state.json missing"):
        S.load_checkpoint(d, *_modules(0))


def test_crash_during_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model, disc, opts = _modules(0)
    final = S.write_checkpoint_dir(tmp_path / "latest", model, disc, opts, S.TrainState(step=1))
    before = {p.name: p.read_bytes() for p in final.iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(S, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        S.write_checkpoint_dir(tmp_path / "latest", model, disc, opts, S.TrainState(step=2))
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temporary leftovers
    assert S.read_state(final)["step"] == 1


def test_mismatched_model_is_refused(tmp_path):
    model, disc, opts = _modules(0)
    d = S.save_checkpoint(tmp_path / "ck", model, disc, opts, S.TrainState())
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    with pytest.raises(S.CheckpointError, match="shape"):
        S.load_weights(d, other)


def test_checkpoint_discovery_counts_only_complete_checkpoints(tmp_path):
    model, disc, opts = _modules(0)
    run = tmp_path / "runs" / "r1"
    S.save_checkpoint(run / "checkpoint_000000002", model, disc, opts, S.TrainState(step=2))
    S.save_checkpoint(run / "checkpoint_000000004", model, disc, opts, S.TrainState(step=4))
    (run / "checkpoint_000000006").mkdir()  # a newer folder without state.json: an interrupted write
    (run / "checkpoint_000000006" / S.WEIGHTS_FILE).write_bytes(b"partial")
    assert S.checkpoint_names(str(run)) == ["checkpoint_000000004", "checkpoint_000000002"]
    assert latest_checkpoint(str(tmp_path / "runs"), "r1") == str(run / "checkpoint_000000004")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        latest_checkpoint(str(tmp_path / "runs"), "r2")
    assert S.checkpoint_names(None) == []
