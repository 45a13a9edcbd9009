"""Profile of the training step as the worker loop runs it (``laren.train.loop.train_worker``: data, generator step,
discriminator step, logging), on the CPU at a small size.

    .venv/bin/python benchmarks/profile_step.py [--steps 12] [--top 15]

Two views of the same steps: Python's cProfile (cumulative time per function: where the time goes, data loading
included) and PyTorch's profiler (self CPU time per operator). Evaluation and checkpoints happen once, at the end,
and are excluded from the step time (``seconds_per_step`` counts from the 2nd step to the last).
``profile_step(steps)`` returns the figures for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SMALL_MODEL = dict(  # a 64 px prior, 16x: large enough that the model, not Python, dominates a step
    lr_size=4,
    prior=dict(resolution=64, style_dim=64, mapping_layers=2, channel_multiplier=1, channel_max=64),
    encoder=dict(rrdb_blocks=1, rrdb_channels=16, rrdb_growth=8),
    gdm=dict(num_nodes=8, node_dim=8, convkb_filters=4, chunk_size=256),
    cgm=dict(code_dim=16, noise_proj_max_res=32),
)


def _dataset(work: Path, n: int = 16) -> str:
    import numpy as np
    import skimage.data as skd
    from PIL import Image

    from laren.data.pack import pack

    raw = work / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    photos = [skd.astronaut(), skd.coffee(), skd.chelsea()]
    rng = np.random.default_rng(0)
    for i in range(n):
        img = photos[i % 3]
        y, x = int(rng.integers(0, img.shape[0] - 128)), int(rng.integers(0, img.shape[1] - 128))
        Image.fromarray(img[y: y + 128, x: x + 128]).save(raw / f"{i:03d}.png")
    pack(str(raw), str(work / "shards"), "prof", 64, shard_size_mb=0.05, progress=False)
    return str(work / "shards")


def config(data: str, tracking_uri: str, steps: int, batch: int = 4):
    from laren.config import RunConfig

    kimg = steps * batch / 1000.0
    return RunConfig.model_validate(dict(
        name="prof", model=SMALL_MODEL,
        data=dict(train_url=data, num_val_images=4, loader_workers=0, shuffle_buffer=8),
        loss=dict(random_backbone_for_tests=True), eval=dict(random_backbone_for_tests=True),
        train=dict(batch_size_global=batch, total_kimg=kimg, log_every_kimg=batch / 1000.0, eval_every_kimg=kimg,
                   checkpoint_every_kimg=kimg, sample_grid_images=0, seed=0),
        tracking=dict(tracking_uri=tracking_uri, experiment="prof", system_metrics=False),
    ))


def profile_step(steps: int = 12, top: int = 15, torch_profile: bool = True, python_profile: bool = True,
                 warm: bool = True) -> dict:
    """{"seconds_per_step", "images_per_s", "cprofile" (text), "torch_ops" (text)} for ``steps`` steps of batch 4."""
    import torch

    from laren.train.loop import WorkerContext, train_worker

    work = Path(tempfile.mkdtemp(prefix="laren-prof-"))
    data = _dataset(work)
    out: dict = {}

    def run(run_id: str) -> dict:
        return train_worker(config(data, f"sqlite:///{work}/mlflow.db", steps), WorkerContext(run_id=run_id))

    if warm:
        run("warm")  # imports, MLflow store creation, first-touch allocations
    t0 = time.perf_counter()
    res = run("timed")
    total = time.perf_counter() - t0
    # perf/images_per_s is logged every step; the median over steps 2..N is the steady rate (the wall time also holds
    # start-up and the final evaluation + checkpoint).
    import statistics

    from mlflow.tracking import MlflowClient

    c = MlflowClient(f"sqlite:///{work}/mlflow.db")
    run_ = c.search_runs([c.get_experiment_by_name("prof").experiment_id], "attributes.run_name = 'timed'")[0]
    rates = [m.value for m in c.get_metric_history(run_.info.run_id, "perf/images_per_s") if m.step >= 2]
    out["images_per_s"] = statistics.median(rates)
    out["seconds_per_step"] = 4 / out["images_per_s"]
    assert res["step"] == steps
    out["wall_s"] = total
    if python_profile:
        prof = cProfile.Profile()
        prof.enable()
        run("cprofile")
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(top * 3)
        out["cprofile"] = s.getvalue()
    if torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as p:
            run("torchprof")
        out["torch_ops"] = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
    torch.set_num_threads(torch.get_num_threads())
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    r = profile_step(args.steps, args.top)
    print(f"{r['seconds_per_step']:.3f} s/step, {r['images_per_s']:.1f} images/s (last step), wall {r['wall_s']:.1f} s")
    print(r.get("cprofile", ""))
    print(r.get("torch_ops", ""))


if __name__ == "__main__":
    main()
