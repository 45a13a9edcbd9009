"""Cross-field rules (laren/plan.py): `laren validate` and `laren submit` refuse, before Ray starts, an elastic worker
range holding a count that cannot train the job, and the S + CGM model combination, naming the field."""

from __future__ import annotations

import copy
import re

import pytest
import yaml
from click.testing import CliRunner

from laren.cli import main
from tests.integration._tiny_jobs import TINY_MODEL


def _job(tmp_path, **sections):
    data = {"name": "t", "model": copy.deepcopy(TINY_MODEL), **sections}
    p = tmp_path / "jobs" / "t.yaml"
    p.parent.mkdir(exist_ok=True)
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.parametrize("resources,batch,field,count", [
    ({"num_workers": 8, "min_workers": 4}, 8, "resources.min_workers", "5 workers do not divide"),  # Ray may pick 5..7
    ({"num_workers": 8}, 8, "resources.num_workers", "per-GPU batch of 1"),  # D's stddev over one sample
    ({"num_workers": 2}, 12, "resources.num_workers", "per-GPU batch of 6"),  # not <= 4 nor a multiple of 4
])
def test_validate_refuses_worker_counts_that_cannot_train(tmp_path, resources, batch, field, count):
    p = _job(tmp_path, resources=resources, train={"batch_size_global": batch})
    res = CliRunner().invoke(main, ["validate", "--no-summary", str(p)])
    assert res.exit_code == 2, res.output
    assert re.search(rf"^  {re.escape(field)}: ", res.output, re.M) and count in res.output, res.output


def test_validate_accepts_ranges_whose_every_count_trains(tmp_path):
    for resources, batch in (({"num_workers": 2, "min_workers": 1}, 8), ({"num_workers": 5, "min_workers": 4}, 80),
                             ({"num_workers": 8}, 8)):
        adv = {} if batch != 8 or resources["num_workers"] != 8 else {"adversarial_weight": 0.0}  # no D: batch 1 is fine
        p = _job(tmp_path, resources=resources, train={"batch_size_global": batch}, loss=adv)
        res = CliRunner().invoke(main, ["validate", "--no-summary", str(p)])
        assert res.exit_code == 0, res.output


def test_validate_refuses_s_with_cgm(tmp_path):
    model = {**copy.deepcopy(TINY_MODEL), "latent_space": "s", "noise_source": "cgm"}
    p = _job(tmp_path)
    p.write_text(yaml.safe_dump({"name": "t", "model": model}))
    res = CliRunner().invoke(main, ["validate", "--no-summary", str(p)])
    assert res.exit_code == 2 and "model.noise_source" in res.output and "latent_space: s" in res.output, res.output


def test_submit_refuses_before_ray(tmp_path, monkeypatch):
    import laren.jobs.client as sub

    def no_ray(*a, **kw):
        raise AssertionError("Ray was contacted")

    monkeypatch.setattr(sub, "client", no_ray)
    monkeypatch.setattr(sub, "check_inputs_here", no_ray)
    p = _job(tmp_path, resources={"num_workers": 8, "min_workers": 4})
    res = CliRunner().invoke(main, ["submit", str(p), "--detach"])
    assert res.exit_code == 2 and "resources.min_workers" in res.output, res.output
    model = {**copy.deepcopy(TINY_MODEL), "latent_space": "s", "noise_source": "cgm"}
    p.write_text(yaml.safe_dump({"name": "t", "model": model}))
    res = CliRunner().invoke(main, ["submit", str(p), "--detach"])
    assert res.exit_code == 2 and "model.noise_source" in res.output, res.output



def _project(path, state=None):
    """A laren checkout at ``path`` (pyproject.toml + laren/); its .laren is a link to ``state`` when given."""
    (path / "laren").mkdir(parents=True)
    (path / "pyproject.toml").write_text("[project]\nname = 'laren'\n")
    if state is not None:
        (path / ".laren").symlink_to(state, target_is_directory=True)
    return path


def _cfg(**sections):
    from laren.config import RunConfig

    d = {"name": "t", "model": copy.deepcopy(TINY_MODEL), "data": {"train_url": "./.laren/storage/datasets/x-train",
         "val_url": "./.laren/storage/datasets/x-val"}, "loss": {"vgg16_path": "weights/vgg16.pth"},
         "eval": {"alexnet_path": "s3://w/alexnet.pth"}, "storage": {"root": "./.laren/storage"}}
    for k, v in sections.items():
        d[k] = {**d.get(k, {}), **v}
    return RunConfig.model_validate(d)


def test_run_id_is_stable_under_path_resolution(tmp_path, monkeypatch):
    """The run id is a pure function of the resolved config: the config as written (relative paths), the same config
    after resolve_paths, and the same file read in Ray's copy of the project (a job's working dir, whose .laren links
    to the project's) all have one id; another data set has another."""
    from laren.train.distributed import resolve_paths

    (tmp_path / "state").mkdir()
    proj = _project(tmp_path / "proj")
    (proj / ".laren").mkdir()
    monkeypatch.chdir(proj)
    cfg = _cfg()
    rid = cfg.run_id
    resolved = resolve_paths(cfg)
    assert resolved.data.train_url == str(proj / ".laren/storage/datasets/x-train")  # made absolute ...
    assert resolved.run_id == rid and resolve_paths(resolved).run_id == rid  # ... with the same id
    assert _cfg(data={"train_url": "./.laren/storage/datasets/y-train"}).run_id != rid
    assert _cfg(storage={"root": "s3://elsewhere"}).run_id == rid  # where it runs is not what it is

    wd = _project(tmp_path / "ray-working-dir", state=proj / ".laren")  # entrypoints.job_entrypoint's `ln -sfn`
    monkeypatch.chdir(wd)
    assert _cfg().run_id == rid and resolve_paths(_cfg()).run_id == rid
    assert resolve_paths(_cfg()).data.train_url == str(proj / ".laren/storage/datasets/x-train")
    monkeypatch.chdir(proj)
    assert resolved.run_id == rid


def test_run_id_leaves_the_architecture_to_the_priors_metadata(tmp_path, monkeypatch):
    """With model.prior.path set, the prior's metadata is its architecture (the plan copies it into model.prior), so
    the id of the config as written equals the id of the plan's config, whatever the written fields said."""
    monkeypatch.chdir(_project(tmp_path))
    prior = {**TINY_MODEL["prior"], "path": "priors/p32"}
    written = _cfg(model={"prior": prior})
    planned = _cfg(model={"prior": {**prior, "mapping_layers": 8, "channel_table_base": 512}})
    assert written.run_id == planned.run_id
    assert _cfg(model={"prior": {**prior, "path": "priors/other"}}).run_id != written.run_id
    assert _cfg(model={"prior": {**TINY_MODEL["prior"], "mapping_layers": 8}}).run_id != _cfg().run_id  # no path: fields


def test_plan_round_trip_without_credentials(tmp_path, monkeypatch):
    """build_plan -> write_plan -> read_plan: the same plan, its id the id of its own config, and no password on disk
    (the job's environment provides it)."""
    from laren.config import RunConfig
    from laren.plan import build_plan, read_plan, write_plan

    monkeypatch.chdir(_project(tmp_path))
    cfg = _cfg(loss={"vgg16_path": None}, tracking={"tracking_uri": "https://alice:s3cr3t@mlflow.example/"})
    plan = build_plan(cfg)
    assert plan.run_id == cfg.run_id == RunConfig.model_validate(plan.config).run_id
    assert plan.run_dir == str(tmp_path / ".laren/storage/runs" / plan.run_id)
    url = write_plan(plan)
    assert "s3cr3t" not in open(url).read()
    back = read_plan(url)
    assert back.config["tracking"]["tracking_uri"] == "https://alice@mlflow.example/"
    strip = lambda d: {**d, "tracking": {**d["tracking"], "tracking_uri": ""}}  # noqa: E731
    assert strip(back.config) == strip(plan.config) and back.run_id == plan.run_id and back.inputs == plan.inputs
    assert back.run_config().run_id == plan.run_id


def test_submit_ships_the_plan_of_train_and_prior_jobs(tmp_path, monkeypatch):
    """submit's plan step: a train job on a reachable storage gets its plan and the job runs it; a remote
    cluster cannot read this machine's folders (the job plans there); a prior job runs `laren prior train`."""
    import shlex

    from laren.jobs import entrypoints as S
    from laren.specs import load_job

    monkeypatch.chdir(_project(tmp_path))
    monkeypatch.setenv("LAREN_STORAGE", str(tmp_path / "st"))
    p = _job(tmp_path, data={"train_url": "./.laren/storage/datasets/x"})
    spec = load_job(p)
    plan = S.job_plan(spec, local=True)
    assert plan.run_dir == str(tmp_path / "st" / "runs" / spec.run_id) and plan.run_id == spec.run_id
    assert plan.config["data"]["train_url"] == str(tmp_path / ".laren/storage/datasets/x")
    assert S.job_plan(spec, local=False) is None  # a local storage folder: not for a remote cluster
    # s3:// storage, but a local data path: on a remote cluster it names the cluster's copy of the project, so the
    # job plans the run there (a plan built here would carry this machine's absolute path)
    monkeypatch.setenv("LAREN_STORAGE", "s3://bucket/laren")
    assert S.job_plan(load_job(p), local=False) is None
    assert shlex.split(S.job_entrypoint("train", "jobs/t.yaml", None, "/a b/plan.json")) == [
        "python", "-m", "laren.cli", "run-plan", "/a b/plan.json"]
    assert shlex.split(S.job_entrypoint("prior", "jobs/p.yaml")) == ["python", "-m", "laren.cli", "prior", "train", "jobs/p.yaml"]
