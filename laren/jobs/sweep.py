"""Ray Tune over a sweep file (`laren sweep SWEEP` submits it; `laren run-sweep SWEEP` is what runs on the cluster).

Under Ray Train V2 a Tune trial is a *driver function* that builds and fits one TorchTrainer, with
``ray.tune.integration.ray_train.TuneReportCallback`` forwarding every ``ray.train.report`` to Tune (ecosystem notes,
section 2). Hence: each trial = one Ray Train run (``laren.train.distributed.make_trainer``) = one MLflow child run of
the sweep's parent run (same experiment). ASHA compares trials on ``spec.metric`` at ``scheduler.time_attr`` rungs
(``training_iteration`` = the trial's count of reports, one per evaluation / checkpoint).

Concurrency is bounded by the cluster: ``max_concurrent_trials`` (or, when unset, the cluster's CPUs / GPUs divided by
one trial's workers plus its driver's share) trials at once; the driver function holds only ``DRIVER_RESOURCES``.

Paths: Tune runs each trial in its own working directory, so a trial resolves the job's relative local paths
(``./.laren/storage/...``) against the sweep driver's working directory, where its run id is computed too (the id
``laren validate`` shows; ids hash local paths in a canonical form, :func:`laren.config.path_identity`). A trial
stopped early by the scheduler is killed with its Ray Train run; its MLflow child run, left RUNNING by the killed
worker, is closed as KILLED (tag ``laren.stopped_by: scheduler``) when the sweep ends.

Identity: the Tune experiment is named after the sweep's run id under ``<storage>/runs/``; a re-submitted sweep
restores it (unfinished and errored trials continue). Trial ``k`` of the sweep trains the run ``<sweep>-t<k>-<hash>``.

Results (logged to the parent run, built by :mod:`laren.jobs.sweep_results`): ``trials.md`` / ``trials.csv`` (each trial's
point, its metric at the common budget and at its full budget, its evaluations and status), ``fig8.png`` (Fig. 8 style:
the metric against each searched field at the common budget, and at full budget for the trials that reached it; with
design ``axes`` the other fields sit at the base value, with ``cross`` each point is the best setting having that value)
and ``fig8.csv`` (the plotted numbers). The metric histories are read back from the child runs in MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from laren.data.storage import arrow_filesystem
from laren.jobs.grid import per_run_resources
from laren.jobs.sweep_results import (Layout, Trial, best_trial, common_step, fig8_csv, fig8_points, from_reports,
                                      plot_fig8, trials_table)
from laren.specs import LoadedSweep, experiment_name, field_values
from laren.tracking import Tracker, find_run, mlflow_client
from laren.train.distributed import ensure_ray, make_trainer, resolve_paths, runs_root

# Ray is imported inside the functions that use it: it takes seconds to load, and the result helpers need none of it.

# Tiny share of a CPU for the trial's driver function: its TorchTrainer's workers hold the real resources.
DRIVER_RESOURCES = {"CPU": 0.01}


def _domain(d):
    from ray import tune

    if d.choice is not None:
        return tune.choice(d.choice)
    if d.uniform is not None:
        return tune.uniform(*d.uniform)
    return tune.loguniform(*d.loguniform)


def param_space(sw: LoadedSweep) -> dict[str, Any]:
    """Tune's search space: an index into the grid points (grid_search) and one entry per sampled field."""
    from ray import tune

    pts = sw.spec.grid_points(sw.base)
    sampled = [k for k, d in sw.spec.search_space.items() if d.grid is None]
    space: dict[str, Any] = {"point": tune.grid_search(list(range(len(pts))))}
    if sampled:
        space["sampled"] = {str(i): _domain(sw.spec.search_space[k]) for i, k in enumerate(sampled)}
    return space


def trial_overrides(sw: LoadedSweep, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's dotted-path overrides from its Tune config."""
    pts = sw.spec.grid_points(sw.base)
    sampled = [k for k, d in sw.spec.search_space.items() if d.grid is None]
    out = dict(pts[config["point"]])
    for i, v in (config.get("sampled") or {}).items():
        out[sampled[int(i)]] = v
    return out


_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_[0-9]{5})(?:_|$)")


def _trial_index(trial_id: str) -> str:
    """Tune trial ids end in a zero-padded creation index (``abc12_00003``): stable across restores."""
    return str(int(trial_id.rsplit("_", 1)[-1])) if "_" in trial_id else trial_id


def trial_run_config(sw: LoadedSweep, overrides: dict[str, Any], k: str):
    """Trial ``k``'s run config (name ``<sweep>-t<k>``; its run id is the Ray Train run and MLflow child run name)."""
    return sw.trial_config(overrides, f"{sw.spec.name}-t{k}")


@contextlib.contextmanager
def _cwd(path: str):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _make_driver(sw: LoadedSweep, experiment: str, parent_run_id: str, storage_path: Optional[str], cwd: str):
    def driver(config: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        k = _trial_index(tune.get_context().get_trial_id())
        cfg = trial_run_config(sw, trial_overrides(sw, config), k)
        with _cwd(cwd):  # Tune moved this process into the trial's directory
            cfg = resolve_paths(cfg)
            run_id = cfg.run_id  # the id of the config as written in the sweep's directory (`laren validate`'s)
            sp = os.path.abspath(storage_path) if storage_path and "://" not in storage_path else storage_path
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": experiment})})
        result = make_trainer(cfg, run_id=run_id, parent_run_id=parent_run_id, extra_callbacks=[TuneReportCallback()],
                              storage_path=sp).fit()
        if result.error is not None:
            raise result.error

    return driver


def default_concurrency(sw: LoadedSweep, cluster: dict[str, float]) -> int:
    """Trials the cluster holds at once: its CPUs (GPUs) over one trial's workers plus its driver's share; at least 1."""
    n = len(sw.spec.grid_points(sw.base)) * sw.spec.num_samples
    need = per_run_resources(sw.base)
    need["CPU"] = need.get("CPU", 0.0) + DRIVER_RESOURCES["CPU"]
    fits = [int(cluster.get(k, 0.0) // v + 1e-9) for k, v in need.items() if v > 0]
    return max(1, min([n, *fits]))


def _scheduler(sw: LoadedSweep):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = sw.spec.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=s.time_attr, max_t=s.max_t, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor)


def layout(sw: LoadedSweep) -> Layout:
    """What the sweep's table and figure compare (see :mod:`laren.jobs.sweep_results`)."""
    keys = list(sw.spec.search_space)
    return Layout(sw.spec.metric, sw.spec.mode, keys, field_values(sw.base, keys), sw.spec.design,
                  "ASHA" if sw.spec.scheduler.kind == "asha" else sw.spec.scheduler.kind)


def _children(tracking_uri: str, experiment: str, run_ids: list[str], log: Callable[[str], None]) -> dict[str, Any]:
    """The trials' MLflow child runs by laren run id ({} when MLflow cannot be read)."""
    out: dict[str, Any] = {}
    try:
        c = mlflow_client(tracking_uri)
        exp = c.get_experiment_by_name(experiment)
        for rid in run_ids:
            run = find_run(c, [exp.experiment_id], rid) if exp else None
            if run is not None:
                out[rid] = run
    except Exception as err:  # the results matter more than their source: Tune's copy of the metrics stands in
        log(f"could not read the trials' MLflow runs (using Ray Tune's results): {type(err).__name__}: {err}")
    return out


def _history(tracking_uri: str, run, metric: str) -> Optional[dict[int, float]]:
    try:
        hist = mlflow_client(tracking_uri).get_metric_history(run.info.run_id, metric)
    except Exception:  # noqa: BLE001 - Tune's copy stands in
        return None
    return {int(m.step): float(m.value) for m in hist}


def _reason(err: BaseException) -> str:
    msg = (str(err).strip().splitlines() or [""])[-1]
    return f"{type(err).__name__}: {msg}"[:160].replace("|", "/")


def collect(sw: LoadedSweep, grid, tracking_uri: str, experiment: str,
            log: Callable[[str], None] = print) -> tuple[list[Trial], dict[str, Any]]:
    """One :class:`Trial` per Tune trial, and the MLflow child runs found (by run id).

    History: the metric as the child run logged it at each evaluation (MLflow, authoritative: complete and exact even
    for a trial that ran on after the scheduler stopped it); Ray Tune's reports when MLflow cannot be read. The end of
    the training: the child run FINISHED (under fifo: any trial that did not fail)."""
    metric, sched = sw.spec.metric, sw.spec.scheduler
    pending = []
    for r in grid:
        overrides = trial_overrides(sw, r.config)
        m = r.metrics or {}
        trial_id = m.get("trial_id", "")
        if not trial_id and r.path:  # no result reported: the id is in the trial's directory name
            found = _TRIAL_ID.search(os.path.basename(str(r.path).rstrip("/")))
            trial_id = found.group(1) if found else ""
        k = _trial_index(str(trial_id)) if trial_id else "?"
        df = r.metrics_dataframe
        reports = df.to_dict("records") if df is not None and "step" in df else []
        pending.append((k, trial_run_config(sw, overrides, k).run_id if k != "?" else "", overrides, r, reports))
    children = _children(tracking_uri, experiment, [p[1] for p in pending if p[1]], log)
    trials = []
    for k, run_id, overrides, r, reports in pending:
        child = children.get(run_id)
        finished = sched.kind == "fifo" or (child is not None and child.info.status == "FINISHED")
        trials.append(from_reports(k, run_id, overrides, reports, metric,
                                   _history(tracking_uri, child, metric) if child is not None else None,
                                   error=_reason(r.error) if r.error else None, finished=finished,
                                   time_attr=sched.time_attr, max_t=sched.max_t if sched.kind == "asha" else None))
    trials.sort(key=lambda t: int(t.trial) if t.trial.isdigit() else 0)
    return trials, children


def close_stopped_children(tracking_uri: str, trials: list[Trial], children: dict[str, Any],
                           log: Callable[[str], None] = print) -> None:
    """Close the MLflow child runs that killed trials left RUNNING: KILLED (stopped by the scheduler) or FAILED."""
    try:
        c = mlflow_client(tracking_uri)
        for t in trials:
            run = children.get(t.run_id)
            if run is None or run.info.status != "RUNNING":
                continue
            if t.error is None:
                c.set_tag(run.info.run_id, "laren.stopped_by", "scheduler")
            c.set_terminated(run.info.run_id, "KILLED" if t.error is None else "FAILED")
    except Exception as err:  # the results matter more than tidy run states
        log(f"could not close the stopped trials' MLflow runs: {type(err).__name__}: {err}")


def run_sweep(sw: LoadedSweep, storage_path: Optional[str] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sweep with Ray Tune on the current cluster (RAY_ADDRESS or local); see the module docstring."""
    import ray
    from ray import tune

    exp = experiment_name(sw)
    base = resolve_paths(sw.base)
    parent = Tracker(base.tracking.tracking_uri, exp, sw.run_id, tags={"laren.kind": "sweep", "laren.job": sw.spec.name},
                     system_metrics=False)
    sched = sw.spec.scheduler
    parent.log_params({"metric": sw.spec.metric, "mode": sw.spec.mode, "design": sw.spec.design,
                       "num_samples": sw.spec.num_samples, "scheduler": sched.kind, "base_job": sw.job.name,
                       **({f"scheduler.{k}": getattr(sched, k) for k in ("time_attr", "max_t", "grace_period",
                                                                          "reduction_factor")} if sched.kind == "asha" else {}),
                       **{f"search.{k}": str(d.model_dump(exclude_none=True)) for k, d in sw.spec.search_space.items()}})
    parent.log_config({"sweep": sw.spec.model_dump(mode="json"), "base": sw.base.to_dict()})
    parent.flush()
    ensure_ray()
    conc = sw.spec.max_concurrent_trials or default_concurrency(sw, ray.cluster_resources())
    parent.log_params({"max_concurrent_trials": conc})
    root = runs_root(base, storage_path)
    path, fs = arrow_filesystem(root)
    log(f"sweep {sw.run_id}: {len(sw.spec.grid_points(sw.base))} grid point(s) x {sw.spec.num_samples}, "
        f"{conc} trial(s) at a time; MLflow parent run {parent.run_id} in {exp!r}")
    trainable = tune.with_resources(_make_driver(sw, exp, parent.run_id, storage_path, os.getcwd()), DRIVER_RESOURCES)
    exp_path = f"{root.rstrip('/')}/{sw.run_id}"
    if tune.Tuner.can_restore(exp_path if fs is None else f"{path.rstrip('/')}/{sw.run_id}", storage_filesystem=fs):
        log(f"restoring the sweep from {exp_path}")
        tuner = tune.Tuner.restore(exp_path if fs is None else f"{path.rstrip('/')}/{sw.run_id}", trainable=trainable,
                                   resume_errored=True, param_space=param_space(sw), storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sw),
            tune_config=tune.TuneConfig(metric=sw.spec.metric, mode=sw.spec.mode, num_samples=sw.spec.num_samples,
                                        max_concurrent_trials=conc, scheduler=_scheduler(sw)),
            run_config=tune.RunConfig(name=sw.run_id, storage_path=path, storage_filesystem=fs,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    trials, children = collect(sw, grid, base.tracking.tracking_uri, exp, log)
    close_stopped_children(base.tracking.tracking_uri, trials, children, log)
    lay = layout(sw)
    md, csv_text = trials_table(trials, lay)
    points = fig8_points(trials, lay)
    with tempfile.TemporaryDirectory(prefix="laren-sweep-") as d:
        (Path(d) / "trials.md").write_text(f"# {sw.spec.name}: {sw.spec.description}\n\n" + md)
        (Path(d) / "trials.csv").write_text(csv_text)
        (Path(d) / "fig8.csv").write_text(fig8_csv(points))
        plot_fig8(points, lay, sw.spec.name, str(Path(d) / "fig8.png"))
        for f in ("trials.md", "trials.csv", "fig8.png", "fig8.csv"):
            parent.log_artifact(str(Path(d) / f), "results")
        parent.flush()
    step = common_step(trials)
    b = best_trial(trials, step, sw.spec.mode)
    if b is not None:
        full = b.full_value
        parent.log_metrics({f"best/{sw.spec.metric}": b.value(step),
                            **({f"best_full/{sw.spec.metric}": full} if math.isfinite(full) else {})}, step=step)
        parent.set_tags({"laren.best_trial": b.run_id})
        log(f"best trial t{b.trial} at equal budget (step {step}): {sw.spec.metric} = {b.value(step):.4f} with "
            f"{b.overrides or '(base)'}; at full budget: " + (f"{full:.4f}" if math.isfinite(full) else "not reached"))
    errors = [t for t in trials if t.error is not None]
    parent.finish("FAILED" if errors or b is None else "FINISHED")
    log(md)
    if errors or b is None:
        raise RuntimeError(f"sweep {sw.run_id}: " + (f"trials failed: {[t.run_id or t.trial for t in errors]}"
                           if errors else f"no trial reported {sw.spec.metric} at a common step")
                           + " (submit the sweep again to resume)")
