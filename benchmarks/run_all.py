"""Every benchmark, one after the other, written to benchmarks/RESULTS.md with the machine, the command and how each
figure was measured (``make bench``; about 10 minutes on a 2-core CPU machine).

    .venv/bin/python benchmarks/run_all.py [--out benchmarks/RESULTS.md] [--only step,gdm,convkb,data,loader,ray,ckpt,profile,ddp,resume]

Sections: training-step throughput and peak memory (LAREN vs Base vs glean_skips), GDM chunked vs unchunked memory, the GDM's ConvKB sum (literal vs sorted units),
data pipeline samples/s per loader worker, loader samples/s per core with the LR made on the CPU vs on the training
device (and the cores per GPU that feed the 64x face step), Ray Train vs a plain torch DDP loop, checkpoint save time to S3, the
profile of the training step, and the GPU check (pending until it is run on a GPU: benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MIB = 2**20


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        mem = float("nan")
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"- CPU: {cpu}, {os.cpu_count()} cores; memory {mem:.0f} GiB; GPU: {gpu}\n"
            f"- {platform.system()} {platform.release()}, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)\n- commit {rev or '?'}, {time.strftime('%Y-%m-%d %H:%M %Z')}")


# ----------------------------------------------------------------------------------------------- sections


def section_step() -> str:
    import torch

    from benchmarks.model_step import TINY, _prepare, peak_bytes, time_fn
    from laren.config import ModelConfig

    batch, dev = 4, torch.device("cpu")
    variants = {
        "LAREN (GDM + CGM)": ModelConfig(**TINY),
        "Base (W, random noise)": ModelConfig(**TINY, latent_space="w", noise_source="random"),
        "LAREN + glean_skips": ModelConfig(**TINY, glean_skips=True),
    }
    rows = []
    for name, cfg in variants.items():
        model = _prepare(cfg, dev)
        lr = torch.rand(batch, 3, cfg.lr_size, cfg.lr_size) * 2 - 1

        def step():
            model.zero_grad(set_to_none=True)
            model(lr).square().mean().backward()

        t = time_fn(step, dev, repeats=2)
        peak = peak_bytes(step, dev)
        rows.append((name, t, batch / t, peak / MIB))
    base_t = rows[1][1]
    out = ["| model | fwd+bwd s/step | images/s | peak MiB | step time / Base |", "|---|---:|---:|---:|---:|"]
    out += [f"| {n} | {t:.3f} | {ips:.1f} | {pk:.1f} | {t / base_t:.2f}x |" for n, t, ips, pk in rows]
    return ("How: `benchmarks/model_step.py`'s tiny model (64 px prior, 16 -> 64, H=32, J=8 nodes; "
            f"`model_step.TINY`), batch {batch}, forward + backward of the SR model on the CPU (fastest of 2 after a "
            "warm-up); peak = bytes of tensors alive at once during one step (CPU profiler allocation records). "
            "Full-size per-module figures: `.venv/bin/python benchmarks/model_step.py --size full`.\n\n" + "\n".join(out))


def section_gdm() -> str:
    from benchmarks.gdm_memory import measure

    rows = measure()
    out = ["| attributes D | mode | peak MiB | fwd+bwd s |", "|---:|---|---:|---:|"]
    out += [f"| {r['attributes']} | {r['mode']} | {r['peak_mib']:.1f} | {r['seconds']:.3f} |" for r in rows]
    return ("How: `benchmarks/gdm_memory.py`: one HMRR GDM (H=128, J=16, C=8, Omega=8), batch 2, forward + backward, "
            "D = N x H for N = 2 and 8 codes; unchunked = one chunk spanning D without recomputation; chunked = 256 "
            "attributes per chunk with (the training default) and without recomputation in backward. Peak = bytes of "
            "tensors alive at once (CPU profiler). Chunked + recompute stays flat in D.\n\n" + "\n".join(out))


def section_convkb() -> str:
    from benchmarks.gdm_convkb import measure

    rows = measure()
    out = ["| form | fwd s | fwd+bwd s | fwd speed-up | fwd+bwd speed-up |", "|---|---:|---:|---:|---:|"]
    out += [f"| {r['form']} | {r['fwd_s']:.3f} | {r['fwd_bwd_s']:.3f} | {r['speedup_fwd']:.2f}x | "
            f"{r['speedup_fwd_bwd']:.2f}x |" for r in rows]
    return ("How: `benchmarks/gdm_convkb.py`: HMRR's ConvKB sum for one 256-attribute chunk at the paper's widths "
            "(J=64: 4032 pairs, C=8, Omega=8), batch 2, one thread, best of 3. Literal = the (B, P, Dc, Omega, C) "
            "tensor of ReLUs summed with w; sorted = the sorted-unit form (laren/models/gdm.py) that the GDM runs. "
            f"float64 outputs agree to {rows[0]['max_abs_diff_f64']:.0e}.\n\n" + "\n".join(out))


def section_data() -> str:
    from benchmarks import data_pipeline

    rows = data_pipeline.main(["--quick"])
    demand = {r["demand_source"] for r in rows}
    out = ["| case | samples/s per worker | MB/sample | loader workers to feed the model |", "|---|---:|---:|---:|"]
    out += [f"| {r['case']} | {r['samples_per_s']:.1f} | {r['mb_per_sample']:.3f} | {r['workers_needed']} |" for r in rows]
    return ("How: `benchmarks/data_pipeline.py --quick`: 8 real images (scikit-image) packed per case, ONE loader "
            "worker streams batches of 4 (read shard, decode, flip, MATLAB-bicubic LR at x1/64 or x1/16), 3 timed "
            "batches after the first; local folder and the SeaweedFS S3 server on 127.0.0.1. Model demand (images/s "
            f"to feed): {'; '.join(sorted(demand))}.\n\n" + "\n".join(out))


def section_loader() -> str:
    from benchmarks import loader

    r = loader.measure(images=24, batches=8)
    return ("How: `benchmarks/loader.py` (its docstring has the details): 24 synthetic 1024^2 faces (laren's `data synth` "
            f"scene with photo-like grain, {r['mb_per_png']:.2f} MB per PNG, FFHQ's size), packed; the training stream's "
            "loader work for batches of 4 on one core (1 torch thread, in process, each batch copied to shared memory "
            f"as a worker hands it over), {r['batches']} batches after the first, in CPU seconds. Demand: "
            f"{r['demand']:.0f} images/s per GPU (3.32 TFLOP per image for the 64x face G + D step, laren/flops.py; 35 % "
            "MFU of an H200's 989 TFLOP/s); cores per "
            "GPU = loaders for twice that + 1 for the training process. jobs/face64x.yaml takes the device-LR figure."
            "\n\n" + loader.table(r))


def section_ray() -> str:
    from benchmarks.ray_vs_ddp import measure

    r = measure(16)
    return ("How: `benchmarks/ray_vs_ddp.py`: the same worker loop, tiny model (32 px prior, H=32, 4 nodes), data and "
            "16 steps of batch 4 on 2 CPU workers (gloo): a plain `torch.multiprocessing` + `init_process_group` run "
            "(1 torch thread per process, as Ray gives each worker 1 CPU), then `run_training` on Ray Train (local "
            "Ray started before the clock). Steady rate = median `perf/images_per_s` of steps 3-16 from MLflow.\n\n"
            "| | plain DDP | Ray Train | Ray / plain |\n|---|---:|---:|---:|\n"
            f"| wall time, whole run (s) | {r['plain_wall_s']:.1f} | {r['ray_wall_s']:.1f} | {r['wall_ratio']:.2f}x |\n"
            f"| steady step rate (images/s, both workers) | {r['plain_images_per_s']:.1f} | {r['ray_images_per_s']:.1f} "
            f"| step time {r['step_ratio']:.2f}x |\n\n`ray.init` (local instance start, paid once per driver): "
            f"{r['ray_init_s']:.1f} s.")


def section_ckpt() -> str:
    from benchmarks.checkpoint_s3 import measure

    r = measure()
    mb = r["bytes"] / MIB
    return ("How: `benchmarks/checkpoint_s3.py`: the full-size 64x face model (LarenSR at 1024 px + StyleGAN2 D, "
            f"{r['params'] / 1e6:.0f} M parameters) with both Adam states, `save_checkpoint` to a local folder "
            "(safetensors + sha256 + state.json), then the files uploaded to the SeaweedFS S3 server on 127.0.0.1 "
            "(multipart above 64 MiB).\n\n| checkpoint | local save | upload to S3 | total |\n|---:|---:|---:|---:|\n"
            f"| {mb:.0f} MiB | {r['local_s']:.1f} s | {r['upload_s']:.1f} s ({mb / r['upload_s']:.0f} MiB/s) "
            f"| {r['total_s']:.1f} s |")


def section_ddp() -> str:
    from benchmarks.ddp_step import measure, table

    batch = 4
    t = measure(steps=6, batch=batch)
    return ("How: `benchmarks/ddp_step.py`: 2 gloo processes, 1 CPU thread each, TINY LAREN (64 px prior, 16x), batch "
            f"{batch} per rank, adversarial term on; median s/step on rank 0 over 6 steps after 2 warm-up steps, the "
            "three ways taking turns step by step. `before` = VGG16 on SR and HR in one graph, D on each fake twice, "
            "hand-written flat all-reduce; `manual` = today's step with the hand-written all-reduce; `ddp` = today's "
            f"step under torch DDP (what training runs).\n\n{table(t, batch)}\n\n"
            f"**DDP vs manual averaging: {t['manual'] / t['ddp']:.2f}x; the step after vs before: "
            f"{t['before'] / t['ddp']:.2f}x faster.** On 2 CPU cores the all-reduce is cheap and there is little to "
            "overlap; the overlap pays with NCCL on GPUs.")


def section_profile() -> str:
    from benchmarks.profile_step import profile_step

    r = profile_step(steps=6, top=12, python_profile=False, warm=False)
    return ("How: `benchmarks/profile_step.py`: `train_worker` itself (data, generator step with pixel + perceptual + "
            "adversarial losses, discriminator step, logging) on a 64 px prior at 16x, batch 4, 6 steps, CPU; steady "
            f"rate = median `perf/images_per_s` of steps 2-6. **{r['seconds_per_step']:.2f} s/step "
            f"({r['images_per_s']:.1f} images/s).** Top operators by self CPU time (PyTorch profiler, one more run):"
            f"\n\n```\n{r['torch_ops'].strip()}\n```")


def section_resume() -> str:
    from benchmarks.resume_seek import measure

    r = measure(side=256)  # at 128^2 a pass decodes so fast that the loader's start-up (~0.3 s) is most of the seek
    how = (f"How: `benchmarks/resume_seek.py`: {r['images']} real images (scikit-image) packed at {r['side']}^2 into "
           f"a local folder; training loader with batch {r['batch_size']}, shuffle buffer {r['buffer']}, "
           f"{r['workers']} loader worker(s); a run stops at batch {r['cut']} of the {r['batches_per_pass']} of a pass "
           "(90 %) and saves its data position. Timed: a fresh loader from `iter()` (worker start-up included) to its "
           "first batch, resumed by the old path (decode and drop the consumed batches) and the new one (seek: replay "
           f"indices, decode the buffer and partial batch); both give the same batch: {r['same_batch']}.")
    return (f"{how}\n\n| old: decode and drop | new: seek | new / old |\n|---:|---:|---:|\n"
            f"| {r['old_s']:.2f} s | {r['new_s']:.3f} s | {100 * r['ratio']:.1f} % |")


SECTIONS = {
    "step": ("Training-step throughput and peak memory: LAREN vs Base vs glean_skips", section_step),
    "gdm": ("GDM memory: chunked vs unchunked", section_gdm),
    "convkb": ("GDM ConvKB sum: literal vs sorted units (one chunk, paper widths)", section_convkb),
    "data": ("Data pipeline: samples/s per loader worker", section_data),
    "loader": ("Loader: CPU LR vs device LR (samples/s per core, cores per GPU at 1024^2)", section_loader),
    "ray": ("Ray Train vs plain torch DDP (same model, 2 workers)", section_ray),
    "ckpt": ("Checkpoint save time to S3", section_ckpt),
    "profile": ("Profile of the training step", section_profile),
    "ddp": ("The step under DDP vs the hand-written all-reduce, and before vs after (2 gloo workers)", section_ddp),
    "resume": ("Resume at 90 % of a pass: time to the first batch, old path vs new", section_resume),
}

GPU_PENDING = """## GPU check (64x face step, batch 8, bf16, H200): pending

Not measured yet: no GPU was available where these figures were made. `benchmarks/gpu_check.sh` (under 8 minutes on
one H200) measures the full-size 64x face training step at batch 8 in bf16: images/s, FLOPs per step counted as the
training loop's `perf/mfu` counts them (`laren/flops.py`: PyTorch's FLOP counter on the meta device at batch 1, times
the batch: 3.32 TFLOP per image), MFU against the device's dense bf16 peak (H200: 989 TFLOP/s), peak memory, with
torch.compile off and on. It writes `benchmarks/gpu_check.json` and prints a table to paste here. Its
Python part was smoke-tested on the CPU: `.venv/bin/python benchmarks/gpu_check.py --device cpu --tiny`.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ",".join(SECTIONS))
    args = ap.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    extra = Path(ROOT / "benchmarks" / "RESULTS.extra.md")
    t_all = time.perf_counter()
    parts = []
    for key in chosen:
        title, fn = SECTIONS[key]
        print(f"== {title}", flush=True)
        t0 = time.perf_counter()
        try:
            body = fn()
        except Exception as err:  # one failing benchmark must not hide the others' figures
            body = f"FAILED: {type(err).__name__}: {err}"
        dt = time.perf_counter() - t0
        print(body, f"\n({dt:.0f} s)\n", flush=True)
        parts.append(f"## {title}\n\n{body}\n\n_(section took {dt:.0f} s)_\n")
    total = time.perf_counter() - t_all
    cmd = "make bench" if os.environ.get("MAKELEVEL") else "python " + " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    text = (f"# Benchmarks\n\nWritten by `benchmarks/run_all.py` (command: `{cmd}`; {total / 60:.1f} min in all).\n\n"
            f"Machine:\n{machine()}\n\nThe machine is shared: figures on 2 cores move by 10-30 % between runs; ratios "
            "measured within one run are the stable part.\n\n" + "\n".join(parts) + "\n" + GPU_PENDING)
    if extra.is_file():  # hand-written notes kept across runs (e.g. the profile-driven change, before/after)
        text += "\n" + extra.read_text()
    Path(args.out).write_text(text)
    print(f"wrote {args.out} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
