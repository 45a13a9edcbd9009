"""StyleGAN2 generator and discriminator in plain PyTorch (no custom CUDA ops).

The frozen prior of LAREN (paper Sec. III; model-spec section 2.4): the GDM codes g_n enter at the W+ positions of the
synthesis network, the CGM codes c_n enter as the per-layer noise maps, and the S ablation (model-spec section 5, "S")
replaces the output of every modulation linear through ``styles=``.

Parameter names and semantics follow rosinality/stylegan2-pytorch (``model.py``), so a rosinality ``g_ema`` / ``d``
state dict loads with ``strict=True``; the only addition is the non-persistent buffer ``latent_avg``. The channel table
is NVIDIA's parametrisation ``channels(r) = min(channel_base // r, channel_max)``; stock rosinality is
``channel_base = 16384 * channel_multiplier``, ``channel_max = 512``.

Legend: B batch, R output resolution, r a level's resolution (4, 8, ..., R), C_r channels at r, S style_dim,
N = num_latents = 2 log2 R - 2 (W+ rows), M = num_noises = 2 log2 R - 3 (noise inputs).

Wiring (rosinality; fixture README section 1 "Gotchas"):
  conv1 <- w[0], noise[0];  to_rgb1 <- w[1]
  level k (r = 8 * 2^k): convs.{2k} (upsampling) <- w[2k+1], noise[2k+1]; convs.{2k+1} <- w[2k+2], noise[2k+2];
                         to_rgbs.{k} <- w[2k+3]
  noise is added straight after the modulated conv, before the bias and the leaky ReLU.
  The output image is the raw ToRGB skip sum (no tanh, no clamp). NVIDIA's ``conv_clamp`` is not applied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SQRT2 = math.sqrt(2.0)
BLUR_KERNEL = (1, 3, 3, 1)


def channel_table(resolution: int, channel_base: int = 32768, channel_max: int = 512) -> dict[int, int]:
    """{4: C_4, 8: C_8, ..., R: C_R} with C_r = min(channel_base // r, channel_max)."""
    log_res = _log2_resolution(resolution, minimum=4)
    return {2**i: min(channel_base // 2**i, channel_max) for i in range(2, log_res + 1)}


def _log2_resolution(resolution: int, minimum: int = 32) -> int:
    log_res = int(round(math.log2(resolution))) if resolution > 0 else -1
    if resolution < minimum or 2**log_res != resolution or resolution > 1024:
        raise ValueError(f"resolution must be a power of two in [{minimum}, 1024], got {resolution}")
    return log_res


# ---------------------------------------------------------------------------------------------------------------------
# Primitive ops (the CPU reference semantics of rosinality's op/: upfirdn2d_native, fused_leaky_relu)
# ---------------------------------------------------------------------------------------------------------------------


def make_kernel(k=BLUR_KERNEL) -> Tensor:
    """Separable FIR kernel outer(k, k) / sum, float32 (kh, kw)."""
    k = torch.tensor(k, dtype=torch.float32)
    k = k[None, :] * k[:, None] if k.ndim == 1 else k
    return k / k.sum()


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample (zero insertion), pad, FIR-filter (true convolution) and downsample; same pad on both axes.

    x (B, C, H, W), kernel (kh, kw) -> (B, C, (H*up + pad0 + pad1 - kh + 1) // down, ...). Negative pads crop.
    """
    b, c, h, w = x.shape
    pad0, pad1 = pad
    if up > 1:
        z = x.new_zeros(b, c, h * up, w * up)
        z[:, :, ::up, ::up] = x
        x = z
    x = F.pad(x, [max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    hh, ww = x.shape[-2:]
    x = x[:, :, max(-pad0, 0) : hh - max(-pad1, 0), max(-pad0, 0) : ww - max(-pad1, 0)]
    kh, kw = kernel.shape
    weight = torch.flip(kernel, [0, 1]).to(x.dtype).view(1, 1, kh, kw).expand(c, 1, kh, kw)
    x = F.conv2d(x, weight, groups=c)
    return x[:, :, ::down, ::down] if down > 1 else x


def fused_leaky_relu(x: Tensor, bias: Tensor, negative_slope: float = 0.2, scale: float = SQRT2) -> Tensor:
    """leaky_relu(x + bias, 0.2) * sqrt(2); bias (C,) broadcast over dim 1."""
    shape = [1, -1] + [1] * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), negative_slope) * scale


# ---------------------------------------------------------------------------------------------------------------------
# Layers (rosinality names: the parameter paths are part of the contract)
# ---------------------------------------------------------------------------------------------------------------------


class PixelNorm(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.rsqrt(torch.mean(x**2, dim=1, keepdim=True) + 1e-8)


class EqualLinear(nn.Module):
    """Equalised-lr linear: y = x (W * lr_mul / sqrt(in))^T + b * lr_mul, optionally fused leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0, activation: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, bias=self.bias * self.lr_mul)


class EqualConv2d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride, self.padding = stride, padding
        self.bias = nn.Parameter(torch.zeros(out_ch)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.scale, bias=self.bias, stride=self.stride, padding=self.padding)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int, bias: bool = True):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None:
            return F.leaky_relu(x, 0.2) * SQRT2
        return fused_leaky_relu(x, self.bias)


class Blur(nn.Module):
    """upfirdn2d(x, kernel, pad) with kernel = make_kernel * factor^2 (buffer ``kernel``)."""

    def __init__(self, pad: tuple[int, int], upsample_factor: int = 1):
        super().__init__()
        self.register_buffer("kernel", make_kernel() * upsample_factor**2)
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """x2 FIR upsampling of the RGB skip: upfirdn2d(up=2, pad=(2, 1)) with the x4 kernel."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.register_buffer("kernel", make_kernel() * factor**2)
        p = self.kernel.shape[0] - factor
        self.factor, self.pad = factor, ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: Tensor) -> Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class ModulatedConv2d(nn.Module):
    """Weight (1, out, in, k, k) * 1/sqrt(in k^2) * s (B, 1, in, 1, 1), demodulated by rsqrt(sum w^2 + 1e-8).

    ``style_override`` (B, in), when given, replaces ``modulation(w)`` (StyleSpace S, model-spec section 5).
    Upsampling: conv_transpose2d(stride 2) then Blur(pad (1, 1), kernel x4): H -> 2H. Batched as a grouped conv.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, demodulate: bool = True,
                 upsample: bool = False):
        super().__init__()
        self.in_channel, self.out_channel, self.kernel_size = in_ch, out_ch, kernel_size
        self.upsample, self.demodulate = upsample, demodulate
        if upsample:
            factor = 2
            p = (len(BLUR_KERNEL) - factor) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + factor - 1, p // 2 + 1), upsample_factor=factor)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1)

    def forward(self, x: Tensor, w: Tensor | None, style_override: Tensor | None = None) -> Tensor:
        b, cin, h, wd = x.shape
        s = self.modulation(w) if style_override is None else style_override
        weight = self.scale * self.weight * s.view(b, 1, cin, 1, 1)  # (B, out, in, k, k)
        if self.demodulate:
            demod = torch.rsqrt(weight.pow(2).sum([2, 3, 4]) + 1e-8)
            weight = weight * demod.view(b, self.out_channel, 1, 1, 1)
        k = self.kernel_size
        x = x.reshape(1, b * cin, h, wd)
        if self.upsample:
            weight = weight.transpose(1, 2).reshape(b * cin, self.out_channel, k, k)
            out = F.conv_transpose2d(x, weight, padding=0, stride=2, groups=b)
            out = self.blur(out.view(b, self.out_channel, *out.shape[-2:]))
        else:
            out = F.conv2d(x, weight.reshape(b * self.out_channel, cin, k, k), padding=self.padding, groups=b)
            out = out.view(b, self.out_channel, *out.shape[-2:])
        return out


class NoiseInjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            noise = x.new_empty(x.shape[0], 1, *x.shape[-2:]).normal_()
        return x + self.weight * noise


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> Tensor:
        return self.input.repeat(batch, 1, 1, 1)


class StyledConv(nn.Module):
    """Modulated conv -> + noise.weight * noise -> fused leaky ReLU (bias ``activate.bias``)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, kernel_size, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch)

    def forward(self, x: Tensor, w: Tensor, noise: Tensor | None = None, style: Tensor | None = None) -> Tensor:
        return self.activate(self.noise(self.conv(x, w, style), noise=noise))


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation + bias (1, 3, 1, 1) + x2-upsampled previous skip."""

    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: Tensor, w: Tensor, skip: Tensor | None = None, style: Tensor | None = None) -> Tensor:
        out = self.conv(x, w, style) + self.bias
        return out if skip is None else out + self.upsample(skip)


# ---------------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------------


class Generator(nn.Module):
    """StyleGAN2 generator (rosinality layout). Parameters: 30,370,060 for R=1024, S=512, 8 mapping layers, cm=2.

    Attributes: resolution R, style_dim S, num_latents N, num_noises M, noise_resolutions (M,), channels {r: C_r},
    style_dims (one per modulation layer, generator order: conv1, to_rgb1, then per level up-conv, conv, to_rgb).
    """

    def __init__(self, resolution: int, style_dim: int = 512, mapping_layers: int = 8, channel_multiplier: int = 2,
                 channel_max: int = 512, channel_base: int | None = None, lr_mlp: float = 0.01):
        super().__init__()
        log_res = _log2_resolution(resolution)
        self.resolution, self.style_dim, self.mapping_layers = resolution, style_dim, mapping_layers
        self.channel_multiplier = channel_multiplier
        self.channel_base = 16384 * channel_multiplier if channel_base is None else channel_base
        self.channel_max = channel_max
        self.channels = channel_table(resolution, self.channel_base, channel_max)
        self.num_latents = 2 * log_res - 2
        self.num_noises = 2 * log_res - 3
        self.noise_resolutions = [2 ** ((i + 5) // 2) for i in range(self.num_noises)]

        self.style = nn.Sequential(
            PixelNorm(), *[EqualLinear(style_dim, style_dim, lr_mul=lr_mlp, activation=True) for _ in range(mapping_layers)]
        )
        c = self.channels
        self.input = ConstantInput(c[4])
        self.conv1 = StyledConv(c[4], c[4], 3, style_dim)
        self.to_rgb1 = ToRGB(c[4], style_dim, upsample=False)
        self.convs, self.to_rgbs = nn.ModuleList(), nn.ModuleList()
        self.noises = nn.Module()
        for i, r in enumerate(self.noise_resolutions):
            self.noises.register_buffer(f"noise_{i}", torch.randn(1, 1, r, r))
        style_dims = [c[4], c[4]]
        in_ch = c[4]
        for i in range(3, log_res + 1):
            out_ch = c[2**i]
            self.convs.append(StyledConv(in_ch, out_ch, 3, style_dim, upsample=True))
            self.convs.append(StyledConv(out_ch, out_ch, 3, style_dim))
            self.to_rgbs.append(ToRGB(out_ch, style_dim))
            style_dims += [in_ch, out_ch, out_ch]
            in_ch = out_ch
        self.style_dims = style_dims
        # W mean for truncation; not in rosinality's state dict (stored beside g_ema), hence non-persistent.
        self.register_buffer("latent_avg", torch.zeros(style_dim), persistent=False)

    # -- mapping ----------------------------------------------------------------------------------------------------
    def mapping(self, z: Tensor) -> Tensor:
        """z (B, S) -> w (B, S): PixelNorm then mapping_layers x [equalised linear (lr_mul 0.01), lrelu * sqrt 2]."""
        return self.style(z)

    def modulation_layers(self) -> list[ModulatedConv2d]:
        """The modulated convs in generator order (aligned with style_dims and W+ rows via latent_index())."""
        layers = [self.conv1.conv, self.to_rgb1.conv]
        for k in range(len(self.to_rgbs)):
            layers += [self.convs[2 * k].conv, self.convs[2 * k + 1].conv, self.to_rgbs[k].conv]
        return layers

    def latent_index(self) -> list[int]:
        """W+ row used by each modulation layer (generator order): 0, 1, then 2k+1, 2k+2, 2k+3 per level k."""
        idx = [0, 1]
        for k in range(len(self.to_rgbs)):
            idx += [2 * k + 1, 2 * k + 2, 2 * k + 3]
        return idx

    def compute_styles(self, latents: Tensor) -> list[Tensor]:
        """W+ (B, N, S) -> the modulation outputs s_l (B, style_dims[l]) a default forward would use."""
        return [layer.modulation(latents[:, i]) for layer, i in zip(self.modulation_layers(), self.latent_index())]

    # -- synthesis --------------------------------------------------------------------------------------------------
    def forward(self, latents: Tensor, noise: list[Tensor | None] | None = None, randomize_noise: bool = True,
                styles: list[Tensor] | None = None, return_features: bool = False):
        """W+ latents (B, N, S) -> img (B, 3, R, R) [, feats {r: (B, C_r, r, r)}].

        noise: M tensors (B or 1, 1, r, r) (a None entry draws N(0, 1)); if noise is None: the stored buffers
        ``noises.noise_i`` (randomize_noise=False) or fresh N(0, 1) (True). styles: optional list aligned with
        style_dims, each (B, style_dims[l]), replacing the modulation linear outputs (then ``latents`` is unused
        except for its batch size; pass a (B, N, S) tensor or the styles alone decide the output).
        """
        b = latents.shape[0]
        if latents.ndim != 3 or latents.shape[1:] != (self.num_latents, self.style_dim):
            raise ValueError(f"latents must be (B, {self.num_latents}, {self.style_dim}), got {tuple(latents.shape)}")
        if noise is None:
            noise = [None] * self.num_noises if randomize_noise else [
                getattr(self.noises, f"noise_{i}") for i in range(self.num_noises)]
        if len(noise) != self.num_noises:
            raise ValueError(f"noise must be a list of {self.num_noises} tensors, got {len(noise)}")
        if styles is not None and [s.shape[-1] for s in styles] != self.style_dims:
            raise ValueError(f"styles widths must be {self.style_dims}, got {[s.shape[-1] for s in styles]}")
        st = styles if styles is not None else [None] * len(self.style_dims)
        w = latents

        feats: dict[int, Tensor] = {}
        out = self.input(b).to(latents.dtype)
        out = self.conv1(out, w[:, 0], noise=noise[0], style=st[0])
        skip = self.to_rgb1(out, w[:, 1], style=st[1])
        feats[4] = out
        for k in range(len(self.to_rgbs)):
            out = self.convs[2 * k](out, w[:, 2 * k + 1], noise=noise[2 * k + 1], style=st[3 * k + 2])
            out = self.convs[2 * k + 1](out, w[:, 2 * k + 2], noise=noise[2 * k + 2], style=st[3 * k + 3])
            skip = self.to_rgbs[k](out, w[:, 2 * k + 3], skip, style=st[3 * k + 4])
            feats[out.shape[-1]] = out
        return (skip, feats) if return_features else skip

    def generate(self, z: Tensor, truncation: float = 1.0, truncation_latent: Tensor | None = None, noise=None,
                 randomize_noise: bool = True) -> tuple[Tensor, Tensor]:
        """z (B, S) -> mapping -> truncation w' = avg + t (w - avg) (avg defaults to latent_avg) -> W+ (B, N, S).

        Returns (img (B, 3, R, R), wplus (B, N, S)).
        """
        w = self.mapping(z)
        if truncation < 1:
            avg = self.latent_avg if truncation_latent is None else truncation_latent
            w = avg + truncation * (w - avg)
        wplus = w.unsqueeze(1).repeat(1, self.num_latents, 1)
        return self.forward(wplus, noise=noise, randomize_noise=randomize_noise), wplus


# ---------------------------------------------------------------------------------------------------------------------
# Discriminator
# ---------------------------------------------------------------------------------------------------------------------


class ConvLayer(nn.Sequential):
    """[Blur (downsample only)] -> EqualConv2d -> [FusedLeakyReLU]; rosinality's Sequential indices are the names."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False, bias: bool = True,
                 activate: bool = True):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_KERNEL) - 2) + (kernel_size - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=bias and not activate))
        if activate:
            layers.append(FusedLeakyReLU(out_ch, bias=bias))
        super().__init__(*layers)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv1 = ConvLayer(in_ch, in_ch, 3)
        self.conv2 = ConvLayer(in_ch, out_ch, 3, downsample=True)
        self.skip = ConvLayer(in_ch, out_ch, 1, downsample=True, activate=False, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class Discriminator(nn.Module):
    """StyleGAN2 residual discriminator (rosinality layout). img (B, 3, R, R) -> logits (B, 1).

    Minibatch stddev: group min(B, 4), one feature; B must be <= 4 or a multiple of 4.
    Parameters: 29,012,513 for R=1024, cm=2.
    """

    def __init__(self, resolution: int, channel_multiplier: int = 2, channel_max: int = 512,
                 channel_base: int | None = None):
        super().__init__()
        log_res = _log2_resolution(resolution)
        self.resolution = resolution
        self.channel_base = 16384 * channel_multiplier if channel_base is None else channel_base
        self.channels = c = channel_table(resolution, self.channel_base, channel_max)
        convs: list[nn.Module] = [ConvLayer(3, c[resolution], 1)]
        in_ch = c[resolution]
        for i in range(log_res, 2, -1):
            convs.append(ResBlock(in_ch, c[2 ** (i - 1)]))
            in_ch = c[2 ** (i - 1)]
        self.convs = nn.Sequential(*convs)
        self.stddev_group, self.stddev_feat = 4, 1
        self.final_conv = ConvLayer(in_ch + 1, c[4], 3)
        self.final_linear = nn.Sequential(EqualLinear(c[4] * 4 * 4, c[4], activation=True), EqualLinear(c[4], 1))

    def forward(self, img: Tensor) -> Tensor:
        out = self.convs(img)
        b, ch, h, w = out.shape
        group = min(b, self.stddev_group)
        if b % group != 0:
            raise ValueError(f"batch size {b} must be <= {self.stddev_group} or a multiple of it (minibatch stddev)")
        sd = out.view(group, -1, self.stddev_feat, ch // self.stddev_feat, h, w)
        sd = torch.sqrt(sd.var(0, unbiased=False) + 1e-8).mean([2, 3, 4], keepdim=True).squeeze(2)
        out = torch.cat([out, sd.repeat(group, 1, h, w)], 1)
        out = self.final_conv(out)
        return self.final_linear(out.view(b, -1))
