"""Forward + backward time and peak memory per module (encoder, latent head / GDM, CGM, frozen generator) and the
step-time ratio LAREN / Base (Base = latent_space w, noise random; model-spec section 5).

    .venv/bin/python benchmarks/model_step.py                 # tiny and full size on the CPU
    .venv/bin/python benchmarks/model_step.py --size full --device cuda --batch 8

Full size on a CPU: batch 1 by default. The GDM is timed with fewer style codes (``--gdm-codes``, so fewer
attributes D = N*H), and its time is scaled by N / gdm_codes. Its work is linear in D, and its peak memory is flat in D
(chunking), so the peak memory is reported as measured. The full-size step is then estimated as the sum of the module
times. The output says when this is done. Prints a table; not a test. ``images_per_second(cfg, batch)`` returns the
measured training throughput for reuse (e.g. by other benchmarks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from laren.config import ModelConfig  # noqa: E402
from laren.models.build import build_model  # noqa: E402
from laren.models.gdm import GraphDisentangle, GraphDisentangleVRR  # noqa: E402
from laren.models.stylegan2 import NoiseInjection  # noqa: E402

TINY = dict(
    lr_size=16,
    prior=dict(resolution=64, style_dim=32, mapping_layers=2, channel_max=16),
    encoder=dict(rrdb_blocks=2, rrdb_channels=16, rrdb_growth=8),
    gdm=dict(num_nodes=8, node_dim=8, chunk_size=64),
    cgm=dict(code_dim=16, noise_proj_max_res=32),
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, repeats: int = 2, warmup: int = 1) -> float:
    """Fastest of ``repeats`` calls after warm-up (the minimum is the least disturbed by other load on the machine)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors allocated during fn (CUDA allocator stats, or the CPU profiler's allocation records)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _prepare(cfg: ModelConfig, device: torch.device):
    torch.manual_seed(0)
    model = build_model(cfg, device=device).train()
    with torch.no_grad():  # pre-trained priors have non-zero noise strengths; a fresh generator has 0
        for m in model.generator.modules():
            if isinstance(m, NoiseInjection):
                m.weight.fill_(0.1)
    return model


def module_steps(model, cfg: ModelConfig, batch: int, device: torch.device, gdm_codes: int | None = None):
    """name -> (closure running forward + backward, time multiplier). gdm_codes < N times a GDM with fewer attributes."""
    G = model.generator
    H, N = G.style_dim, G.num_latents
    lr = torch.rand(batch, 3, cfg.lr_size, cfg.lr_size, device=device) * 2 - 1
    steps: dict[str, tuple[Callable[[], None], float]] = {}
    steps["encoder"] = (lambda: model.encoder(lr).sum().backward(), 1.0)

    head, scale = model.head, 1.0
    if isinstance(head, (GraphDisentangle, GraphDisentangleVRR)) and gdm_codes and gdm_codes < N:
        g = cfg.gdm
        head = type(head)(H, g.num_nodes, g.node_dim, gdm_codes, g.convkb_filters,
                          None if g.relation_scale == "dim" else float(g.relation_scale), g.chunk_size,
                          g.checkpoint_chunks).to(device)
        scale = N / gdm_codes
    if len(list(head.parameters())):
        z = torch.randn(batch, H, device=device, requires_grad=True)

        def head_step():
            out = head(z)
            (torch.cat(out, 1) if isinstance(out, list) else out).sum().backward()

        steps["latent head" if cfg.latent_space != "g" else f"GDM ({cfg.gdm_relation})"] = (head_step, scale)
    if model.cgm is not None:
        g_in = torch.randn(batch, N, H, device=device, requires_grad=True)
        steps[f"CGM ({cfg.cgm_relation})"] = (lambda: sum(m.sum() for m in model.cgm(g_in)).backward(), 1.0)
    latents = torch.randn(batch, N, H, device=device, requires_grad=True)
    noise = [torch.randn(batch, 1, r, r, device=device, requires_grad=True) for r in G.noise_resolutions]
    steps["generator (frozen)"] = (lambda: G(latents, noise=noise, randomize_noise=False).sum().backward(), 1.0)
    return steps, lr


def measure(cfg: ModelConfig, batch: int, device: str = "cpu", repeats: int = 2, gdm_codes: int | None = None,
            whole_step: bool = True, memory: bool = True) -> dict:
    """Per-module {name: (seconds fwd+bwd, peak bytes, extrapolated)} and the whole step's seconds and images/s.

    With ``whole_step=False`` the step time is the sum of the module times (used when the GDM is extrapolated)."""
    dev = torch.device(device)
    model = _prepare(cfg, dev)
    steps, lr = module_steps(model, cfg, batch, dev, gdm_codes)
    rows = {}
    for name, (fn, scale) in steps.items():
        t = time_fn(fn, dev, repeats) * scale
        rows[name] = (t, peak_bytes(fn, dev) if memory else 0, scale != 1.0)
    if whole_step:
        step_s = time_fn(lambda: model(lr).square().mean().backward(), dev, repeats)
        estimated = False
    else:
        step_s, estimated = sum(t for t, _, _ in rows.values()), True
    return {"modules": rows, "step_s": step_s, "step_estimated": estimated, "images_per_s": batch / step_s,
            "batch": batch}


def images_per_second(cfg: ModelConfig, batch: int, device: str = "cpu", repeats: int = 2) -> float:
    """Measured training throughput (forward + backward of the SR model, no optimizer, no D) in images/s."""
    return measure(cfg, batch, device, repeats, whole_step=True, memory=False)["images_per_s"]


def _report(title: str, res: dict) -> None:
    print(f"\n{title}  (batch {res['batch']})")
    print(f"  {'module':<24}{'fwd+bwd s':>12}{'peak MiB':>12}")
    for name, (t, peak, extrap) in res["modules"].items():
        print(f"  {name:<24}{t:>12.4f}{peak / 2**20:>12.1f}{'  (time extrapolated from fewer attributes)' if extrap else ''}")
    how = "sum of module times (estimate)" if res["step_estimated"] else "measured"
    print(f"  {'whole step':<24}{res['step_s']:>12.4f}{'':>12}  {how}; {res['images_per_s']:.2f} images/s")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=["tiny", "full", "both"], default="both")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 (tiny), 1 (full on CPU), 8 (full on GPU)")
    ap.add_argument("--gdm-codes", type=int, default=None,
                    help="full size: time the GDM with this many codes and scale to N (default 1 on CPU, none on GPU)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    torch.set_num_threads(torch.get_num_threads())
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")

    if args.size in ("tiny", "both"):
        b, reps = args.batch or 4, args.repeats or 3
        laren = ModelConfig(**TINY)
        base = ModelConfig(**TINY, latent_space="w", noise_source="random")
        r_l = measure(laren, b, args.device, reps)
        r_b = measure(base, b, args.device, reps)
        _report("tiny LAREN (64 px prior, 16 -> 64, H=32, J=8)", r_l)
        _report("tiny Base (w, random noise)", r_b)
        print(f"  ratio LAREN / Base step time: {r_l['step_s'] / r_b['step_s']:.2f}x")

    if args.size in ("full", "both"):
        b = args.batch or (1 if cpu else 8)
        reps = args.repeats or (1 if cpu else 5)
        codes = args.gdm_codes if args.gdm_codes is not None else (1 if cpu else None)
        whole = codes is None
        laren, base = ModelConfig(), ModelConfig(latent_space="w", noise_source="random")
        if not whole:
            print(f"\nfull size: the GDM runs with {codes} of 18 codes (D = {codes * 512} of 9216 attributes); its time is "
                  f"scaled x{18 / codes:.0f}, and the steps are estimated as sums of module times. Base = the same "
                  f"encoder + generator rows (W has no head; random noise costs nothing), so both share one measurement")
        r_l = measure(laren, b, args.device, reps, gdm_codes=codes, whole_step=whole)
        _report("full-size LAREN 64x face (16 -> 1024)", r_l)
        if whole:
            r_b = measure(base, b, args.device, reps, whole_step=True)
            _report("full-size Base (w, random noise)", r_b)
            base_s = r_b["step_s"]
        else:
            base_s = r_l["modules"]["encoder"][0] + r_l["modules"]["generator (frozen)"][0]
            print(f"  Base (w, random noise) step = encoder + generator: {base_s:.4f} s; {b / base_s:.2f} images/s")
        print(f"  ratio LAREN / Base step time: {r_l['step_s'] / base_s:.2f}x")


if __name__ == "__main__":
    main()
