"""LarenSR: LR image -> encoder -> latent head (W / W+ / S / GDM) -> frozen StyleGAN2 (+ CGM noise) -> SR image
(paper III-A, Fig. 3; model-spec 2.4 and 5).

Legend: B batch, l LR size, R output size, H latent width, N style inputs, M noise inputs.

    lr (B, 3, l, l) in [-1, 1] -> z (B, H) -> latents (B, N, H) or styles [(B, w_l)]
                               -> noise: CGM(latents) | N(0, 1) during training | fixed-seed maps at evaluation
                               -> G(latents, noise, styles) -> sr (B, 3, R, R) in about [-1, 1]

The generator is frozen: its parameters never require grad, and it stays in eval mode even under ``.train()``
(choice C15; the pre-trained noise strengths and the modulation affines stay fixed). Gradients still flow through it
to the latents and the noise maps, and so to the encoder, the head and the CGM.

Noise without a CGM (the Base rows of Table IV): fresh N(0, 1) maps per layer in training, and fixed maps from
``eval_noise_seed`` in evaluation, shared across the batch (1, 1, r, r), like GLEAN's ``injected_noise_i`` buffers.

``glean_skips`` (choice C17) is a compact GLEAN fusion + decoder, :class:`GleanDecoder`. mmagic fuses the encoder
maps into the generator's features inside the synthesis loop. The generator here stays a closed, frozen module, so
the fusion happens in the decoder instead. It starts at 4x4 from conv(cat(G feature, encoder feature)). At every
higher resolution r it convolves cat(upsampled decoder feature, G feature at r, encoder feature at r when r <= l)
down to ch[r]. A final conv3x3 -> RGB gives the SR image. For in16/out1024 this adds 30,665,539 parameters, against
+55.09M for mmagic's fusion (14.20M) and decoder (40.89M).

``glean_lr_skip`` (only with ``glean_skips``; off by default) also feeds the LR image, bicubically upsampled to R, to
that final conv: to_rgb(cat(decoder feature (B, ch[R], R, R), up(lr) (B, 3, R, R))). The decoder then refines an
interpolation of the input instead of rebuilding every pixel from the encoder's 4x4..l maps (the residual / input
skip of VDSR-style SR networks). This matters when the prior is random and carries no image content. The LR
channels of that conv start as the identity (centre tap 1 from each colour to itself, the other taps 0), so the
decoder starts from the bicubic image plus its own (randomly initialised) output and learns the correction; a
random start would first have to discover the identity. It adds 3 * 3 * 3 * 3 = 81 parameters (30,665,620 for
in16/out1024).
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from laren.models.stylegan2 import NoiseInjection

__all__ = ["LarenSR", "GleanDecoder"]


class GleanDecoder(nn.Module):
    """Compact GLEAN fusion + decoder: G features {r: (B, chg[r], r, r)}, r = 4..R, and encoder features
    {r: (B, che[r], r, r)}, r = 4..l -> image (B, 3, R, R). With ``lr_skip`` the final conv also reads the LR image
    (B, 3, l, l), bicubically upsampled to (B, 3, R, R)."""

    def __init__(
        self,
        lr_size: int,
        out_size: int,
        gen_channels: Mapping[int, int],
        enc_channels: Mapping[int, int],
        lr_skip: bool = False,
    ):
        super().__init__()
        self.lr_size, self.out_size, self.lr_skip = lr_size, out_size, lr_skip
        cg, ce = gen_channels, enc_channels
        self.fuse4 = nn.Conv2d(cg[4] + ce[4], cg[4], 3, 1, 1)
        self.blocks = nn.ModuleDict()
        r = 8
        while r <= out_size:
            cin = cg[r // 2] + cg[r] + (ce[r] if r <= lr_size else 0)
            self.blocks[str(r)] = nn.Conv2d(cin, cg[r], 3, 1, 1)
            r *= 2
        self.to_rgb = nn.Conv2d(cg[out_size] + (3 if lr_skip else 0), 3, 3, 1, 1)
        if lr_skip:  # the LR-image channels start as the identity (see the module docstring)
            with torch.no_grad():
                self.to_rgb.weight[:, -3:].zero_()
                self.to_rgb.weight[:, -3:, 1, 1].copy_(torch.eye(3))

    def forward(
        self, gen_feats: Mapping[int, Tensor], enc_feats: Mapping[int, Tensor], lr: Optional[Tensor] = None
    ) -> Tensor:
        x = F.leaky_relu(self.fuse4(torch.cat([gen_feats[4], enc_feats[4]], 1)), 0.2)
        r = 8
        while r <= self.out_size:
            parts = [F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), gen_feats[r]]
            if r <= self.lr_size:
                parts.append(enc_feats[r])
            x = F.leaky_relu(self.blocks[str(r)](torch.cat(parts, 1)), 0.2)
            r *= 2
        if self.lr_skip:
            if lr is None:
                raise ValueError("GleanDecoder(lr_skip=True) needs the LR image: decoder(gen_feats, enc_feats, lr)")
            up = F.interpolate(lr.to(x.dtype), size=(self.out_size, self.out_size), mode="bicubic", align_corners=False)
            x = torch.cat([x, up], 1)
        return self.to_rgb(x)


class LarenSR(nn.Module):
    """The SR model. ``head`` maps z (B, H) to latents (B, N, H) (``produces == "latents"``: W, W+, GDM) or to a
    list of style slices (``produces == "styles"``: S). ``cgm`` (optional) maps the latents to the noise maps."""

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module,
        generator: nn.Module,
        cgm: Optional[nn.Module] = None,
        decoder: Optional[GleanDecoder] = None,
        eval_noise_seed: int = 0,
        learn_noise_strength: bool = False,
    ):
        super().__init__()
        self.encoder, self.head, self.generator, self.cgm, self.decoder = encoder, head, generator, cgm, decoder
        self.head_produces = getattr(head, "produces", "latents")
        if cgm is not None and self.head_produces != "latents":
            raise ValueError("the CGM reads the latent codes g_n; it cannot follow a StyleSpace (S) head")
        generator.requires_grad_(False)
        if learn_noise_strength:  # choice C15's alternative: the scalars w_m of x + w_m * noise_m are trained
            for m in generator.modules():
                if isinstance(m, NoiseInjection):
                    m.weight.requires_grad_(True)
        generator.eval()
        # Fixed evaluation noise (1, 1, r, r) per layer, drawn on the CPU from eval_noise_seed so that it does not
        # depend on the device; non-persistent: it is a function of the seed, not a weight.
        gen = torch.Generator(device="cpu").manual_seed(eval_noise_seed)
        for i, r in enumerate(generator.noise_resolutions):
            self.register_buffer(f"eval_noise_{i}", torch.randn(1, 1, r, r, generator=gen, device="cpu"), persistent=False)

    def train(self, mode: bool = True) -> "LarenSR":
        super().train(mode)
        self.generator.eval()  # frozen prior: always eval mode
        return self

    def trainable_parameters(self):
        """Parameters the optimizer updates (encoder, head, CGM, decoder); never the generator's."""
        return [p for p in self.parameters() if p.requires_grad]

    def noise(self, batch: int, ref: Tensor) -> list[Tensor]:
        """Random N(0, 1) maps in training; the fixed evaluation maps otherwise."""
        res = self.generator.noise_resolutions
        if self.training:
            return [torch.randn(batch, 1, r, r, device=ref.device, dtype=ref.dtype) for r in res]
        return [getattr(self, f"eval_noise_{i}").to(ref.dtype) for i in range(len(res))]

    def encode(self, lr: Tensor) -> tuple[Tensor, Optional[dict[int, Tensor]]]:
        """lr -> (z (B, H), the encoder's multi-scale features when the GLEAN decoder needs them, else None)."""
        if self.decoder is not None:
            return self.encoder.features(lr)
        return self.encoder(lr), None

    def latent_codes(self, z: Tensor) -> tuple[Tensor, Optional[list[Tensor]]]:
        """z -> (latents (B, N, H), styles or None): the head's output in the generator's terms."""
        out = self.head(z)
        if self.head_produces == "styles":  # latents are unused by G when styles are given
            return z[:, None].expand(z.shape[0], self.generator.num_latents, z.shape[1]), out
        return out, None

    def render(self, lr: Tensor, z: Tensor, latents: Tensor, styles, enc_feats) -> tuple[Tensor, list[Tensor]]:
        """(sr (B, 3, R, R), the noise maps used): the CGM's noise (or the noise policy), the frozen generator and
        the optional decoder."""
        G = self.generator
        noise = self.cgm(latents) if self.cgm is not None else self.noise(z.shape[0], z)
        if self.decoder is not None:
            _, gen_feats = G(latents, noise=noise, randomize_noise=False, styles=styles, return_features=True)
            return self.decoder(gen_feats, enc_feats, lr), noise
        return G(latents, noise=noise, randomize_noise=False, styles=styles), noise

    def forward(self, lr: Tensor, return_aux: bool = False):
        """lr (B, 3, l, l) -> sr (B, 3, R, R); with return_aux also {z, latents, styles, noise}."""
        z, enc_feats = self.encode(lr)
        latents, styles = self.latent_codes(z)
        sr, noise = self.render(lr, z, latents, styles, enc_feats)
        if return_aux:
            return sr, {"z": z, "latents": latents, "styles": styles, "noise": noise}
        return sr
