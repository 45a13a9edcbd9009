"""Ray Train (V2) wiring: one TorchTrainer per run (ecosystem notes section 1). The only training module that imports Ray.

    make_trainer(cfg, run_id)  -> TorchTrainer(train_fn, ScalingConfig(workers | (min, max), GPU, CPUs per worker),
                                   RunConfig(name=run_id, storage_path=<storage>/runs, CheckpointConfig(keep N),
                                             FailureConfig(max_failures), callbacks, worker_runtime_env))
    run_training(cfg)          -> make_trainer(...).fit() -> {final metrics, "checkpoint": URL, "run_id": ...}

Identity: the Ray Train run name is the job's deterministic run id (``<name>-<config hash>``), and the storage path is
fixed by the config, so re-running the same job resumes it from its latest checkpoint (same ``(storage_path, name)``);
a worker-group restart after a failure resumes from ``ray.train.get_checkpoint()``. The MLflow run (rank 0, in
:mod:`laren.train.loop`) is found by the same name, so a resumed run continues it rather than duplicating it.

Backends: NCCL on GPUs, gloo on CPUs. Storage: a local directory (made absolute: Ray workers do not share the driver's
working directory) or ``s3://bucket/prefix`` (a pyarrow S3 filesystem that honours ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from laren.config import RunConfig
from laren.train.loop import KILL_MARKER_ENV, KILL_RANK_ENV, KILL_STEP_ENV, WorkerContext, check_run_inputs, train_worker

log = logging.getLogger("laren.train")

# Environment forwarded from the driver to the training workers (names only; never secrets: a cluster's workers get
# their credentials from their own environment or instance role, and a local Ray instance inherits the driver's).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "LAREN_STORAGE",
    KILL_STEP_ENV, KILL_RANK_ENV, KILL_MARKER_ENV,
)


def _absolute(url: str) -> str:
    """Local paths (and sqlite:/// files) made absolute; URLs with a scheme unchanged."""
    if not url:
        return url
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        return "sqlite:///" + str(Path(path).expanduser().resolve()) if not path.startswith("/") else url
    if "://" in url:
        return url
    return str(Path(url).expanduser().resolve())


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """The config with every local path absolute (data, weights, storage root, tracking store)."""
    upd = {
        "data": cfg.data.model_copy(update={"train_url": _absolute(cfg.data.train_url), "val_url": _absolute(cfg.data.val_url)}),
        "storage": cfg.storage.model_copy(update={"root": _absolute(cfg.storage.root)}),
        "tracking": cfg.tracking.model_copy(update={"tracking_uri": _absolute(cfg.tracking.tracking_uri)}),
    }
    if cfg.loss.vgg16_path:
        upd["loss"] = cfg.loss.model_copy(update={"vgg16_path": _absolute(cfg.loss.vgg16_path)})
    if cfg.eval.alexnet_path:
        upd["eval"] = cfg.eval.model_copy(update={"alexnet_path": _absolute(cfg.eval.alexnet_path)})
    if cfg.model.prior.path:
        prior = cfg.model.prior.model_copy(update={"path": _absolute(cfg.model.prior.path)})
        upd["model"] = cfg.model.model_copy(update={"prior": prior})
    return cfg.model_copy(update=upd)


def runs_root(cfg: RunConfig, storage_path: Optional[str] = None) -> str:
    """Where Ray Train keeps runs: ``storage_path`` or ``<storage.root>/runs``."""
    if storage_path:
        return _absolute(storage_path)
    root = _absolute(cfg.storage.root)
    return root.rstrip("/") + "/runs"


def _storage(storage_path: str):
    """(storage_path for Ray, pyarrow filesystem or None). s3:// goes through an explicit S3FileSystem so that a custom
    endpoint (AWS_ENDPOINT_URL: SeaweedFS, MinIO) is used by Ray's checkpoint uploads too."""
    if not storage_path.startswith("s3://"):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
        return storage_path, None
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kw: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https", force_virtual_addressing=False)
    return storage_path[len("s3://"):], pafs.S3FileSystem(**kw)


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def _complete_copy(fetch, dest: str) -> bool:
    """``fetch(dest)`` then verify the checkpoint there (state.json + checksums); False when it is incomplete."""
    from laren.train import state as S

    try:
        fetch(dest)
        S.read_state(dest)
        return True
    except (S.CheckpointError, OSError, ValueError) as err:
        log.warning("checkpoint is incomplete or corrupt: %s", err)
        return False


def _resume_copy(ck, run_dir: Optional[str]) -> str:
    """A local copy of the newest *complete* checkpoint of the run: Ray's latest, or, when that one is corrupt or
    incomplete (a truncated upload, a damaged object), the newest older ``checkpoint_*`` under ``run_dir``."""
    from laren.data import storage
    from laren.train import state as S

    tmp = tempfile.mkdtemp(prefix="laren-resume-")

    def from_ray(dest: str) -> None:
        with ck.as_directory() as d:  # may be a transient download: copy what the loop needs
            shutil.copytree(d, dest, dirs_exist_ok=True)

    if _complete_copy(from_ray, tmp):
        return tmp
    latest = Path(ck.path).name
    older = sorted({Path(f).parent.name for f in storage.list_files(run_dir) if Path(f).name == S.STATE_FILE
                    and Path(f).parent.name.startswith("checkpoint_") and Path(f).parent.name < latest},
                   reverse=True) if run_dir else []
    for name in older:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        url = storage.join(run_dir, name)

        def fetch(dest: str, url: str = url) -> None:
            for f in (S.WEIGHTS_FILE, S.OPTIM_FILE, S.STATE_FILE):
                storage.download_file(storage.join(url, f), os.path.join(dest, f))

        if _complete_copy(fetch, tmp):
            log.warning("latest checkpoint %s of the run is unusable; resuming from the previous one, %s", latest, url)
            return tmp
    shutil.rmtree(tmp, ignore_errors=True)
    raise S.CheckpointError(
        f"no complete checkpoint to resume from: {latest} is corrupt and {len(older)} older one(s) under {run_dir} too; "
        "delete the run's directory to start over, or restore a checkpoint from a backup"
    )


def _train_fn(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: builds the WorkerContext and hands over to the plain-torch loop."""
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(loop_config["config"])
    rc = ray.train.get_context()
    device = ray.train.torch.get_device()

    def report(metrics: dict[str, float], checkpoint_dir: Optional[str], name: Optional[str]) -> None:
        ck = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(clean, checkpoint=ck, checkpoint_dir_name=name if ck else None)

    ck = ray.train.get_checkpoint()
    tmp = _resume_copy(ck, loop_config.get("run_dir")) if ck is not None else None
    resume_dir = tmp
    try:
        ctx = WorkerContext(
            rank=rc.get_world_rank(), world_size=rc.get_world_size(), device=device, report=report,
            resume_dir=resume_dir, run_id=loop_config["run_id"], parent_run_id=loop_config.get("parent_run_id"),
        )
        train_worker(cfg, ctx)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def make_trainer(
    cfg: RunConfig,
    run_id: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    extra_callbacks: Sequence[Any] = (),
    storage_path: Optional[str] = None,
):
    """The configured TorchTrainer for ``cfg`` (not started). ``run_id`` defaults to ``cfg.run_id``."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    run_id = run_id or cfg.run_id
    check_run_inputs(cfg)
    rcfg = resolve_paths(cfg)
    res = cfg.resources
    workers: Any = res.num_workers if res.min_workers is None else (res.min_workers, res.num_workers)
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        num_workers=workers, use_gpu=res.use_gpu, resources_per_worker=per_worker, accelerator_type=res.gpu_type,
    )
    path, fs = _storage(runs_root(rcfg, storage_path))
    env = _worker_env()
    run_config = ray.train.RunConfig(
        name=run_id,
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints)),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(extra_callbacks) or None,
        worker_runtime_env={"env_vars": env} if env else None,
    )
    return TorchTrainer(
        _train_fn,
        train_loop_config={"config": rcfg.to_dict(), "run_id": run_id, "parent_run_id": parent_run_id,
                           "run_dir": runs_root(rcfg, storage_path).rstrip("/") + "/" + run_id},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
    )


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Connect to RAY_ADDRESS when set, else start (or reuse) a local Ray instance."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        from laren.services import RayHead

        for k, v in RayHead.env().items():  # a loopback-only instance: no token auth, no usage stats
            os.environ.setdefault(k, v)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def run_training(
    cfg: RunConfig,
    run_id: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    extra_callbacks: Sequence[Any] = (),
    storage_path: Optional[str] = None,
) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train; returns the final metrics, ``checkpoint`` (URL of the latest checkpoint) and
    ``run_id``. Re-running the same config resumes the run from its latest checkpoint."""
    check_run_inputs(cfg)  # user errors before Ray (or any worker) starts
    ensure_ray()
    trainer = make_trainer(cfg, run_id, parent_run_id, extra_callbacks, storage_path)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out: dict[str, Any] = dict(result.metrics or {})
    ck = result.checkpoint
    if ck is not None:
        fs_path = ck.path
        out["checkpoint"] = fs_path if not fs_path or fs_path.startswith("/") or "://" in fs_path else (
            "s3://" + fs_path if runs_root(cfg, storage_path).startswith("s3://") else fs_path)
    out["run_id"] = run_id or cfg.run_id
    return out
