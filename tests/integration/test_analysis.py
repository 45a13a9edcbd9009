"""`laren analyze` end to end, submitted to a real Ray head (`laren submit`) and logging to a real MLflow server: a tiny synthetic face set with known factors, a tiny LAREN
trained on it for a few steps (the worker loop, checkpoints where its train job's run keeps them; the factor-FD of its
SR images, as a grid on this set reports it), then an analysis
job naming that train job: Table II (markdown + CSV) and the two Fig. 7 heatmaps (Z and G) are logged to one run whose
metrics equal the table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import yaml

from laren.data.synth import synth
from laren.jobs import client as S
from laren.jobs.checks import validate
from laren.jobs.entrypoints import job_entrypoint
from laren.jobs.grid import latest_checkpoint, sr_factor_fd
from laren.specs import load_job
from tests.integration._tiny_jobs import job_env, mlflow_runs, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_analyze_logs_table2_and_fig7(ray_head, mlflow_server, tmp_path, monkeypatch):
    val = str(tmp_path / "synth-val")
    synth("faces", val, resolution=32, count=96, seed=1, progress=False)
    train_job = tiny_job(tmp_path, "tiny-synth", (val, val), steps=4, eval_every=4, ckpt_every=4,
                         eval={"random_backbone_for_tests": True})
    env = job_env(tmp_path, mlflow_server.uri)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)  # the project: relative job paths mean its files, as for `laren analyze` run there
    cfg = load_job(train_job).run_config()
    from laren.train.loop import WorkerContext, train_worker

    runs = tmp_path / "storage" / "runs"
    train_worker(cfg, WorkerContext(run_id=cfg.run_id, checkpoint_root=str(runs / cfg.run_id)))

    # What a grid on this set adds to its table: the factor-FD of the run's SR images against the HR images.
    ck = latest_checkpoint(str(runs), cfg.run_id)
    fd = sr_factor_fd(cfg, {cfg.run_id: ck}, log=lambda *_: None, regressor_steps=20)
    assert set(fd) == {cfg.run_id} and 0 < fd[cfg.run_id] < float("inf")
    assert sr_factor_fd(cfg.model_copy(update={"data": cfg.data.model_copy(update={"val_url": ""})}), {"x": ck}) == {}

    job = {"kind": "analysis", "name": "analysis-tiny", "data": {"val_url": val},
           "tracking": {"experiment": "analysis-it", "system_metrics": False},
           "analysis": {"checkpoints": [{"label": "LAREN", "checkpoint": "jobs/tiny-synth.yaml"}],
                        "max_images": 96, "gbt_trees": 5, "batch_size": 32}}
    path = tmp_path / "jobs" / "analysis-tiny.yaml"
    path.write_text(yaml.safe_dump(job))
    spec, text = validate(path, summary=False)
    assert spec.kind == "analysis" and "kind analysis" in text
    assert job_entrypoint("analysis", "jobs/analysis-tiny.yaml") == "python -m laren.cli analyze jobs/analysis-tiny.yaml"

    # As a user would: `laren submit` to a real Ray head runs `python -m laren.cli analyze <job>` as a Ray job.
    sub = S.submit(path, address=ray_head.dashboard_url, working_dir=tmp_path, env=env)
    assert sub.kind == "analysis" and sub.run_id == spec.run_id
    st = S.wait(spec.run_id, ray_head.dashboard_url, timeout_s=400)
    assert st == "SUCCEEDED", S.logs(spec.run_id, ray_head.dashboard_url)[-4000:]

    c, runs = mlflow_runs(mlflow_server.uri, "analysis-it")
    run = runs[spec.run_id]
    assert run.info.status == "FINISHED" and run.data.tags["laren.kind"] == "analysis"
    arts = {a.path for d in ("results", "fig7") for a in c.list_artifacts(run.info.run_id, d)}
    assert {"results/table2.md", "results/table2.csv", "fig7/fig7-laren-z.png", "fig7/fig7-laren-g.png"} <= arts

    table = list(csv.DictReader(io.StringIO(Path(c.download_artifacts(run.info.run_id, "results/table2.csv")).read_text())))
    assert [r["space"] for r in table] == ["Z", "G", "S"]
    m = run.data.metrics
    for r in table:
        key = f"dci/laren/{r['space'].lower()}"
        for col, short in (("disentanglement", "D"), ("completeness", "C"), ("informativeness", "I")):
            assert float(r[col]) == pytest.approx(m[f"{key}/{short}"], abs=1e-5)
            assert 0.0 <= float(r[col]) <= 1.0
    assert int(table[0]["dims"]) == 64 and int(table[1]["dims"]) == 64 * 8  # z: H; g: N x H (32 px prior: N = 8)
    # The heatmaps are MLflow images too, and their numbers are |rho| of the test codes (5 x 15, in [0, 1]).
    assert {a.path for a in c.list_artifacts(run.info.run_id, "images")}, "no images logged"
    rho = np.loadtxt(c.download_artifacts(run.info.run_id, "fig7/fig7-laren-g.csv", str(tmp_path / "dl")), delimiter=",")
    assert rho.shape == (5, 15) and (rho >= 0).all() and (rho <= 1).all()
    assert m["fig7/laren/g/mean_abs_rho"] == pytest.approx(rho.mean(), abs=1e-6)
