"""Ray Jobs: submit / status / logs / stop / list, and the local services a fresh machine runs them on.

Identity (architecture, "Identity and storage conventions"): a job's run id is ``<job name>-<hash of its resolved config>``
(:mod:`laren.specs`). The same id is the Ray Jobs submission id, the Ray Train run name and the MLflow run name, so
submitting a job whose previous attempt FAILED or was STOPPED deletes that attempt's record (its logs are kept under
``.laren/logs/``) and submits it again under the same id: training finds its checkpoints under ``runs/<run id>/`` and
resumes. A RUNNING job is left alone, a SUCCEEDED one is not re-run.

What runs on the cluster is ``python -m laren.cli <train|run-eval|run-grid|run-sweep|prior train|analyze> <job file>`` with the project as the
Ray ``working_dir`` (code snapshot; .gitignore'd paths such as .venv/ and .laren/ stay behind). Submit stays independent
of training internals: it only validates, names and ships the job.

Local services (``make services``): a Ray head with its dashboard, an MLflow server on SQLite and a SeaweedFS S3 server,
all on 127.0.0.1 with their state under ``.laren/`` and their addresses in ``.laren/services.json``, which submit, the
demo and the follow-up commands read. Paths: relative local paths in a job (``./.laren/storage/...``) are resolved
against the project: a job on a local Ray head gets a ``.laren`` link to the project's ``.laren/`` in its working dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import shutil
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import yaml

from laren.config import ConfigError, RunConfig, project_root  # noqa: F401 - project_root: laren.submit's API
from laren.data.storage import StorageError, atomic_local_file
from laren.models import health
from laren.models.build import parameter_summary
from laren.plan import RunPlan, check_rules, input_urls, plan_url, write_plan
from laren.progress import find_mlflow_run, status_lines
from laren.ray_address import jobs_api_url
from laren.redact import is_secret_key, redact_text
from laren.services import MLflowServer, RayHead, S3Server, free_port, port_open
from laren.specs import (ENTRY, JobSpec, LoadedSweep, Spec, experiment_name, load_any, load_job, spec_kind,
                         spec_name)
from laren.tracking import check_tracking_auth, create_experiment, find_run, flatten, mlflow_client, ui_url
from laren.train.loop import check_run_inputs, input_problems
from laren.train.prior import check_prior_inputs

STATE_DIR = ".laren"
SERVICES_FILE = "services.json"
S3_BUCKET = "laren"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RESUMABLE = ("FAILED", "STOPPED")
# Environment a job needs to find storage, tracking and S3 (passed to the job's runtime env). Never credentials: Ray's
# dashboard and Jobs API return a job's runtime env to anyone who asks. A local head gets the local services' keys in
# its own environment (start_services); a cluster through its own mechanism (instance roles, k8s Secrets, node env).
JOB_ENV_KEYS = ("LAREN_STORAGE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL",
                "LAREN_CACHE")


# ----------------------------------------------------------------------------------------------- project and services


def state_dir(root: Optional[Path] = None) -> Path:
    return (root or project_root()) / STATE_DIR


def read_services(root: Optional[Path] = None) -> dict[str, Any]:
    """The running local services recorded in ``.laren/services.json`` ({} if none); dead entries are dropped."""
    f = state_dir(root) / SERVICES_FILE
    if not f.is_file():
        return {}
    try:
        svc = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: v for k, v in svc.items() if not isinstance(v, dict) or "pid" not in v or _alive(v["pid"])}


def _write_services(root: Path, svc: dict[str, Any]) -> Path:
    f = state_dir(root) / SERVICES_FILE
    with atomic_local_file(f, mode=0o600) as tmp:  # 0600: it holds the local S3 server's key
        Path(tmp).write_text(json.dumps(svc, indent=2))
    return f


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ProcessLookupError, PermissionError, ValueError, TypeError):
        return False


def _preferred_port(port: int) -> int:
    return port if not port_open(port) else free_port()


def services_env(svc: dict[str, Any]) -> dict[str, str]:
    """Environment variables that point laren, boto3 and MLflow at the recorded local services."""
    env: dict[str, str] = {}
    if "mlflow" in svc:
        env["MLFLOW_TRACKING_URI"] = svc["mlflow"]["uri"]
    if "s3" in svc:
        s3 = svc["s3"]
        env.update({"AWS_ENDPOINT_URL": s3["endpoint_url"], "AWS_ACCESS_KEY_ID": s3["access_key"],
                    "AWS_SECRET_ACCESS_KEY": s3["secret_key"], "AWS_DEFAULT_REGION": "us-east-1",
                    "MLFLOW_S3_ENDPOINT_URL": s3["endpoint_url"]})
        env["LAREN_STORAGE"] = f"s3://{s3['bucket']}"
    return env


def start_services(root: Optional[Path] = None, ray: bool = True, mlflow: bool = True, s3: bool = True,
                   num_cpus: Optional[int] = None, log=print) -> dict[str, Any]:
    """Start the missing local services, detached (they outlive this process), and record them in services.json.

    Preferred ports: Ray dashboard 8265 (GCS 6379), MLflow 5000, S3 8333; any that is taken is replaced by a free one.
    """
    root = root or project_root()
    sd = state_dir(root)
    svc = read_services(root)
    if s3 and "s3" not in svc:
        srv = S3Server(sd / "s3", port=_preferred_port(8333)).start()
        srv.create_bucket(S3_BUCKET)
        svc["s3"] = {"pid": srv.proc.pid, "endpoint_url": srv.endpoint_url, "access_key": srv.access_key,
                     "secret_key": srv.secret_key, "bucket": S3_BUCKET, "log": str(srv.log_path)}
        log(f"S3 (SeaweedFS)  {srv.endpoint_url}  bucket s3://{S3_BUCKET}  (state {sd / 's3'})")
        _write_services(root, svc)
    if mlflow and "mlflow" not in svc:
        srv = MLflowServer(sd / "mlflow", port=_preferred_port(5000)).start()
        svc["mlflow"] = {"pid": srv.proc.pid, "uri": srv.uri, "log": str(srv.log_path)}
        log(f"MLflow          {srv.uri}  (SQLite + artifacts under {sd / 'mlflow'})")
        _write_services(root, svc)
    if ray and "ray" not in svc:
        os.environ.update(RayHead.env())
        head = RayHead(sd / "ray", num_cpus=num_cpus, port=_preferred_port(6379),
                       dashboard_port=_preferred_port(8265), node_env=services_env(svc)).start()
        svc["ray"] = {"pid": head.proc.pid, "address": head.address, "dashboard_url": head.dashboard_url,
                      "temp_dir": head.temp_dir(), "log": str(head.log_path)}
        log(f"Ray head        {head.dashboard_url}  (dashboard and Jobs API; GCS {head.address})")
        _write_services(root, svc)
    # The Popen objects are dropped on purpose: each service runs in its own session and keeps running.
    return svc


def stop_services(root: Optional[Path] = None, log=print) -> list[str]:
    """Stop the services recorded in services.json (each by its process group id) and forget them."""
    root = root or project_root()
    f = state_dir(root) / SERVICES_FILE
    if not f.is_file():
        return []
    svc = json.loads(f.read_text())
    stopped = []
    for name in ("ray", "mlflow", "s3"):
        ent = svc.get(name)
        if not isinstance(ent, dict) or "pid" not in ent:
            continue
        _kill_group(int(ent["pid"]))
        if name == "ray" and ent.get("temp_dir", "").startswith("/tmp/ray-"):
            shutil.rmtree(ent["temp_dir"], ignore_errors=True)
        stopped.append(name)
        log(f"stopped {name} (pid {ent['pid']})")
    f.unlink()
    return stopped


def _kill_group(pid: int, timeout_s: float = 15.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.2)


# ----------------------------------------------------------------------------------------------- Ray address


def resolve_address(address: Optional[str] = None, root: Optional[Path] = None) -> Optional[str]:
    """--address, else RAY_ADDRESS, else the local head in services.json, else None. Any form Ray accepts
    (laren/ray_address.py); :func:`client` converts it to the dashboard URL."""
    if address:
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    ray = read_services(root).get("ray")
    return ray["dashboard_url"] if ray else None


def client(address: Optional[str] = None, root: Optional[Path] = None, start_local: bool = False, log=print):
    """A JobSubmissionClient for the resolved address; with ``start_local``, a local head is started when none is known."""
    from ray.job_submission import JobSubmissionClient  # Ray is heavy: loaded when a cluster is contacted

    os.environ.update({k: v for k, v in RayHead.env().items() if k not in os.environ})
    addr = resolve_address(address, root)
    if addr is None:
        if not start_local:
            raise ConfigError("no Ray cluster: pass --address URL, set RAY_ADDRESS, or start the local services "
                              "(`make services`)")
        log("no Ray cluster given (--address / RAY_ADDRESS) and none running here: starting a local Ray head")
        addr = start_services(root, mlflow=False, s3=False, log=log)["ray"]["dashboard_url"]
    addr = jobs_api_url(addr, read_services(root).get("ray"))
    saved = os.environ.pop("RAY_ADDRESS", None)  # Ray's client would let RAY_ADDRESS override the address it is given
    try:
        return JobSubmissionClient(addr), addr
    except Exception as err:  # connection refused, wrong URL
        raise ConfigError(f"cannot reach the Ray cluster at {addr}: {err}. Check --address / RAY_ADDRESS "
                          "(the dashboard URL http://host:8265, the GCS address host:6379 or ray://host:10001)") from None
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def _is_local(addr: str) -> bool:
    host = urllib.parse.urlparse(addr if "://" in addr else f"x://{addr}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


# ----------------------------------------------------------------------------------------------- describing a job


def run_configs(spec: Spec) -> list[tuple[str, RunConfig]]:
    """Every training run a job starts, labelled: one for train/eval, one per row or grid point otherwise."""
    if isinstance(spec, LoadedSweep):
        pts = spec.spec.grid_points(spec.base)
        return [(f"trial {i}", spec.trial_config(p, f"{spec.spec.name}-t{i}")) for i, p in enumerate(pts)]
    if spec.kind == "grid":
        return [(v.title, cfg) for v, cfg in spec.rows()]
    return [(spec.kind, spec.run_config())]


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


# ----------------------------------------------------------------------------------------------- submit


@dataclass
class Submission:
    """What `laren submit` did."""

    run_id: str
    kind: str
    address: str
    action: str  # submitted | resumed | running | finished
    entrypoint: str = ""
    mlflow_url: str = ""
    previous_status: str = ""
    commands: list[str] = field(default_factory=list)


def _job_env(root: Path, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The job's environment: local services first, then this shell's values, then ``extra``; local paths made absolute."""
    env = services_env(read_services(root))
    env.update({k: os.environ[k] for k in JOB_ENV_KEYS if os.environ.get(k)})
    env.update(extra or {})
    env.setdefault("LAREN_STORAGE", str(root / STATE_DIR / "storage"))
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / STATE_DIR / 'mlflow.db'}")
    st = env["LAREN_STORAGE"]
    if "://" not in st and not os.path.isabs(st):
        env["LAREN_STORAGE"] = str((root / st).resolve())
    uri = env["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{(root / uri[len('sqlite:///'):]).resolve()}"
    env["PYTHONUNBUFFERED"] = "1"
    env["LAREN_JOB"] = "1"  # the laren command of a job: the long-job S3 retry budget from its first call (laren/cli.py)
    return env


def runtime_env_vars(env: dict[str, str]) -> dict[str, str]:
    """What of a job's environment may enter its Ray runtime env: no credential, whoever supplied it, and no password
    in a URI (see JOB_ENV_KEYS)."""
    return {k: redact_text(v, mask=None) for k, v in env.items() if not is_secret_key(k)}


def mlflow_url(tracking_uri: str, experiment: str, run_name: str, create: bool = True) -> str:
    """Address of the run in the MLflow UI (the run itself when it exists, else the experiment filtered by run name).

    With ``create`` the experiment is created when missing, so the address is valid before the job starts.
    Returns "" when the tracking server cannot be reached (the job still runs; its tracker buffers).
    """
    if not tracking_uri.startswith("http"):
        return f"(run `mlflow ui --backend-store-uri {redact_text(tracking_uri)}`; run name {run_name})"
    try:
        c = mlflow_client(tracking_uri)
        exp = c.get_experiment_by_name(experiment)
        if exp is None:
            if not create:
                return ""
            exp_id = create_experiment(c, tracking_uri, experiment)
        else:
            exp_id = exp.experiment_id
        run = find_run(c, [exp_id], run_name)
    except Exception:
        return ""
    if run is not None:
        return ui_url(tracking_uri, f"experiments/{exp_id}/runs/{run.info.run_id}")
    return ui_url(tracking_uri, f"experiments/{exp_id}", searchFilter=f"attributes.run_name = '{run_name}'")


def _save_logs(c, run_id: str, root: Path) -> Optional[Path]:
    try:
        text = c.get_job_logs(run_id)
    except Exception:
        return None
    d = root / STATE_DIR / "logs"
    d.mkdir(parents=True, exist_ok=True)
    n = 1 + len(list(d.glob(f"{run_id}.attempt-*.log")))
    p = d / f"{run_id}.attempt-{n}.log"
    p.write_text(text)
    return p


def job_file_in_project(path: Path, working_dir: Path) -> str:
    """The job file's path inside the working dir (it travels with it), or a clear error."""
    try:
        return str(path.resolve().relative_to(working_dir.resolve()))
    except ValueError:
        raise ConfigError(f"{path}: a submitted job file must lie inside the project ({working_dir}), which is shipped "
                          "to the cluster as the job's working_dir; copy it to jobs/") from None


def submit(path: Union[str, Path], address: Optional[str] = None, working_dir: Optional[Union[str, Path]] = None,
           env: Optional[dict[str, str]] = None, entrypoint: Optional[str] = None, log=print) -> Submission:
    """Validate, name and submit a job or sweep file (see the module docstring). Returns what was done.

    ``working_dir``: the project shipped to the cluster (default: the checkout holding the file). ``env``: extra job
    environment (tests). ``entrypoint``: replaces the laren command (tests of the submission machinery).
    """
    path = Path(path)
    spec, _ = validate(path, summary=False)
    root = Path(working_dir).resolve() if working_dir else project_root(path.parent)
    wd = root
    job_env = _job_env(root, env)
    check_tracking_auth(job_env["MLFLOW_TRACKING_URI"], experiment_name(spec))  # refused credentials: an error now
    rel = job_file_in_project(path, wd)
    kind = spec_kind(spec)
    target = resolve_address(address, root)
    local = target is None or _is_local(target)
    with _job_context(root, job_env):  # paths, defaults (storage.root ...) and ids mean here what they mean in the job
        spec = load_any(path.resolve())
        run_id = spec.run_id
        if kind in ("train", "grid") and local:
            _check_inputs_here(spec)
        plan = _job_plan(spec, local)
    c, addr = client(address, root, start_local=True, log=log)
    head = read_services(root).get("ray")
    if head and head.get("dashboard_url") == addr and head.get("address"):
        # The local head's GCS, for the job's Ray processes: Ray's state API (which Ray Train's placement-group cleaner
        # uses when a Tune trial is stopped) cannot pick a cluster by itself on a machine running several Ray instances.
        job_env.setdefault("RAY_ADDRESS", head["address"])
    url = mlflow_url(job_env["MLFLOW_TRACKING_URI"], experiment_name(spec), run_id)

    prev = _job_status(c, run_id)
    sub = Submission(run_id=run_id, kind=kind, address=addr, action="submitted", mlflow_url=url, previous_status=prev or "")
    sub.commands = follow_up_commands(run_id, address)
    if prev in ("PENDING", "RUNNING"):
        sub.action = "running"
        return sub
    if prev == "SUCCEEDED":
        sub.action = "finished"
        return sub
    if prev in RESUMABLE:
        saved = _save_logs(c, run_id, root)
        _delete_finished_job(c, addr, run_id)
        sub.action = "resumed"
        if saved:
            log(f"previous attempt {prev}; its logs: {saved}")

    if plan is not None:
        with _job_context(root, job_env):  # the run's storage, as the job sees it
            write_plan(plan)
    cmd = entrypoint or job_entrypoint(kind, rel, root if _is_local(addr) else None, plan and plan_url(plan.run_dir))
    if _is_local(addr) and not entrypoint:
        (root / STATE_DIR).mkdir(exist_ok=True)
    sub.entrypoint = cmd
    runtime_env = {"working_dir": str(wd), "excludes": [STATE_DIR], "env_vars": runtime_env_vars(job_env)}
    _quiet_packaging()
    c.submit_job(entrypoint=cmd, submission_id=run_id, runtime_env=runtime_env,
                 metadata={"laren.name": spec_name(spec), "laren.kind": kind, "laren.file": rel})
    return sub


def job_entrypoint(kind: str, rel: str, local_root: Optional[Path] = None, plan_file: Optional[str] = None) -> str:
    """The command Ray runs (through a shell) for a job file at ``rel`` in the working dir, or for the run plan at
    ``plan_file`` (a URL); every word is quoted, so a file or project path holding spaces or ';' stays one argument.
    ``local_root``: the project of a job on a local head, whose relative local paths (./.laren/storage/...) must mean
    the project's, not the working-dir copy's."""
    cmd = shlex.join(["python", "-m", "laren.cli", "run-plan", plan_file] if plan_file else
                     ["python", "-m", "laren.cli", *ENTRY[kind].split(), rel])
    if local_root is not None:
        cmd = f"{shlex.join(['ln', '-sfn', str(local_root / STATE_DIR), STATE_DIR])} && {cmd}"
    return cmd


def input_warnings(path: Union[str, Path]) -> list[str]:
    """`laren validate`'s warnings: every input of the job, grid or sweep at ``path`` (data manifests, prior, VGG16 /
    AlexNet weights) that is missing or does not fit, seen from here with the job's environment (a cluster's own
    paths may differ: hence warnings). Prior jobs: their data sets."""
    spec = load_any(path)
    root = project_root(Path(path).parent)
    out: list[str] = []
    with _job_context(root, _job_env(root)):
        if spec_kind(spec) == "prior":
            try:
                check_prior_inputs(spec.prior_config())
            except (ConfigError, OSError, ValueError, StorageError) as err:
                out.append(str(err))
        elif spec_kind(spec) in ("train", "grid", "sweep"):
            for _, cfg in run_configs(spec):
                out += [p for p in input_problems(cfg) if p not in out]
    return [redact_text(w) for w in out]


@contextlib.contextmanager
def _job_context(root: Path, job_env: dict[str, str]) -> Iterator[None]:
    """This process in the job's environment and working directory (restored after)."""
    saved_env, cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update(job_env)
        os.chdir(root)
        yield
    finally:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def _check_inputs_here(spec: JobSpec) -> None:
    """When the job runs on this machine, check its inputs here (weights, prior, data; `check_run_inputs`) so that a
    missing file is an error of `laren submit` itself, before a Ray head is started or a job is queued. Called in the
    job's context (:func:`_job_context`), so relative paths and s3:// URLs mean what they will mean in the job.
    (A remote cluster checks them in the job, before any worker starts: its paths need not exist here.)"""
    check_run_inputs(spec.run_config())


def _job_plan(spec: Spec, local: bool) -> Optional[RunPlan]:
    """A train or prior job's run plan (laren/plan.py), built now, before anything is queued, and written to the run's
    storage folder just before the job is; the job runs it (`laren run-plan URL`) instead of re-reading the YAML. None
    for other kinds, and for a remote cluster whose runs would live in a local folder of this machine, which it cannot
    read, or whose inputs include local paths, which name files of its own copy of the project (the job then plans the
    run there, from the same file)."""
    # function-local: laren.train.distributed imports this module (read_services), a cycle at module level
    from laren.train.distributed import plan_run, runs_root

    kind = spec_kind(spec)
    if kind not in ("train", "prior"):
        return None
    cfg = spec.prior_config() if kind == "prior" else spec.run_config()
    if not local and ("://" not in runs_root(cfg) or any("://" not in v for v in input_urls(cfg).values())):
        return None  # local paths mean the cluster's copy of the project there: the job plans the run on the cluster
    return plan_run(cfg)


def _delete_finished_job(c, addr: str, run_id: str) -> None:
    """Forget a terminal job's record so its submission id can be used again.

    Ray's job monitor keeps polling a job until it sees its supervisor actor (``_ray_internal_job_actor_<id>``) dead,
    and re-writes the record (FAILED, "supervisor actor died") if it is gone by then; a new submission under the same
    id would then be overwritten and fail. So: wait for the supervisor to be dead, give the monitor a poll interval,
    delete, and check that the record stays deleted.
    """
    _wait_supervisor_gone(addr, run_id)
    time.sleep(1.5)
    for _ in range(10):
        c.delete_job(run_id)
        time.sleep(1.0)
        if _job_status(c, run_id) is None:
            return
    raise RuntimeError(f"could not delete the finished job record {run_id} on {addr}; try again in a minute")


def _wait_supervisor_gone(addr: str, run_id: str, timeout_s: float = 30.0) -> None:
    """Wait until the job's supervisor actor has exited (see _delete_finished_job)."""
    from ray.util.state import list_actors

    name = f"_ray_internal_job_actor_{run_id}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            alive = list_actors(address=addr, filters=[("name", "=", name), ("state", "!=", "DEAD")], raise_on_missing_output=False)
        except Exception:
            time.sleep(2.0)  # state API unavailable: a short grace period instead
            return
        if not alive:
            return
        time.sleep(0.5)


def _quiet_packaging() -> None:
    """Ray logs every ignored file of the working_dir upload at INFO; keep the submit output to what matters."""
    for name in ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                 "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)


def follow_up_commands(run_id: str, address: Optional[str] = None) -> list[str]:
    a = f" --address {address}" if address else ""
    return [f"laren status {run_id}{a}", f"laren logs {run_id} -f{a}", f"laren stop {run_id}{a}"]


def _job_status(c, run_id: str) -> Optional[str]:
    try:
        return str(c.get_job_status(run_id).value)
    except Exception as err:  # "Job ... does not exist"
        if "does not exist" in str(err) or "404" in str(err) or "not found" in str(err).lower():
            return None
        raise


# ----------------------------------------------------------------------------------------------- status / logs / stop / list


def resolve_run(c, run: str) -> str:
    """A run id from: a submission id, a job/sweep file (its computed run id), or a job name (its latest submission)."""
    if run.endswith((".yaml", ".yml")) and Path(run).is_file():
        return load_any(run).run_id
    if _job_status(c, run) is not None:
        return run
    mine = [j for j in c.list_jobs() if (j.metadata or {}).get("laren.name") == run and j.submission_id]
    if mine:
        return max(mine, key=lambda j: j.start_time or 0).submission_id
    raise ConfigError(f"no job {run!r} on this cluster: give a run id from `laren list`, a job file, or a job name")


def job_info(run: str, address: Optional[str] = None):
    c, _ = client(address)
    return c.get_job_info(resolve_run(c, run))


def run_name(run: str) -> str:
    """A run id from a run id or a job / sweep file (its computed run id)."""
    return load_any(run).run_id if run.endswith((".yaml", ".yml")) and Path(run).is_file() else run


def mlflow_status(run_id: str, tracking_uri: Optional[str] = None, root: Optional[Path] = None) -> list[str]:
    """`laren status`'s MLflow lines for ``run_id`` (laren.progress.status_lines), from ``tracking_uri`` or the one a
    job submitted from here gets; [] when MLflow has no such run, one line when it cannot be reached."""
    uri = tracking_uri or _job_env(root or project_root())["MLFLOW_TRACKING_URI"]
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return []
    try:
        found = find_mlflow_run(uri, run_id)
    except Exception as err:  # noqa: BLE001 - a down or refusing server: the Ray status is still worth printing
        return [f"  MLflow: not reachable at {redact_text(uri)} ({type(err).__name__})"]
    return status_lines(found) if found is not None else []


def status(run: str, address: Optional[str] = None) -> str:
    return str(job_info(run, address).status.value)


def wait(run_id: str, address: Optional[str] = None, timeout_s: float = 600.0, poll_s: float = 1.0) -> str:
    """Block until the job is terminal; return its status (TimeoutError after ``timeout_s``)."""
    c, _ = client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        st = _job_status(c, run_id)
        if st in TERMINAL:
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {run_id} still {st} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def logs(run: str, address: Optional[str] = None) -> str:
    c, _ = client(address)
    return c.get_job_logs(resolve_run(c, run))


def follow_logs(run: str, address: Optional[str] = None) -> Iterator[str]:
    """Stream the job's log lines until it ends."""
    c, _ = client(address)
    run_id = resolve_run(c, run)
    agen = c.tail_job_logs(run_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.close()


def stop(run: str, address: Optional[str] = None) -> tuple[str, bool]:
    c, _ = client(address)
    run_id = resolve_run(c, run)
    return run_id, bool(c.stop_job(run_id))


def list_jobs(address: Optional[str] = None, all_jobs: bool = False) -> list[dict[str, Any]]:
    """The cluster's laren jobs (all Ray jobs with ``all_jobs``), newest first."""
    c, _ = client(address)
    out = []
    for j in c.list_jobs():
        md = j.metadata or {}
        if not all_jobs and "laren.name" not in md:
            continue
        out.append({"run_id": j.submission_id or j.job_id, "status": str(j.status.value), "kind": md.get("laren.kind", "-"),
                    "file": md.get("laren.file", "-"), "start_time": j.start_time or 0, "end_time": j.end_time or 0,
                    "message": j.message or ""})
    return sorted(out, key=lambda r: r["start_time"], reverse=True)


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no laren jobs on this cluster"

    def t(ms):
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    cols = [("run id", lambda r: r["run_id"]), ("status", lambda r: r["status"]), ("kind", lambda r: r["kind"]),
            ("started", lambda r: t(r["start_time"])), ("ended", lambda r: t(r["end_time"])), ("file", lambda r: r["file"])]
    cells = [[f(r) for _, f in cols] for r in rows]
    w = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(cols)]
    lines = ["  ".join(h.ljust(w[i]) for i, (h, _) in enumerate(cols))]
    lines += ["  ".join(c[i].ljust(w[i]) for i in range(len(cols))) for c in cells]
    return "\n".join(lines)
