"""Models in the registry, evaluations and keep-best, end to end on real services: a tiny SR run through Ray Train
(1 CPU worker, local storage) tracked on an MLflow server (SQLite) registers ``laren-<job>``; `laren upscale --model
models:/...` and `mlflow models predict` (a subprocess, no shell) give the checkpoint's own output, bit for bit;
evaluating the checkpoint on two data sets gives two runs linked to the training run, from which the table is rebuilt;
Ray's checkpoint scoring kept the best checkpoint beside the newest."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_train_loop import make_tiny_dataset, make_tiny_images, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EXPERIMENT = "registry-it"


@pytest.fixture(scope="module")
def trained(mlflow_server, local_ray, tmp_path_factory):
    """One Ray Train run of 8 steps, a checkpoint (and evaluation) every 2, keeping 1 checkpoint + the best by the
    lowest val/psnr (so that the best is an early one and differs from the newest)."""
    from laren.data.pack import pack
    from laren.train.distributed import run_training

    work = tmp_path_factory.mktemp("registry")
    data = make_tiny_dataset(str(work / "shards"), work)
    other = str(work / "shards-b")
    pack(str(make_tiny_images(work / "raw-b", 8, seed=5)), other, "tiny-b", 32, shard_size_mb=0.02, progress=False)
    cfg = tiny_config(data, mlflow_server.uri, storage=dict(root=str(work / "storage")),
                      tracking=dict(experiment=EXPERIMENT, register_model=True), resources=dict(hourly_price_usd=3.0),
                      train=dict(total_kimg=0.032, eval_every_kimg=0.008, checkpoint_every_kimg=0.008,
                                 keep_checkpoints=1, keep_best_metric="val/psnr", keep_best_mode="min"))
    out = run_training(cfg)
    runs = _client(mlflow_server.uri).search_runs(
        [_client(mlflow_server.uri).get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.`laren.run_id` = '{cfg.run_id}'")
    assert len(runs) == 1
    out["mlflow_run_id"] = runs[0].info.run_id
    return {"cfg": cfg, "out": out, "work": work, "data": data, "other": other, "uri": mlflow_server.uri}


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def test_keep_best_keeps_the_best_beside_the_newest(trained):
    cfg, out = trained["cfg"], trained["out"]
    c = _client(trained["uri"])
    run = c.get_run(out["mlflow_run_id"])
    psnr = {m.step: m.value for m in c.get_metric_history(run.info.run_id, "val/psnr")}
    assert sorted(psnr) == [2, 4, 6, 8]
    best = min(psnr, key=psnr.get)
    assert best != 8, psnr  # else this test would not tell keep-best from keep-newest
    run_dir = trained["work"] / "storage" / "runs" / cfg.run_id
    kept = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert kept == [f"checkpoint_{best:09d}", "checkpoint_000000008"]
    for name in kept:
        assert (run_dir / name / "state.json").is_file()
    # cost: worker-hours of one CPU worker, priced
    m = run.data.metrics
    assert m["perf/gpu_hours"] == 0.0 and 0 < m["perf/worker_hours"] < 1
    assert m["cost/usd"] == pytest.approx(3.0 * m["perf/worker_hours"])


def test_registered_model_upscale_and_mlflow_predict(trained, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from safetensors import safe_open

    from laren.cli import main
    from laren.registry import CONFIG, PRIOR, WEIGHTS

    cfg, out, uri = trained["cfg"], trained["out"], trained["uri"]
    c = _client(uri)
    versions = c.search_model_versions("name = 'laren-tiny'")
    assert len(versions) == 1
    mv = versions[0]
    assert mv.run_id == out["mlflow_run_id"] and mv.tags["laren.run_id"] == cfg.run_id
    assert mv.tags["data.train"] == trained["data"]
    assert float(mv.tags["val/psnr"]) == pytest.approx(c.get_run(mv.run_id).data.metrics["val/psnr"], rel=1e-5)

    # The model: inference weights only (no D, no optimizer state), config, prior metadata; no pickle.
    local = Path(c.download_artifacts(mv.run_id, "model", str(tmp_path / "dl")))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".pickle"))], files
    assert {f"artifacts/{WEIGHTS}", f"artifacts/{CONFIG}", f"artifacts/{PRIOR}", "MLmodel"} <= set(files), files
    with safe_open(str(local / "artifacts" / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("model.") for k in keys) and any(k.startswith("model.generator.") for k in keys)
    assert json.loads((local / "artifacts" / CONFIG).read_text())["name"] == "tiny"
    assert json.loads((local / "artifacts" / PRIOR).read_text())["path"] is None
    mlmodel = (local / "MLmodel").read_text()
    assert "signature:" in mlmodel and "image" in mlmodel

    # `laren upscale --model` equals `laren upscale --checkpoint` of the final checkpoint, pixel for pixel.
    lr = tmp_path / "lr.png"
    Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)).save(lr)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    r = CliRunner().invoke(main, ["upscale", "--checkpoint", out["checkpoint"], str(lr), "--out", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    ref = np.asarray(Image.open(tmp_path / "ck" / "lr_sr.png"))
    for source in ("models:/laren-tiny/latest", f"runs:/{mv.run_id}/model"):
        d = tmp_path / source.split(":")[0]
        r = CliRunner().invoke(main, ["upscale", "--model", source, str(lr), "--out", str(d)])
        assert r.exit_code == 0, r.output
        assert np.array_equal(np.asarray(Image.open(d / "lr_sr.png")), ref), source
    r = CliRunner().invoke(main, ["upscale", "--model", "laren-tiny", str(lr), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "models:/" in r.output
    r = CliRunner().invoke(main, ["upscale", "--model", "models:/laren-nope/latest", str(lr), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "models:/laren-nope/latest: no such model in the MLflow registry" in r.output, r.output
    # As the demo prints it: no MLFLOW_TRACKING_URI, the project's local MLflow (its .laren/services.json) is used.
    project = tmp_path / "project"
    (project / ".laren").mkdir(parents=True)
    (project / ".laren" / "services.json").write_text(json.dumps({"mlflow": {"uri": uri}}))
    monkeypatch.chdir(project)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    r = CliRunner().invoke(main, ["upscale", "--model", "models:/laren-tiny/latest", str(lr), "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p" / "lr_sr.png")), ref)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)

    # `mlflow models predict`, as documented: JSON dataframe_split of base64 images, local env.
    inp, pred = tmp_path / "input.json", tmp_path / "pred.json"
    inp.write_text(json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(lr.read_bytes()).decode()]]}}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": os.pathsep.join(sys.path)}
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    p = subprocess.run([str(mlflow_cli), "models", "predict", "-m", "models:/laren-tiny/latest", "-i", str(inp),
                        "-t", "json", "--env-manager", "local", "-o", str(pred)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(pred.read_text())["predictions"]
    assert len(got) == 1
    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(got[0]["image"]))))
    assert np.array_equal(img, ref)


def test_eval_on_two_data_sets_gives_two_linked_runs(trained, tmp_path):
    from laren.evaluate import run_eval
    from laren.jobs.grid import eval_rows, results_table

    cfg, out, uri = trained["cfg"], trained["out"], trained["uri"]
    sums = [run_eval(out["checkpoint"], url, str(tmp_path / name), limit=4, tracking_uri=uri, experiment=EXPERIMENT)
            for name, url in (("a", trained["data"]), ("b", trained["other"]))]
    assert [s["data_name"] for s in sums] == ["tiny", "tiny-b"]
    c = _client(uri)
    exp = c.get_experiment_by_name(EXPERIMENT)
    evals = c.search_runs([exp.experiment_id], filter_string="tags.`laren.kind` = 'eval'")
    assert len(evals) == 2
    by_data = {r.data.params["data_name"]: r for r in evals}
    assert set(by_data) == {"tiny", "tiny-b"}
    for s in sums:
        r = by_data[s["data_name"]]
        assert r.data.tags["laren.train_run_id"] == cfg.run_id
        assert r.data.tags["mlflow.parentRunId"] == out["mlflow_run_id"]
        assert r.data.params["data"] == s["data"] and r.data.params["checkpoint_name"] == "checkpoint_000000008"
        assert r.data.metrics["test/psnr"] == pytest.approx(s["test/psnr"])
        assert r.data.metrics["cost/usd"] > 0
    # The same pair again continues its run: still two.
    run_eval(out["checkpoint"], trained["other"], str(tmp_path / "b2"), limit=4, tracking_uri=uri, experiment=EXPERIMENT)
    assert len(c.search_runs([exp.experiment_id], filter_string="tags.`laren.kind` = 'eval'")) == 2

    rows = eval_rows(uri, EXPERIMENT, [cfg.run_id], labels={cfg.run_id: "LAREN"})
    assert [(r["label"], r["data"]) for r in rows] == [("LAREN", "tiny"), ("LAREN", "tiny-b")]
    md, csv_text = results_table(rows, split="test")
    for s in sums:
        assert f"| LAREN | {s['data_name']} | {s['test/psnr']:.2f} |" in md
    assert csv_text.splitlines()[0].startswith("model,data,psnr,ssim")
