"""Errors a user can act on: one line on stderr, quickly; the traceback only under `laren --debug`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import laren.data
from laren.data import storage

REPO = Path(__file__).resolve().parents[2]


def _laren(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "laren.cli", *args], capture_output=True, text=True, timeout=60,
                         cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO), **env})
    return res, time.monotonic() - t0


def test_wrong_s3_endpoint_is_one_line_within_10_s(tmp_path, monkeypatch):
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "not-printed"}
    (tmp_path / "in").mkdir()
    for args in (["data", "verify", "s3://laren/ds"],
                 ["data", "pack", str(tmp_path / "in"), "s3://laren/ds", "--name", "x", "--resolution", "16"]):
        if args[1] == "pack":
            from PIL import Image

            Image.new("RGB", (16, 16)).save(tmp_path / "in" / "a.png")
        res, dt = _laren(args, env, tmp_path)
        lines = res.stderr.strip().splitlines()
        # the whole command (Python start and imports included, which a loaded test machine can slow down a lot);
        # the S3 part alone is timed below
        assert res.returncode == 2 and dt < 60.0, (dt, res.stderr[-2000:])
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith("error: S3 http://127.0.0.1:1, bucket laren: ") and "AWS_ENDPOINT_URL" in lines[0]
        assert "not-printed" not in res.stderr + res.stdout
    # --debug: the error escapes the CLI (Python prints its traceback and exits 1); in this process, as nothing of the
    # output is left to check
    from click.testing import CliRunner

    from laren.cli import main

    monkeypatch.setattr(laren.data, "S3_FAIL_FAST", laren.data.S3_FAIL_FAST)  # restored after: main sets it
    monkeypatch.setattr(storage, "_reached", set())
    res = CliRunner().invoke(main, ["--debug", "data", "verify", "s3://laren/ds"], env=env)
    assert isinstance(res.exception, storage.StorageError) and "http://127.0.0.1:1" in str(res.exception)


def test_unreachable_endpoint_fails_within_10_s(monkeypatch):
    for k, v in {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(laren.data, "S3_FAIL_FAST", True)
    storage.s3_client()  # client construction (botocore's data files) is not the endpoint's fault
    for call in (storage.exists, storage.read_bytes, storage.list_files):
        t0 = time.monotonic()
        with pytest.raises(storage.StorageError, match=r"^S3 http://127.0.0.1:1, bucket b: .* cannot reach the endpoint"):
            call("s3://b/k")
        assert time.monotonic() - t0 < 10.0


def test_quick_budget_only_until_the_endpoint_answers(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(laren.data, "S3_FAIL_FAST", True)
    monkeypatch.setattr(storage, "_reached", set())
    quick = storage.s3_client()
    assert quick.meta.config.retries["total_max_attempts"] == storage.QUICK["total_max_attempts"]
    assert quick.meta.config.connect_timeout == storage.QUICK["connect_timeout"]
    storage._reached.add("http://127.0.0.1:9")
    patient = storage.s3_client()
    assert patient.meta.config.retries["total_max_attempts"] == 1 + int(os.environ.get("LAREN_S3_MAX_ATTEMPTS", "10"))
    monkeypatch.setattr(laren.data, "S3_FAIL_FAST", False)
    storage._reached.clear()
    assert storage.s3_client() is patient  # jobs (no CLI) always get the patient budget


def test_a_submitted_jobs_command_keeps_the_long_s3_budget(tmp_path, monkeypatch):
    """`laren submit` marks the job's environment; its laren command then does not fail fast on S3 (a brief outage at
    the job's start must not fail it), while a person's command does."""
    import laren.data
    from click.testing import CliRunner

    from laren.jobs import entrypoints as S
    from laren.cli import main

    assert S.job_env(tmp_path)["LAREN_JOB"] == "1"
    for env, fail_fast in (({"LAREN_JOB": "1"}, False), ({"LAREN_JOB": ""}, True)):
        monkeypatch.setattr(laren.data, "S3_FAIL_FAST", not fail_fast)
        CliRunner().invoke(main, ["services", "url", "mlflow"], env=env)
        assert laren.data.S3_FAIL_FAST is fail_fast
