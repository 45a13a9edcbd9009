"""`laren submit` against a real local Ray head (Jobs API) and MLflow server: submit -> status -> logs -> finished,
the CLI follow-up commands, and a real training job (hostile project path, credentials in the shell, weights from S3)
that fails and resumes from its checkpoint when submitted again."""

from __future__ import annotations

import io
import json
import shlex

import pytest
import torch
from click.testing import CliRunner

from laren.cli import main
from laren.data import storage
from laren.jobs import client as S
from laren.losses import random_vgg16
from laren.metrics import AlexNetFeatures
from laren.plan import read_plan
from laren.render import render_k8s_file, to_yaml
from laren.specs import load_job
from tests.integration._tiny_jobs import job_env, make_data, mlflow_runs, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

WEIGHTS_BUCKET = "laren-weights"
VGG = f"s3://{WEIGHTS_BUCKET}/weights/vgg16-397923af.pth"
ALEX = f"s3://{WEIGHTS_BUCKET}/weights/alexnet-owt-7be5be79.pth"


def _put_state(url: str, module: torch.nn.Module) -> None:
    """``module``'s state dict as a torchvision-format weights file (torch.save) at ``url``."""
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    storage.write_bytes(url, buf.getvalue())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_submit_status_logs_finished(ray_head, mlflow_server, tmp_path, data):
    job = tiny_job(tmp_path, "hello", data)
    addr = ray_head.dashboard_url
    sub = S.submit(job, address=addr, working_dir=tmp_path, env=job_env(tmp_path, mlflow_server.uri),
                   entrypoint="python -c \"import os; print('hello from', os.path.basename(os.getcwd()) != '', 'laren')\"")
    assert sub.action == "submitted" and sub.run_id == load_job(job).run_id
    assert sub.commands == [f"laren status {sub.run_id} --address {addr}", f"laren logs {sub.run_id} -f --address {addr}",
                            f"laren stop {sub.run_id} --address {addr}"]
    assert sub.mlflow_url.startswith(mlflow_server.uri) and "experiments/" in sub.mlflow_url
    assert S.status(sub.run_id, addr) in ("PENDING", "RUNNING", "SUCCEEDED")
    assert S.wait(sub.run_id, addr, timeout_s=120) == "SUCCEEDED"
    assert "hello from True laren" in S.logs(sub.run_id, addr)

    r = CliRunner()
    out = r.invoke(main, ["status", sub.run_id, "--address", addr])
    assert out.exit_code == 0 and f"{sub.run_id}: SUCCEEDED" in out.output
    out = r.invoke(main, ["status", str(job), "--address", addr])  # a job file names its run
    assert f"{sub.run_id}: SUCCEEDED" in out.output
    out = r.invoke(main, ["status", sub.run_id, "--address", ray_head.address])  # the GCS address: Ray tells the URL
    assert out.exit_code == 0 and f"{sub.run_id}: SUCCEEDED" in out.output, out.output
    out = r.invoke(main, ["logs", "hello", "--address", addr])  # a job name: its latest submission
    assert "hello from True laren" in out.output
    out = r.invoke(main, ["list", "--address", addr])
    assert sub.run_id in out.output and "SUCCEEDED" in out.output and "jobs/hello.yaml" in out.output

    # A finished job is not run again under the same id.
    again = S.submit(job, address=addr, working_dir=tmp_path, env=job_env(tmp_path, mlflow_server.uri), entrypoint="false")
    assert again.action == "finished" and S.status(sub.run_id, addr) == "SUCCEEDED"


def test_stop_and_unknown_run(ray_head, mlflow_server, tmp_path, data):
    job = tiny_job(tmp_path, "sleeper", data)
    addr = ray_head.dashboard_url
    sub = S.submit(job, address=addr, working_dir=tmp_path, env=job_env(tmp_path, mlflow_server.uri),
                   entrypoint="python -c \"import time; time.sleep(120)\"")
    running = S.submit(job, address=addr, working_dir=tmp_path, env=job_env(tmp_path, mlflow_server.uri), entrypoint="false")
    assert running.action == "running"
    out = CliRunner().invoke(main, ["stop", sub.run_id, "--address", addr])
    assert out.exit_code == 0 and "stop requested" in out.output
    assert S.wait(sub.run_id, addr, timeout_s=60) == "STOPPED"
    out = CliRunner().invoke(main, ["status", "no-such-job", "--address", addr])
    assert out.exit_code == 2 and "no job 'no-such-job'" in out.output


@pytest.mark.slow
def test_real_job_with_s3_weights_fails_and_resumes_when_submitted_again(ray_head, mlflow_server, s3_env, tmp_path,
                                                                         monkeypatch):
    """A training job as a user submits it:
    - from a project folder whose path holds a space and a ';' (the entrypoint is quoted; the shards lie there too),
      with the S3 secret key and MLflow passwords in the submitting environment and in the job's explicit environment,
      none of which reaches the job's runtime env;
    - its VGG16 and AlexNet weights are s3:// URLs on the local S3 server (the session Ray head's node holds the S3
      keys): the job passes the input checks and trains with them (perceptual loss, LPIPS), each object downloaded once
      into the node cache for both attempts; a missing object is refused by `laren submit` itself, naming the URL;
    - attempt 1 is killed at step 6 (after its step-4 checkpoint) and FAILS; resubmitting continues from step 4, found
      on storage even when Ray Train has no record of it; one MLflow run; `laren status` tells the two attempts apart;
    - the same job rendered for KubeRay carries the same weight URLs and none of the S3 keys."""
    from ray.job_submission import JobSubmissionClient

    project = tmp_path / "my project;x"
    data = make_data(project)
    s3_env.create_bucket(WEIGHTS_BUCKET)
    _put_state(VGG, random_vgg16(0))
    _put_state(ALEX, AlexNetFeatures())
    weights = dict(loss={"perceptual_weight": 0.01, "vgg16_path": VGG}, eval={"alexnet_path": ALEX})
    job = tiny_job(project, "resume", data, steps=8, eval_every=4, ckpt_every=4, **weights)
    run_id = load_job(job).run_id
    # The secrets in the submitting environment: the S3 secret key (s3_env) and an MLflow password; the S3 access key
    # id ("laren") is no secret, but no credential variable may reach the job (below).
    secrets = {"AWS_SECRET_ACCESS_KEY": s3_env.secret_key, "MLFLOW_TRACKING_PASSWORD": "sentinel-mlflow-pw"}
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secrets["MLFLOW_TRACKING_PASSWORD"])
    env = {**job_env(project, mlflow_server.uri.replace("http://", "http://laren:url-pw/@x@")),
           "AWS_SECRET_ACCESS_KEY": secrets["AWS_SECRET_ACCESS_KEY"],  # given explicitly: runtime_env_vars drops it
           "LAREN_CACHE": str(tmp_path / "node-cache"),
           "LAREN_TEST_KILL_AT_STEP": "6", "LAREN_TEST_KILL_RANK": "0", "LAREN_TEST_KILL_MARKER": str(tmp_path / "killed-once")}

    missing = tiny_job(project, "s3w-missing", data, loss={"perceptual_weight": 0.01, "vgg16_path": VGG + ".nope"})
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth\.nope"):
        S.submit(missing, address="http://127.0.0.1:9", working_dir=project, env=env)  # refused before Ray

    addr = ray_head.dashboard_url
    first = S.submit(job, address=addr, working_dir=project, env=env, log=lambda *_: None)
    plan = project / "storage" / "runs" / run_id / "plan.json"  # planned by submit; the job runs the plan
    assert first.action == "submitted" and first.entrypoint.endswith(f"laren.cli run-plan {shlex.quote(str(plan))}")
    assert "'" in first.entrypoint  # the project path is quoted
    p = read_plan(str(plan))
    assert p.run_id == run_id and p.inputs["loss.vgg16_path"] == VGG and p.inputs["eval.alexnet_path"] == ALEX
    info = JobSubmissionClient(addr).get_job_info(run_id)
    text = repr(info.runtime_env) + repr(info.entrypoint) + repr(info.metadata)
    for value in [*secrets.values(), "url-pw/@x"]:
        assert value not in text
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"} & set(info.runtime_env["env_vars"])
    assert info.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == mlflow_server.uri.replace("http://", "http://laren@")

    assert S.wait(run_id, addr, timeout_s=180) == "FAILED", S.logs(run_id, addr)[-3000:]
    assert (tmp_path / "killed-once").exists()
    run_dir = project / "storage" / "runs" / run_id
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*") if p.is_dir()) == ["checkpoint_000000004"]
    cache = tmp_path / "node-cache" / "objects"
    downloads = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir() if p.suffix == ".pth"}
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if snapshot.exists():
        # Ray Train's controller recorded the step-4 report before the kill. Take its record away, as a report lost
        # to a worker that dies before the controller's next poll does, so that the resume from storage alone (laren's
        # fallback: laren/train/distributed.py) is always covered.
        assert "checkpoint_000000004" in snapshot.read_text()
        snapshot.unlink()

    second = S.submit(job, address=addr, working_dir=project, env=env, log=lambda *_: None)
    assert second.action == "resumed" and second.previous_status == "FAILED" and second.run_id == run_id
    assert second.entrypoint == first.entrypoint and read_plan(str(plan)).run_id == run_id
    assert S.wait(run_id, addr, timeout_s=180) == "SUCCEEDED", S.logs(run_id, addr)[-3000:]
    assert list((project / ".laren" / "logs").glob(f"{run_id}.attempt-1.log"))  # attempt 1's logs are kept
    logs = S.logs(run_id, addr)
    assert logs.count(f"[{run_id}] kimg 0.032/0.032 (100%)") == 1, logs[-3000:]  # each progress line once

    # One MLflow run; steps 1..4 were trained once (the resumed attempt started at the checkpoint, not at step 0).
    c, runs = mlflow_runs(mlflow_server.uri, "resume")
    assert list(runs) == [run_id]
    hist = c.get_metric_history(runs[run_id].info.run_id, "train/loss_g")
    steps = [m.step for m in hist]
    assert sorted(set(steps)) == list(range(1, 9))
    assert all(steps.count(s) == 1 for s in range(1, 5)), steps
    assert runs[run_id].info.status == "FINISHED"
    # Trained with the weights from S3, each downloaded once on this node.
    m, params = runs[run_id].data.metrics, runs[run_id].data.params
    assert m["train/loss_per"] > 0 and 0 < m["val/lpips_alex"] < 1, m
    assert params["loss.vgg16_path"] == VGG and params["eval.alexnet_path"] == ALEX
    cached = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.iterdir() if p.suffix == ".pth"}
    assert sorted(n.split("-", 1)[1] for n in cached) == ["alexnet-owt-7be5be79.pth", "vgg16-397923af.pth"]
    assert cached == downloads  # attempt 2 used attempt 1's copies: not downloaded again
    state = json.loads((run_dir / "checkpoint_000000008" / "state.json").read_text())
    assert state["step"] == 8 and state["mlflow_run_id"] == runs[run_id].info.run_id

    # `laren status` shows the two attempts and why the first one ended (killed: no error report from it)
    out = CliRunner().invoke(main, ["status", run_id, "--address", addr, "--tracking-uri", mlflow_server.uri])
    assert f"{run_id}: SUCCEEDED" in out.output and "progress: kimg 0.032/0.032 (100%)" in out.output, out.output
    assert "attempts: 2" in out.output and "last failure: attempt 1 ended without an error report" in out.output

    # KubeRay: the same URLs, and the pods' credentials as secret references only.
    monkeypatch.setenv("LAREN_STORAGE", f"s3://{WEIGHTS_BUCKET}/storage")
    docs = render_k8s_file(job, warn=lambda *_: None)
    text = to_yaml(docs)
    assert VGG in text and ALEX in text and secrets["AWS_SECRET_ACCESS_KEY"] not in text
    cs = next(d for d in docs if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]
    for pod in [cs["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cs["workerGroupSpecs"])]:
        pod_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]}
        assert pod_env["MLFLOW_TRACKING_PASSWORD"] == {"name": "laren-credentials", "key": "MLFLOW_TRACKING_PASSWORD",
                                                       "optional": True}


def test_cli_submit_follows_logs_by_default_and_detach_returns_at_once(ray_head, mlflow_server, tmp_path, data,
                                                                       monkeypatch):
    """`laren submit` streams the job's logs until it ends and exits 1 when it FAILED (as `ray job submit`);
    `--detach` returns once the job is queued."""
    monkeypatch.chdir(tmp_path)  # the project shipped as working_dir
    for k, v in job_env(tmp_path, mlflow_server.uri).items():
        monkeypatch.setenv(k, v)
    addr = ray_head.dashboard_url
    script = "import sys, time; time.sleep({s}); print('line from the job'); sys.exit({rc})"
    monkeypatch.setattr(S, "job_entrypoint", lambda *a, **kw: shlex.join(["python", "-c", script.format(s=0, rc=3)]))
    out = CliRunner().invoke(main, ["submit", str(tiny_job(tmp_path, "follow", data)), "--address", addr])
    assert out.exit_code == 1, out.output
    assert "line from the job" in out.output and out.output.rstrip().endswith(": FAILED")

    monkeypatch.setattr(S, "job_entrypoint", lambda *a, **kw: shlex.join(["python", "-c", script.format(s=5, rc=0)]))
    job = tiny_job(tmp_path, "detached", data)
    out = CliRunner().invoke(main, ["submit", str(job), "--address", addr, "--detach"])
    run_id = load_job(job).run_id
    assert out.exit_code == 0 and "line from the job" not in out.output, out.output
    assert S.status(run_id, addr) in ("PENDING", "RUNNING")
    assert S.wait(run_id, addr, timeout_s=120) == "SUCCEEDED"
