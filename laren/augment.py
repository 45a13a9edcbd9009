"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to every image the discriminator sees, real
and generated alike, so that D cannot memorise a small training set and G still gets gradients through them.

    color        brightness + U(-0.5, 0.5); saturation x U(0, 2) about the pixel mean; contrast x U(0.5, 1.5) about
                 the image mean (images in [-1, 1], as the official implementation)
    translation  integer shift by up to 1/8 of the side in each direction, zero-filled

Every random draw is per image (B, 1, 1, 1) and made on the images' device.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

POLICIES = ("color", "translation")


def diff_augment(x: torch.Tensor, policies: Sequence[str]) -> torch.Tensor:
    """x (B, C, H, W) -> augmented x (same shape), differentiable in x. ``policies``: a subset of POLICIES."""
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown DiffAugment policies {bad}; choose from {POLICIES}")
    if "color" in policies:
        x = x + (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) - 0.5)
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) * 2) + mean
        mean = x.mean([1, 2, 3], keepdim=True)
        x = (x - mean) * (torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) + 0.5) + mean
    if "translation" in policies:
        x = _translate(x, 0.125)
    return x


def _translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    b, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = torch.randint(-sh, sh + 1, (b, 1, 1), device=x.device)
    tx = torch.randint(-sw, sw + 1, (b, 1, 1), device=x.device)
    gb, gy, gx = torch.meshgrid(torch.arange(b, device=x.device), torch.arange(h, device=x.device),
                                torch.arange(w, device=x.device), indexing="ij")
    gy = torch.clamp(gy + ty + 1, 0, h + 1)  # +1: the zero border added below
    gx = torch.clamp(gx + tx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)
    return padded[gb, gy, gx].permute(0, 3, 1, 2).contiguous()
