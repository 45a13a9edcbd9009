"""Usage and cost figures, the fields that set them, keep-best settings, the tables that show them, eval run names."""

from __future__ import annotations

import pytest

from laren.config import ConfigError, PriorRunConfig, RunConfig, parse_section
from laren.cost import format_cost, usage_metrics
from laren.evaluate import eval_run_name
from laren.jobs.grid import results_table
from tests.unit.test_train_loop import tiny_config


def test_usage_metrics_gpu_cpu_and_price():
    assert usage_metrics(4 * 1800.0, True, 2.5) == {"perf/worker_hours": 2.0, "perf/gpu_hours": 2.0, "cost/usd": 5.0}
    assert usage_metrics(2 * 3600.0, False, None) == {"perf/worker_hours": 2.0, "perf/gpu_hours": 0.0}
    assert format_cost({"perf/gpu_hours": 2.0, "perf/worker_hours": 2.0, "cost/usd": 5.0}) == "2.00 GPU-h, $5.00"
    assert format_cost({"perf/gpu_hours": 0.0, "perf/worker_hours": 0.25}) == "0.25 worker-h"
    assert format_cost({"val/psnr": 20.0}) is None


def _with(section: str, fields: dict) -> dict:
    d = tiny_config("d", "u").to_dict()
    return {**d, section: {**d[section], **fields}}


def test_price_and_keep_best_fields_are_bounded_and_named():
    for section, fields, where in (("resources", {"hourly_price_usd": -1}, "resources.hourly_price_usd"),
                                   ("train", {"keep_best_metric": "psnr"}, "train.keep_best_metric"),
                                   ("train", {"keep_best_mode": "best"}, "train.keep_best_mode")):
        with pytest.raises(ConfigError, match=where):
            parse_section(RunConfig, _with(section, fields))
    with pytest.raises(ValueError, match="keep_best_metric applies to SR training jobs only"):
        PriorRunConfig.model_validate(_with("train", {"keep_best_metric": "val/psnr"}))
    # a price changes no result: same run id; keep-best changes what is kept: another run id
    base = tiny_config("d", "u")
    assert tiny_config("d", "u", resources=dict(hourly_price_usd=3.0)).run_id == base.run_id
    assert tiny_config("d", "u", train=dict(keep_best_metric="val/psnr")).run_id != base.run_id


def test_results_table_cost_and_data_columns():
    row = {"label": "LAREN", "run_id": "r-1", "status": "FINISHED", "kimg": 0.016, "val/psnr": 21.234,
           "perf/gpu_hours": 1.5, "perf/worker_hours": 1.5, "cost/usd": 4.5}
    md, csv_text = results_table([row])
    assert "| LAREN | 21.23 | n/a | n/a | 0.016 | 1.50 GPU-h, $4.50 | r-1 | FINISHED |" in md
    assert csv_text.splitlines()[1] == "LAREN,21.234,,,0.016,1.5,1.5,4.5,r-1,FINISHED"
    md, csv_text = results_table([{**row, "data": "celebahq", "test/psnr": 19.0}], split="test")
    assert md.splitlines()[0].startswith("| Model | Data | PSNR") and "| LAREN | celebahq | 19.00 |" in md
    assert csv_text.splitlines()[0].startswith("model,data,psnr")


def test_eval_run_names_one_per_checkpoint_and_data_set():
    a = eval_run_name("eval-x", "s3://b/runs/x/checkpoint_000000010", "s3://b/datasets/celebahq", 10, "celebahq")
    assert a.startswith("eval-x-s10-celebahq-")
    assert a == eval_run_name("eval-x", "s3://b/runs/x/checkpoint_000000010/", "s3://b/datasets/celebahq/", 10, "celebahq")
    assert a != eval_run_name("eval-x", "s3://b/runs/x/checkpoint_000000010", "s3://b/datasets/other", 10, "celebahq")
    assert a != eval_run_name("eval-x", "s3://b/runs/x/checkpoint_000000020", "s3://b/datasets/celebahq", 10, "celebahq")
