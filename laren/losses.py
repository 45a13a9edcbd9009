"""Training losses of LAREN (paper Eq. 5; model-spec section 6): pure functions of tensors.

    L_G = w_pix · mean((ŷ − y)²) + w_per · mean((φ(ŷ) − φ(y))²) + w_adv · adv(D(ŷ))
    L_D = softplus(−D(y)) + softplus(D(ŷ.detach()))            (no R1, as GLEAN)

The training loop composes these with the weights of ``LossConfig``; this module holds no weights or state besides the
frozen VGG16 feature stack φ.

Legend: B batch, 3 RGB, H×W image size; images are in [-1, 1]. D logits are (B,) or (B, 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from laren.models.state_dict import load_strict, read_torch_state_dict

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torchvision VGG16 "D" configuration up to conv4_3: numbers are conv output channels, "M" a 2x2 max-pool.
_VGG16_CFG_TO_CONV4_3 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512]

# ImageNet statistics (torchvision / mmagic PerceptualVGG, use_input_norm=True).
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGG16Features(nn.Module):
    """torchvision ``vgg16().features[:22]``: conv1_1 … conv4_3, ending *before* the ReLU after conv4_3.

    Submodules keep torchvision's indices (``features.0`` … ``features.21``), so the ``features.N.weight/bias`` keys of a
    torchvision VGG16 state dict load unchanged. The layer is mmagic's ``layer_weights={'21': 1.0}`` (choice C20).
    Input (B, 3, H, W) already normalised; output (B, 512, H/8, W/8).
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16_CFG_TO_CONV4_3:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = int(v)
        self.features = nn.Sequential(*layers[:22])  # drop the ReLU after conv4_3 (index 22)
        assert isinstance(self.features[21], nn.Conv2d) and len(self.features) == 22
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGG16Features":
        # Frozen feature extractor: always in eval mode (it has no dropout/BN, but keep the contract explicit).
        return super().train(False)

    def forward(self, x_bchw: torch.Tensor) -> torch.Tensor:
        return self.features(x_bchw)


def _load_vgg_state(vgg: VGG16Features, state: dict[str, torch.Tensor], source: str) -> VGG16Features:
    # classifier.* and deeper features.* are ignored
    load_strict(vgg, state, f"{source}: not a torchvision VGG16 state dict; use torchvision's vgg16-397923af.pth from "
                f"{VGG16_URL}", ignore_unexpected=True)
    return vgg


def load_vgg16(path: str | Path | None) -> VGG16Features:
    """The frozen conv4_3 feature stack from a torchvision VGG16 state dict (``loss.vgg16_path``).

    ``path``: a local file or an ``s3://`` URL (cached once per node). Read with ``torch.load(weights_only=True)``: no
    pickled code runs.
    """
    if path is None:
        raise ValueError(
            f"loss.vgg16_path is not set but loss.perceptual_weight > 0: download torchvision's VGG16 weights "
            f"({VGG16_URL}) and set loss.vgg16_path to the file, or set loss.perceptual_weight: 0."
        )
    state = read_torch_state_dict(
        path, f"VGG16 weights not found: {path} (loss.vgg16_path). The perceptual loss needs torchvision's ImageNet "
        f"VGG16 state dict: download {VGG16_URL} and set loss.vgg16_path to the file or its s3:// URL "
        f"(or set loss.perceptual_weight: 0 to train without it).")
    return _load_vgg_state(VGG16Features(), state, str(path))


def random_vgg16(seed: int = 0) -> VGG16Features:
    """TEST ONLY: a randomly initialised (seeded) VGG16 feature stack, for ``loss.random_backbone_for_tests``."""
    g = torch.Generator().manual_seed(seed)
    vgg = VGG16Features()
    with torch.no_grad():
        for m in vgg.features:
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * 9
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.zero_()
    return vgg


# ----------------------------------------------------------------------------------------------- losses


def pixel_loss(sr_b3hw: torch.Tensor, hr_b3hw: torch.Tensor) -> torch.Tensor:
    """mean((ŷ − y)²) over all elements (Eq. 5, first term). Scalar."""
    return F.mse_loss(sr_b3hw, hr_b3hw)


def perceptual_loss(vgg: VGG16Features, sr_b3hw: torch.Tensor, hr_b3hw: torch.Tensor) -> torch.Tensor:
    """mean((φ(ŷ) − φ(y))²), φ = VGG16 conv4_3 pre-ReLU (choice C20). Scalar.

    As GLEAN (mmagic ``PerceptualLoss(norm_img=False)``), the ImageNet normalisation ``(x − mean)/std`` is applied to the
    [-1, 1] images directly, not after mapping them to [0, 1]. The target branch runs under ``no_grad``: no graph and
    no saved activations for it (half of VGG's backward memory, and its share of the step's FLOPs). Gradients flow to
    ``sr``.
    """
    mean, std = vgg.mean.to(sr_b3hw.dtype), vgg.std.to(sr_b3hw.dtype)
    with torch.no_grad():
        f_hr = vgg((hr_b3hw.to(sr_b3hw.dtype) - mean) / std)
    return F.mse_loss(vgg((sr_b3hw - mean) / std), f_hr)


def g_adversarial_loss(d_fake: torch.Tensor, kind: str = "nonsaturating") -> torch.Tensor:
    """Generator adversarial term on D logits of the SR images (choice C19). Scalar (mean over the batch).

    - ``"nonsaturating"``: ``softplus(−D(ŷ))`` = −log σ(D(ŷ)) (GLEAN ``GANLoss('vanilla')``; default).
    - ``"saturating"``: the paper-literal ``log(1 − σ(D(ŷ)))`` = −softplus(D(ŷ)), minimised by the generator.
    """
    if kind == "nonsaturating":
        return F.softplus(-d_fake).mean()
    if kind == "saturating":
        return (-F.softplus(d_fake)).mean()
    raise ValueError(f"loss.adversarial must be 'nonsaturating' or 'saturating', got {kind!r}")


def d_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator loss ``softplus(−D(y)) + softplus(D(ŷ))`` (batch means; no R1, as GLEAN). Scalar.

    The caller passes ``d_fake = D(ŷ.detach())`` so that no gradient reaches the generator.
    """
    return F.softplus(-d_real).mean() + F.softplus(d_fake).mean()


# ----------------------------------------------------------------------------------------------- prior training (GAN)


def r1_penalty(d_real: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """R1 (Mescheder et al.): mean over the batch of ``|∇_x D(x)|²`` at real images ``real`` (which must require grad and
    produce ``d_real``); differentiable (create_graph) so that it can be minimised. Scalar."""
    (grad,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def path_lengths(img: torch.Tensor, wplus: torch.Tensor) -> torch.Tensor:
    """StyleGAN2 path lengths ``|J_w^T y|`` (B,) for y ~ N(0, 1/(H W)) image-space noise; ``img`` (B, 3, H, W) made
    from ``wplus`` (B, N, S), which must require grad. Differentiable (create_graph)."""
    noise = torch.randn_like(img) / math.sqrt(img.shape[2] * img.shape[3])
    (grad,) = torch.autograd.grad((img * noise).sum(), wplus, create_graph=True)
    return grad.pow(2).sum(2).mean(1).sqrt()
