"""One worker's training loop (paper Eq. 5, section IV-A; model-spec section 6). No Ray here (architecture rule 3).
The step itself (G step, then D step) is laren/train/step.py.

Adam (lr 1e-4, β 0.9/0.999, ε 1e-8) for the trainable modules (encoder, latent head, CGM) and, separately, for the
StyleGAN2 discriminator D, which starts from the prior's D and is trained. The learning rate is a pure function of
the step (GLEAN's cosine: floor ``optim.cosine_min_lr``, period ``optim.cosine_period_kimg``, by default twice the run,
so it ends at about half the initial rate), so a resumed run continues the same schedule.

Distribution: the caller gives a :class:`WorkerContext` (rank, world size, device, a ``report`` barrier and the
checkpoint to resume from). Under Ray Train, ``torch.distributed`` is already initialised (every world size, 1
included). The step calls the SR model and D through torch DDP wrappers (:func:`step_modules`): gradients are
averaged by DDP's bucketed all-reduce, overlapped with the backward pass; the frozen generator's parameters need no
gradient and so stay outside DDP's buckets. Every other collective goes through :mod:`laren.train.collectives` with its
tensors on the step's device. Every rank makes the same collective calls in the same order; MLflow and sample grids
happen on rank 0 only (architecture rule 4).

Time is counted in images: ``images_seen = step · batch_size_global``; kimg = images_seen / 1000 (rule 9). Metric
names: ``train/loss_*``, ``train/lr``, ``perf/images_per_s``, ``data/skipped``, ``val/psnr`` … (rule 10). At every
log step rank 0 also logs the model's health figures, ``health/…`` (laren/models/health.py: live CGM units, the
mask's share of rho's variance, g's spread, max T, grad/param ratios), from the step's first two LR images.

Legend: B per-rank batch, l LR size, R HR size; images in [-1, 1].
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from laren import losses as L
from laren.config import RunConfig
from laren.cost import usage_metrics
from laren.data.pipeline import batch_to_device, make_eval_loader
from laren.data.stream import DataStream
from laren.evaluate import evaluate_model, make_lpips
from laren.flops import device_peak_tflops, mfu_metrics, step_flops_per_image
from laren.models import health
from laren.models.build import build_discriminator, build_model
from laren.progress import ProgressPrinter, attempt_outcome, record_attempt
from laren.tracking import flatten, make_tracker, tracking_buffer_url
from laren.train import collectives as C
from laren.train import state as S
from laren.train.faults import OnStep
from laren.train.inputs import check_run_inputs
from laren.train.meter import StepMeter
from laren.train.step import LOSS_KEYS, step_modules, train_step

log = logging.getLogger("laren.train")

# (metrics, checkpoint dir, dir name): a barrier; takes the checkpoint folder over and removes it once it is stored
ReportFn = Callable[[dict[str, float], Optional[str], Optional[str]], None]


@dataclass
class WorkerContext:
    """What the loop needs to know about where it runs. Defaults: one process on the CPU, nothing to report to."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Optional[ReportFn] = None  # a barrier in Ray Train: every rank calls it equally often
    resume_dir: Optional[str] = None  # local checkpoint directory to resume from
    checkpoint_root: Optional[str] = None  # without a report function: rank 0 writes checkpoints here (plain Python)
    run_id: str = ""
    parent_run_id: Optional[str] = None
    run_dir: Optional[str] = None  # the run's storage folder (default <storage.root>/runs/<run id>)
    on_step: Optional[OnStep] = None  # called with (step, rank) after every step (laren/train/faults.py)

    def step_done(self, step: int) -> None:
        if self.on_step is not None:
            self.on_step(step, self.rank)


@dataclass(frozen=True)
class Schedule:
    """Run length and intervals in optimizer steps, derived from the kimg settings and the global batch."""

    total_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    cosine_period: int = 0  # steps; 0 means 2 x total_steps

    @staticmethod
    def from_kimg(batch_size_global: int, total_kimg: float, log_kimg: float, eval_kimg: float, ckpt_kimg: float,
                  cosine_period_kimg: Optional[float] = None) -> "Schedule":
        def steps(kimg: float) -> int:
            return max(1, int(round(kimg * 1000.0 / batch_size_global)))

        total = max(1, math.ceil(total_kimg * 1000.0 / batch_size_global))
        period = steps(cosine_period_kimg) if cosine_period_kimg else 2 * total
        return Schedule(total, steps(log_kimg), steps(eval_kimg), steps(ckpt_kimg), period)


def cosine_lr(step: int, period_steps: int, lr: float, min_lr: Optional[float]) -> float:
    """GLEAN's CosineAnnealingLR: from ``lr`` towards ``min_lr`` over ``period_steps`` (T_max), then held at
    ``min_lr``; constant when ``min_lr`` is None. With the default period of twice the run, the run ends half-way
    down the curve, at (lr + min_lr) / 2 (GLEAN: T_max 600k over 300k iterations, 1e-4 -> 5e-5)."""
    if min_lr is None:
        return lr
    t = min(step, period_steps) / max(1, period_steps)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


# ----------------------------------------------------------------------------------------------- the loop


def train_worker(cfg: RunConfig, ctx: WorkerContext) -> dict[str, Any]:
    """Train ``cfg`` on this worker until ``train.total_kimg``; returns the final metrics (the same on every rank).

    Resumes from ``ctx.resume_dir`` when given: weights, optimizer states, step, data position and this rank's RNG.
    """
    t_cfg, rank, world, dev = cfg.train, ctx.rank, ctx.world_size, ctx.device
    if ctx.run_dir is None:  # else the driver planned the run (laren.plan): inputs and rules were checked there
        check_run_inputs(cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"num_workers": world, "min_workers": None})}))
    sched = Schedule.from_kimg(t_cfg.batch_size_global, t_cfg.total_kimg, t_cfg.log_every_kimg,
                               t_cfg.eval_every_kimg, t_cfg.checkpoint_every_kimg, cfg.optim.cosine_period_kimg)

    # ---- modules (same seed on every rank -> same init; broadcast anyway)
    torch.manual_seed(t_cfg.seed)
    model = build_model(cfg.model, device="cpu").to(dev)
    disc = build_discriminator(cfg.model).to(dev)
    C.broadcast_module(model, dev)
    C.broadcast_module(disc, dev)
    vgg = None
    if cfg.loss.perceptual_weight > 0:
        vgg = (L.random_vgg16(t_cfg.seed) if cfg.loss.random_backbone_for_tests else L.load_vgg16(cfg.loss.vgg16_path)).to(dev)
    o = cfg.optim
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    opt_d = torch.optim.Adam(disc.parameters(), lr=o.lr_d, betas=tuple(o.betas), eps=o.eps)
    optimizers = {"g": opt_g, "d": opt_d}

    st = resume_or_seed(ctx, model, disc, optimizers, t_cfg.seed)
    start_step = st.step

    # ---- tracking (rank 0; a NullTracker elsewhere). Start-or-resume by run name: a restart continues the run.
    tracker = make_tracker(
        rank, cfg.tracking.tracking_uri, cfg.tracking.experiment or cfg.name, ctx.run_id or cfg.run_id,
        parent_run_id=ctx.parent_run_id, tags={"laren.job": cfg.name, "laren.kind": "train"},
        system_metrics=cfg.tracking.system_metrics, system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
        buffer_url=tracking_buffer_url(cfg, ctx.run_id or cfg.run_id, ctx.run_dir),
    )
    attempt, show = start_attempt(tracker, cfg, ctx, st)

    lpips = make_lpips(cfg.eval.alexnet_path, cfg.eval.random_backbone_for_tests, dev)
    autocast = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=t_cfg.bf16 and dev.type == "cuda")
    # perf/mfu: the step's FLOPs per image, counted once on the meta device, against the device's peak (laren/flops.py)
    flops_per_image = step_flops_per_image(cfg.model, cfg.loss)
    peak = device_peak_tflops(dev, autocast["enabled"], cfg.resources.peak_tflops)
    model.train()
    disc.train()
    fwd_g, fwd_d = step_modules(model, disc, dev, t_cfg.compile)
    meter = StepMeter(LOSS_KEYS, dev)  # the step's figures stay on the device until a log step
    t_start, worker_s_before = time.perf_counter(), st.worker_s
    last: dict[str, float] = {}
    last_ckpt_step = start_step if ctx.resume_dir else -1
    with DataStream(cfg, rank, world, st) as batches, attempt_outcome(tracker, attempt, st):
        while st.step < sched.total_steps:
            # -- data
            batch, wait_s = batches.take()
            lr_img, hr_img = batch_to_device(batch, dev, cfg.model.lr_size)  # the LR made here with data.lr_on_device
            cur_lr = cosine_lr(st.step, sched.cosine_period, o.lr, o.cosine_min_lr)
            cur_lr_d = cosine_lr(st.step, sched.cosine_period, o.lr_d, o.cosine_min_lr)
            for g in opt_g.param_groups:
                g["lr"] = cur_lr
            for g in opt_d.param_groups:
                g["lr"] = cur_lr_d

            # -- G step, then D step
            out = train_step(fwd_g, fwd_d, vgg, opt_g, opt_d, lr_img, hr_img, cfg.loss, autocast)
            st.advance(t_cfg.batch_size_global)
            meter.add(out, lr_img.shape[0], wait_s)
            ctx.step_done(st.step)

            # -- log (every rank: the figures are summed over the ranks), eval, checkpoint
            done = st.step >= sched.total_steps
            metrics: dict[str, float] = {}
            if st.step % sched.log_every == 0 or done:
                figures, (skipped, worker_s) = meter.read([batches.skipped(), time.perf_counter() - t_start])
                st.worker_s = worker_s_before + worker_s  # summed over ranks: the same on every rank
                metrics.update(figures)
                metrics.update(usage_metrics(st.worker_s, cfg.resources.use_gpu, cfg.resources.hourly_price_usd))
                metrics.update({"train/lr": cur_lr, "train/lr_d": cur_lr_d, "train/kimg": st.kimg, "data/skipped": skipped})
                metrics.update(mfu_metrics(metrics["perf/images_per_s"] / world, flops_per_image, peak))
                if rank == 0:  # cheap: one no-grad encoder + head + CGM pass on two images, and the step's gradients;
                    # logged here, not returned: the run's final metrics are the same on every rank
                    tracker.log_metrics({f"health/{k}": v for k, v in health.step_figures(model, lr_img).items()},
                                        step=st.step)
            if st.step % sched.eval_every == 0 or done:
                metrics.update(_evaluate(cfg, model, lpips, rank, world, dev, tracker, st.step))
            publish(tracker, show, st, metrics, last)
            if st.step % sched.checkpoint_every == 0 or done:
                report_checkpoint(cfg, ctx, model, disc, optimizers, st, last, batches)
                last_ckpt_step = st.step
            elif "val/psnr" in metrics and ctx.report is not None:
                ctx.report({**last, "step": st.step, "kimg": st.kimg}, None, None)
        if last_ckpt_step != st.step:  # resumed at the end: still hand back a final checkpoint
            report_checkpoint(cfg, ctx, model, disc, optimizers, st, last, batches)
        if rank == 0:
            with tempfile.TemporaryDirectory(prefix="laren-final-") as d:
                final = S.save_checkpoint(Path(d) / "final", model, disc, optimizers, st, cfg.to_dict())
                tracker.log_artifact(str(final), "final_checkpoint")
                # Queued during an MLflow outage, the upload would find the temporary directory gone: one last
                # attempt now, while it exists (the checkpoint also stays in the run's storage).
                tracker.flush(force=True)
            if cfg.tracking.register_model:
                _register(cfg, ctx.run_id or cfg.run_id, tracker, model, {**last, "step": st.step})
        return {**last, "step": st.step, "kimg": st.kimg, "mlflow_run_id": st.mlflow_run_id}


def _register(cfg: RunConfig, run_id: str, tracker, model, metrics: dict[str, float]) -> None:
    """Rank 0, end of the run: the inference model into MLflow's registry (laren/registry.py). Like every tracking
    call, a failure is a warning: the run and its checkpoints are complete."""
    if not tracker.flush() or getattr(tracker, "run_id", None) is None:
        log.warning("MLflow unreachable: the model of %s is not registered (its checkpoints are in storage)", run_id)
        return
    try:
        from laren.registry import log_and_register  # mlflow.pyfunc: imported only by the run's last step

        mv = log_and_register(tracker.tracking_uri, tracker.run_id, model, cfg, metrics, laren_run_id=run_id)
        log.info("registered the model as %s version %s", mv.name, mv.version)
    except Exception as err:  # noqa: BLE001 - see the docstring
        log.warning("could not register the model of %s in MLflow: %s: %s", run_id, type(err).__name__, err)


def resume_or_seed(ctx: WorkerContext, model, disc, optimizers: dict, seed: int) -> S.TrainState:
    """The state to start from: ``ctx.resume_dir``'s (weights, optimizers, step, data position, this rank's RNG) or a
    fresh one with per-rank seeds."""
    if not ctx.resume_dir:
        _seed_all(seed + 7919 * ctx.rank)
        return S.TrainState()
    st = S.load_checkpoint(ctx.resume_dir, model, disc, optimizers)
    if len(st.rng) == ctx.world_size:
        S.restore_rng(st.rng[ctx.rank])
    else:  # a resized worker group: fresh, but reproducible, per-rank streams
        _seed_all(seed + 7919 * ctx.rank + st.step)
    return st


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _evaluate(cfg: RunConfig, model, lpips, rank: int, world: int, dev, tracker, step: int) -> dict[str, float]:
    """Periodic validation over ``data.num_val_images`` (split over ranks, summed); rank 0 logs the sample grid."""
    url = cfg.data.val_url or cfg.data.train_url
    # ``limit`` is global: the eval loader gives each rank its contiguous share of the first num_val_images samples.
    loader = make_eval_loader(url, cfg.model.prior.resolution, cfg.model.lr_size,
                              max(1, cfg.train.batch_size_global // world), rank=rank, world_size=world,
                              limit=cfg.data.num_val_images)
    # fp32, as `laren eval`: validation and test figures of one checkpoint agree (model-spec 9, R5)
    res = evaluate_model(model, loader, dev, lpips=lpips, grid_images=cfg.train.sample_grid_images if rank == 0 else 0)
    names = ["psnr", "ssim", "loss_pix", "psnr_bicubic"] + (["lpips_alex"] if lpips is not None else [])
    sums = res.sums()
    tot = C.sum_across([sums.get(k, 0.0) for k in names] + [float(res.count)], dev)
    n = tot[-1]
    if rank == 0 and res.grid is not None:
        tracker.log_image(res.grid, "val/samples", step)
    return {f"val/{k}": (tot[i] / n if n else math.nan) for i, k in enumerate(names)} | {"val/images": n}


def start_attempt(tracker, cfg: RunConfig, ctx: WorkerContext, st: S.TrainState) -> tuple[int, ProgressPrinter]:
    """An attempt's start in MLflow: the params and resolved config of a fresh run (rank 0), the MLflow run id into
    the state, the attempt counted; returns (attempt number, the progress printer)."""
    run_id = ctx.run_id or cfg.run_id
    if ctx.rank == 0 and st.step == 0:
        tracker.log_params({**flatten(cfg.to_dict()), "run_id": run_id, "world_size": ctx.world_size})
        tracker.log_config(cfg.to_dict())
    st.mlflow_run_id = getattr(tracker, "run_id", None) or st.mlflow_run_id
    return record_attempt(tracker, st.step), ProgressPrinter(run_id, cfg.train.total_kimg, ctx.rank)


def publish(tracker, show: ProgressPrinter, st: S.TrainState, metrics: dict[str, float], last: dict[str, float]) -> None:
    """A step's metrics, if any: to MLflow (rank 0's tracker), into ``last``, and the progress line."""
    if metrics:
        tracker.log_metrics(metrics, step=st.step)
        last.update(metrics)
        show(st.kimg, metrics, last)


def report_checkpoint(cfg, ctx: WorkerContext, model, disc, optimizers, st: S.TrainState, last: dict[str, float],
                      data: DataStream) -> None:
    """Every rank contributes its RNG state and data position; rank 0 writes the checkpoint; every rank calls
    ``report`` (a barrier) with the latest metrics ``last``, the step and kimg."""
    metrics = {**last, "step": st.step, "kimg": st.kimg}
    st.rng = C.gather_objects(S.capture_rng(), ctx.device)
    st.data_ranks = C.gather_objects(data.position(), ctx.device)
    best = cfg.train.keep_best_metric
    if best and best not in metrics:  # before the first evaluation: NaN, which Ray's scoring ranks below every number
        metrics = {**metrics, best: math.nan}
    name = f"checkpoint_{st.step:09d}"
    if ctx.report is None:  # plain Python: rank 0 writes to checkpoint_root; without one, nothing is kept
        if ctx.rank == 0 and ctx.checkpoint_root:
            S.write_checkpoint_dir(Path(ctx.checkpoint_root) / name, model, disc, optimizers, st, cfg.to_dict())
        return
    d = None
    if ctx.rank == 0:
        d = tempfile.mkdtemp(prefix="laren-ckpt-")
        S.save_checkpoint(d, model, disc, optimizers, st, cfg.to_dict())
    try:
        ctx.report(metrics, d, name if d else None)  # takes the folder over (removes it once it is in storage)
    except BaseException:
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)
        raise
