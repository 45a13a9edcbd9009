"""RAY_ADDRESS / --address: the dashboard URL, the GCS address and a Ray Client address, told apart and converted
(the GCS -> dashboard lookup against a real head is in tests/integration/test_submit.py)."""

from __future__ import annotations

import os

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
    import ray
    import yaml
    from click.testing import CliRunner
    from PIL import Image

    from laren.cli import main
    from laren.data.pack import pack
    from tests.integration._tiny_jobs import TINY_MODEL

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "raw").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "raw" / "a.png")
    pack(str(tmp_path / "raw"), str(tmp_path / "ds"), "d", 32, progress=False)
    job = tmp_path / "j.yaml"  # inputs all there: the address is what stops it, before any Ray starts
    job.write_text(yaml.safe_dump({"name": "j", "kind": "train", "model": TINY_MODEL, "loss": {"perceptual_weight": 0},
                                   "data": {"train_url": str(tmp_path / "ds"), "num_val_images": 1},
                                   "train": {"batch_size_global": 1},
                                   "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}}))
    was_up = ray.is_initialized()
    res = CliRunner().invoke(main, ["train", str(job), "--address", "http://10.9.9.9:8265"])
    assert ray.is_initialized() == was_up
    assert res.exit_code == 2 and res.output.startswith("error: RAY_ADDRESS / --address http://10.9.9.9:8265 is a "
                                                        "dashboard URL"), res.output
    assert len(res.output.strip().splitlines()) == 1
    assert "RAY_ADDRESS" not in os.environ  # the command leaves the process's environment as it found it
