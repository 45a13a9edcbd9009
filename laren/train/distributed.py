"""Ray Train (V2) wiring: one TorchTrainer per run (ecosystem notes section 1). The only training module that imports Ray.

    plan_run(cfg, run_id)      -> the run's plan (laren/plan.py), for <storage>/runs/<run id>/plan.json
    plan_trainer(plan)         -> TorchTrainer(train_fn, ScalingConfig(workers | (min, max), GPU, CPUs per worker),
                                   RunConfig(name=run_id, storage_path=<storage>/runs, CheckpointConfig(keep N [best]),
                                             FailureConfig(max_failures), callbacks, worker_runtime_env))
    make_trainer(cfg, run_id)  -> check_inputs + plan_run + write_plan + plan_trainer
    run_training(cfg)          -> check_inputs + plan_run + write_plan + run_plan
    run_plan(plan)             -> plan_trainer(plan).fit() -> {final metrics, "checkpoint": URL, "run_id": ...}

Identity: the Ray Train run name is the job's deterministic run id (``<name>-<config hash>``), and the storage path is
fixed by the config, so re-running the same job resumes it from its latest checkpoint (same ``(storage_path, name)``),
or, when it is complete, returns its final metrics without starting Ray Train (:func:`finished_result`);
a worker-group restart after a failure resumes from ``ray.train.get_checkpoint()``. Because Ray records a reported
checkpoint only at its controller's next poll, a run that failed (or whose driver was killed) may hold newer complete
checkpoints than Ray hands over, or Ray none at all: the workers resume from the newest complete ``checkpoint_*`` of
the run's storage folder (rank 0 chooses, every rank follows). The MLflow run (rank 0, in :mod:`laren.train.loop`) is
found by the same name, so a resumed run continues it rather than duplicating it.

Backends: NCCL on GPUs, gloo on CPUs. Storage: a local directory (made absolute: Ray workers do not share the driver's
working directory) or ``s3://bucket/prefix`` (a pyarrow S3 filesystem that honours ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Optional, Sequence

from laren.config import PriorRunConfig, RunConfig
from laren.data import storage
from laren.plan import RunPlan, build_plan, write_plan
from laren.progress import write_line
from laren.ray_address import driver_address
from laren.services import RayHead
from laren.services import read_services
from laren.tracking import check_tracking_auth, mlflow_client
from laren.train import collectives as C
from laren.train import faults
from laren.train import state as S
from laren.train.faults import KILL_MARKER_ENV, KILL_RANK_ENV, KILL_STEP_ENV, OnStep
from laren.train.inputs import check_run_inputs
from laren.train.loop import Schedule, WorkerContext, train_worker
from laren.train.prior import check_prior_inputs, prior_worker

log = logging.getLogger("laren.train")

# Environment forwarded from the driver to the training workers (names only; never secrets: a cluster's workers get
# their credentials from their own environment or instance role, and a local Ray instance inherits the driver's).
# The LAREN_TEST_KILL_* variables reach the workers of a submitted job's driver (laren/train/faults.py).
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MLFLOW_TRACKING_URI", "LAREN_STORAGE", "LAREN_CACHE",
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
    if isinstance(cfg, PriorRunConfig):
        upd["gan"] = cfg.gan.model_copy(update={"output": _absolute(cfg.output_url())})
    return cfg.model_copy(update=upd)


def check_inputs(cfg: RunConfig) -> None:
    """User errors of an SR run or (PriorRunConfig) a prior run, before any worker starts."""
    (check_prior_inputs if isinstance(cfg, PriorRunConfig) else check_run_inputs)(cfg)


def runs_root(cfg: RunConfig, storage_path: Optional[str] = None) -> str:
    """Where Ray Train keeps runs: ``storage_path`` or ``<storage.root>/runs``."""
    if storage_path:
        return _absolute(storage_path)
    root = _absolute(cfg.storage.root)
    return root.rstrip("/") + "/runs"


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def _complete_copy(fetch, dest: str) -> bool:
    """``fetch(dest)`` then verify the checkpoint there (state.json + checksums); False when it is incomplete."""

    try:
        fetch(dest)
        S.read_state(dest)
        return True
    except (S.CheckpointError, OSError, ValueError) as err:
        log.warning("checkpoint is incomplete or corrupt: %s", err)
        return False


def _stored_fetch(url: str):
    """A fetch function for :func:`_complete_copy`: the checkpoint's three files at ``url`` into a folder."""

    def fetch(d: str) -> None:
        for f in (S.WEIGHTS_FILE, S.OPTIM_FILE, S.STATE_FILE):
            storage.download_file(storage.join(url, f), os.path.join(d, f))

    return fetch


def _resume_copy(ck, run_dir: Optional[str], dest: str, only: Optional[str] = None) -> Optional[str]:
    """The name of the newest *complete* checkpoint of the run, copied into ``dest``, or None when it has none.

    Candidates are Ray's checkpoint ``ck`` (may be None) and every ``checkpoint_*`` under ``run_dir``, tried newest
    first; a corrupt or incomplete one (a truncated upload, a damaged object) is skipped for the next older one.
    The folders count, not only Ray's record: Ray Train (2.60) registers a reported checkpoint only when its
    controller next polls the workers (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s); a worker that dies before that
    poll (a crash right after a checkpoint, the driver killed) loses the report, so a failed run can have newer
    complete checkpoints, or all of them, missing from Ray's snapshot, and ``get_checkpoint()`` is then older or None.
    ``only``: fetch exactly this checkpoint (the one rank 0 chose) and raise if it is not complete here.
    """

    ray_name = Path(ck.path).name if ck is not None else None
    names = [only] if only else sorted(set(S.checkpoint_names(run_dir)) | ({ray_name} if ray_name else set()), reverse=True)
    if not names:
        return None
    for name in names:
        shutil.rmtree(dest, ignore_errors=True)
        os.makedirs(dest)
        if name == ray_name:
            def fetch(d: str) -> None:
                with ck.as_directory() as src:  # may be a transient download: copy what the loop needs
                    shutil.copytree(src, d, dirs_exist_ok=True)
        else:
            fetch = _stored_fetch(storage.join(run_dir.rstrip("/"), name))
        if _complete_copy(fetch, dest):
            if name != names[0]:
                log.warning("checkpoint %s of the run is unusable; resuming from the previous one, %s", names[0], name)
            if ray_name != name and (ray_name is None or name > ray_name):
                log.warning("resuming from %s under %s: Ray Train handed over %s (the report of a newer checkpoint was "
                            "lost when the previous attempt ended)", name, run_dir, ray_name or "no checkpoint")
            return name
    shutil.rmtree(dest, ignore_errors=True)
    if only:
        raise S.CheckpointError(f"checkpoint {only} under {run_dir} (chosen to resume from by rank 0) is incomplete "
                                "or corrupt on this worker; check that every node reads the same storage")
    raise S.CheckpointError(
        f"no complete checkpoint to resume from: {names[0]} is corrupt and {len(names) - 1} older one(s) under {run_dir} "
        "too; delete the run's directory to start over, or restore a checkpoint from a backup"
    )


def _agreed_resume_copy(ck, run_dir: Optional[str], rank: int, local_rank: int, device) -> Optional[str]:
    """The local folder holding the checkpoint every rank resumes from, or None (a fresh start); one copy per node.

    Rank 0 chooses (:func:`_resume_copy`) and every other rank follows its choice (or its error), so that all ranks
    resume from the same checkpoint (or all start fresh, or all fail) even if storage changes or a download fails
    on one. The checkpoint is downloaded once per node, by its local rank 0, into a folder named by rank 0's token;
    the node's other ranks read it there after a barrier. The node's local rank 0 deletes it when training ends.
    """

    choice = [None, None, uuid.uuid4().hex]  # [checkpoint name, error text, token naming the node folders]
    if rank == 0:
        try:
            choice[0] = _resume_copy(ck, run_dir, _node_folder(choice[2]))
        except S.CheckpointError as err:
            choice[1] = str(err)
    choice = C.broadcast_object(choice, device)  # without a process group: rank 0's own
    if choice[1]:
        raise S.CheckpointError(choice[1])
    if not choice[0]:
        return None
    if local_rank == 0 and rank != 0:
        _resume_copy(ck, run_dir, _node_folder(choice[2]), only=choice[0])
    C.barrier(device)  # every node's copy is complete before its other ranks read it
    return _node_folder(choice[2])


def _node_folder(token: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"laren-resume-{token}")


def _train_fn(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: builds the WorkerContext and hands over to the plain-torch loop."""
    import ray.train  # heavy: imported where a Ray Train worker, trainer or instance is made
    import ray.train.torch

    prior = loop_config.get("kind") == "prior"
    cfg = (PriorRunConfig if prior else RunConfig).model_validate(loop_config["config"])
    rc = ray.train.get_context()
    device = ray.train.torch.get_device()

    mode = ray.train.CheckpointUploadMode[cfg.train.checkpoint_upload.upper()]

    def report(metrics: dict[str, float], checkpoint_dir: Optional[str], name: Optional[str]) -> None:
        """Takes ``checkpoint_dir`` over: Ray Train removes it once it is in storage (asynchronously uploaded: while
        training goes on)."""
        ck = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ray.train.report(clean, checkpoint=ck, checkpoint_dir_name=name if ck else None, checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)

    rank, world, local_rank = rc.get_world_rank(), rc.get_world_size(), rc.get_local_rank()
    tmp = _agreed_resume_copy(ray.train.get_checkpoint(), loop_config.get("run_dir"), rank, local_rank, device)
    try:
        ctx = WorkerContext(
            rank=rank, world_size=world, device=device, report=report,
            resume_dir=tmp, run_id=loop_config["run_id"], parent_run_id=loop_config.get("parent_run_id"),
            run_dir=loop_config.get("run_dir"), on_step=loop_config.get("on_step") or faults.from_env(),
        )
        (prior_worker if prior else train_worker)(cfg, ctx)
    finally:
        if tmp and local_rank == 0:  # the node's copy (the other local ranks read it when they started)
            shutil.rmtree(tmp, ignore_errors=True)


def plan_run(cfg: RunConfig, run_id: Optional[str] = None, storage_path: Optional[str] = None) -> RunPlan:
    """The run's plan (laren/plan.py; not written yet), its folder ``<runs root>/<run id>``. ``run_id`` defaults to
    ``cfg.run_id``."""
    run_id = run_id or cfg.run_id
    return build_plan(cfg, run_id, runs_root(resolve_paths(cfg), storage_path).rstrip("/") + "/" + run_id)


def make_trainer(cfg: RunConfig, run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                 extra_callbacks: Sequence[Any] = (), storage_path: Optional[str] = None):
    """The configured TorchTrainer for ``cfg`` (not started). ``run_id`` defaults to ``cfg.run_id``."""
    check_inputs(cfg)
    plan = plan_run(cfg, run_id, storage_path)
    write_plan(plan)
    return plan_trainer(plan, parent_run_id, extra_callbacks)


def plan_trainer(plan: RunPlan, parent_run_id: Optional[str] = None, extra_callbacks: Sequence[Any] = (),
                 on_step: Optional[OnStep] = None):
    """The TorchTrainer of a plan: its workers get the plan's config (resolved once) and check nothing again."""
    import ray.train  # heavy (see _train_fn)
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = plan.run_config()
    res = cfg.resources
    workers: Any = res.num_workers if res.min_workers is None else (res.min_workers, res.num_workers)
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = 1
    scaling = ray.train.ScalingConfig(
        num_workers=workers, use_gpu=res.use_gpu, resources_per_worker=per_worker, accelerator_type=res.gpu_type,
    )
    path, fs = storage.arrow_filesystem(_runs_dir(plan))
    env = _worker_env()
    run_config = ray.train.RunConfig(
        name=plan.run_id,
        storage_path=path,
        storage_filesystem=fs,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=max(1, cfg.train.keep_checkpoints), checkpoint_score_attribute=cfg.train.keep_best_metric,
            checkpoint_score_order=cfg.train.keep_best_mode,
        ),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        callbacks=list(extra_callbacks) or None,
        worker_runtime_env={"env_vars": env} if env else None,
    )
    return TorchTrainer(
        _train_fn,
        train_loop_config={"config": plan.config, "run_id": plan.run_id, "parent_run_id": parent_run_id,
                           "run_dir": plan.run_dir, "kind": plan.kind, "on_step": on_step},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
    )


def _runs_dir(plan: RunPlan) -> str:
    """Ray Train's storage path: the folder holding the run's folder."""
    return plan.run_dir.rstrip("/").rsplit("/", 1)[0]


def ensure_ray(num_cpus: Optional[int] = None) -> None:
    """Connect to RAY_ADDRESS when set (any form: laren/ray_address.py; a dashboard URL only for the local head),
    else start (or reuse) a local Ray instance. A malformed RAY_ADDRESS is refused even when this process is already
    a Ray driver (laren called from a program that started Ray)."""
    import ray  # heavy (see _train_fn)

    given = os.environ.get("RAY_ADDRESS")
    address = driver_address(given, read_services().get("ray")) if given else None
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        os.environ["RAY_ADDRESS"] = address  # ray.init and Ray's own tools read it too
        ray.init(address=address, log_to_driver=True)
    else:
        for k, v in RayHead.env().items():  # a loopback-only instance: no token auth, no usage stats
            os.environ.setdefault(k, v)
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def run_training(
    cfg: RunConfig,
    run_id: Optional[str] = None,
    parent_run_id: Optional[str] = None,
    extra_callbacks: Sequence[Any] = (),
    storage_path: Optional[str] = None,
    on_step: Optional[OnStep] = None,
) -> dict[str, Any]:
    """Train ``cfg`` with Ray Train; returns the final metrics, ``checkpoint`` (URL of the latest checkpoint) and
    ``run_id``. Re-running the same config resumes the run from its latest checkpoint. ``on_step``: a picklable
    callback every worker calls with (step, rank) after each step (laren/train/faults.py)."""
    check_inputs(cfg)  # user errors before Ray (or any worker) starts
    plan = plan_run(cfg, run_id, storage_path)
    write_plan(plan)
    return run_plan(plan, parent_run_id, extra_callbacks, on_step)


def run_plan(plan: RunPlan, parent_run_id: Optional[str] = None, extra_callbacks: Sequence[Any] = (),
             on_step: Optional[OnStep] = None) -> dict[str, Any]:
    """Train a planned run (``laren run-plan``: what a submitted job runs): no rule, manifest or prior metadata is
    checked or read again; the tracking server is asked once whether this environment's credentials are accepted.
    An SR run that is already complete (:func:`finished_result`) returns its final metrics and starts no worker."""
    cfg = plan.run_config()
    check_tracking_auth(cfg.tracking.tracking_uri, cfg.tracking.experiment or cfg.name)
    done = finished_result(plan)
    if done is not None:
        write_line(f"{plan.run_id}: complete ({done['checkpoint']}; its MLflow run FINISHED): nothing to train")
        return done
    ensure_ray()
    result = plan_trainer(plan, parent_run_id, extra_callbacks, on_step).fit()
    if result.error is not None:
        raise result.error
    out: dict[str, Any] = dict(result.metrics or {})
    ck = result.checkpoint
    if ck is not None:
        fs_path = ck.path
        out["checkpoint"] = fs_path if not fs_path or fs_path.startswith("/") or "://" in fs_path else (
            "s3://" + fs_path if plan.run_dir.startswith("s3://") else fs_path)
    newest = _newest_state(plan.run_dir)
    if newest is not None and newest[1]["step"] > out.get("step", -1):
        # Resumed at the end from a checkpoint whose report Ray never recorded: this attempt trained nothing, and
        # Ray's result may lack the checkpoint it handed back again (empty, or an older one). The final state is the
        # run's newest checkpoint.
        out = {**_final_metrics(newest[1], _mlflow_run(cfg, newest[1])), "checkpoint": newest[0]}
    out["run_id"] = plan.run_id
    return out


def _newest_state(run_dir: str) -> Optional[tuple[str, dict[str, Any]]]:
    """(URL, parsed state.json) of the newest checkpoint under ``run_dir`` with a readable laren state.json."""

    for name in S.checkpoint_names(run_dir):
        url = storage.join(run_dir, name)
        try:
            doc = json.loads(storage.read_bytes(storage.join(url, S.STATE_FILE)))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("format") == S.FORMAT and isinstance(doc.get("step"), int):
            return url, doc
    return None


def finished_result(plan: RunPlan) -> Optional[dict[str, Any]]:
    """What :func:`run_plan` returns for an SR run that is complete, or None. Complete: its newest checkpoint is at
    the last step; its MLflow run is FINISHED (the last attempt logged the final weights and closed the run) and,
    with ``tracking.register_model``, holds a registered model version; and that checkpoint is complete (checksums
    verified: the rule of a resume; checked last, as it downloads the checkpoint). Such a run needs no worker. A run
    that died after its last checkpoint, whose registration failed, whose last checkpoint is damaged or whose MLflow
    server cannot say goes to the workers, which finish it. Prior runs always go to the workers."""
    if plan.kind != "train":
        return None
    newest = _newest_state(plan.run_dir)
    cfg = plan.run_config()
    t = cfg.train
    total = Schedule.from_kimg(t.batch_size_global, t.total_kimg, t.log_every_kimg, t.eval_every_kimg,
                               t.checkpoint_every_kimg).total_steps
    if newest is None or newest[1]["step"] < total:
        return None
    run = _mlflow_run(cfg, newest[1])
    if run is None or run.info.status != "FINISHED" or (cfg.tracking.register_model and not _registered(cfg, run)):
        return None
    with tempfile.TemporaryDirectory(prefix="laren-final-check-") as d:
        if not _complete_copy(_stored_fetch(newest[0]), d):
            return None  # the workers resume from the checkpoint before it
    return {**_final_metrics(newest[1], run), "checkpoint": newest[0], "run_id": plan.run_id}


def _registered(cfg: RunConfig, run) -> bool:
    """Whether the model registry holds a version made from the MLflow run ``run`` (False when it cannot say)."""
    try:
        return bool(mlflow_client(_absolute(cfg.tracking.tracking_uri)).search_model_versions(
            f"run_id = '{run.info.run_id}'"))
    except Exception as err:  # noqa: BLE001 - as _mlflow_run
        log.warning("MLflow model registry unavailable (%s)", type(err).__name__)
        return False


def _mlflow_run(cfg: RunConfig, doc: dict[str, Any]):
    """The MLflow run named in a checkpoint's state.json, or None (none named, or the server unreachable)."""
    mlflow_run = doc.get("mlflow_run_id")
    if not mlflow_run:
        return None
    try:
        return mlflow_client(_absolute(cfg.tracking.tracking_uri) or None).get_run(mlflow_run)
    except Exception as err:  # noqa: BLE001 - the tracking server is optional here; never print its URI (credentials)
        log.warning("MLflow run %s unavailable (%s)", mlflow_run, type(err).__name__)
        return None


def _final_metrics(doc: dict[str, Any], run) -> dict[str, Any]:
    """The final metrics of a run from its last checkpoint's state.json (step, kimg) and its MLflow run ``run`` (the
    latest value of every metric it logged; step and kimg only when None): the keys a training attempt returns, so
    system metrics and the health figures, which rank 0 only logs, are left out."""
    out: dict[str, Any] = {"step": doc["step"], "kimg": doc.get("kimg", doc.get("images_seen", 0) / 1000.0)}
    metrics = run.data.metrics if run is not None else {}
    return {**{k: v for k, v in metrics.items() if not k.startswith(("system/", "health/"))}, **out}
