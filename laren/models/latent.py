"""Latent heads of the Table IV ablations: z -> generator inputs (model-spec section 5, choice C18).

Legend: B batch, H latent width (= generator style width), N generator style inputs, S_total = sum of the S-space widths.

    W   (Base):     latents[:, n] = z for all n                                   0 parameters
    W+:             latents = (A z + b).view(B, N, H)                             H*N*H + N*H (4,727,808 at 1024)
    S  (StyleSpace): s = A_S z + b_S (B, S_total), split in generator order; each slice replaces the output of the
                    frozen modulation affine of its layer. b_S starts at 1, like the modulation bias.   (4,662,144 at 1024)
The GDM (``laren.models.gdm``) is the fourth head, G. Every head has ``produces``: "latents" (B, N, H) or "styles"
(a list of (B, width) tensors for ``Generator.forward(styles=...)``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["WHead", "WPlusHead", "SHead"]


class WHead(nn.Module):
    """W space: z broadcast to all N style inputs, (B, H) -> (B, N, H). The encoder's final Linear is the affine to W."""

    produces = "latents"

    def __init__(self, num_latents: int):
        super().__init__()
        self.num_latents = num_latents

    def forward(self, z_BH: Tensor) -> Tensor:
        return z_BH[:, None].expand(-1, self.num_latents, -1)


class WPlusHead(nn.Module):
    """W+ space: one Linear(H -> N*H), (B, H) -> (B, N, H)."""

    produces = "latents"

    def __init__(self, latent_dim: int, num_latents: int):
        super().__init__()
        self.latent_dim, self.num_latents = latent_dim, num_latents
        self.fc = nn.Linear(latent_dim, num_latents * latent_dim)

    def forward(self, z_BH: Tensor) -> Tensor:
        return self.fc(z_BH).view(z_BH.shape[0], self.num_latents, self.latent_dim)


class SHead(nn.Module):
    """StyleSpace: Linear(H -> sum(style_dims)) with bias 1, split into the generator's per-layer style slices."""

    produces = "styles"

    def __init__(self, latent_dim: int, style_dims: Sequence[int]):
        super().__init__()
        self.style_dims = [int(d) for d in style_dims]
        self.fc = nn.Linear(latent_dim, sum(self.style_dims))
        with torch.no_grad():
            self.fc.bias.fill_(1.0)

    def forward(self, z_BH: Tensor) -> list[Tensor]:
        return list(torch.split(self.fc(z_BH), self.style_dims, dim=1))
