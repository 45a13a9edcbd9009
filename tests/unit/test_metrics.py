"""Metrics (model-spec section 7): PSNR/SSIM against scikit-image, LPIPS against the reference `lpips` forward,
latent correlation and DCI on hand-computable inputs."""

import math
import sys
import types

import numpy as np
import pytest
import torch

from laren import metrics
from laren.metrics import LPIPS, dci, latent_correlation, psnr, ssim

skm = pytest.importorskip("skimage.metrics")


def _pair(seed=0, b=3, h=32, w=40, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    hr = torch.rand(b, 3, h, w, generator=g) * 2 - 1
    sr = (hr + noise * torch.randn(b, 3, h, w, generator=g)).clamp(-1.2, 1.2)  # also exercises clamping
    return sr, hr


def _to_u8_hwc(x_b3hw):
    """The uint8 images the metrics are defined on (mmagic tensor2img rounding)."""
    return ((x_b3hw.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_psnr_matches_skimage_per_image():
    sr, hr = _pair()
    got = psnr(sr, hr)
    assert got.shape == (3,) and got.dtype == torch.float64
    a, b = _to_u8_hwc(sr), _to_u8_hwc(hr)
    for i in range(3):
        ref = skm.peak_signal_noise_ratio(b[i], a[i], data_range=255)
        assert got[i].item() == pytest.approx(ref, abs=1e-9)


def test_psnr_hand_value_and_identity():
    hr = torch.zeros(1, 3, 4, 4)  # uint8 value round(127.5) = 128
    sr = hr.clone()
    sr[0, 0, 0, 0] = 1.0  # 255: one pixel off by 127 over 48 values
    mse = 127.0**2 / 48
    assert psnr(sr, hr).item() == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    assert math.isinf(psnr(hr, hr).item())


def test_ssim_matches_skimage_per_image():
    sr, hr = _pair(seed=1)
    got = ssim(sr, hr)
    assert got.shape == (3,)
    a, b = _to_u8_hwc(sr), _to_u8_hwc(hr)
    for i in range(3):
        ref = skm.structural_similarity(
            a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=2
        )
        assert got[i].item() == pytest.approx(ref, abs=1e-9)
    assert ssim(hr, hr).allclose(torch.ones(3, dtype=torch.float64))


def test_ssim_falls_with_noise():
    values = [ssim(*_pair(seed=2, b=1, noise=n)).item() for n in (0.02, 0.1, 0.4)]
    assert values[0] > values[1] > values[2]


# ----------------------------------------------------------------------------------------------- LPIPS


@pytest.fixture(scope="module")
def lp():
    return LPIPS(random_backbone_for_tests=True, seed=0)


def test_lpips_invariants(lp):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(2, 3, 64, 64, generator=g)
    assert lp(x, x).abs().max().item() < 1e-6
    d = [lp(x, (x + s * noise).clamp(-1, 1)) for s in (0.05, 0.2, 0.6)]
    assert d[0].shape == (2,)
    assert (d[0] < d[1]).all() and (d[1] < d[2]).all() and (d[0] > 0).all()
    y = (x + 0.3 * noise).clamp(-1, 1)
    torch.testing.assert_close(lp(x, y), lp(y, x), rtol=1e-5, atol=1e-7)
    assert not lp.training and all(not p.requires_grad for p in lp.parameters())


def test_lpips_matches_reference_lpips_forward(lp, monkeypatch):
    """The installed `lpips` package (0.1.4) imports torchvision only to build AlexNet. With a stand-in torchvision
    whose `models.alexnet` returns our trunk, the reference LPIPS forward (scaling layer, normalisation, lin layers,
    averaging) runs on the same weights and must give the same numbers as ours."""
    tv = types.ModuleType("torchvision")
    tv_models = types.ModuleType("torchvision.models")
    tv_models.alexnet = lambda *a, **k: types.SimpleNamespace(features=lp.net.features)
    tv.models = tv_models
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv_models)
    before = set(sys.modules)
    try:
        pytest.importorskip("scipy.ndimage")  # lpips.trainer imports it
        import lpips as ref_lpips

        ref = ref_lpips.LPIPS(net="alex", version="0.1", verbose=False)
        g = torch.Generator().manual_seed(4)
        x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
        y = (x + 0.3 * torch.randn(3, 3, 64, 64, generator=g)).clamp(-1, 1)
        with torch.no_grad():
            expected = ref(x, y).flatten().double()
        got = lp(x, y)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    finally:
        for name in set(sys.modules) - before:
            if name == "lpips" or name.startswith("lpips."):
                del sys.modules[name]


def test_lpips_loads_torchvision_alexnet_layout(tmp_path, lp):
    sd = {f"features.{k}": v.clone() for k, v in lp.net.features.state_dict().items()}
    sd["classifier.1.weight"] = torch.zeros(4, 4)  # ignored
    path = tmp_path / "alexnet-owt-7be5be79.pth"
    torch.save(sd, path)
    loaded = LPIPS(path)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    y = torch.rand(1, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(loaded(x, y), lp(x, y))


def test_lpips_missing_alexnet_names_file_and_url(tmp_path):
    missing = tmp_path / "alexnet-owt-7be5be79.pth"
    with pytest.raises(FileNotFoundError) as e:
        LPIPS(missing)
    assert str(missing) in str(e.value) and metrics.ALEXNET_URL in str(e.value)
    with pytest.raises(ValueError, match="eval.alexnet_path"):
        LPIPS(None)


# ----------------------------------------------------------------------------------------------- latent analysis


def test_latent_correlation_hand_values():
    t = np.arange(6, dtype=np.float64)
    a = np.stack([t, -2 * t + 1, np.ones(6)], axis=1)  # (6, 3): x, an exact negative copy, a constant
    b = np.stack([t, np.array([1, -1, 1, -1, 1, -1.0])], axis=1)  # (6, 2)
    r = latent_correlation(a, b)
    assert r.shape == (3, 2)
    assert r[0, 0] == pytest.approx(1.0) and r[1, 0] == pytest.approx(1.0)  # |ρ| of a negative relation is 1
    assert r[2, 0] == 0.0 and r[2, 1] == 0.0  # constant dim: defined as 0
    # corr(t, alternating): cov = mean(t·s) − mean(t)mean(s) = (0−1+2−3+4−5)/6 − 2.5·0 = −0.5; σ_t = √(35/12), σ_s = 1
    assert r[0, 1] == pytest.approx(0.5 / math.sqrt(35 / 12))
    rt = latent_correlation(torch.tensor(a), torch.tensor(b))
    np.testing.assert_allclose(rt, r)
    np.testing.assert_allclose(r[:2], np.abs(np.corrcoef(a[:, :2].T, b.T)[:2, 2:]), atol=1e-12)


def test_dci_hand_values():
    perfect = dci(np.eye(3), [0.9, 0.8, 1.0])
    assert perfect["D"] == pytest.approx(1.0, abs=1e-9) and perfect["C"] == pytest.approx(1.0, abs=1e-9)
    assert perfect["I"] == pytest.approx(0.9)
    uniform = dci(np.ones((4, 3)), [0.5, 0.5, 0.5])
    assert uniform["D"] == pytest.approx(0.0, abs=1e-9) and uniform["C"] == pytest.approx(0.0, abs=1e-9)
    # R = [[1,1],[0,2]]: row 0 uniform (1−H=0), row 1 pure (1), ρ = (1/2, 1/2) -> D = 0.5.
    # Columns: col 0 = (1, 0) pure, weight 1/4; col 1 = (1/3, 2/3), H2 = 0.918296, weight 3/4 -> C = 0.25 + 0.75·0.081704.
    s = dci([[1.0, 1.0], [0.0, 2.0]], [1.0, 0.0])
    h = -(1 / 3 * math.log2(1 / 3) + 2 / 3 * math.log2(2 / 3))
    assert s["D"] == pytest.approx(0.5, abs=1e-9)
    assert s["C"] == pytest.approx(0.25 + 0.75 * (1 - h), abs=1e-9)
    assert s["I"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="accuracies"):
        dci(np.eye(3), [1.0, 1.0])
