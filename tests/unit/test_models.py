"""The assembled model: parameter tables (model-spec 4.4, 5), job files, shapes in the three paper settings at tiny
widths, every Table IV row forward + backward with a frozen generator, noise policy, heads, GLEAN skips, prior loading."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import rosinality_checkpoint
import torch
from click.testing import CliRunner

from laren.config import ConfigError, ModelConfig
from laren.models.build import build_discriminator, build_model, parameter_summary
from laren.models.encoder import GleanEncoder
from laren.models.stylegan2 import channel_table
from laren.specs import load_job

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"

TINY = dict(
    prior=dict(resolution=32, style_dim=32, mapping_layers=2, channel_max=8),
    encoder=dict(rrdb_blocks=1, rrdb_channels=8, rrdb_growth=4),
    gdm=dict(num_nodes=4, node_dim=4, convkb_filters=4, chunk_size=64),
    cgm=dict(code_dim=8, noise_proj_max_res=16),
)


def tiny(lr_size=8, resolution=32, **kw) -> ModelConfig:
    d = {**TINY, **kw}
    d["prior"] = {**TINY["prior"], "resolution": resolution}
    return ModelConfig(lr_size=lr_size, **d)


def build_tiny(cfg: ModelConfig):
    """build_model with the generator's noise strengths set to 0.1, as in a pre-trained prior (a fresh StyleGAN2
    starts them at 0, which would hide the noise path from the gradient and the noise tests)."""
    from laren.models.stylegan2 import NoiseInjection

    model = build_model(cfg)
    with torch.no_grad():
        for m in model.generator.modules():
            if isinstance(m, NoiseInjection):
                m.weight.fill_(0.1)
    return model


def summary(cfg: ModelConfig) -> dict[str, int]:
    return {name: n for name, n, _ in parameter_summary(cfg)}


# ------------------------------------------------------------------------------------------------ parameter tables


@pytest.mark.parametrize("lr_size, expected", [(16, 32_874_752), (64, 42_313_984)])
def test_encoder_parameter_count(lr_size, expected):
    with torch.device("meta"):
        enc = GleanEncoder(lr_size, channel_table(1024), 512)
    assert sum(p.numel() for p in enc.parameters()) == expected


def test_summary_table3_defaults():
    s = summary(ModelConfig())
    assert s["encoder"] == 32_874_752
    assert s["GDM"] == 419_424
    assert s["CGM"] == 10_109_136
    assert s["generator (frozen)"] == 30_370_060
    assert s["discriminator"] == 29_012_513
    assert s["total trainable"] == 43_403_312
    trainable = {name: t for name, _, t in parameter_summary(ModelConfig())}
    assert trainable["generator (frozen)"] is False and trainable["GDM"] is True


TABLE_IV = [  # (row, overrides, added params over Base at 1024)
    ("Base", dict(latent_space="w", noise_source="random"), 0),
    ("Base+W+", dict(latent_space="w+", noise_source="random"), 4_727_808),
    ("Base+S", dict(latent_space="s", noise_source="random"), 4_662_144),
    ("Base+GDM(VRR)", dict(latent_space="g", gdm_relation="vrr", noise_source="random"), 336_497),
    ("Base+GDM(HMRR)", dict(latent_space="g", gdm_relation="hmrr", noise_source="random"), 419_424),
    ("+CGM(VRR)", dict(latent_space="g", noise_source="cgm", cgm_relation="vrr"), 419_424 + 9_523_408),
    ("LAREN", dict(latent_space="g", noise_source="cgm", cgm_relation="rerr"), 419_424 + 10_109_136),
]


@pytest.mark.parametrize("row, overrides, added", TABLE_IV, ids=[r[0] for r in TABLE_IV])
def test_ablation_added_parameters(row, overrides, added):
    base = summary(ModelConfig(latent_space="w", noise_source="random"))["total trainable"]
    assert base == 32_874_752
    assert summary(ModelConfig(**overrides))["total trainable"] - base == added


def _cli_summary(job: str) -> str:
    from laren.cli import main

    res = CliRunner().invoke(main, ["model", "summary", str(REPO / "jobs" / job)])
    assert res.exit_code == 0, res.output
    return res.output


def _row(text: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)}\s+([\d,]+)", text, re.M)
    assert m, f"no row {name!r} in:\n{text}"
    return int(m.group(1).replace(",", ""))


def test_cli_summary_face64x():
    out = _cli_summary("face64x.yaml")
    assert _row(out, "GDM") == 419_424
    assert _row(out, "CGM") == 10_109_136
    assert _row(out, "encoder") == 32_874_752
    assert _row(out, "generator (frozen)") == 30_370_060
    assert _row(out, "total trainable") == 43_403_312
    assert "64x SR, 16 -> 1024" in out


def test_cli_summary_face16x_and_cat16x():
    assert _row(_cli_summary("face16x.yaml"), "encoder") == 42_313_984
    out = _cli_summary("cat16x.yaml")
    assert _row(out, "GDM") == 384_608
    assert _row(out, "CGM") == 5_701_840
    assert "16x SR, 16 -> 256" in out


@pytest.mark.parametrize(
    "job, lr, res, batch", [("face64x", 16, 1024, 8), ("face16x", 64, 1024, 8), ("cat16x", 16, 256, 16)]
)
def test_job_files_are_full_size(job, lr, res, batch):
    spec = load_job(REPO / "jobs" / f"{job}.yaml")
    m = spec.model
    assert spec.kind == "train" and spec.name == job and spec.description
    assert (m.lr_size, m.prior.resolution, m.prior.style_dim, m.prior.channel_multiplier) == (lr, res, 512, 2)
    assert (m.latent_space, m.gdm_relation, m.noise_source, m.cgm_relation) == ("g", "hmrr", "cgm", "rerr")
    assert (m.gdm.num_nodes, m.gdm.node_dim, m.gdm.convkb_filters, m.cgm.code_dim) == (64, 8, 8, 64)
    assert (m.encoder.rrdb_blocks, m.encoder.rrdb_channels, m.encoder.rrdb_growth) == (23, 64, 32)
    assert "StyleGAN2" in m.prior.source and "laren prior import" in m.prior.source
    assert spec.train.batch_size_global == batch


# ------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    "lr, res, n_latents, n_noise", [(16, 1024, 18, 17), (64, 1024, 18, 17), (16, 256, 14, 13)],
    ids=["64x-face", "16x-face", "16x-256"],
)
def test_shapes_in_paper_settings_tiny_widths(lr, res, n_latents, n_noise):
    torch.manual_seed(0)
    model = build_tiny(tiny(lr_size=lr, resolution=res)).eval()
    H = 32
    x = torch.rand(1, 3, lr, lr) * 2 - 1
    with torch.no_grad():
        z, feats = model.encoder.features(x)
        assert z.shape == (1, H)
        assert sorted(feats) == [r for r in (4, 8, 16, 32, 64) if r <= lr]
        g = model.head(z)
        assert g.shape == (1, n_latents, H)  # D = N*H attributes
        codes = model.cgm.codes(g)
        assert codes.shape == (1, n_noise, 8)
        noise = model.cgm(g)
        assert [tuple(t.shape) for t in noise] == [(1, 1, r, r) for r in model.generator.noise_resolutions]
        assert len(noise) == n_noise and noise[-1].shape[-1] == res
        sr = model(x)
    assert sr.shape == (1, 3, res, res)
    assert torch.isfinite(sr).all()


# ------------------------------------------------------------------------------------------------ ablations, grads


@pytest.mark.parametrize("row, overrides, added", TABLE_IV, ids=[r[0] for r in TABLE_IV])
def test_table4_row_forward_backward_frozen_generator(row, overrides, added):
    torch.manual_seed(0)
    model = build_tiny(tiny(**overrides)).train()
    assert not model.generator.training
    assert all(not p.requires_grad for p in model.generator.parameters())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    sr = model(x)
    assert sr.shape == (2, 3, 32, 32)
    sr.square().mean().backward()
    assert all(p.grad is None for p in model.generator.parameters())
    parts = {"encoder": model.encoder, "head": model.head, "cgm": model.cgm}
    for name, part in parts.items():
        params = [] if part is None else list(part.parameters())
        if name == "head" and overrides["latent_space"] == "w":
            assert params == []  # W broadcasts z: no head parameters
            continue
        if name == "cgm" and overrides["noise_source"] == "random":
            assert part is None
            continue
        assert params and all(p.grad is not None for p in params), name
        assert sum(p.grad.abs().sum().item() for p in params) > 0, name
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not trainable & {id(p) for p in model.generator.parameters()}


def test_train_noise_random_eval_noise_fixed():
    torch.manual_seed(0)
    model = build_tiny(tiny(latent_space="w", noise_source="random"))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        model.train()
        a, b = model(x), model(x)
        assert (a - b).abs().max() > 1e-4  # fresh N(0, 1) maps each call
        model.eval()
        c, d = model(x), model(x)
        assert torch.equal(c, d)
        # the fixed maps are a function of the seed: a second model with the same seed and weights agrees
        other = build_tiny(tiny(latent_space="w", noise_source="random"))
        other.load_state_dict(model.state_dict())
        assert torch.equal(other.eval()(x), c)
        # and differ for another seed
        third = build_tiny(tiny(latent_space="w", noise_source="random", eval_noise_seed=1))
        third.load_state_dict(model.state_dict())
        assert not torch.equal(third.eval()(x), c)


def test_cgm_noise_replaces_random_noise():
    torch.manual_seed(0)
    model = build_tiny(tiny()).train()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        sr, aux = model(x, return_aux=True)
        assert torch.equal(model(x), sr)  # no random input left with the CGM
        assert aux["latents"].shape == (2, 8, 32) and len(aux["noise"]) == 7


def test_learn_noise_strength_trains_the_strengths_only():
    """Choice C15's alternative: a prior with (near) zero noise strengths makes the CGM inert (zero gradient); with
    learn_noise_strength the strengths w_m, and only they, join the trained parameters, and the CGM then learns."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    for learn in (False, True):
        model = build_model(tiny(learn_noise_strength=learn)).train()
        strengths = [m.noise.weight for m in model.generator.modules() if hasattr(m, "noise")]
        with torch.no_grad():  # as priors/synth32's (|w_m| <= 0.008): a prior whose data had no stochastic detail
            for w in strengths:
                w.zero_()
        assert len(strengths) == 7
        gen_trained = [p for p in model.generator.parameters() if p.requires_grad]
        assert [id(p) for p in gen_trained] == ([id(w) for w in strengths] if learn else [])
        assert {id(p) for p in gen_trained} <= {id(p) for p in model.trainable_parameters()}
        model(x).square().mean().backward()
        assert all(float(p.grad.abs().sum()) == 0 for p in model.cgm.parameters())  # w_m = 0: no path yet
        if learn:
            assert all(float(w.grad.abs()) > 0 for w in strengths)  # the strengths move, then the CGM matters


def test_w_head_broadcasts_and_s_head_slices_in_generator_order():
    torch.manual_seed(0)
    m_w = build_tiny(tiny(latent_space="w", noise_source="random")).eval()
    z = torch.randn(2, 32)
    lat = m_w.head(z)
    assert lat.shape == (2, 8, 32) and torch.equal(lat[:, 3], z)

    m_s = build_tiny(tiny(latent_space="s", noise_source="random")).eval()
    G = m_s.generator
    assert torch.equal(m_s.head.fc.bias, torch.ones(sum(G.style_dims)))  # b_S = 1 (modulation bias_init)
    # with A_S = 0 and b_S = the modulation outputs of a W+ code, the S path reproduces G at that code
    wplus = torch.randn(1, G.num_latents, 32)
    with torch.no_grad():
        m_s.head.fc.weight.zero_()
        m_s.head.fc.bias.copy_(torch.cat(G.compute_styles(wplus), 1)[0])
        noise = [getattr(m_s, f"eval_noise_{i}") for i in range(G.num_noises)]
        ref = G(wplus, noise=noise, randomize_noise=False)
        out = m_s(torch.zeros(1, 3, 8, 8))
    assert torch.allclose(out, ref, atol=1e-5)


def test_s_head_with_cgm_is_a_config_error():
    with pytest.raises(ConfigError, match="model.noise_source"):
        build_model(tiny(latent_space="s", noise_source="cgm"))


def test_glean_skips_builds_and_trains():
    torch.manual_seed(0)
    model = build_tiny(tiny(glean_skips=True)).train()
    sr = model(torch.rand(2, 3, 8, 8) * 2 - 1)
    assert sr.shape == (2, 3, 32, 32)
    sr.square().mean().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.generator.parameters())
    s = summary(ModelConfig(glean_skips=True))
    assert s["GLEAN fusion+decoder"] == 30_665_539  # documented in laren/models/laren.py (mmagic: +55.09M)


def test_glean_lr_skip_reads_the_lr_image():
    torch.manual_seed(0)
    model = build_tiny(tiny(glean_skips=True, glean_lr_skip=True)).eval()
    lr = torch.rand(2, 3, 8, 8) * 2 - 1
    # With only the LR-image channels of the final conv live, the SR image is that conv of the bicubic upsampling,
    # and at initialisation those channels are the identity: SR = bicubic + bias.
    conv = model.decoder.to_rgb
    with torch.no_grad():
        conv.weight[:, :-3].zero_()
        sr = model(lr)
    up = torch.nn.functional.interpolate(lr, size=(32, 32), mode="bicubic", align_corners=False)
    assert torch.allclose(sr, torch.nn.functional.conv2d(up, conv.weight[:, -3:], conv.bias, padding=1), atol=1e-5)
    assert torch.allclose(sr, up + conv.bias.view(1, 3, 1, 1), atol=1e-5)
    model.train()
    sr = model(lr)
    sr.square().mean().backward()
    assert all(p.grad is not None for p in model.decoder.parameters())
    s = summary(ModelConfig(glean_skips=True, glean_lr_skip=True))
    assert s["GLEAN fusion+decoder"] == 30_665_539 + 81  # documented in laren/models/laren.py
    with pytest.raises(ValueError, match="glean_skips"):
        ModelConfig(glean_lr_skip=True)


def test_parameter_summary_is_instant_and_allocates_nothing():
    import time

    t = time.perf_counter()
    rows = parameter_summary(ModelConfig(lr_size=64))
    assert time.perf_counter() - t < 20
    assert [r[0] for r in rows][:2] == ["encoder", "latent head"]


# ------------------------------------------------------------------------------------------------ prior loading


@pytest.fixture(scope="module")
def imported_prior(tmp_path_factory):
    src = rosinality_checkpoint()
    from laren.models.prior_io import import_prior

    dest = tmp_path_factory.mktemp("priors") / "rosinality-32px"
    meta = import_prior(str(src), str(dest))
    return str(dest), meta


def test_build_model_loads_prior_weights(imported_prior):
    from laren.models.prior_io import load_prior

    path, meta = imported_prior
    cfg = ModelConfig(
        lr_size=8,
        prior=dict(path=path, resolution=32, style_dim=meta.style_dim, mapping_layers=meta.mapping_layers,
                   channel_multiplier=meta.channel_multiplier, channel_max=meta.channel_max),
        encoder=TINY["encoder"], gdm=TINY["gdm"], cgm=TINY["cgm"],
    )
    model = build_model(cfg)
    G_ref = load_prior(path)[0]
    sd, ref = model.generator.state_dict(), G_ref.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert model.encoder.channels == {r: G_ref.channels[r] for r in (8, 4)}
    sr = model(torch.rand(1, 3, 8, 8) * 2 - 1)
    assert sr.shape == (1, 3, 32, 32)
    D = build_discriminator(cfg)  # the fixture holds only g_ema: a random D of the same architecture
    assert D(sr.detach()).shape == (1, 1)


def test_prior_mismatch_names_the_field(imported_prior):
    path, meta = imported_prior
    cfg = ModelConfig(lr_size=8, prior=dict(path=path, resolution=64, style_dim=meta.style_dim))
    with pytest.raises(ConfigError, match=r"model\.prior\.resolution"):
        build_model(cfg)
