"""Job and sweep files: a run config plus what kind of job it is; validated before anything is submitted.

A job YAML is self-contained (no inheritance, house rule 11): the fields of :class:`laren.config.RunConfig` at top level,
plus ``kind`` (train | eval | grid | prior | analysis), for eval jobs ``checkpoint``, for grids ``variants`` (the rows
of Table IV), for prior jobs ``gan`` and for analysis jobs ``analysis`` (Table II, Fig. 7).
A sweep YAML (``sweeps/``) names one job file and the search space over its dotted field paths (the J, C, F study of
Fig. 8). Every error names the file and the field path (``variants.2.overrides.model.latent_space: ...``).

Identity (architecture, "Identity and storage conventions"): a train job's run id is exactly the run id of its run
config (``<name>-<hash>``), which training computes again on the cluster; eval, grid and sweep ids hash the whole spec.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, model_validator

from laren.config import (AnalysisConfig, ConfigError, PriorRunConfig, PriorTrainConfig, RunConfig, Section, load_yaml,
                          parse_section)

_NAME = re.compile(r"[a-z][a-z0-9-]*")


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{what} {name!r} must start with a lowercase letter and hold only lowercase letters, digits "
                         "and '-' (it becomes part of run ids, paths and commands)")


# ----------------------------------------------------------------------------------------------- overrides


def apply_overrides(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` (a run config as a dict) with each dotted path set: ``{"model.gdm.num_nodes": 32}``.

    Only existing fields can be set, so a mistyped path is an error naming it (the config itself forbids unknown keys too;
    checking here gives the override's path rather than a missing-default one).
    """
    out = copy.deepcopy(base)
    for path, value in overrides.items():
        node = out
        keys = path.split(".")
        for i, k in enumerate(keys):
            if not isinstance(node, dict) or k not in node:
                raise ConfigError(f"{path}: unknown field {'.'.join(keys[: i + 1])!r} (check the spelling against `laren validate`)")
            if i == len(keys) - 1:
                node[k] = copy.deepcopy(value)
            else:
                node = node[k]
    return out


def field_values(cfg: RunConfig, paths: list[str]) -> dict[str, Any]:
    """The config's value at each dotted field path: ``{"model.gdm.num_nodes": 64}``."""
    flat = cfg.to_dict()
    out = {}
    for path in paths:
        node: Any = flat
        for k in path.split("."):
            node = node[k]
        out[path] = node
    return out


def _override_config(base: RunConfig, overrides: dict[str, Any], name: str, where: str) -> RunConfig:
    """``base`` with ``overrides`` applied and ``name`` set, validated; errors are prefixed with ``where``."""
    try:
        d = apply_overrides(base.to_dict(), overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}") from None
    d["name"] = name
    return parse_section(RunConfig, d, source="", prefix=where)


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------------------------- jobs


class Variant(Section):
    """One row of a grid job: a name and dotted-path overrides of the job's config."""

    name: str = Field(..., description="Row id, lowercase (e.g. 'base-w', 'gdm-hmrr'); the row's run is '<job>-<name>'.")
    label: str = Field("", description="Row label in the results table (e.g. 'Base+GDM (HMRR)'); empty uses name.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted field path -> value, e.g. model.latent_space: w.")

    @model_validator(mode="after")
    def _check(self) -> "Variant":
        _check_name(self.name, "variant name")
        return self

    @property
    def title(self) -> str:
        return self.label or self.name


class JobSpec(RunConfig):
    """A job file: a run config plus its kind; grids add rows, eval jobs name what to evaluate."""

    kind: Literal["train", "eval", "grid", "prior", "analysis"] = Field(
        "train", description="train: one run; eval: evaluate a trained run's checkpoint; grid: one child run per variant; "
        "prior: train a StyleGAN2 prior (`laren prior train`); analysis: DCI and correlation maps of trained models "
        "(`laren analyze`).",
    )
    analysis: Optional[AnalysisConfig] = Field(None, description="kind: analysis: the models and the estimator.")
    gan: Optional[PriorTrainConfig] = Field(None, description="kind: prior: GAN training settings (defaults when omitted).")
    variants: list[Variant] = Field(default_factory=list, description="Grid rows (kind: grid), run as child runs of one parent.")
    checkpoint: str = Field(
        "",
        description="kind: eval: what to evaluate: a train job file (jobs/face64x.yaml: its run's latest checkpoint), "
        "a run id (face64x-1a2b3c4d), or a checkpoint directory URL (local path or s3://).",
    )

    @model_validator(mode="after")
    def _check_kind(self) -> "JobSpec":
        _check_name(self.name, "job name")
        if self.kind == "grid":
            if not self.variants:
                raise ValueError("kind: grid needs at least one entry in variants")
            names = [v.name for v in self.variants]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"variants: duplicate row names {dup}")
        elif self.variants:
            raise ValueError(f"variants are only used by kind: grid (this job is kind: {self.kind})")
        if self.kind == "eval" and not self.checkpoint:
            raise ValueError("kind: eval needs checkpoint: a train job file, a run id or a checkpoint URL")
        if self.kind != "eval" and self.checkpoint:
            raise ValueError(f"checkpoint is only used by kind: eval (this job is kind: {self.kind})")
        if self.kind != "prior" and self.gan is not None:
            raise ValueError(f"gan is only used by kind: prior (this job is kind: {self.kind})")
        if (self.kind == "analysis") != (self.analysis is not None):
            raise ValueError("kind: analysis needs an analysis section (checkpoints: ...)" if self.kind == "analysis"
                             else f"analysis is only used by kind: analysis (this job is kind: {self.kind})")
        return self

    def run_config(self) -> RunConfig:
        """The job's run config (for a grid: the shared base of its rows)."""
        d = self.model_dump(mode="json", exclude={"kind", "variants", "checkpoint", "gan", "analysis"})
        return RunConfig.model_validate(d)

    def prior_config(self) -> PriorRunConfig:
        """kind: prior: the run config with its GAN settings."""
        d = self.model_dump(mode="json", exclude={"kind", "variants", "checkpoint", "gan", "analysis"})
        return PriorRunConfig.model_validate({**d, "gan": (self.gan or PriorTrainConfig()).model_dump(mode="json")})

    def config_hash(self) -> str:
        """train: the run config's hash (training computes the same id); eval/grid: a hash of the whole spec."""
        if self.kind == "train":
            return self.run_config().config_hash()
        if self.kind == "prior":
            return self.prior_config().config_hash()
        d = self.to_dict()
        d.pop("gan", None)
        if d.get("analysis") is None:  # jobs of other kinds keep the ids they had before kind: analysis existed
            d.pop("analysis", None)
        for k in ("storage", "tracking", "description"):
            d.pop(k, None)
        d["resources"].pop("peak_tflops", None)  # the peak MFU is measured against changes no result
        return _short_hash(d)

    def rows(self) -> list[tuple[Variant, RunConfig]]:
        """The grid's rows as (variant, validated run config named ``<job>-<variant>``)."""
        base = self.run_config()
        return [
            (v, _override_config(base, v.overrides, f"{self.name}-{v.name}", f"variants.{i}.overrides"))
            for i, v in enumerate(self.variants)
        ]


def _load_named(path: str | Path, what: str) -> dict[str, Any]:
    """The fields of a job or sweep file (``what``); ``name`` defaults to the file's stem."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a {what} file must be a mapping of fields")
    return data if "name" in data else {**data, "name": Path(path).stem}


def load_job(path: str | Path) -> JobSpec:
    """Load and validate a job YAML; errors name the file and the field path (grid rows included)."""
    spec = parse_section(JobSpec, _load_named(path, "job"), source=str(path))
    if spec.kind == "grid":
        try:
            spec.rows()
        except ConfigError as err:
            raise ConfigError(f"invalid config in {path}:\n  {str(err).strip()}") from None
    return spec


# ----------------------------------------------------------------------------------------------- sweeps


class Domain(Section):
    """One searched field: exactly one of grid (every value), choice (sampled), uniform / loguniform ([low, high])."""

    grid: Optional[list[Any]] = Field(None, description="Every value is tried (Ray Tune grid_search).")
    choice: Optional[list[Any]] = Field(None, description="One value sampled per trial (Ray Tune choice).")
    uniform: Optional[tuple[float, float]] = Field(None, description="[low, high], sampled uniformly.")
    loguniform: Optional[tuple[float, float]] = Field(None, description="[low, high], sampled log-uniformly (low > 0).")

    @model_validator(mode="after")
    def _one(self) -> "Domain":
        set_ = [k for k in ("grid", "choice", "uniform", "loguniform") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform (got {set_ or 'none'})")
        for k in ("grid", "choice"):
            v = getattr(self, k)
            if v is not None and not v:
                raise ValueError(f"{k} must list at least one value")
        for k in ("uniform", "loguniform"):
            v = getattr(self, k)
            if v is not None and not (v[0] < v[1] and (k == "uniform" or v[0] > 0)):
                raise ValueError(f"{k} must be [low, high] with low < high{' and low > 0' if k == 'loguniform' else ''}")
        return self

    def values(self) -> list[Any]:
        """Every value a grid / choice domain can take (used to validate trial configs up front)."""
        return list(self.grid if self.grid is not None else self.choice or [])


class SchedulerSpec(Section):
    """Early stopping of trials (ASHA, as the issue asks; fifo runs every trial to the end)."""

    kind: Literal["asha", "fifo"] = Field("asha", description="asha: Async Successive Halving; fifo: no early stopping.")
    time_attr: str = Field(
        "training_iteration",
        description="Progress measure ASHA compares at: training_iteration counts the trial's reports (one per "
        "training report/eval), or any monotone metric the run reports.",
    )
    max_t: int = Field(100, description="Longest a trial runs, in time_attr units.")
    grace_period: int = Field(1, description="Least a trial runs before it may be stopped, in time_attr units.")
    reduction_factor: float = Field(3.0, description="ASHA keeps 1/reduction_factor of the trials at each rung.")


class SweepSpec(Section):
    """A sweep file: a base job and a search space over its fields (Fig. 8: J, C, F)."""

    name: str = Field(..., description="Sweep name (the sweep's run id is <name>-<hash>; MLflow parent run name).")
    description: str = Field("", description="What this sweep studies.")
    job: str = Field(..., description="The base train job file, relative to this sweep file (e.g. ../jobs/face64x.yaml).")
    design: Literal["cross", "axes"] = Field(
        "cross",
        description="cross: every combination of the grid values; axes: vary one field at a time around the base job's "
        "value (Fig. 8's curves; only grid domains).",
    )
    search_space: dict[str, Domain] = Field(..., description="Dotted field path -> domain, e.g. model.gdm.num_nodes: {grid: [16, 32]}.")
    trial_overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted field path -> value applied to every trial (e.g. a shorter train.total_kimg)."
    )
    metric: str = Field("val/lpips_alex", description="Metric the scheduler and the result table rank by.")
    mode: Literal["min", "max"] = Field("min", description="min for LPIPS, max for PSNR.")
    num_samples: int = Field(1, description="Repeats of the grid (each with new samples of choice/uniform domains).")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Trial scheduler.")
    max_concurrent_trials: Optional[int] = Field(
        None, description="Cap on trials at once; None: as many as the cluster's CPUs/GPUs hold (per-trial resources)."
    )

    @model_validator(mode="after")
    def _check(self) -> "SweepSpec":
        _check_name(self.name, "sweep name")
        if not self.search_space:
            raise ValueError("search_space must name at least one field")
        if self.num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        if self.design == "axes":
            bad = [k for k, d in self.search_space.items() if d.grid is None]
            if bad:
                raise ValueError(f"design: axes needs grid domains; not grid: {bad}")
        return self

    def grid_points(self, base: RunConfig) -> list[dict[str, Any]]:
        """The grid part of the design as override dicts (sampled domains are added by Ray Tune per trial)."""
        grids = {k: d.grid for k, d in self.search_space.items() if d.grid is not None}
        if not grids:
            return [{}]
        if self.design == "cross":
            keys = list(grids)
            return [dict(zip(keys, combo)) for combo in itertools.product(*(grids[k] for k in keys))]
        # axes: the base point, then each field's other values with the rest at the base value (deduplicated).
        base_vals = field_values(base, list(grids))
        points = [{}]
        for k, vals in grids.items():
            points += [{k: v} for v in vals if v != base_vals[k]]
        return points


def resolve_job_path(sweep_path: str | Path, job: str) -> Path:
    """A sweep's job path: absolute, relative to the sweep file, or relative to the working directory."""
    p = Path(job)
    if p.is_absolute():
        return p
    cand = (Path(sweep_path).resolve().parent / p).resolve()
    return cand if cand.exists() else p.resolve()


class LoadedSweep:
    """A validated sweep: its spec, the base train job, and the run id (sweep name + hash of spec and base config)."""

    def __init__(self, spec: SweepSpec, job: JobSpec, path: Path, job_path: Path):
        self.spec, self.job, self.path, self.job_path = spec, job, path, job_path

    @property
    def base(self) -> RunConfig:
        return self.job.run_config()

    @property
    def run_id(self) -> str:
        s = self.spec.model_dump(mode="json", exclude={"description", "job"})
        return f"{self.spec.name}-{_short_hash({'sweep': s, 'base': self.base.config_hash()})}"

    def trial_config(self, overrides: dict[str, Any], trial_name: str) -> RunConfig:
        """The run config of one trial: base + trial_overrides + the trial's point, named ``trial_name``."""
        return _override_config(self.base, {**self.spec.trial_overrides, **overrides}, trial_name, "search_space")


def load_sweep(path: str | Path) -> LoadedSweep:
    """Load and validate a sweep YAML and its base job; every grid/choice value is validated as a trial config."""
    spec = parse_section(SweepSpec, _load_named(path, "sweep"), source=str(path))
    job_path = resolve_job_path(path, spec.job)
    if not job_path.is_file():
        raise ConfigError(f"invalid config in {path}:\n  job: file not found: {spec.job} (looked at {job_path})")
    job = load_job(job_path)
    if job.kind != "train":
        raise ConfigError(f"invalid config in {path}:\n  job: {spec.job} is kind: {job.kind}; a sweep needs a train job")
    sw = LoadedSweep(spec, job, Path(path), job_path)
    base = sw.base
    try:
        _override_config(base, spec.trial_overrides, base.name, "trial_overrides")
        for k, dom in spec.search_space.items():
            for i, v in enumerate(dom.values()):
                try:
                    sw.trial_config({k: v}, base.name)
                except ConfigError as err:
                    msg = str(err).replace("search_space.", f"search_space.{k}[{i}] -> ", 1)
                    raise ConfigError(msg) from None
    except ConfigError as err:
        raise ConfigError(f"invalid config in {path}:\n  {str(err).strip()}") from None
    return sw


def load_any(path: str | Path) -> Union[JobSpec, LoadedSweep]:
    """A job file or a sweep file (a sweep file has ``search_space``)."""
    data = load_yaml(path)
    if isinstance(data, dict) and "search_space" in data:
        return load_sweep(path)
    return load_job(path)


# ----------------------------------------------------------------------------------------------- describing a job


Spec = Union[JobSpec, LoadedSweep]

#: The laren command that runs a job of each kind on the cluster (``laren submit``'s entrypoint, the RayJob's).
ENTRY = {"train": "train", "eval": "run-eval", "grid": "run-grid", "sweep": "run-sweep", "prior": "prior train",
         "analysis": "analyze"}


def spec_kind(spec: Spec) -> str:
    return "sweep" if isinstance(spec, LoadedSweep) else spec.kind


def spec_name(spec: Spec) -> str:
    return spec.spec.name if isinstance(spec, LoadedSweep) else spec.name


def experiment_name(spec: Spec) -> str:
    """One MLflow experiment per job family: tracking.experiment, else the job (or sweep) name."""
    if isinstance(spec, LoadedSweep):
        return spec.base.tracking.experiment or spec.spec.name
    return spec.tracking.experiment or spec.name
