"""Hostile and broken inputs: each payload is built here, handed to laren in a subprocess (a crash shows as a failure, a
hang as a timeout), and must give a clear error (exit 1 or 2, no traceback), run no code, write nothing and change no
global state. Payloads of one kind (prior imports, shard checks) share one subprocess, which runs the CLI on each in
turn: one interpreter start instead of one per payload."""

from __future__ import annotations

import collections
import io
import json
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

from tests.unit.test_specs import TINY_MODEL

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


# `laren ARGS` for each (cwd, ARGS) read from stdin, in turn, under the address-space limit argv[1] (GiB); the
# results (exit code, stdout, stderr with the traceback of an exception that escaped the CLI) go to the file argv[2].
_BATCH_CODE = """\
import json, os, resource, sys, traceback
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]) << 30, int(sys.argv[1]) << 30))
from click.testing import CliRunner
from laren.cli import main
out = []
for cwd, args in json.load(sys.stdin):
    os.chdir(cwd)
    res = CliRunner().invoke(main, args)
    escaped = res.exc_info is not None and res.exc_info[0] is not SystemExit
    tb = "".join(traceback.format_exception(*res.exc_info)) if escaped else ""
    out.append([res.exit_code, res.stdout, res.stderr + tb])
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
"""


def _cli_batch(runs: list[tuple[Path, list]], results: Path, mem_gb: int,
               timeout: float) -> list[subprocess.CompletedProcess]:
    """`laren ARGS` for each (cwd, ARGS) of ``runs``, in turn, in one fresh interpreter under an address-space limit
    (a crash or a hang fails them all); never through a shell. ``results`` is the file the interpreter writes."""
    job = json.dumps([[str(cwd), [str(a) for a in args]] for cwd, args in runs])
    proc = subprocess.run([sys.executable, "-c", _BATCH_CODE, str(mem_gb), str(results)], input=job, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return [subprocess.CompletedProcess(args, code, out, err)
            for (_, args), (code, out, err) in zip(runs, json.loads(results.read_text()))]


def _cli_here(*args, env=None) -> subprocess.CompletedProcess:
    """`laren ARGS` in this process, for inputs that are only parsed as config (nothing risky is decoded); an exception
    that escapes the CLI shows as a traceback in stderr."""
    import traceback

    from click.testing import CliRunner

    from laren.cli import main

    res = CliRunner(env=env).invoke(main, [str(a) for a in args])
    escaped = res.exc_info and res.exc_info[0] is not SystemExit
    tb = "".join(traceback.format_exception(*res.exc_info)) if escaped else ""
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr + tb)


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
    "zero-stride-pickle": (_zero_stride_pickle, r"x\.pt: refusing to load: pickled tensor: .*not backed by its storage"),
    "zero-stride-zip": (_zero_stride_zip, r"not backed by its storage"),
    "oversize-storage": (_oversize_storage, r"x\.pt: refusing to load: a storage declares 1073741824 elements"),
    "deep-nesting": (_deep_nesting, r"nested deeper than"),
    "shared-reference-dag": (_dag_pickle, r"x\.pt.*(nested|generator state dict lacks|unrecognised)"),
    "shared-module-dag": (_dag_of_modules, r"x\.pt: G_ema has no synthesis\.b4\.const"),
    "os-system-in-zip": (lambda: _zip_with_evil(), r"refusing to load.*system"),
}


def _zip_with_evil() -> bytes:
    buf = io.BytesIO()
    torch.save({"g_ema": {}, "args": _Evil("/nonexistent/pwned")}, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def prior_imports(tmp_path_factory) -> dict:
    """kind -> (`laren prior import` of its payload x.pt, in its own folder; the folder's listing before; after)."""
    folders = {kind: tmp_path_factory.mktemp(kind) for kind in PRIOR_PAYLOADS}
    for kind, d in folders.items():
        (d / "x.pt").write_bytes(PRIOR_PAYLOADS[kind][0]())
    before = {kind: set(os.listdir(d)) for kind, d in folders.items()}
    runs = [(d, ["prior", "import", d / "x.pt", d / "out" / "p"]) for d in folders.values()]
    results = _cli_batch(runs, tmp_path_factory.mktemp("results") / "prior.json", mem_gb=4, timeout=120)
    return {kind: (res, before[kind], set(os.listdir(d))) for (kind, d), res in zip(folders.items(), results)}


@pytest.mark.parametrize("kind", sorted(PRIOR_PAYLOADS))
def test_prior_import_hostile(prior_imports, kind):
    res, before, after = prior_imports[kind]
    _assert_clean_error(res, PRIOR_PAYLOADS[kind][1])
    assert after == before  # no file written (no prior, no 'pwned')


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
    res = _cli_here("upscale", "--checkpoint", d, tmp_path / "none.png", "--out", tmp_path / "sr")
    _assert_clean_error(res, pattern)
    assert not (tmp_path / "sr").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 4. no shell: quoted entrypoints, strict job names
# ---------------------------------------------------------------------------------------------------------------------

def _job_file(path: Path, **sections) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "t", "model": TINY_MODEL, **sections}, sort_keys=False))
    return path


def test_entrypoint_quotes_hostile_paths(tmp_path):
    """A shell splits the entrypoint into exactly the intended words, whatever the job file and project are called."""
    import shlex

    from laren.jobs.entrypoints import job_entrypoint
    from laren.services import STATE_DIR

    root = tmp_path / "my project;touch pwned"
    rel = "jobs/x;touch pwned;#.yaml"
    words = shlex.split(job_entrypoint("train", rel, root))
    assert words == ["ln", "-sfn", str(root / STATE_DIR), STATE_DIR, "&&", "python", "-m", "laren.cli", "train", rel]
    assert shlex.split(job_entrypoint("eval", "jobs/a b.yaml")) == ["python", "-m", "laren.cli", "run-eval", "jobs/a b.yaml"]


def test_render_refuses_hostile_file_name(tmp_path):
    job = _job_file(tmp_path / "x;touch pwned;#.yaml", storage={"root": "s3://b/laren"})
    res = _cli_here("render", "k8s", job)
    _assert_clean_error(res, r"must be named with letters, digits")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("name", ["demo\n", "Demo", "-demo", "1demo", "de mo", "de;mo", "de_mo", ""])
def test_job_name_must_match(tmp_path, name):
    job = _job_file(tmp_path / "j.yaml")
    job.write_text(job.read_text().replace("name: t", f"name: {name!r}".replace("'", '"').replace("\n", "\\n")))
    res = _cli_here("validate", "--no-summary", job)
    _assert_clean_error(res, r"name.*must start with a lowercase letter")


# ---------------------------------------------------------------------------------------------------------------------
# 5. secrets
# ---------------------------------------------------------------------------------------------------------------------

PASSWORDS = ["plain", "with/slash", "with@at", "a:b/c@d#e?f", "@/@"]


@pytest.mark.parametrize("pw", PASSWORDS)
def test_redaction_covers_any_password(pw):
    from laren.redact import redact, redact_text

    uri = f"http://alice:{pw}@mlflow.example:5000/api?x=1"
    assert redact_text(uri) == "http://alice:***@mlflow.example:5000/api?x=1"
    assert redact_text(f"error contacting {uri}: refused") == "error contacting http://alice:***@mlflow.example:5000/api?x=1: refused"
    assert redact_text(uri, mask=None) == "http://alice@mlflow.example:5000/api?x=1"
    assert redact({"tracking": {"tracking_uri": uri}, "aws_secret_access_key": pw}) == {
        "tracking": {"tracking_uri": "http://alice:***@mlflow.example:5000/api?x=1"}, "aws_secret_access_key": "***"}


@pytest.mark.parametrize("pw", PASSWORDS[1:])
def test_validate_and_errors_never_print_a_password(tmp_path, pw):
    job = _job_file(tmp_path / "j.yaml")
    env = {"MLFLOW_TRACKING_URI": f"http://alice:{pw}@127.0.0.1:1/"}
    res = _cli_here("validate", "--no-summary", job, env=env)
    assert res.returncode == 0 and "http://alice:***@127.0.0.1:1/" in res.stdout, res.stderr[-2000:]
    assert pw not in res.stdout + res.stderr
    bad = _job_file(tmp_path / "k.yaml", tracking={"tracking_uri": f"http://bob:{pw}@h/"}, train={"total_kimg": -1})
    res = _cli_here("validate", "--no-summary", bad)
    _assert_clean_error(res, r"train\.total_kimg")
    assert pw not in res.stdout + res.stderr


def test_tracker_log_messages_are_redacted(caplog):
    import logging

    from laren import tracking

    with caplog.at_level(logging.WARNING, logger="laren.tracking"):
        tracking.log.warning("MLflow at %s is unreachable (%s)", "http://u:p/w@x@h:5000", "GET http://u:p/w@x@h:5000/api")
    assert caplog.messages == ["MLflow at http://u:***@h:5000 is unreachable (GET http://u:***@h:5000/api)"]


def test_submit_runtime_env_holds_no_credentials(tmp_path, monkeypatch):
    from laren.jobs.entrypoints import job_env, runtime_env_vars

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-value")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDVALUE")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:pw/@x@mlflow:5000")
    env = runtime_env_vars(job_env(tmp_path, {"MLFLOW_TRACKING_PASSWORD": "tracking-pw", "AWS_SESSION_TOKEN": "tok"}))
    text = repr(env)
    for secret in ("s3-secret-value", "AKIDVALUE", "pw/@x", "tracking-pw", "tok"):
        assert secret not in text
    assert env["MLFLOW_TRACKING_URI"] == "http://alice@mlflow:5000"


# ---------------------------------------------------------------------------------------------------------------------
# 6. bounds on every numeric config field
# ---------------------------------------------------------------------------------------------------------------------

POSITIVE_FIELDS = [
    "model.lr_size", "model.prior.style_dim", "model.prior.mapping_layers", "model.prior.channel_multiplier",
    "model.prior.channel_max", "model.encoder.rrdb_blocks", "model.encoder.rrdb_channels", "model.encoder.rrdb_growth",
    "model.gdm.num_nodes", "model.gdm.node_dim", "model.gdm.convkb_filters", "model.gdm.chunk_size",
    "model.gdm.relation_scale", "model.cgm.code_dim", "model.cgm.noise_proj_max_res", "data.num_val_images",
    "data.shuffle_buffer", "optim.lr", "optim.lr_d", "optim.eps", "train.batch_size_global", "train.total_kimg",
    "train.log_every_kimg", "train.eval_every_kimg", "train.checkpoint_every_kimg", "train.keep_checkpoints",
    "train.sample_grid_images", "tracking.system_metrics_interval_s", "resources.num_workers",
    "resources.cpus_per_worker",
]


def _set(d: dict, dotted: str, value) -> dict:
    *path, leaf = dotted.split(".")
    for p in path:
        d = d.setdefault(p, {})
    d[leaf] = value
    return d


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
@pytest.mark.parametrize("field", POSITIVE_FIELDS)
def test_validate_rejects_non_positive(tmp_path, field, value):
    """In process (a config parse is no risky decode): exit 2, one line per bad field, the field named."""
    import copy

    import yaml
    from click.testing import CliRunner

    from laren.cli import main

    data = {"name": "t", "model": copy.deepcopy(TINY_MODEL)}
    _set(data, field, value)
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["validate", "--no-summary", str(tmp_path / "j.yaml")])
    assert res.exit_code == 2 and res.exc_info[0] is SystemExit, res.output
    assert re.search(rf"^  {re.escape(field)}(\.\S+)?: ", res.output, re.M), res.output


@pytest.mark.parametrize("field,value", [("data.max_bad_fraction", 1.5), ("data.max_bad_fraction", float("nan")),
                                         ("train.max_failures", -1), ("optim.betas", [0.9, 1.0]),
                                         ("model.encoder.rrdb_blocks", 1_000_000), ("data.loader_workers", -1),
                                         ("loss.perceptual_weight", -0.01), ("optim.cosine_min_lr", float("inf"))])
def test_validate_rejects_out_of_range(tmp_path, field, value):
    import copy

    import yaml
    from click.testing import CliRunner

    from laren.cli import main

    data = {"name": "t", "model": copy.deepcopy(TINY_MODEL)}
    _set(data, field, value)
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(data))
    res = CliRunner().invoke(main, ["validate", str(tmp_path / "j.yaml")])  # with the model summary: stays instant
    assert res.exit_code == 2 and re.search(rf"^  {re.escape(field)}(\.\S+)?: ", res.output, re.M), res.output


def test_every_numeric_field_is_bounded():
    """Each int / float field of every config section has a lower and an upper bound, and no section takes NaN/inf."""
    import typing

    from pydantic import BaseModel

    from laren.config import RunConfig, Section

    def bounds(info) -> tuple[bool, bool]:
        metas = list(info.metadata)
        for arg in typing.get_args(info.annotation):  # Optional[...] / Union[Literal, Annotated[float, ...]]
            metas += [m for a in typing.get_args(arg)[1:] for m in getattr(a, "metadata", [a])]
        lo = any(getattr(m, k, None) is not None for m in metas for k in ("gt", "ge"))
        hi = any(getattr(m, k, None) is not None for m in metas for k in ("lt", "le"))
        return lo, hi

    unbounded, seen = [], []
    stack = [("", RunConfig)]
    while stack:
        prefix, cls = stack.pop()
        assert cls.model_config.get("allow_inf_nan") is False, cls
        for name, info in cls.model_fields.items():
            ann = info.annotation
            inner = [a for a in (typing.get_args(ann) or (ann,)) if a is not type(None)]
            if isinstance(inner[0], type) and issubclass(inner[0], BaseModel):
                stack.append((f"{prefix}{name}.", inner[0]))
                continue
            if any(a in (int, float) or typing.get_origin(a) is typing.Annotated for a in inner) and ann is not bool:
                seen.append(prefix + name)
                if not all(bounds(info)):
                    unbounded.append(prefix + name)
    assert issubclass(RunConfig, Section) and len(seen) > 30
    assert not unbounded, unbounded


# ---------------------------------------------------------------------------------------------------------------------
# 2. pack and read defensively
# ---------------------------------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png16(arr) -> bytes:
    """A 16-bit PNG (PIL cannot write 16-bit colour): (h, w) grey or (h, w, 3) RGB uint16."""
    import struct
    import zlib

    import numpy as np

    h, w = arr.shape[:2]
    colour = 0 if arr.ndim == 2 else 2
    raw = b"".join(b"\0" + np.ascontiguousarray(arr[y]).astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _png_bomb(side=100_000) -> bytes:
    """A valid PNG header declaring side x side pixels, with almost no data."""
    import struct
    import zlib

    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + _png_chunk(b"IEND", b""))


def _pil_bytes(img, fmt, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _new_user_folder(src: Path) -> None:
    """What a careless source holds: odd depths and modes, rotated photos, a FIFO, a device link, broken files."""
    import numpy as np
    from PIL import Image

    src.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 48).astype(np.uint16), (48, 1))  # dark left -> bright right
    (src / "a-grey16.png").write_bytes(_png16(ramp))
    rgb16 = np.zeros((48, 48, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 60000, 20000  # reddish purple
    (src / "b-rgb16.png").write_bytes(_png16(rgb16))
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 128  # half-transparent red -> pink on white
    (src / "c-rgba.png").write_bytes(_pil_bytes(Image.fromarray(rgba, "RGBA"), "PNG"))
    pal = Image.fromarray(np.zeros((48, 48), np.uint8), "L").convert("P")
    pal.info["transparency"] = 0  # fully transparent -> white
    (src / "d-palette.png").write_bytes(_pil_bytes(pal, "PNG", transparency=0))
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:, 32:] = 255  # stored landscape, left black / right white; EXIF 6 = rotate 90 deg clockwise to view
    exif = Image.Exif()
    exif[0x0112] = 6
    (src / "e-exif6.jpg").write_bytes(_pil_bytes(Image.fromarray(stored), "JPEG", exif=exif.tobytes(), quality=95))
    (src / "f-float01.tif").write_bytes(_pil_bytes(Image.fromarray(np.full((48, 48), 0.5, np.float32), "F"), "TIFF"))
    (src / "g-float255.tif").write_bytes(_pil_bytes(Image.fromarray(np.full((48, 48), 200.0, np.float32), "F"), "TIFF"))
    os.mkfifo(src / "h-fifo.png")
    os.symlink("/dev/zero", src / "i-zero.png")
    good = _pil_bytes(Image.fromarray(np.full((48, 48, 3), 90, np.uint8)), "PNG")
    (src / "j-truncated.png").write_bytes(good[: len(good) // 2])
    (src / "k-bomb.png").write_bytes(_png_bomb())
    (src / "l-plain.png").write_bytes(good)


def _shard_images(dest: Path) -> dict:
    import numpy as np
    from PIL import Image

    from laren.data.shards import iter_tar_samples

    out = {}
    for shard in sorted(dest.glob("shard-*.tar")):
        with open(shard, "rb") as f:
            for key, files, reason in iter_tar_samples(f):
                assert files is not None, reason
                out[json.loads(files["json"])["source"]] = np.asarray(Image.open(io.BytesIO(files["png"])))
    return out


def test_new_user_pack(tmp_path):
    """`laren data pack` on a mixed folder finishes; every rejection is named with its reason; kept images look right."""
    import numpy as np

    src, dest = tmp_path / "photos", tmp_path / "ds"
    _new_user_folder(src)
    res = _cli("data", "pack", src, dest, "--name", "mixed", "--resolution", "32", "--workers", "2", "--quiet",
               mem_gb=4, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    m = json.loads((dest / "manifest.json").read_text())
    reasons = {r["input"]: r["reason"] for r in m["rejected"]}
    assert set(reasons) == {"g-float255.tif", "h-fifo.png", "i-zero.png", "j-truncated.png", "k-bomb.png"}, reasons
    assert "outside [0, 1]" in reasons["g-float255.tif"]
    assert "not a regular file (a FIFO)" in reasons["h-fifo.png"]
    assert "not a regular file (a character device)" in reasons["i-zero.png"]
    assert reasons["j-truncated.png"].startswith("undecodable")
    assert re.search(r"image has more than the \d+ pixels allowed", reasons["k-bomb.png"])
    imgs = _shard_images(dest)
    assert m["num_samples"] == 7 and len(imgs) == 7
    grey = imgs["a-grey16.png"].astype(int)
    assert grey[:, :4].mean() < 30 and grey[:, -4:].mean() > 225 and np.all(np.diff(grey[16, 2:-2]) >= 0)  # a ramp
    assert np.abs(imgs["b-rgb16.png"][8:24, 8:24].astype(int) - [233, 0, 78]).max() <= 2  # 60000/257, 20000/257
    assert np.abs(imgs["c-rgba.png"][8:24, 8:24].astype(int) - [255, 127, 127]).max() <= 2  # red at 50% on white
    assert imgs["d-palette.png"].min() == 255  # transparent -> white
    rot = imgs["e-exif6.jpg"].astype(int)  # upright: top black, bottom white
    assert rot[:12].mean() < 20 and rot[-12:].mean() > 235
    assert np.abs(imgs["f-float01.tif"].astype(int) - 128).max() <= 1


def test_pack_worker_killed_fails_cleanly(tmp_path):
    """A worker killed mid-image (as the OOM killer or a SIGBUS would) stops the pack with an error, not a hang."""
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 40, 3), 20 * i, np.uint8)).save(src / f"{i}.png")
    code = ("import os, signal, sys\nfrom laren.data import pack as P\n_orig = P._process\n"
            "def _dies(job):\n    if job[3] == '3.png':\n        os.kill(os.getpid(), signal.SIGKILL)\n    return _orig(job)\n"
            "P._process = _dies\nfrom laren.cli import main\nsys.argv = ['laren', *sys.argv[1:]]\nmain()\n")
    res = subprocess.run([sys.executable, "-c", code, "data", "pack", str(src), str(tmp_path / "ds"), "--name", "k",
                          "--resolution", "32", "--workers", "2", "--quiet", "--shard-size-mb", "0.001"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    _assert_clean_error(res, r"a worker process died.*'3\.png'.*re-run the same command")
    # The shards finished before it are kept for the resume. How many depends on when the pool notices the death
    # (it may break before the first result is read, under load): then there is no manifest and no shard at all.
    manifest = tmp_path / "ds" / "manifest.json"
    if manifest.exists():
        m = json.loads(manifest.read_text())
        assert not m["complete"] and m["inputs_done"] <= 3 and len(m["shards"]) <= 3
    else:
        assert not list((tmp_path / "ds").glob("shard-*"))
    assert not list((tmp_path / "ds").glob(".shard-*"))


def _tar_header(name: str, size: int, kind: bytes = b"0", linkname: str = "") -> bytearray:
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.size, ti.type, ti.linkname = size, kind, linkname
    return bytearray(ti.tobuf(format=tarfile.GNU_FORMAT))


def _sparse_member(name: str, real_size: int) -> bytes:
    """An old-GNU sparse member: 512 stored bytes that expand to real_size (the map says: data at the end)."""
    hdr = _tar_header(name, 512, b"S")
    entry = f"{real_size - 512:011o}\0".encode() + f"{512:011o}\0".encode()
    hdr[386:386 + 24] = entry
    hdr[482] = 0
    hdr[483:495] = f"{real_size:011o}\0".encode()
    hdr[148:156] = b" " * 8
    hdr[148:156] = f"{sum(hdr[:512]):06o}\0 ".encode()
    return bytes(hdr[:512]) + b"\x89" * 512


def _good_member(key: str, ext: str, data: bytes) -> bytes:
    return bytes(_tar_header(f"{key}.{ext}", len(data))) + data + b"\0" * (-len(data) % 512)


def _hostile_dataset(tmp_path, members: bytes, count: int, shard_name="shard-000000.tar") -> Path:
    import hashlib

    dest = tmp_path / "ds"
    dest.mkdir()
    blob = members + b"\0" * 1024
    (dest / "shard-000000.tar").write_bytes(blob)
    m = {"format_version": 1, "name": "h", "resolution": 32, "format": "png", "complete": True, "num_samples": count,
         "num_inputs": count, "inputs_done": count, "rejected": [],
         "shards": [{"name": shard_name, "count": count, "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                     "first_input": 0, "end_input": count}]}
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


NON_REGULAR = {"sparse": lambda: _sparse_member("00000001.png", 3_400_000_000),
               "symlink": lambda: bytes(_tar_header("00000001.png", 0, b"2", "/etc/passwd")),
               "device": lambda: bytes(_tar_header("00000001.png", 0, b"3")),
               "oversize-declared": lambda: bytes(_tar_header("00000001.png", 1 << 40)) + b"\0" * 512}


@pytest.fixture(scope="module")
def non_regular_verified(tmp_path_factory) -> dict:
    """kind -> (its data set: a good member, then the non-regular one; `laren data verify` of it)."""
    import numpy as np
    from PIL import Image

    good = _good_member("00000000", "png", _pil_bytes(Image.fromarray(np.zeros((32, 32, 3), np.uint8)), "PNG"))
    sets = {k: _hostile_dataset(tmp_path_factory.mktemp(k), good + bad(), 2) for k, bad in NON_REGULAR.items()}
    runs = [(dest.parent, ["data", "verify", dest, "--quiet"]) for dest in sets.values()]
    results = _cli_batch(runs, tmp_path_factory.mktemp("results") / "verify.json", mem_gb=2, timeout=120)
    return {kind: (dest, res) for (kind, dest), res in zip(sets.items(), results)}


@pytest.mark.parametrize("kind", sorted(NON_REGULAR))
def test_shard_refuses_non_regular_members(non_regular_verified, kind):
    dest, res = non_regular_verified[kind]
    _assert_clean_error(res, r"00000001.*refused: (a sparse member|a link|a device|declares \d+ bytes)")
    with open(dest / "shard-000000.tar", "rb") as f:
        from laren.data.shards import iter_tar_samples

        samples = list(iter_tar_samples(f))
    assert samples[0][0] == "00000000" and samples[0][1] is not None
    assert samples[1][0] == "00000001" and samples[1][1] is None and "refused" in samples[1][2]


def test_shard_image_bomb_is_not_decoded():
    """A member declaring 100000^2 pixels is refused from its header (nothing decoded: this process stays small)."""
    import resource

    from laren.data.pipeline import decode_image

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    img, reason = decode_image(_png_bomb(10_000), 32)
    assert img is None and reason.startswith("wrong size: 10000x10000 image has more than the 1024 pixels allowed")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "shard-000000.tar/../x", "shard-1.tar"])
def test_manifest_paths_confined(tmp_path, name):
    dest = _hostile_dataset(tmp_path, b"", 1, shard_name=name)
    for args in (["data", "verify", dest, "--quiet"],
                 ["data", "stream", dest, "--hr-size", "32", "--lr-size", "8", "--batch-size", "1", "--batches", "1"]):
        res = _cli_here(*args)  # refused from the manifest, before any shard is opened
        _assert_clean_error(res, r"malformed shard entry")
