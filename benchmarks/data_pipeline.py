"""Data pipeline throughput: samples/s per loader worker, with LR synthesis, for 1024^2 and 256^2 sources, PNG and JPEG,
from a local folder and from S3 (a SeaweedFS server on 127.0.0.1, started here when `weed` is installed).

    .venv/bin/python benchmarks/data_pipeline.py [--images 24] [--batches 6] [--batch-size 4] [--demand IMAGES_PER_S]

Each case packs real images (scikit-image's retina / astronaut / coffee / chelsea, center-cropped, flipped and shifted
into distinct samples), then times the training stream of ONE loader worker (num_workers=1, batches after the first, so
worker start-up is excluded): read shard, decode, flip, MATLAB-bicubic LR (1024 -> 16 is x1/64, 256 -> 16 is x1/16).
The demand is the model's training-step throughput (images/s per GPU) from benchmarks/model_step.py when that file
exists (``measure`` / ``images_per_second``), or --demand; the ratio (data samples/s per worker over model images/s) and
the workers needed say how many loader workers one training process needs to keep up.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laren.data import pack as P  # noqa: E402
from laren.data.pipeline import make_train_loader  # noqa: E402


def make_sources(root: Path, n: int, side: int) -> Path:
    """n distinct real images of at least side x side pixels."""
    import skimage.data as d

    base = [d.retina()] if side > 512 else [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]
    out = root / f"src{side}"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = base[i % len(base)]
        s = min(a.shape[0], a.shape[1])
        shift = (i * 7) % max(1, s - side + 1)
        crop = a[shift: shift + max(side, s - shift), : max(side, s - shift)]
        if i % 2:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).resize((side, side), Image.Resampling.LANCZOS).save(out / f"{i:05d}.png")
    return out


def time_stream(url: str, side: int, lr: int, batch_size: int, batches: int) -> float:
    """Samples/s of one loader worker, after its first batch."""
    loader = make_train_loader(url, side, lr, batch_size, num_workers=1, shuffle_buffer=batch_size,
                               batches_per_epoch=batches + 1)
    it = iter(loader)
    next(it)  # worker start-up and first shard open
    t0 = time.perf_counter()
    n = sum(len(b["key"]) for b in it)
    return n / (time.perf_counter() - t0)


def model_demand(side: int, lr_size: int, args) -> tuple[float | None, str]:
    """Images/s one training process consumes: --demand, else benchmarks/model_step.py (imported defensively).

    ``--demand-model full``: the paper-size model for this HR side (prior at ``side``, LR ``lr_size``); on a CPU its GDM is
    timed with 1 of the style codes and scaled, as model_step does. ``tiny``: model_step's tiny model (a 64 px prior),
    a CPU smoke figure only.
    """
    if args.demand:
        return args.demand, "--demand"
    try:
        mod = importlib.import_module("benchmarks.model_step")
        from laren.config import ModelConfig
    except Exception as err:  # absent or broken: say so, keep going
        return None, f"benchmarks/model_step.py not usable ({type(err).__name__}: {err})"
    cpu = args.device == "cpu"
    batch = args.model_batch or (1 if cpu else 8)
    try:
        if args.demand_model == "tiny":
            cfg, what = ModelConfig(**mod.TINY), "tiny model, 64 px prior"
        else:
            cfg = ModelConfig(lr_size=lr_size, prior=dict(resolution=side))
            what = f"full model, {side} px prior, LR {lr_size}"
        if hasattr(mod, "measure"):
            codes = 1 if (cpu and args.demand_model == "full") else None
            ips = mod.measure(cfg, batch, args.device, 1, gdm_codes=codes, whole_step=codes is None,
                              memory=False)["images_per_s"]
        else:
            ips = mod.images_per_second(cfg, batch, args.device)
    except Exception as err:
        return None, f"benchmarks.model_step failed: {type(err).__name__}: {err}"
    return float(ips), f"benchmarks/model_step.py: {what}, batch {batch}, {args.device}"


def main(argv=None) -> list[dict]:
    """Run the cases; print the table and return its rows (``benchmarks/run_all.py`` writes them to RESULTS.md)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="images per source")
    ap.add_argument("--batches", type=int, default=6, help="timed batches per case")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr-size", type=int, default=16)
    ap.add_argument("--demand", type=float, default=None, help="model images/s per training process (overrides model_step)")
    ap.add_argument("--demand-model", choices=["tiny", "full"], default=None,
                    help="model timed for the demand [default: full on cuda, tiny on cpu]")
    ap.add_argument("--device", default="cpu", help="device of the model-step measurement")
    ap.add_argument("--model-batch", type=int, default=None, help="model-step batch [default: 1 on cpu, 8 on cuda]")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 cases")
    ap.add_argument("--quick", action="store_true", help="8 images, 3 timed batches per case (for `make bench`)")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.batches = 8, 3
    rows: list[dict] = []
    args.demand_model = args.demand_model or ("tiny" if args.device == "cpu" else "full")

    tmp = Path(tempfile.mkdtemp(prefix="laren-bench-data-"))
    server = None
    if not args.no_s3:
        try:
            from laren.services import S3Server

            server = S3Server(tmp / "s3").start()
            os.environ.update(server.env())
            server.create_bucket("bench")
        except Exception as err:
            print(f"S3 cases skipped: {type(err).__name__}: {err}")
            server = None
    print(f"{'case':34s} {'samples/s/worker':>16s} {'MB/sample':>10s} {'ratio to demand':>16s} {'workers needed':>15s}")
    try:
        for side in (1024, 256):
            demand, demand_src = model_demand(side, args.lr_size, args)
            print(f"model demand at {side}^2: {f'{demand:.2f} images/s' if demand else 'unknown'} ({demand_src})")
            src = make_sources(tmp, args.images, side)
            for fmt in ("png", "jpg"):
                dests = [("local", str(tmp / f"ds-{side}-{fmt}"))]
                if server is not None:
                    dests.append(("s3", f"s3://bench/ds-{side}-{fmt}"))
                for where, dest in dests:
                    m = P.pack(str(src), dest, f"b{side}{fmt}", side, fmt=fmt, shard_size_mb=4 if side > 512 else 1,
                               workers=2, progress=False).manifest
                    mb = sum(s["bytes"] for s in m["shards"]) / max(1, m["num_samples"]) / 1e6
                    rate = time_stream(dest, side, args.lr_size, args.batch_size, args.batches)
                    ratio = f"{rate / demand:.2f}" if demand else "-"
                    need = f"{math.ceil(demand / rate)}" if demand else "-"
                    case = f"{side}^2 {fmt} {where} (LR {args.lr_size}, x1/{side // args.lr_size})"
                    print(f"{case:34s} {rate:16.1f} {mb:10.3f} {ratio:>16s} {need:>15s}", flush=True)
                    rows.append({"case": case, "samples_per_s": rate, "mb_per_sample": mb, "demand": demand,
                                 "demand_source": demand_src, "workers_needed": need})
    finally:
        if server is not None:
            server.stop()
    return rows


if __name__ == "__main__":
    main()
