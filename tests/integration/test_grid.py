"""A grid job end to end on real services: `laren submit` of a 2-row grid (Table IV style) to a real Ray head, each row a
Ray Train run (1 CPU worker) and an MLflow child run of one parent run; the results table (markdown + CSV) on the parent
holds exactly what each child logged."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from laren.cost import format_cost
from laren.jobs import client as S
from laren.jobs.grid import logged_metrics
from laren.specs import load_job
from laren.tracking import PARENT_TAG
from tests.integration._tiny_jobs import job_env, make_data, mlflow_runs, tiny_job

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

VARIANTS = [
    {"name": "base-w", "label": "Base", "overrides": {"model.latent_space": "w", "model.noise_source": "random"}},
    {"name": "gdm-hmrr-cgm-rerr", "label": "Base+GDM (HMRR)+CGM (ReRR)", "overrides": {}},  # the job's own model
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def test_grid_two_rows_table_equals_child_metrics(ray_head, mlflow_server, tmp_path, data):
    job = tiny_job(tmp_path, "ablation-tiny", data, steps=4, eval_every=2, ckpt_every=4, kind="grid",
                   description="two Table IV rows", eval={"random_backbone_for_tests": True},
                   tracking={"experiment": "grid-it", "system_metrics": False}, variants=VARIANTS)
    spec = load_job(job)
    rows = spec.rows()
    addr = ray_head.dashboard_url
    sub = S.submit(job, address=addr, working_dir=tmp_path, env=job_env(tmp_path, mlflow_server.uri))
    assert sub.kind == "grid" and sub.run_id == spec.run_id
    assert sub.entrypoint.endswith("python -m laren.cli run-grid jobs/ablation-tiny.yaml")
    st = S.wait(spec.run_id, addr, timeout_s=240)
    logs = S.logs(spec.run_id, addr)
    assert st == "SUCCEEDED", logs[-4000:]
    assert f"grid {spec.run_id}: 2 rows, 2 at a time" in logs  # 4 CPUs or more, 1 per row: side by side

    c, runs = mlflow_runs(mlflow_server.uri, "grid-it")
    parent = runs[spec.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["laren.kind"] == "grid"
    assert parent.data.params["rows"] == "2"
    children = {name: r for name, r in runs.items() if r.data.tags.get(PARENT_TAG) == parent.info.run_id}
    assert set(children) == {cfg.run_id for _, cfg in rows}
    base_w = children[rows[0][1].run_id]
    full = children[rows[1][1].run_id]
    assert (base_w.data.params["model.latent_space"], base_w.data.params["model.noise_source"]) == ("w", "random")
    assert (full.data.params["model.latent_space"], full.data.params["model.noise_source"]) == ("g", "cgm")

    # The parent's table: one row per variant, in the job's order, each holding its child's last logged val metrics.
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "results")}
    assert arts == {"results/table.md", "results/table.csv"}
    dl = str(tmp_path / "dl")
    table = list(csv.DictReader(io.StringIO(Path(c.download_artifacts(parent.info.run_id, "results/table.csv",
                                                                        dl)).read_text())))
    md = Path(c.download_artifacts(parent.info.run_id, "results/table.md", dl)).read_text()
    assert md.startswith("# ablation-tiny: two Table IV rows")
    md_rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert [r["model"] for r in table] == [v["label"] for v in VARIANTS]
    assert len(md_rows) == 2
    for r, line, (v, cfg) in zip(table, md_rows, rows):
        child = children[cfg.run_id]
        assert r["run_id"] == cfg.run_id and r["status"] == "FINISHED" and child.info.status == "FINISHED"
        for col, key in (("psnr", "val/psnr"), ("ssim", "val/ssim"), ("lpips_alex", "val/lpips_alex")):
            hist = c.get_metric_history(child.info.run_id, key)
            assert [m.step for m in hist] == [2, 4]  # evaluated twice; the table holds the last evaluation
            assert float(r[col]) == pytest.approx(hist[-1].value, rel=1e-12), (v.name, key)
        m = child.data.metrics
        cells = [x.strip() for x in line.strip("|").split("|")]
        assert cells == [v.title, f"{m['val/psnr']:.2f}", f"{m['val/ssim']:.4f}", f"{m['val/lpips_alex']:.4f}",
                         "0.016", format_cost(m), cfg.run_id, "FINISHED"]
        assert m["perf/gpu_hours"] == 0.0 and m["perf/worker_hours"] > 0
        assert float(r["worker_hours"]) == pytest.approx(m["perf/worker_hours"], rel=1e-12)
        # What a re-run grid reads for a row finished earlier (it evaluates nothing more): the same numbers.
        again = logged_metrics(mlflow_server.uri, "grid-it", cfg.run_id)
        assert again["val/psnr"] == pytest.approx(float(r["psnr"]), rel=1e-12)
        assert again["val/lpips_alex"] == pytest.approx(float(r["lpips_alex"]), rel=1e-12)
    # The two rows are different models: their numbers differ.
    assert table[0]["psnr"] != table[1]["psnr"]
