"""Graph Disentangled Module (GDM): z -> N disentangled latent codes g_1..g_N (paper III-B, Eq. 1-2; model-spec 2.2 and 5).

Legend (shapes in names and comments):
    B batch, H latent width (z and each g_n), N codes (generator style inputs), D = N*H attributes,
    J graph nodes, C node width, P = J*(J-1) ordered node pairs (i != j, i-major), Omega ConvKB filters,
    Dc attributes in one chunk.

HMRR (hierarchical multi-relation reasoning), the default:
    U      = (W_U z + b_U).view(B, J, C)                                       one W_U in R^{JC x H}            [C1]
    A_pd   = ReLU(W_attr [u_i || u_j] + b_attr)_d                              W_attr in R^{D x 2C}              [paper Eq. 1]
    r_pd   = Softmax_D(A / nu_p + P)_d, P = -inf where A == 0                  rows with A == 0 give r = 0      [C3, C4]
             nu_p = std of A_p over its support (default, "std"), its rms there (spec v2, "rms"),
                    or ||A_p||_2 (v1, paper-literal, "l2")                                              [spec 9 R2]
    rho    = kappa * r, kappa = D by default (paper-literal 1)                                                   [C5]
    h      = ReLU(theta_1 u_ik + theta_2 rho_pd + theta_3 u_jk + beta_w)        ConvKB 1x3 conv, Omega filters    [C6]
    g_d    = mean_p sum_{w,k} w_{wk} h[p, d, w, k]                                                               [C7, C8]

Why "std" (model-spec 9, R2, measured with `laren model health`): with nu = ||A_p||_2 over ~4,600 support entries
every logit is ~0.015, the softmax is flat on the support, and rho ~ 2*1[A > 0]: the mask explains 99.9 % of rho's
variance, so W_attr learns only through a remainder the size of bf16 rounding. The spec's v2 divides by the RMS over
the support (= ||A_p||_2 / sqrt(|support|)): O(1) logits, and with z ~ N(0, 1) the mask explains 41 % of rho's
variance. But z from the real encoder at initialisation is small (std ~0.04), u is then dominated by W_U's bias, and
the mask still explains 66 % (face64x) and 64 % (demo), above the 60 % criterion. The standard deviation over the
support standardises the logits (the softmax ignores their mean): 42 % for face64x at the same init. "rms" and "l2"
remain as switches.

Memory: the (B, P, D, Omega, C) tensor h is never built (in HMRR not even per chunk: below), and neither are the
full (B, P, D) tensors A, X-hat or r.
The attribute axis is processed in chunks of Dc under ``torch.utils.checkpoint``. The softmax over D needs per-pair
normalisers (the support size, the sum of squares, the max, then the sum of exponentials, which depends on the
first three). They are gathered in two cheap chunked statistics passes (each chunk only (B, P, Dc)). A third pass
then forms the ConvKB features chunk by chunk. The softmax is computed stably: the logits are shifted by their
per-pair maximum over the support (a constant: no gradient through it, and the softmax is shift-invariant).
The efficient ConvKB form precomputes alpha_i + gamma_j = theta_1 u_i + beta + theta_3 u_j once per pair,
as (B, P, Omega, C).

ConvKB's sum without its (B, P, Dc, Omega, C) tensor: for one pair p and filter o, with c_k = base[p, o, k] and
q = theta_2[o] * rho_pd, the score sum_k w_ok ReLU(c_k + q) is a piecewise-linear function of the scalar q. Unit k
is active iff c_k > -q, so the active units are the first m of the units sorted by c descending, m = #{k: -c_k < q}
(a search among C sorted values), and the score is S_m + q * W_m with the prefix sums S_m = sum_{k<m} w_k c_k and
W_m = sum_{k<m} w_k. Sorting once per pair and filter (B, P, Omega, C), each (p, d, o) then costs a search and two
lookups instead of C units: the same function (float64 agrees to ~1e-15), 2-3x faster forward and backward on CPU
at the paper's widths, and 2.4x less peak memory in a chunked GDM (benchmarks/RESULTS.md). Its gradient is ReLU's:
units at c_k + q == 0 are inactive in both (``searchsorted`` counts -c_k < q strictly).

VRR (vanilla relation reasoning, Table IV "GDM(VRR)", spec section 5): a scalar adjacency per pair,
    s_ij = ReLU(w_r^T [u_i || u_j] + b_r),  a_ij = Softmax_{j != i}(s_ij / nu_i + P_ij),  rho = (J-1) a,
which is shared by every sub-graph d (nu_i as in HMRR: the rms or the L2 norm of s_i. over its support).
The attribute comes in only through a learned relation-type embedding E in R^{D x C}: the triple is
[u_i, rho_ij e_d, u_j]. The ConvKB extractor is the same.
b_r starts at 0 (model-spec 9, R3): with PyTorch's default uniform bias, b_r outweighed w_r^T x on every pair in
4 of 10 seeds, so every s_ij was 0, rho was 0 and g was one number repeated over all D attributes. At b_r = 0 the
sign of w_r^T [u_i || u_j] varies over the pairs, so about half of them start on the support.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ConvKB", "GraphDisentangle", "GraphDisentangleVRR", "ordered_pairs", "convkb_sorted", "convkb_mean_score",
           "RELATION_LOGITS", "mask_variance_share"]

RELATION_LOGITS = ("std", "rms", "l2")  # the normaliser nu of the relation logits: default, spec v2, v1 paper-literal


def ordered_pairs(num_nodes: int) -> tuple[Tensor, Tensor]:
    """Indices (i, j) of all ordered pairs with i != j, i-major: p = i*(J-1) + (rank of j among j != i). Each (P,)."""
    p = torch.arange(num_nodes * (num_nodes - 1))
    i, rank = p // (num_nodes - 1), p % (num_nodes - 1)
    return i, rank + (rank >= i).long()  # arithmetic only (no boolean masking), so it also builds on the meta device


class ConvKB(nn.Module):
    """ConvKB attribute extractor f (Nguyen et al. 2018), shared across the D sub-graphs (choice C6).

    A triple matrix [u_i, rel, u_j] in R^{C x 3} is convolved with Omega filters of size 1x3 (theta (Omega, 3), bias beta),
    passed through a ReLU, and scored with w in R^{Omega*C} (no bias). Parameters: Omega*3 + Omega + Omega*C.
    """

    def __init__(self, node_dim: int, filters: int):
        super().__init__()
        self.node_dim, self.filters = node_dim, filters
        self.theta = nn.Parameter(torch.empty(filters, 3))  # (Omega, 3): columns act on u_i, rel, u_j
        self.beta = nn.Parameter(torch.empty(filters))  # (Omega,)
        self.w = nn.Parameter(torch.empty(filters, node_dim))  # (Omega, C)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # The defaults of Conv2d(1, Omega, (1, 3)) and Linear(Omega*C, 1): fan_in 3 and Omega*C.
        b = 1.0 / math.sqrt(3)
        self.theta.uniform_(-b, b)
        self.beta.uniform_(-b, b)
        b = 1.0 / math.sqrt(self.filters * self.node_dim)
        self.w.uniform_(-b, b)

    def pair_base(self, u_BJC: Tensor, i_P: Tensor, j_P: Tensor) -> Tensor:
        """alpha_i + gamma_j = theta_1 u_i + beta + theta_3 u_j, per ordered pair: (B, P, Omega, C)."""
        th1 = self.theta[:, 0, None]  # (Omega, 1)
        th3 = self.theta[:, 2, None]
        alpha_BJOC = th1 * u_BJC[:, :, None, :] + self.beta[:, None]
        gamma_BJOC = th3 * u_BJC[:, :, None, :]
        return alpha_BJOC[:, i_P] + gamma_BJOC[:, j_P]


def convkb_sorted(base_BPOC: Tensor, w_OC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ConvKB's units per pair and filter sorted by c = base descending (module docstring): -c ascending (no
    gradient: it only locates q), and the prefix sums S_m = sum_{k<m} w_k c_k and W_m = sum_{k<m} w_k, m = 0..C.
    Shapes (B, P, Omega, C), (B, P, Omega, C+1), (B, P, Omega, C+1)."""
    negc_BPOC, order_BPOC = torch.sort(-base_BPOC.detach(), dim=-1)
    w_BPOC = w_OC.expand_as(base_BPOC).gather(-1, order_BPOC)
    wc_BPOC = w_BPOC * base_BPOC.gather(-1, order_BPOC)
    zero = base_BPOC.new_zeros(base_BPOC.shape[:-1] + (1,))
    return negc_BPOC, torch.cat([zero, wc_BPOC.cumsum(-1)], -1), torch.cat([zero, w_BPOC.cumsum(-1)], -1)


def convkb_mean_score(negc_BPOC: Tensor, s_BPOC1: Tensor, w_BPOC1: Tensor, theta2_O: Tensor, rho_BPDc: Tensor) -> Tensor:
    """mean_p sum_{o,k} w_ok ReLU(c_pok + theta_2o rho_pd), (B, Dc), from :func:`convkb_sorted`'s sorted units: the
    active units of (p, o, d) are the first m, m = #{k: -c_k < q} with q = theta_2o rho_pd, and their sum is
    S_m + q W_m (module docstring)."""
    q_BPODc = theta2_O[:, None] * rho_BPDc[:, :, None, :]
    m_BPODc = torch.searchsorted(negc_BPOC, q_BPODc)  # strictly: a unit at c_k + q == 0 is inactive, as in ReLU
    score = s_BPOC1.gather(-1, m_BPODc).sum((1, 2)) + (q_BPODc * w_BPOC1.gather(-1, m_BPODc)).sum((1, 2))
    return score / negc_BPOC.shape[1]


def _maybe_checkpoint(enabled: bool, fn, *args):
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def _chunks(total: int, size: int):
    for start in range(0, total, size):
        yield start, min(start + size, total)


def _logit_norm(sumsq: Tensor, total: Tensor, support: Tensor, mode: str) -> Tensor:
    """nu from the sum of squares, the sum and the support size of the non-negative scores: their standard deviation
    (``std``) or RMS (``rms``) over the support, or their L2 norm (``l2``); eps 1e-12 (the sqrt of a clamp keeps the
    gradient finite at 0). Logits scaled by 1/nu stay bounded after the max shift: |A - max A| <= 2 sqrt(n) std."""
    if mode == "l2":
        return torch.sqrt(sumsq.clamp_min(1e-24))
    n = support.clamp_min(1.0)
    msq = sumsq / n
    if mode == "std":
        msq = msq - (total / n).square()
    return torch.sqrt(msq.clamp_min(1e-24))


def _rho_sums(rho: Tensor) -> Tensor:
    """(support size, sum, sum of squares) of a float64 rho, as one tensor on its device."""
    return torch.stack([(rho > 0).sum(), rho.sum(), rho.square().sum()])


def relation_figures(count: int, support: float, s1: float, s2: float) -> dict[str, float]:
    """The health figures of rho from its sums (``relation_sums``): ``mask_share`` and ``support_share``."""
    return {"mask_share": mask_variance_share(count, support, s1, s2), "support_share": support / count}


def mask_variance_share(count: float, support: float, s1: float, s2: float) -> float:
    """Share of the variance of rho (>= 0, exactly 0 off the support) that the support mask 1[rho > 0] explains:
    the between-group sum of squares over the total, from the counts of all entries and of the support entries and
    the sums of rho and rho^2. 1.0 means rho is a binary gate; 0 means the mask explains nothing."""
    mean = s1 / count
    total = s2 - count * mean * mean
    if support <= 0 or total <= 0:
        return 1.0
    m1 = s1 / support
    between = support * (m1 - mean) ** 2 + (count - support) * mean * mean
    return float(between / total)


class _GraphBase(nn.Module):
    """What HMRR and VRR share: the arguments (see :class:`GraphDisentangle`), their checks, the ordered node pairs,
    kappa, the node projection W_U and U = nodes(z).

    Each subclass then creates the rest of its parameters in :meth:`_build`; ``node_proj`` (W_U) is the first
    parameter of both, and the order of creation is the order of the random initialisation.
    """

    def __init__(
        self,
        latent_dim: int,
        num_nodes: int,
        node_dim: int,
        num_codes: int,
        convkb_filters: int = 8,
        relation_scale: Optional[float] = None,
        chunk_size: int = 256,
        checkpoint_chunks: bool = True,
        relation_logits: str = "std",
    ):
        super().__init__()
        if relation_logits not in RELATION_LOGITS:
            raise ValueError(f"relation_logits must be one of {RELATION_LOGITS}, got {relation_logits!r}")
        self.relation_logits = relation_logits
        if num_nodes < 2:
            raise ValueError(f"num_nodes must be >= 2 (a graph needs node pairs), got {num_nodes}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.latent_dim, self.num_nodes, self.node_dim, self.num_codes = latent_dim, num_nodes, node_dim, num_codes
        self.num_attributes = num_codes * latent_dim  # D
        self.chunk_size, self.checkpoint_chunks = chunk_size, checkpoint_chunks
        i_P, j_P = ordered_pairs(num_nodes)
        self.register_buffer("pair_i", i_P, persistent=False)
        self.register_buffer("pair_j", j_P, persistent=False)
        self.relation_scale = float(self._default_relation_scale() if relation_scale is None else relation_scale)
        self.node_proj = nn.Linear(latent_dim, num_nodes * node_dim)  # W_U, b_U  (JC x H)
        self._build(convkb_filters)

    def _default_relation_scale(self) -> float:
        """kappa when relation_scale is None."""
        raise NotImplementedError

    def _build(self, convkb_filters: int) -> None:
        """Create the parameters after W_U."""
        raise NotImplementedError

    @property
    def num_pairs(self) -> int:
        return self.num_nodes * (self.num_nodes - 1)

    def nodes(self, z_BH: Tensor) -> Tensor:
        """U = (W_U z + b_U).view(B, J, C)."""
        return self.node_proj(z_BH).view(z_BH.shape[0], self.num_nodes, self.node_dim)

    def relation_stats(self, z_BH: Tensor) -> dict[str, float]:
        """Health figures of rho (model-spec 9, R2/R4) from the subclass's ``relation_sums`` (one host read): the
        mask's share of its variance and the support's share of the entries."""
        count, sums = self.relation_sums(z_BH)
        return relation_figures(count, *sums.tolist())


class GraphDisentangle(_GraphBase):
    """GDM with hierarchical multi-relation reasoning (HMRR): z (B, H) -> g (B, N, H), with D = N*H.

    Args:
        latent_dim: H, the width of z and of each g_n.
        num_nodes: J.  node_dim: C.  num_codes: N (the generator's number of style inputs).
        convkb_filters: Omega.
        relation_scale: kappa in rho = kappa * r. None means D (choice C5); 1.0 is the paper-literal reading.
        chunk_size: attributes per chunk (Dc). Peak memory scales with B*P*Dc*Omega, not with D.
        checkpoint_chunks: recompute each chunk in backward, so the memory stays flat in D during training too.
        relation_logits: the normaliser nu of the logits: "std" (default), "rms" (spec v2) or "l2" (v1, paper-literal).

    Parameters: J*C*H + J*C + 2C*D + D + Omega*4 + Omega*C (419,424 for H=512, N=18, J=64, C=8, Omega=8).
    """

    def _default_relation_scale(self) -> float:
        return self.num_attributes  # kappa = D (choice C5)

    def _build(self, convkb_filters: int) -> None:
        self.attr = nn.Linear(2 * self.node_dim, self.num_attributes)  # W_attr, b_attr  (D x 2C)
        self.convkb = ConvKB(self.node_dim, convkb_filters)

    # -- chunk kernels (pure functions of their tensor inputs so that checkpoint can recompute them) --------------

    def _attr_chunk(self, u_BJC: Tensor, w_DcC2: Tensor, b_Dc: Tensor) -> Tensor:
        """A = ReLU(W_attr [u_i || u_j] + b) for one chunk of attributes: (B, P, Dc).

        Computed as the sum of a left term on u_i and a right term on u_j (J*Dc each), gathered per pair.
        """
        C = self.node_dim
        left_BJDc = u_BJC @ w_DcC2[:, :C].T
        right_BJDc = u_BJC @ w_DcC2[:, C:].T
        return F.relu(left_BJDc[:, self.pair_i] + right_BJDc[:, self.pair_j] + b_Dc)

    def _moments_chunk(self, u_BJC, w_DcC2, b_Dc):
        a_BPDc = self._attr_chunk(u_BJC, w_DcC2, b_Dc)
        return torch.stack([a_BPDc.square().sum(-1), a_BPDc.sum(-1)])  # (2, B, P): sum of squares, sum

    @staticmethod
    def _exp_logits(a_BPDc, norm_BP, shift_BP):
        """exp(X-hat - max X-hat) on the support only (P = -inf elsewhere); <= 1, so it cannot overflow."""
        return torch.where(a_BPDc > 0, torch.exp(a_BPDc / norm_BP[..., None] - shift_BP[..., None]), 0.0)

    def _sumexp_chunk(self, u_BJC, w_DcC2, b_Dc, norm_BP, shift_BP):
        return self._exp_logits(self._attr_chunk(u_BJC, w_DcC2, b_Dc), norm_BP, shift_BP).sum(-1)  # (B, P)

    def _rho_chunk(self, a_BPDc, norm_BP, shift_BP, sumexp_BP):
        return self.relation_scale * self._exp_logits(a_BPDc, norm_BP, shift_BP) / sumexp_BP[..., None]

    def _g_chunk(self, u_BJC, w_DcC2, b_Dc, norm_BP, shift_BP, sumexp_BP, negc_BPOC, s_BPOC1, w_BPOC1, theta2_O):
        """g for one chunk of attributes, (B, Dc): mean over pairs of sum_{o,k} w_ok ReLU(c_pok + theta_2o rho_pd),
        through the sorted units (module docstring; :func:`convkb_sorted`)."""
        rho_BPDc = self._rho_chunk(self._attr_chunk(u_BJC, w_DcC2, b_Dc), norm_BP, shift_BP, sumexp_BP)
        return convkb_mean_score(negc_BPOC, s_BPOC1, w_BPOC1, theta2_O, rho_BPDc)

    # -------------------------------------------------------------------------------------------------------------

    def _normalisers(self, u_BJC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(nu, shift, sumexp), each (B, P): the logit normaliser, the max logit and the softmax denominator."""
        W, b = self.attr.weight, self.attr.bias  # (D, 2C), (D,)
        D, cs, ck = self.num_attributes, self.chunk_size, self.checkpoint_chunks
        # Pass 1: sum of squares and sum (with gradient), support size and max score (constants) over all D.
        sumsq_BP, total_BP = sum(_maybe_checkpoint(ck, self._moments_chunk, u_BJC, W[s:e], b[s:e]) for s, e in _chunks(D, cs))
        support_BP, amax_BP = torch.zeros_like(sumsq_BP), torch.zeros_like(sumsq_BP)
        with torch.no_grad():
            for s, e in _chunks(D, cs):
                a_BPDc = self._attr_chunk(u_BJC, W[s:e], b[s:e])
                support_BP += (a_BPDc > 0).sum(-1)
                amax_BP = torch.maximum(amax_BP, a_BPDc.amax(-1))
        norm_BP = _logit_norm(sumsq_BP, total_BP, support_BP, self.relation_logits)
        shift_BP = (amax_BP / norm_BP).detach()
        # Pass 2: softmax denominator over the support. The max entry contributes exp(0) = 1, so it is >= 1 whenever
        # the support is non-empty; clamping to 1 keeps the empty rows (r = 0) finite in backward.
        sumexp_BP = sum(
            _maybe_checkpoint(ck, self._sumexp_chunk, u_BJC, W[s:e], b[s:e], norm_BP, shift_BP) for s, e in _chunks(D, cs)
        ).clamp_min(1.0)
        return norm_BP, shift_BP, sumexp_BP

    def forward(self, z_BH: Tensor) -> Tensor:
        """z (B, H) -> g (B, N, H)."""
        B = z_BH.shape[0]
        u_BJC = self.nodes(z_BH)
        W, b = self.attr.weight, self.attr.bias
        norm_BP, shift_BP, sumexp_BP = self._normalisers(u_BJC)
        # Pass 3: ConvKB features per attribute chunk, averaged over the pairs.
        sorted_units = convkb_sorted(self.convkb.pair_base(u_BJC, self.pair_i, self.pair_j), self.convkb.w)
        theta2_O = self.convkb.theta[:, 1]
        g_chunks = [
            _maybe_checkpoint(self.checkpoint_chunks, self._g_chunk, u_BJC, W[s:e], b[s:e], norm_BP, shift_BP,
                              sumexp_BP, *sorted_units, theta2_O)
            for s, e in _chunks(self.num_attributes, self.chunk_size)
        ]
        return torch.cat(g_chunks, dim=1).view(B, self.num_codes, self.latent_dim)

    @torch.no_grad()
    def relation_sums(self, z_BH: Tensor) -> tuple[int, Tensor]:
        """rho's entry count and, on the model's device (no host sync), float64 (support size, sum rho, sum rho^2),
        chunk by chunk: what :func:`relation_figures` turns into the health figures."""
        u_BJC = self.nodes(z_BH)
        W, b = self.attr.weight, self.attr.bias
        norm_BP, shift_BP, sumexp_BP = self._normalisers(u_BJC)
        count, sums = 0, torch.zeros(3, dtype=torch.float64, device=z_BH.device)
        for s, e in _chunks(self.num_attributes, self.chunk_size):
            rho = self._rho_chunk(self._attr_chunk(u_BJC, W[s:e], b[s:e]), norm_BP, shift_BP, sumexp_BP).double()
            count += rho.numel()
            sums += _rho_sums(rho)
        return count, sums


class GraphDisentangleVRR(_GraphBase):
    """GDM with vanilla relation reasoning (Table IV "Base+GDM(VRR)"; model-spec section 5): z (B, H) -> g (B, N, H).

    One scalar relation a_ij per ordered pair, normalised over the neighbours j of i (Eq. 1 with D = 1). It is shared
    by all D sub-graphs. A learned relation-type embedding E (D, C) makes the triple attribute-specific:
    [u_i, rho_ij e_d, u_j]. relation_scale None means kappa = J - 1, the size of the softmax support, by analogy
    with HMRR's kappa = D.

    Parameters: J*C*H + J*C + (2C + 1) + Omega*4 + Omega*C + D*C (336,497 for H=512, N=18, J=64, C=8, Omega=8).
    """

    def _default_relation_scale(self) -> float:
        return self.num_nodes - 1  # kappa = J - 1, the size of the softmax support

    def _build(self, convkb_filters: int) -> None:
        self.relation = nn.Linear(2 * self.node_dim, 1)  # w_r, b_r
        nn.init.zeros_(self.relation.bias)  # b_r = 0: no seed starts with every relation dead (module docstring)
        self.convkb = ConvKB(self.node_dim, convkb_filters)
        self.rel_embed = nn.Parameter(torch.empty(self.num_attributes, self.node_dim))  # E (D, C)
        nn.init.normal_(self.rel_embed, std=1.0)

    def adjacency(self, u_BJC: Tensor) -> Tensor:
        """rho (B, P): kappa * Softmax over the neighbours j != i of s_ij / nu_i, masked where s_ij == 0."""
        B, J = u_BJC.shape[:2]
        x_BPC2 = torch.cat([u_BJC[:, self.pair_i], u_BJC[:, self.pair_j]], dim=-1)
        s_BJJm = F.relu(self.relation(x_BPC2)).view(B, J, J - 1)  # rows i, columns the J-1 neighbours (i-major pairs)
        support_BJ1 = (s_BJJm > 0).sum(-1, keepdim=True).to(s_BJJm.dtype)
        norm_BJ1 = _logit_norm(s_BJJm.square().sum(-1, keepdim=True), s_BJJm.sum(-1, keepdim=True), support_BJ1,
                               self.relation_logits)
        shift_BJ1 = (s_BJJm.amax(-1, keepdim=True) / norm_BJ1).detach()
        e = torch.where(s_BJJm > 0, torch.exp(s_BJJm / norm_BJ1 - shift_BJ1), 0.0)
        a_BJJm = e / e.sum(-1, keepdim=True).clamp_min(1.0)
        return self.relation_scale * a_BJJm.reshape(B, J * (J - 1))

    def _g_chunk(self, base_BPOC, rho_BP, e_DcC, theta2_O, w_OC):
        rel_BPDcC = rho_BP[:, :, None, None] * e_DcC  # (B, P, Dc, C)
        h = F.relu(base_BPOC[:, :, None] + theta2_O[:, None] * rel_BPDcC[:, :, :, None, :])  # (B, P, Dc, Omega, C)
        return torch.einsum("bpdoc,oc->bd", h, w_OC) / h.shape[1]

    @torch.no_grad()
    def relation_sums(self, z_BH: Tensor) -> tuple[int, Tensor]:
        """As :meth:`GraphDisentangle.relation_sums` (here rho is (B, P), shared over D)."""
        rho = self.adjacency(self.nodes(z_BH)).double()
        return rho.numel(), _rho_sums(rho)

    def forward(self, z_BH: Tensor) -> Tensor:
        B = z_BH.shape[0]
        u_BJC = self.nodes(z_BH)
        rho_BP = self.adjacency(u_BJC)
        base_BPOC = self.convkb.pair_base(u_BJC, self.pair_i, self.pair_j)
        theta2_O = self.convkb.theta[:, 1]
        g_chunks = [
            _maybe_checkpoint(
                self.checkpoint_chunks, self._g_chunk, base_BPOC, rho_BP, self.rel_embed[s:e], theta2_O, self.convkb.w
            )
            for s, e in _chunks(self.num_attributes, self.chunk_size)
        ]
        return torch.cat(g_chunks, dim=1).view(B, self.num_codes, self.latent_dim)
