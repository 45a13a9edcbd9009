"""An MLflow server that refuses the credentials (HTTP 401 / 403) stops a run at once with one clear error line; it is
never taken for an outage (which would buffer, retry and finally drop everything).

The server is a real HTTP server on 127.0.0.1 that answers every request as MLflow's basic-auth app answers a wrong
password (the status and its body); MLflow's own auth app needs packages laren does not install (flask-wtf)."""

from __future__ import annotations

import http.server
import threading

import pytest
from click.testing import CliRunner

from laren.cli import main
from laren.tracking import Tracker, TrackingAuthError, check_tracking_auth
from tests.integration._tiny_jobs import tiny_job


@pytest.fixture(params=[401, 403])
def refusing_server(request):
    status = request.param

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b"You are not authenticated. Please see https://mlflow.org/docs/latest/auth/index.html"
            self.send_response(status)
            self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield status, f"http://laren:pw-secret-7@127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_tracker_fails_fast_on_refused_credentials(refusing_server, monkeypatch):
    status, uri = refusing_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TrackingAuthError) as e:
        Tracker(uri, "exp", "run-1", system_metrics=False)
    msg = str(e.value)
    assert f"HTTP {status}" in msg and "MLFLOW_TRACKING_USERNAME" in msg and "\n" not in msg
    assert "pw-secret-7" not in msg
    with pytest.raises(TrackingAuthError, match=f"HTTP {status}"):
        check_tracking_auth(uri, "exp")


def test_submit_says_one_line_before_queueing(refusing_server, tmp_path, monkeypatch):
    import laren.jobs.client as sub

    status, uri = refusing_server
    monkeypatch.setattr(sub, "client", lambda *a, **kw: pytest.fail("Ray was contacted"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = tiny_job(tmp_path, "auth", ("unused-train", "unused-val"))
    res = CliRunner().invoke(main, ["submit", str(job), "--detach"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: MLflow at http://laren:***@127.0.0.1") and f"HTTP {status}" in lines[0]


def test_local_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Without a server, an experiment's artifacts go beside the .db, whatever the creating process's cwd is."""
    from mlflow.tracking import MlflowClient

    from laren.tracking import create_experiment

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path)  # a worker's temporary folder would otherwise get ./mlruns
    c = MlflowClient(uri)
    exp = c.get_experiment(create_experiment(c, uri, "x"))
    assert exp.artifact_location == (tmp_path / "store" / "mlflow-artifacts").as_uri()


def test_ui_links_open_the_model_training_view_without_credentials():
    from laren.tracking import ui_url

    url = ui_url("http://user:pw@127.0.0.1:5000/", "experiments/3", searchFilter="attributes.run_name = 'a'")
    assert url == ("http://user:***@127.0.0.1:5000/#/experiments/3?searchFilter=attributes.run_name%20%3D%20%27a%27"
                   "&workflowType=machine_learning")
