"""Code Generation Module (CGM): g_1..g_N -> image-specific codes c_n -> per-layer noise maps (paper III-C, Eq. 3-4;
model-spec 2.3 and 5, choices C9-C15).

Legend: B batch, H latent width, F code width, N_c codes = the generator's noise inputs, L = H (n = 2) or H + F (n >= 3).

ReRR (recursive relation reasoning), the default. n counts from 1; g_n = g[:, n-1]:
    q_n = W_Q g_n + b_Q (B, H);  k_n = W_K g_n + b_K (B, F);  R_n = q_n k_n^T (B, H, F)      shared W_Q, W_K       [C12]
    T^1 = softmax_dim1(R_1) (B, H, F);  c_1 = delta((T^1)^T g_1) (B, F)                       norm over inputs      [C10, C11]
    n >= 2: M_n = W_t^{n-1} T^{n-1} (B, F, F), with W_t^{n-1} in R^{F x L} (no bias)
            T^n = softmax_dim1([M_n ; R_n]) (B, F+H, F)        "||" read as row concatenation                     [C9]
            c_n = delta((T^n)^T [c_{n-1} || g_n]) (B, F)
VRR (Table IV "CGM(VRR)"): T^n = softmax_dim1(R_n) and c_n = delta((T^n)^T g_n) for every n; no W_t, independent layers.

delta (model-spec 9, R1): LeakyReLU(0.2), StyleGAN's activation, by default; ReLU (``activation="relu"``) is the
paper-literal reading. Why: at initialisation R_n is small, so T is near uniform (max T ~ 1/H) and
(T^n)^T g_n ~ mean(g_n) in every column. Under ReLU that is exactly 0 whenever mean(g_n) < 0, which is the common case:
measured, face64x at full size in a real run's RNG order had 0 of 17 layers alive and W_Q, W_K and W_t got exactly
zero gradient; the demo job was dead in 20 of 20 seeds, and the noise maps reduced to the projections' biases, the
same for every image. LeakyReLU keeps the gradient and the image dependence on both sides of 0 (`laren model health`
prints the measured figures per job).

Projection (choice C14): noise_m = bilinear(Linear(F, s^2)(c_{m+1}).view(B, 1, s, s), res_m), with s = min(res_m, max_res).
The noise maps replace the generator's N(0, 1) noise inputs; the generator's noise strengths stay frozen [C15].
With H=512, F=64 and the 17 noise layers of a 1024 generator, this gives 10,109,136 parameters (the core is 881,216).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CodeGeneration", "CGM_ACTIVATIONS"]

CGM_ACTIVATIONS = {"leaky_relu": lambda x: F.leaky_relu(x, 0.2), "relu": F.relu}


class CodeGeneration(nn.Module):
    """CGM: latent codes g (B, N, H) with N >= N_c -> list of N_c noise maps (B, 1, res_m, res_m).

    Args:
        latent_dim: H.  code_dim: F.
        noise_resolutions: the generator's noise map sizes in generator order (N_c = len). Code c_n feeds noise n-1.
        noise_proj_max_res: s = min(res, this) for each projection; the map is then upsampled bilinearly.
        relation: "rerr" (recursive, the default) or "vrr" (vanilla, independent layers).
        activation: delta in Eqs. 3-4, "leaky_relu" (v2 default) or "relu" (paper-literal).
    """

    def __init__(
        self,
        latent_dim: int,
        code_dim: int,
        noise_resolutions: Sequence[int],
        noise_proj_max_res: int = 128,
        relation: Literal["rerr", "vrr"] = "rerr",
        activation: Literal["leaky_relu", "relu"] = "leaky_relu",
    ):
        super().__init__()
        if relation not in ("rerr", "vrr"):
            raise ValueError(f"relation must be 'rerr' or 'vrr', got {relation!r}")
        if activation not in CGM_ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(CGM_ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self._delta = CGM_ACTIVATIONS[activation]
        if not noise_resolutions:
            raise ValueError("noise_resolutions is empty: the generator has no noise inputs")
        self.latent_dim, self.code_dim, self.relation = latent_dim, code_dim, relation
        self.noise_resolutions = [int(r) for r in noise_resolutions]
        self.num_codes = len(self.noise_resolutions)
        self.proj_sizes = [min(r, noise_proj_max_res) for r in self.noise_resolutions]
        H, Fd = latent_dim, code_dim
        self.query = nn.Linear(H, H)  # W_Q
        self.key = nn.Linear(H, Fd)  # W_K
        self.transition = nn.ParameterList()  # W_t^{n-1}, n = 2..N_c: (F, H) then (F, H+F)
        if relation == "rerr":
            for n in range(2, self.num_codes + 1):
                L = H if n == 2 else H + Fd
                w = nn.Parameter(torch.empty(Fd, L))
                nn.init.uniform_(w, -1.0 / math.sqrt(L), 1.0 / math.sqrt(L))
                self.transition.append(w)
        self.proj = nn.ModuleList(nn.Linear(Fd, s * s) for s in self.proj_sizes)

    def relation_logits(self, g_BH: Tensor) -> Tensor:
        """R_n = (W_Q g_n)(W_K g_n)^T: (B, H, F)."""
        return torch.einsum("bi,bf->bif", self.query(g_BH), self.key(g_BH))

    def codes(self, g_BNH: Tensor, stats: Optional[dict[str, list[Tensor]]] = None) -> Tensor:
        """c_1..c_{N_c}: (B, N_c, F). With ``stats`` (a dict), appends per layer the share of positive
        pre-activations (``live``: units ReLU would pass) and the max of T (``t_max``), as 0-dim tensors on the
        model's device (no host sync: the caller reads them all at once)."""
        if g_BNH.shape[1] < self.num_codes:
            raise ValueError(f"CGM needs >= {self.num_codes} latent codes, got g of shape {tuple(g_BNH.shape)}")
        codes = []
        T_prev = c_prev = None
        for n in range(1, self.num_codes + 1):
            g_n = g_BNH[:, n - 1]
            R_BHF = self.relation_logits(g_n)
            if self.relation == "vrr" or n == 1:
                T = torch.softmax(R_BHF, dim=1)  # (B, H, F)
                x = g_n  # (B, H)
            else:
                M_BFF = torch.einsum("fl,blk->bfk", self.transition[n - 2], T_prev)  # W_t^{n-1} T^{n-1}
                T = torch.softmax(torch.cat([M_BFF, R_BHF], dim=1), dim=1)  # (B, F+H, F)
                x = torch.cat([c_prev, g_n], dim=1)  # (B, F+H)
            pre = torch.einsum("bif,bi->bf", T, x)
            if stats is not None:
                stats.setdefault("live", []).append((pre > 0).float().mean())
                stats.setdefault("t_max", []).append(T.amax())
            c = self._delta(pre)
            codes.append(c)
            T_prev, c_prev = T, c
        return torch.stack(codes, dim=1)

    def noise_maps(self, codes_BNcF: Tensor) -> list[Tensor]:
        """Project code c_{m+1} to noise map m: (B, 1, res_m, res_m)."""
        B = codes_BNcF.shape[0]
        out = []
        for m, (res, s, proj) in enumerate(zip(self.noise_resolutions, self.proj_sizes, self.proj)):
            x = proj(codes_BNcF[:, m]).view(B, 1, s, s)
            if s != res:
                x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
            out.append(x)
        return out

    def forward(self, g_BNH: Tensor) -> list[Tensor]:
        return self.noise_maps(self.codes(g_BNH))
