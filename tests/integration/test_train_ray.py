"""Ray Train end to end on real services: shards on the local S3 server, checkpoints to s3://, metrics to an MLflow
server, 2 CPU workers (gloo), on the session's Ray instance.

One uninterrupted run, `laren train JOB.yaml --storage s3://...` (run id: the job's deterministic name), is the
reference of the module. On it, in file order: what it logged and stored; eval and upscale from its S3 checkpoint; a
run whose worker is SIGKILLed mid-run resumes within the same fit() and reproduces its curve; a corrupted latest
checkpoint, handed over by Ray, makes the next run fall back to the previous one (redoing steps 6-10 of the
reference's MLflow run); and running the finished job again, without Ray's record, starts no worker.

Tiny sizes: 32x32 HR, 8x8 LR, H=32, 4 GDM nodes, batch 4; 10 steps, checkpoints at steps 5 and 10.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration._ray_s3 import ray_with_s3_data
from tests.unit.test_train_loop import loss_curve, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

BUCKET = "laren-train-it"
EXPERIMENT = "tiny-ray"
RUNS = f"s3://{BUCKET}/storage/runs"  # where Ray Train keeps the runs (`laren train --storage`)
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the reported checkpoints


@pytest.fixture(scope="module")
def env(s3_server, mlflow_server, local_ray, tmp_path_factory):
    """AWS_* pointing at the S3 server for the whole module (the session Ray instance's workers have them from its
    node) and a tiny dataset on S3."""
    work = tmp_path_factory.mktemp("train-ray")
    with ray_with_s3_data(s3_server, BUCKET, work) as data:
        yield {"data": data, "uri": mlflow_server.uri, "work": work}


def _cfg(env):
    return tiny_config(
        env["data"], env["uri"],
        resources=dict(num_workers=2, cpus_per_worker=1),
        storage=dict(root=f"s3://{BUCKET}/storage"),
        tracking=dict(experiment=EXPERIMENT, system_metrics=True, system_metrics_interval_s=1.0),
        train=dict(max_failures=2, keep_checkpoints=2),
    )


def _laren_train(job: Path) -> dict[str, Any]:
    """`laren train JOB --storage RUNS` in this process (the session's Ray instance); its printed final metrics."""
    from click.testing import CliRunner

    from laren.cli import main

    r = CliRunner().invoke(main, ["train", str(job), "--storage", RUNS])
    assert r.exit_code == 0, r.output
    return json.JSONDecoder().raw_decode(r.output, r.output.rindex("{\n"))[0]


@pytest.fixture(scope="module")
def job(env) -> Path:
    cfg = _cfg(env)
    path = env["work"] / "jobs" / "tiny.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({**cfg.to_dict(), "kind": "train"}))
    return path


@pytest.fixture(scope="module")
def reference(env, job):
    """The uninterrupted 10-step run (checkpoints at steps 5 and 10): `laren train JOB.yaml`."""
    return _laren_train(job)


def test_trains_on_two_workers_and_logs_everything(env, reference):
    from mlflow.tracking import MlflowClient

    from laren.data import storage

    run_id = _cfg(env).run_id
    assert reference["step"] == 10 and reference["run_id"] == run_id
    ck = reference["checkpoint"]
    assert ck == f"{RUNS}/{run_id}/checkpoint_000000010"
    state = json.loads(storage.read_bytes(storage.join(ck, "state.json")))
    assert state["step"] == 10 and state["kimg"] == pytest.approx(0.04) and len(state["rng"]) == 2
    assert state["data_batch"] > 0 and state["mlflow_run_id"]

    c = MlflowClient(env["uri"])
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_id}'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == state["mlflow_run_id"]
    assert run.data.params["model.gdm.num_nodes"] == "4" and run.data.params["world_size"] == "2"
    # metrics by step
    steps = [s for s, _ in loss_curve(env["uri"], EXPERIMENT, run_id)]
    assert steps == list(range(1, 11))
    for key in ("val/psnr", "val/ssim", "val/lpips_alex", "train/lr", "perf/images_per_s", "data/skipped"):
        assert key in run.data.metrics, key
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/psnr")] == [5, 10]
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    # artifacts: resolved config, sample grids (one per evaluation), final weights
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"resolved_config.yaml", "final_checkpoint", "images"} <= arts
    resolved = yaml.safe_load(Path(c.download_artifacts(run.info.run_id, "resolved_config.yaml")).read_text())
    assert resolved["name"] == "tiny" and resolved["model"]["gdm"]["num_nodes"] == 4 and resolved["resources"]["num_workers"] == 2
    grids = [a.path for a in c.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png") and "val" in a.path]
    assert len(grids) >= 2, grids
    final = {a.path.split("/")[-1] for a in c.list_artifacts(run.info.run_id, "final_checkpoint")}
    assert {"weights.safetensors", "optim.safetensors", "state.json"} <= final


def test_eval_and_upscale_from_s3_checkpoint(env, reference, tmp_path):
    import numpy as np
    from click.testing import CliRunner
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from laren.cli import main

    out = tmp_path / "eval"
    r = CliRunner().invoke(main, ["eval", "--checkpoint", reference["checkpoint"], "--data", env["data"], "--out", str(out),
                                  "--limit", "6", "--tracking-uri", env["uri"], "--experiment", EXPERIMENT])
    assert r.exit_code == 0, r.output
    rows = (out / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("key,psnr,ssim") and len(rows) == 7
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 6 and summary["step"] == 10
    psnrs = [float(x.split(",")[1]) for x in rows[1:]]
    assert summary["test/psnr"] == pytest.approx(np.mean(psnrs), abs=1e-5)
    c = MlflowClient(env["uri"])
    exp = c.get_experiment_by_name(EXPERIMENT)
    ev = c.search_runs([exp.experiment_id], filter_string="tags.`laren.kind` = 'eval'")
    assert len(ev) == 1 and ev[0].data.metrics["test/psnr"] == pytest.approx(summary["test/psnr"])

    # upscale: 8x8 input -> 32x32; a wrong size is a clear error unless --resize
    lr = tmp_path / "lr.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(lr)
    big = tmp_path / "big.png"
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(big)
    r = CliRunner().invoke(main, ["upscale", "--checkpoint", reference["checkpoint"], str(lr), "--out", str(tmp_path / "sr")])
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "sr" / "lr_sr.png")).shape == (32, 32, 3)
    r = CliRunner().invoke(main, ["upscale", "--checkpoint", reference["checkpoint"], str(big), "--out", str(tmp_path / "sr")])
    assert r.exit_code != 0 and "30x20" in r.output and "8x8" in r.output and "--resize" in r.output
    r = CliRunner().invoke(main, ["upscale", "--checkpoint", reference["checkpoint"], str(big), "--out", str(tmp_path / "sr"),
                                  "--resize"])
    assert r.exit_code == 0, r.output
    assert np.asarray(Image.open(tmp_path / "sr" / "big_sr.png")).shape == (32, 32, 3)


def test_killed_worker_resumes_from_last_checkpoint(env, reference, monkeypatch, tmp_path):
    from mlflow.tracking import MlflowClient

    from laren.train.distributed import run_training
    from laren.train.faults import KillOnce

    marker = tmp_path / "killed"
    kill = KillOnce(7, rank=1, marker=str(marker))  # checkpoints at 5 and 10: steps 6-7 are redone
    out = run_training(_cfg(env), run_id="tiny-fault", on_step=kill)
    assert marker.is_file() and "step 7" in marker.read_text()  # the worker process really was killed
    assert out["step"] == reference["step"] == 10

    c = MlflowClient(env["uri"])
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'tiny-fault'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one MLflow run, continued after the restart
    curve = loss_curve(env["uri"], EXPERIMENT, "tiny-fault")
    steps = [s for s, _ in curve]
    rewind = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    first, second = steps[:rewind], steps[rewind:]
    assert first == list(range(1, first[-1] + 1)) and 5 <= first[-1] <= 7
    assert second == list(range(6, 11))  # continues from the step-5 checkpoint, not from step 1
    assert first[-1] - 5 <= 5  # at most one checkpoint interval redone
    # The resumed run reproduces the uninterrupted one (weights, optimizer, data position and RNG restored).
    ref = dict(loss_curve(env["uri"], EXPERIMENT, reference["run_id"]))
    for s, v in curve:
        assert v == pytest.approx(ref[s], rel=1e-5), (s, v, ref[s])


def test_corrupted_latest_checkpoint_resume_falls_back_to_previous(env, job, reference):
    """Damage checkpoint 10's weights in S3 and run the job again: Ray hands the workers checkpoint 10, which fails
    its checksum; they resume from checkpoint 5, redo steps 6-10 exactly as the first time, and write a new, complete
    checkpoint 10. (After the tests that read the reference's curve: its MLflow run gains steps 6-10 a second time.)"""
    from laren.data import storage
    from laren.train import state as S

    ck10, run_id = reference["checkpoint"], reference["run_id"]
    # Preconditions: Ray holds its record of checkpoint 10 (from the reference run), which logged steps 1-10 once.
    assert storage.exists(f"{RUNS}/{run_id}/{SNAPSHOT}")
    assert [s for s, _ in loss_curve(env["uri"], EXPERIMENT, run_id)] == list(range(1, 11))
    good = storage.read_bytes(storage.join(ck10, S.WEIGHTS_FILE))
    storage.write_bytes(storage.join(ck10, S.WEIGHTS_FILE), good[: len(good) // 2])  # a truncated object

    second = _laren_train(job)
    assert second["step"] == 10
    curve = loss_curve(env["uri"], EXPERIMENT, run_id)
    assert [s for s, _ in curve] == list(range(1, 11)) + list(range(6, 11))  # resumed after step 5, not at 0 or 10
    first_pass = dict(curve[:10])
    for s, v in curve[10:]:
        assert v == pytest.approx(first_pass[s], rel=1e-5), (s, v, first_pass[s])
    # The damaged checkpoint 10 was replaced by a complete one (checksums verified), written by the resumed run.
    assert second["checkpoint"] == ck10
    with tempfile.TemporaryDirectory() as d:
        S.fetch_checkpoint(ck10, d)
        assert S.read_state(d)["step"] == 10


def test_the_finished_job_again_trains_nothing(env, job, reference):
    """The same job again, with Ray's record of its checkpoints deleted first (laren finds them on storage), starts
    no worker: it returns the final metrics, and the one, finished, MLflow run gains no attempt, metric or end time."""
    from mlflow.tracking import MlflowClient

    from laren.data import storage
    from laren.progress import ATTEMPTS_TAG

    run_id = reference["run_id"]
    snapshot = f"{RUNS}/{run_id}/{SNAPSHOT}"
    storage.delete(snapshot)
    assert not storage.exists(snapshot)
    c = MlflowClient(env["uri"])

    def the_run():
        runs = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id],
                             filter_string=f"attributes.run_name = '{run_id}'")
        assert len(runs) == 1
        return runs[0]

    before, curve = the_run(), loss_curve(env["uri"], EXPERIMENT, run_id)
    assert before.info.status == "FINISHED"
    again = _laren_train(job)
    assert again["step"] == 10 and again["checkpoint"] == reference["checkpoint"] and again["run_id"] == run_id
    for k in ("val/psnr", "val/ssim", "train/loss_g", "kimg"):
        assert again[k] == pytest.approx(reference[k], rel=1e-5), k
    assert loss_curve(env["uri"], EXPERIMENT, run_id) == curve
    after = the_run()
    assert after.info.status == "FINISHED" and after.info.end_time == before.info.end_time  # not closed again
    assert after.data.tags[ATTEMPTS_TAG] == before.data.tags[ATTEMPTS_TAG]  # no worker started an attempt
    assert not storage.exists(snapshot)  # and Ray Train recorded no checkpoint of it
