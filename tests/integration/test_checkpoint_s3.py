"""A model loaded from a checkpoint in S3 (laren eval / upscale / grid tables / analysis) comes back with the saved
weights, and the downloaded copy is removed once the weights are in memory: nothing is left in the temporary folder
(a face64x checkpoint is gigabytes)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from laren.data import storage
from laren.evaluate import load_model_from_checkpoint
from laren.models.build import build_model
from laren.train import state as S
from tests.unit.test_train_loop import tiny_config

pytestmark = pytest.mark.integration


def test_s3_checkpoint_loads_and_leaves_no_copy(s3_env, tmp_path, monkeypatch):
    cfg = tiny_config("unused", "unused")
    torch.manual_seed(0)
    model = build_model(cfg.model)
    local = tmp_path / "checkpoint_000000004"
    S.save_checkpoint(local, model, None, {}, S.TrainState(step=4), cfg.to_dict())
    s3_env.create_bucket("ckpt")
    url = "s3://ckpt/runs/r/checkpoint_000000004"
    for f in local.iterdir():
        storage.upload_file(f, f"{url}/{f.name}")

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded, got_cfg, doc = load_model_from_checkpoint(url)
    assert doc["step"] == 4 and got_cfg.model == cfg.model
    want = model.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    assert list(scratch.iterdir()) == []  # the downloaded copy is gone
