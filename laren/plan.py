"""Cross-field rules of a run, checked before anything is queued (`laren validate`, `submit`, `train`, `sweep`).

Elastic sizes. The global batch is fixed; Ray Train may start any worker count in ``resources.min_workers ..
resources.num_workers``. Every count in that range must divide ``train.batch_size_global`` and, when D is trained
(``loss.adversarial_weight`` > 0), leave a per-GPU batch that StyleGAN2 D's minibatch stddev accepts: its group is
min(B, 4) and B must be <= 4 or a multiple of 4 (laren/models/stylegan2.py, Discriminator), and B >= 2, because the
standard deviation over a group of 1 sample is the constant sqrt(1e-8): the feature would tell D nothing.
"""

from __future__ import annotations

from laren.config import ConfigError, RunConfig
from laren.models.build import _check_combination

STDDEV_GROUP = 4  # laren.models.stylegan2.Discriminator.stddev_group
MIN_STDDEV_BATCH = 2  # a group of one sample has a constant stddev


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
    _check_combination(cfg.model)
    check_elastic(cfg)
