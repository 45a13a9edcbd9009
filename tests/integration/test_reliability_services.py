"""Reliability against real services on 127.0.0.1: the S3 server restarted mid-stream and the MLflow server down for a
while. In both, training goes on, and the run ends with nothing lost: every step's metrics in MLflow (equal to an
uninterrupted run's), every checkpoint complete, no bad or skipped samples.

The worker loop runs in this process (``train_worker``, world size 1) with a ``report`` hook: it receives each
checkpoint exactly where Ray Train would (a finished directory), takes it over as Ray Train does (moving it aside), and
injects the fault at a chosen step.
Every faulty run is compared with one uninterrupted run of the same model, data and seed (``reference``: local
shards, no loader worker, a checkpoint every 2 steps, MLflow in SQLite); the faulty runs differ from it only where
their fault needs it (shards in S3 read by a loader worker; checkpoints at steps 5 and 10), which the loss curve and
the evaluations do not depend on. The two MLflow outages share one server of the module's own.
Tiny sizes: 32x32 HR, 8x8 LR, H=32, 4 GDM nodes, 10 steps of batch 4 (evaluations at steps 5 and 10).
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import pytest

from tests.unit.test_train_loop import loss_curve, make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


class Hooked:
    """A ``report`` function for :class:`laren.train.loop.WorkerContext` that takes each checkpoint over as Ray Train's
    does (moved to ``ck_root``: the loop leaves the folder to ``report``) and calls ``faults[step]()`` once when the
    loop reports at that step."""

    def __init__(self, ck_root: Path, faults: Optional[dict[int, Callable[[], None]]] = None):
        self.ck_root, self.faults, self.steps = ck_root, dict(faults or {}), []

    def __call__(self, metrics: dict, ck_dir: Optional[str], name: Optional[str]) -> None:
        step = int(metrics["step"])
        self.steps.append(step)
        if ck_dir:
            self.ck_root.mkdir(parents=True, exist_ok=True)
            shutil.move(ck_dir, self.ck_root / name)
        fault = self.faults.pop(step, None)
        if fault is not None:
            fault()


def run_loop(cfg, run_id: str, report=None, **ctx):
    from laren.train.loop import WorkerContext, train_worker

    return train_worker(cfg, WorkerContext(run_id=run_id, report=report, **ctx))


CKPT_EVERY = dict(checkpoint_every_kimg=0.008)  # reports (checkpoints) at steps 2, 4, 6, 8, 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (MLflow run ``ref`` in a SQLite store); yields its data, tracking URI and final metrics."""
    work = tmp_path_factory.mktemp("rel-services")
    data = make_tiny_dataset(str(work / "shards"), work)
    uri = f"sqlite:///{work}/ref.db"
    out = run_loop(tiny_config(data, uri, train=CKPT_EVERY), "ref")
    return {"data": data, "uri": uri, "out": out}


@pytest.fixture(scope="module")
def _outage_server(tmp_path_factory):
    from laren.services import MLflowServer

    server = MLflowServer(tmp_path_factory.mktemp("mlflow-outage"))
    yield server
    server.stop()


@pytest.fixture
def mlflow_outage_server(_outage_server):
    """An MLflow server of this module's own, running when the test starts; the test stops it and starts it again
    (same port, same store)."""
    if not _outage_server.running:  # first use, or a previous test failed while it was down
        _outage_server.start()
    return _outage_server


def assert_complete_checkpoints(ck_root: Path, steps: list[int]) -> None:
    """Each checkpoint directory exists and verifies (state.json present, sha256 of both tensor files)."""
    from laren.train.state import read_state

    for s in steps:
        doc = read_state(ck_root / f"checkpoint_{s:09d}")
        assert doc["step"] == s


# ----------------------------------------------------------------------------------------------- S3 restart


def test_s3_server_restarted_mid_stream_training_continues(reference, tmp_path, monkeypatch):
    """The S3 server holding the shards is stopped right after the step-5 checkpoint and started again 3 s later (same
    port, same data dir). The data stream, the evaluation reads and the next pass's shard opens wait and retry; the run
    reproduces the uninterrupted run's loss curve exactly (no sample lost, repeated or skipped)."""
    from laren.services import S3Server

    s3 = S3Server(tmp_path / "s3").start()
    try:
        for k, v in s3.env().items():
            monkeypatch.setenv(k, v)
        s3.create_bucket("rel")
        data = make_tiny_dataset("s3://rel/tiny", tmp_path)
        uri = f"sqlite:///{tmp_path}/mlflow.db"
        cfg = tiny_config(data, uri, data=dict(loader_workers=1))  # checkpoints at 5 and 10
        ref = reference["out"]

        restarted = {}

        def outage() -> None:
            s3.stop()  # the next reads (a new data pass at step 7, evaluation at step 10) find no server

            def back() -> None:
                time.sleep(3.0)
                s3.start()
                restarted["t"] = time.time()

            threading.Thread(target=back, daemon=True).start()

        hook = Hooked(tmp_path / "ck", {5: outage})
        out = run_loop(cfg, "outage", report=hook)
        assert "t" in restarted  # the server really went away and came back during the run
        assert out["step"] == 10 and out["data/skipped"] == 0
        assert hook.steps == [5, 10]
        assert_complete_checkpoints(tmp_path / "ck", [5, 10])
        curve, ref_curve = loss_curve(uri, "tiny", "outage"), loss_curve(reference["uri"], "tiny", "ref")
        assert [s for s, _ in curve] == list(range(1, 11))
        assert curve == ref_curve  # the same batches in the same order
        assert out["val/psnr"] == ref["val/psnr"] and out["val/images"] == 8  # evaluation read every image
        # The last steps ran after the restart: training waited for the server rather than failing or skipping.
        from mlflow.tracking import MlflowClient

        c = MlflowClient(uri)
        run = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "attributes.run_name = 'outage'")[0]
        last = max(m.timestamp for m in c.get_metric_history(run.info.run_id, "val/psnr"))
        assert last / 1000.0 >= restarted["t"] - 1.0
    finally:
        s3.stop()


# ----------------------------------------------------------------------------------------------- MLflow outage


@pytest.mark.slow
def test_mlflow_server_down_for_a_while_metrics_arrive_afterwards(reference, mlflow_outage_server, tmp_path):
    """The MLflow server is stopped after step 2 and started again (same port, same store) at step 8. Training goes on;
    the metrics of steps 3-7 and the step-5 sample grid are buffered and arrive once the server is back."""
    from mlflow.tracking import MlflowClient

    server = mlflow_outage_server
    cfg = tiny_config(reference["data"], server.uri, train=CKPT_EVERY)
    down = {}

    def stop() -> None:
        server.stop()
        down["t"] = time.time()

    def start() -> None:
        down["s"] = time.time() - down["t"]
        server.start()

    hook = Hooked(tmp_path / "ck", {2: stop, 8: start})
    out = run_loop(cfg, "mlflow-outage", report=hook)
    assert out["step"] == 10 and down["s"] > 1.0
    assert_complete_checkpoints(tmp_path / "ck", [2, 4, 6, 8, 10])

    c = MlflowClient(server.uri)
    runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "attributes.run_name = 'mlflow-outage'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert out["mlflow_run_id"] == run.info.run_id
    # Every step's loss, equal to the uninterrupted run's; both evaluations; params from before the outage.
    assert loss_curve(server.uri, "tiny", "mlflow-outage") == loss_curve(reference["uri"], "tiny", "ref")
    for key in ("train/loss_pix", "train/lr", "perf/images_per_s", "data/skipped"):
        assert [m.step for m in c.get_metric_history(run.info.run_id, key)] == list(range(1, 11)), key
    assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "val/psnr")) == [5, 10]
    assert run.data.params["model.gdm.num_nodes"] == "4"
    # Artifacts queued during the outage (step-5 sample grid) and after it (final checkpoint) were uploaded.
    images = [a.path for a in c.list_artifacts(run.info.run_id, "images")]
    assert sum("val" in p and p.endswith(".png") for p in images) >= 2, images
    final = {a.path.split("/")[-1] for a in c.list_artifacts(run.info.run_id, "final_checkpoint")}
    assert {"weights.safetensors", "optim.safetensors", "state.json"} <= final
    assert "resolved_config.yaml" in {a.path for a in c.list_artifacts(run.info.run_id)}


@pytest.mark.slow
def test_mlflow_server_down_until_the_end_loses_nothing_after_sync(reference, mlflow_outage_server, tmp_path):
    """The MLflow server is stopped at step 5 (after its evaluation was logged) and stays down until the run has ended. The unsent records (params,
    metrics, sample grids, the run's end status) are written to the run's storage folder; once the server is back,
    `laren tracking sync RUN` replays them, and the run's metrics equal an uninterrupted run's."""
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient

    from laren.cli import main

    storage_root = str(tmp_path / "storage")
    server = mlflow_outage_server
    cfg = tiny_config(reference["data"], server.uri, storage=dict(root=storage_root))  # checkpoints at 5 and 10
    hook = Hooked(tmp_path / "ck", {5: server.stop})
    out = run_loop(cfg, "mlflow-down", report=hook)
    assert out["step"] == 10
    buffers = list((tmp_path / "storage" / "runs" / "mlflow-down" / "tracking-buffer").glob("*.json"))
    assert len(buffers) == 1
    server.start()
    c = MlflowClient(server.uri)
    run = c.search_runs([c.get_experiment_by_name("tiny").experiment_id], "attributes.run_name = 'mlflow-down'")[0]
    assert run.info.status == "RUNNING" and max(m.step for m in c.get_metric_history(run.info.run_id, "train/loss_g")) == 5

    res = CliRunner().invoke(main, ["tracking", "sync", "mlflow-down", "--storage", storage_root, "--tracking-uri", server.uri])
    assert res.exit_code == 0 and "1 buffer file(s) replayed" in res.output, res.output
    assert not list(buffers[0].parent.glob("*.json"))  # replayed once: a second sync has nothing to do
    run = c.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert loss_curve(server.uri, "tiny", "mlflow-down") == loss_curve(reference["uri"], "tiny", "ref")
    ref = MlflowClient(reference["uri"])
    ref_run = ref.search_runs([ref.get_experiment_by_name("tiny").experiment_id], "attributes.run_name = 'ref'")[0]
    for key in ref_run.data.metrics:
        if key.startswith("perf/"):  # timings differ between two runs
            continue
        got = [(m.step, m.value) for m in sorted(c.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        want = [(m.step, m.value) for m in sorted(ref.get_metric_history(ref_run.info.run_id, key), key=lambda m: m.step)]
        assert got == want, key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "perf/images_per_s")] == list(range(1, 11))
    images = [a.path for a in c.list_artifacts(run.info.run_id, "images")]
    assert sum("val" in p and p.endswith(".png") for p in images) >= 2, images  # the step-10 grid came by sync
    res = CliRunner().invoke(main, ["tracking", "sync", "mlflow-down", "--storage", storage_root, "--tracking-uri", server.uri])
    assert res.exit_code == 0 and "nothing to replay" in res.output
