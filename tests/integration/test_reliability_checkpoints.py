"""Reliability of checkpoints: an unwritable checkpoint location gives a clear error and leaves the previous checkpoint
intact, and the run resumes from it once the location is fixed. (A corrupted latest checkpoint, on Ray Train with
checkpoints in S3: tests/integration/test_train_ray.py.)

Tiny sizes: 32x32 HR, 8x8 LR, H=32, 4 GDM nodes, batch 4; checkpoints every 5 steps.
"""

from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

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
