"""Loader throughput at 1024^2 PNG: samples/s per loader process (one core) with the LR made on the loader's CPU
(``data.lr_on_device: false``) or on the training device (``true``), and the cores per GPU a node needs to feed the
64x face step.

    .venv/bin/python benchmarks/loader.py [--images 24] [--batches 8] [--device cpu|cuda]

Data: ``--images`` synthetic 1024^2 faces: laren's own `laren data synth` scene (laren.data.synth.render_face) drawn
at 256 px, enlarged (bicubic) and given sensor-like grain (Gaussian, sigma 1.5), so that a PNG weighs about what an
FFHQ 1024^2 PNG does (~1.3 MB; the flat synthetic scene alone would decode far faster than a photograph); packed with
`laren data pack` (PNG). Each case runs the training stream's loader work for batches of 4 (face64x: batch 8 over 2
ranks) on one core: in this process, 1 torch thread, shuffle buffer = one batch, each batch's tensors copied to shared
memory as a loader worker hands them to the training process; ``--batches`` batches after the first are timed in CPU
seconds of this process (so the figure holds on a busy machine: wall time there measures the neighbours). CPU LR: read,
decode, flip, MATLAB bicubic 1024 -> 16 (float64), both images to float32 in [-1, 1] (12 MiB per image handed over).
Device LR: read, decode, flip, the uint8 HR (3 MiB) handed over; its (lr, hr) pair is made on the training device
(timed separately, wall time, per batch).

Demand: the full-size 64x face step costs 3.32 TFLOP per image (G + D step, laren/flops.py's count of
jobs/face64x.yaml); at 35 % MFU of an H200's 989 dense bf16 TFLOP/s one GPU consumes 0.35 x 989 / 3.32 = 104
images/s (the first count, 4.06 TFLOP, gave 85). Cores per GPU = ceil(2 x demand / samples/s per core) loader
processes (a 2x margin) + 1 for the training process.

With ``--device cuda`` it also checks that the device path gives the CPU path's bytes: every timed batch's uint8 HR
through ``lr_hr_pair`` on the GPU vs on the CPU (with TF32 matmuls allowed, as a fast training setup would), and the
vendored MATLAB fixture.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laren.data import pack as P  # noqa: E402
from laren.data import synth  # noqa: E402
from laren.data.pipeline import lr_hr_pair, make_train_loader  # noqa: E402

SIDE, LR, BATCH = 1024, 16, 4
TFLOP_PER_IMAGE, PEAK_TFLOPS, MFU = 3.32, 989.0, 0.35  # the 64x face step (laren/flops.py); H200 dense bf16
DEMAND = MFU * PEAK_TFLOPS / TFLOP_PER_IMAGE  # images/s per GPU (104)
MARGIN = 2.0
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "imresize" / "cases.npz"


def make_faces(folder: Path, n: int, seed: int = 0) -> Path:
    """n synthetic 1024^2 faces with photo-like grain, as PNG files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = synth.render_face(synth.sample_factors("faces", seed, i), SIDE // 4)
        a = np.asarray(img.resize((SIDE, SIDE), Image.Resampling.BICUBIC), dtype=np.float32)
        a = np.clip(a + rng.normal(0.0, 1.5, a.shape) + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:05d}.png")
    return folder


def stream(url: str, batches: int, lr_on_device: bool) -> tuple[float, list[dict]]:
    """(samples per CPU second of the loader's work on one core, after the first batch; the timed batches)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    try:
        loader = make_train_loader(url, SIDE, LR, BATCH, num_workers=0, shuffle_buffer=BATCH, pin_memory=False,
                                   batches_per_epoch=batches + 1, lr_on_device=lr_on_device)
        it = iter(loader)
        next(it)
        got, t0 = [], time.process_time()
        for b in it:
            for t in b.values():
                if torch.is_tensor(t):
                    t.share_memory_()  # the worker's hand-over to the training process
            got.append(b)
        dt = time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
    return sum(len(b["key"]) for b in got) / dt, got


def device_pair_ms(batches: list[dict], device: torch.device) -> float:
    """Median ms to move a batch's uint8 HR to ``device`` and make its (lr, hr) pair there."""
    times = []
    for b in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lr_hr_pair(b["hr_u8"].to(device, non_blocking=True), LR)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times[1:] or times)


def exact_on(device: torch.device, batches: list[dict]) -> str:
    """The device path's bytes vs the CPU path's, on the streamed batches and the MATLAB fixture."""
    torch.backends.cuda.matmul.allow_tf32 = True  # must not matter: the bicubic runs in float64
    bad = 0
    for b in batches:
        lr_c, hr_c = lr_hr_pair(b["hr_u8"], LR)
        lr_d, hr_d = lr_hr_pair(b["hr_u8"].to(device), LR)
        bad += int(not (torch.equal(lr_d.cpu(), lr_c) and torch.equal(hr_d.cpu(), hr_c)))
    cases = np.load(FIXTURE)
    img = torch.from_numpy(cases["face256_u8img"].transpose(2, 0, 1).copy())[None].to(device)
    lr, _ = lr_hr_pair(img, 16)
    ref = torch.from_numpy(cases["face256_u8out_d16"].transpose(2, 0, 1).copy())[None].float() / 127.5 - 1.0
    fixture = torch.equal(lr.cpu(), ref)
    return (f"{len(batches) - bad}/{len(batches)} batches bit-identical on {device} vs CPU (TF32 allowed); "
            f"MATLAB fixture {'exact' if fixture else 'DIFFERS'}")


def measure(images: int = 24, batches: int = 8, device: str = "cpu") -> dict:
    dev = torch.device(device)
    tmp = Path(tempfile.mkdtemp(prefix="laren-bench-loader-"))
    dest = str(tmp / "ds")
    m = P.pack(str(make_faces(tmp / "src", images)), dest, "faces1024", SIDE, fmt="png", shard_size_mb=8,
               workers=2, progress=False).manifest
    mb = sum(s["bytes"] for s in m["shards"]) / max(1, m["num_samples"]) / 1e6
    rows = []
    for name, on_device in (("CPU LR (decode + bicubic + float)", False), ("device LR (decode only, uint8 HR)", True)):
        rate, got = stream(dest, batches, on_device)
        loaders = math.ceil(MARGIN * DEMAND / rate)
        shipped = sum(t.numel() * t.element_size() for k, t in got[0].items() if torch.is_tensor(t)) / BATCH / 2**20
        row = {"case": name, "samples_per_s": rate, "ms_per_image": 1000 / rate, "loaders": loaders,
               "cores_per_gpu": loaders + 1, "mib_shipped": shipped}
        if on_device:
            row["device_ms_per_batch"] = device_pair_ms(got, dev)
            row["exact"] = exact_on(dev, got) if dev.type == "cuda" else None
        rows.append(row)
    return {"rows": rows, "mb_per_png": mb, "images": images, "batches": batches, "device": str(dev),
            "demand": DEMAND, "ratio": rows[1]["samples_per_s"] / rows[0]["samples_per_s"]}


def table(r: dict) -> str:
    out = ["| loader path | ms / image / core | samples/s per core | MiB moved per image | cores per GPU for "
           f"{MARGIN:.0f} x {r['demand']:.0f} images/s |", "|---|---:|---:|---:|---:|"]
    for w in r["rows"]:
        out.append(f"| {w['case']} | {w['ms_per_image']:.1f} | {w['samples_per_s']:.1f} | {w['mib_shipped']:.2f} | "
                   f"{w['cores_per_gpu']} ({w['loaders']} loaders + 1) |")
    dev = r["rows"][1]
    lines = [f"\nDevice LR / CPU LR, samples/s per core: **{r['ratio']:.2f}x**. PNG: {r['mb_per_png']:.2f} MB/image. "
             f"The device's share (uint8 HR to {r['device']} + bicubic + float): {dev['device_ms_per_batch']:.1f} ms "
             f"per batch of {BATCH} on {r['device']}."]
    if dev.get("exact"):
        lines.append(f"Bit-exactness: {dev['exact']}.")
    return "\n".join(out + lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24, help="synthetic 1024^2 faces to pack")
    ap.add_argument("--batches", type=int, default=8, help="timed batches of 4 per case")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="training device for the device-LR share (and, on cuda, the bit-exactness check)")
    args = ap.parse_args(argv)
    r = measure(args.images, args.batches, args.device)
    print(table(r))
    return r


if __name__ == "__main__":
    main()
