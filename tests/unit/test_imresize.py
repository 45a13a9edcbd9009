"""imresize against BasicSR/MATLAB bicubic references (shared/fixtures/imresize/cases.npz, README section 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from laren.data.pipeline import lr_hr_pair
from laren.imresize import imresize, imresize_uint8

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "imresize" / "cases.npz"


@pytest.fixture(scope="module")
def cases():
    return dict(np.load(FIXTURE))


def _float_cases(cases):
    for key in sorted(cases):
        if "_out_" in key:
            name, tag = key.split("_out_")
            yield name, tag


def _chw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def test_float64_matches_reference(cases):
    checked = 0
    for name, tag in _float_cases(cases):
        img, ref = cases[f"{name}_img"], cases[f"{name}_out_{tag}"]
        scale = float(cases[f"{name}_scale_{tag}"])
        out = imresize(_chw(img)[None], scale)[0].numpy().transpose(1, 2, 0)
        assert out.dtype == np.float64 and out.shape == ref.shape, (name, tag, out.shape)
        err = np.abs(out - ref).max()
        assert err <= 1e-10, (name, tag, err)
        checked += 1
    assert checked == 10  # rand64 x3, odd37x53 x4 (incl. x2 upscale), astro256 x3


def test_float32_within_tolerance_and_no_clipping(cases):
    img, ref = cases["odd37x53_img"], cases["odd37x53_out_u2"]
    out = imresize(_chw(img).float(), 2.0).numpy().transpose(1, 2, 0)
    assert np.abs(out - ref).max() <= 1e-6
    assert out.min() < -0.05 and out.max() > 1.05  # overshoot is kept: clipping belongs to the uint8 pipeline


def test_batched_equals_per_image(cases):
    imgs = [cases["rand64_img"], cases["astro256_img"][:64, :64]]
    batch = torch.stack([_chw(a) for a in imgs])  # (2, 3, 64, 64)
    out = imresize(batch, 0.125)
    assert out.shape == (2, 3, 8, 8)
    for i, a in enumerate(imgs):
        assert torch.equal(out[i], imresize(_chw(a)[None], 0.125)[0])
    np.testing.assert_allclose(out[0].numpy().transpose(1, 2, 0), cases["rand64_out_d8"], atol=1e-10, rtol=0)


def test_uint8_round_trip_exact(cases):
    img = torch.from_numpy(cases["face256_u8img"].transpose(2, 0, 1).copy())
    scale = float(cases["face256_u8scale_d16"])
    ref_float, ref_u8 = cases["face256_u8float_d16"], cases["face256_u8out_d16"]
    fl = imresize(img.double() / 255.0, scale).numpy().transpose(1, 2, 0)
    assert np.abs(fl - ref_float).max() <= 1e-10
    for dtype in (torch.float64, torch.float32):
        out = imresize_uint8(img[None], scale, dtype=dtype)[0].numpy().transpose(1, 2, 0)
        assert out.dtype == np.uint8 and np.array_equal(out, ref_u8), dtype


def test_lr_hr_pair_is_the_uint8_pipeline(cases):
    """The one uint8 HR -> (lr, hr) path of the loader and of data.lr_on_device: the MATLAB uint8 bytes, then
    x/127.5 - 1 (through tables, so every device gives the same values)."""
    img = torch.from_numpy(cases["face256_u8img"].transpose(2, 0, 1).copy())[None]  # (1, 3, 256, 256) uint8
    ref_u8 = torch.from_numpy(cases["face256_u8out_d16"].transpose(2, 0, 1).copy())[None]
    assert float(cases["face256_u8scale_d16"]) == 16 / 256
    lr, hr = lr_hr_pair(img, 16)
    assert lr.dtype == hr.dtype == torch.float32 and lr.shape == (1, 3, 16, 16)
    assert torch.equal(lr, ref_u8.float() / 127.5 - 1.0) and torch.equal(hr, img.float() / 127.5 - 1.0)
    every = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    assert torch.equal(lr_hr_pair(every.expand(1, 3, 16, 16), 4)[1], every.float().expand(1, 3, 16, 16) / 127.5 - 1.0)


def test_antialiasing_matters(cases):
    # at x1/16 the MATLAB kernel spans 64 taps; a 4-tap bicubic is far from the reference
    img = _chw(cases["astro256_img"])[None]
    plain = torch.nn.functional.interpolate(img, scale_factor=1 / 16, mode="bicubic", antialias=False, align_corners=False)
    ref = torch.from_numpy(cases["astro256_out_d16"].transpose(2, 0, 1))
    assert (plain[0] - ref).abs().max() > 0.05
    assert (imresize(img, 1 / 16)[0] - ref).abs().max() <= 1e-10


def test_rejects_wrong_dtypes():
    with pytest.raises(TypeError):
        imresize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.5)
    with pytest.raises(TypeError):
        imresize_uint8(torch.zeros(1, 3, 8, 8), 0.5)
