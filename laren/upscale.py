"""`laren upscale`: super-resolve image files with a trained checkpoint or a registered model (``models:/...``,
``runs:/...``; laren/registry.py).

The model takes exactly ``model.lr_size`` x ``model.lr_size`` RGB inputs (the size it was trained on) and returns
``prior.resolution`` x ``prior.resolution`` images. An input of another size is an error that says so, unless
``resize=True``: the image is then centre-cropped to a square and resized to the model's input with MATLAB-compatible
bicubic (the same kernel that made the training LR images).

Inputs are files, folders (their images, not recursive) and glob patterns; every input is read and every output name
checked before the model runs. ``<out>/<stem>_sr.png`` is never overwritten, and two inputs sharing a stem are refused,
unless ``overwrite=True``.
"""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from tqdm import tqdm

from laren.data.pack import IMAGE_EXTS
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
    img = np.array(Image.open(p).convert("RGB"))  # (h, w, 3) uint8, writable (torch.from_numpy warns on a read-only view)
    return lr_from_array(img, lr_size, resize, str(p))


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


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (their image files, sorted; not recursive) and glob patterns -> image paths, in order, each once."""
    out: list[Path] = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                raise FileNotFoundError(f"{arg}: folder holds no images ({', '.join(IMAGE_EXTS)})")
        elif p.is_file():
            found = [p]
        else:
            found = sorted(Path(f) for f in glob.glob(arg, recursive=True) if Path(f).is_file())
            if not found:
                raise FileNotFoundError(f"{arg}: no such image, folder or glob match")
        out += [f for f in found if f not in out]
    return out


def output_paths(images: Sequence[Path], out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """``out_dir/<stem>_sr.png`` per image; without ``overwrite`` an existing output or a stem shared by two inputs is
    an error naming them (nothing is written)."""
    dests = [Path(out_dir) / f"{p.stem}_sr.png" for p in images]
    if overwrite:
        return dests
    seen: dict[Path, Path] = {}
    for src, dest in zip(images, dests):
        if dest in seen:
            raise FileExistsError(f"{seen[dest]} and {src} would both be written to {dest}; rename one, or pass "
                                  "--overwrite (the later one wins)")
        seen[dest] = src
    existing = [str(d) for d in dests if d.exists()]
    if existing:
        raise FileExistsError(f"{len(existing)} output(s) exist already ({', '.join(existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them")
    return dests


@torch.no_grad()
def upscale_files(source: str, images: Sequence[str], out_dir: str, resize: bool = False,
                  device: Optional[str] = None, overwrite: bool = False, progress: Optional[bool] = None) -> list[Path]:
    """Super-resolve each image (files, folders, globs: :func:`expand_inputs`) into ``out_dir/<stem>_sr.png`` with the
    checkpoint directory or MLflow model URI ``source``; the model, every input and every output name are checked
    before any image is written. ``progress``: a bar on stderr (None: when stderr is a terminal)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, cfg = load_model(source, dev)
    paths = expand_inputs(images)
    dests = output_paths(paths, out_dir, overwrite)
    lrs = [load_lr_image(p, cfg.model.lr_size, resize) for p in paths]
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    disable = None if progress is None else not progress
    for lr, dest in tqdm(list(zip(lrs, dests)), desc="upscale", unit="img", disable=disable):
        sr = model(lr.to(dev)).float()[0]
        Image.fromarray(to_uint8_hwc(sr)).save(dest)
    return dests
