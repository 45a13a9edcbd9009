"""Progress: rank 0's line (kimg/total, img/s, ETA, last val), `laren status`'s reading of the progress, attempts and
last failure on the MLflow run; the eval progress bar on a terminal. (The lines and tags of a real training run:
tests/integration/test_train_in_process.py.)"""

from __future__ import annotations

import io

import pytest
import torch

from laren import progress as P


def test_line_and_durations():
    assert P.duration(42) == "42s" and P.duration(432) == "7m12s" and P.duration(11100) == "3h05m"
    assert P.duration(None) == "-" and P.eta_s(1.0, 3.0, 0.0) is None
    assert P.eta_s(1.0, 3.0, 100.0) == pytest.approx(20.0)
    line = P.progress_line("r-1", 1.0, 3.0, 100.0, {"val/psnr": 18.414, "val/ssim": 0.3391, "train/lr": 1e-4}, 0.5)
    assert line == "[r-1] kimg 1/3 (33%)  100.0 img/s  ETA 20s  val psnr 18.41 ssim 0.3391 (at kimg 0.5)"
    assert P.progress_line("r", 0.5, 3.0, 50.0, {}) == "[r] kimg 0.5/3 (17%)  50.0 img/s  ETA 50s"


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
