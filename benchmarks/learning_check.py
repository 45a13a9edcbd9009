"""Learning check (not a test): a few CPU minutes of training on patches of real photographs lower the validation loss,
and the validation PSNR beats plain bicubic upsampling.

Data: 32x32 patches of the colour photographs scikit-image ships (training: astronaut, coffee, chelsea, rocket,
immunohistochemistry; validation: cat, hubble_deep_field — other photos), packed with `laren data pack`; LR 4x4 (x8, a large factor as in the paper)
made by the pipeline's MATLAB bicubic. The model is a tiny LAREN (H=32 random prior at 32x32, 4 GDM nodes, CGM) with
GLEAN's encoder-feature decoder (``model.glean_skips``): without a pre-trained prior, the frozen random generator
cannot carry image content, so the skip path is what learns here. Loss: the pixel term of Eq. 5 (the perceptual and
adversarial terms do not serve PSNR).

    .venv/bin/python benchmarks/learning_check.py [--minutes 3]

Prints the validation loss before and after, the validation PSNR and the bicubic PSNR on the same images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_patches(folder: Path, photos, n: int, size: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = photos[i % len(photos)]
        y = int(rng.integers(0, img.shape[0] - size))
        x = int(rng.integers(0, img.shape[1] - size))
        Image.fromarray(np.ascontiguousarray(img[y: y + size, x: x + size])).save(folder / f"p{i:05d}.png")
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0, help="CPU training time budget (approximate).")
    ap.add_argument("--images-per-s", type=float, default=60.0, help="Assumed throughput that sizes total_kimg.")
    args = ap.parse_args()

    import skimage.data as skd

    from laren.config import RunConfig
    from laren.data.pack import pack
    from laren.data.pipeline import make_eval_loader
    from laren.evaluate import evaluate_model
    from laren.models.build import build_model
    from laren.train.loop import WorkerContext, train_worker

    work = Path(tempfile.mkdtemp(prefix="laren-learning-check-"))
    train_photos = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), skd.immunohistochemistry()]
    val_photos = [skd.cat(), skd.hubble_deep_field()]
    pack(str(make_patches(work / "train_raw", train_photos, 2000, seed=0)), str(work / "train"), "train", 32, progress=False)
    pack(str(make_patches(work / "val_raw", val_photos, 64, seed=1)), str(work / "val"), "val", 32, progress=False)

    total_kimg = round(args.minutes * 60 * args.images_per_s / 1000.0, 3)
    cfg = RunConfig.model_validate(dict(
        name="learning-check",
        model=dict(lr_size=4, glean_skips=True,
                   prior=dict(resolution=32, style_dim=32, mapping_layers=2, channel_multiplier=1, channel_max=32),
                   encoder=dict(rrdb_blocks=2, rrdb_channels=32, rrdb_growth=16),
                   gdm=dict(num_nodes=4, node_dim=4, convkb_filters=4, chunk_size=64), cgm=dict(code_dim=8, noise_proj_max_res=16)),
        data=dict(train_url=str(work / "train"), val_url=str(work / "val"), num_val_images=64, loader_workers=1,
                  shuffle_buffer=256),
        loss=dict(perceptual_weight=0.0, adversarial_weight=0.0),
        optim=dict(lr=2e-3, cosine_min_lr=1e-5),
        train=dict(batch_size_global=16, total_kimg=total_kimg, log_every_kimg=total_kimg / 20,
                   eval_every_kimg=total_kimg / 4, checkpoint_every_kimg=total_kimg * 2, seed=0),
        tracking=dict(tracking_uri=f"sqlite:///{work}/mlflow.db", experiment="learning-check", system_metrics=False),
    ))

    # The initial model, exactly as train_worker builds it (same seed), evaluated on the validation patches.
    torch.manual_seed(cfg.train.seed)
    model0 = build_model(cfg.model)
    before = evaluate_model(model0, make_eval_loader(cfg.data.val_url, 32, cfg.model.lr_size, 16, limit=64)).means()

    t0 = time.time()
    out = train_worker(cfg, WorkerContext(run_id="learning-check"))
    dt = time.time() - t0
    print(f"trained {out['kimg']:.2f} kimg ({out['step']} steps) in {dt / 60:.1f} min on the CPU")
    print(f"validation loss (pixel MSE): {before['loss_pix']:.4f} before -> {out['val/loss_pix']:.4f} after")
    print(f"validation PSNR: {out['val/psnr']:.2f} dB (model) vs {out['val/psnr_bicubic']:.2f} dB (bicubic)")
    ok = out["val/loss_pix"] < before["loss_pix"] and out["val/psnr"] > out["val/psnr_bicubic"]
    print("learning check:", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
