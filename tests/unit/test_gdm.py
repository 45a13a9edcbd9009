"""GDM: parameter counts (model-spec 4.1, 5), equivalence of the chunked HMRR with a straightforward reference,
flat memory in the attribute count, VRR, and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from laren.models.gdm import GraphDisentangle, GraphDisentangleVRR, mask_variance_share, ordered_pairs


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ------------------------------------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "J, C, N, expected",
    [
        (64, 8, 18, 419_424),  # 64x / 16x face (Table III: 0.42M)
        (64, 8, 14, 384_608),  # 256 setting, D = 7168
        (16, 8, 18, 222_432),  # Fig. 8 sweep over J
        (32, 8, 18, 288_096),
        (128, 8, 18, 682_080),
        (64, 4, 18, 214_336),  # sweep over C
        (64, 16, 18, 829_600),
    ],
)
def test_hmrr_parameter_count(J, C, N, expected):
    with torch.device("meta"):
        gdm = GraphDisentangle(512, J, C, N, convkb_filters=8)
    assert n_params(gdm) == expected
    # the spec's formula: J*C*H + J*C + 2C*D + D + Omega*4 + Omega*C
    D = N * 512
    assert expected == J * C * 512 + J * C + 2 * C * D + D + 8 * 4 + 8 * C


def test_vrr_parameter_count():
    with torch.device("meta"):
        assert n_params(GraphDisentangleVRR(512, 64, 8, 18)) == 336_497


def test_ordered_pairs():
    i, j = ordered_pairs(4)
    pairs = list(zip(i.tolist(), j.tolist()))
    assert len(pairs) == 12 and len(set(pairs)) == 12
    assert all(a != b for a, b in pairs)
    assert pairs[:3] == [(0, 1), (0, 2), (0, 3)]  # i-major


# ------------------------------------------------------------------------------------------------ reference equivalence


def reference_norm(A: torch.Tensor, mode: str) -> torch.Tensor:
    """nu over the last axis: ||A||_2 (v1, "l2"), or the RMS (spec v2, "rms") or the standard deviation ("std") of the
    support entries A > 0 (population std, with the zeros off the support left out); model-spec 9 R2."""
    if mode == "l2":
        return A.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    out = []
    for row in A.reshape(-1, A.shape[-1]):
        sup = row[row > 0]
        if sup.numel() == 0:
            out.append(row.new_tensor(1e-12))
        elif mode == "rms":
            out.append(sup.square().mean().sqrt().clamp_min(1e-12))
        else:
            out.append(((sup - sup.mean()).square().mean()).sqrt().clamp_min(1e-12))
    return torch.stack(out).reshape(*A.shape[:-1], 1)


def reference_rho(gdm: GraphDisentangle, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U (B, J, C), rho (B, P, D)) of model-spec 2.2 taken literally, every tensor at full size."""
    B, J, C = z.shape[0], gdm.num_nodes, gdm.node_dim
    U = (z @ gdm.node_proj.weight.T + gdm.node_proj.bias).view(B, J, C)
    pairs = [(i, j) for i in range(J) for j in range(J) if i != j]
    X = torch.stack([torch.cat([U[:, i], U[:, j]], -1) for i, j in pairs], 1)  # (B, P, 2C)
    A = F.relu(X @ gdm.attr.weight.T + gdm.attr.bias)  # (B, P, D)
    Xh = A / reference_norm(A, gdm.relation_logits)
    P = torch.where(A > 0, 0.0, float("-inf"))
    r = torch.softmax(Xh + P, dim=-1).nan_to_num(0.0)  # rows that are all -inf -> 0
    return U, gdm.relation_scale * r


def reference_hmrr(gdm: GraphDisentangle, z: torch.Tensor) -> torch.Tensor:
    """Model-spec 2.2 taken literally, with every tensor at full size: X, A, X-hat, P, r, the triple matrices
    [u_i, rho 1_C, u_j] (B, P, D, C, 3), and the 1x3 convolution with its Omega filters."""
    B, J, C = z.shape[0], gdm.num_nodes, gdm.node_dim
    U, rho = reference_rho(gdm, z)
    pairs = [(i, j) for i in range(J) for j in range(J) if i != j]
    ui = torch.stack([U[:, i] for i, _ in pairs], 1)  # (B, P, C)
    uj = torch.stack([U[:, j] for _, j in pairs], 1)
    D = rho.shape[-1]
    M = torch.stack(
        [ui[:, :, None].expand(-1, -1, D, -1), rho[..., None].expand(-1, -1, -1, C), uj[:, :, None].expand(-1, -1, D, -1)],
        dim=-1,
    )  # (B, P, D, C, 3)
    kb = gdm.convkb
    h = F.relu(torch.einsum("bpdkt,ot->bpdok", M, kb.theta) + kb.beta[:, None])  # (B, P, D, Omega, C)
    s = torch.einsum("bpdok,ok->bpd", h, kb.w)
    return s.mean(1).view(B, gdm.num_codes, gdm.latent_dim)


@pytest.mark.parametrize("chunk_size", [7, 16, 1000])
@pytest.mark.parametrize("checkpoint_chunks", [True, False])
@pytest.mark.parametrize("relation_logits", ["std", "rms", "l2"])
def test_chunked_equals_reference_float64(chunk_size, checkpoint_chunks, relation_logits):
    torch.manual_seed(0)
    gdm = GraphDisentangle(16, 5, 4, 3, convkb_filters=3, chunk_size=chunk_size, checkpoint_chunks=checkpoint_chunks,
                           relation_logits=relation_logits).double()
    g = assert_equals_reference(gdm, torch.randn(3, 16, dtype=torch.float64, requires_grad=True))
    assert g.shape == (3, 3, 16)
    assert g.std().item() > 1e-3  # kappa = D keeps g varying over d (choice C5)


def assert_equals_reference(gdm: GraphDisentangle, z: torch.Tensor) -> torch.Tensor:
    """g = gdm(z) equals the literal reference to 1e-10, and so do the gradients of a random function of g with respect
    to z and every parameter (through the chunked checkpoints and both statistics passes); returns g."""
    g, g_ref = gdm(z), reference_hmrr(gdm, z)
    assert (g - g_ref).abs().max().item() <= 1e-10
    w = torch.randn_like(g)
    grads = torch.autograd.grad((g * w).sum(), [z, *gdm.parameters()])
    grads_ref = torch.autograd.grad((g_ref * w).sum(), [z, *gdm.parameters()])
    for a, b in zip(grads, grads_ref):
        assert (a - b).abs().max().item() <= 1e-10
    return g


def test_sorted_convkb_sum_at_its_edge_cases_float64():
    """The sorted-unit form of ConvKB's sum (gdm module docstring) where it could differ from ReLU's: a filter with
    theta_2 = 0 (q = 0: the active units are those with c > 0), filters of both signs, and tied units (theta_1 =
    theta_3 = beta = 0: c + q = 0 exactly wherever rho = 0). Values and gradients equal the literal (B, P, D, Omega, C) form."""
    torch.manual_seed(1)
    gdm = GraphDisentangle(16, 5, 4, 3, convkb_filters=4, chunk_size=7).double()
    with torch.no_grad():
        gdm.convkb.theta[:, 1] = torch.tensor([0.0, 0.7, -0.7, 0.3], dtype=torch.float64)
        gdm.convkb.theta[3, 0] = gdm.convkb.theta[3, 2] = 0.0
        gdm.convkb.beta[3] = 0.0  # c = 0: ties with q = 0 wherever rho = 0 (off the support)
    assert_equals_reference(gdm, torch.randn(3, 16, dtype=torch.float64, requires_grad=True))


def test_rows_without_support_give_zero_relation_and_finite_grads():
    torch.manual_seed(0)
    gdm = GraphDisentangle(8, 3, 2, 2, convkb_filters=2, chunk_size=5).double()
    with torch.no_grad():
        gdm.attr.bias.fill_(-100.0)  # every A = 0: P = -inf everywhere, r must be 0 (not NaN)
    z = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    g = gdm(z)
    assert torch.isfinite(g).all()
    assert (g - reference_hmrr(gdm, z)).abs().max().item() <= 1e-10
    g.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in gdm.parameters() if p.grad is not None)


def test_relation_scale_one_is_paper_literal_and_nearly_constant():
    torch.manual_seed(0)
    lit = GraphDisentangle(32, 4, 4, 8, relation_scale=1.0).double()
    dflt = GraphDisentangle(32, 4, 4, 8).double()
    dflt.load_state_dict(lit.state_dict())
    assert dflt.relation_scale == 256.0 and lit.relation_scale == 1.0
    z = torch.randn(4, 32, dtype=torch.float64)
    with torch.no_grad():
        g_lit, g_dflt = lit(z), dflt(z)
    # section 0.5 of the spec: with kappa = 1, g barely varies across the D attributes
    spread = lambda g: (g.flatten(1).std(1) / g.flatten(1).mean(1).abs()).mean().item()
    assert spread(g_dflt) > 10 * spread(g_lit)


# ------------------------------------------------------------------------------------------------ memory


def peak_cpu_bytes(fn) -> int:
    """Peak of live CPU tensor bytes allocated while fn runs, from the profiler's allocation records."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def _fwd_bwd_peak(num_codes: int, chunk_size: int) -> int:
    torch.manual_seed(0)
    gdm = GraphDisentangle(32, 8, 8, num_codes, convkb_filters=8, chunk_size=chunk_size)
    z = torch.randn(1, 32, requires_grad=True)

    def step():
        gdm(z).square().sum().backward()

    return peak_cpu_bytes(step)


def test_peak_memory_flat_in_attribute_count():
    # D = 8*32 = 256 -> 64*32 = 2048 attributes (8x). One h chunk is 56 pairs x 64 x 8 x 8 x 4 B = 0.9 MB.
    small, large = _fwd_bwd_peak(8, 64), _fwd_bwd_peak(64, 64)
    assert small > 0
    assert large / small < 1.6, (small, large)
    # the measurement is sensitive: one chunk spanning all of D grows with D
    small_u, large_u = _fwd_bwd_peak(8, 10**6), _fwd_bwd_peak(64, 10**6)
    assert large_u / small_u > 4, (small_u, large_u)


# ------------------------------------------------------------------------------------------------ VRR


def reference_vrr(gdm: GraphDisentangleVRR, z: torch.Tensor) -> torch.Tensor:
    B, J, C = z.shape[0], gdm.num_nodes, gdm.node_dim
    U = gdm.nodes(z)
    out = torch.zeros(B, gdm.num_attributes, dtype=z.dtype)
    kb = gdm.convkb
    for b in range(B):
        for i in range(J):
            nbrs = [j for j in range(J) if j != i]
            s = torch.stack([F.relu(gdm.relation(torch.cat([U[b, i], U[b, j]]))[0]) for j in nbrs])
            logits = torch.where(s > 0, s / reference_norm(s, gdm.relation_logits), float("-inf"))
            a = torch.softmax(logits, 0).nan_to_num(0.0) * gdm.relation_scale
            for a_ij, j in zip(a, nbrs):
                M = torch.stack(
                    [U[b, i].expand(gdm.num_attributes, C), a_ij * gdm.rel_embed, U[b, j].expand(gdm.num_attributes, C)], -1
                )  # (D, C, 3)
                h = F.relu(torch.einsum("dkt,ot->dok", M, kb.theta) + kb.beta[:, None])
                out[b] += torch.einsum("dok,ok->d", h, kb.w)
    return (out / (J * (J - 1))).view(B, gdm.num_codes, gdm.latent_dim)


@pytest.mark.parametrize("relation_logits", ["std", "rms", "l2"])
def test_vrr_matches_reference_and_trains(relation_logits):
    torch.manual_seed(0)
    gdm = GraphDisentangleVRR(8, 4, 3, 2, convkb_filters=2, chunk_size=5, relation_logits=relation_logits).double()
    z = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    g = gdm(z)
    assert g.shape == (2, 2, 8)
    assert (g - reference_vrr(gdm, z)).abs().max().item() <= 1e-10
    g.square().sum().backward()
    for name, p in gdm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [GraphDisentangle, GraphDisentangleVRR])
def test_bad_sizes_are_refused(cls):
    with pytest.raises(ValueError, match="num_nodes must be >= 2"):
        cls(8, 1, 2, 2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        cls(8, 3, 2, 2, chunk_size=0)


# ------------------------------------------------------------------------------------------------ v2 (model-spec 9)


def test_relation_stats_equal_the_literal_rho():
    """relation_stats (chunked) = the variance decomposition of the literal full-size rho."""
    torch.manual_seed(1)
    gdm = GraphDisentangle(16, 5, 4, 3, convkb_filters=3, chunk_size=7).double()
    z = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        _, rho = reference_rho(gdm, z)
    mask = (rho > 0).double()
    fit = torch.where(mask > 0, rho[mask > 0].mean(), 0.0)  # the best predictor of rho from the mask alone
    r2 = 1 - (rho - fit).square().sum() / (rho - rho.mean()).square().sum()
    st = gdm.relation_stats(z)
    assert st["mask_share"] == pytest.approx(float(r2), abs=1e-9)
    assert st["support_share"] == pytest.approx(float(mask.mean()), abs=1e-12)
    assert mask_variance_share(4, 2, 2.0, 2.0) == pytest.approx(1.0)  # rho in {0, 1}: a pure gate


def test_vrr_relation_stats_equal_the_variance_decomposition_of_its_rho():
    """VRR's relation_stats (one device read) = the variance decomposition of its rho (B, P), computed directly."""
    torch.manual_seed(2)
    gdm = GraphDisentangleVRR(16, 5, 4, 3).double()
    z = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        rho = gdm.adjacency(gdm.nodes(z))
    mask = rho > 0
    fit = torch.where(mask, rho[mask].mean(), 0.0)
    r2 = 1 - (rho - fit).square().sum() / (rho - rho.mean()).square().sum()
    st = gdm.relation_stats(z)
    assert 0 < st["support_share"] < 1  # a mixed support: the decomposition is not trivial
    assert st["mask_share"] == pytest.approx(float(r2), abs=1e-12)
    assert st["support_share"] == pytest.approx(float(mask.double().mean()), abs=1e-15)


def test_rms_logits_make_rho_graded_where_l2_is_a_gate():
    """Model-spec 9 R2 at J=16, C=8 and D = 4 x 256: under "l2" the mask explains > 99 % of rho's variance; under
    "rms" it explains <= 60 % ("std" less still), and W_attr's gradient, relative to ConvKB's, grows more than 10x."""
    out = {}
    for mode in ("l2", "rms", "std"):
        torch.manual_seed(0)
        gdm = GraphDisentangle(256, 16, 8, 4, relation_logits=mode, chunk_size=256)
        z = torch.randn(2, 256)
        out[mode] = gdm.relation_stats(z)["mask_share"]
        gdm(z).square().mean().backward()
        ratio = lambda m: (m.grad.norm() / m.norm()).item()
        out[mode + "_attr_vs_convkb"] = ratio(gdm.attr.weight) / ratio(gdm.convkb.w)
    assert out["l2"] > 0.99 and out["rms"] <= 0.6 and out["std"] < out["rms"], out
    assert out["rms_attr_vs_convkb"] > 10 * out["l2_attr_vs_convkb"], out


def test_vrr_never_starts_dead():
    """Model-spec 9 R3: with b_r = 0 every seed starts with live relations (v1: all-zero in 4 of 10 seeds)."""
    for seed in range(20):
        torch.manual_seed(seed)
        gdm = GraphDisentangleVRR(64, 16, 8, 4)
        z = torch.randn(2, 64)
        st = gdm.relation_stats(z)
        g = gdm(z).flatten(1)
        assert st["support_share"] > 0.2, (seed, st)
        assert (g.std(1) / g.mean(1).abs()).min() > 0.05, seed
