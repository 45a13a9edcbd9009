"""Progress: rank 0's line per log step (kimg/total, img/s, ETA, last val), attempts and the last failure on the MLflow
run, and `laren status`'s reading of them; the eval progress bar on a terminal."""

from __future__ import annotations

import io
import re

import pytest
import torch

from laren import progress as P
from tests.unit.test_train_loop import make_tiny_dataset, tiny_config


def test_line_and_durations():
    assert P.duration(42) == "42s" and P.duration(432) == "7m12s" and P.duration(11100) == "3h05m"
    assert P.duration(None) == "-" and P.eta_s(1.0, 3.0, 0.0) is None
    assert P.eta_s(1.0, 3.0, 100.0) == pytest.approx(20.0)
    line = P.progress_line("r-1", 1.0, 3.0, 100.0, {"val/psnr": 18.414, "val/ssim": 0.3391, "train/lr": 1e-4}, 0.5)
    assert line == "[r-1] kimg 1/3 (33%)  100.0 img/s  ETA 20s  val psnr 18.41 ssim 0.3391 (at kimg 0.5)"
    assert P.progress_line("r", 0.5, 3.0, 50.0, {}) == "[r] kimg 0.5/3 (17%)  50.0 img/s  ETA 50s"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("data")
    return make_tiny_dataset(str(work / "shards"), work, n=12)


@pytest.mark.slow
def test_training_prints_progress_and_records_attempts(dataset, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    from laren.train import loop

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = tiny_config(dataset, uri, train=dict(total_kimg=0.024, log_every_kimg=0.004, eval_every_kimg=0.012,
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


def test_eval_progress_bar_on_a_terminal(monkeypatch):
    from laren.evaluate import evaluate_model

    class Tty(io.StringIO):
        def isatty(self):
            return True

    class Up(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.interpolate(x, scale_factor=4)

    batches = [{"lr": torch.zeros(2, 3, 8, 8), "hr": torch.zeros(2, 3, 32, 32), "key": ["a", "b"]}] * 3
    for on, tty in ((True, Tty()), (True, io.StringIO()), (False, Tty())):
        monkeypatch.setattr("sys.stderr", tty)
        assert evaluate_model(Up(), batches, progress=on).count == 6
        assert ("eval: " in tty.getvalue() and "6img" in tty.getvalue()) == (on and isinstance(tty, Tty))


def test_status_reads_progress_attempts_and_failure_from_mlflow(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from laren.cli import main
    from laren.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(uri, "exp", "job-1234", system_metrics=False)
    t.log_params({"train.total_kimg": 300})
    t.log_metrics({"train/kimg": 100.0, "perf/images_per_s": 50.0, "val/psnr": 21.5, "val/ssim": 0.61}, step=10)
    t.set_tags({P.ATTEMPTS_TAG: 3, P.FAILURE_TAG: "attempt 2 failed at step 7: OSError: disk full"})
    t.flush(force=True)
    monkeypatch.chdir(tmp_path)  # no local services here: no Ray cluster, MLflow only
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    res = CliRunner().invoke(main, ["status", "job-1234", "--tracking-uri", uri])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[0].startswith("job-1234: no Ray job (no Ray cluster")
    assert "progress: kimg 100/300 (33%)  50.0 img/s  ETA 1h06m" in res.output  # 200 kimg at 50 img/s
    assert "last val psnr 21.5 ssim 0.61" in res.output and "attempts: 3" in res.output
    assert "last failure: attempt 2 failed at step 7: OSError: disk full" in res.output
    res = CliRunner().invoke(main, ["status", "job-9999", "--tracking-uri", uri])
    assert res.exit_code == 2 and "no Ray cluster" in res.output
