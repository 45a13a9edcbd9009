"""Credentials never reach MLflow params, tags, artifacts, checkpoints or logs.

A Ray Train run (2 gloo workers) reads shards from an S3 server with its own access key and secret, writes its
checkpoints there, and logs to an MLflow server through a tracking URI that carries a password (``user:pw@host``), with
``MLFLOW_TRACKING_PASSWORD`` set as well. Afterwards every place the run wrote is scanned for each secret value: the
MLflow store (params, tags, metrics, every artifact file, the server's database and log), every object the run wrote
to S3 (checkpoints, Ray Train's run state), the Ray session's log files, and what the driver printed.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import pytest

from tests.unit.test_train_loop import make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

BUCKET = "laren-rel-secrets"


def _files(root: Path):
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            yield p


def _leaks(blob: bytes, secrets_: dict[str, str]) -> list[str]:
    return [name for name, value in secrets_.items() if value.encode() in blob]


@pytest.mark.slow
def test_credentials_never_logged(tmp_path, capfd):
    import ray
    from mlflow.tracking import MlflowClient

    from laren.data import storage
    from laren.services import MLflowServer, S3Server
    from laren.train.distributed import ensure_ray, run_training

    tok = secrets.token_hex(6)
    creds = {"s3 access key": f"AKLAREN{tok.upper()}", "s3 secret key": f"s3-secret-{tok}",
             "mlflow url password": f"url-pw-{tok}", "mlflow env password": f"env-pw-{tok}"}
    if ray.is_initialized():
        ray.shutdown()  # the workers must be started with this test's environment
    saved = dict(os.environ)
    s3 = S3Server(tmp_path / "s3", access_key=creds["s3 access key"], secret_key=creds["s3 secret key"]).start()
    server = MLflowServer(tmp_path / "mlflow").start()
    try:
        os.environ.update(s3.env())
        os.environ.update(MLFLOW_TRACKING_USERNAME="laren", MLFLOW_TRACKING_PASSWORD=creds["mlflow env password"])
        s3.create_bucket(BUCKET)
        data = make_tiny_dataset(f"s3://{BUCKET}/datasets/tiny", tmp_path)
        uri = server.uri.replace("http://", f"http://laren:{creds['mlflow url password']}@")
        cfg = tiny_config(data, uri, resources=dict(num_workers=2, cpus_per_worker=1),
                          storage=dict(root=f"s3://{BUCKET}/storage"), tracking=dict(experiment="secrets"),
                          train=dict(total_kimg=0.02, eval_every_kimg=0.02, checkpoint_every_kimg=0.02))
        ensure_ray(num_cpus=4)
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        out = run_training(cfg, run_id="secrets")
        assert out["step"] == 5
        ray.shutdown()

        # MLflow, through its API: params, tags, metric names, every artifact file.
        c = MlflowClient(server.uri)
        run = c.search_runs([c.get_experiment_by_name("secrets").experiment_id])[0]
        assert run.data.params["tracking.tracking_uri"].startswith("http://laren:***@")  # logged, redacted
        api_text = repr(run.data.params) + repr(run.data.tags) + repr(sorted(run.data.metrics))
        assert _leaks(api_text.encode(), creds) == []
        with tempfile.TemporaryDirectory() as d:
            local = Path(c.download_artifacts(run.info.run_id, "", d))
            arts = list(_files(local))
            assert {"resolved_config.yaml", "state.json"} <= {p.name for p in arts}
            for p in arts:
                assert _leaks(p.read_bytes(), creds) == [], p
        # The MLflow server's own files (database, artifact store, log) and the S3 objects the run wrote.
        scanned = 0
        for p in _files(tmp_path / "mlflow"):
            assert _leaks(p.read_bytes(), creds) == [], p
            scanned += 1
        objects = storage.list_files(f"s3://{BUCKET}/storage")
        assert any(o.endswith("state.json") for o in objects)
        for o in objects:
            assert _leaks(storage.read_bytes(o), creds) == [], o
        # Logs: the Ray session (driver, raylet, GCS, every worker), the S3 server, what the driver printed.
        logs = list(_files(session / "logs"))
        assert any("worker" in p.name for p in logs)
        for p in logs + [s3.log_path]:
            assert _leaks(p.read_bytes(), creds) == [], p
        printed = capfd.readouterr()
        assert _leaks((printed.out + printed.err).encode(), creds) == []
        assert scanned > 0 and len(logs) > 5
    finally:
        if ray.is_initialized():
            ray.shutdown()
        server.stop()
        s3.stop()
        os.environ.clear()
        os.environ.update(saved)
