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
    import laren.submit as sub

    def no_ray(*a, **kw):
        raise AssertionError("Ray was contacted")

    monkeypatch.setattr(sub, "client", no_ray)
    monkeypatch.setattr(sub, "_check_inputs_here", no_ray)
    p = _job(tmp_path, resources={"num_workers": 8, "min_workers": 4})
    res = CliRunner().invoke(main, ["submit", str(p), "--detach"])
    assert res.exit_code == 2 and "resources.min_workers" in res.output, res.output
    model = {**copy.deepcopy(TINY_MODEL), "latent_space": "s", "noise_source": "cgm"}
    p.write_text(yaml.safe_dump({"name": "t", "model": model}))
    res = CliRunner().invoke(main, ["submit", str(p), "--detach"])
    assert res.exit_code == 2 and "model.noise_source" in res.output, res.output

