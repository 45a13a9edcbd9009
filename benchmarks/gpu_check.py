"""GPU check: the 64x face training step (jobs/face64x.yaml: 16 -> 1024, GDM + CGM, frozen StyleGAN2 1024) at batch 8 in
bf16 autocast, as the worker loop runs it: generator step (pixel + perceptual VGG16 + adversarial losses, Adam on the
encoder / GDM / CGM) and discriminator step (Adam on D).

    .venv/bin/python benchmarks/gpu_check.py                        # CUDA, full size, compile off then on
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny    # smoke mode: tiny model, a few steps, on the CPU

Figures (one JSON object per compile setting, also written to --out):
  images_per_s    batch / median step time over --steps timed steps after --warmup steps (CUDA-synchronised)
  flops_per_step  counted, not estimated, as the training loop's perf/mfu counts it: batch x
                  ``laren.flops.step_flops_per_image`` (torch's FLOP counter on the meta device at batch 1, forward and
                  backward of G and D, VGG16 included; how and why batch 1: the docstring of laren/flops.py)
  mfu             flops_per_step x steps/s / peak; peak: the device's dense bf16 (fp32 with --no-bf16) peak from its
                  name (``laren.flops.PEAK_TFLOPS``: H200 989, H200 NVL 835, H100 SXM 989, ...), or --peak-tflops
  peak_mem_gib    torch.cuda.max_memory_allocated over the timed steps (CPU: not measured, null)
  compile_s       torch.compile: time of the first (compiling) steps

No weights are read: the prior, D and VGG16 are randomly initialised with the real architectures (FLOPs, time and
memory do not depend on the weight values). The GDM codes, CGM noise and losses follow the job file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from laren.flops import device_peak_tflops, step_flops_per_image  # noqa: E402 - after the checkout is on the path

TINY_MODEL = dict(
    lr_size=8,
    prior=dict(resolution=32, style_dim=32, mapping_layers=2, channel_multiplier=1, channel_max=32),
    encoder=dict(rrdb_blocks=1, rrdb_channels=16, rrdb_growth=8),
    gdm=dict(num_nodes=4, node_dim=4, convkb_filters=4, chunk_size=64),
    cgm=dict(code_dim=8, noise_proj_max_res=16),
)


def load_setup(tiny: bool):
    """(model config, loss config) of jobs/face64x.yaml; --tiny swaps in a CPU-sized model, same losses."""
    from laren.config import ModelConfig
    from laren.specs import load_job

    job = load_job(ROOT / "jobs" / "face64x.yaml").run_config()
    mcfg = ModelConfig(**TINY_MODEL) if tiny else job.model.model_copy(update={
        "prior": job.model.prior.model_copy(update={"path": None})})  # random weights: no file needed
    return mcfg, job.loss


class Step:
    """One training step of the worker loop (``laren.train.loop.train_step``: G step, then D step), on fixed random
    tensors, on one device (no gradient all-reduce)."""

    def __init__(self, mcfg, loss, batch: int, device: torch.device, bf16: bool, compile_: bool):
        from laren import losses as L
        from laren.models.build import build_discriminator, build_model

        torch.manual_seed(0)
        self.loss = loss
        self.model = build_model(mcfg, device="cpu").to(device).train()
        self.disc = build_discriminator(mcfg).to(device).train()
        self.vgg = L.random_vgg16(0).to(device) if loss.perceptual_weight > 0 else None
        self.opt_g = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.999))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=1e-4, betas=(0.9, 0.999))
        self.fwd_g, self.fwd_d = self.model, self.disc
        if compile_:
            self.fwd_g, self.fwd_d = torch.compile(self.model), torch.compile(self.disc)
        R, l = mcfg.prior.resolution, mcfg.lr_size
        g = torch.Generator().manual_seed(1)
        self.hr = (torch.rand(batch, 3, R, R, generator=g) * 2 - 1).to(device)
        self.lr = (torch.rand(batch, 3, l, l, generator=g) * 2 - 1).to(device)
        self.autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def __call__(self) -> dict[str, torch.Tensor]:
        from laren.train.step import train_step

        return train_step(self.fwd_g, self.fwd_d, self.vgg, self.opt_g, self.opt_d, self.lr, self.hr, self.loss,
                          self.autocast)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(mcfg, loss, batch: int, device: torch.device, bf16: bool, compile_: bool, warmup: int, steps: int,
        peak_tflops: float | None, flops: int) -> dict:
    """Time ``steps`` steps after ``warmup`` (with compile: the compilation); ``flops``: FLOPs of one step."""
    step = Step(mcfg, loss, batch, device, bf16, compile_)
    t0 = time.perf_counter()
    for _ in range(warmup):  # with compile: the compilation happens here
        step()
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        _sync(device)
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {"compile": compile_, "batch": batch, "bf16": bf16, "step_s": s, "images_per_s": batch / s,
           "flops_per_step": flops, "tflops_per_s": flops / s / 1e12, "peak_tflops": peak_tflops,
           "mfu": flops / s / (peak_tflops * 1e12) if peak_tflops else None,
           "peak_mem_gib": peak, ("compile_s" if compile_ else "warmup_s"): warm_s, "timed_steps": steps}
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="smoke mode: tiny model (32 px prior), batch 2, 2 steps")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (2 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 (1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, default 10 (2 with --tiny)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="both")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="accelerator peak for MFU (default: laren.flops.PEAK_TFLOPS by the device name, e.g. H200 989)")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check.json"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: run on a GPU machine, or smoke-test with --device cpu --tiny")
    batch = args.batch or (2 if args.tiny else 8)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    steps = args.steps or (2 if args.tiny else 10)
    bf16 = not args.no_bf16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    mcfg, loss = load_setup(args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = device_peak_tflops(device, bf16, args.peak_tflops)
    flops = batch * step_flops_per_image(mcfg, loss)  # the same figure for both compile settings
    print(f"device {name}, torch {torch.__version__}, model {'tiny' if args.tiny else 'face64x (16 -> 1024)'}, "
          f"batch {batch}, bf16 {bf16}", flush=True)
    results: list[dict] = []
    for comp in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        r = run(mcfg, loss, batch, device, bf16, comp, warmup, steps, peak, flops)
        r["device"] = name
        results.append(r)
        mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
        print(f"compile {'on ' if comp else 'off'}: {r['images_per_s']:.2f} images/s, {r['step_s'] * 1e3:.1f} ms/step, "
              f"{r['flops_per_step'] / 1e12:.3f} TFLOP/step, {r['tflops_per_s']:.1f} TFLOP/s, "
              f"MFU {'n/a' if r['mfu'] is None else format(100 * r['mfu'], '.2f') + '%'} of {peak or 'unknown'} TFLOP/s, "
              f"peak {mem}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
