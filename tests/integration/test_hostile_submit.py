"""`laren submit` on a real local Ray head from a project path with a space and a ';', with credentials in the shell:
the job runs (the entrypoint is quoted) and its runtime env, as the Jobs API returns it, holds no credential."""

from __future__ import annotations

import pytest

from laren.jobs import client as S
from laren.specs import load_job
from tests.integration._tiny_jobs import job_env, make_data, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_local_submit_from_path_with_spaces_sends_no_credentials(ray_head, mlflow_server, tmp_path, monkeypatch):
    from ray.job_submission import JobSubmissionClient

    secrets = {"AWS_SECRET_ACCESS_KEY": "sentinel-s3-secret", "AWS_ACCESS_KEY_ID": "AKSENTINEL",
               "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-pw"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    project = tmp_path / "my project;x"
    data = make_data(project)
    job = tiny_job(project, "spaces", data, steps=2, eval_every=2, ckpt_every=2)
    env = job_env(project, mlflow_server.uri.replace("http://", "http://laren:url-pw/@x@"))
    addr = ray_head.dashboard_url
    sub = S.submit(job, address=addr, working_dir=project, env=env, log=lambda *_: None)
    assert sub.run_id == load_job(job).run_id and "'" in sub.entrypoint  # the project path is quoted
    assert S.wait(sub.run_id, addr, timeout_s=240) == "SUCCEEDED", S.logs(sub.run_id, addr)[-3000:]
    assert list((project / "storage" / "runs" / sub.run_id).glob("checkpoint_*"))
    info = JobSubmissionClient(addr).get_job_info(sub.run_id)
    text = repr(info.runtime_env) + repr(info.entrypoint) + repr(info.metadata)
    for value in [*secrets.values(), "url-pw/@x"]:
        assert value not in text
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == mlflow_server.uri.replace("http://", "http://laren@")
