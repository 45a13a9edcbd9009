"""The training step in 2 gloo processes (1 CPU thread each), three ways, measured one after the other in one run:

    before   the step as it was: VGG16 on SR and HR in one graph, D on each fake twice (G step, then D step), gradients
             averaged by hand after each backward (one flat all-reduce per optimizer)
    manual   today's step maths (HR VGG branch under no_grad, D on each fake once) with the hand-written all-reduce
    ddp      today's step under torch DDP (bucketed all-reduce, overlapped with the backward pass): what training runs

    .venv/bin/python benchmarks/ddp_step.py [--steps 6] [--batch 4]

Model: benchmarks/model_step.py's TINY LAREN (64 px prior, 16x), random VGG16, adversarial term on. Figure: median
seconds per step on rank 0 after 2 warm-up steps (ranks start each step together; the three take turns step by
step, so that a change of load on the machine hits all three alike). ``measure()`` returns them for
benchmarks/run_all.py. On 2 CPU cores the all-reduce is cheap and there is little to overlap: the ddp/manual ratio
here is a check that DDP costs nothing; the overlap pays with NCCL on GPUs, where 290 MB of fp32 gradients per 64x
face step would otherwise be sent after the backward pass.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.model_step import TINY  # noqa: E402
from laren import losses as L  # noqa: E402
from laren.config import LossConfig, ModelConfig  # noqa: E402
from laren.models.build import build_discriminator, build_model  # noqa: E402
from laren.train import collectives as C  # noqa: E402
from laren.train.step import step_modules, train_step  # noqa: E402

MODES = ("before", "manual", "ddp")


def _before_step(model, disc, vgg, opt_g, opt_d, lr_img, hr_img, loss_cfg: LossConfig) -> None:
    """The step before this change, reproduced for the comparison only."""
    cpu = lr_img.device
    disc.requires_grad_(False)
    sr = model(lr_img)
    l_pix = L.pixel_loss(sr, hr_img)
    mean, std = vgg.mean, vgg.std
    f = vgg((torch.cat([sr, hr_img]) - mean) / std)  # SR and HR in one graph
    f_sr, f_hr = f.chunk(2)
    l_per = F.mse_loss(f_sr, f_hr)
    l_adv = L.g_adversarial_loss(disc(sr), loss_cfg.adversarial)
    loss_g = loss_cfg.pixel_weight * l_pix + loss_cfg.perceptual_weight * l_per + loss_cfg.adversarial_weight * l_adv
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    C.allreduce_mean_grads([p for g in opt_g.param_groups for p in g["params"]], cpu)
    opt_g.step()
    disc.requires_grad_(True)
    l_d = L.d_loss(disc(hr_img), disc(sr.detach()))  # the fake through D a second time
    opt_d.zero_grad(set_to_none=True)
    l_d.backward()
    C.allreduce_mean_grads(list(disc.parameters()), cpu)
    opt_d.step()


def _worker(rank: int, world: int, port: int, steps: int, batch: int, out: str) -> None:
    torch.set_num_threads(1)  # as Ray's 1 CPU per worker
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cpu = torch.device("cpu")
    mcfg, loss = ModelConfig(**TINY), LossConfig(adversarial_weight=0.01)
    g = torch.Generator().manual_seed(rank)
    lr = torch.rand(batch, 3, mcfg.lr_size, mcfg.lr_size, generator=g) * 2 - 1
    hr = torch.rand(batch, 3, mcfg.prior.resolution, mcfg.prior.resolution, generator=g) * 2 - 1
    steps_of = {}
    for mode in MODES:
        torch.manual_seed(0)
        model, disc = build_model(mcfg, device="cpu").train(), build_discriminator(mcfg).train()
        vgg = L.random_vgg16(0)
        opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4)
        fwd_g, fwd_d = step_modules(model, disc, cpu) if mode == "ddp" else (model, disc)
        sync = (lambda ps: C.allreduce_mean_grads(ps, cpu)) if mode == "manual" else None
        if mode == "before":
            steps_of[mode] = lambda m=model, d=disc, v=vgg, og=opt_g, od=opt_d: _before_step(m, d, v, og, od, lr, hr, loss)
        else:
            steps_of[mode] = lambda fg=fwd_g, fd=fwd_d, v=vgg, og=opt_g, od=opt_d, s=sync: train_step(
                fg, fd, v, og, od, lr, hr, loss, dict(device_type="cpu", enabled=False), s)
    per: dict[str, list[float]] = {m: [] for m in MODES}
    for i in range(steps + 2):  # the modes take turns, step by step: a change of load on the machine hits all three
        for mode in MODES:
            dist.barrier()
            t0 = time.perf_counter()
            steps_of[mode]()
            if i >= 2:
                per[mode].append(time.perf_counter() - t0)
    times = {m: statistics.median(v) for m, v in per.items()}
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def measure(steps: int = 6, batch: int = 4) -> dict[str, float]:
    """Median seconds per step of each mode on rank 0 of 2 gloo processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "times.pt")
        mp.spawn(_worker, args=(2, port, steps, batch, out), nprocs=2, join=True)
        return torch.load(out, weights_only=True)


def table(t: dict[str, float], batch: int) -> str:
    rows = ["| step | s/step (rank 0) | images/s (2 ranks) | vs ddp |", "|---|---:|---:|---:|"]
    rows += [f"| {m} | {t[m]:.3f} | {2 * batch / t[m]:.1f} | {t[m] / t['ddp']:.2f}x |" for m in MODES]
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    a = ap.parse_args()
    print(table(measure(a.steps, a.batch), a.batch))
