"""A sweep end to end on real services: `laren submit` of a sweep file to a real Ray head (Jobs API), Ray Tune with ASHA
on the cluster, each trial a Ray Train run (1 CPU worker) and an MLflow child run of the sweep's parent run; the trial
table and the Fig. 8-style plot on the parent. The sweep's design is the shipped one's (sweeps/jcf-face64x.yaml):
``axes``, one field at a time around the base job, here J in {4, 8} and F in {8, 16} around J = 4, F = 8: 3 trials.
(Both designs' points and figures: tests/unit/test_specs.py, tests/unit/test_sweep_results.py.)"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from laren.jobs import client as S
from laren.jobs.sweep import default_concurrency, trial_run_config
from laren.specs import load_sweep
from laren.tracking import PARENT_TAG
from tests.integration._tiny_jobs import job_env, make_data, mlflow_runs, tiny_job

METRIC = "val/lpips_alex"

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

STEPS = MAX_T = 4  # one evaluation (= one report to Tune) per step; a trial's full budget is 4 evaluations
RUNGS = (1, 2)  # ASHA (grace period 1, reduction factor 2) may stop a trial after its 1st or 2nd evaluation


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def _write_sweep(project: Path, data) -> Path:
    tiny_job(project, "jcf-base", data, steps=STEPS, eval_every=1, ckpt_every=STEPS,
             eval={"random_backbone_for_tests": True}, tracking={"experiment": "sweep-it", "system_metrics": False})
    p = project / "sweeps" / "jcf-tiny.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump({
        "name": "jcf-tiny",
        "description": "J in {4, 8}, F in {8, 16}, one at a time",
        "job": "../jobs/jcf-base.yaml",
        "design": "axes",
        "search_space": {"model.gdm.num_nodes": {"grid": [4, 8]}, "model.cgm.code_dim": {"grid": [8, 16]}},
        "metric": METRIC,
        "mode": "min",
        "scheduler": {"kind": "asha", "time_attr": "training_iteration", "max_t": MAX_T, "grace_period": 1,
                      "reduction_factor": 2},
        "max_concurrent_trials": None,
    }, sort_keys=False))
    return p


def test_sweep_axes_asha_parent_children_and_fig8(ray_head, mlflow_server, tmp_path, data):
    from PIL import Image

    path = _write_sweep(tmp_path, data)
    sw = load_sweep(path)
    addr = ray_head.dashboard_url
    env = {**job_env(tmp_path, mlflow_server.uri), "RAY_ADDRESS": ray_head.address}
    sub = S.submit(path, address=addr, working_dir=tmp_path, env=env)
    assert sub.kind == "sweep" and sub.run_id == sw.run_id
    assert sub.entrypoint.endswith("python -m laren.cli run-sweep sweeps/jcf-tiny.yaml")
    st = S.wait(sw.run_id, addr, timeout_s=360)
    logs = S.logs(sw.run_id, addr)
    assert st == "SUCCEEDED", logs[-4000:]
    assert f"sweep {sw.run_id}: 3 grid point(s) x 1, 3 trial(s) at a time" in logs

    c, runs = mlflow_runs(mlflow_server.uri, "sweep-it")
    parent = runs[sw.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["laren.kind"] == "sweep"
    p = parent.data.params
    # ASHA as configured, and the concurrency the cluster's CPUs allow (1 worker CPU + the driver's 0.01 per trial; the
    # head has 4 logical CPUs, 4 per worker under pytest-xdist): every trial at once.
    assert (p["scheduler"], p["scheduler.time_attr"], p["scheduler.max_t"], p["scheduler.grace_period"],
            p["scheduler.reduction_factor"]) == ("asha", "training_iteration", str(MAX_T), "1", "2.0")
    assert p["max_concurrent_trials"] == "3" == str(default_concurrency(sw, {"CPU": float(ray_head.num_cpus)}))

    # One child run per trial (the base point, J = 8, F = 16), named by the trial's run id, with its point of the search
    # space.
    grid = sw.spec.grid_points(sw.base)
    points = [{"model.gdm.num_nodes": 4, "model.cgm.code_dim": 8, **pt} for pt in grid]
    assert points == [{"model.gdm.num_nodes": j, "model.cgm.code_dim": f} for j, f in ((4, 8), (8, 8), (4, 16))]
    expected = {trial_run_config(sw, pt, str(k)).run_id: full for k, (pt, full) in enumerate(zip(grid, points))}
    children = {name: r for name, r in runs.items() if r.data.tags.get(PARENT_TAG) == parent.info.run_id}
    assert set(children) == set(expected), (sorted(children), sorted(expected))
    for name, pt in expected.items():
        ch = children[name]
        assert ch.data.params["model.gdm.num_nodes"] == str(pt["model.gdm.num_nodes"])
        assert ch.data.params["model.cgm.code_dim"] == str(pt["model.cgm.code_dim"])
        # Stopped by ASHA (the run was killed and closed by the sweep) or finished before the stop arrived.
        assert ch.info.status in ("KILLED", "FINISHED"), (name, ch.info.status)
        if ch.info.status == "KILLED":
            assert ch.data.tags["laren.stopped_by"] == "scheduler"

    # The results on the parent: trial table (markdown, CSV) and Fig. 8 (png, and its plotted numbers as CSV).
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "results")}
    assert arts == {"results/trials.md", "results/trials.csv", "results/fig8.png", "results/fig8.csv"}

    def artifact(name: str) -> Path:
        return Path(c.download_artifacts(parent.info.run_id, f"results/{name}", str(tmp_path / "dl")))

    table = list(csv.DictReader(io.StringIO(artifact("trials.csv").read_text())))
    assert [r["trial"] for r in table] == ["0", "1", "2"]
    assert {r["run id"] for r in table} == set(expected)
    # Each child's metric history as MLflow holds it: the common budget is the largest step every trial evaluated.
    hist = {r["run id"]: {m.step: m.value for m in c.get_metric_history(children[r["run id"]].info.run_id, METRIC)}
            for r in table}
    common = max(set.intersection(*(set(h) for h in hist.values())))
    assert common >= 1 and {r["common step"] for r in table} == {str(common)}
    stopped, completed = [], []
    for r in table:
        pt, h = expected[r["run id"]], hist[r["run id"]]
        assert (int(r["model.gdm.num_nodes"]), int(r["model.cgm.code_dim"])) == (pt["model.gdm.num_nodes"],
                                                                                  pt["model.cgm.code_dim"])
        assert float(r[f"{METRIC} (common budget)"]) == h[common]
        assert int(r["evaluations"]) == len(h)
        if r["status"] == "completed":  # reached ASHA's max_t = the end of its training
            completed.append(r["trial"])
            assert int(r["full step"]) == STEPS and float(r[f"{METRIC} (full budget)"]) == h[STEPS]
        else:  # stopped by ASHA at a rung, its child run closed as KILLED by the scheduler
            stopped.append(r["trial"])
            m = re.fullmatch(r"stopped early \(ASHA, after (\d) evaluations?\)", r["status"])
            assert m and int(m.group(1)) in RUNGS and int(m.group(1)) <= len(h), r["status"]
            assert r["full step"] == "" and r[f"{METRIC} (full budget)"] == "nan"
            ch = children[r["run id"]]
            assert (ch.info.status, ch.data.tags.get("laren.stopped_by")) == ("KILLED", "scheduler")
    print(f"common step {common}; completed trials {completed}; stopped early {stopped}")
    assert completed  # the first trial at each rung always continues
    md = artifact("trials.md").read_text()
    assert md.count("\n| ") == 4 and all(name in md for name in expected)
    assert all(f"| {r['status']} | {r['run id']} |" in md for r in table)

    # The best trial at equal budget, and its full-budget value where it reached it.
    best = min(table, key=lambda r: hist[r["run id"]][common])
    assert parent.data.metrics[f"best/{METRIC}"] == hist[best["run id"]][common]
    assert parent.data.tags["laren.best_trial"] == best["run id"]
    if best["status"] == "completed":
        assert parent.data.metrics[f"best_full/{METRIC}"] == hist[best["run id"]][STEPS]
    else:
        assert f"best_full/{METRIC}" not in parent.data.metrics

    # Fig. 8's plotted values (design axes): per J (F), the trial having that value and the other field's base value,
    # at the common step (and at full budget where it got there), equal to its logged metric read back from MLflow.
    base = {"model.gdm.num_nodes": 4, "model.cgm.code_dim": 8}
    fig = list(csv.DictReader(io.StringIO(artifact("fig8.csv").read_text())))
    on_axis = {}
    for key in base:
        other = next(k for k in base if k != key)
        on_axis[key] = [r for r in table if int(r[other]) == base[other]]
        for r in on_axis[key]:
            want = {"common": hist[r["run id"]][common]}
            if r["status"] == "completed":
                want["full"] = hist[r["run id"]][STEPS]
            got = {p["series"]: float(p["mean"]) for p in fig if p["field"] == key and p["x"] == r[key]}
            assert got == want, (key, r[key], got, want)
    assert len(fig) == 4 + len(completed) + ("0" in completed)  # the base trial is on both panels

    # The figure: one panel per searched field (J, F), the common-budget curve (C0 blue) on each, and the full-budget
    # points (C1 orange) of the completed trials on it.
    png = Image.open(artifact("fig8.png")).convert("RGB")
    assert png.size == (800, 340)
    a = np.asarray(png).astype(int)
    for key, half in zip(base, (a[:, :400], a[:, 400:])):
        blue = (half[..., 2] > 150) & (half[..., 0] < 100)  # matplotlib's default line colour C0 (#1f77b4)
        orange = (half[..., 0] > 220) & (abs(half[..., 1] - 127) < 30) & (half[..., 2] < 60)  # C1 (#ff7f0e)
        assert blue.sum() > 50
        if any(r["status"] == "completed" for r in on_axis[key]):
            assert orange.sum() > 20
