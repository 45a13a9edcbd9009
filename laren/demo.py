"""`make demo` / `laren demo`: LAREN on a real GAN prior, on one CPU machine, with nothing downloaded.

1. Local services (:func:`laren.services.start_services`): Ray head + dashboard, MLflow on SQLite, SeaweedFS S3.
2. Data: ``laren data synth faces`` renders procedural faces with 11 known factors into WebDataset shards in the local
   S3: 10,000 for training (seed 0), 512 held out (seed 1), ``s3://laren/datasets/synth-faces-32-{train,val}``.
3. ``jobs/demo.yaml`` (LAREN: GDM + CGM, 8x: 4x4 -> 32x32, no GLEAN decoder, with ``priors/synth32``, the StyleGAN2
   that ``jobs/prior-synth32.yaml`` trained on these faces) and ``jobs/demo-base.yaml`` (Table IV's Base: the W latent
   and random noise, same prior, same budget), submitted together through ``laren submit`` (Ray Jobs -> Ray Train),
   one CPU each; then ``jobs/eval-demo.yaml`` evaluates LAREN's checkpoint on all 512 held-out faces.
4. The table: SR vs Base vs bicubic on the held-out faces, and where to look (MLflow's ``val/samples``:
   LR | bicubic | SR | HR).

``laren demo --photos``: the scikit-image photographs instead (``jobs/demo-photos.yaml``: a random prior, whose image
content comes through the GLEAN decoder, then ``jobs/eval-demo-photos.yaml``). Train and val crops come from disjoint
regions of each photograph (left 80 % / right 20 % of its width), so validation is on unseen pixels.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from laren.config import project_root
from laren.data.pack import pack, read_manifest
from laren.data.synth import synth
from laren.jobs import client
from laren.services import services_env, start_services
from laren.specs import experiment_name, load_any
from laren.tracking import RUN_ID_TAG, find_run, mlflow_client, ui_url

# Colour photographs shipped inside scikit-image (no download).
DEMO_IMAGES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "rocket", "retina")
MIN_CROP_STD = 12.0  # uint8 units: flat crops (sky, black space) would make PSNR infinite and teach nothing
TRAIN_URL = "s3://laren/datasets/skimage-32-train"
VAL_URL = "s3://laren/datasets/skimage-32-val"
SYNTH_TRAIN_URL = "s3://laren/datasets/synth-faces-32-train"
SYNTH_VAL_URL = "s3://laren/datasets/synth-faces-32-val"


def write_demo_images(out_dir: str | Path, split: str, per_image: int, min_side: int = 32, seed: int = 0) -> int:
    """Write ``per_image`` random square crops of each scikit-image photograph as PNGs; returns how many.

    split: "train" crops lie in the left 80 % of each photograph's width, "val" crops in the right 20 %.
    Flat crops (std < MIN_CROP_STD) are redrawn. Crop sides are drawn in [min_side, 3 * min_side] (capped by the region), so `laren data pack` resizes most of them
    down (Lanczos) to the packed resolution.
    """
    import skimage.data  # scikit-image: the demo's photos only (a dev dependency)

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
    counts = {}
    for split, url, per in (("train", train_url, train_per_image), ("val", val_url, val_per_image)):
        have = _complete(url, resolution)
        if have is not None:
            counts[split] = have
            log(f"data: {url} already packed ({have} images)")
            continue
        with tempfile.TemporaryDirectory(prefix=f"laren-demo-{split}-") as d:
            write_demo_images(d, split, per, min_side=resolution)
            name = url.rstrip("/").rsplit("/", 1)[-1]
            res = pack(d, url, name, resolution, progress=False)
            counts[split] = res.manifest["num_samples"]
            log(f"data: packed {counts[split]} {split} crops of scikit-image photographs -> {url}")
    return counts


def _complete(url: str, resolution: int) -> Optional[int]:
    """The sample count of a complete packed set at ``url`` with this resolution, else None."""
    try:
        m = read_manifest(url)
    except Exception:  # absent or unreadable: (re)write it
        return None
    return m["num_samples"] if m.get("complete") and m.get("resolution") == resolution else None


def synth_demo_data(train_url: str = SYNTH_TRAIN_URL, val_url: str = SYNTH_VAL_URL, resolution: int = 32,
                    train_count: int = 10_000, val_count: int = 512, log: Callable[[str], None] = print) -> dict[str, int]:
    """Procedural faces (``laren data synth faces``) at ``train_url`` (seed 0) / ``val_url`` (seed 1); complete sets
    are kept."""
    counts = {}
    for split, url, n, seed in (("train", train_url, train_count, 0), ("val", val_url, val_count, 1)):
        have = _complete(url, resolution)
        if have is not None:
            counts[split] = have
            log(f"data: {url} already written ({have} faces)")
            continue
        res = synth("faces", url, resolution, n, seed=seed, shard_size_mb=4.0, progress=False)
        counts[split] = res.manifest["num_samples"]
        log(f"data: {counts[split]} synthetic faces (seed {seed}) -> {url}")
    return counts


def _mlflow_metrics(uri: str, experiment: str, run_name: str, tag: str = "") -> tuple[dict[str, float], str]:
    """(latest metrics, run URL) of the newest run in ``experiment`` whose ``tag`` (default ``laren.run_id``) is
    ``run_name``."""
    c = mlflow_client(uri)
    exp = c.get_experiment_by_name(experiment)
    r = find_run(c, [exp.experiment_id], run_name, tag=tag or RUN_ID_TAG, newest=True) if exp else None
    if r is None:
        return {}, ""
    return dict(r.data.metrics), ui_url(uri, f"experiments/{exp.experiment_id}/runs/{r.info.run_id}")


def _submit(path: Path, address: str, log):
    sub = client.submit(path, address=address, log=log)
    log(f"{sub.kind} job {sub.run_id}: {sub.action} on {address}")
    return sub


def _wait(sub, address: str, log, timeout_s: float, follow: bool = True) -> str:
    if sub.action == "finished":
        return "SUCCEEDED"
    t0 = time.monotonic()
    if follow:
        for line in client.follow_logs(sub.run_id, address):
            log(line.rstrip("\n"))
    st = client.wait(sub.run_id, address, timeout_s=max(60.0, timeout_s - (time.monotonic() - t0)))
    log(f"{sub.kind} job {sub.run_id}: {st}")
    return st


def _fmt(v, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) and math.isfinite(v) else "n/a"


def run_demo(root: Optional[Path] = None, num_cpus: Optional[int] = None, log: Callable[[str], None] = print,
             timeout_s: float = 1200.0, photos: bool = False) -> bool:
    """Run the demo end to end (see the module docstring); True when every job succeeded."""
    t0 = time.monotonic()
    root = root or project_root()
    jobs = root / "jobs"
    log("== 1/4 local services")
    svc = start_services(root, num_cpus=num_cpus, log=log)
    env = services_env(svc)
    os.environ.update(env)  # data writing and the MLflow queries below use the local S3 and MLflow
    address, uri = svc["ray"]["dashboard_url"], env["MLFLOW_TRACKING_URI"]
    if photos:
        log("== 2/4 data: scikit-image photographs -> shards in the local S3")
        pack_demo_data(TRAIN_URL, VAL_URL, log=log)
        train_jobs, eval_job = [jobs / "demo-photos.yaml"], jobs / "eval-demo-photos.yaml"
    else:
        log("== 2/4 data: procedural faces (`laren data synth faces`) -> shards in the local S3")
        synth_demo_data(log=log)
        train_jobs, eval_job = [jobs / "demo.yaml", jobs / "demo-base.yaml"], jobs / "eval-demo.yaml"
    log(f"== 3/4 training {', '.join(p.name for p in train_jobs)} through `laren submit`")
    subs = [_submit(p, address, log) for p in train_jobs]
    sts = [_wait(sub, address, log, timeout_s, follow=i == 0) for i, sub in enumerate(subs)]
    if any(st != "SUCCEEDED" for st in sts):
        for sub, st in zip(subs, sts):
            if st != "SUCCEEDED":
                log(f"training {sub.run_id}: {st}; see `laren logs {sub.run_id}`")
        return False
    log(f"== 4/4 evaluating {train_jobs[0].name}: {eval_job.name}")
    esub = _submit(eval_job, address, log)
    est = _wait(esub, address, log, timeout_s)

    def found(path: Path, sub, tag: str = "") -> tuple[dict[str, float], str]:
        return _mlflow_metrics(uri, experiment_name(load_any(path)), sub.run_id, tag=tag)

    metrics = [found(p, sub) for p, sub in zip(train_jobs, subs)]
    em, eurl = found(eval_job, esub, tag="laren.eval_job")  # one eval run per (checkpoint, data set)
    (tm, turl) = metrics[0]
    log("")
    log("Held-out images, 8x super-resolution (PSNR in dB on RGB, SSIM):")
    log("| model | job | val PSNR | val SSIM |")
    log("|---|---|---|---|")
    log(f"| bicubic upsampling | - | {_fmt(tm.get('val/psnr_bicubic'))} | - |")
    if not photos:
        bm, _ = metrics[1]
        log(f"| Base (W latent, random noise) | {train_jobs[1].name} | {_fmt(bm.get('val/psnr'))} | {_fmt(bm.get('val/ssim'), 3)} |")
    log(f"| LAREN | {train_jobs[0].name} | {_fmt(tm.get('val/psnr'))} | {_fmt(tm.get('val/ssim'), 3)} |")
    log(f"| bicubic, all held-out images | {eval_job.name} | {_fmt(em.get('test/psnr_bicubic'))} | - |")
    log(f"| LAREN, all held-out images | {eval_job.name} | {_fmt(em.get('test/psnr'))} | {_fmt(em.get('test/ssim'), 3)} |")
    log("")
    log(f"MLflow UI:      {ui_url(uri, 'experiments')}")
    for p, (_, url) in zip(train_jobs, metrics):
        log(f"  {p.stem + ':':14s}{url or '(not found)'}   (Images: val/samples = LR | bicubic | SR | HR)")
    log(f"  {eval_job.stem + ':':14s}{eurl or '(not found)'}")
    model = f"laren-{load_any(train_jobs[0]).name}"
    log(f"  {'model:':14s}{ui_url(uri, 'models/' + model)} (try `laren upscale --model models:/{model}/latest IMG --out sr`)")
    log(f"Ray dashboard:  {address}")
    log(f"demo finished in {time.monotonic() - t0:.0f} s; `make services-stop` stops the local services")
    return est == "SUCCEEDED"
