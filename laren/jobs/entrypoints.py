"""What a submitted job is and runs: its entrypoint command, its environment, its run plan.

What runs on the cluster is ``python -m laren.cli <train|run-eval|run-grid|run-sweep|prior train|analyze> <job file>``
(or ``run-plan URL`` for a planned train or prior run) with the project as the Ray ``working_dir`` (code snapshot;
.gitignore'd paths such as .venv/ and .laren/ stay behind). Paths: relative local paths in a job (``./.laren/storage/...``)
are resolved against the project: a job on a local Ray head gets a ``.laren`` link to the project's ``.laren/`` in its
working dir.
"""

from __future__ import annotations

import contextlib
import os
import shlex
from pathlib import Path
from typing import Iterator, Optional

from laren.config import ConfigError, RunConfig
from laren.plan import RunPlan, input_urls
from laren.redact import is_secret_key, redact_text
from laren.services import STATE_DIR, read_services, services_env
from laren.specs import ENTRY, LoadedSweep, Spec, spec_kind
from laren.train.distributed import plan_run, runs_root

# Environment a job needs to find storage, tracking and S3 (passed to the job's runtime env). Never credentials: Ray's
# dashboard and Jobs API return a job's runtime env to anyone who asks. A local head gets the local services' keys in
# its own environment (start_services); a cluster through its own mechanism (instance roles, k8s Secrets, node env).
JOB_ENV_KEYS = ("LAREN_STORAGE", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "MLFLOW_S3_ENDPOINT_URL",
                "LAREN_CACHE")


def run_configs(spec: Spec) -> list[tuple[str, RunConfig]]:
    """Every training run a job starts, labelled: one for train/eval, one per row or grid point otherwise."""
    if isinstance(spec, LoadedSweep):
        pts = spec.spec.grid_points(spec.base)
        return [(f"trial {i}", spec.trial_config(p, f"{spec.spec.name}-t{i}")) for i, p in enumerate(pts)]
    if spec.kind == "grid":
        return [(v.title, cfg) for v, cfg in spec.rows()]
    return [(spec.kind, spec.run_config())]


def job_env(root: Path, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
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


def job_file_in_project(path: Path, working_dir: Path) -> str:
    """The job file's path inside the working dir (it travels with it), or a clear error."""
    try:
        return str(path.resolve().relative_to(working_dir.resolve()))
    except ValueError:
        raise ConfigError(f"{path}: a submitted job file must lie inside the project ({working_dir}), which is shipped "
                          "to the cluster as the job's working_dir; copy it to jobs/") from None


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


@contextlib.contextmanager
def job_context(root: Path, job_env: dict[str, str]) -> Iterator[None]:
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


def job_plan(spec: Spec, local: bool) -> Optional[RunPlan]:
    """A train or prior job's run plan (laren/plan.py), built now, before anything is queued, and written to the run's
    storage folder just before the job is; the job runs it (`laren run-plan URL`) instead of re-reading the YAML. None
    for other kinds, and for a remote cluster whose runs would live in a local folder of this machine, which it cannot
    read, or whose inputs include local paths, which name files of its own copy of the project (the job then plans the
    run there, from the same file)."""
    kind = spec_kind(spec)
    if kind not in ("train", "prior"):
        return None
    cfg = spec.prior_config() if kind == "prior" else spec.run_config()
    if not local and ("://" not in runs_root(cfg) or any("://" not in v for v in input_urls(cfg).values())):
        return None  # local paths mean the cluster's copy of the project there: the job plans the run on the cluster
    return plan_run(cfg)
