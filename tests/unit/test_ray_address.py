"""RAY_ADDRESS / --address: the dashboard URL, the GCS address and a Ray Client address, told apart and converted
(the GCS -> dashboard lookup against a real head is in tests/integration/test_submit.py)."""

from __future__ import annotations

import pytest

from laren.config import ConfigError
from laren.ray_address import driver_address, jobs_api_url, kind

HEAD = {"address": "127.0.0.1:6379", "dashboard_url": "http://127.0.0.1:8265"}


def test_kinds():
    assert kind("http://10.0.0.1:8265") == kind("HTTPS://h:443") == "dashboard"
    assert kind("10.0.0.1:6379") == kind("auto") == "gcs" and kind("ray://h:10001") == "client"
    with pytest.raises(ConfigError, match="unknown scheme grpc://"):
        kind("grpc://h:1")


def test_jobs_api_and_driver_addresses():
    assert jobs_api_url("http://10.0.0.1:8265/") == "http://10.0.0.1:8265"
    assert jobs_api_url("localhost:6379", HEAD) == "http://127.0.0.1:8265"  # the local head, without asking Ray
    assert driver_address("10.0.0.1:6379") == "10.0.0.1:6379" and driver_address("ray://h:10001") == "ray://h:10001"
    assert driver_address("http://localhost:8265", HEAD) == "127.0.0.1:6379"
    with pytest.raises(ConfigError) as err:
        driver_address("http://10.0.0.1:8265", HEAD)
    msg = str(err.value)
    assert "is a dashboard URL" in msg and "10.0.0.1:6379" in msg and "ray://10.0.0.1:10001" in msg
    assert "laren submit JOB --address http://10.0.0.1:8265" in msg


def test_train_refuses_a_remote_dashboard_url_in_one_line(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from laren.cli import main

    monkeypatch.chdir(tmp_path)
    job = tmp_path / "j.yaml"
    job.write_text("name: j\nkind: train\ndata: {train_url: unused}\n")
    res = CliRunner().invoke(main, ["train", str(job), "--address", "http://10.9.9.9:8265"])
    assert res.exit_code == 2 and res.output.startswith("error: RAY_ADDRESS / --address http://10.9.9.9:8265 is a "
                                                        "dashboard URL"), res.output
    assert len(res.output.strip().splitlines()) == 1
