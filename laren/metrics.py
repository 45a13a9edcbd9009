"""Evaluation metrics (model-spec section 7): PSNR, SSIM, LPIPS (AlexNet v0.1), latent correlation maps, DCI.

Legend: B batch, 3 RGB, H×W image size, N samples, Da/Db latent widths, d code dims, K attributes.
Images enter as float tensors in [-1, 1]; per-image metrics return (B,) float64 tensors (the caller averages).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from laren.models.state_dict import load_strict, read_torch_state_dict

ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"


def to_uint8_range(x_b3hw: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> the uint8 values 0..255 (float64), exactly as mmagic ``tensor2img(min_max=(-1, 1))``: clamp, map to
    [0, 1], ×255, round (float32 arithmetic, then float64 for the metric)."""
    x = x_b3hw.detach().float().clamp(-1.0, 1.0)
    return ((x + 1.0) / 2.0 * 255.0).round().double()


def psnr(sr_b3hw: torch.Tensor, hr_b3hw: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``10·log10(255² / MSE)`` over H×W×3 of the uint8-rounded RGB images, no border crop, no
    Y channel (mmagic/GLEAN RGB evaluation). Identical images give +inf. Returns (B,)."""
    a, b = to_uint8_range(sr_b3hw), to_uint8_range(hr_b3hw)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = size // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size), sums to 1


def ssim(sr_b3hw: torch.Tensor, hr_b3hw: torch.Tensor, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004) on the uint8-rounded RGB images (range L = 255), averaged over channels.

    Gaussian window 11×11, σ = 1.5, population (not sample) covariances, C1 = (k1·L)², C2 = (k2·L)²; the SSIM map is
    averaged over the positions where the window fits inside the image. This equals scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``, which
    crops (win−1)/2 border pixels before averaging. Images must be at least 11×11. Returns (B,).
    """
    x, y = to_uint8_range(sr_b3hw), to_uint8_range(hr_b3hw)
    c = x.shape[1]
    if min(x.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {tuple(x.shape[-2:])}")
    w = _gaussian_window().to(x.device).expand(c, 1, 11, 11)

    def filt(t: torch.Tensor) -> torch.Tensor:  # depthwise 'valid' Gaussian filter
        return F.conv2d(t, w, groups=c)

    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1, c2 = (k1 * 255.0) ** 2, (k2 * 255.0) ** 2
    s_map = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s_map.flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------- LPIPS


class AlexNetFeatures(nn.Module):
    """torchvision ``alexnet().features`` with its indices (``features.0`` … ``features.12``), so the ``features.N.*``
    keys of ``alexnet-owt-7be5be79.pth`` load unchanged. ``forward`` returns the five LPIPS taps: the ReLU outputs after
    conv1..conv5 (indices 1, 4, 7, 9, 11), widths 64, 192, 384, 256, 256."""

    TAPS = (1, 4, 7, 9, 11)
    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )

    def forward(self, x_b3hw: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        h = x_b3hw
        for i, layer in enumerate(self.features[: self.TAPS[-1] + 1]):
            h = layer(h)
            if i in self.TAPS:
                taps.append(h)
        return taps


def lpips_weights_path() -> Path:
    """``lpips/weights/v0.1/alex.pth`` of the installed ``lpips`` package (located without importing it, since the
    package imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "LPIPS linear-layer weights not found: the `lpips` package is not installed. Install it without its "
            "dependencies (`pip install --no-deps lpips==0.1.4`); only its weights/v0.1/alex.pth file is read."
        )
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "v0.1" / "alex.pth"
    if not p.is_file():
        raise FileNotFoundError(f"LPIPS linear-layer weights not found at {p}; reinstall the `lpips` package.")
    return p


class LPIPS(nn.Module):
    """LPIPS distance, AlexNet trunk, version 0.1 (Zhang et al. 2018; ``lpips.LPIPS(net='alex', version='0.1')``).

    d(x, y) = Σ_l mean_hw( w_l · (x̂_l − ŷ_l)² ), x̂_l the channel-unit-normalised tap l of the AlexNet features of the
    scaled input ``(x − shift)/scale``; w_l the non-negative 1×1 linear weights of LPIPS v0.1. Inputs in [-1, 1];
    returns (B,). The network is frozen and always in eval mode.

    Weights: the AlexNet trunk from ``alexnet_path`` (torchvision's ImageNet ``alexnet-owt-7be5be79.pth``, given by the
    user as ``eval.alexnet_path``), the linear layers from the ``lpips`` package's ``alex.pth`` (or ``lin_path``).
    ``random_backbone_for_tests=True`` uses a seeded random trunk instead (tests only).
    """

    def __init__(
        self,
        alexnet_path: Optional[str | Path] = None,
        *,
        lin_path: Optional[str | Path] = None,
        random_backbone_for_tests: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if random_backbone_for_tests:
            with torch.random.fork_rng(devices=[]):  # nn default init, reproducible, global RNG untouched
                torch.manual_seed(seed)
                self.net = AlexNetFeatures()
        else:
            if alexnet_path is None:
                raise ValueError(
                    "eval.alexnet_path is not set: LPIPS needs torchvision's ImageNet AlexNet state dict "
                    f"(alexnet-owt-7be5be79.pth from {ALEXNET_URL})."
                )
            self.net = load_alexnet(alexnet_path)
        self.lins = nn.ParameterList(
            [nn.Parameter(torch.zeros(1, c, 1, 1), requires_grad=False) for c in AlexNetFeatures.CHANNELS]
        )
        lin = torch.load(Path(lin_path) if lin_path else lpips_weights_path(), map_location="cpu", weights_only=True)
        for i, p in enumerate(self.lins):
            p.data.copy_(lin[f"lin{i}.model.1.weight"])
        # ScalingLayer of LPIPS v0.1: maps [-1, 1] inputs onto ImageNet statistics.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)

    def forward(self, x_b3hw: torch.Tensor, y_b3hw: torch.Tensor) -> torch.Tensor:
        n = x_b3hw.shape[0]
        both = torch.cat([x_b3hw, y_b3hw], dim=0)
        taps = self.net((both - self.shift) / self.scale)
        total = torch.zeros(n, dtype=torch.float64, device=x_b3hw.device)
        for f_2bchw, w in zip(taps, self.lins):
            f = f_2bchw / (f_2bchw.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)  # unit-normalise channels
            fx, fy = f[:n], f[n:]
            d_bhw = ((fx - fy) ** 2 * w).sum(dim=1)  # 1x1 linear layer without bias
            total = total + d_bhw.mean(dim=(1, 2)).double()
        return total


def load_alexnet(path: str | Path) -> AlexNetFeatures:
    """The AlexNet feature stack of LPIPS from torchvision's ImageNet AlexNet state dict (``eval.alexnet_path``: a
    local file or an s3:// URL, cached once per node), read with ``weights_only=True``."""
    state = read_torch_state_dict(
        path, f"AlexNet weights not found: {path} (eval.alexnet_path). LPIPS needs torchvision's ImageNet AlexNet "
        f"state dict: download {ALEXNET_URL} and set eval.alexnet_path to the file or its s3:// URL (or leave it unset "
        "to skip LPIPS).")
    net = AlexNetFeatures()
    # classifier.* ignored
    load_strict(net, state, f"{path}: not a torchvision AlexNet state dict; use {ALEXNET_URL}",
                ignore_unexpected=True)
    return net




# ----------------------------------------------------------------------------------------------- latent analysis


def latent_correlation(a_nda, b_ndb) -> np.ndarray:
    """|Pearson ρ| between every dimension of ``a`` and every dimension of ``b`` across the N samples (Fig. 7 maps).

    ``ρ_ij = cov(a_i, b_j) / (σ_ai σ_bj)``, population moments in float64. A constant dimension has no defined
    correlation and gets 0. Returns (Da, Db) in [0, 1]; ``latent_correlation(z, z)[15:20, 0:15]`` (0-based) is the paper's 5×15 map.
    """
    a = np.asarray(a_nda.detach().cpu() if torch.is_tensor(a_nda) else a_nda, dtype=np.float64)
    b = np.asarray(b_ndb.detach().cpu() if torch.is_tensor(b_ndb) else b_ndb, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or a.shape[0] < 2:
        raise ValueError(f"latent_correlation expects (N, Da) and (N, Db) with the same N >= 2, got {a.shape}, {b.shape}")
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    sa, sb = np.sqrt((a * a).mean(axis=0)), np.sqrt((b * b).mean(axis=0))
    cov = a.T @ b / a.shape[0]
    denom = np.outer(sa, sb)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(denom > 0, cov / np.where(denom > 0, denom, 1.0), 0.0)
    return np.clip(np.abs(rho), 0.0, 1.0)


def _entropy_rows(p: np.ndarray, base: int) -> np.ndarray:
    """Entropy of each row of ``p`` with log base ``base``; 1e-11 inside the log (StyleSpace / Eastwood)."""
    return -(p * np.log(p + 1e-11)).sum(axis=1) / math.log(base)


def dci(r_dk, accuracies_k) -> dict[str, float]:
    """Disentanglement, completeness, informativeness (Eastwood & Williams 2018, StyleSpace protocol; spec 7 step 7).

    ``r_dk`` (d, K): importance of code dim i for attribute k (``|feature_importances_|`` of one classifier per k).
    - D = Σ_i ρ_i (1 − H_K(P_i·)),  P_ik = R_ik / Σ_k R_ik,  ρ_i = Σ_k R_ik / Σ R
    - C = Σ_k ρ̃_k (1 − H_d(P̃_·k)), P̃_ik = R_ik / Σ_i R_ik, ρ̃_k = Σ_i R_ik / Σ R
    - I = mean_k acc_k
    A row (column) with zero total importance has weight 0, so it does not count. Needs d ≥ 2 and K ≥ 2.
    """
    r = np.abs(np.asarray(r_dk, dtype=np.float64))
    acc = np.asarray(accuracies_k, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise ValueError(f"dci expects an importance matrix (d, K) with d, K >= 2, got shape {r.shape}")
    if acc.shape != (r.shape[1],):
        raise ValueError(f"dci: {acc.shape[0] if acc.ndim else 0} accuracies for {r.shape[1]} attributes")
    total = r.sum()
    if total <= 0:
        raise ValueError("dci: the importance matrix is all zero")
    d, k = r.shape
    row_sum = r.sum(axis=1, keepdims=True)
    col_sum = r.sum(axis=0, keepdims=True)
    p_rows = r / np.where(row_sum > 0, row_sum, 1.0)
    p_cols = (r / np.where(col_sum > 0, col_sum, 1.0)).T  # (K, d)
    disent = float(((row_sum[:, 0] / total) * (1.0 - _entropy_rows(p_rows, k))).sum())
    complete = float(((col_sum[0] / total) * (1.0 - _entropy_rows(p_cols, d))).sum())
    return {"D": disent, "C": complete, "I": float(acc.mean())}
