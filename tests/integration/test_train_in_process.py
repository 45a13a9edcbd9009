"""Whole training runs of the worker loop in this process (no Ray; MLflow on SQLite): same seed -> same curve, and the
curve recorded before the loop's last refactor; resume from a checkpoint continues the run exactly; Eq. 5 training
lowers the pixel loss; rank 0's progress lines, and the attempts and last failure on the MLflow run. The loop's
parts: tests/unit/test_train_loop.py, tests/unit/test_progress.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from laren import progress as P
from laren.config import RunConfig
from tests.unit.test_train_loop import loss_curve, make_tiny_dataset, tiny_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("data")
    return make_tiny_dataset(str(work / "shards"), work)


@pytest.fixture(scope="module")
def dataset12(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("data12")
    return make_tiny_dataset(str(work / "shards"), work, n=12)


def _run(cfg: RunConfig, run_id: str, **ctx_kw):
    from laren.train.loop import WorkerContext, train_worker

    return train_worker(cfg, WorkerContext(run_id=run_id, **ctx_kw))


def test_same_seed_same_curve_and_resume_continues_it(dataset, tmp_path, monkeypatch):
    import tempfile

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(dataset, uri)
    peak = 0.5  # TFLOP/s, a stand-in (the CPU has no figure of its own): run a logs perf/mfu, run b does not
    a = _run(tiny_config(dataset, uri, resources=dict(peak_tflops=peak)), "a", checkpoint_root=str(tmp_path / "ck_a"))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    b = _run(cfg, "b")  # no checkpoint_root, no report function: checkpoints are kept nowhere, not even in the temp dir
    monkeypatch.undo()
    assert not list(temp.glob("laren-ckpt-*")), sorted(p.name for p in temp.iterdir())
    ca, cb = loss_curve(uri, "tiny", "a"), loss_curve(uri, "tiny", "b")
    assert [s for s, _ in ca] == list(range(1, 11)) and ca == cb  # same seed on CPU -> identical loss curves
    # ... and the curve recorded before the loop's last refactor (tests/fixtures/README.md)
    recorded = json.loads((Path(__file__).parents[1] / "fixtures" / "loss_curve_tiny.json").read_text())
    for key in ("train/loss_g", "train/loss_d", "train/loss_pix", "val/psnr"):
        got = loss_curve(uri, "tiny", "a", key)
        assert [s for s, _ in got] == [s for s, _ in recorded[key]], key
        assert [v for _, v in got] == pytest.approx([v for _, v in recorded[key]], rel=1e-5), key
    assert a["step"] == 10 and a["kimg"] == pytest.approx(0.04)
    assert {"val/psnr", "val/ssim", "val/lpips_alex", "perf/images_per_s", "data/skipped", "train/lr"} <= set(a)
    assert 0 < a["perf/data_wait_share"] < 1  # the in-process loader decodes PNGs: some, not all, of the time
    assert a["val/images"] == 8
    # perf/tflops_per_gpu at every log step: images/s (one worker) x the step's FLOPs per image; perf/mfu against the peak
    from laren.flops import step_flops_per_image

    per_image, rate = step_flops_per_image(cfg.model, cfg.loss), dict(loss_curve(uri, "tiny", "a", "perf/images_per_s"))
    tflops = loss_curve(uri, "tiny", "a", "perf/tflops_per_gpu")
    assert [s for s, _ in tflops] == list(range(1, 11)) and per_image > 1e9
    assert [v for _, v in tflops] == pytest.approx([rate[s] * per_image / 1e12 for s, _ in tflops], rel=1e-6)
    assert loss_curve(uri, "tiny", "a", "perf/mfu") == [(s, pytest.approx(v / peak, rel=1e-6)) for s, v in tflops]
    assert b["perf/tflops_per_gpu"] > 0 and "perf/mfu" not in b

    # A new process resuming from the step-5 checkpoint redoes nothing and reproduces steps 6..10 exactly.
    ck = tmp_path / "ck_a" / "checkpoint_000000005"
    assert (ck / "state.json").is_file()
    r = _run(cfg, "r", resume_dir=str(ck))
    cr = loss_curve(uri, "tiny", "r")
    assert [s for s, _ in cr] == list(range(6, 11))
    assert cr == ca[5:]
    assert r["train/loss_g"] == a["train/loss_g"] and r["val/psnr"] == a["val/psnr"]

    # Health figures at every log step (rank 0): the CGM and the GDM are measured, and alive.
    live = loss_curve(uri, "tiny", "a", "health/cgm_live_min")
    assert [s for s, _ in live] == list(range(1, 11))
    assert loss_curve(uri, "tiny", "a", "health/grad_ratio/cgm.query")[-1][1] > 0
    assert 0 < loss_curve(uri, "tiny", "a", "health/gdm_mask_share")[-1][1] <= 0.6

    # `laren eval` of the final checkpoint on the validation images gives the validation figures (both fp32).
    from laren.evaluate import run_eval

    ev = run_eval(str(tmp_path / "ck_a" / "checkpoint_000000010"), dataset, str(tmp_path / "ev"), limit=8, batch_size=4)
    for k in ("psnr", "ssim", "lpips_alex"):
        assert ev[f"test/{k}"] == pytest.approx(a[f"val/{k}"], abs=1e-6), k

    # The driver's rule for a complete run (laren/train/distributed.py: finished_result): run a needs no worker while
    # its last checkpoint is complete and its MLflow run FINISHED (and its model registered, when asked); a run left
    # RUNNING (an attempt killed after its last checkpoint), an unregistered model or a damaged last checkpoint goes
    # to the workers.
    from mlflow.tracking import MlflowClient

    from laren.plan import build_plan
    from laren.train.distributed import finished_result

    plan = build_plan(tiny_config(dataset, uri, resources=dict(peak_tflops=peak)), "a", str(tmp_path / "ck_a"))
    done = finished_result(plan)
    assert done is not None and done["step"] == 10 and done["run_id"] == "a"
    assert done["checkpoint"] == str(tmp_path / "ck_a" / "checkpoint_000000010")
    assert done["val/psnr"] == a["val/psnr"] and done["train/loss_g"] == a["train/loss_g"]
    assert set(done) - {"checkpoint", "run_id"} == set(a) - {"mlflow_run_id"}  # what the training attempt returned
    client, mlflow_id = MlflowClient(uri), a["mlflow_run_id"]
    client.update_run(mlflow_id, status="RUNNING")
    assert finished_result(plan) is None
    client.update_run(mlflow_id, status="FINISHED")
    # With tracking.register_model, the registry must also hold a version made from the run.
    registering = build_plan(tiny_config(dataset, uri, resources=dict(peak_tflops=peak), tracking=dict(register_model=True)),
                             "a", str(tmp_path / "ck_a"))
    assert finished_result(registering) is None
    client.create_registered_model("laren-tiny-a")
    client.create_model_version("laren-tiny-a", str(tmp_path / "ck_a" / "checkpoint_000000010"), run_id=mlflow_id)
    assert finished_result(registering)["step"] == 10
    weights = tmp_path / "ck_a" / "checkpoint_000000010" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    assert finished_result(plan) is None


def test_training_lowers_pixel_loss(dataset, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(dataset, uri, loss=dict(perceptual_weight=0.0, adversarial_weight=0.0),
                      optim=dict(lr=2e-3, cosine_min_lr=None),
                      train=dict(total_kimg=0.12, log_every_kimg=0.02, eval_every_kimg=0.12, checkpoint_every_kimg=1.0))
    _run(cfg, "fall")
    curve = [v for _, v in loss_curve(uri, "tiny", "fall", "train/loss_pix")]
    assert len(curve) == 6
    assert np.mean(curve[-2:]) < 0.7 * curve[0], curve


def test_training_prints_progress_and_records_attempts(dataset12, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from laren.train import loop

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(dataset12, uri, train=dict(total_kimg=0.024, log_every_kimg=0.004, eval_every_kimg=0.012,
                                               checkpoint_every_kimg=0.008))
    ck = tmp_path / "ck"

    def fail_at_4(step, rank):
        if step == 4:
            raise RuntimeError("disk full\nsecond line")

    with pytest.raises(RuntimeError, match="disk full"):
        loop.train_worker(cfg, loop.WorkerContext(run_id="p", checkpoint_root=str(ck), on_step=fail_at_4))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[p] ")]
    assert len(lines) == 3  # steps 1..3 logged; step 4 failed before its log
    assert re.fullmatch(r"\[p\] kimg 0\.004/0\.024 \(17%\)  \d+\.\d img/s  ETA \d+(s|m\d\ds)", lines[0]), lines[0]
    run = P.find_mlflow_run(uri, "p")
    assert run.data.tags[P.ATTEMPTS_TAG] == "1"
    assert run.data.tags[P.FAILURE_TAG] == "attempt 1 failed at step 4: RuntimeError: disk full second line"

    out = loop.train_worker(cfg, loop.WorkerContext(run_id="p", checkpoint_root=str(tmp_path / "ck2"),
                                                    resume_dir=str(ck / "checkpoint_000000002")))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[p] ")]
    assert [ln.split()[2] for ln in lines] == ["0.012/0.024", "0.016/0.024", "0.02/0.024", "0.024/0.024"]
    psnr3 = f"{out['val/psnr']:.4g}"
    assert lines[0].endswith("(at kimg 0.012)") and "val psnr" in lines[0]
    assert lines[-1].endswith(f"ETA 0s  val psnr {psnr3} ssim {out['val/ssim']:.4g} lpips_alex "
                              f"{out['val/lpips_alex']:.4g} (at kimg 0.024)"), lines[-1]
    run = P.find_mlflow_run(uri, "p")
    assert run.data.tags[P.ATTEMPTS_TAG] == "2" and run.info.status == "FINISHED"
    assert run.data.tags[P.FAILURE_TAG].startswith("attempt 1 failed")  # attempt 2 did not fail

    # `laren status`'s view of the run, from MLflow alone
    text = "\n".join(P.status_lines(run))
    assert f"MLflow run {run.info.run_id}: FINISHED" in text
    assert re.search(r"progress: kimg 0\.024/0\.024 \(100%\)  \d+\.\d img/s  ETA -", text), text
    assert f"last val psnr {psnr3}" in text and "attempts: 2" in text
    assert "last failure: attempt 1 failed at step 4: RuntimeError: disk full second line" in text

    # an attempt killed without a report (the run left RUNNING, no failure recorded for it): the next one says so
    c = MlflowClient(uri)
    c.update_run(run.info.run_id, status="RUNNING")
    c.set_tag(run.info.run_id, P.ATTEMPTS_TAG, "3")
    loop.train_worker(cfg, loop.WorkerContext(run_id="p", resume_dir=str(tmp_path / "ck2" / "checkpoint_000000006")))
    tags = P.find_mlflow_run(uri, "p").data.tags
    assert tags[P.ATTEMPTS_TAG] == "4"
    assert tags[P.FAILURE_TAG].startswith("attempt 3 ended without an error report") and "at step 6" in tags[P.FAILURE_TAG]
