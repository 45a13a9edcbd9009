"""Evaluation: PSNR / SSIM / LPIPS over a test shard set, sample grids, and the standalone `laren eval` job.

Metrics follow model-spec section 7: PSNR on uint8-rounded RGB with no border crop and no Y channel; SSIM (Gaussian
11x11, sigma 1.5) on the same images; LPIPS with an AlexNet trunk and the v0.1 linear layers, when
``eval.alexnet_path`` is given (or ``eval.random_backbone_for_tests``). Every per-image value is kept, so
``laren eval`` can write one CSV row per image; periodic evaluation during training sums over ranks instead.

Legend: B batch, l LR size, R HR size; images are float tensors in [-1, 1].
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from laren import metrics as M
from laren.config import RunConfig
from laren.cost import usage_metrics
from laren.data.pack import read_manifest
from laren.data.pipeline import make_eval_loader
from laren.imresize import imresize, imresize_uint8
from laren.models.build import build_model
from laren.tracking import make_tracker
from laren.train import state as S

# Metric names: split / what they average (architecture rule 10).
PER_IMAGE = ("psnr", "ssim", "lpips_alex", "loss_pix", "psnr_bicubic")


def make_lpips(alexnet_path: Optional[str], random_backbone_for_tests: bool, device="cpu") -> Optional[torch.nn.Module]:
    """LPIPS (AlexNet, v0.1) or None when no AlexNet weights are configured (LPIPS is then skipped)."""
    if random_backbone_for_tests:
        return M.LPIPS(random_backbone_for_tests=True).to(device)
    if alexnet_path is None:
        return None
    return M.LPIPS(alexnet_path).to(device)


def upscale_bicubic(lr_b3ll: torch.Tensor, out_size: int) -> torch.Tensor:
    """MATLAB-compatible bicubic upsampling of the LR image to the HR size (the baseline and the grid's left column)."""
    scale = out_size / lr_b3ll.shape[-1]
    return imresize(lr_b3ll.float(), scale).clamp(-1.0, 1.0)


def lr_images(hr_uint8_nhwc: np.ndarray, lr_size: int) -> torch.Tensor:
    """HR uint8 (N, R, R, 3) -> LR (N, 3, l, l) in [-1, 1], made as the data pipeline makes it (MATLAB bicubic, uint8)."""
    hr = torch.from_numpy(hr_uint8_nhwc).permute(0, 3, 1, 2).contiguous()
    return imresize_uint8(hr, lr_size / hr.shape[-1]).float() / 127.5 - 1.0


@torch.no_grad()
def super_resolve(model: torch.nn.Module, lr_b3ll: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The model's SR images of ``lr`` in eval mode, fp32, clamped to [-1, 1] (what every metric reads)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(lr_b3ll[i: i + batch_size]).float().clamp(-1.0, 1.0)
                          for i in range(0, lr_b3ll.shape[0], batch_size)])
    finally:
        model.train(was_training)


def to_uint8_hwc(x_3hw: torch.Tensor) -> np.ndarray:
    """[-1, 1] (3, H, W) -> uint8 (H, W, 3), rounded as the metrics do."""
    return M.to_uint8_range(x_3hw[None])[0].to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def sample_grid(lr_b3ll: torch.Tensor, sr_b3RR: torch.Tensor, hr_b3RR: torch.Tensor, n: int) -> np.ndarray:
    """One row per image: LR (pixels enlarged) | LR bicubic-upscaled | SR | HR, as uint8 (n·R, 4·R, 3)."""
    n = min(n, sr_b3RR.shape[0])
    lr = lr_b3ll[:n].float().cpu()
    px = F.interpolate(lr, size=sr_b3RR.shape[-2:], mode="nearest")
    up = upscale_bicubic(lr, sr_b3RR.shape[-1])
    rows = [torch.cat([px[i], up[i], sr_b3RR[i].float().cpu(), hr_b3RR[i].float().cpu()], dim=-1) for i in range(n)]
    return to_uint8_hwc(torch.cat(rows, dim=-2))


@dataclass
class EvalResult:
    """Per-image metric values (lists aligned with ``keys``) and the first sample grid."""

    keys: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    grid: Optional[np.ndarray] = None

    def sums(self) -> dict[str, float]:
        return {k: float(np.sum(v)) for k, v in self.values.items()}

    @property
    def count(self) -> int:
        return len(self.keys)

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.values.items()} if self.keys else {}


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device | str = "cpu",
    lpips: Optional[torch.nn.Module] = None,
    max_images: Optional[int] = None,
    grid_images: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Run ``model`` over ``batches`` ({"lr", "hr", "key"}) in eval mode and fp32; per-image PSNR, SSIM, LPIPS, pixel
    MSE, and the PSNR of plain bicubic upsampling (the baseline every SR model must beat). Every metric reads the
    output clamped to [-1, 1] (PSNR and SSIM also round it to uint8). ``progress``: a bar on stderr when it is a
    terminal (`laren eval`)."""
    was_training = model.training
    model.eval()
    res = EvalResult(values={k: [] for k in PER_IMAGE if k != "lpips_alex" or lpips is not None})
    dev = torch.device(device)
    bar = tqdm(total=max_images, desc="eval", unit="img", disable=None if progress else True)
    try:
        for batch in batches:
            lr, hr = batch["lr"].to(dev), batch["hr"].to(dev)
            keys = list(batch.get("key", [str(len(res.keys) + i) for i in range(lr.shape[0])]))
            if max_images is not None:
                room = max_images - res.count
                if room <= 0:
                    break
                lr, hr, keys = lr[:room], hr[:room], keys[:room]
            sr = model(lr).float()
            res.values["psnr"] += M.psnr(sr, hr).tolist()
            res.values["ssim"] += M.ssim(sr, hr).tolist()
            res.values["loss_pix"] += (sr - hr).pow(2).flatten(1).mean(1).double().tolist()
            res.values["psnr_bicubic"] += M.psnr(upscale_bicubic(lr, hr.shape[-1]), hr.float()).tolist()
            if lpips is not None:
                res.values["lpips_alex"] += lpips(sr.clamp(-1.0, 1.0), hr.float()).tolist()
            if res.grid is None and grid_images > 0:
                res.grid = sample_grid(lr, sr, hr, grid_images)
            res.keys += [str(k) for k in keys]
            bar.update(len(keys))
    finally:
        bar.close()
        model.train(was_training)
    return res


# ----------------------------------------------------------------------------------------------- standalone job


def load_model_from_checkpoint(checkpoint_url: str, device="cpu"):
    """(model in eval mode, resolved RunConfig, state doc) from a checkpoint directory (local path or s3://). A remote
    checkpoint is downloaded to a temporary folder, removed once the weights are in memory."""
    with tempfile.TemporaryDirectory(prefix="laren-ckpt-") as tmp:
        local = S.fetch_checkpoint(checkpoint_url, tmp)
        doc = S.read_state(local)
        if not doc.get("config"):
            raise S.CheckpointError(f"{checkpoint_url}: the checkpoint does not record its run config")
        cfg = RunConfig.model_validate(doc["config"])
        # The checkpoint holds the full model state (frozen generator included): no prior file is needed.
        model_cfg = cfg.model.model_copy(update={"prior": cfg.model.prior.model_copy(update={"path": None})})
        model = build_model(model_cfg, device="cpu")
        S.load_weights(local, model)
    return model.to(device).eval(), cfg, doc


def run_eval(
    checkpoint_url: str,
    data_url: str,
    out_dir: str,
    *,
    limit: Optional[int] = None,
    batch_size: int = 4,
    device: Optional[str] = None,
    alexnet_path: Optional[str] = None,
    random_backbone_for_tests: bool = False,
    tracking_uri: Optional[str] = None,
    experiment: Optional[str] = None,
    run_name: Optional[str] = None,
) -> dict[str, Any]:
    """`laren eval`: evaluate a checkpoint on a shard set; writes ``per_image.csv`` and ``summary.json`` into
    ``out_dir`` and, when a tracking URI is given, logs them to the MLflow run of this (checkpoint, data set)
    (:func:`log_eval_run`; ``run_name``: the eval job's run id, which prefixes that run's name)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg, doc = load_model_from_checkpoint(checkpoint_url, dev)
    lp = make_lpips(alexnet_path or cfg.eval.alexnet_path, random_backbone_for_tests or cfg.eval.random_backbone_for_tests, dev)
    loader = make_eval_loader(data_url, cfg.model.prior.resolution, cfg.model.lr_size, batch_size, limit=limit)
    res = evaluate_model(model, loader, dev, lpips=lp, max_images=limit, grid_images=cfg.train.sample_grid_images,
                         progress=True)
    if res.count == 0:
        raise ValueError(f"{data_url}: no images to evaluate")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cols = list(res.values)
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", *cols])
        for i, key in enumerate(res.keys):
            w.writerow([key, *[f"{res.values[c][i]:.6f}" for c in cols]])
    summary = {
        "checkpoint": checkpoint_url,
        "data": data_url,
        "data_name": dataset_name(data_url),
        "images": res.count,
        "step": doc.get("step"),
        "kimg": doc.get("kimg"),
        **{f"test/{k}": v for k, v in res.means().items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if res.grid is not None:
        Image.fromarray(res.grid).save(out / "samples.png")
    if tracking_uri:
        log_eval_run(tracking_uri, experiment or cfg.tracking.experiment or cfg.name, cfg, doc, summary, out, res.grid,
                     run_name)
    return summary


def dataset_name(data_url: str) -> str:
    """The ``name`` a packed set's manifest gives it (``laren data pack --name``), else the URL's last part."""
    try:
        name = read_manifest(data_url).get("name")
    except (OSError, ValueError):
        name = None
    return str(name or data_url.rstrip("/").rsplit("/", 1)[-1])


def eval_run_name(prefix: str, checkpoint_url: str, data_url: str, step: int, data_name: str) -> str:
    """The MLflow run of one (checkpoint, data set): ``<prefix>-s<step>-<data name>-<hash of both URLs>``. The same
    pair evaluated again continues its run; another checkpoint or data set gets its own."""
    h = hashlib.sha256(f"{checkpoint_url.rstrip('/')}\n{data_url.rstrip('/')}".encode()).hexdigest()[:6]
    return f"{prefix}-s{step}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', data_name)[:40]}-{h}"


def log_eval_run(tracking_uri: str, experiment: str, cfg, doc: dict[str, Any], summary: dict[str, Any], out: Path,
                 grid: Optional[np.ndarray], job_run_id: Optional[str] = None) -> str:
    """Log an evaluation as its own MLflow run, linked to the training run of the checkpoint: tags
    ``laren.train_run_id`` (the laren run id) and, when the checkpoint records it, ``mlflow.parentRunId`` (the MLflow
    UI then lists it under the training run and links to it); params naming the checkpoint and the data set; the
    ``test/*`` means, and the training cost up to the checkpoint (``train/kimg``, ``perf/*``, ``cost/usd``), at the
    checkpoint's step. Returns the MLflow run id."""
    step = int(doc.get("step") or 0)
    name = eval_run_name(job_run_id or f"eval-{cfg.run_id}", summary["checkpoint"], summary["data"], step,
                         summary["data_name"])
    tags = {"laren.kind": "eval", "laren.train_run_id": cfg.run_id, "laren.data": summary["data_name"]}
    if job_run_id:
        tags["laren.eval_job"] = job_run_id
    tr = make_tracker(0, tracking_uri, experiment, name, parent_run_id=doc.get("mlflow_run_id"), tags=tags,
                      system_metrics=False)
    tr.log_params({"checkpoint": summary["checkpoint"], "checkpoint_name": Path(summary["checkpoint"].rstrip("/")).name,
                   "data": summary["data"], "data_name": summary["data_name"], "images": summary["images"],
                   "train_run_id": cfg.run_id, "step": step, "kimg": summary["kimg"]})
    res = cfg.resources
    usage = usage_metrics(float(doc.get("worker_s") or 0.0), res.use_gpu, res.hourly_price_usd)
    metrics = {k: v for k, v in summary.items() if k.startswith("test/") and math.isfinite(v)}
    tr.log_metrics({**metrics, "train/kimg": float(summary["kimg"] or 0.0), **usage}, step=step)
    if grid is not None:
        tr.log_image(grid, "test/samples", step)
    tr.log_artifact(str(out / "per_image.csv"), "eval")
    tr.log_artifact(str(out / "summary.json"), "eval")
    tr.finish("FINISHED")
    return tr.run_id
