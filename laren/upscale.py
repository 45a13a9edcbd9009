"""`laren upscale`: super-resolve image files with a trained checkpoint or a registered model (``models:/...``,
``runs:/...``; laren/registry.py).

The model takes exactly ``model.lr_size`` x ``model.lr_size`` RGB inputs (the size it was trained on) and returns
``prior.resolution`` x ``prior.resolution`` images. An input of another size is an error that says so, unless
``resize=True``: the image is then centre-cropped to a square and resized to the model's input with MATLAB-compatible
bicubic (the same kernel that made the training LR images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from laren.evaluate import to_uint8_hwc
from laren.imresize import imresize_uint8
from laren.registry import load_model


class ImageSizeError(ValueError):
    """An input image whose size does not match the model's input."""


def load_lr_image(path: str | Path, lr_size: int, resize: bool = False) -> torch.Tensor:
    """An image file -> (1, 3, l, l) in [-1, 1]; raises ImageSizeError when it is not l x l and resize is off."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image not found: {p}")
    return lr_from_array(np.asarray(Image.open(p).convert("RGB")), lr_size, resize, str(p))


def lr_from_array(img: np.ndarray, lr_size: int, resize: bool = False, name: str = "image") -> torch.Tensor:
    """uint8 (h, w, 3) -> (1, 3, l, l) in [-1, 1]; raises ImageSizeError when it is not l x l and resize is off."""
    h, w = img.shape[:2]
    if (h, w) != (lr_size, lr_size):
        if not resize:
            raise ImageSizeError(
                f"{name}: image is {w}x{h} but the model takes {lr_size}x{lr_size} inputs "
                f"(model.lr_size); pass --resize to centre-crop and resize it to fit"
            )
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        sq = torch.from_numpy(np.ascontiguousarray(img[top: top + s, left: left + s])).permute(2, 0, 1)
        out = imresize_uint8(sq, lr_size / s)
        img = out[:, :lr_size, :lr_size].permute(1, 2, 0).numpy()
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


@torch.no_grad()
def upscale_files(source: str, images: Sequence[str], out_dir: str, resize: bool = False,
                  device: Optional[str] = None) -> list[Path]:
    """Super-resolve each image into ``out_dir/<stem>_sr.png`` with the checkpoint directory or MLflow model URI
    ``source``; every input is checked before any work is done."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_model(source, dev)
    lrs = [load_lr_image(p, cfg.model.lr_size, resize) for p in images]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, lr in zip(images, lrs):
        sr = model(lr.to(dev)).float()[0]
        dest = out / f"{Path(path).stem}_sr.png"
        Image.fromarray(to_uint8_hwc(sr)).save(dest)
        written.append(dest)
    return written
