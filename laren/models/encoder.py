"""GLEAN-style encoder: LR image -> single latent z (model-spec 2.1, choice C17; mmagic ``GLEANStyleGANv2`` encoder [ref]).

Legend: B batch, l LR size, H latent width, ch[r] the generator's channel table at resolution r.

    x (B, 3, l, l), in [-1, 1]
    RRDB feature extractor: conv3x3 3->c; rrdb_blocks x RRDB(c, growth); conv3x3 c->c; + skip          (B, c, l, l)
    e_in: conv3x3 c->ch[l], LReLU(0.2)                                                                 (B, ch[l], l, l)
    for r = l, l/2, ..., 8: [conv3x3 stride 2 ch[r]->ch[r/2], LReLU, conv3x3 ch[r/2]->ch[r/2], LReLU]  -> (B, ch[r/2], r/2, r/2)
    block 4: conv3x3 ch[4]->ch[4], LReLU, Flatten, Linear(16 ch[4] -> H)                              z (B, H)

With c=64, growth 32, 23 RRDBs and the StyleGAN2 table (ch = 512 up to 64 px) this has 32,874,752 parameters for
l = 16 and 42,313,984 for l = 64. The only difference from GLEAN is the final Linear, which outputs one z (H) rather
than N*H latents. Stage widths follow the generator's channel table, so a small test prior gives a small encoder.
``features(x)`` also returns the multi-scale maps {r: (B, ch[r], r, r)} for r = l .. 4 that GLEAN's fusion uses.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ResidualDenseBlock", "RRDB", "RRDBFeatureExtractor", "GleanEncoder"]


class ResidualDenseBlock(nn.Module):
    """ESRGAN dense block: 5 convs with growth channels, LReLU(0.2), residual scaled by 0.2."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels + k * growth, growth if k < 4 else channels, 3, 1, 1) for k in range(5)
        )

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for k, conv in enumerate(self.convs):
            y = conv(torch.cat(feats, 1))
            if k < 4:
                feats.append(F.leaky_relu(y, 0.2))
        return x + 0.2 * y


class RRDB(nn.Module):
    """Residual-in-residual dense block: 3 dense blocks, residual scaled by 0.2."""

    def __init__(self, channels: int = 64, growth: int = 32):
        super().__init__()
        self.blocks = nn.Sequential(*(ResidualDenseBlock(channels, growth) for _ in range(3)))

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.blocks(x)


class RRDBFeatureExtractor(nn.Module):
    """conv_first 3->c, body of RRDBs, conv_body c->c, global skip: (B, 3, l, l) -> (B, c, l, l)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, num_blocks: int = 23, growth: int = 32):
        super().__init__()
        self.conv_first = nn.Conv2d(in_channels, channels, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(channels, growth) for _ in range(num_blocks)))
        self.conv_body = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        feat = self.conv_first(x)
        return feat + self.conv_body(self.body(feat))


class GleanEncoder(nn.Module):
    """LR image (B, 3, l, l) -> z (B, H). ``channels`` is the generator's {resolution: channels} table."""

    def __init__(
        self,
        lr_size: int,
        channels: Mapping[int, int],
        latent_dim: int,
        rrdb_blocks: int = 23,
        rrdb_channels: int = 64,
        rrdb_growth: int = 32,
    ):
        super().__init__()
        if lr_size < 4 or lr_size & (lr_size - 1):
            raise ValueError(f"lr_size must be a power of 2 >= 4, got {lr_size}")
        missing = [r for r in _pyramid(lr_size) if r not in channels]
        if missing:
            raise ValueError(f"channel table lacks resolutions {missing} (needs 4..{lr_size})")
        self.lr_size, self.latent_dim = lr_size, latent_dim
        self.channels = {r: int(channels[r]) for r in _pyramid(lr_size)}
        ch = self.channels
        self.rrdb = RRDBFeatureExtractor(3, rrdb_channels, rrdb_blocks, rrdb_growth)
        self.e_in = nn.Conv2d(rrdb_channels, ch[lr_size], 3, 1, 1)
        self.down = nn.ModuleList()
        for r in _pyramid(lr_size)[:-1]:  # r = l, ..., 8
            self.down.append(
                nn.Sequential(
                    nn.Conv2d(ch[r], ch[r // 2], 3, 2, 1),
                    nn.LeakyReLU(0.2),
                    nn.Conv2d(ch[r // 2], ch[r // 2], 3, 1, 1),
                    nn.LeakyReLU(0.2),
                )
            )
        self.final_conv = nn.Conv2d(ch[4], ch[4], 3, 1, 1)
        self.fc = nn.Linear(16 * ch[4], latent_dim)

    def features(self, x: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """x (B, 3, l, l) -> (z (B, H), {r: (B, ch[r], r, r)} for r = l, ..., 4)."""
        if x.shape[-2:] != (self.lr_size, self.lr_size):
            raise ValueError(f"encoder expects LR images of {self.lr_size}x{self.lr_size}, got {tuple(x.shape)}")
        feat = F.leaky_relu(self.e_in(self.rrdb(x)), 0.2)
        feats = {self.lr_size: feat}
        for block in self.down:
            feat = block(feat)
            feats[feat.shape[-1]] = feat
        feat = F.leaky_relu(self.final_conv(feat), 0.2)
        feats[4] = feat
        return self.fc(feat.flatten(1)), feats

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)[0]


def _pyramid(lr_size: int) -> list[int]:
    """[l, l/2, ..., 4]."""
    out, r = [], lr_size
    while r >= 4:
        out.append(r)
        r //= 2
    return out
