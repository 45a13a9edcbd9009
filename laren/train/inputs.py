"""A training run's inputs checked before any worker starts: VGG16 / AlexNet weights, the prior's files and
architecture, the data sets' manifests and HR size. ``check_run_inputs`` stops at the first problem (`laren submit`,
the Ray driver); ``input_problems`` lists them all (`laren validate`'s warnings)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from laren import losses as L
from laren.config import ConfigError, RunConfig
from laren.data import pack, storage
from laren.data.storage import StorageError
from laren.metrics import load_alexnet
from laren.models.prior_io import PriorMeta, prior_paths
from laren.plan import check_rules


def check_run_inputs(cfg: RunConfig) -> None:
    """User errors found before any worker starts: missing weights files, data URLs, cross-field rules."""
    for check in _input_checks(cfg):
        check()
    check_rules(cfg)  # elastic sizes, model combination


def input_problems(cfg: RunConfig) -> list[str]:
    """Every missing or mismatched input of ``cfg`` (weights, prior, data sets) as one message each, where
    :func:`check_run_inputs` stops at the first (`laren validate` reports them as warnings)."""
    out = []
    for check in _input_checks(cfg):
        try:
            check()
        except (ConfigError, OSError, ValueError, StorageError) as err:  # FileNotFoundError is an OSError
            out.append(str(err))
    return out


def _input_checks(cfg: RunConfig) -> list[Callable[[], None]]:
    """The input checks of ``cfg``, each a call that raises on its problem."""
    checks: list[Callable[[], None]] = []
    if cfg.loss.perceptual_weight > 0 and not cfg.loss.random_backbone_for_tests:
        checks.append(lambda: _check_vgg16(cfg.loss.vgg16_path))
    if cfg.eval.alexnet_path:
        checks.append(lambda: _check_alexnet(cfg.eval.alexnet_path))
    if not cfg.data.train_url:
        checks.append(_no_train_url)
    if cfg.model.prior.path:
        checks.append(lambda: _check_prior(cfg))
    checks += [lambda f=f: check_data(cfg, (f,)) for f in ("train_url", "val_url")]
    return checks


def _no_train_url() -> None:
    raise ConfigError("data.train_url is empty: set it to a dataset written by `laren data pack`")


def _check_vgg16(path: Optional[str]) -> None:
    if not path:
        raise ConfigError(
            "loss.vgg16_path is not set but loss.perceptual_weight > 0: the perceptual loss needs torchvision's "
            f"ImageNet VGG16 state dict; download {L.VGG16_URL} and set loss.vgg16_path to the file "
            "(or set loss.perceptual_weight: 0)."
        )
    if not _weights_exist(path):
        L.load_vgg16(path)  # raises FileNotFoundError naming the file and how to obtain it


def _check_alexnet(path: str) -> None:
    if not _weights_exist(path):
        load_alexnet(path)  # raises FileNotFoundError naming the file and how to obtain it


def _weights_exist(url: str) -> bool:
    """A weights file (local path or s3:// URL) is there; nothing is downloaded."""
    return storage.exists(url) if storage.is_s3(url) else Path(url).expanduser().is_file()


def _check_prior(cfg: RunConfig) -> None:
    """The prior's files exist and its architecture is the job's (read from its small .json, not the weights)."""
    hint = "create it with `laren prior import SRC DEST` (SRC: a rosinality .pt, NVIDIA .pkl or mmagic .pth)"
    st_url, json_url = prior_paths(cfg.model.prior.path)
    for url, what in ((json_url, "prior metadata (.json)"), (st_url, "prior weights (.safetensors)")):
        if not storage.exists(url):
            raise FileNotFoundError(f"model.prior.path: {url}: {what} not found; {hint}")
    meta = PriorMeta.from_json(storage.read_bytes(json_url).decode(), json_url)
    for name in ("resolution", "style_dim"):
        want, got = getattr(cfg.model.prior, name), getattr(meta, name)
        if int(want) != int(got):
            raise ConfigError(
                f"model.prior.{name}: the job says {want} but the prior at {cfg.model.prior.path} has {got}; "
                f"set model.prior.{name}: {got} (or point model.prior.path at a matching prior)"
            )


def check_data(cfg: RunConfig, fields: tuple[str, ...] = ("train_url", "val_url")) -> None:
    """The training (and validation) sets are packed at the job's HR resolution."""
    for field_name in fields:
        url = getattr(cfg.data, field_name)
        if not url:
            continue
        try:
            m = pack.read_manifest(url)
        except (FileNotFoundError, ValueError) as err:
            raise type(err)(f"data.{field_name}: {err}") from None
        if int(m["resolution"]) != cfg.model.prior.resolution:
            raise ConfigError(
                f"data.{field_name}: {url} is packed at {m['resolution']}x{m['resolution']}, but the job's HR size "
                f"(model.prior.resolution) is {cfg.model.prior.resolution}; re-pack with --resolution "
                f"{cfg.model.prior.resolution} or use a matching prior"
            )
