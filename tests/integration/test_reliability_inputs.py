"""User errors are caught before any worker starts: malformed job and sweep files, a prior whose resolution does not fit
the job, data packed at another resolution, missing weight files. Each is run through the command a user types
(`laren train`, `laren submit`, `laren sweep`) and must fail with one clear line naming the file or field path and
what to do, with no Ray instance started, no job submitted and nothing written to the run's storage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from tests.unit.test_train_loop import make_tiny_dataset, tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("rel-inputs")
    return make_tiny_dataset(str(work / "shards"), work)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A scratch project folder; RAY_ADDRESS points at a closed port, so a command that got past its checks and tried to
    reach Ray would fail with a connection error instead of these tests' messages."""
    from laren.services import free_port

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("LAREN_STORAGE", str(tmp_path / "storage"))
    return tmp_path


def job_dict(data_url: str, project: Path, **overrides) -> dict:
    cfg = tiny_config(data_url, f"sqlite:///{project}/mlflow.db", storage=dict(root=str(project / "storage")), **overrides)
    return {**cfg.to_dict(), "kind": "train"}


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else yaml.safe_dump(obj, sort_keys=False))
    return path


def fails(args: list[str], project: Path) -> str:
    """Run `laren ARGS`; it must exit 2 with an `error:` line, start no Ray, and leave the storage untouched."""
    import ray

    from laren.cli import main

    was_up = ray.is_initialized()
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert "error:" in r.output and "Traceback" not in r.output, r.output
    assert ray.is_initialized() == was_up  # no local Ray instance was started
    assert not (project / "storage" / "runs").exists()  # no run directory, no checkpoint
    return r.output


def test_malformed_job_files(data, project):
    bad_yaml = write(project / "jobs" / "broken.yaml", "name: broken\nmodel: {lr_size: 8\ntrain: [\n")
    out = fails(["train", str(bad_yaml)], project)
    assert str(bad_yaml) in out and "not valid YAML" in out and "line" in out

    d = job_dict(data, project)
    d["train"]["total_kimgg"] = 1.0  # a typo
    out = fails(["train", str(write(project / "jobs" / "typo.yaml", d))], project)
    assert "typo.yaml" in out and "train.total_kimgg" in out

    d = job_dict(data, project)
    d["model"]["gdm"]["num_nodes"] = "many"  # a wrong type
    out = fails(["submit", "--detach", str(write(project / "jobs" / "wrongtype.yaml", d))], project)
    assert "wrongtype.yaml" in out and "model.gdm.num_nodes" in out

    d = job_dict(data, project, resources=dict(num_workers=3))  # batch 4 over 3 workers
    out = fails(["train", str(write(project / "jobs" / "split.yaml", d))], project)
    assert "train.batch_size_global" in out and "resources.num_workers" in out


def test_malformed_sweep_files(data, project):
    write(project / "jobs" / "base.yaml", job_dict(data, project))
    sweep = {"name": "s", "job": "../jobs/base.yaml", "search_space": {"model.gdm.num_nodez": {"grid": [2, 4]}}}
    out = fails(["sweep", "--detach", str(write(project / "sweeps" / "typo.yaml", sweep))], project)
    assert "typo.yaml" in out and "model.gdm.num_nodez" in out

    sweep = {"name": "s", "job": "../jobs/base.yaml", "search_space": {"model.gdm.num_nodes": {"grid": [4, "x"]}}}
    out = fails(["sweep", "--detach", str(write(project / "sweeps" / "badvalue.yaml", sweep))], project)
    assert "badvalue.yaml" in out and "model.gdm.num_nodes" in out

    sweep = {"name": "s", "job": "../jobs/missing.yaml", "search_space": {"model.gdm.num_nodes": {"grid": [2]}}}
    out = fails(["sweep", "--detach", str(write(project / "sweeps" / "nojob.yaml", sweep))], project)
    assert "nojob.yaml" in out and "missing.yaml" in out and "not found" in out

    out = fails(["sweep", "--detach", str(write(project / "sweeps" / "broken.yaml", "search_space: {a: [\n"))], project)
    assert "broken.yaml" in out and "not valid YAML" in out


def _write_prior(dest: Path, resolution: int) -> str:
    """A laren prior (DEST.safetensors + DEST.json, the format `laren prior import` writes) of a random generator."""
    import hashlib

    from safetensors.torch import save

    from laren.config import ModelConfig
    from laren.models.build import build_generator
    from laren.models.prior_io import PriorMeta, prior_paths

    p = dict(resolution=resolution, style_dim=32, mapping_layers=2, channel_multiplier=1, channel_max=32)
    cfg = ModelConfig(lr_size=8, prior=p)
    g = build_generator(cfg)
    tensors = {f"g.{k}": v.contiguous() for k, v in g.state_dict().items()}
    tensors["latent_avg"] = g.latent_avg.clone().contiguous()
    blob = save(tensors, metadata={"format": "laren-prior", "version": "1"})
    st, js = prior_paths(str(dest))
    Path(st).parent.mkdir(parents=True, exist_ok=True)
    Path(st).write_bytes(blob)
    meta = PriorMeta(**p, channel_base=cfg.prior.channel_base(), has_discriminator=False, source="test",
                     source_format="rosinality", sha256=hashlib.sha256(blob).hexdigest())
    Path(js).write_text(meta.to_json())
    return str(dest)


def test_prior_or_data_resolution_not_fitting_the_job(data, project):
    prior64 = _write_prior(project / "priors" / "ffhq-64", 64)
    d = job_dict(data, project)
    d["model"]["prior"]["path"] = prior64  # the job (and its data) are 32x32
    out = fails(["train", str(write(project / "jobs" / "prior.yaml", d))], project)
    assert "model.prior.resolution" in out and "32" in out and "64" in out and "ffhq-64" in out

    prior32 = _write_prior(project / "priors" / "ffhq-32", 32)
    d = job_dict(data, project)
    d["model"]["prior"]["path"] = prior32
    d["model"]["prior"]["resolution"] = 64  # prior and data are 32x32
    d["model"]["lr_size"] = 16
    out = fails(["train", str(write(project / "jobs" / "res.yaml", d))], project)
    assert "model.prior.resolution" in out and "ffhq-32" in out

    d = job_dict(data, project)  # a 64x64 job (random prior) on 32x32 shards
    d["model"]["prior"]["resolution"] = 64
    d["model"]["lr_size"] = 16
    out = fails(["train", str(write(project / "jobs" / "data.yaml", d))], project)
    assert "data.train_url" in out and "32x32" in out and "--resolution 64" in out


def test_missing_weight_files(data, project):
    d = job_dict(data, project)
    d["model"]["prior"]["path"] = str(project / "priors" / "nope")
    out = fails(["train", str(write(project / "jobs" / "noprior.yaml", d))], project)
    assert "model.prior.path" in out and "nope.json" in out and "laren prior import" in out

    vgg = project / "weights" / "vgg16-397923af.pth"
    d = job_dict(data, project, loss=dict(random_backbone_for_tests=False, vgg16_path=str(vgg)))
    out = fails(["train", str(write(project / "jobs" / "novgg.yaml", d))], project)
    assert str(vgg) in out and "download" in out
    out = fails(["submit", "--detach", str(project / "jobs" / "novgg.yaml")], project)  # a local cluster: checked before submitting
    assert str(vgg) in out and "download" in out

    alex = project / "weights" / "alexnet-owt-7be5be79.pth"
    d = job_dict(data, project, eval=dict(random_backbone_for_tests=False, alexnet_path=str(alex)))
    out = fails(["train", str(write(project / "jobs" / "noalex.yaml", d))], project)
    assert str(alex) in out

    d = job_dict(data, project, data=dict(train_url=str(project / "no-such-data")))
    out = fails(["train", str(write(project / "jobs" / "nodata.yaml", d))], project)
    assert "data.train_url" in out and "no-such-data" in out and "laren data pack" in out
