"""Ray Train vs a plain torch.distributed loop: the same worker loop (``laren.train.loop.train_worker``), the same tiny
LAREN model, data and schedule, 2 CPU workers with gloo, measured one after the other in one run.

    .venv/bin/python benchmarks/ray_vs_ddp.py [--steps 16]

plain: ``torch.multiprocessing.spawn`` of 2 processes, ``init_process_group("gloo")``, 1 torch thread each (as Ray's
       1 CPU per worker), checkpoints to a local folder.
Ray:   ``laren.train.distributed.run_training`` (TorchTrainer, 2 workers, checkpoints through ``ray.train.report`` to
       local storage), on a local Ray instance started before the clock starts (its start time is reported apart).
Figures: wall time of the whole run (process start to final checkpoint) and the steady step rate (median of
``perf/images_per_s`` over steps 3..N, read back from MLflow); overhead = Ray / plain.
``measure(steps)`` returns them for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cfg(data: str, uri: str, steps: int, ckpt_every: int):
    from tests.unit.test_train_loop import tiny_config

    b = 4
    return tiny_config(data, uri, resources=dict(num_workers=2, cpus_per_worker=1),
                       train=dict(total_kimg=steps * b / 1000, log_every_kimg=b / 1000, eval_every_kimg=steps * b / 1000,
                                  checkpoint_every_kimg=ckpt_every * b / 1000, max_failures=0),
                       tracking=dict(experiment="bench"))


def _plain_worker(rank: int, world: int, port: int, cfg_dict: dict, ck_root: str) -> None:
    import torch.distributed as dist

    from laren.config import RunConfig
    from laren.train.loop import WorkerContext, train_worker

    import torch

    # Ray gives each worker cpus_per_worker (1) CPU and sets OMP_NUM_THREADS to it; without the same here, two
    # processes with all-core thread pools oversubscribe the cores (measured: ~5x slower steps on 2 cores).
    torch.set_num_threads(int(cfg_dict["resources"]["cpus_per_worker"]))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        train_worker(RunConfig.model_validate(cfg_dict), WorkerContext(rank=rank, world_size=world, run_id="plain",
                                                                       checkpoint_root=ck_root))
    finally:
        dist.destroy_process_group()


def _rate(uri: str, run_name: str) -> float:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name("bench").experiment_id], f"attributes.run_name = '{run_name}'")[0]
    hist = sorted(c.get_metric_history(run.info.run_id, "perf/images_per_s"), key=lambda m: m.step)
    return statistics.median(m.value for m in hist if m.step >= 3)


def measure(steps: int = 16) -> dict:
    import ray
    import torch.multiprocessing as mp

    from laren.services import free_port
    from laren.train.distributed import ensure_ray, run_training
    from tests.unit.test_train_loop import make_tiny_dataset

    work = Path(tempfile.mkdtemp(prefix="laren-bench-ray-"))
    data = make_tiny_dataset(str(work / "shards"), work)
    uri = f"sqlite:///{work}/mlflow.db"
    cfg = _cfg(data, uri, steps, ckpt_every=steps // 2)

    t0 = time.perf_counter()
    mp.spawn(_plain_worker, args=(2, free_port(), cfg.to_dict(), str(work / "plain")), nprocs=2, join=True)
    plain_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    ensure_ray(num_cpus=2)
    ray_init_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = run_training(cfg, run_id="ray", storage_path=str(work / "ray"))
    ray_s = time.perf_counter() - t0
    ray.shutdown()
    assert out["step"] == steps
    r_plain, r_ray = _rate(uri, "plain"), _rate(uri, "ray")
    return {"steps": steps, "plain_wall_s": plain_s, "ray_wall_s": ray_s, "ray_init_s": ray_init_s,
            "plain_images_per_s": r_plain, "ray_images_per_s": r_ray,
            "wall_ratio": ray_s / plain_s, "step_ratio": r_plain / r_ray}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=16)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    r = measure(ap.parse_args().steps)
    print(f"plain DDP: {r['plain_wall_s']:.1f} s wall, {r['plain_images_per_s']:.1f} images/s steady")
    print(f"Ray Train: {r['ray_wall_s']:.1f} s wall (+ {r['ray_init_s']:.1f} s ray.init), "
          f"{r['ray_images_per_s']:.1f} images/s steady")
    print(f"overhead Ray / plain: wall x{r['wall_ratio']:.2f}, step time x{r['step_ratio']:.2f}")
