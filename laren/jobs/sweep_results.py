"""A sweep's results at equal budget: the trial table, the best trial and Fig. 8's points (pure: no Ray, no MLflow).

Trials of an early-stopping sweep run for different budgets, so their best or last values compare unequal things. Every
comparison here is made at the **common budget**: the largest step at which every trial that did not fail evaluated the
metric (with ASHA, its grace period). A second series gives the value at each trial's **full budget** (ASHA's ``max_t``,
or the end of its training), for the trials that reached it. Trials that repeat a setting (``num_samples > 1``, or a
searched ``...seed`` field) are one setting: its mean, with the sample standard deviation as the error bar.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from typing import Any, Optional

# Readable axis names of Fig. 8's fields.
NAMES = {"model.gdm.num_nodes": "J (GDM nodes)", "model.gdm.node_dim": "C (node width)",
         "model.cgm.code_dim": "F (code width)"}
SERIES = ("common", "full")  # at the common budget (every trial); at full budget (the trials that reached it)


@dataclass(frozen=True)
class Layout:
    """What a sweep compares: the metric and its direction, the searched fields, their base values, the design."""

    metric: str
    mode: str  # "min" or "max"
    fields: list[str]
    base: dict[str, Any]  # searched field -> the base job's value
    design: str = "cross"  # "cross" or "axes"
    stopper: str = "ASHA"  # the scheduler that stops trials early, as the status names it

    @property
    def settings_fields(self) -> list[str]:
        """The fields that make a setting: the searched ones except seeds (repeats of a setting), unless only seeds are."""
        return [k for k in self.fields if not k.rsplit(".", 1)[-1].endswith("seed")] or list(self.fields)


@dataclass
class Trial:
    """One trial: its metric history as the child run logged it, and how far it got."""

    trial: str
    run_id: str
    overrides: dict[str, Any]
    history: dict[int, float]  # step -> metric value
    full_step: Optional[int] = None  # the step at which it reached its full budget; None: it did not
    stopped_after: Optional[int] = None  # evaluations when it was stopped (default: all of its history)
    error: Optional[str] = None  # why it failed

    def value(self, step: Optional[int]) -> float:
        v = self.history.get(step, math.nan) if step is not None else math.nan
        return float(v) if isinstance(v, (int, float)) else math.nan

    @property
    def full_value(self) -> float:
        return self.value(self.full_step)


def from_reports(trial: str, run_id: str, overrides: dict[str, Any], reports: list[dict[str, Any]], metric: str,
                 history: Optional[dict[int, float]] = None, error: Optional[str] = None, finished: bool = False,
                 time_attr: str = "training_iteration", max_t: Optional[float] = None) -> Trial:
    """A trial from Ray Tune's reports (dicts with ``step``, ``time_attr`` and the metric, in order) and its logged
    ``history`` (None: the reports' values stand in). Its full budget: the last evaluation up to the first report
    at ``time_attr >= max_t`` (ASHA), else the end of its training when it ``finished``; none when it failed."""
    if history is None:
        history = {int(x["step"]): float(x[metric]) for x in reports if _finite(x.get(metric))}
    t = Trial(trial, run_id, overrides, dict(sorted(history.items())), error=error)
    if reports and reports[-1].get("step") is not None:  # Tune's last report: where the scheduler stopped it
        t.stopped_after = sum(1 for s in history if s <= reports[-1]["step"])
    if error is None and history:
        at_max = [int(x["step"]) for x in reports if max_t is not None and x.get(time_attr, -math.inf) >= max_t]
        if at_max:
            t.full_step = max((s for s in history if s <= at_max[0]), default=None)
        if t.full_step is None and finished:
            t.full_step = max(history)
    return t


def status(t: Trial, stopper: str = "ASHA") -> str:
    if t.error is not None:
        return f"failed ({t.error})"
    if t.full_step is not None:
        return "completed"
    n = len(t.history) if t.stopped_after is None else t.stopped_after
    return f"stopped early ({stopper}, after {n} evaluation{'' if n == 1 else 's'})"


def common_step(trials: list[Trial]) -> Optional[int]:
    """The largest step at which every trial that did not fail evaluated the metric (None: no such step)."""
    alive = [t for t in trials if t.error is None]
    if not alive:
        return None
    steps = set.intersection(*(set(t.history) for t in alive))
    return max(steps) if steps else None


def _finite(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _better(mode: str):
    return min if mode == "min" else max


def best_trial(trials: list[Trial], step: Optional[int], mode: str) -> Optional[Trial]:
    """The best trial at ``step`` (the common budget); None when no trial has a finite value there."""
    ok = [t for t in trials if _finite(t.value(step))]
    return _better(mode)(ok, key=lambda t: t.value(step)) if ok else None


def _setting_value(t: Trial, k: str, layout: Layout) -> Any:
    return t.overrides.get(k, layout.base.get(k))


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation; 0 for one trial
    n: int
    trials: list[str]


def _stat(trials: list[Trial], series: str, step: Optional[int]) -> Optional[Stat]:
    pairs = [(t.trial, t.value(step) if series == "common" else t.full_value) for t in trials]
    pairs = [(k, v) for k, v in pairs if _finite(v)]
    if not pairs:
        return None
    vals = [v for _, v in pairs]
    return Stat(statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals),
                [k for k, _ in pairs])


def settings(trials: list[Trial], layout: Layout) -> dict[tuple, list[Trial]]:
    """Trials grouped by setting (their searched values, seeds left out), in the order of their first trial."""
    out: dict[tuple, list[Trial]] = {}
    for t in trials:
        out.setdefault(tuple(_setting_value(t, k, layout) for k in layout.settings_fields), []).append(t)
    return out


def fig8_points(trials: list[Trial], layout: Layout) -> list[dict[str, Any]]:
    """Fig. 8's points: per field (panel), series and x value, the mean / std / n of the setting plotted there.

    ``axes``: the settings that differ from the base in this field only. ``cross``: per x, the best setting having it
    (by its mean in that series)."""
    step = common_step(trials)
    groups = settings(trials, layout)
    fields = layout.settings_fields
    out = []
    for k in fields:
        for series in SERIES:
            pts: dict[Any, tuple[tuple, Stat]] = {}
            for key, ts in groups.items():
                others = {o: v for o, v in zip(fields, key) if o != k}
                if layout.design == "axes" and any(v != layout.base.get(o) for o, v in others.items()):
                    continue
                s = _stat(ts, series, step)
                if s is None:
                    continue
                x = key[fields.index(k)]
                if x not in pts or _better(layout.mode)(s.mean, pts[x][1].mean) != pts[x][1].mean:
                    pts[x] = (key, s)
            for x in sorted(pts, key=_order):
                key, s = pts[x]
                out.append({"field": k, "series": series, "x": x, "step": step if series == "common" else "",
                            "mean": s.mean, "std": s.std, "n": s.n, "trials": " ".join(s.trials),
                            "setting": " ".join(f"{f}={v}" for f, v in zip(fields, key))})
    return out


def _order(v: Any) -> tuple:
    """Numbers in order, then anything else by its text."""
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return (not num, v if num else str(v))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if math.isfinite(v) else "n/a"
    return "n/a" if v is None else str(v)


def _md_table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _csv(head: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    w.writerows([["" if c is None else c for c in r] for r in rows])
    return buf.getvalue()


def table_head(layout: Layout) -> list[str]:
    m = layout.metric
    return ["trial", *layout.fields, "common step", f"{m} (common budget)", "full step", f"{m} (full budget)",
            "evaluations", "status", "run id"]


def trials_table(trials: list[Trial], layout: Layout) -> tuple[str, str]:
    """The trial table (markdown with a summary of the comparison, and CSV), one row per trial."""
    step = common_step(trials)
    rows = [[t.trial, *(_setting_value(t, k, layout) for k in layout.fields), step, t.value(step), t.full_step,
             t.full_value, len(t.history), status(t, layout.stopper), t.run_id] for t in trials]
    head = table_head(layout)
    m = layout.metric
    md = [f"Trials compared at the **common budget**: step {_fmt(step)}, the largest step at which every trial that "
          f"did not fail evaluated {m} (`{m} (common budget)`). `{m} (full budget)` is the value at the trial's full "
          f"budget (`full step`: {layout.stopper}'s max_t or the end of its training), for the trials that reached "
          f"it. `evaluations`: the evaluations the trial logged.", ""]
    b = best_trial(trials, step, layout.mode)
    if b is not None:
        full = f"{b.full_value:.4f} at step {b.full_step}" if _finite(b.full_value) else "not reached (stopped early)"
        md += [f"Best at equal budget ({layout.mode} {m}): trial {b.trial} ({b.run_id}), {b.value(step):.4f} at step "
               f"{step}; at full budget: {full}.", ""]
    md.append(_md_table(head, rows))
    groups = settings(trials, layout)
    if any(len(ts) > 1 for ts in groups.values()):
        srows = []
        for key, ts in groups.items():
            cells = []
            for series in SERIES:
                s = _stat(ts, series, step)
                cells += [f"{s.mean:.4f} ± {s.std:.4f}" if s else "n/a", s.n if s else 0]
            srows.append([*key, *cells, " ".join(t.trial for t in ts)])
        md += ["", "Per setting (mean ± sample std over its trials):", "",
               _md_table([*layout.settings_fields, f"{m} (common budget)", "n", f"{m} (full budget)", "n", "trials"],
                         srows)]
    return "\n".join(md), _csv(head, rows)


def fig8_csv(points: list[dict[str, Any]]) -> str:
    """The plotted numbers of fig8.png, one row per point."""
    head = ["field", "series", "x", "step", "mean", "std", "n", "trials", "setting"]
    return _csv(head, [[p[h] for h in head] for p in points])


def plot_fig8(points: list[dict[str, Any]], layout: Layout, title: str, path: str) -> None:
    """Fig. 8 style: one panel per field, the common-budget series (solid, C0) and the full-budget one (dashed, C1);
    error bars are the std over a setting's repeats."""
    import matplotlib  # optional heavy dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fields = layout.settings_fields
    step = next((p["step"] for p in points if p["series"] == "common"), None)
    labels = {"common": f"at step {step}: common budget, every trial", "full": "at full budget, trials that reached it"}
    fig, axes = plt.subplots(1, len(fields), figsize=(4 * len(fields), 3.4), squeeze=False)
    for ax, k in zip(axes[0], fields):
        xs_all = sorted({p["x"] for p in points if p["field"] == k}, key=_order)
        pos = {x: i for i, x in enumerate(xs_all)}
        for series, style in (("common", dict(fmt="o-", color="C0")), ("full", dict(fmt="s--", color="C1"))):
            ps = [p for p in points if p["field"] == k and p["series"] == series]
            if ps:
                ax.errorbar([pos[p["x"]] for p in ps], [p["mean"] for p in ps],
                            yerr=[p["std"] for p in ps] if any(p["n"] > 1 for p in ps) else None, capsize=3,
                            label=labels[series], **style)
        ax.set_xticks(range(len(xs_all)), [str(x) for x in xs_all])
        ax.set_xlabel(NAMES.get(k, k))
        ax.set_ylabel(layout.metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title}: {layout.metric} ({layout.mode}) against " + ", ".join(NAMES.get(k, k) for k in fields),
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

