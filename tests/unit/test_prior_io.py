"""Safe prior import (laren.models.prior_io): the three source layouts, refusal of code-running pickles, the laren
prior format (checksum, missing files), and architecture detection from tensor shapes.

The NVIDIA and mmagic files are built here from the rosinality fixture with the documented source names, so each
import must reproduce the fixture's reference images.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import rosinality_checkpoint
import torch
from torch import nn

from laren.models.prior_io import UnsafePickleError, fit_channel_table, import_prior, load_prior
from laren.models.stylegan2 import Discriminator

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "stylegan2"
CKPT = rosinality_checkpoint()
CASES = FIXTURES / "rosinality-32px-cases.npz"


@pytest.fixture(scope="module")
def ros():
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def cases():
    with np.load(CASES) as f:
        return {k: torch.from_numpy(f[k]) for k in f.files}


@pytest.fixture(scope="module")
def disc():
    torch.manual_seed(1)
    d = Discriminator(32, channel_base=512, channel_max=64)
    with torch.no_grad():
        for p in d.parameters():
            p.normal_()  # biases non-zero too, so a mis-mapped bias shows
    return d


def _assert_matches_fixture(g, cases):
    with torch.no_grad():
        assert (g.mapping(cases["z"]) - cases["w_z"]).abs().max() <= 1e-6
        img, _ = g.generate(cases["z"], truncation=0.7, randomize_noise=False)
        assert (img - cases["img_z_trunc"]).abs().max() <= 5e-5
        noise = [cases[f"noise_{i}"] for i in range(g.num_noises)]
        assert (g(cases["wplus"], noise=noise) - cases["img_wplus_noise"]).abs().max() <= 5e-5
        assert (g(cases["wplus"], randomize_noise=False) - cases["img_wplus"]).abs().max() <= 5e-5


def _assert_same_d(d, ref):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(d(x), ref(x))


# ---------------------------------------------------------------------------------------------------------------------
# rosinality
# ---------------------------------------------------------------------------------------------------------------------


def test_rosinality_training_checkpoint_with_namespace_and_d(tmp_path, ros, cases, disc):
    """A training checkpoint carries args (argparse Namespace, refused by weights_only): read by the safe fallback."""
    src = tmp_path / "train.pt"
    torch.save({"g": ros["g_ema"], "g_ema": ros["g_ema"], "d": disc.state_dict(), "latent_avg": ros["latent_avg"],
                "args": argparse.Namespace(size=32, channel_multiplier=1), "ada_aug_p": 0.1}, src)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(src, weights_only=True)
    meta = import_prior(str(src), str(tmp_path / "p"))
    assert meta.has_discriminator and meta.source_format == "rosinality" and meta.latent_avg_source == "checkpoint"
    g, d, meta2 = load_prior(str(tmp_path / "p.safetensors"))
    _assert_matches_fixture(g, cases)
    _assert_same_d(d, disc)
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved["channel_base"] == 512 and saved["channel_max"] == 64 and saved["resolution"] == 32
    assert not any(n.startswith(".p.") for n in os.listdir(tmp_path))  # no temp files left


def test_missing_latent_avg_is_computed(tmp_path, ros):
    torch.save({"g_ema": ros["g_ema"]}, tmp_path / "noavg.pt")
    meta = import_prior(str(tmp_path / "noavg.pt"), str(tmp_path / "p"))
    g = load_prior(str(tmp_path / "p"))[0]
    assert meta.latent_avg_source == "computed"
    # the fixture's latent_avg is also a 4096-sample mean of the mapping: the two agree to sampling error
    assert (g.latent_avg - ros["latent_avg"]).abs().max() < 0.1


# ---------------------------------------------------------------------------------------------------------------------
# mmagic
# ---------------------------------------------------------------------------------------------------------------------


def _to_mmagic_g(sd):
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^style\.(\d+)\.weight$", r"style_mapping.\1.linear.weight_orig", k)
        k = re.sub(r"^style\.(\d+)\.bias$", r"style_mapping.\1.bias", k)
        k = re.sub(r"^input\.input$", "constant_input.input", k)
        k = re.sub(r"^noises\.noise_(\d+)$", r"injected_noise_\1", k)
        k = re.sub(r"\.conv\.modulation\.weight$", ".conv.style_modulation.linear.weight_orig", k)
        k = re.sub(r"\.conv\.modulation\.bias$", ".conv.style_modulation.bias", k)
        k = re.sub(r"\.conv\.weight$", ".conv.weight_orig", k)
        k = re.sub(r"\.noise\.weight$", ".noise_injector.weight", k)
        out[k] = v
    return out


def _to_mmagic_d(sd):
    out = {}
    for k, v in sd.items():
        if k.startswith("final_linear.") and k.endswith(".weight"):
            k = k[: -len("weight")] + "linear.weight_orig"
        elif k.endswith(".weight"):
            k = k[: -len("weight")] + "conv.weight_orig"
        out[k] = v
    return out


def test_mmagic_pth(tmp_path, ros, cases, disc):
    sd = {f"generator_ema.{k}": v for k, v in _to_mmagic_g(ros["g_ema"]).items()}
    sd.update({f"generator.{k}": torch.zeros_like(v) for k, v in _to_mmagic_g(ros["g_ema"]).items()})  # non-EMA: ignored
    sd.update({f"discriminator.{k}": v for k, v in _to_mmagic_d(disc.state_dict()).items()})
    assert "generator_ema.convs.0.conv.style_modulation.linear.weight_orig" in sd
    assert "discriminator.convs.1.conv2.1.conv.weight_orig" in sd
    torch.save({"meta": {"epoch": 3}, "state_dict": sd}, tmp_path / "mm.pth")
    meta = import_prior(str(tmp_path / "mm.pth"), str(tmp_path / "out" / "mm"))
    assert meta.source_format == "mmagic" and meta.has_discriminator
    g, d, _ = load_prior(str(tmp_path / "out" / "mm"))
    _assert_same_d(d, disc)
    g.latent_avg.copy_(ros["latent_avg"])  # mmagic stores no w_avg here: truncation must use the fixture's mean
    _assert_matches_fixture(g, cases)


# ---------------------------------------------------------------------------------------------------------------------
# NVIDIA stylegan2-ada-pytorch: a pickle of torch_utils.persistence objects, built in a throwaway module
# ---------------------------------------------------------------------------------------------------------------------

RESAMPLE = torch.outer(torch.tensor([1.0, 3, 3, 1]), torch.tensor([1.0, 3, 3, 1])) / 64


def _to_nvidia_g(sd, latent_avg):
    nv = {"mapping.w_avg": latent_avg.clone()}
    for k, v in sd.items():
        if m := re.match(r"style\.(\d+)\.(weight|bias)$", k):
            nv[f"mapping.fc{int(m.group(1)) - 1}.{m.group(2)}"] = v
    n_rgb = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"to_rgbs\.(\d+)\.", k)))
    nv["synthesis.b4.const"] = sd["input.input"][0]

    def conv(src, dst, noise_idx):
        nv[f"{dst}.weight"] = sd[f"{src}.conv.weight"][0]
        nv[f"{dst}.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        nv[f"{dst}.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        nv[f"{dst}.noise_strength"] = sd[f"{src}.noise.weight"].reshape(())
        nv[f"{dst}.bias"] = sd[f"{src}.activate.bias"]
        nv[f"{dst}.noise_const"] = sd[f"noises.noise_{noise_idx}"][0, 0]
        nv[f"{dst}.resample_filter"] = RESAMPLE.clone()

    def torgb(src, dst):
        nv[f"{dst}.torgb.weight"] = sd[f"{src}.conv.weight"][0]
        nv[f"{dst}.torgb.affine.weight"] = sd[f"{src}.conv.modulation.weight"]
        nv[f"{dst}.torgb.affine.bias"] = sd[f"{src}.conv.modulation.bias"]
        nv[f"{dst}.torgb.bias"] = sd[f"{src}.bias"].reshape(3)

    conv("conv1", "synthesis.b4.conv1", 0)
    torgb("to_rgb1", "synthesis.b4")
    for k in range(n_rgb):
        r = 8 * 2**k
        conv(f"convs.{2 * k}", f"synthesis.b{r}.conv0", 2 * k + 1)
        conv(f"convs.{2 * k + 1}", f"synthesis.b{r}.conv1", 2 * k + 2)
        torgb(f"to_rgbs.{k}", f"synthesis.b{r}")
        nv[f"synthesis.b{r}.resample_filter"] = RESAMPLE.clone()
    return nv


def _to_nvidia_d(sd, resolution):
    nv = {f"b{resolution}.fromrgb.weight": sd["convs.0.0.weight"], f"b{resolution}.fromrgb.bias": sd["convs.0.1.bias"]}
    i, r = 1, resolution
    while f"convs.{i}.conv1.0.weight" in sd:
        nv[f"b{r}.conv0.weight"], nv[f"b{r}.conv0.bias"] = sd[f"convs.{i}.conv1.0.weight"], sd[f"convs.{i}.conv1.1.bias"]
        nv[f"b{r}.conv1.weight"], nv[f"b{r}.conv1.bias"] = sd[f"convs.{i}.conv2.1.weight"], sd[f"convs.{i}.conv2.2.bias"]
        nv[f"b{r}.skip.weight"] = sd[f"convs.{i}.skip.1.weight"]
        nv[f"b{r}.resample_filter"] = RESAMPLE.clone()
        i, r = i + 1, r // 2
    for src, dst in [("final_conv.0.weight", "b4.conv.weight"), ("final_conv.1.bias", "b4.conv.bias"),
                     ("final_linear.0.weight", "b4.fc.weight"), ("final_linear.0.bias", "b4.fc.bias"),
                     ("final_linear.1.weight", "b4.out.weight"), ("final_linear.1.bias", "b4.out.bias")]:
        nv[dst] = sd[src]
    return nv


def _nvidia_pickle(g_flat, d_flat, marker: Path, lr_multiplier=0.01) -> bytes:
    """Pickle dict(G, D, G_ema, ...) whose networks reduce to torch_utils.persistence._reconstruct_persistent_obj
    with module_src that, if ever exec'd, would create `marker`."""
    persistence = types.ModuleType("torch_utils.persistence")
    torch_utils = types.ModuleType("torch_utils")
    torch_utils.persistence = persistence
    dnnlib = types.ModuleType("dnnlib")
    dnnlib_util = types.ModuleType("dnnlib.util")
    dnnlib.util = dnnlib_util

    def _reconstruct_persistent_obj(meta):  # never called on load: the loader must not resolve this global
        raise AssertionError("the loader resolved the real persistence function")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    EasyDict = type("EasyDict", (dict,), {"__module__": "dnnlib.util"})
    dnnlib_util.EasyDict = EasyDict
    src = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"

    class Persistent(nn.Module):
        def __init__(self, class_name):
            super().__init__()
            self.class_name = class_name

        def __reduce_ex__(self, protocol):
            meta = dict(type="class", version=6, module_src=src, class_name=self.class_name, state=dict(self.__dict__))
            return (_reconstruct_persistent_obj, (meta,))

    def tree(flat, class_name):
        root = Persistent(class_name)
        for name, t in flat.items():
            *path, leaf = name.split(".")
            node = root
            for part in path:
                if part not in node._modules:
                    node.add_module(part, Persistent("training.networks.Layer"))
                node = node._modules[part]
            if leaf in ("w_avg", "noise_const", "resample_filter"):
                node.register_buffer(leaf, t.clone())
            else:
                node.register_parameter(leaf, nn.Parameter(t.clone()))
        return root

    saved = {k: sys.modules.get(k) for k in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")}
    sys.modules.update({"torch_utils": torch_utils, "torch_utils.persistence": persistence, "dnnlib": dnnlib,
                        "dnnlib.util": dnnlib_util})
    try:
        g = tree(g_flat, "training.networks.Generator")
        g.init_kwargs = EasyDict(z_dim=64, w_dim=64, mapping_kwargs=EasyDict(lr_multiplier=lr_multiplier))
        d = tree(d_flat, "training.networks.Discriminator")
        return pickle.dumps({"G": g, "D": d, "G_ema": g, "augment_pipe": None,
                             "training_set_kwargs": EasyDict(resolution=32, xflip=True)})
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


@pytest.mark.parametrize("lr_multiplier", [0.01, 0.1])
def test_nvidia_pkl(tmp_path, ros, cases, disc, lr_multiplier):
    marker = tmp_path / "code-ran"
    g_flat = _to_nvidia_g(ros["g_ema"], ros["latent_avg"])
    scale = 0.01 / lr_multiplier  # same effective weights under a different lr_multiplier
    for k in list(g_flat):
        if k.startswith("mapping.fc"):
            g_flat[k] = g_flat[k] * scale
    blob = _nvidia_pickle(g_flat, _to_nvidia_d(disc.state_dict(), 32), marker, lr_multiplier)
    assert b"torch_utils.persistence" in blob and b"_reconstruct_persistent_obj" in blob
    assert "torch_utils" not in sys.modules  # the loader cannot fall back on an importable module
    (tmp_path / "net.pkl").write_bytes(blob)
    meta = import_prior(str(tmp_path / "net.pkl"), str(tmp_path / "nv"))
    assert not marker.exists()
    assert meta.source_format == "nvidia" and meta.has_discriminator and meta.latent_avg_source == "checkpoint"
    assert (meta.resolution, meta.style_dim, meta.mapping_layers, meta.channel_base, meta.channel_max) == (32, 64, 2, 512, 64)
    g, d, _ = load_prior(str(tmp_path / "nv"))
    assert torch.allclose(g.latent_avg, ros["latent_avg"])
    _assert_matches_fixture(g, cases)
    _assert_same_d(d, disc)


# ---------------------------------------------------------------------------------------------------------------------
# refusal, format checks, detection
# ---------------------------------------------------------------------------------------------------------------------


class _Evil:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["plain-pickle", "torch-zip", "evil-inside-checkpoint-dict"])
def test_code_running_pickle_is_refused(tmp_path, ros, kind):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    src = tmp_path / f"evil-{kind}.bin"
    if kind == "plain-pickle":
        src.write_bytes(pickle.dumps({"G_ema": evil}))
    elif kind == "torch-zip":
        torch.save({"g_ema": ros["g_ema"], "args": evil}, src)
    else:
        src.write_bytes(pickle.dumps(collections.OrderedDict(g_ema=ros["g_ema"], hook=[1, evil])))
    with pytest.raises(UnsafePickleError, match=r"refusing to load.*(posix|os|nt)\.system.*Nothing from the file was executed"):
        import_prior(str(src), str(tmp_path / "out"))
    assert not marker.exists()
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "out.safetensors").exists()


def test_cli_refuses_and_reports(tmp_path):
    from click.testing import CliRunner

    from laren.cli import main

    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = str(marker)
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(evil))
    res = CliRunner().invoke(main, ["prior", "import", str(tmp_path / "evil.pkl"), str(tmp_path / "out")])
    assert res.exit_code != 0 and "refusing to load" in res.output and not marker.exists()
    res = CliRunner().invoke(main, ["prior", "import", str(tmp_path / "absent.pt"), str(tmp_path / "out")])
    assert res.exit_code != 0 and "absent.pt" in res.output and "not found" in res.output


def test_load_prior_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.json.*laren prior import"):
        load_prior(str(tmp_path / "nothing"))
    import_prior(str(CKPT), str(tmp_path / "p"))
    st = tmp_path / "p.safetensors"
    blob = bytearray(st.read_bytes())
    blob[-1] ^= 0x01
    st.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_prior(str(tmp_path / "p"))
    st.unlink()
    with pytest.raises(FileNotFoundError, match=r"p\.safetensors.*laren prior import"):
        load_prior(str(tmp_path / "p"))


def test_unrecognised_layout(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        import_prior(str(tmp_path / "x.pt"), str(tmp_path / "o"))


def test_fit_channel_table():
    from laren.models.stylegan2 import channel_table

    for r, base, cmax in [(1024, 32768, 512), (256, 16384, 512), (32, 512, 64), (128, 2048, 128)]:
        table = channel_table(r, base, cmax)
        fb, fm, _ = fit_channel_table(table)
        assert channel_table(r, fb, fm) == table
    assert fit_channel_table(channel_table(1024, 32768, 512)) == (32768, 512, 2)
    assert fit_channel_table(channel_table(256, 16384, 512)) == (16384, 512, 1)
    assert fit_channel_table({4: 64, 8: 64, 16: 32, 32: 16}) == (512, 64, 1)
    with pytest.raises(ValueError, match="not of the form"):
        fit_channel_table({4: 64, 8: 16, 16: 32})
