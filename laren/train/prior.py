"""One worker's StyleGAN2 prior training (job kind ``prior``, `laren prior train`). No Ray here: the Ray Train wiring,
data stream, checkpoints, resume and MLflow are those of SR training (:mod:`laren.train.distributed`, ``loop``,
``state``, :mod:`laren.tracking`).

Per step, on a batch x of real images (B per rank), with z ~ N(0, I) mapped to W and style-mixed (probability
``gan.style_mixing``: two z, one random crossover layer), A = DiffAugment (``gan.diffaugment``; identity when empty):

    D step   L_D = softplus(D(A(G(z)))) + softplus(-D(A(x)))                       non-saturating logistic loss
             every r1_every steps: + r1_every * gamma/2 * |grad_x D(A(x))|^2         lazy R1
    G step   L_G = softplus(-D(A(G(z))))
             every pl_every steps (pl_weight > 0): + pl_every * pl_weight * (|J_w^T y| - a)^2, a its running mean
    EMA      G_ema <- G + beta (G_ema - G), beta = 0.5^(B_global / (1000 ema_kimg)) (half-life capped by ema_rampup)

Adam with StyleGAN2's lazy-regularisation correction: lr * c and betas^c with c = k / (k + 1) for interval k.
Gradients are averaged over ranks with one all-reduce per backward (``collectives.allreduce_mean_grads``).

Evaluation (rank 0, every ``train.eval_every_kimg``): a grid of G_ema samples from fixed z and fixed noise
(``prior/samples``) and, on a synthetic set, the factor-FD (:mod:`laren.factor_fd`) between ``gan.metric_images``
held-out real images and as many G_ema samples from fixed z (``eval/factor_fd``). The factor regressor is trained once
at the start of a run and travels in the checkpoints, so a resumed run measures with the same network.

The prior is written in laren's prior format (G_ema as ``g``, D as ``d``, latent_avg = mean of 4096 mapped z) to
``gan.output`` at the end of the run, and logged to MLflow (``prior/``).

Legend: B per-rank batch, N W+ rows, S style_dim, R resolution; images in [-1, 1].
"""

from __future__ import annotations

import copy
import logging
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from laren import factor_fd as FD
from laren import losses as L
from laren.augment import diff_augment
from laren.config import ConfigError, PriorRunConfig
from laren.data import pack
from laren.data.pipeline import batch_to_device
from laren.data.stream import DataStream
from laren.data.synth import read_factor_samples
from laren.models.prior_io import detect_generator, write_prior
from laren.models.stylegan2 import Discriminator, Generator
from laren.progress import attempt_outcome
from laren.tracking import make_tracker
from laren.train import collectives as C
from laren.train.inputs import check_data
from laren.train.loop import Schedule, WorkerContext, publish, report_checkpoint, resume_or_seed, start_attempt
from laren.train.meter import StepMeter
from laren.train.step import optimizer_params

log = logging.getLogger("laren.train")

METRIC_SEED = 123  # fixed z of the factor-FD samples and of the sample grid (the same at every evaluation)


class GanNets(nn.Module):
    """What a prior checkpoint's ``model.`` holds: G, G_ema, the path-length mean and (optional) the factor regressor."""

    def __init__(self, g: Generator, regressor: Optional[FD.FactorRegressor]):
        super().__init__()
        self.g = g
        self.g_ema = copy.deepcopy(g).eval().requires_grad_(False)
        self.regressor = regressor.eval().requires_grad_(False) if regressor is not None else None
        self.register_buffer("pl_mean", torch.zeros(()))


def build_generator(cfg: PriorRunConfig) -> Generator:
    p = cfg.model.prior
    return Generator(p.resolution, p.style_dim, p.mapping_layers, p.channel_multiplier, p.channel_max)


def build_discriminator(cfg: PriorRunConfig) -> Discriminator:
    p = cfg.model.prior
    return Discriminator(p.resolution, p.channel_multiplier, p.channel_max)


def check_prior_inputs(cfg: PriorRunConfig) -> None:
    """User errors found before any worker starts: data sets, factors for the metric, batch split."""
    if not cfg.data.train_url:
        raise ConfigError("data.train_url is empty: set it to a data set written by `laren data pack` or `laren data synth`")
    check_data(cfg)
    if cfg.gan.metric_images > 0:
        for url in (cfg.data.train_url, cfg.data.val_url or cfg.data.train_url):
            if not pack.read_manifest(url).get("factors"):
                raise ConfigError(f"gan.metric_images: {url} has no factors (factor-FD needs a set written by "
                                  "`laren data synth`); set gan.metric_images: 0 for other data")
    n = cfg.resources.num_workers
    if cfg.train.batch_size_global % n:
        raise ConfigError(f"train.batch_size_global ({cfg.train.batch_size_global}) must be a multiple of resources.num_workers ({n})")
    b = cfg.train.batch_size_global // n
    if b > 4 and b % 4:
        raise ConfigError(f"per-worker batch {b} must be <= 4 or a multiple of 4 (StyleGAN2 D minibatch stddev)")


def _adam(params, gan, every: Optional[int]) -> torch.optim.Adam:
    c = every / (every + 1) if every else 1.0
    return torch.optim.Adam(params, lr=gan.lr * c, betas=(gan.betas[0] ** c, gan.betas[1] ** c), eps=1e-8)


def _latents(g: Generator, b: int, mixing: float, device) -> torch.Tensor:
    """W+ (b, N, S) from fresh z, style-mixed with probability ``mixing`` (one crossover layer per batch)."""
    z = torch.randn(2, b, g.style_dim, device=device)
    w = g.mapping(z.view(2 * b, -1)).view(2, b, 1, -1)
    cut = random.randint(1, g.num_latents - 1) if random.random() < mixing else g.num_latents
    rows = torch.arange(g.num_latents, device=device).view(1, -1, 1)
    return torch.where(rows < cut, w[0], w[1])


@torch.no_grad()
def _ema(nets: GanNets, beta: float) -> None:
    for pe, p in zip(nets.g_ema.parameters(), nets.g.parameters()):
        pe.lerp_(p, 1.0 - beta)
    for be, b in zip(nets.g_ema.buffers(), nets.g.buffers()):
        be.copy_(b)


def gan_step(nets: GanNets, d: Discriminator, opt_g, opt_d, real: torch.Tensor, cfg: PriorRunConfig, step: int,
             world: int) -> dict[str, torch.Tensor]:
    """One D step (+ lazy R1) and one G step (+ lazy path length) on ``real``; returns detached scalar tensors."""
    gan, g, dev = cfg.gan, nets.g, real.device
    aug = (lambda x: diff_augment(x, gan.diffaugment)) if gan.diffaugment else (lambda x: x)  # noqa: E731
    b = real.shape[0]
    zero = torch.zeros((), device=dev)
    # -- D
    d.requires_grad_(True)
    with torch.no_grad():
        fake = g(_latents(g, b, gan.style_mixing, dev))
    logit_real, logit_fake = d(aug(real)), d(aug(fake))
    loss_d = L.d_loss(logit_real, logit_fake)
    _descend(opt_d, loss_d, world)
    r1 = zero
    if gan.r1_gamma > 0 and step % gan.r1_every == 0:
        x = real.detach().requires_grad_(True)
        r1 = L.r1_penalty(d(aug(x)), x)
        _descend(opt_d, r1 * (gan.r1_gamma / 2 * gan.r1_every), world)
    # -- G (D frozen)
    d.requires_grad_(False)
    loss_g = F.softplus(-d(aug(g(_latents(g, b, gan.style_mixing, dev))))).mean()
    _descend(opt_g, loss_g, world)
    pl = zero
    if gan.pl_weight > 0 and step % gan.pl_every == 0:
        w = _latents(g, max(1, b // 2), 0.0, dev).detach().requires_grad_(True)
        lengths = L.path_lengths(g(w), w)
        mean_len = C.mean_across(lengths.detach().mean(), dev)
        nets.pl_mean.copy_(nets.pl_mean.lerp(mean_len, gan.pl_decay))
        pl = (lengths - nets.pl_mean).pow(2).mean()
        _descend(opt_g, pl * gan.pl_weight * gan.pl_every, world)
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), "r1": r1.detach(), "pl": pl.detach(),
            "d_real": logit_real.detach().mean(), "d_fake": logit_fake.detach().mean()}


def _descend(opt: torch.optim.Optimizer, loss: torch.Tensor, world: int) -> None:
    """One optimizer step on ``loss`` with gradients averaged over ranks."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    C.allreduce_mean_grads(optimizer_params(opt), loss.device)
    opt.step()


# ----------------------------------------------------------------------------------------------- evaluation


class PriorEval:
    """Rank 0's evaluation: fixed z for the grid and the metric, the real feature statistics, the factor regressor."""

    def __init__(self, cfg: PriorRunConfig, nets: GanNets, dev):
        self.cfg, self.nets, self.dev = cfg, nets, dev
        gen = torch.Generator().manual_seed(METRIC_SEED)
        s = cfg.model.prior.style_dim
        self.z_grid = torch.randn(cfg.gan.grid_images, s, generator=gen)
        self.z_metric = torch.randn(cfg.gan.metric_images, s, generator=gen)
        self.real_stats = None
        if nets.regressor is not None:
            imgs, _, _ = read_factor_samples(cfg.data.val_url or cfg.data.train_url, limit=cfg.gan.metric_images)
            self.real_stats = FD.feature_stats(nets.regressor, FD.to_unit(imgs))

    @torch.no_grad()
    def _generate(self, z: torch.Tensor, batch: int = 128) -> torch.Tensor:
        g = self.nets.g_ema
        fixed = [getattr(g.noises, f"noise_{i}") for i in range(g.num_noises)]  # the stored noise: fixed too
        outs = [g.generate(z[i: i + batch].to(self.dev), noise=fixed)[0].float().cpu() for i in range(0, len(z), batch)]
        return torch.cat(outs).clamp(-1, 1)

    def __call__(self, tracker, step: int) -> dict[str, float]:
        out: dict[str, float] = {}
        grid = self._generate(self.z_grid)
        tracker.log_image(image_grid(grid), "prior/samples", step)
        if self.real_stats is not None:
            fake = self._generate(self.z_metric)
            mu, sig = FD.feature_stats(self.nets.regressor, fake)
            out["eval/factor_fd"] = FD.frechet_distance(*self.real_stats, mu, sig)
        return out


def image_grid(x: torch.Tensor) -> np.ndarray:
    """(n, 3, R, R) in [-1, 1] -> uint8 (rows R, cols R, 3) grid, ceil(sqrt n) columns, 1 px gaps."""
    n, _, r, _ = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.full((rows * (r + 1) - 1, cols * (r + 1) - 1, 3), 255, np.uint8)
    imgs = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, im in enumerate(imgs):
        y0, x0 = (i // cols) * (r + 1), (i % cols) * (r + 1)
        out[y0: y0 + r, x0: x0 + r] = im
    return out


def fit_regressor(cfg: PriorRunConfig, tracker) -> FD.FactorRegressor:
    """The factor regressor of the run, trained on up to 4096 training images; logs its held-out accuracy."""
    t0 = time.perf_counter()
    imgs, factors, specs = read_factor_samples(cfg.data.train_url, limit=4096)
    net = FD.train_regressor(FD.to_unit(imgs), torch.from_numpy(factors), specs, cfg.gan.regressor_steps, seed=cfg.train.seed)
    vimgs, vfactors, _ = read_factor_samples(cfg.data.val_url or cfg.data.train_url, limit=max(256, cfg.gan.metric_images))
    acc = FD.factor_accuracy(net, FD.to_unit(vimgs), torch.from_numpy(vfactors))
    a, b = FD.to_unit(vimgs), len(vimgs) // 2
    floor = FD.frechet_distance(*FD.feature_stats(net, a[:b]), *FD.feature_stats(net, a[b:]))
    tracker.log_metrics({**{f"regressor/{k}": v for k, v in acc.items()}, "eval/factor_fd_real_halves": floor,
                         "regressor/seconds": time.perf_counter() - t0}, step=0)
    log.info("factor regressor: held-out R2 %.3f, accuracy %.3f, FD(real half, real half) %.3f",
             acc["r2_mean"], acc["acc_mean"], floor)
    return net


def _regressor_shell(cfg: PriorRunConfig) -> FD.FactorRegressor:
    """An untrained regressor of the run's shape (its weights then come from the checkpoint)."""
    return FD.FactorRegressor(cfg.model.prior.resolution, pack.read_manifest(cfg.data.train_url)["factors"])


# ----------------------------------------------------------------------------------------------- the loop


def prior_worker(cfg: PriorRunConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train the prior of ``cfg`` on this worker until ``train.total_kimg``; rank 0 writes it to ``gan.output``."""
    t_cfg, gan, rank, world, dev = cfg.train, cfg.gan, ctx.rank, ctx.world_size, ctx.device
    check_prior_inputs(cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"num_workers": world, "min_workers": None})}))
    sched = Schedule.from_kimg(t_cfg.batch_size_global, t_cfg.total_kimg, t_cfg.log_every_kimg,
                               t_cfg.eval_every_kimg, t_cfg.checkpoint_every_kimg)
    tracker = make_tracker(
        rank, cfg.tracking.tracking_uri, cfg.tracking.experiment or cfg.name, ctx.run_id or cfg.run_id,
        parent_run_id=ctx.parent_run_id, tags={"laren.job": cfg.name, "laren.kind": "prior"},
        system_metrics=cfg.tracking.system_metrics, system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
    )

    torch.manual_seed(t_cfg.seed)
    g, d = build_generator(cfg), build_discriminator(cfg)
    metric = gan.metric_images > 0
    regressor = None
    if metric:
        regressor = _regressor_shell(cfg) if ctx.resume_dir or rank != 0 else fit_regressor(cfg, tracker)
    nets = GanNets(g, regressor).to(dev)
    d = d.to(dev)
    C.broadcast_module(nets, dev)
    C.broadcast_module(d, dev)
    opt_g = _adam(g.parameters(), gan, gan.pl_every if gan.pl_weight > 0 else None)
    opt_d = _adam(d.parameters(), gan, gan.r1_every if gan.r1_gamma > 0 else None)
    optimizers = {"g": opt_g, "d": opt_d}

    st = resume_or_seed(ctx, nets, d, optimizers, t_cfg.seed)
    start_step = st.step
    attempt, show = start_attempt(tracker, cfg, ctx, st)
    evaluate = PriorEval(cfg, nets, dev) if rank == 0 else None

    meter = StepMeter(("loss_d", "loss_g", "r1", "pl", "d_real", "d_fake"), dev)
    last: dict[str, float] = {}
    last_ckpt_step = start_step if ctx.resume_dir else -1
    with DataStream(cfg, rank, world, st) as batches, attempt_outcome(tracker, attempt, st):
        if start_step == 0 and rank == 0:  # the untrained generator: the start of the factor-FD curve
            last.update(evaluate(tracker, 0))
            tracker.log_metrics(last, step=0)
        while st.step < sched.total_steps:
            batch, wait_s = batches.take()
            _, real = batch_to_device(batch, dev, cfg.model.lr_size)
            out = gan_step(nets, d, opt_g, opt_d, real, cfg, st.step, world)
            st.advance(t_cfg.batch_size_global)
            ema_nimg = gan.ema_kimg * 1000.0
            if gan.ema_rampup is not None:
                ema_nimg = min(ema_nimg, st.images_seen * gan.ema_rampup)
            _ema(nets, 0.5 ** (t_cfg.batch_size_global / max(ema_nimg, 1e-8)))
            meter.add(out, real.shape[0], wait_s)
            ctx.step_done(st.step)

            done = st.step >= sched.total_steps
            metrics: dict[str, float] = {}
            if st.step % sched.log_every == 0 or done:
                figures, (skipped,) = meter.read([batches.skipped()])
                metrics.update({**figures, "train/kimg": st.kimg, "data/skipped": skipped})
            if (st.step % sched.eval_every == 0 or done) and rank == 0:
                metrics.update(evaluate(tracker, st.step))
            publish(tracker, show, st, metrics, last)
            if st.step % sched.checkpoint_every == 0 or done:
                report_checkpoint(cfg, ctx, nets, d, optimizers, st, last, batches)
                last_ckpt_step = st.step
        if last_ckpt_step != st.step:
            report_checkpoint(cfg, ctx, nets, d, optimizers, st, last, batches)
        if rank == 0:
            meta = export_prior(nets, d, cfg)
            tracker.log_params({"prior.sha256": meta.sha256})
            with tempfile.TemporaryDirectory(prefix="laren-prior-") as tmp:
                local = Path(tmp) / Path(cfg.output_url()).name
                export_prior(nets, d, cfg, str(local))
                for suffix in (".safetensors", ".json"):
                    tracker.log_artifact(str(local) + suffix, "prior")
                tracker.flush(force=True)
        return {**last, "step": st.step, "kimg": st.kimg, "mlflow_run_id": st.mlflow_run_id, "prior": cfg.output_url()}


def export_prior(nets: GanNets, d: Discriminator, cfg: PriorRunConfig, dest: Optional[str] = None):
    """Write G_ema (latent_avg: mean of 4096 mapped z, seed 0) and D in laren's prior format at ``dest``
    (default ``gan.output``); returns the PriorMeta."""
    g = copy.deepcopy(nets.g_ema).cpu().eval()
    with torch.no_grad():
        z = torch.randn(4096, g.style_dim, generator=torch.Generator().manual_seed(0))
        g.latent_avg.copy_(g.mapping(z).mean(0))
    arch = detect_generator({k: v for k, v in g.state_dict().items()}, "laren prior train")
    return write_prior(g, copy.deepcopy(d).cpu(), arch, dest or cfg.output_url(), source=f"laren prior train: {cfg.run_id}",
                       source_format="laren", latent_avg_source="computed")

