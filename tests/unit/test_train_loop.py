"""The worker loop's parts in plain Python (no Ray): a missing VGG16 file refuses to start, one ``train_step`` trains D
only with the adversarial term, the schedule; and the tiny job the tests share (tiny_config, make_tiny_dataset,
tiny_step_parts, loss_curve). Tiny sizes: H=32 prior at 32x32, LR 8x8, 4 GDM nodes, one RRDB block. Whole training
runs of this loop: tests/integration/test_train_in_process.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from laren.config import ConfigError, RunConfig


class StepParts(NamedTuple):
    cfg: RunConfig
    model: Any
    disc: Any
    vgg: Any
    opt_g: Any
    opt_d: Any
    lr: Any
    hr: Any


def tiny_step_parts(adversarial_weight: float = 0.01, batch: int = 2) -> StepParts:
    """What one ``train_step`` of the tiny LAREN needs: seeded modules (random VGG16), Adam (lr 1e-3) for G's
    trainable parameters and for D, and one seeded random batch of ``batch`` (LR 8x8, HR 32x32) in [-1, 1]."""
    import torch

    from laren import losses as L
    from laren.models.build import build_discriminator, build_model

    cfg = tiny_config("unused", "sqlite:///unused.db", loss=dict(adversarial_weight=adversarial_weight))
    torch.manual_seed(0)
    model, disc = build_model(cfg.model, device="cpu").train(), build_discriminator(cfg.model).train()
    opt_g = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    lr, hr = torch.rand(batch, 3, 8, 8, generator=g) * 2 - 1, torch.rand(batch, 3, 32, 32, generator=g) * 2 - 1
    return StepParts(cfg, model, disc, L.random_vgg16(0), opt_g, opt_d, lr, hr)


def make_tiny_images(folder: Path, n: int = 24, size: int = 64, seed: int = 0) -> Path:
    """Crops of scikit-image's astronaut / coffee / chelsea photos as PNG files."""
    import skimage.data as skd
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = [skd.astronaut(), skd.coffee(), skd.chelsea()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = photos[i % len(photos)]
        y = int(rng.integers(0, img.shape[0] - size))
        x = int(rng.integers(0, img.shape[1] - size))
        Image.fromarray(img[y: y + size, x: x + size]).save(folder / f"img{i:03d}.png")
    return folder


def make_tiny_dataset(dest: str, work: Path, n: int = 24) -> str:
    """Pack tiny 32x32 shards (``laren data pack``) at ``dest`` (local path or s3://)."""
    from laren.data.pack import pack

    pack(str(make_tiny_images(work / "raw", n)), dest, "tiny", 32, shard_size_mb=0.02, progress=False)
    return dest


def tiny_config(data_url: str, tracking_uri: str, **overrides: Any) -> RunConfig:
    """A LAREN job small enough for CPU tests. ``overrides``: section -> dict of fields."""
    d: dict[str, Any] = dict(
        name="tiny",
        model=dict(lr_size=8, prior=dict(resolution=32, style_dim=32, mapping_layers=2, channel_multiplier=1, channel_max=32),
                   encoder=dict(rrdb_blocks=1, rrdb_channels=16, rrdb_growth=8),
                   gdm=dict(num_nodes=4, node_dim=4, convkb_filters=4, chunk_size=64),
                   cgm=dict(code_dim=8, noise_proj_max_res=16)),
        data=dict(train_url=data_url, num_val_images=8, loader_workers=0, shuffle_buffer=8),
        loss=dict(random_backbone_for_tests=True),
        eval=dict(random_backbone_for_tests=True),
        train=dict(batch_size_global=4, total_kimg=0.04, log_every_kimg=0.004, eval_every_kimg=0.02,
                   checkpoint_every_kimg=0.02, sample_grid_images=2, seed=3),
        tracking=dict(tracking_uri=tracking_uri, experiment="tiny", system_metrics=False, register_model=False),
    )
    for section, fields in overrides.items():
        d[section] = {**d.get(section, {}), **fields} if isinstance(fields, dict) else fields
    return RunConfig.model_validate(d)


def loss_curve(tracking_uri: str, experiment: str, run_name: str, key: str = "train/loss_g") -> list[tuple[int, float]]:
    """(step, value) of a metric of the run named ``run_name``, in logging order."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, f"expected one MLflow run named {run_name}, found {len(runs)}"
    hist = c.get_metric_history(runs[0].info.run_id, key)
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.timestamp, m.step))]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("data")
    return make_tiny_dataset(str(work / "shards"), work)


def test_missing_vgg16_refuses_to_start(dataset, tmp_path):
    from laren.train.inputs import check_run_inputs

    missing = tmp_path / "nope" / "vgg16-397923af.pth"
    cfg = tiny_config(dataset, "sqlite:///unused.db", loss=dict(random_backbone_for_tests=False, vgg16_path=str(missing)))
    with pytest.raises(FileNotFoundError) as e:
        check_run_inputs(cfg)
    assert str(missing) in str(e.value) and "vgg16-397923af.pth" in str(e.value) and "download" in str(e.value)
    with pytest.raises(ConfigError, match="loss.vgg16_path"):
        check_run_inputs(tiny_config(dataset, "sqlite:///unused.db", loss=dict(random_backbone_for_tests=False)))
    # perceptual_weight 0 needs no VGG16 file
    check_run_inputs(tiny_config(dataset, "sqlite:///unused.db", loss=dict(random_backbone_for_tests=False, perceptual_weight=0.0)))


def test_schedule_in_kimg_and_cosine_lr():
    from laren.train.loop import Schedule, cosine_lr

    s = Schedule.from_kimg(batch_size_global=8, total_kimg=1.0, log_kimg=0.04, eval_kimg=0.4, ckpt_kimg=0.32)
    assert (s.total_steps, s.log_every, s.eval_every, s.checkpoint_every) == (125, 5, 50, 40)
    # the same kimg settings at another batch size give the same image counts
    s16 = Schedule.from_kimg(16, 1.0, 0.04, 0.4, 0.32)
    assert s16.total_steps * 16 == pytest.approx(s.total_steps * 8, rel=0.02) and s16.checkpoint_every * 16 == 320
    assert cosine_lr(0, 100, 1e-4, 1e-7) == pytest.approx(1e-4)
    assert cosine_lr(50, 100, 1e-4, 1e-7) == pytest.approx((1e-4 + 1e-7) / 2)
    assert cosine_lr(100, 100, 1e-4, 1e-7) == pytest.approx(1e-7)
    assert cosine_lr(30, 100, 1e-4, None) == 1e-4


@pytest.mark.parametrize("adversarial_weight", [0.0, 0.01])
def test_train_step_updates_g_and_trains_d_only_with_the_adversarial_term(adversarial_weight):
    """One ``train_step`` (the loop's G + D step): the G loss is Eq. 5's weighted sum of the returned terms, the
    generator prior stays frozen, the trainable modules move, and D moves exactly when the adversarial term is on."""
    import torch

    from laren.train.step import train_step

    cfg, model, disc, vgg, opt_g, opt_d, lr, hr = tiny_step_parts(adversarial_weight)
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *(("D." + n, p) for n, p in disc.named_parameters())]}
    out = train_step(model, disc, vgg, opt_g, opt_d, lr, hr, cfg.loss, dict(device_type="cpu", enabled=False))

    w = cfg.loss
    assert out["loss_g"].item() == pytest.approx(w.pixel_weight * out["loss_pix"].item() + w.perceptual_weight
                                                 * out["loss_per"].item() + w.adversarial_weight * out["loss_adv"].item(), rel=1e-5)
    assert out["loss_pix"].item() > 0 and out["loss_per"].item() > 0
    moved = {n for n, p in [*model.named_parameters(), *(("D." + n, p) for n, p in disc.named_parameters())]
             if not torch.equal(p.detach(), before[n])}
    assert not any(n.startswith("generator.") for n in moved)  # the frozen prior
    assert any(n.startswith("encoder.") for n in moved) and any(n.startswith("head.") for n in moved)
    d_moved = any(n.startswith("D.") for n in moved)
    if adversarial_weight > 0:
        assert d_moved and out["loss_d"].item() > 0 and out["loss_adv"].item() > 0
    else:
        assert not d_moved and out["loss_d"].item() == out["loss_adv"].item() == 0.0
