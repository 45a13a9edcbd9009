"""laren.tracking against a real MLflow server (SQLite backend, artifacts served by the server) on 127.0.0.1."""

import logging
import time
import uuid

import numpy as np
import pytest
import yaml

from laren.tracking import RUN_ID_TAG, NullTracker, Tracker, make_tracker

pytestmark = pytest.mark.integration


def _name(prefix="job"):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(uri)


def _runs_named(client, experiment, run_name):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_name}'")


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_params_metrics_images_config_and_artifacts_land(mlflow_server, tmp_path):
    uri, exp, name = mlflow_server.uri, _name("exp"), _name()
    t = Tracker(uri, exp, name, tags={"laren.kind": "train"}, system_metrics=False)
    config = {"name": "face64x", "model": {"gdm": {"num_nodes": 4, "relation_scale": "dim"}}, "optim": {"betas": [0.9, 0.999]},
              "eval": {"alexnet_path": None}}
    t.log_params(config)
    for step in range(3):
        t.log_metrics({"train/loss_pix": 1.0 / (step + 1), "perf/images_per_s": 10.0 * step}, step=step)
    grid = (np.arange(16 * 24 * 3) % 256).astype(np.uint8).reshape(16, 24, 3)
    t.log_image(grid, key="val/sr_grid", step=2)
    t.log_config(config)
    f = tmp_path / "table.csv"
    f.write_text("psnr,ssim\n30.1,0.9\n")
    t.log_artifact(f, "eval")
    t.finish()

    c = _client(uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert run.data.tags[RUN_ID_TAG] == name and run.data.tags["laren.kind"] == "train"
    assert run.data.params == {
        "name": "face64x", "model.gdm.num_nodes": "4", "model.gdm.relation_scale": "dim",
        "optim.betas": "[0.9, 0.999]", "eval.alexnet_path": "None",
    }
    assert _history(c, t.run_id, "train/loss_pix") == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert _history(c, t.run_id, "perf/images_per_s") == [(0, 0.0), (1, 10.0), (2, 20.0)]
    images = [a.path for a in c.list_artifacts(t.run_id, "images")]
    pngs = [p for p in images if p.startswith("images/val~sr_grid+step+2+") and p.endswith(".png")]
    assert len(pngs) == 1
    from PIL import Image

    back = np.asarray(Image.open(c.download_artifacts(t.run_id, pngs[0], str(tmp_path / "dl"))))
    np.testing.assert_array_equal(back, grid)
    cfg_path = c.download_artifacts(t.run_id, "resolved_config.yaml", str(tmp_path / "dl"))
    assert yaml.safe_load(open(cfg_path)) == config
    table = c.download_artifacts(t.run_id, "eval/table.csv", str(tmp_path / "dl"))
    assert open(table).read() == f.read_text()


def test_resume_by_run_name_continues_the_same_run(mlflow_server, caplog):
    uri, exp, name = mlflow_server.uri, _name("exp"), _name()
    first = Tracker(uri, exp, name, system_metrics=False)
    first.log_params({"train": {"seed": 0, "total_kimg": 10.0}})
    first.log_metrics({"train/loss_pix": 3.0}, step=0)
    first.finish("FAILED")  # the job crashed

    again = Tracker(uri, exp, name, system_metrics=False)
    assert again.resumed and again.run_id == first.run_id
    c = _client(uri)
    assert c.get_run(again.run_id).info.status == "RUNNING"
    with caplog.at_level(logging.WARNING, logger="laren.tracking"):
        again.log_params({"train": {"seed": 0, "total_kimg": 10.0}, "data": {"hflip": True}})  # same values: skipped
        again.log_params({"train": {"seed": 1}})  # changed: reported, not logged (immutable)
    assert any("train.seed" in r.message and "immutable" in r.message for r in caplog.records)
    again.log_metrics({"train/loss_pix": 2.0}, step=1)
    again.finish()

    runs = _runs_named(c, exp, name)
    assert len(runs) == 1
    run = c.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.seed": "0", "train.total_kimg": "10.0", "data.hflip": "True"}
    assert _history(c, run.info.run_id, "train/loss_pix") == [(0, 3.0), (1, 2.0)]


def test_credentials_are_never_logged(mlflow_server, tmp_path):
    uri, exp, name = mlflow_server.uri, _name("exp"), _name()
    secrets = ["S3CR3T-value", "hunter2-pw", "tok-abc123", "AKIAEXAMPLEKEYID", "dbpass"]
    config = {
        "storage": {"root": "s3://bucket/runs", "aws_secret_access_key": secrets[0], "aws_access_key_id": secrets[3]},
        "tracking": {"tracking_uri": f"postgresql://mlflow:{secrets[4]}@db:5432/mlflow", "api_token": secrets[2]},
        "db": {"PASSWORD": secrets[1]},
    }
    t = Tracker(uri, exp, name, tags={"owner": "ci", "github_token": secrets[2]}, system_metrics=False)
    t.log_params(config)
    t.log_config(config)
    t.set_tags({"source_url": f"https://user:{secrets[1]}@example.org/repo"})
    t.finish()

    c = _client(uri)
    run = c.get_run(t.run_id)
    text = repr(run.data.params) + repr(run.data.tags)
    text += open(c.download_artifacts(t.run_id, "resolved_config.yaml", str(tmp_path))).read()
    for s in secrets:
        assert s not in text
    assert run.data.params["storage.aws_secret_access_key"] == "***"
    assert run.data.params["storage.root"] == "s3://bucket/runs"  # ordinary values untouched
    assert run.data.params["tracking.tracking_uri"] == "postgresql://mlflow:***@db:5432/mlflow"
    assert "github_token" not in run.data.tags and run.data.tags["owner"] == "ci"


def test_child_runs_and_null_tracker(mlflow_server):
    uri, exp = mlflow_server.uri, _name("exp")
    parent = Tracker(uri, exp, _name("sweep"), system_metrics=False)
    children = [Tracker(uri, exp, _name("trial"), parent_run_id=parent.run_id, system_metrics=False) for _ in range(2)]
    for i, ch in enumerate(children):  # several runs in one process, each by its own id
        ch.log_metrics({"val/lpips_alex": 0.5 - 0.1 * i}, step=0)
    parent.log_metrics({"best/val/lpips_alex": 0.4}, step=0)
    for t in children + [parent]:
        t.finish()
    c = _client(uri)
    kids = c.search_runs([c.get_experiment_by_name(exp).experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    assert sorted(r.info.run_id for r in kids) == sorted(ch.run_id for ch in children)
    assert {r.data.metrics["val/lpips_alex"] for r in kids} == {0.5, 0.4}
    assert "val/lpips_alex" not in c.get_run(parent.run_id).data.metrics

    other = make_tracker(1, uri, exp, _name(), system_metrics=False)
    assert isinstance(other, NullTracker) and not isinstance(other, Tracker) and other.run_id is None
    other.log_params({"a": 1})
    other.log_metrics({"x": 1.0}, step=0)
    other.log_image(np.zeros((4, 4, 3), np.uint8), "val/sr_grid", 0)
    other.finish()
    assert len(c.search_runs([c.get_experiment_by_name(exp).experiment_id])) == 3


def test_system_metrics_are_logged(mlflow_server):
    t = Tracker(mlflow_server.uri, _name("exp"), _name(), system_metrics=True, system_metrics_interval_s=0.5)
    t.log_metrics({"train/loss_pix": 1.0}, step=0)
    deadline = time.monotonic() + 20
    metrics: dict = {}
    while time.monotonic() < deadline and not any(k.startswith("system/") for k in metrics):
        time.sleep(0.5)
        metrics = _client(mlflow_server.uri).get_run(t.run_id).data.metrics
    t.finish()
    keys = set(metrics)
    assert any(k.startswith("system/cpu") for k in keys), keys
    # real readings, not placeholders: utilisation and memory in percent, memory in use above zero
    assert 0.0 <= metrics["system/cpu_utilization_percentage"] <= 100.0, metrics
    assert 0.0 < metrics["system/system_memory_usage_percentage"] <= 100.0, metrics
    assert metrics["system/system_memory_usage_megabytes"] > 0, metrics


def test_outage_buffers_and_flushes_after_restart(tmp_path, caplog):
    from laren.services import MLflowServer

    root = tmp_path / "mlflow"
    server = MLflowServer(root).start()
    port, uri = server.port, server.uri
    try:
        exp, name = _name("exp"), _name()
        t = Tracker(uri, exp, name, system_metrics=False, retry_interval_s=3600)
        t.log_params({"train": {"seed": 0}})
        t.log_metrics({"train/loss_pix": 1.0}, step=0)
        server.stop()

        with caplog.at_level(logging.WARNING, logger="laren.tracking"):
            t0 = time.monotonic()
            t.log_metrics({"train/loss_pix": 0.9}, step=1)  # first failure: fails fast (HTTP env defaults)
            first_call_s = time.monotonic() - t0
            t0 = time.monotonic()
            for step in range(2, 6):
                t.log_metrics({"train/loss_pix": 1.0 - 0.1 * step}, step=step)
            t.log_params({"data": {"hflip": True}})
            t.log_image(np.full((8, 8, 3), 200, np.uint8), "val/sr_grid", step=5)
            buffered_calls_s = time.monotonic() - t0
        assert first_call_s < 15, f"a down server must fail fast, took {first_call_s:.1f} s"
        assert buffered_calls_s < 1.0, "inside the retry interval, calls must only buffer"
        assert sum("unreachable" in r.message for r in caplog.records) == 1  # one warning per outage
        assert not t.flush()  # still down

        server = MLflowServer(root, port=port).start()  # same SQLite file, same port
        assert t.flush(force=True)
        t.log_metrics({"train/loss_pix": 0.3}, step=6)
        t.finish()

        c = _client(uri)
        hist = _history(c, t.run_id, "train/loss_pix")
        assert [s for s, _ in hist] == list(range(7))
        assert [v for _, v in hist] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3])
        run = c.get_run(t.run_id)
        assert run.data.params == {"train.seed": "0", "data.hflip": "True"}
        assert run.info.status == "FINISHED"
        assert any("val~sr_grid+step+5+" in a.path for a in c.list_artifacts(t.run_id, "images"))
        assert len(_runs_named(c, exp, name)) == 1
    finally:
        server.stop()


def test_tracker_started_while_server_down_creates_run_later(tmp_path):
    from laren.services import MLflowServer, free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    t = Tracker(uri, _name("exp"), _name(), system_metrics=False, retry_interval_s=3600)
    assert t.run_id is None  # training goes on without a run
    t.log_params({"train": {"seed": 3}})
    t.log_metrics({"train/loss_pix": 2.0}, step=0)
    with MLflowServer(tmp_path / "mlflow", port=port):
        assert t.flush(force=True) and t.run_id is not None
        t.finish()
        run = _client(uri).get_run(t.run_id)
        assert run.data.params == {"train.seed": "3"} and run.data.metrics == {"train/loss_pix": 2.0}


def test_user_errors_raise_with_what_to_do(mlflow_server):
    from laren.tracking import TrackingConfigError

    uri, exp = mlflow_server.uri, _name("exp")
    with pytest.raises(ValueError, match="tracking.experiment"):
        Tracker(uri, "", _name(), system_metrics=False)
    Tracker(uri, exp, _name(), system_metrics=False).finish()
    c = _client(uri)
    c.delete_experiment(c.get_experiment_by_name(exp).experiment_id)
    with pytest.raises(TrackingConfigError, match=f"{exp}.*deleted.*restore"):
        Tracker(uri, exp, _name(), system_metrics=False)
    t = Tracker(uri, _name("exp"), _name(), system_metrics=False)
    with pytest.raises(ValueError, match="uint8"):
        t.log_image(np.zeros((4, 4, 3), np.float32), "val/sr_grid", 0)
    with pytest.raises(ValueError, match="metric name"):
        t.log_metrics({"val/psnr@64": 1.0}, step=0)
    t.finish()
