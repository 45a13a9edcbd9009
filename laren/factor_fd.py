"""A prior-quality metric that needs no downloaded network: the factor Fréchet distance (factor-FD).

A small CNN, the *factor regressor*, is trained on the real images of a synthetic set (`laren data synth`) to predict
their generative factors: continuous ones scaled to [-1, 1] (MSE), discrete ones as classes (cross-entropy). Its
penultimate layer (FEATURES wide) is then a feature space that knows what the factors look like, in which

    factor-FD = |mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^1/2)

compares real and generated images as FID does with Inception features. Held-out accuracy of the regressor (R^2 of the
continuous factors, accuracy of the discrete ones) says how much the feature space can see.

Legend: N images, F factors, images (N, 3, R, R) in [-1, 1].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FEATURES = 128


class FactorRegressor(nn.Module):
    """Four 3x3 convs (stride 2 from the second) -> linear FEATURES -> one head per factor kind."""

    def __init__(self, resolution: int, specs: list[dict[str, Any]], width: int = 32):
        super().__init__()
        self.specs = specs
        self.cont = [i for i, s in enumerate(specs) if s["kind"] == "continuous"]
        self.disc = [i for i, s in enumerate(specs) if s["kind"] == "discrete"]
        self.classes = [len(specs[i]["values"]) for i in self.disc]
        lo = torch.tensor([specs[i]["range"][0] for i in self.cont], dtype=torch.float32)
        hi = torch.tensor([specs[i]["range"][1] for i in self.cont], dtype=torch.float32)
        self.register_buffer("lo", lo)
        self.register_buffer("hi", hi)
        c = [width, 2 * width, 4 * width, 4 * width]
        self.convs = nn.Sequential(
            nn.Conv2d(3, c[0], 3, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c[0], c[1], 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c[1], c[2], 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.Conv2d(c[2], c[3], 3, stride=2, padding=1), nn.LeakyReLU(0.2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(c[3] * 16, FEATURES), nn.LeakyReLU(0.2),
        )
        self.head = nn.Linear(FEATURES, len(self.cont) + sum(self.classes))

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """(N, 3, R, R) -> (N, FEATURES)."""
        return self.convs(img)

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (continuous predictions in [-1, 1] units (N, Fc), [class logits (N, K_j)] per discrete factor)."""
        out = self.head(self.features(img))
        return out[:, : len(self.cont)], list(out[:, len(self.cont):].split(self.classes, dim=1))

    def targets(self, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, F) raw factors -> (continuous scaled to [-1, 1], discrete class indices (N, Fd) long)."""
        cont = (factors[:, self.cont] - self.lo) / (self.hi - self.lo) * 2 - 1
        return cont, factors[:, self.disc].round().long()

    def loss(self, img: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        pc, logits = self(img)
        tc, td = self.targets(factors)
        ce = sum(F.cross_entropy(lg, td[:, j]) for j, lg in enumerate(logits))
        return F.mse_loss(pc, tc) + ce / max(1, len(logits))


def to_unit(images_uint8: np.ndarray) -> torch.Tensor:
    """(N, R, R, 3) uint8 -> (N, 3, R, R) float in [-1, 1]."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_regressor(images: torch.Tensor, factors: torch.Tensor, specs: list[dict[str, Any]], steps: int,
                    seed: int = 0, batch: int = 64, lr: float = 2e-3) -> FactorRegressor:
    """Fit a FactorRegressor to (images, factors) with Adam; deterministic for a seed. Returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = FactorRegressor(images.shape[-1], specs)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        for g in opt.param_groups:  # cosine decay: a stable end point
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, images.shape[0], (min(batch, images.shape[0]),), generator=gen)
        loss = net.loss(images[idx], factors[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def factor_accuracy(net: FactorRegressor, images: torch.Tensor, factors: torch.Tensor) -> dict[str, float]:
    """Held-out quality of the regressor: {"r2/<name>", "acc/<name>", "r2_mean", "acc_mean"}."""
    pc, logits = net(images)
    tc, td = net.targets(factors)
    out: dict[str, float] = {}
    for j, i in enumerate(net.cont):
        var = tc[:, j].var(unbiased=False).clamp_min(1e-12)
        out[f"r2/{net.specs[i]['name']}"] = float(1 - (pc[:, j] - tc[:, j]).pow(2).mean() / var)
    for j, i in enumerate(net.disc):
        out[f"acc/{net.specs[i]['name']}"] = float((logits[j].argmax(1) == td[:, j]).float().mean())
    for kind in ("r2", "acc"):
        vals = [v for k, v in out.items() if k.startswith(kind + "/")]
        out[f"{kind}_mean"] = float(np.mean(vals)) if vals else float("nan")
    return out


@torch.no_grad()
def feature_stats(net: FactorRegressor, images: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(mean (FEATURES,), covariance (FEATURES, FEATURES)) of the features of ``images``, float64."""
    feats = torch.cat([net.features(images[i: i + batch]) for i in range(0, images.shape[0], batch)]).double().numpy()
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians; the trace of (S1 S2)^1/2 from the eigenvalues of S1^1/2 S2 S1^1/2 (symmetric,
    PSD: no complex matrix square root)."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
