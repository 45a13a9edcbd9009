"""A job's input checks: `laren validate`'s resolved config, resources, model summary and health check, and the
warnings about its inputs (data, prior, weights) seen from here; a local job's inputs checked before it is queued."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Union

import yaml

from laren.config import ConfigError, RunConfig, project_root
from laren.data.storage import StorageError
from laren.jobs.entrypoints import job_context, job_env, run_configs
from laren.models import health
from laren.models.build import parameter_summary
from laren.plan import check_rules
from laren.redact import redact_text
from laren.specs import JobSpec, LoadedSweep, Spec, load_any, load_job, spec_kind
from laren.tracking import flatten
from laren.train.inputs import check_run_inputs, input_problems
from laren.train.prior import check_prior_inputs


def resources_text(spec: Spec) -> str:
    """What the job asks the cluster for, per run and at most at once."""
    if spec_kind(spec) == "analysis":
        a = spec.analysis
        return (f"runs in the job's driver process (no training workers): {len(a.checkpoints)} model(s), up to "
                f"{a.max_images} images, estimator {a.estimator}")
    lines = []
    cfgs = run_configs(spec)
    for label, cfg in cfgs[:1]:
        r = cfg.resources
        gpu = f", {r.num_workers} GPU{'s' if r.num_workers > 1 else ''}" + (f" ({r.gpu_type})" if r.gpu_type else "") if r.use_gpu else ""
        workers = f"{r.min_workers}..{r.num_workers}" if r.min_workers else f"{r.num_workers}"
        lines.append(f"per run: {workers} worker(s) x {r.cpus_per_worker:g} CPU{' + 1 GPU' if r.use_gpu else ''} "
                     f"= {r.num_workers * r.cpus_per_worker:g} CPUs{gpu}; batch {cfg.train.batch_size_global} global, "
                     f"{cfg.train.total_kimg:g} kimg")
    n = len(cfgs)
    if n > 1:
        what = "trials (grid points; x num_samples)" if isinstance(spec, LoadedSweep) else "rows"
        lines.append(f"{n} {what}, run side by side as far as the cluster's resources allow")
    return "\n".join(lines)


def model_summary_text(cfg: RunConfig) -> str:
    """Parameter table of the model (built on the meta device by laren.models.build; no weights are read)."""
    rows = parameter_summary(cfg.model)
    w = max(len(r[0]) for r in rows)
    out = [f"{'module':<{w}}  {'parameters':>14}  trainable"]
    for name, n, trainable in rows:
        out.append(f"{name:<{w}}  {n:>14,}  {'yes' if trainable else 'no'}")
    return "\n".join(out)


def _check_eval_target(spec: JobSpec, path: Path) -> None:
    """An eval job naming a train job file must build the same model (else its checkpoint cannot load)."""
    if spec.kind != "eval" or not spec.checkpoint.endswith((".yaml", ".yml")):
        return
    target = Path(spec.checkpoint)
    if not target.is_absolute():
        target = project_root(path.parent) / target
    if not target.is_file():
        raise ConfigError(f"invalid config in {path}:\n  checkpoint: job file not found: {spec.checkpoint} (looked at {target})")
    tj = load_job(target)
    a = spec.model.model_dump(mode="json")
    b = tj.model.model_dump(mode="json")
    a["prior"].pop("source")
    b["prior"].pop("source")
    fa, fb = flatten(a), flatten(b)
    diffs = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    if diffs:
        raise ConfigError(f"invalid config in {path}:\n  model: differs from {spec.checkpoint} at "
                          + ", ".join(f"model.{k}" for k in diffs) + "; copy the train job's model section")


def validate(path: Union[str, Path], summary: bool = True, health: bool = True) -> tuple[Spec, str]:
    """Load and check a job or sweep file; return it with the text `laren validate` prints. ``health``: also run the
    quick model-health check (every distinct model of a train job, grid or sweep at tiny widths; a dead or degenerate
    GDM / CGM at initialisation is a ConfigError, before any GPU is requested)."""
    path = Path(path)
    spec = load_any(path)
    if isinstance(spec, JobSpec):
        _check_eval_target(spec, path)
        if spec.kind == "analysis":
            from laren.analysis import check_targets  # sklearn and matplotlib load only for analysis jobs

            try:
                check_targets(spec, project_root(path.parent))
            except ConfigError as err:
                raise ConfigError(f"invalid config in {path}:\n  {err}") from None
    for label, cfg in run_configs(spec):
        try:
            check_rules(cfg)
        except ConfigError as err:
            raise ConfigError(f"invalid config in {path} ({label}):\n  {err}") from None
    parts = [f"# {path}: kind {spec_kind(spec)}", f"run id: {spec.run_id}"]
    if isinstance(spec, LoadedSweep):
        parts.append("# resolved sweep\n" + yaml.safe_dump(spec.spec.model_dump(mode="json"), sort_keys=False).rstrip())
        parts.append(f"# base job {spec.job_path} (run config of trial 0)\n" + spec.base.to_yaml().rstrip())
        pts = spec.spec.grid_points(spec.base)
        parts.append(f"# {len(pts)} grid point(s) x num_samples {spec.spec.num_samples}:\n"
                     + "\n".join(f"  t{i}: {p or '(base)'}" for i, p in enumerate(pts)))
    else:
        parts.append("# resolved config\n" + yaml.safe_dump(spec.to_dict(), sort_keys=False).rstrip())
        if spec.kind == "grid":
            parts.append("# rows (run id: overrides)\n" + "\n".join(
                f"  {cfg.run_id}: {v.overrides or '(base)'}" for v, cfg in spec.rows()))
    parts.append("# resources asked for\n" + resources_text(spec))
    if summary and spec_kind(spec) != "analysis":  # an analysis job's models are those of its checkpoints
        cfgs = run_configs(spec)
        parts.append(f"# model summary ({cfgs[0][0]})\n" + model_summary_text(cfgs[0][1]))
    if health and spec_kind(spec) in ("train", "grid", "sweep"):
        parts.append(_health_text(spec))
    return spec, redact_text("\n\n".join(parts))


def _health_text(spec: Spec) -> str:
    """The quick model-health check (laren/models/health.py); raises ConfigError naming each failing model."""
    t0 = time.perf_counter()
    cfgs = [(f"{cfg.name} ({label})", cfg.model, cfg.train.seed) for label, cfg in run_configs(spec)]
    failures = health.quick_check(cfgs)
    if failures:
        raise ConfigError(
            "model health: a module is dead or degenerate at initialisation (model-spec 9):\n  " + "\n  ".join(failures)
            + "\nsee `laren model health JOB` for the figures; the v1 switches model.cgm_activation: relu and "
            "model.gdm.relation_logits: l2 are known to fail"
        )
    n = len({c[1].model_dump_json() for c in cfgs})
    return f"# model health (quick check, tiny widths): PASS, {n} model(s) in {time.perf_counter() - t0:.1f} s"


def input_warnings(path: Union[str, Path]) -> list[str]:
    """`laren validate`'s warnings: every input of the job, grid or sweep at ``path`` (data manifests, prior, VGG16 /
    AlexNet weights) that is missing or does not fit, seen from here with the job's environment (a cluster's own
    paths may differ: hence warnings). Prior jobs: their data sets."""
    spec = load_any(path)
    root = project_root(Path(path).parent)
    out: list[str] = []
    with job_context(root, job_env(root)):
        if spec_kind(spec) == "prior":
            try:
                check_prior_inputs(spec.prior_config())
            except (ConfigError, OSError, ValueError, StorageError) as err:
                out.append(str(err))
        elif spec_kind(spec) in ("train", "grid", "sweep"):
            for _, cfg in run_configs(spec):
                out += [p for p in input_problems(cfg) if p not in out]
    return [redact_text(w) for w in out]


def check_inputs_here(spec: JobSpec) -> None:
    """When the job runs on this machine, check its inputs here (weights, prior, data; `check_run_inputs`) so that a
    missing file is an error of `laren submit` itself, before a Ray head is started or a job is queued. Called in the
    job's context (:func:`job_context`), so relative paths and s3:// URLs mean what they will mean in the job.
    (A remote cluster checks them in the job, before any worker starts: its paths need not exist here.)"""
    check_run_inputs(spec.run_config())
