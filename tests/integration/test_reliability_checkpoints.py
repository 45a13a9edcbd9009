"""Reliability of checkpoints: an unwritable checkpoint location gives a clear error and leaves the previous checkpoint
intact (and the run resumes from it once the location is fixed); a corrupted latest checkpoint makes the resume fall
back to the previous one (Ray Train, 2 gloo workers, checkpoints in the local S3 server).

Tiny sizes: 32x32 HR, 8x8 LR, H=32, 4 GDM nodes, batch 4; checkpoints every 5 steps.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from tests.integration._ray_s3 import ray_with_s3_data
from tests.unit.test_train_loop import loss_curve, make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@contextlib.contextmanager
def unwritable(path):
    """Make the directory ``path`` unwritable: mode 0555 for a normal user; for root (who ignores modes) the immutable
    attribute (``chattr +i``), or skip when that is not permitted."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"running as root and `chattr +i` is not permitted here ({r.stderr.strip()}): cannot make a folder "
                    "unwritable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_unwritable_checkpoint_location_clear_error_previous_intact(tmp_path):
    from laren.models.build import build_discriminator, build_model
    from laren.train import state as S
    from laren.train.loop import WorkerContext, train_worker

    data = make_tiny_dataset(str(tmp_path / "shards"), tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    root = tmp_path / "runs"
    half = tiny_config(data, uri, train=dict(total_kimg=0.02))  # 5 steps -> checkpoint_000000005
    full = tiny_config(data, uri)  # 10 steps, checkpoints at 5 and 10
    train_worker(half, WorkerContext(run_id="rw", checkpoint_root=str(root)))
    ck5 = root / "checkpoint_000000005"
    before = {p.name: p.read_bytes() for p in ck5.iterdir()}

    with unwritable(root):
        with pytest.raises(OSError) as e:
            train_worker(full, WorkerContext(run_id="rw", checkpoint_root=str(root), resume_dir=str(ck5)))
    msg = str(e.value)
    assert "cannot write checkpoint" in msg and str(root / "checkpoint_000000010") in msg
    assert "not writable" in msg and "storage.root" in msg and "resumes from the last complete checkpoint" in msg
    # The previous checkpoint is byte-for-byte intact and loads; nothing half-written was left beside it.
    assert {p.name: p.read_bytes() for p in ck5.iterdir()} == before
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_000000005"]
    cfg = full.model
    st = S.load_checkpoint(ck5, build_model(cfg), build_discriminator(cfg), {})
    assert st.step == 5
    # The metrics of the steps trained before the failed write were logged (steps 6..10 of the second attempt).
    assert [s for s, _ in loss_curve(uri, "tiny", "rw")] == list(range(1, 11))

    # Location fixed: the same job resumes from checkpoint 5 and completes with both checkpoints.
    out = train_worker(full, WorkerContext(run_id="rw", checkpoint_root=str(root), resume_dir=str(ck5)))
    assert out["step"] == 10
    assert S.read_state(root / "checkpoint_000000010")["step"] == 10
    assert S.read_state(ck5)["step"] == 5


BUCKET = "laren-rel-ck"


@pytest.fixture(scope="module")
def ray_env(s3_server, mlflow_server, local_ray, tmp_path_factory):
    """AWS_* for this module (the session Ray instance's workers have them from its node), tiny shards on S3."""
    with ray_with_s3_data(s3_server, BUCKET, tmp_path_factory.mktemp("rel-ck")) as data:
        yield {"data": data, "uri": mlflow_server.uri}


@pytest.mark.slow
def test_corrupted_latest_checkpoint_resume_falls_back_to_previous(ray_env):
    """Run to step 10 (checkpoints 5 and 10 in S3), damage checkpoint 10's weights, run the same job again: Ray hands
    the workers checkpoint 10, which fails its checksum; they resume from checkpoint 5, redo steps 6-10 exactly as
    the first time, and write a new, complete checkpoint 10."""
    from laren.data import storage
    from laren.train import state as S
    from laren.train.distributed import run_training

    cfg = tiny_config(ray_env["data"], ray_env["uri"], resources=dict(num_workers=2, cpus_per_worker=1),
                      storage=dict(root=f"s3://{BUCKET}/storage"), tracking=dict(experiment="rel-ck"),
                      train=dict(max_failures=1, keep_checkpoints=2))
    first = run_training(cfg, run_id="corrupt")
    ck10 = first["checkpoint"]
    assert first["step"] == 10 and ck10.endswith("checkpoint_000000010")
    good = storage.read_bytes(storage.join(ck10, S.WEIGHTS_FILE))
    storage.write_bytes(storage.join(ck10, S.WEIGHTS_FILE), good[: len(good) // 2])  # a truncated object

    second = run_training(cfg, run_id="corrupt")
    assert second["step"] == 10
    curve = loss_curve(ray_env["uri"], "rel-ck", "corrupt")
    steps = [s for s, _ in curve]
    assert steps == list(range(1, 11)) + list(range(6, 11))  # resumed after step 5, not from scratch, not at 10
    first_pass = dict(curve[:10])
    for s, v in curve[10:]:
        assert v == pytest.approx(first_pass[s], rel=1e-5), (s, v, first_pass[s])
    # The damaged checkpoint 10 was replaced by a complete one (checksums verified), written by the resumed run.
    assert second["checkpoint"] == ck10
    assert json_state(ck10)["step"] == 10


def json_state(url: str) -> dict:
    """state.json of a checkpoint in S3, after checking both tensor files against its checksums."""
    import tempfile

    from laren.train import state as S

    with tempfile.TemporaryDirectory() as d:
        S.fetch_checkpoint(url, d)
        return S.read_state(d)
