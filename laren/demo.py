"""`make demo` / `laren demo`: the whole pipeline on one CPU machine, with nothing downloaded.

1. Local services (:func:`laren.submit.start_services`): Ray head + dashboard, MLflow on SQLite, SeaweedFS S3.
2. A small real-image data set: crops of the colour photographs scikit-image ships (``skimage.data``), packed to
   WebDataset shards in the local S3 (``s3://laren/datasets/skimage-32-{train,val}``). Train and val crops come from
   disjoint regions of each photograph (left 80 % / right 20 % of its width), so validation is on unseen pixels.
3. ``jobs/demo.yaml`` (a tiny LAREN, 8 -> 32) trained through ``laren submit`` (Ray Jobs -> Ray Train), then
   ``jobs/eval-demo.yaml`` evaluating its checkpoint, also submitted.
4. The metrics table and where to look (MLflow UI, Ray dashboard).
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

# Colour photographs shipped inside scikit-image (no download).
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "retina")
MIN_CROP_STD = 12.0  # uint8 units: flat crops (sky, black space) would make PSNR infinite and teach nothing
TRAIN_URL = "s3://laren/datasets/skimage-32-train"
VAL_URL = "s3://laren/datasets/skimage-32-val"


def write_demo_images(out_dir: str | Path, split: str, per_image: int, min_side: int = 32, seed: int = 0) -> int:
    """Write ``per_image`` random square crops of each scikit-image photograph as PNGs; returns how many.

    split: "train" crops lie in the left 80 % of each photograph's width, "val" crops in the right 20 %.
    Flat crops (std < MIN_CROP_STD) are redrawn. Crop sides are drawn in [min_side, 3 * min_side] (capped by the region), so `laren data pack` resizes most of them
    down (Lanczos) to the packed resolution.
    """
    import skimage.data
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    n = 0
    for name in DEMO_IMAGES:
        img = getattr(skimage.data, name)()[..., :3]
        h, w = img.shape[:2]
        x0, x1 = (0, int(0.8 * w)) if split == "train" else (int(0.8 * w), w)
        for i in range(per_image):
            for _ in range(100):  # redraw flat crops
                side = int(rng.integers(min_side, 3 * min_side + 1))
                side = min(side, h, x1 - x0)
                y = int(rng.integers(0, h - side + 1))
                x = int(rng.integers(x0, x1 - side + 1))
                crop = img[y:y + side, x:x + side]
                if crop.std() >= MIN_CROP_STD:
                    break
            Image.fromarray(np.ascontiguousarray(crop)).save(out / f"{name}-{i:03d}.png")
            n += 1
    return n


def pack_demo_data(train_url: str, val_url: str, resolution: int = 32, train_per_image: int = 40,
                   val_per_image: int = 4, log: Callable[[str], None] = print) -> dict[str, int]:
    """Crops -> shards + manifest at ``train_url`` / ``val_url`` (local or s3://); already complete sets are kept."""
    from laren.data.pack import pack, read_manifest

    counts = {}
    for split, url, per in (("train", train_url, train_per_image), ("val", val_url, val_per_image)):
        try:
            m = read_manifest(url)
            if m.get("complete") and m.get("resolution") == resolution:
                counts[split] = m["num_samples"]
                log(f"data: {url} already packed ({m['num_samples']} images)")
                continue
        except Exception:
            pass
        with tempfile.TemporaryDirectory(prefix=f"laren-demo-{split}-") as d:
            write_demo_images(d, split, per, min_side=resolution)
            name = url.rstrip("/").rsplit("/", 1)[-1]
            res = pack(d, url, name, resolution, progress=False)
            counts[split] = res.manifest["num_samples"]
            log(f"data: packed {counts[split]} {split} crops of scikit-image photographs -> {url}")
    return counts


def _mlflow_metrics(uri: str, experiment: str, run_name: str, tag: str = "") -> tuple[dict[str, float], str]:
    """(latest metrics, run URL) of the newest run in ``experiment`` whose ``tag`` (default ``laren.run_id``) is
    ``run_name``."""
    from mlflow.tracking import MlflowClient

    from laren.tracking import RUN_ID_TAG

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return {}, ""
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{tag or RUN_ID_TAG}` = '{run_name}'", max_results=1,
                         order_by=["attributes.start_time DESC"])
    if not runs:
        return {}, ""
    r = runs[0]
    return dict(r.data.metrics), f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}/runs/{r.info.run_id}"


def _submit_and_wait(path: Path, address: str, log, timeout_s: float) -> tuple[str, str]:
    from laren import submit as S

    sub = S.submit(path, address=address, log=log)
    log(f"{sub.kind} job {sub.run_id}: {sub.action} on {address}")
    if sub.action == "finished":
        return sub.run_id, "SUCCEEDED"
    t0 = time.monotonic()
    for line in S.follow_logs(sub.run_id, address):
        log(line.rstrip("\n"))
    st = S.wait(sub.run_id, address, timeout_s=max(60.0, timeout_s - (time.monotonic() - t0)))
    log(f"{sub.kind} job {sub.run_id}: {st} in {time.monotonic() - t0:.0f} s")
    return sub.run_id, st


def run_demo(root: Optional[Path] = None, num_cpus: Optional[int] = None, log: Callable[[str], None] = print,
             timeout_s: float = 900.0) -> bool:
    """Run the demo end to end (see the module docstring); True when training and evaluation succeeded."""
    from laren import submit as S
    from laren.specs import load_job

    t0 = time.monotonic()
    root = root or S.project_root()
    log("== 1/4 local services")
    svc = S.start_services(root, num_cpus=num_cpus, log=log)
    env = S.services_env(svc)
    os.environ.update(env)  # pack and the MLflow queries below use the local S3 and MLflow
    address = svc["ray"]["dashboard_url"]
    log("== 2/4 data: scikit-image photographs -> shards in the local S3")
    pack_demo_data(TRAIN_URL, VAL_URL, log=log)
    log("== 3/4 training jobs/demo.yaml through `laren submit`")
    train_id, st = _submit_and_wait(root / "jobs" / "demo.yaml", address, log, timeout_s)
    if st != "SUCCEEDED":
        log(f"training {st}: see `laren logs {train_id}`")
        return False
    log("== 4/4 evaluating it: jobs/eval-demo.yaml")
    eval_id, est = _submit_and_wait(root / "jobs" / "eval-demo.yaml", address, log, timeout_s)

    uri = env["MLFLOW_TRACKING_URI"]
    tm, turl = _mlflow_metrics(uri, load_job(root / "jobs" / "demo.yaml").tracking.experiment or "demo", train_id)
    em, eurl = _mlflow_metrics(uri, "eval-demo", eval_id, tag="laren.eval_job")  # one run per (checkpoint, data set)
    rows = [("val/psnr (dB, SR)", tm.get("val/psnr")), ("val/psnr_bicubic (dB, bicubic upsampling)", tm.get("val/psnr_bicubic")),
            ("val/ssim", tm.get("val/ssim")), ("train/kimg", tm.get("train/kimg")),
            ("test/psnr (eval job)", em.get("test/psnr")), ("test/ssim (eval job)", em.get("test/ssim"))]

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else "n/a"

    log("")
    log("| metric | value |")
    log("|---|---|")
    for k, v in rows:
        log(f"| {k} | {f(v)} |")
    log("")
    log(f"MLflow UI:      {uri}")
    log(f"  training run: {turl or '(not found)'}")
    log(f"  eval run:     {eurl or '(not found)'}")
    log(f"  model:        {uri.rstrip('/')}/#/models/laren-demo (try `laren upscale --model models:/laren-demo/latest IMG --out sr`)")
    log(f"Ray dashboard:  {address}")
    log(f"demo finished in {time.monotonic() - t0:.0f} s; `make services-stop` stops the local services")
    return est == "SUCCEEDED"
