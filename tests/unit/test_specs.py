"""Job and sweep files: every shipped file validates; mistakes name their field path; identities are deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from laren.config import ConfigError
from laren.specs import JobSpec, LoadedSweep, apply_overrides, load_any, load_job, load_sweep
from laren.jobs.checks import validate

REPO = Path(__file__).resolve().parents[2]
JOB_FILES = sorted((REPO / "jobs").glob("*.yaml"))
SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))

TINY_MODEL = {
    "lr_size": 8,
    "prior": {"resolution": 32, "style_dim": 64, "mapping_layers": 2, "channel_multiplier": 1, "channel_max": 64},
    "encoder": {"rrdb_blocks": 1, "rrdb_channels": 16, "rrdb_growth": 8},
    "gdm": {"num_nodes": 4, "node_dim": 4, "convkb_filters": 2},
    "cgm": {"code_dim": 8, "noise_proj_max_res": 16},
}


def _write(tmp_path: Path, name: str, data: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def test_shipped_files_present():
    names = {p.stem for p in JOB_FILES}
    for need in ("face16x", "face32x", "face64x", "cat16x", "church16x", "car16x", "bedroom16x", "tower16x",
                 "ablation-face64x", "demo"):
        assert need in names, f"jobs/{need}.yaml missing"
    assert any(n.startswith("eval-") for n in names)
    assert (REPO / "sweeps" / "jcf-face64x.yaml") in SWEEP_FILES


@pytest.mark.parametrize("path", JOB_FILES + SWEEP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_file_validates(path):
    spec, text = validate(path, summary=False, health=False)  # health: tests/unit/test_health.py
    assert f"run id: {spec.run_id}" in text
    assert "# resources asked for" in text
    if isinstance(spec, JobSpec):
        assert spec.run_id.startswith(spec.name + "-") and len(spec.run_id) == len(spec.name) + 9
        if spec.kind == "train":
            # each Table I train job says which prior it needs and where it comes from
            assert spec.model.prior.source.strip(), f"{path}: model.prior.source is empty"


def test_table_i_settings():
    want = {"face16x": (64, 1024), "face32x": (32, 1024), "face64x": (16, 1024), "cat16x": (16, 256),
            "church16x": (16, 256), "car16x": (16, 256), "bedroom16x": (16, 256), "tower16x": (16, 256)}
    for name, (lr, hr) in want.items():
        j = load_job(REPO / "jobs" / f"{name}.yaml")
        assert (j.kind, j.model.lr_size, j.model.prior.resolution) == ("train", lr, hr), name


def test_ablation_grid_is_table_iv():
    j = load_job(REPO / "jobs" / "ablation-face64x.yaml")
    rows = j.rows()
    assert j.kind == "grid" and len(rows) == 7
    got = [(c.model.latent_space, c.model.gdm_relation if c.model.latent_space == "g" else None, c.model.noise_source,
            c.model.cgm_relation if c.model.noise_source == "cgm" else None) for _, c in rows]
    assert got == [("w", None, "random", None), ("w+", None, "random", None), ("s", None, "random", None),
                   ("g", "vrr", "random", None), ("g", "hmrr", "random", None), ("g", "hmrr", "cgm", "vrr"),
                   ("g", "hmrr", "cgm", "rerr")]
    assert all(c.model.scale == 64 for _, c in rows)
    assert len({c.run_id for _, c in rows}) == 7


def test_jcf_sweep_points():
    sw = load_sweep(REPO / "sweeps" / "jcf-face64x.yaml")
    pts = sw.spec.grid_points(sw.base)
    assert sw.spec.design == "axes" and len(pts) == 1 + 3 + 2 + 3
    assert sw.spec.metric == "val/lpips_alex" and sw.spec.mode == "min" and sw.spec.scheduler.kind == "asha"
    cross = sw.spec.model_copy(update={"design": "cross"}).grid_points(sw.base)
    assert len(cross) == 4 * 3 * 4
    cfg = sw.trial_config({"model.gdm.num_nodes": 128}, "t")
    assert cfg.model.gdm.num_nodes == 128 and cfg.train.total_kimg == 600


@pytest.mark.parametrize(
    "patch, path",
    [
        ({"model": {"gdm": {"num_nodez": 3}}}, "model.gdm.num_nodez"),
        ({"trian": {"total_kimg": 1}}, "trian"),
        ({"train": {"total_kimg": "many"}}, "train.total_kimg"),
        ({"kind": "trian"}, "kind"),
    ],
)
def test_mistyped_job_key_names_the_field(tmp_path, patch, path):
    data = {"name": "t", "model": TINY_MODEL, **patch}
    if "model" in patch:
        data["model"] = {**TINY_MODEL, **{k: {**TINY_MODEL.get(k, {}), **v} for k, v in patch["model"].items()}}
    p = _write(tmp_path, "t.yaml", data)
    with pytest.raises(ConfigError) as e:
        load_job(p)
    assert str(p) in str(e.value)
    assert f"\n  {path}:" in str(e.value)


def test_grid_override_errors_name_the_row(tmp_path):
    p = _write(tmp_path, "g.yaml", {"name": "g", "kind": "grid", "model": TINY_MODEL, "variants": [
        {"name": "a", "overrides": {"model.latent_space": "w"}},
        {"name": "b", "overrides": {"model.gdm.num_nodez": 3}}]})
    with pytest.raises(ConfigError, match=r"variants\.1\.overrides\.model\.gdm\.num_nodez"):
        load_job(p)
    p = _write(tmp_path, "g2.yaml", {"name": "g2", "kind": "grid", "model": TINY_MODEL, "variants": [
        {"name": "a", "overrides": {"model.latent_space": "q"}}]})
    with pytest.raises(ConfigError, match=r"variants\.0\.overrides\.model\.latent_space"):
        load_job(p)
    p = _write(tmp_path, "g3.yaml", {"name": "g3", "kind": "grid", "model": TINY_MODEL, "variants": [
        {"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="duplicate row names"):
        load_job(p)
    p = _write(tmp_path, "t.yaml", {"name": "t", "model": TINY_MODEL, "variants": [{"name": "a"}]})
    with pytest.raises(ConfigError, match="only used by kind: grid"):
        load_job(p)


def test_sweep_errors_name_the_field(tmp_path):
    job = _write(tmp_path, "base.yaml", {"name": "base", "model": TINY_MODEL})
    ok = {"name": "s", "job": "base.yaml", "search_space": {"model.gdm.num_nodes": {"grid": [2, 4]}}}
    sw = load_any(_write(tmp_path, "s.yaml", ok))
    assert isinstance(sw, LoadedSweep) and sw.base.name == "base" and sw.base.model.gdm.num_nodes == 4
    bad = [
        ({**ok, "metrc": "x"}, r"\n  metrc: unknown field"),
        ({**ok, "search_space": {"model.gdm.num_nodez": {"grid": [2]}}}, r"search_space\.model\.gdm\.num_nodez"),
        ({**ok, "search_space": {"model.gdm.num_nodes": {"grid": [2], "choice": [3]}}}, r"search_space\.model\.gdm\.num_nodes"),
        ({**ok, "search_space": {"model.latent_space": {"grid": ["w", "q"]}}}, r"model\.latent_space"),
        ({**ok, "scheduler": {"kind": "asha", "max_tt": 3}}, r"scheduler\.max_tt"),
        ({**ok, "job": "nope.yaml"}, r"job: file not found"),
        ({**ok, "design": "axes", "search_space": {"optim.lr": {"loguniform": [1e-5, 1e-3]}}}, "axes needs grid"),
    ]
    for data, pat in bad:
        with pytest.raises(ConfigError, match=pat):
            load_sweep(_write(tmp_path, "bad.yaml", data))
    assert job.exists() and load_job(job).name == "base"  # the base job is untouched by the refused sweeps


def test_run_ids_are_deterministic(tmp_path):
    a = load_job(_write(tmp_path, "a.yaml", {"name": "a", "model": TINY_MODEL}))
    a2 = load_job(_write(tmp_path, "a2.yaml", {"name": "a", "model": TINY_MODEL, "description": "other words",
                                               "storage": {"root": "s3://elsewhere"}}))
    b = load_job(_write(tmp_path, "b.yaml", {"name": "a", "model": {**TINY_MODEL, "lr_size": 4}}))
    assert a.run_id == a2.run_id  # where it runs and how it is described are not its identity
    assert a.run_id != b.run_id
    assert a.run_id == a.run_config().run_id  # training computes the same id from the run config


def test_apply_overrides():
    base = {"model": {"gdm": {"num_nodes": 64}}, "train": {"seed": 0}}
    out = apply_overrides(base, {"model.gdm.num_nodes": 8, "train.seed": 3})
    assert out == {"model": {"gdm": {"num_nodes": 8}}, "train": {"seed": 3}} and base["model"]["gdm"]["num_nodes"] == 64
    with pytest.raises(ConfigError, match="model.gdm.nodes"):
        apply_overrides(base, {"model.gdm.nodes": 8})


def test_eval_job_must_match_its_train_job(tmp_path):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "laren").mkdir()
    (tmp_path / "jobs").mkdir()
    _write(tmp_path / "jobs", "tr.yaml", {"name": "tr", "model": TINY_MODEL})
    good = _write(tmp_path / "jobs", "ev.yaml", {"name": "ev", "kind": "eval", "checkpoint": "jobs/tr.yaml",
                                                 "model": TINY_MODEL})
    validate(good, summary=False)
    bad = _write(tmp_path / "jobs", "ev2.yaml", {"name": "ev2", "kind": "eval", "checkpoint": "jobs/tr.yaml",
                                                 "model": {**TINY_MODEL, "lr_size": 4}})
    with pytest.raises(ConfigError, match=r"model\.lr_size"):
        validate(bad, summary=False)
    with pytest.raises(ConfigError, match="kind: eval needs checkpoint"):
        load_job(_write(tmp_path, "ev3.yaml", {"name": "ev3", "kind": "eval", "model": TINY_MODEL}))


def test_validate_prints_model_summary():
    _, text = validate(REPO / "jobs" / "demo.yaml", summary=True)
    assert "# model summary" in text and "GDM" in text and "generator (frozen)" in text
    assert "per run: 1 worker(s) x 1 CPU" in text


def test_name_defaults_to_the_file_stem_and_a_list_is_refused(tmp_path):
    assert load_job(_write(tmp_path, "stem-name.yaml", {"model": TINY_MODEL})).name == "stem-name"
    assert load_job(_write(tmp_path, "other.yaml", {"name": "given", "model": TINY_MODEL})).name == "given"
    for load, what in ((load_job, "job"), (load_sweep, "sweep")):
        p = tmp_path / f"list-{what}.yaml"
        p.write_text("- a\n- b\n")
        with pytest.raises(ConfigError, match=rf"list-{what}\.yaml: a {what} file must be a mapping of fields"):
            load(p)
