"""Weights from any storage URL, tried as a new user would: a tiny CPU job whose VGG16 and AlexNet weights are s3://
URLs on the local S3 server is submitted with `laren submit` to the session's Ray head, whose node holds the S3 keys
(tests/conftest.py); it passes the input checks and trains (perceptual loss and LPIPS computed from those weights),
each object downloaded once into the node cache. A missing object is refused by `laren submit` itself, naming the
URL. The same job rendered for KubeRay carries the same URLs and none of the S3 keys."""

from __future__ import annotations

import io

import pytest
import torch

from laren.data import storage
from laren.jobs import client as S
from laren.losses import random_vgg16
from laren.metrics import AlexNetFeatures
from laren.plan import read_plan
from laren.render import render_k8s_file, to_yaml
from laren.specs import load_job
from tests.integration._tiny_jobs import job_env, make_data, mlflow_runs, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(400)]

BUCKET = "laren-weights"
VGG, ALEX = f"s3://{BUCKET}/weights/vgg16-397923af.pth", f"s3://{BUCKET}/weights/alexnet-owt-7be5be79.pth"


def _put_state(url: str, module: torch.nn.Module) -> None:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    storage.write_bytes(url, buf.getvalue())


def test_submit_with_s3_weights_reaches_training(s3_env, ray_head, mlflow_server, tmp_path, monkeypatch):
    s3_env.create_bucket(BUCKET)
    _put_state(VGG, random_vgg16(0))
    _put_state(ALEX, AlexNetFeatures())
    data = make_data(tmp_path)
    weights = dict(loss={"perceptual_weight": 0.01, "vgg16_path": VGG}, eval={"alexnet_path": ALEX})
    job = tiny_job(tmp_path, "s3w", data, steps=2, eval_every=2, ckpt_every=2, **weights)
    env = {**job_env(tmp_path, mlflow_server.uri), "LAREN_CACHE": str(tmp_path / "node-cache")}

    missing = tiny_job(tmp_path, "s3w-missing", data, loss={"perceptual_weight": 0.01, "vgg16_path": VGG + ".nope"})
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth\.nope"):
        S.submit(missing, address="http://127.0.0.1:9", working_dir=tmp_path, env=env)  # refused before Ray

    addr = ray_head.dashboard_url
    sub = S.submit(job, address=addr, working_dir=tmp_path, env=env)
    plan = read_plan(sub.entrypoint.rsplit(" ", 1)[1])  # the job runs the plan submit wrote: these URLs
    assert plan.run_id == sub.run_id and plan.inputs["loss.vgg16_path"] == VGG and plan.inputs["eval.alexnet_path"] == ALEX
    assert S.wait(sub.run_id, addr, timeout_s=300) == "SUCCEEDED", S.logs(sub.run_id, addr)[-3000:]
    c, runs = mlflow_runs(mlflow_server.uri, "s3w")
    m = runs[sub.run_id].data.metrics
    assert m["train/loss_per"] > 0 and 0 < m["val/lpips_alex"] < 1, m
    params = runs[sub.run_id].data.params
    assert params["loss.vgg16_path"] == VGG and params["eval.alexnet_path"] == ALEX
    cached = sorted(p.name.split("-", 1)[1] for p in (tmp_path / "node-cache" / "objects").iterdir() if p.suffix == ".pth")
    assert cached == ["alexnet-owt-7be5be79.pth", "vgg16-397923af.pth"]  # one download per object on this node

    monkeypatch.setenv("LAREN_STORAGE", f"s3://{BUCKET}/storage")
    docs = render_k8s_file(job, warn=lambda *_: None)
    text = to_yaml(docs)
    assert VGG in text and ALEX in text
    assert s3_env.env()["AWS_SECRET_ACCESS_KEY"] not in text
    cs = next(d for d in docs if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]
    for pod in [cs["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in cs["workerGroupSpecs"])]:
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]}  # references only
        assert env["MLFLOW_TRACKING_PASSWORD"] == {"name": "laren-credentials", "key": "MLFLOW_TRACKING_PASSWORD",
                                                   "optional": True}
    assert load_job(job).loss.vgg16_path == VGG
