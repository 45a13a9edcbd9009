"""A sweep end to end on real services: `laren submit` of a 2x2 sweep file to a real Ray head (Jobs API), Ray Tune with
ASHA on the cluster, each trial a Ray Train run (1 CPU worker) and an MLflow child run of the sweep's parent run; the
trial table and the Fig. 8-style plot on the parent."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from laren import submit as S
from laren.specs import load_sweep
from laren.sweep import default_concurrency, trial_run_config
from laren.tracking import PARENT_TAG
from tests.integration._tiny_jobs import job_env, make_data, mlflow_runs, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

STEPS = 6  # one evaluation (= one report to Tune) per step: a trial left alone would reach training_iteration 6
MAX_T = 2  # ASHA stops every trial at its 2nd report (rungs at 1 and 2; reduction factor 2)


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
        "description": "2x2: J in {4, 8}, F in {8, 16}",
        "job": "../jobs/jcf-base.yaml",
        "design": "cross",
        "search_space": {"model.gdm.num_nodes": {"grid": [4, 8]}, "model.cgm.code_dim": {"grid": [8, 16]}},
        "metric": "val/lpips_alex",
        "mode": "min",
        "scheduler": {"kind": "asha", "time_attr": "training_iteration", "max_t": MAX_T, "grace_period": 1,
                      "reduction_factor": 2},
        "max_concurrent_trials": None,
    }, sort_keys=False))
    return p


def test_sweep_2x2_asha_parent_children_and_fig8(ray_head, mlflow_server, tmp_path, data):
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
    assert f"sweep {sw.run_id}: 4 grid point(s) x 1, 3 trial(s) at a time" in logs

    c, runs = mlflow_runs(mlflow_server.uri, "sweep-it")
    parent = runs[sw.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["laren.kind"] == "sweep"
    p = parent.data.params
    # ASHA as configured, and the concurrency the cluster's 4 CPUs allow (1 worker CPU + the driver's 0.01 per trial).
    assert (p["scheduler"], p["scheduler.time_attr"], p["scheduler.max_t"], p["scheduler.grace_period"],
            p["scheduler.reduction_factor"]) == ("asha", "training_iteration", str(MAX_T), "1", "2.0")
    assert p["max_concurrent_trials"] == "3" == str(default_concurrency(sw, {"CPU": 4.0}))

    # One child run per trial (2 x 2), named by the trial's run id, with its point of the search space.
    points = sw.spec.grid_points(sw.base)
    assert len(points) == 4
    expected = {trial_run_config(sw, pt, str(k)).run_id: pt for k, pt in enumerate(points)}
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

    # The trial table on the parent: Tune's view of each trial equals what the child run logged.
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "results")}
    assert arts == {"results/trials.md", "results/trials.csv", "results/fig8.png"}
    table = list(csv.DictReader(io.StringIO(Path(c.download_artifacts(parent.info.run_id, "results/trials.csv",
                                                                        str(tmp_path / "dl"))).read_text())))
    assert [r["trial"] for r in table] == ["0", "1", "2", "3"]
    assert {r["run id"] for r in table} == set(expected)
    iters = []
    for r in table:
        assert r["status"] == "OK"
        pt = expected[r["run id"]]
        assert (int(r["model.gdm.num_nodes"]), int(r["model.cgm.code_dim"])) == (pt["model.gdm.num_nodes"],
                                                                                  pt["model.cgm.code_dim"])
        it, step = int(r["iterations"]), int(r["step"])
        iters.append(it)
        assert 1 <= it <= MAX_T and step == it  # one report per step: iteration k is step k
        hist = {m.step: m.value for m in c.get_metric_history(children[r["run id"]].info.run_id, "val/lpips_alex")}
        assert float(r["last val/lpips_alex"]) == pytest.approx(hist[step], rel=1e-9)
        assert float(r["best val/lpips_alex"]) == pytest.approx(min(hist[s] for s in range(1, step + 1)), rel=1e-9)
    # ASHA stopped every trial by max_t (each would otherwise report STEPS times); the first trial to reach the rung
    # always continues to max_t.
    assert max(iters) == MAX_T < STEPS
    best = min(float(r["best val/lpips_alex"]) for r in table)
    assert parent.data.metrics["best/val/lpips_alex"] == pytest.approx(best, rel=1e-9)
    md = Path(c.download_artifacts(parent.info.run_id, "results/trials.md", str(tmp_path / "dl"))).read_text()
    assert md.count("\n| ") == 5 and all(name in md for name in expected)

    # Fig. 8-style plot: one panel per searched field (J, F), with a curve drawn on each.
    png = Image.open(c.download_artifacts(parent.info.run_id, "results/fig8.png", str(tmp_path / "dl"))).convert("RGB")
    assert png.size == (800, 340)
    a = np.asarray(png)
    for half in (a[:, :400], a[:, 400:]):
        blue = (half[..., 2] > 150) & (half[..., 0] < 100)  # matplotlib's default line colour C0 (#1f77b4)
        assert blue.sum() > 50
    assert math.isfinite(best)
