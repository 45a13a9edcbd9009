"""Tiny job files and a tiny real-image data set for the submit / grid / sweep tests (32x32 HR, 8x8 LR, H=64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_MODEL: dict[str, Any] = {
    "lr_size": 8,
    "prior": {"resolution": 32, "style_dim": 64, "mapping_layers": 2, "channel_multiplier": 1, "channel_max": 64},
    "encoder": {"rrdb_blocks": 1, "rrdb_channels": 8, "rrdb_growth": 8},
    "gdm": {"num_nodes": 4, "node_dim": 4, "convkb_filters": 2, "checkpoint_chunks": False},
    "cgm": {"code_dim": 8, "noise_proj_max_res": 16},
}


def make_data(root: Path) -> tuple[str, str]:
    """scikit-image crops packed to local shards: (train_url, val_url)."""
    from laren.demo import pack_demo_data

    train, val = str(root / "data" / "train"), str(root / "data" / "val")
    pack_demo_data(train, val, resolution=32, train_per_image=4, val_per_image=1, log=lambda *_: None)
    return train, val


def tiny_job(project: Path, name: str, data: tuple[str, str], steps: int = 8, eval_every: int = 4,
             ckpt_every: int = 4, batch: int = 4, **extra: Any) -> Path:
    """Write jobs/<name>.yaml inside ``project``: ``steps`` optimizer steps of batch ``batch`` on 1 CPU worker."""
    kimg = lambda n: n * batch / 1000.0  # noqa: E731 - steps -> kimg
    job = {
        "name": name,
        "kind": "train",
        "model": TINY_MODEL,
        "data": {"train_url": data[0], "val_url": data[1], "num_val_images": 4, "shuffle_buffer": 8, "loader_workers": 0},
        "loss": {"perceptual_weight": 0.0},
        "optim": {"lr": 1e-3, "cosine_min_lr": None},
        "train": {"batch_size_global": batch, "total_kimg": kimg(steps), "log_every_kimg": kimg(1),
                  "eval_every_kimg": kimg(eval_every), "checkpoint_every_kimg": kimg(ckpt_every),
                  "sample_grid_images": 2, "max_failures": 0},
        "tracking": {"system_metrics": False, "register_model": False},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }
    for k, v in extra.items():
        job[k] = {**job.get(k, {}), **v} if isinstance(v, dict) and isinstance(job.get(k), dict) else v
    p = project / "jobs" / f"{name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(job, sort_keys=False))
    return p


def job_env(project: Path, mlflow_uri: str) -> dict[str, str]:
    """The job environment of a test: local storage under the project, the test MLflow server."""
    return {"LAREN_STORAGE": str(project / "storage"), "MLFLOW_TRACKING_URI": mlflow_uri}


def mlflow_runs(uri: str, experiment: str):
    """All runs of an experiment: {run name: Run}."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"MLflow experiment {experiment!r} missing"
    return c, {r.info.run_name: r for r in c.search_runs([exp.experiment_id], max_results=100)}
