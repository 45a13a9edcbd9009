"""Prior training parts: DiffAugment, R1 / path length, the Fréchet distance, the prior job kind, one GAN step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg

from laren import factor_fd as FD
from laren import losses as L
from laren.augment import diff_augment
from laren.config import ConfigError, PriorRunConfig
from laren.specs import load_job
from laren.train.prior import GanNets, _adam, _latents, build_discriminator, build_generator, gan_step


def test_diff_augment_translation_moves_content_and_passes_gradients():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = diff_augment(x, ["translation"])
    pos = torch.nonzero(y[:, 0] == 1.0)[:, 1:] - 8  # each image: the dot moved by at most 2 = 16/8 px per axis
    assert y.shape == x.shape and pos.abs().max() <= 2 and (pos != 0).any()
    assert torch.equal(y.sum((1, 2, 3)), torch.ones(64))  # shifted, not blurred (the dot stays inside)
    xr = torch.rand(4, 3, 8, 8, requires_grad=True)
    diff_augment(xr, ["translation", "color"]).sum().backward()
    assert xr.grad is not None and xr.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="cutout"):
        diff_augment(xr, ["cutout"])


def test_r1_penalty_and_path_lengths():
    a = torch.randn(2, 3, 4, 4)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    d_real = (x * a).flatten(1).sum(1)  # linear D: grad_x D = a
    assert L.r1_penalty(d_real, x).item() == pytest.approx(a.pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)
    g = build_generator(_cfg())
    w = torch.randn(3, g.num_latents, g.style_dim, requires_grad=True)
    lengths = L.path_lengths(g(w), w)
    assert lengths.shape == (3,) and (lengths > 0).all() and lengths.requires_grad


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1.0
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert FD.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert FD.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


def test_factor_regressor_learns_a_factor():
    specs = [{"name": "v", "kind": "continuous", "range": [0.0, 1.0]}, {"name": "c", "kind": "discrete", "values": ["a", "b"]}]
    gen = torch.Generator().manual_seed(0)
    f = torch.stack([torch.rand(256, generator=gen), torch.randint(0, 2, (256,), generator=gen).float()], 1)
    img = torch.zeros(256, 3, 16, 16)
    img[:, 0] = f[:, 0].view(-1, 1, 1) * 2 - 1  # red = v
    img[:, 1, :8] = f[:, 1].view(-1, 1, 1) * 2 - 1  # green top half = c
    net = FD.train_regressor(img, f, specs, steps=60, seed=0)  # r2 >= 0.997 and acc 1.0 at 60 steps for seeds 0-2
    acc = FD.factor_accuracy(net, img, f)
    assert acc["r2/v"] > 0.9 and acc["acc/c"] > 0.95


def _cfg(**gan) -> PriorRunConfig:
    return PriorRunConfig.model_validate(dict(
        name="t", model=dict(lr_size=8, prior=dict(resolution=32, style_dim=16, mapping_layers=2, channel_multiplier=1,
                                                     channel_max=8)),
        data=dict(train_url="unused"), train=dict(batch_size_global=4), gan=dict(metric_images=0, **gan)))


def test_gan_step_updates_g_d_and_the_regularisers():
    torch.manual_seed(0)
    cfg = _cfg(r1_gamma=1.0, r1_every=1, pl_weight=2.0, pl_every=1, diffaugment=["translation", "color"])
    g, d = build_generator(cfg), build_discriminator(cfg)
    nets = GanNets(g, None)
    opt_g, opt_d = _adam(g.parameters(), cfg.gan, 1), _adam(d.parameters(), cfg.gan, 1)
    g0, d0 = [p.detach().clone() for p in g.parameters()], [p.detach().clone() for p in d.parameters()]
    out = gan_step(nets, d, opt_g, opt_d, torch.rand(4, 3, 32, 32) * 2 - 1, cfg, 0, 1)
    assert all(torch.isfinite(v) for v in out.values()) and out["r1"] > 0 and out["pl"] >= 0
    assert nets.pl_mean > 0  # the running path-length mean moved off 0
    assert sum(not torch.equal(a, p) for a, p in zip(g0, g.parameters())) > len(g0) // 2
    assert sum(not torch.equal(a, p) for a, p in zip(d0, d.parameters())) > len(d0) // 2
    assert all(torch.equal(a, b) for a, b in zip(nets.g_ema.parameters(), g0))  # EMA moves only through _ema
    w = _latents(g, 5, 1.0, "cpu")  # mixing: two styles, one crossover
    assert w.shape == (5, g.num_latents, 16) and not torch.equal(w[:, 0], w[:, -1])


def test_prior_job_kind(tmp_path):
    job = load_job("jobs/prior-synth32.yaml")
    cfg = job.prior_config()
    assert job.kind == "prior" and job.run_id == cfg.run_id and cfg.gan.r1_gamma == 0.1
    assert cfg.output_url().endswith("/priors/prior-synth32")
    assert load_job("jobs/prior-bedroom256.yaml").prior_config().gan.diffaugment == []
    p = tmp_path / "bad.yaml"
    p.write_text("kind: prior\ngan:\n  r1_every: 0\n")
    with pytest.raises(ConfigError, match="gan.r1_every"):
        load_job(p)
    p.write_text("kind: train\ngan:\n  r1_gamma: 1.0\n")
    with pytest.raises(ConfigError, match="gan is only used by kind: prior"):
        load_job(p)
    p.write_text("kind: prior\ngan:\n  diffaugment: [cutout]\n")
    with pytest.raises(ConfigError, match="gan.diffaugment"):
        load_job(p)


def test_trained_prior_round_trips_through_import_and_load(tmp_path):
    from laren.config import ModelConfig
    from laren.models.build import build_model
    from laren.models.prior_io import import_prior, load_prior, prior_paths
    from laren.train.prior import export_prior

    torch.manual_seed(0)
    cfg = _cfg(output=str(tmp_path / "p"))
    nets, d = GanNets(build_generator(cfg), None), build_discriminator(cfg)
    with torch.no_grad():
        for p in nets.g_ema.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # G_ema, not G, is the prior
    meta = export_prior(nets, d, cfg)
    assert meta.source_format == "laren" and meta.has_discriminator
    g, d2, meta2 = load_prior(str(tmp_path / "p"))
    assert meta2 == meta
    for k, v in nets.g_ema.state_dict().items():
        assert torch.equal(g.state_dict()[k], v), k
    assert all(torch.equal(d2.state_dict()[k], v) for k, v in d.state_dict().items())
    again = import_prior(prior_paths(str(tmp_path / "p"))[0], str(tmp_path / "q"))  # `laren prior import` of it
    assert again.sha256 == meta.sha256 and again.source_format == "laren"
    assert (tmp_path / "q.safetensors").read_bytes() == (tmp_path / "p.safetensors").read_bytes()
    z = torch.randn(2, 16)
    g3, _, _ = load_prior(str(tmp_path / "q"))
    assert torch.equal(g3.generate(z, randomize_noise=False)[0], g.generate(z, randomize_noise=False)[0])
    m = ModelConfig.model_validate(dict(lr_size=8, encoder=dict(rrdb_blocks=1, rrdb_channels=8, rrdb_growth=8),
                                        gdm=dict(num_nodes=4, node_dim=4, convkb_filters=2, checkpoint_chunks=False),
                                        cgm=dict(code_dim=8, noise_proj_max_res=16),
                                        prior=dict(cfg.model.prior.model_dump(), path=str(tmp_path / "q"))))
    sr = build_model(m)  # an SR job's model.prior.path points at it
    assert sum(int(p.requires_grad) for p in sr.parameters()) > 0


def test_committed_prior_loads_and_round_trips(tmp_path):
    from pathlib import Path

    from laren.models.prior_io import import_prior, load_prior

    src = Path("priors/synth32.safetensors")
    assert src.stat().st_size <= 5 * 2**20
    g, d, meta = load_prior(str(src))  # verifies the sha256 of the JSON
    job = load_job("jobs/demo.yaml").model.prior
    assert (meta.resolution, meta.style_dim, meta.mapping_layers, meta.channel_max) == (
        job.resolution, job.style_dim, job.mapping_layers, job.channel_max) and d is not None
    assert import_prior(str(src), str(tmp_path / "again")).sha256 == meta.sha256
    img = g.generate(torch.randn(4, meta.style_dim, generator=torch.Generator().manual_seed(0)), randomize_noise=False)[0]
    assert img.shape == (4, 3, 32, 32) and img.std() > 0.2  # images, not a constant
