"""The run plan: one resolved, immutable description of a run, built before anything is queued, and the cross-field
rules checked while it is built (`laren validate`, `submit`, `train`, `sweep`).

    build_plan(cfg, run_id)  -> RunPlan(run_id, config (paths absolute, prior architecture from its metadata), inputs,
                                        resources, run_dir, tracking_uri (no password))
    write_plan(plan)         -> <run dir>/plan.json in the run's storage (Ray Train workers get plan.config)
    read_plan(url)           -> the RunPlan a submitted job runs (`laren run-plan URL`, instead of the YAML)

The prior's metadata is the one description of its architecture: the plan copies it into ``model.prior`` (mapping
layers and the channel table, ``channel_table_base`` for a non-stock one), so that the config a checkpoint records
rebuilds the same generator in `laren eval` and `laren upscale`. The run id is a pure function of the resolved
config (``RunConfig.config_hash``: local paths in their canonical form, the prior's architecture left to its
metadata), so the config as written, its ``resolve_paths`` and the plan's config all have the same id; a job
submitted again (a resume) gets the id, the Ray Train run and the MLflow run of its first attempt.

Credentials: plan.json holds none (a tracking URI keeps its user, loses its password); a job reading it gets its
MLflow credentials from its own environment (MLFLOW_TRACKING_USERNAME / _PASSWORD; infra/ shows how).

Elastic sizes. The global batch is fixed; Ray Train may start any worker count in ``resources.min_workers ..
resources.num_workers``. Every count in that range must divide ``train.batch_size_global`` and, when D is trained
(``loss.adversarial_weight`` > 0), leave a per-GPU batch that StyleGAN2 D's minibatch stddev accepts: its group is
min(B, 4) and B must be <= 4 or a multiple of 4 (laren/models/stylegan2.py, Discriminator), and B >= 2, because the
standard deviation over a group of 1 sample is the constant sqrt(1e-8): the feature would tell D nothing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

from laren.config import ConfigError, PriorRunConfig, RunConfig
from laren.data import storage
from laren.models.build import check_combination
from laren.models.prior_io import PriorMeta, prior_paths
from laren.redact import redact, redact_text

STDDEV_GROUP = 4  # laren.models.stylegan2.Discriminator.stddev_group
MIN_STDDEV_BATCH = 2  # a group of one sample has a constant stddev
PLAN_FILE = "plan.json"


def worker_counts(cfg: RunConfig) -> range:
    """Every worker count Ray Train may start for ``cfg``."""
    r = cfg.resources
    return range(r.min_workers or r.num_workers, r.num_workers + 1)


def _bad_split(batch: int, n: int, adversarial: bool) -> str:
    if batch % n:
        return f"{n} workers do not divide train.batch_size_global ({batch})"
    b = batch // n
    if adversarial and b < MIN_STDDEV_BATCH and batch >= MIN_STDDEV_BATCH:
        return f"{n} workers leave a per-GPU batch of {b}: D's minibatch stddev over one sample is a constant"
    if adversarial and b > STDDEV_GROUP and b % STDDEV_GROUP:
        return f"{n} workers leave a per-GPU batch of {b}, not <= {STDDEV_GROUP} or a multiple of it (D's minibatch stddev)"
    return ""


def check_elastic(cfg: RunConfig) -> None:
    """Refuse a worker range holding a count that cannot train ``cfg`` (see the module docstring)."""
    batch, adv = cfg.train.batch_size_global, cfg.loss.adversarial_weight > 0
    bad = [(n, why) for n in worker_counts(cfg) if (why := _bad_split(batch, n, adv))]
    if not bad:
        return
    ok = [n for n in range(1, cfg.resources.num_workers + 1) if not _bad_split(batch, n, adv)]
    field = "resources.min_workers" if cfg.resources.min_workers else "resources.num_workers"
    raise ConfigError(
        f"{field}: the worker range {worker_counts(cfg).start}..{cfg.resources.num_workers} holds counts that cannot "
        f"train this job ({'; '.join(why for _, why in bad[:3])}); worker counts that can, up to num_workers: "
        f"{ok or 'none'}. Choose resources.min_workers and resources.num_workers among them (or change "
        "train.batch_size_global)"
    )


def check_rules(cfg: RunConfig) -> None:
    """Every cross-field rule of one run config: the model combination and the elastic sizes."""
    check_combination(cfg.model)
    check_elastic(cfg)


@dataclass(frozen=True)
class RunPlan:
    """What a run is, resolved once (see the module docstring)."""

    run_id: str
    config: dict[str, Any]
    kind: str = "train"  # train | prior (a PriorRunConfig)
    inputs: dict[str, str] = field(default_factory=dict)  # dotted field -> URL
    resources: dict[str, Any] = field(default_factory=dict)
    run_dir: str = ""
    tracking_uri: str = ""

    def run_config(self) -> RunConfig:
        return (PriorRunConfig if self.kind == "prior" else RunConfig).model_validate(self.config)

    def to_json(self) -> str:
        """The plan as written to storage: credentials redacted (a tracking URI's password never reaches a file)."""
        return json.dumps({"format": "laren-run-plan", "version": 1, **redact(asdict(self))}, indent=1, sort_keys=True)


def resolve_prior(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``model.prior``'s architecture read from the prior's metadata (.json); a job whose resolution or
    style width differs from the prior's is an error naming the field."""
    p = cfg.model.prior
    if not p.path:
        return cfg
    json_url = prior_paths(p.path)[1]
    if not storage.exists(json_url):
        raise FileNotFoundError(f"model.prior.path: {json_url}: prior metadata (.json) not found; create it with "
                                "`laren prior import SRC DEST`")
    meta = PriorMeta.from_json(storage.read_bytes(json_url).decode(), json_url)
    for name in ("resolution", "style_dim"):
        if int(getattr(p, name)) != int(getattr(meta, name)):
            raise ConfigError(f"model.prior.{name}: the job says {getattr(p, name)} but the prior at {p.path} has "
                              f"{getattr(meta, name)}; set model.prior.{name}: {getattr(meta, name)}")
    arch = {"mapping_layers": meta.mapping_layers, "channel_multiplier": meta.channel_multiplier,
            "channel_max": meta.channel_max, "channel_table_base": meta.channel_base}
    model = cfg.model.model_copy(update={"prior": p.model_copy(update=arch)})
    return cfg.model_copy(update={"model": model})


def input_urls(cfg: Union[RunConfig, PriorRunConfig]) -> dict[str, str]:
    """Every input a run reads, as ``dotted field -> path or URL`` (unset ones left out)."""
    fields = (("data.train_url", cfg.data.train_url), ("data.val_url", cfg.data.val_url),
              ("model.prior.path", cfg.model.prior.path), ("loss.vgg16_path", cfg.loss.vgg16_path),
              ("eval.alexnet_path", cfg.eval.alexnet_path))
    return {k: v for k, v in fields if v}


def build_plan(cfg: RunConfig, run_id: Optional[str] = None, run_dir: Optional[str] = None) -> RunPlan:
    """The plan of ``cfg`` (rules checked, paths absolute, prior architecture from its metadata)."""
    # function-local: laren.train.distributed imports this module (through laren.train.loop), a cycle at module level
    from laren.train.distributed import resolve_paths, runs_root

    check_rules(cfg)
    run_id = run_id or cfg.run_id  # == rcfg.run_id (RunConfig.config_hash)
    rcfg = resolve_prior(resolve_paths(cfg))
    inputs = input_urls(rcfg)
    return RunPlan(run_id=run_id, config=rcfg.to_dict(), kind="prior" if isinstance(cfg, PriorRunConfig) else "train",
                   inputs=inputs, resources=rcfg.resources.model_dump(mode="json"),
                   run_dir=run_dir or storage.join(runs_root(rcfg), run_id),
                   tracking_uri=redact_text(rcfg.tracking.tracking_uri))


def plan_url(run_dir: str) -> str:
    """Where the plan of the run in ``run_dir`` lies."""
    return storage.join(run_dir, PLAN_FILE)


def write_plan(plan: RunPlan) -> str:
    """``<run dir>/plan.json`` (atomic); returns its URL."""
    url = plan_url(plan.run_dir)
    storage.write_bytes(url, plan.to_json().encode())
    return url


def read_plan(url: str) -> RunPlan:
    """The plan at ``url`` (written by :func:`write_plan`); the tracking URI without the redaction mark (the job's
    environment provides the password)."""
    doc = json.loads(storage.read_bytes(url))
    if not isinstance(doc, dict) or doc.pop("format", None) != "laren-run-plan" or doc.pop("version", None) != 1:
        raise ConfigError(f"{url}: not a laren run plan (format laren-run-plan, version 1)")
    tracking = doc["config"]["tracking"]
    tracking["tracking_uri"] = redact_text(tracking["tracking_uri"], mask=None)
    doc["tracking_uri"] = redact_text(doc["tracking_uri"], mask=None)
    return RunPlan(**doc)
