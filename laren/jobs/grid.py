"""What grid and eval jobs run on the cluster (`laren run-grid JOB`, `laren run-eval JOB`; `laren submit` starts them).

Grid (paper Table IV): one MLflow parent run named after the grid's run id, one Ray Train run per row
(``run_training(row, parent_run_id=parent)``, a child run in the same experiment), rows side by side as far as the
cluster's CPUs/GPUs hold them. When every row is done the parent gets ``table.md`` and ``table.csv`` (PSNR, SSIM,
LPIPS per row, from each row's last evaluation, and its training cost: ``perf/gpu_hours``, ``cost/usd``). On a synthetic
set (`laren data synth`) each run's SR images also get the factor-FD (:func:`sr_factor_fd`); then, or when rows share a
label (the seeds of one Table IV row), ``summary.md`` / ``summary.csv`` hold mean ± std per label. Re-running a grid
re-runs every row under its own run id, so finished
rows return at once (no worker starts for a complete run) and unfinished ones continue from their checkpoints.

Eval: the checkpoint a job names (a train job file -> its run id -> the newest ``checkpoint_*`` under
``<storage>/runs/<run id>/``; or a run id; or a checkpoint URL) evaluated with :func:`laren.evaluate.run_eval` on
``data.val_url``, logged as the MLflow run ``<eval job run id>-s<step>-<data set>-<hash>`` (one per checkpoint and
data set, tag ``laren.eval_job``: the eval job's run id). :func:`eval_rows` reads those runs back into the same table.
"""

from __future__ import annotations

import csv
import io
import math
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from laren import factor_fd as FD
from laren.config import ConfigError, RunConfig
from laren.cost import COST_KEYS, format_cost
from laren.data import pack, storage
from laren.data.synth import read_factor_samples
from laren.evaluate import load_model_from_checkpoint, lr_images, run_eval, super_resolve
from laren.specs import JobSpec, experiment_name, load_job
from laren.tracking import RUN_ID_TAG, Tracker, find_run, mlflow_client
from laren.train.distributed import ensure_ray, resolve_paths, run_training, runs_root
from laren.train.state import STATE_FILE, checkpoint_names

TABLE_METRICS = (("PSNR", "val/psnr"), ("SSIM", "val/ssim"), ("LPIPS", "val/lpips_alex"))


def per_run_resources(cfg: RunConfig) -> dict[str, float]:
    r = cfg.resources
    out = {"CPU": r.num_workers * r.cpus_per_worker}
    if r.use_gpu:
        out["GPU"] = float(r.num_workers)
    return out


def max_parallel(cfgs: list[RunConfig], cluster: dict[str, float]) -> int:
    """How many of these runs the cluster holds at once (by CPUs and GPUs; at least 1)."""
    need = per_run_resources(cfgs[0])
    fits = [int(cluster.get(k, 0.0) // v) for k, v in need.items() if v > 0]
    return max(1, min([len(cfgs), *fits]))


def results_table(rows: list[dict[str, Any]], split: str = "val") -> tuple[str, str]:
    """(markdown, csv) of the rows: label, [data set], PSNR, SSIM, LPIPS (``<split>/...``), kimg, cost, run id,
    status. The data set column appears when a row names one (tables of eval runs)."""
    def fmt(v: Any, digits: int) -> str:
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) and math.isfinite(v) else "n/a"

    keys = [(name, key.replace("val/", f"{split}/", 1)) for name, key in TABLE_METRICS]
    data = any("data" in r for r in rows)
    head = ["Model", *(["Data"] if data else []), *(m for m, _ in keys), "kimg", "cost", "run id", "status"]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        cells = [r["label"], *([r.get("data", "")] if data else []), fmt(r.get(keys[0][1]), 2), fmt(r.get(keys[1][1]), 4),
                 fmt(r.get(keys[2][1]), 4), fmt(r.get("kimg"), 3), format_cost(r) or "n/a", r["run_id"], r["status"]]
        md.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", *(["data"] if data else []), "psnr", "ssim", "lpips_alex", "kimg", "gpu_hours", "worker_hours",
                "cost_usd", "run_id", "status"])
    for r in rows:
        w.writerow([r["label"], *([r.get("data", "")] if data else []), *(r.get(k, "") for _, k in keys),
                    r.get("kimg", ""), *(r.get(k, "") for k in COST_KEYS), r["run_id"], r["status"]])
    return "\n".join(md) + "\n", buf.getvalue()


def logged_metrics(tracking_uri: str, experiment: str, run_id: str) -> dict[str, float]:
    """The latest value of each table metric the MLflow run ``run_id`` (its ``laren.run_id`` tag) logged; {} if none."""
    c = mlflow_client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    run = find_run(c, [exp.experiment_id], run_id) if exp else None
    if run is None:
        return {}
    m = run.data.metrics
    return {k: m[k] for k in (*(key for _, key in TABLE_METRICS), "train/kimg", *COST_KEYS) if k in m}


def eval_rows(tracking_uri: str, experiment: str, train_run_ids: Optional[list[str]] = None,
              labels: Optional[dict[str, str]] = None) -> list[dict[str, Any]]:
    """One table row per eval run (``laren eval`` / eval jobs: one per checkpoint and data set) in ``experiment``, read
    from those runs alone: model (``labels[train run id]`` or the train run id), data set, ``test/*``, the kimg and
    cost of the checkpoint, run id, status; ordered by train run, data set, step. ``train_run_ids``: only these."""
    c = mlflow_client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`laren.kind` = 'eval'", max_results=10_000)
    order = {t: i for i, t in enumerate(train_run_ids or [])}
    keyed = []
    for r in runs:
        train = r.data.tags.get("laren.train_run_id", "")
        if train_run_ids is not None and train not in order:
            continue
        m, data = r.data.metrics, r.data.params.get("data_name", "")
        row = {"label": (labels or {}).get(train, train), "data": data, "run_id": r.data.tags.get(RUN_ID_TAG, r.info.run_name),
               "status": r.info.status, "kimg": m.get("train/kimg"),
               **{k: v for k, v in m.items() if k.startswith("test/") or k in COST_KEYS}}
        keyed.append(((order.get(train, 0), train, data, int(r.data.params.get("step", 0))), row))
    rows = [row for _, row in sorted(keyed, key=lambda kr: kr[0])]
    return rows


def _row_task(cfg_dict: dict[str, Any], parent_run_id: str, storage_path: Optional[str]) -> dict[str, Any]:
    """One grid row (runs as a Ray task holding no CPU: its TorchTrainer's workers hold the resources)."""
    cfg = RunConfig.model_validate(cfg_dict)
    try:
        return {"status": "FINISHED", **run_training(cfg, parent_run_id=parent_run_id, storage_path=storage_path)}
    except Exception as err:  # one failed row must not lose the others' results
        return {"status": "FAILED", "error": f"{type(err).__name__}: {err}"}


def _finite_mean_sd(values: list[Any]) -> tuple[float, float, int]:
    """(mean, sample std, n) of the finite numbers among ``values``; nan where undefined."""
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    m = sum(v) / len(v) if v else math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan
    return m, sd, len(v)


def mean_std(values: list[Any], digits: int) -> str:
    """'m ± s' (sample std) of the finite values; 'm' for one; 'n/a' for none."""
    m, sd, n = _finite_mean_sd(values)
    return "n/a" if n == 0 else f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}"


SUMMARY = (("PSNR", "val/psnr", 2), ("SSIM", "val/ssim", 4), ("LPIPS", "val/lpips_alex", 4), ("factor-FD", "factor_fd", 2))


def summary_table(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(markdown, csv) with one line per label (the seeds of a Table IV row): mean ± std of each metric over its runs."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cols = [c for c in SUMMARY if any(c[1] in r for r in rows)]
    head = ["Model", "runs", *(c[0] for c in cols)]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "runs", *(x for c in cols for x in (f"{c[1].split('/')[-1]}_mean", f"{c[1].split('/')[-1]}_std"))])
    for label in labels:
        mine = [r for r in rows if r["label"] == label]
        cells = [mean_std([r.get(key, math.nan) for r in mine], d) for _, key, d in cols]
        md.append(f"| {label} | {len(mine)} | " + " | ".join(cells) + " |")
        stats = [_finite_mean_sd([r.get(key, math.nan) for r in mine])[:2] for _, key, _ in cols]
        w.writerow([label, len(mine), *(x for pair in stats for x in pair)])
    return "\n".join(md) + "\n", buf.getvalue()


def sr_factor_fd(base: RunConfig, checkpoints: dict[str, str], log: Callable[[str], None] = print,
                 regressor_steps: int = 600) -> dict[str, float]:
    """{run id: factor-FD of its SR images} on a synthetic validation set (:mod:`laren.factor_fd`): the Fréchet
    distance between the features of the first ``data.num_val_images`` HR images and of each checkpoint's SR images
    of them, with a factor regressor fitted once on up to 4096 training images (``regressor_steps``, seed train.seed,
as `laren prior train`'s default). {} when
    the validation set has no factors."""
    if not base.data.val_url or not pack.read_manifest(base.data.val_url).get("factors"):
        return {}
    src = base.data.train_url if base.data.train_url and pack.read_manifest(base.data.train_url).get("factors") \
        else base.data.val_url
    timgs, tf, specs = read_factor_samples(src, 4096)
    net = FD.train_regressor(FD.to_unit(timgs), torch.from_numpy(tf), specs, regressor_steps, seed=base.train.seed)
    imgs, _, _ = read_factor_samples(base.data.val_url, base.data.num_val_images)
    real = FD.feature_stats(net, FD.to_unit(imgs))
    out = {}
    for run_id, url in checkpoints.items():
        model, cfg, _ = load_model_from_checkpoint(url)
        sr = super_resolve(model, lr_images(imgs, cfg.model.lr_size))
        out[run_id] = FD.frechet_distance(*real, *FD.feature_stats(net, sr))
        log(f"  factor-FD of {run_id} (SR vs HR, {len(imgs)} images): {out[run_id]:.2f}")
    return out


def run_grid(spec: JobSpec, storage_path: Optional[str] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every row of a grid job under one MLflow parent run; log the results table to the parent."""
    import ray  # heavy (seconds): loaded when a grid runs, not when this module is imported (analysis, sweeps)

    if spec.kind != "grid":
        raise ConfigError(f"{spec.name}: kind is {spec.kind!r}; `laren run-grid` runs kind: grid jobs")
    exp = experiment_name(spec)
    base = resolve_paths(spec.run_config())
    parent = Tracker(base.tracking.tracking_uri, exp, spec.run_id, tags={"laren.kind": "grid", "laren.job": spec.name},
                     system_metrics=False)
    parent.log_params({"rows": len(spec.variants), "run_id": spec.run_id,
                       **{f"row.{v.name}": str(v.overrides) for v in spec.variants}})
    parent.log_config(spec.to_dict())
    parent.flush()
    rows = [(v, cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"experiment": exp})}))
            for v, cfg in spec.rows()]
    ensure_ray()
    width = max_parallel([c for _, c in rows], ray.cluster_resources())
    log(f"grid {spec.run_id}: {len(rows)} rows, {width} at a time; MLflow parent run {parent.run_id} in {exp!r}")
    task = ray.remote(num_cpus=0, max_retries=0)(_row_task)
    pending, results = {}, {}
    queue = list(range(len(rows)))
    while queue or pending:
        while queue and len(pending) < width:
            i = queue.pop(0)
            pending[task.remote(rows[i][1].to_dict(), parent.run_id, storage_path)] = i
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        results[i] = ray.get(done[0])
        log(f"  row {rows[i][0].name}: {results[i]['status']} {results[i].get('error', '')}")
    table_rows = [{"label": v.title, "run_id": cfg.run_id, **results[i]} for i, (v, cfg) in enumerate(rows)]
    for r in table_rows:
        # A row finished by an earlier attempt evaluates nothing again: its numbers are the ones it logged.
        if r["status"] == "FINISHED" and any(key not in r for _, key in TABLE_METRICS):
            try:
                got = logged_metrics(base.tracking.tracking_uri, exp, r["run_id"])
            except Exception as err:  # tracking server down: the table says n/a for these cells
                log(f"  row {r['run_id']}: metrics not found in MLflow ({type(err).__name__}: {err})")
                got = {}
            r.update({k: v for k, v in got.items() if k not in r})
            r.setdefault("kimg", got.get("train/kimg"))
    done = {r["run_id"]: r for r in table_rows if r["status"] == "FINISHED"}
    try:
        runs = runs_root(base, storage_path)
        fds = sr_factor_fd(base, {rid: latest_checkpoint(runs, rid) for rid in done}, log) if done else {}
    except Exception as err:  # the metric is an addition: the table of the runs' own figures still gets written
        log(f"  factor-FD not computed ({type(err).__name__}: {err})")
        fds = {}
    for rid, v in fds.items():
        done[rid]["factor_fd"] = v
    parent.log_metrics({f"factor_fd/{rid}": v for rid, v in fds.items()}, step=0)
    md, csv_text = results_table(table_rows)
    title = f"# {spec.name}: {spec.description or 'ablation grid'}\n\n"
    grouped = fds or len({r["label"] for r in table_rows}) < len(table_rows)
    with tempfile.TemporaryDirectory(prefix="laren-grid-") as d:
        (Path(d) / "table.md").write_text(title + md)
        (Path(d) / "table.csv").write_text(csv_text)
        parent.log_artifact(str(Path(d) / "table.md"), "results")
        parent.log_artifact(str(Path(d) / "table.csv"), "results")
        if grouped:  # seeds of one row, or the factor-FD: mean ± std per row
            smd, scsv = summary_table(table_rows)
            md += "\nPer row, mean ± std over its runs:\n\n" + smd
            (Path(d) / "summary.md").write_text(title + smd)
            (Path(d) / "summary.csv").write_text(scsv)
            parent.log_artifact(str(Path(d) / "summary.md"), "results")
            parent.log_artifact(str(Path(d) / "summary.csv"), "results")
        parent.flush()
    failed = [r["run_id"] for r in table_rows if r["status"] != "FINISHED"]
    parent.finish("FAILED" if failed else "FINISHED")
    log(title + md)
    out = {"run_id": spec.run_id, "mlflow_run_id": parent.run_id, "rows": table_rows, "table_md": md, "table_csv": csv_text}
    if failed:
        raise RuntimeError(f"grid {spec.run_id}: rows failed: {failed} (submit the grid again to resume them)")
    return out


# ----------------------------------------------------------------------------------------------- eval jobs


def latest_checkpoint(runs_url: str, run_id: str) -> str:
    """The newest complete ``checkpoint_*`` directory of a run under ``runs_url`` (local path or s3://): the
    completeness rule of :func:`laren.train.state.checkpoint_names` (a ``state.json``, written last)."""
    base = storage.join(runs_url, run_id)
    names = checkpoint_names(base)
    if not names:
        raise FileNotFoundError(f"no complete checkpoint_* (with {STATE_FILE}) under {base}: train that run first "
                                "(`laren submit` its job) or point checkpoint: at a checkpoint directory")
    return storage.join(base, names[0])


def checkpoint_run_id(ref: str, root: Optional[Path] = None) -> str:
    """The run id a job-file reference names: ``jobs/x.yaml`` (a train job) or ``jobs/grid.yaml#row`` (a grid row)."""
    path, _, row = ref.partition("#")
    p = Path(path)
    if not p.is_absolute():
        p = (root or Path.cwd()) / p
    if not p.is_file():
        raise FileNotFoundError(f"job file not found: {path} (looked at {p})")
    job = load_job(p)
    if job.kind == "grid":
        ids = {v.name: cfg.run_id for v, cfg in job.rows()}
        if row not in ids:
            raise ConfigError(f"{ref}: name one row of the grid as {path}#<row>; rows: {', '.join(ids)}")
        return ids[row]
    if row:
        raise ConfigError(f"{ref}: '#{row}' names a grid row, but {path} is kind: {job.kind}")
    return job.run_id


def checkpoint_url(ref: str, runs_url: str, root: Optional[Path] = None) -> str:
    """The checkpoint directory a reference names: a job file (``#row`` for a grid row) -> its run's newest
    checkpoint; a URL or path with '/' -> itself; else a run id -> its newest checkpoint under ``runs_url``."""
    if ref.partition("#")[0].endswith((".yaml", ".yml")):
        return latest_checkpoint(runs_url, checkpoint_run_id(ref, root))
    if "/" in ref or "://" in ref:
        return ref
    return latest_checkpoint(runs_url, ref)


def resolve_checkpoint(spec: JobSpec, root: Optional[Path] = None) -> str:
    """The checkpoint URL an eval job names (see the module docstring)."""
    return checkpoint_url(spec.checkpoint, runs_root(resolve_paths(spec.run_config())), root)


def run_eval_job(spec: JobSpec, out_dir: Optional[str] = None, root: Optional[Path] = None) -> dict[str, Any]:
    """Evaluate an eval job's checkpoint on its data.val_url; the MLflow run is named after the eval job's run id."""
    if spec.kind != "eval":
        raise ConfigError(f"{spec.name}: kind is {spec.kind!r}; `laren run-eval` runs kind: eval jobs")
    cfg = resolve_paths(spec.run_config())
    if not cfg.data.val_url:
        raise ConfigError(f"{spec.name}: data.val_url is empty: set it to the packed test set")
    ck = resolve_checkpoint(spec, root)
    out = out_dir or tempfile.mkdtemp(prefix=f"laren-eval-{spec.name}-")
    return run_eval(ck, cfg.data.val_url, out, alexnet_path=cfg.eval.alexnet_path,
                    random_backbone_for_tests=cfg.eval.random_backbone_for_tests, tracking_uri=cfg.tracking.tracking_uri,
                    experiment=experiment_name(spec), run_name=spec.run_id)
