"""StyleGAN2 (laren.models.stylegan2) against the rosinality reference fixture (fixtures README section 1).

Each of the 4 reference calls is reproduced in float32 (<= 5e-5) and float64 (<= 1e-10 vs *_f64), with the mapping
<= 1e-6, for a generator loaded three ways: the .pt directly, import_prior -> load_prior, and the `laren prior import` CLI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import rosinality_checkpoint
import torch

from laren.models.stylegan2 import Discriminator, Generator, channel_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stylegan2"
CKPT = rosinality_checkpoint()
CASES = FIXTURES / "rosinality-32px-cases.npz"
FIXTURE_ARCH = dict(resolution=32, style_dim=64, mapping_layers=2, channel_multiplier=1, channel_base=512, channel_max=64)


def _direct() -> Generator:
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=True)
    g = Generator(**FIXTURE_ARCH)
    g.load_state_dict(ckpt["g_ema"], strict=True)
    g.latent_avg.copy_(ckpt["latent_avg"])
    return g.eval()


def _roundtrip(tmp: Path) -> Generator:
    from laren.models.prior_io import import_prior, load_prior

    meta = import_prior(str(CKPT), str(tmp / "priors" / "fx"))
    assert (meta.resolution, meta.style_dim, meta.mapping_layers, meta.channel_base, meta.channel_max) == (32, 64, 2, 512, 64)
    g, d, meta2 = load_prior(str(tmp / "priors" / "fx"))
    assert d is None and meta2 == meta
    return g


def _cli(tmp: Path) -> Generator:
    from click.testing import CliRunner

    from laren.cli import main
    from laren.models.prior_io import load_prior

    res = CliRunner().invoke(main, ["prior", "import", str(CKPT), str(tmp / "cli-prior")])
    assert res.exit_code == 0, res.output
    assert "32px" in res.output and "min(512 // r, 64)" in res.output and "style_dim 64" in res.output
    return load_prior(str(tmp / "cli-prior.json"))[0]


@pytest.fixture(scope="module")
def cases():
    with np.load(CASES) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


@pytest.fixture(scope="module", params=["direct", "roundtrip", "cli"])
def gen(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    return {"direct": _direct, "roundtrip": _roundtrip, "cli": _cli}[request.param](*(() if request.param == "direct" else (tmp,)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_calls(gen, cases, dtype):
    g = gen.to(dtype)
    tol, sfx = (5e-5, "") if dtype == torch.float32 else (1e-10, "_f64")
    z, wplus = cases["z"].to(dtype), cases["wplus"].to(dtype)
    noise = [cases[f"noise_{i}"].to(dtype) for i in range(g.num_noises)]

    def err(a, key):
        return (a - cases[key].to(dtype)).abs().max().item()

    with torch.no_grad():
        if dtype == torch.float32:
            assert err(g.mapping(z), "w_z") <= 1e-6
        img, wp = g.generate(z, randomize_noise=False)
        assert err(img, "img_z" + sfx) <= tol
        if dtype == torch.float32:
            assert err(wp, "latent_z") <= 1e-6
        assert err(g(wplus, randomize_noise=False), "img_wplus" + sfx) <= tol
        assert err(g(wplus, noise=noise), "img_wplus_noise" + sfx) <= tol
        img, wp = g.generate(z, truncation=0.7, randomize_noise=False)  # truncation_latent defaults to latent_avg
        assert err(img, "img_z_trunc" + sfx) <= tol
        if dtype == torch.float32:
            assert err(wp, "latent_z_trunc") <= 1e-6
        img2, _ = g.generate(z, truncation=0.7, truncation_latent=cases["latent_avg"].to(dtype), randomize_noise=False)
        assert torch.equal(img, img2)
    g.float()


def test_noise_is_used_and_randomized(cases):
    g = _direct()
    wplus = cases["wplus"]
    noise = [cases[f"noise_{i}"] for i in range(g.num_noises)]
    with torch.no_grad():
        ref = g(wplus, noise=noise)
        swapped = list(noise)
        swapped[3], swapped[4] = noise[4], noise[3]  # two 16x16 inputs
        assert (g(wplus, noise=swapped) - ref).abs().max() > 1e-2
        a, b = g(wplus, randomize_noise=True), g(wplus, randomize_noise=True)
        assert (a - b).abs().max() > 1e-3


def test_param_counts_and_style_dims():
    def n(m):
        return sum(p.numel() for p in m.parameters())

    with torch.device("meta"):
        g, d, g256 = Generator(1024), Discriminator(1024), Generator(256)
    assert n(g) == 30_370_060 and n(g.style) == 2_101_248 and n(g) - n(g.style) == 28_268_812
    assert n(d) == 29_012_513
    assert sum(g.style_dims) == 9088 and len(g.style_dims) == 17 + 9
    assert sum(g256.style_dims) == 8704
    assert (g.num_latents, g.num_noises) == (18, 17) and g.noise_resolutions[-1] == 1024
    assert g.channels == channel_table(1024) == {4: 512, 8: 512, 16: 512, 32: 512, 64: 512, 128: 256, 256: 128,
                                                  512: 64, 1024: 32}
    assert channel_table(32, 512, 64) == {4: 64, 8: 64, 16: 32, 32: 16}
    names = set(g.state_dict()) | set(d.state_dict())
    for key in ["style.1.weight", "conv1.conv.weight", "convs.0.conv.modulation.bias", "to_rgbs.0.bias",
                "noises.noise_0", "convs.0.conv.blur.kernel", "to_rgbs.0.upsample.kernel", "final_conv.0.weight",
                "final_linear.1.bias", "convs.1.skip.1.weight"]:
        assert key in names
    assert "latent_avg" not in g.state_dict()  # rosinality g_ema loads strict; latent_avg is stored beside it


def test_styles_override_reproduces_default(cases):
    g = _direct().double()
    wplus, noise = cases["wplus"].double(), [cases[f"noise_{i}"].double() for i in range(g.num_noises)]
    with torch.no_grad():
        styles = g.compute_styles(wplus)
        assert [s.shape[1] for s in styles] == g.style_dims
        ref = g(wplus, noise=noise)
        assert torch.equal(g(wplus, noise=noise, styles=styles), ref)
        # the styles really drive the output, and latents are then ignored
        assert torch.equal(g(torch.zeros_like(wplus), noise=noise, styles=styles), ref)
        # a uniform rescale would be cancelled by demodulation; change the channel balance instead
        styles[5] = styles[5] * torch.linspace(0.5, 1.5, styles[5].shape[1], dtype=torch.float64)
        assert (g(wplus, noise=noise, styles=styles) - ref).abs().max() > 1e-3
    with pytest.raises(ValueError, match="styles widths"):
        g(wplus, styles=styles[:-1])


def test_return_features_shapes():
    torch.manual_seed(0)
    g = Generator(64, style_dim=32, mapping_layers=2, channel_base=512, channel_max=32).eval()
    w = torch.randn(3, g.num_latents, 32)
    with torch.no_grad():
        img, feats = g(w, randomize_noise=False, return_features=True)
        assert torch.equal(img, g(w, randomize_noise=False))
    assert img.shape == (3, 3, 64, 64)
    assert {r: tuple(f.shape) for r, f in feats.items()} == {
        4: (3, 32, 4, 4), 8: (3, 32, 8, 8), 16: (3, 32, 16, 16), 32: (3, 16, 32, 32), 64: (3, 8, 64, 64)}
    assert g.noise_resolutions == [4, 8, 8, 16, 16, 32, 32, 64, 64]
    with pytest.raises(ValueError, match="latents must be"):
        g(torch.randn(3, 5, 32))
    with pytest.raises(ValueError, match="noise must be a list of 9"):
        g(w, noise=[None] * 3)


def test_discriminator_forward():
    torch.manual_seed(0)
    d = Discriminator(32, channel_base=512, channel_max=64)
    for b in (1, 2, 8):
        x = torch.randn(b, 3, 32, 32)
        out = d(x)
        assert out.shape == (b, 1) and torch.isfinite(out).all()
    # minibatch stddev: a sample's logit depends on the other samples of its group
    x = torch.randn(4, 3, 32, 32)
    y = x.clone()
    y[1] += 1.0
    assert (d(x)[0] - d(y)[0]).abs() > 0
    with pytest.raises(ValueError, match="minibatch stddev"):
        d(torch.randn(6, 3, 32, 32))
    loss = d(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    # every parameter of D is trained by its loss: a finite, non-zero gradient reaches each one
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in d.parameters())
