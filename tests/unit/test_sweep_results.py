"""The sweep's results at equal budget on hand-built trial histories (no Ray, no MLflow): the common budget, each
trial's status, the best trial, Fig. 8's points (mean and std over repeats) and the trial table."""

from __future__ import annotations

import csv
import io
import math

import pytest

from laren.jobs.sweep_results import (Layout, Trial, best_trial, common_step, fig8_csv, fig8_points, from_reports, plot_fig8,
                                 status, trials_table)

J, F, SEED = "model.gdm.num_nodes", "model.cgm.code_dim", "train.seed"
LAYOUT = Layout("val/lpips_alex", "min", [J, F], {J: 4, F: 8})


def _asha_2x2() -> list[Trial]:
    """ASHA (grace 1, max_t 4, one evaluation per step): t0 kept to the end, t1 and t2 stopped, t3 failed."""
    return [
        Trial("0", "s-t0", {J: 4, F: 8}, {1: 0.50, 2: 0.45, 3: 0.40, 4: 0.35}, full_step=4, stopped_after=4),
        Trial("1", "s-t1", {J: 4, F: 16}, {1: 0.55}, stopped_after=1),
        Trial("2", "s-t2", {J: 8, F: 8}, {1: 0.48, 2: 0.47, 3: 0.46}, stopped_after=2),  # ran on after the stop
        Trial("3", "s-t3", {J: 8, F: 16}, {}, error="RuntimeError: worker died"),
    ]


def test_status_names_stopped_completed_and_failed_trials():
    t = _asha_2x2()
    assert [status(x) for x in t] == ["completed", "stopped early (ASHA, after 1 evaluation)",
                                      "stopped early (ASHA, after 2 evaluations)", "failed (RuntimeError: worker died)"]
    assert status(Trial("9", "r", {}, {2: 0.1, 4: 0.2})) == "stopped early (ASHA, after 2 evaluations)"


def test_common_step_is_the_largest_step_every_trial_that_did_not_fail_evaluated():
    t = _asha_2x2()
    assert common_step(t) == 1  # the failed trial (no evaluation) does not count
    assert common_step([Trial("0", "a", {}, {2: 1.0, 4: 1.0, 6: 1.0}), Trial("1", "b", {}, {1: 1.0, 2: 1.0, 3: 1.0})]) == 2
    assert common_step([Trial("0", "a", {}, {2: 1.0}), Trial("1", "b", {}, {3: 1.0})]) is None
    assert common_step([Trial("0", "a", {}, {}, error="x")]) is None


def test_best_trial_is_chosen_at_equal_budget_and_keeps_its_full_budget_value():
    t = _asha_2x2()
    b = best_trial(t, common_step(t), "min")
    # t0 has the lowest value overall (0.35 after 4 evaluations) but t2 is better at the common step 1.
    assert (b.trial, b.value(1), math.isnan(b.full_value)) == ("2", 0.48, True)
    assert best_trial(t, 1, "max").trial == "1"
    assert best_trial(t, None, "min") is None
    assert t[0].full_value == 0.35


def test_fig8_points_common_and_full_budget_series():
    pts = fig8_points(_asha_2x2(), LAYOUT)
    got = {(p["field"], p["series"], p["x"]): (p["mean"], p["std"], p["n"], p["trials"]) for p in pts}
    # cross design: each x shows the best setting having it; the common series at step 1, the full one where reached.
    assert got == {
        (J, "common", 4): (0.50, 0.0, 1, "0"), (J, "common", 8): (0.48, 0.0, 1, "2"),
        (J, "full", 4): (0.35, 0.0, 1, "0"),
        (F, "common", 8): (0.48, 0.0, 1, "2"), (F, "common", 16): (0.55, 0.0, 1, "1"),
        (F, "full", 8): (0.35, 0.0, 1, "0"),
    }
    assert all(p["step"] == 1 for p in pts if p["series"] == "common")


def test_repeats_of_a_setting_give_mean_and_sample_std():
    lay = Layout("val/psnr", "max", [J, SEED], {J: 4, SEED: 0})
    t = [Trial(str(i), f"r{i}", {J: j, SEED: s}, {1: v, 2: v + 1}, full_step=2)
         for i, (j, s, v) in enumerate([(4, 0, 20.0), (4, 1, 21.0), (4, 2, 22.0), (8, 0, 25.0)])]
    t.append(Trial("4", "r4", {J: 8, SEED: 1}, {1: 25.0}))  # stopped after one evaluation: the common step is 1
    pts = {(p["series"], p["x"]): p for p in fig8_points(t, lay)}
    assert {p["field"] for p in pts.values()} == {J}  # seeds repeat a setting, they are no panel
    assert (pts["common", 4]["mean"], pts["common", 4]["std"], pts["common", 4]["n"]) == (21.0, 1.0, 3)
    assert (pts["common", 4]["trials"], pts["common", 8]["std"], pts["common", 8]["n"]) == ("0 1 2", 0.0, 2)
    assert (pts["full", 8]["mean"], pts["full", 8]["n"], pts["common", 4]["step"]) == (26.0, 1, 1)
    md, _ = trials_table(t, lay)
    assert "| 4 | 21.0000 ± 1.0000 | 3 | 22.0000 ± 1.0000 | 3 | 0 1 2 |" in md
    assert "| 8 | 25.0000 ± 0.0000 | 2 | 26.0000 ± 0.0000 | 1 | 3 4 |" in md


def test_axes_design_keeps_the_points_on_the_base_axes():
    lay = Layout("m", "min", [J, F], {J: 4, F: 8}, design="axes")
    t = [Trial("0", "a", {}, {1: 0.5}), Trial("1", "b", {J: 8}, {1: 0.4}), Trial("2", "c", {F: 16}, {1: 0.6}),
         Trial("3", "d", {J: 8, F: 16}, {1: 0.1})]  # off both axes: not plotted
    got = {(p["field"], p["x"]): p["mean"] for p in fig8_points(t, lay) if p["series"] == "common"}
    assert got == {(J, 4): 0.5, (J, 8): 0.4, (F, 8): 0.5, (F, 16): 0.6}


def test_trial_table_rows_and_summary():
    t = _asha_2x2()
    md, text = trials_table(t, LAYOUT)
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["status"] for r in rows] == [status(x) for x in t]
    assert [r["val/lpips_alex (common budget)"] for r in rows] == ["0.5", "0.55", "0.48", "nan"]
    assert [r["val/lpips_alex (full budget)"] for r in rows] == ["0.35", "nan", "nan", "nan"]
    assert [r["common step"] for r in rows] == ["1"] * 4 and [r["full step"] for r in rows] == ["4", "", "", ""]
    assert [r["evaluations"] for r in rows] == ["4", "1", "3", "0"]
    assert [(r[J], r[F]) for r in rows] == [("4", "8"), ("4", "16"), ("8", "8"), ("8", "16")]
    assert "Best at equal budget (min val/lpips_alex): trial 2 (s-t2), 0.4800 at step 1; at full budget: not reached" in md
    assert "| 0 | 4 | 8 | 1 | 0.5000 | 4 | 0.3500 | 4 | completed | s-t0 |" in md
    assert "Per setting" not in md  # no repeats


def test_fig8_png_and_csv(tmp_path):
    from PIL import Image

    pts = fig8_points(_asha_2x2(), LAYOUT)
    rows = list(csv.DictReader(io.StringIO(fig8_csv(pts))))
    assert [(r["field"], r["series"], r["x"], float(r["mean"])) for r in rows] == [
        (p["field"], p["series"], str(p["x"]), p["mean"]) for p in pts]
    plot_fig8(pts, LAYOUT, "s", str(tmp_path / "fig8.png"))
    assert Image.open(tmp_path / "fig8.png").size == (800, 340)


@pytest.mark.parametrize("n", [1, 3])
def test_stopped_after_counts_evaluations(n):
    assert status(Trial("0", "r", {}, {i: 0.1 for i in range(1, 6)}, stopped_after=n)).endswith(
        f"after {n} evaluation{'s' if n > 1 else ''})")


def _reports(n: int, every: int = 1) -> list[dict]:
    """Tune's reports: one per evaluation at steps every, 2*every, ...; training_iteration counts them."""
    return [{"training_iteration": i, "step": i * every, "m": 1.0 / i} for i in range(1, n + 1)]


def test_from_reports_full_budget_and_stop_point():
    logged = {1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6}
    # Reached ASHA's max_t = 2 at step 2 (then ran on before the kill): full budget at step 2, not the last evaluation.
    t = from_reports("0", "r", {}, _reports(2), "m", logged, max_t=2)
    assert (t.full_step, t.full_value, status(t), len(t.history)) == (2, 0.8, "completed", 4)
    # Stopped by ASHA after its first report; the evaluation it logged before the kill arrived is kept in its history.
    t = from_reports("1", "r", {}, _reports(1), "m", {1: 0.9, 2: 0.8}, max_t=4)
    assert (t.full_step, status(t), t.value(2)) == (None, "stopped early (ASHA, after 1 evaluation)", 0.8)
    # ... unless it finished its training before the kill: it reached its full budget.
    assert from_reports("1", "r", {}, _reports(1), "m", logged, max_t=8, finished=True).full_step == 4
    # A failed trial never has a full budget; without MLflow's history, Tune's reports stand in (NaN left out).
    t = from_reports("2", "r", {}, _reports(2), "m", None, error="ValueError: x", finished=True, max_t=2)
    assert (t.history, t.full_step, status(t)) == ({1: 1.0, 2: 0.5}, None, "failed (ValueError: x)")
    assert from_reports("3", "r", {}, [{"step": 5, "m": math.nan}], "m").history == {}
    # time_attr in steps: max_t = 40 steps is reached by the report at step 40.
    t = from_reports("4", "r", {}, _reports(3, every=20), "m", {20: 0.5, 40: 0.4, 60: 0.3}, time_attr="step", max_t=40)
    assert (t.full_step, t.stopped_after) == (40, 3)


def test_seed_only_sweep_and_mixed_values_plot(tmp_path):
    seeds = Layout("m", "min", [SEED], {SEED: 0})  # only seeds searched: each seed is its own setting
    t = [Trial("0", "a", {SEED: 0}, {1: 0.5}), Trial("1", "b", {SEED: 1}, {1: 0.4})]
    assert [(p["x"], p["mean"]) for p in fig8_points(t, seeds)] == [(0, 0.5), (1, 0.4)]
    lr = "optim.cosine_min_lr"  # a field whose values mix None and numbers still sorts and plots
    lay = Layout("m", "min", [lr], {lr: None})
    t = [Trial("0", "a", {}, {1: 0.5}), Trial("1", "b", {lr: 1e-5}, {1: 0.4})]
    pts = fig8_points(t, lay)
    assert [p["x"] for p in pts] == [1e-5, None]
    plot_fig8(pts, lay, "s", str(tmp_path / "fig8.png"))
    assert (tmp_path / "fig8.png").stat().st_size > 0
