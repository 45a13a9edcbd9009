"""A Ray Train run that FAILED (a worker killed, max_failures 0) and is run again continues from its last checkpoint:
same final step, the loss curve of an uninterrupted run, one MLflow run. Running a finished run again trains nothing
and still returns its final metrics. The uninterrupted run is `laren train JOB.yaml` on the running local Ray instance
(the session's shared one: 2 gloo workers), checkpoints in a local folder, MLflow in SQLite.

Why this needs laren's own fallback: Ray Train records a reported checkpoint only when its controller next polls the
workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a worker that dies before that poll loses the report, so the failed run's
checkpoint is on storage but not in Ray's checkpoint-manager snapshot, and the next fit() gets no checkpoint from Ray.

Tiny sizes: 32x32 HR, 8x8 LR, H=32, 4 GDM nodes, batch 4; 8 steps, checkpoints at steps 4 and 8.
"""

from __future__ import annotations

import json

import pytest
import yaml

from tests.unit.test_train_loop import loss_curve, make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

EXPERIMENT = "resume"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the reported checkpoints


@pytest.fixture(scope="module")
def env(local_ray, tmp_path_factory):
    work = tmp_path_factory.mktemp("train-resume")
    data = make_tiny_dataset(str(work / "shards"), work)
    return {"data": data, "uri": f"sqlite:///{work}/mlflow.db", "storage": work / "storage"}


def _cfg(env):
    return tiny_config(
        env["data"], env["uri"],
        resources=dict(num_workers=2, cpus_per_worker=1),
        storage=dict(root=str(env["storage"])),
        tracking=dict(experiment=EXPERIMENT),
        train=dict(total_kimg=0.032, eval_every_kimg=0.016, checkpoint_every_kimg=0.016, max_failures=0,
                   keep_checkpoints=2),
    )


def _laren_train(job, storage_dir) -> dict:
    """`laren train JOB --storage DIR` in this process (the running Ray instance); its printed final metrics."""
    from click.testing import CliRunner

    from laren.cli import main

    r = CliRunner().invoke(main, ["train", str(job), "--storage", str(storage_dir)])
    assert r.exit_code == 0, r.output
    return json.JSONDecoder().raw_decode(r.output, r.output.rindex("{\n"))[0]


@pytest.fixture(scope="module")
def ref(env, tmp_path_factory):
    """The uninterrupted run: `laren train JOB.yaml` (run id: the job's deterministic name)."""
    cfg = _cfg(env)
    job = tmp_path_factory.mktemp("job") / "tiny-job.yaml"
    job.write_text(yaml.safe_dump({**cfg.to_dict(), "kind": "train"}))
    return {"cfg": cfg, "job": job, "out": _laren_train(job, env["storage"] / "runs")}


def test_laren_train_job_yaml_and_the_finished_run_again(env, ref):
    """`laren train JOB.yaml --storage DIR` trains to the end; the same job again, with Ray's record of its checkpoints
    gone too, trains nothing, returns the final metrics and continues the same (single, finished) MLflow run."""
    from mlflow.tracking import MlflowClient

    cfg, out = ref["cfg"], ref["out"]
    run_dir = env["storage"] / "runs" / cfg.run_id
    assert out["step"] == 8 and out["run_id"] == cfg.run_id and out["checkpoint"] == str(run_dir / "checkpoint_000000008")
    assert (run_dir / "checkpoint_000000008" / "state.json").is_file()
    assert [s for s, _ in loss_curve(env["uri"], EXPERIMENT, cfg.run_id)] == list(range(1, 9))

    (run_dir / SNAPSHOT).unlink()
    again = _laren_train(ref["job"], env["storage"] / "runs")
    assert again["step"] == 8 and again["checkpoint"] == out["checkpoint"] and again["run_id"] == cfg.run_id
    for k in ("val/psnr", "val/ssim", "train/loss_g", "kimg"):
        assert again[k] == pytest.approx(out[k], rel=1e-6), k
    assert [s for s, _ in loss_curve(env["uri"], EXPERIMENT, cfg.run_id)] == list(range(1, 9))  # one MLflow run
    c = MlflowClient(env["uri"])
    runs = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id],
                         filter_string=f"attributes.run_name = '{cfg.run_id}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"


def test_failed_run_resumes_from_its_last_checkpoint(env, ref, monkeypatch, tmp_path):
    import ray.train
    from mlflow.tracking import MlflowClient

    from laren.train.distributed import run_training
    from laren.train.faults import KillOnce

    cfg = ref["cfg"]

    # Attempt 1: rank 1 is SIGKILLed during step 5, just after the step-4 checkpoint; no retries -> the run fails.
    marker = tmp_path / "killed"
    kill = KillOnce(5, rank=1, marker=str(marker))
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "5")  # the step-4 report is very likely still unpolled
    with pytest.raises(ray.train.WorkerGroupError):
        run_training(cfg, run_id="job", on_step=kill)
    assert marker.is_file() and "step 5" in marker.read_text()
    run_dir = env["storage"] / "runs" / "job"
    assert sorted(p.name for p in run_dir.glob("checkpoint_0*")) == ["checkpoint_000000004"]
    snapshot = run_dir / SNAPSHOT
    if snapshot.exists():
        # The controller polled the report before the kill (rare with a 5 s poll): take away Ray's record, as a lost
        # report does, so that the test always covers the resume from storage alone.
        assert "checkpoint_000000004" in snapshot.read_text()
        snapshot.unlink()

    # Attempt 2: the same run again (the kill marker exists, so no kill) continues from the step-4 checkpoint.
    out = run_training(cfg, run_id="job")
    assert out["step"] == 8 and out["checkpoint"] == str(run_dir / "checkpoint_000000008")
    assert out["val/psnr"] == pytest.approx(ref["out"]["val/psnr"], rel=1e-5)
    curve = loss_curve(env["uri"], EXPERIMENT, "job")  # also asserts a single MLflow run of that name
    assert [s for s, _ in curve] == list(range(1, 9))  # attempt 1 logged 1-4, attempt 2 logged 5-8: nothing redone
    ref_curve = dict(loss_curve(env["uri"], EXPERIMENT, cfg.run_id))
    for s, v in curve:  # the resumed run reproduces the uninterrupted one (weights, optimizer, data position, RNG)
        assert v == pytest.approx(ref_curve[s], rel=1e-5), (s, v, ref_curve[s])
    c = MlflowClient(env["uri"])
    exp = c.get_experiment_by_name(EXPERIMENT)
    runs = c.search_runs([exp.experiment_id], filter_string="attributes.run_name = 'job'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    state = json.loads((run_dir / "checkpoint_000000008" / "state.json").read_text())
    assert state["step"] == 8 and state["mlflow_run_id"] == runs[0].info.run_id
