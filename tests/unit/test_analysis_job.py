"""The analysis job kind and its pieces without services: job validation (errors name the field), labels from a CSV
matched to packed images, Table II formatting, the Fig. 7 slice, and the grid's per-row mean ± std table."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from laren import analysis as A
from laren.config import ConfigError
from laren.jobs.grid import mean_std, summary_table
from laren.specs import load_job
from tests.conftest import write_random_pngs


def _write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_analysis_job_fields_are_checked(tmp_path):
    ok = "kind: analysis\nname: an\nanalysis:\n  checkpoints: [{label: L, checkpoint: run-1234}]\n"
    spec = load_job(_write(tmp_path, ok))
    assert spec.kind == "analysis" and spec.analysis.estimator == "gbt" and spec.analysis.colour_max == 0.4
    with pytest.raises(ConfigError, match="analysis section"):
        load_job(_write(tmp_path, "kind: analysis\nname: an\n"))
    with pytest.raises(ConfigError, match="only used by kind: analysis"):
        load_job(_write(tmp_path, ok.replace("kind: analysis", "kind: train")))
    with pytest.raises(ConfigError, match="analysis.test_fraction"):
        load_job(_write(tmp_path, ok + "  test_fraction: 1.5\n"))
    with pytest.raises(ConfigError, match="analysis.estimator"):
        load_job(_write(tmp_path, ok + "  estimator: forest\n"))
    # Jobs of other kinds keep their ids: the new optional section is not part of their hash.
    assert load_job("jobs/eval-demo.yaml").run_id == "eval-demo-" + load_job("jobs/eval-demo.yaml").config_hash()


def test_labels_csv_matched_to_packed_sources(tmp_path):
    from laren.data.pack import pack

    src = write_random_pngs(tmp_path / "img", [str(i * 7) for i in range(5)], (40, 40))
    pack(str(src), str(tmp_path / "shards"), "t", 32, progress=False)
    attrs = {i * 7: (1 if i % 2 else -1, i) for i in range(5)}
    rows = ["image,Smiling,Count"] + [f"{k}.jpg,{a},{b}" for k, (a, b) in attrs.items()]  # CelebA names .jpg files
    (tmp_path / "attrs.csv").write_text("\n".join(rows) + "\n")
    imgs, labels, specs = A.load_labelled(str(tmp_path / "shards"), 5, str(tmp_path / "attrs.csv"))
    assert imgs.shape == (5, 32, 32, 3) and [s["name"] for s in specs] == ["Smiling", "Count"]
    from laren.data.synth import read_samples

    _, metas, _ = read_samples(str(tmp_path / "shards"), 5)
    for m, lab in zip(metas, labels):  # every image got its own row, whatever the pack order
        k = int(m["source"].rsplit("/", 1)[-1].split(".")[0])
        assert tuple(lab) == attrs[k]
    (tmp_path / "short.csv").write_text("\n".join(rows[:3]) + "\n")
    with pytest.raises(ConfigError, match="no row for 3 of 5 images"):
        A.load_labelled(str(tmp_path / "shards"), 5, str(tmp_path / "short.csv"))


def test_fig7_slice_and_table2():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 24))
    x[:, 17] = x[:, 3] + 0.1 * rng.standard_normal(300)  # dim 18 follows dim 4 (1-based)
    rho = A.fig7_map(x)
    assert rho.shape == (5, 15) and rho[2, 3] > 0.99 and np.delete(rho.ravel(), 2 * 15 + 3).max() < 0.25
    with pytest.raises(ValueError, match="20 code dimensions"):
        A.fig7_map(x[:, :10])
    md, text = A.table2([{"model": "LAREN", "space": "G", "dims": 512, "D": 0.5, "C": 0.25, "I": 0.75, "checkpoint": "c"},
                         {"model": "Base", "space": "W (= Z)", "dims": 64, "D": 0.1, "C": 0.2, "I": 0.3, "checkpoint": "d"}])
    assert "| LAREN | G | 512 | 0.500 | 0.250 | 0.750 | 0.82 / 0.88 / 0.99 |" in md
    assert "| Base | W (= Z) | 64 | 0.100 | 0.200 | 0.300 | 0.47 / 0.51 / 0.94 |" in md
    assert list(csv.reader(io.StringIO(text)))[1][:6] == ["LAREN", "G", "512", "0.500000", "0.250000", "0.750000"]
    assert [A.slug(s) for s in ("W+", "W (= Z)", "Base+GDM (HMRR)")] == ["wplus", "w", "base-plus-gdm-hmrr"]


def test_grid_summary_mean_and_std_per_row():
    assert mean_std([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00" and mean_std([5.0], 1) == "5.0" and mean_std([], 1) == "n/a"
    rows = [{"label": "Base", "val/psnr": 20.0, "val/ssim": 0.5, "factor_fd": 10.0},
            {"label": "Base", "val/psnr": 22.0, "val/ssim": 0.7, "factor_fd": 14.0},
            {"label": "LAREN", "val/psnr": 23.0, "val/ssim": 0.8}]
    md, text = summary_table(rows)
    assert "| Base | 2 | 21.00 ± 1.41 | 0.6000 ± 0.1414 | 12.00 ± 2.83 |" in md
    assert "| LAREN | 1 | 23.00 | 0.8000 | n/a |" in md and "LPIPS" not in md
    got = list(csv.DictReader(io.StringIO(text)))
    assert float(got[0]["psnr_mean"]) == 21.0 and float(got[0]["psnr_std"]) == pytest.approx(math.sqrt(2))
    assert got[1]["factor_fd_mean"] == "nan"
