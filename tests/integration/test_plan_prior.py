"""A run trained on a non-stock prior reloads: the 32 px fixture prior (channel table min(512 // r, 64), not the stock
min(16384 // r, 64)) is imported with `laren prior import`, a tiny run is planned and trained on it, and its checkpoint
loads in `laren eval` and `laren upscale`. The plan carries the prior's architecture (its metadata) into the config
that the checkpoint records; the config as written would describe another channel table."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from tests.conftest import rosinality_checkpoint
from click.testing import CliRunner
from PIL import Image

from laren.cli import main
from laren.config import RunConfig
from laren.plan import build_plan, write_plan
from tests.integration._tiny_jobs import TINY_MODEL
from tests.unit.test_train_loop import make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_run_on_non_stock_prior_reloads_in_eval_and_upscale(tmp_path, fixtures_dir):
    from laren.train.loop import WorkerContext, train_worker

    dest = tmp_path / "priors" / "p32"
    res = CliRunner().invoke(main, ["prior", "import", str(rosinality_checkpoint()), str(dest)])
    assert res.exit_code == 0, res.output
    data = make_tiny_dataset(str(tmp_path / "shards"), tmp_path)
    model = copy.deepcopy(TINY_MODEL)
    model["prior"] = {**model["prior"], "path": str(dest)}  # 32 px, H=64, 2 mapping layers, channel_max 64: as written
    cfg = tiny_config(data, f"sqlite:///{tmp_path}/mlflow.db", model=model, storage=dict(root=str(tmp_path / "storage")),
                      train=dict(total_kimg=0.008, log_every_kimg=0.004, eval_every_kimg=0.008, checkpoint_every_kimg=0.008))
    assert cfg.model.prior.channel_base() == 16384  # the stock table the job's fields alone describe

    plan = build_plan(cfg)
    assert plan.run_id == cfg.run_id and plan.config["model"]["prior"]["channel_table_base"] == 512
    assert plan.run_config().run_id == plan.run_id  # the id is a function of the resolved config: the same
    assert build_plan(plan.run_config(), plan.run_id).config == plan.config  # resolving again changes nothing
    assert set(plan.inputs) == {"data.train_url", "model.prior.path"}
    url = write_plan(plan)
    assert json.loads(open(url).read())["run_id"] == plan.run_id

    out = train_worker(plan.run_config(), WorkerContext(run_id=plan.run_id, checkpoint_root=str(tmp_path / "ck")))
    assert out["step"] == 2
    ck = tmp_path / "ck" / "checkpoint_000000002"
    recorded = RunConfig.model_validate(json.loads((ck / "state.json").read_text())["config"])
    assert recorded.model.prior.channel_base() == 512
    # The config as written would rebuild another generator: its weights do not load (what eval / upscale did before).
    from laren.models.build import build_model
    from laren.train import state as S

    as_written = cfg.model.model_copy(update={"prior": cfg.model.prior.model_copy(update={"path": None})})
    with pytest.raises(Exception, match="size mismatch|shape"):
        S.load_weights(str(ck), build_model(as_written))

    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(ck), "--data", data, "--out", str(tmp_path / "ev"), "--limit", "4"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["images"] == 4

    lr = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(lr)
    res = CliRunner().invoke(main, ["upscale", "--checkpoint", str(ck), str(lr), "--out", str(tmp_path / "sr")])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "sr" / "lr_sr.png").size == (32, 32)
