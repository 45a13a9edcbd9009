"""Ray Jobs: submit / status / logs / stop / list.

Identity (architecture, "Identity and storage conventions"): a job's run id is ``<job name>-<hash of its resolved config>``
(:mod:`laren.specs`). The same id is the Ray Jobs submission id, the Ray Train run name and the MLflow run name, so
submitting a job whose previous attempt FAILED or was STOPPED deletes that attempt's record (its logs are kept under
``.laren/logs/``) and submits it again under the same id: training finds its checkpoints under ``runs/<run id>/`` and
resumes. A RUNNING job is left alone, a SUCCEEDED one is not re-run.

Submit stays independent of training internals: it only validates (:mod:`laren.jobs.checks`), names and ships the job
(:mod:`laren.jobs.entrypoints`). The local services it may start (``make services``) are :mod:`laren.services`'.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from laren.config import ConfigError, project_root
from laren.jobs.checks import check_inputs_here, validate
from laren.jobs.entrypoints import (job_context, job_entrypoint, job_env, job_file_in_project, job_plan,
                                    runtime_env_vars)
from laren.plan import plan_url, write_plan
from laren.progress import find_mlflow_run, status_lines
from laren.ray_address import jobs_api_url
from laren.redact import redact_text
from laren.services import STATE_DIR, RayHead, read_services, start_services
from laren.specs import experiment_name, load_any, spec_kind, spec_name
from laren.tracking import check_tracking_auth, mlflow_url

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RESUMABLE = ("FAILED", "STOPPED")


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
    env_vars = job_env(root, env)
    check_tracking_auth(env_vars["MLFLOW_TRACKING_URI"], experiment_name(spec))  # refused credentials: an error now
    rel = job_file_in_project(path, wd)
    kind = spec_kind(spec)
    target = resolve_address(address, root)
    local = target is None or _is_local(target)
    with job_context(root, env_vars):  # paths, defaults (storage.root ...) and ids mean here what they mean in the job
        spec = load_any(path.resolve())
        run_id = spec.run_id
        if kind in ("train", "grid") and local:
            check_inputs_here(spec)
        plan = job_plan(spec, local)
    c, addr = client(address, root, start_local=True, log=log)
    head = read_services(root).get("ray")
    if head and head.get("dashboard_url") == addr and head.get("address"):
        # The local head's GCS, for the job's Ray processes: Ray's state API (which Ray Train's placement-group cleaner
        # uses when a Tune trial is stopped) cannot pick a cluster by itself on a machine running several Ray instances.
        env_vars.setdefault("RAY_ADDRESS", head["address"])
    url = mlflow_url(env_vars["MLFLOW_TRACKING_URI"], experiment_name(spec), run_id)

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
        with job_context(root, env_vars):  # the run's storage, as the job sees it
            write_plan(plan)
    cmd = entrypoint or job_entrypoint(kind, rel, root if _is_local(addr) else None, plan and plan_url(plan.run_dir))
    if _is_local(addr) and not entrypoint:
        (root / STATE_DIR).mkdir(exist_ok=True)
    sub.entrypoint = cmd
    runtime_env = {"working_dir": str(wd), "excludes": [STATE_DIR], "env_vars": runtime_env_vars(env_vars)}
    _quiet_packaging()
    c.submit_job(entrypoint=cmd, submission_id=run_id, runtime_env=runtime_env,
                 metadata={"laren.name": spec_name(spec), "laren.kind": kind, "laren.file": rel})
    return sub


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
    from ray.util.state import list_actors  # Ray is heavy (see client)

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
    uri = tracking_uri or job_env(root or project_root())["MLFLOW_TRACKING_URI"]
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
