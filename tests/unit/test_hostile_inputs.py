"""Hostile and broken inputs: each payload is built here, handed to laren in a subprocess (a crash shows as a failure, a
hang as a timeout), and must give a clear error (exit 1 or 2, no traceback), run no code, write nothing and change no
global state."""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 60


def _cli(*args, cwd=None, env=None, timeout=CLI_TIMEOUT, mem_gb=None) -> subprocess.CompletedProcess:
    """`laren ARGS` in a fresh interpreter (optionally under an address-space limit); never through a shell."""
    code = "import sys\nfrom laren.cli import main\nsys.argv = ['laren', *sys.argv[1:]]\nmain()\n"
    if mem_gb:
        code = (f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({mem_gb << 30}, {mem_gb << 30}))\n" + code)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def _assert_clean_error(res, pattern: str) -> None:
    out = res.stdout + res.stderr
    assert res.returncode in (1, 2), (res.returncode, out[-3000:])
    assert "Traceback" not in out, out[-3000:]
    assert re.search(pattern, out, re.S), out[-3000:]


# ---------------------------------------------------------------------------------------------------------------------
# 1. prior import runs no code and stays bounded
# ---------------------------------------------------------------------------------------------------------------------


def _tiny_generator_sd():
    from laren.models.stylegan2 import Generator

    torch.manual_seed(0)
    return Generator(32, style_dim=8, mapping_layers=1, channel_multiplier=1, channel_max=8, channel_base=64).state_dict()


def _storage_bytes(t: torch.Tensor) -> bytes:
    """The legacy single-storage bytes that a pickled tensor carries (torch.storage._load_from_bytes's argument)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():  # TypedStorage is deprecated, but it is what pickled tensors carry
        warnings.simplefilter("ignore")
        torch.save(t.storage(), buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


class _Reduce:
    """Pickles as func(*args): the shape of every hand-made payload below."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _torchscript_archive() -> bytes:
    """A torch.save zip plus the entries that make torch hand the file to torch.jit.load."""
    buf = io.BytesIO()
    torch.save({"g_ema": {"w": torch.zeros(2)}}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for info in src.infolist():
            zf.writestr(info.filename, src.read(info))
        root = src.infolist()[0].filename.split("/")[0]
        zf.writestr(f"{root}/constants.pkl", pickle.dumps(()))
        zf.writestr(f"{root}/code/__torch__/m.py", "import os\nos.system('touch pwned')\n")
    return out.getvalue()


def _numpy_payload() -> bytes:
    import numpy as np

    return pickle.dumps({"G_ema": np.zeros(3)})


def _build_on_global() -> bytes:
    # GLOBAL torch.Size ; {"__doc__": "x"} ; BUILD : would set an attribute of an allow-listed class
    return b"\x80\x02ctorch\nSize\n}X\x07\x00\x00\x00__doc__X\x01\x00\x00\x00xsb."


def _dag_of_modules(depth=25) -> bytes:
    """NVIDIA-style persistent network records whose sub-modules are shared: 2**depth paths through `depth` objects."""
    import types

    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # a stand-in so that pickle can name the global; never called on load
        raise AssertionError

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    node = _Reduce(_reconstruct_persistent_obj, ({"type": "class", "class_name": "Leaf", "state": {}},))
    for _ in range(depth):
        node = _Reduce(_reconstruct_persistent_obj, ({"type": "class", "class_name": "L",
                                                      "state": {"_modules": {"a": node, "b": node}}},))
    parent = types.ModuleType("torch_utils")
    parent.persistence = mod
    sys.modules.update({"torch_utils": parent, mod.__name__: mod})
    try:
        return pickle.dumps({"G_ema": node})
    finally:
        del sys.modules[mod.__name__], sys.modules["torch_utils"]


def _zero_stride_pickle() -> bytes:
    storage = _Reduce(torch.storage._load_from_bytes, (_storage_bytes(torch.ones(1)),))
    big = _Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, (1 << 33,), (0,), False, collections.OrderedDict()))
    return pickle.dumps({"G_ema": big})


def _zero_stride_zip() -> bytes:
    buf = io.BytesIO()
    torch.save({"g_ema": {"input.input": torch.ones(1).expand(1 << 33)}}, buf)
    return buf.getvalue()


def _oversize_storage() -> bytes:
    raw = _storage_bytes(torch.arange(5.0))
    assert raw.count(b"K\x05N") == 1
    raw = raw.replace(b"K\x05N", b"J\x00\x00\x00\x40N")  # the record claims 2**30 floats; 20 bytes follow
    storage = _Reduce(torch.storage._load_from_bytes, (raw,))
    return pickle.dumps({"G_ema": _Reduce(torch._utils._rebuild_tensor_v2,
                                          (storage, 0, (5,), (1,), False, collections.OrderedDict()))})


def _deep_nesting(n=200_000) -> bytes:
    return b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b"."


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _dag_pickle(depth=80) -> bytes:
    node: list = []
    for _ in range(depth):
        node = [node, node]
    return pickle.dumps({"g_ema": {"x": node}})


PRIOR_PAYLOADS = {
    "torchscript": (_torchscript_archive, r"TorchScript archive"),
    "numpy-reconstruct": (_numpy_payload, r"refusing to load.*numpy"),
    "build-on-global": (_build_on_global, r"refusing to load.*sets the state"),
    "zero-stride-pickle": (_zero_stride_pickle, r"not backed by its storage"),
    "zero-stride-zip": (_zero_stride_zip, r"not backed by its storage"),
    "oversize-storage": (_oversize_storage, r"declares 1073741824 elements"),
    "deep-nesting": (_deep_nesting, r"nested deeper than"),
    "shared-reference-dag": (_dag_pickle, r"x\.pt.*(nested|generator state dict lacks|unrecognised)"),
    "shared-module-dag": (_dag_of_modules, r"x\.pt: G_ema has no synthesis\.b4\.const"),
    "os-system-in-zip": (lambda: _zip_with_evil(), r"refusing to load.*system"),
}


def _zip_with_evil() -> bytes:
    buf = io.BytesIO()
    torch.save({"g_ema": {}, "args": _Evil("/nonexistent/pwned")}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(PRIOR_PAYLOADS))
def test_prior_import_hostile(tmp_path, kind):
    make, pattern = PRIOR_PAYLOADS[kind]
    src = tmp_path / "x.pt"
    src.write_bytes(make())
    before = set(os.listdir(tmp_path))
    res = _cli("prior", "import", src, tmp_path / "out" / "p", cwd=tmp_path, mem_gb=4, timeout=60)
    _assert_clean_error(res, pattern)
    assert set(os.listdir(tmp_path)) == before  # no file written (no prior, no 'pwned')


def test_build_cannot_change_globals_in_process(tmp_path):
    """In this process: the refused BUILD leaves the allow-listed class as it was."""
    from laren.models.safe_pickle import UnsafePickleError, safe_unpickle_bytes

    doc = torch.Size.__doc__
    with pytest.raises(UnsafePickleError, match="sets the state"):
        safe_unpickle_bytes(_build_on_global(), "x")
    assert torch.Size.__doc__ == doc


def test_training_checkpoint_with_namespace_loads(tmp_path):
    """rosinality training checkpoints carry argparse args: they import (as an inert placeholder)."""
    import argparse

    from laren.models.prior_io import import_prior, load_prior
    from laren.models.safe_pickle import NAMESPACE

    torch.save({"g_ema": _tiny_generator_sd(), "args": argparse.Namespace(size=16, lr=0.002)}, tmp_path / "t.pt")
    meta = import_prior(str(tmp_path / "t.pt"), str(tmp_path / "p"))
    g, _, _ = load_prior(str(tmp_path / "p"))
    assert meta.resolution == 32 and g.resolution == 32
    assert not [g for g in torch.serialization.get_safe_globals() if isinstance(g, tuple) and g[0] is NAMESPACE]


def test_prior_json_implying_huge_allocation(tmp_path):
    import json

    from laren.models.prior_io import import_prior

    torch.save({"g_ema": _tiny_generator_sd()}, tmp_path / "t.pt")
    import_prior(str(tmp_path / "t.pt"), str(tmp_path / "p"))
    meta = json.loads((tmp_path / "p.json").read_text())
    meta.update(resolution=1024, channel_max=4096, channel_base=1 << 24, style_dim=4096)
    (tmp_path / "p.json").write_text(json.dumps(meta))
    code = ("import resource, sys\nresource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
            "from laren.models.prior_io import load_prior\n"
            "try:\n    load_prior(sys.argv[1])\nexcept ValueError as e:\n    print('refused:', e); sys.exit(1)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "p")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    _assert_clean_error(res, r"refused: .*p\.json: the architecture needs \d+ bytes of weights, more than")


def test_no_unsafe_calls_in_source():
    """Grep: no `weights_only=False` and no `shell=True` anywhere in laren/."""
    hits = [f"{p.relative_to(REPO)}:{i}" for p in (REPO / "laren").rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"weights_only\s*=\s*False|shell\s*=\s*True", line)]
    assert not hits, hits


# ---------------------------------------------------------------------------------------------------------------------
# 3. checkpoints are verified whole
# ---------------------------------------------------------------------------------------------------------------------


def _checkpoint(tmp_path):
    import json

    from laren.train import state as S

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    d = S.save_checkpoint(tmp_path / "ck", model, None, {"g": opt}, S.TrainState(step=1))
    return S, d, json.loads((d / S.STATE_FILE).read_text())


def _tamper_weights(S, d):
    from safetensors.torch import load_file, save_file

    w = load_file(str(d / S.WEIGHTS_FILE))
    save_file({k: v + 1 for k, v in w.items()}, str(d / S.WEIGHTS_FILE))


@pytest.mark.parametrize("kind", ["entry-removed", "path-outside", "extra-file", "mismatch", "file-missing"])
def test_checkpoint_checksums_cover_exactly_its_files(tmp_path, kind):
    import json

    S, d, doc = _checkpoint(tmp_path)
    (tmp_path / "outside").write_text("x")
    if kind == "entry-removed":  # tampered weights whose checksum entry was dropped
        _tamper_weights(S, d)
        del doc["sha256"][S.WEIGHTS_FILE]
        pattern = r"sha256 map must name exactly"
    elif kind == "path-outside":
        doc["sha256"]["../outside"] = "0" * 64
        pattern = r"sha256 map must name exactly.*\.\./outside"
    elif kind == "extra-file":
        (d / "extra.safetensors").write_bytes(b"x")
        pattern = r"extra\.safetensors: not part of the checkpoint"
    elif kind == "mismatch":
        _tamper_weights(S, d)
        pattern = r"weights\.safetensors: does not match the checksum"
    else:
        (d / S.OPTIM_FILE).unlink()
        pattern = r"optim\.safetensors: missing"
    (d / S.STATE_FILE).write_text(json.dumps(doc))
    with pytest.raises(S.CheckpointError, match=pattern):
        S.read_state(d)
    res = _cli("upscale", "--checkpoint", d, tmp_path / "none.png", "--out", tmp_path / "sr")
    _assert_clean_error(res, pattern)
    assert not (tmp_path / "sr").exists()
