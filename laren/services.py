"""Local services on 127.0.0.1: an S3 server (SeaweedFS), an MLflow server on SQLite, a Ray head.

These are the embedded defaults of the local-first pipeline (`make services`, `make demo`) and the real parts the integration
tests run against. Each is a context manager that starts the process, waits until it answers, and stops it (process group)
on exit. Ports default to free ones; state lives under ``root_dir`` so a restart on the same dir keeps the data.

The project's own set (``make services``, :func:`start_services`): the three started detached, their state under
``.laren/`` and their addresses in ``.laren/services.json`` (0600: it holds the local S3 key), which `laren submit`, the
demo and the follow-up commands read (:func:`read_services`, :func:`services_env`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Optional

from laren.config import project_root
from laren.data.storage import atomic_local_file

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _bin(name: str) -> str:
    """An executable from this interpreter's environment (the venv), else PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"`{name}` not found: run `make setup` (it installs every local service)")
    return found


class _Process:
    """A child process in its own process group, with its output in ``root_dir/<name>.log``."""

    name = "service"
    stop_grace_s = 15.0  # SIGTERM, then SIGKILL after this many seconds

    def __init__(self, root_dir: str | os.PathLike):
        self.root = Path(root_dir).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.proc: Optional[subprocess.Popen] = None

    @property
    def log_path(self) -> Path:
        return self.root / f"{self.name}.log"

    def _spawn(self, argv: list[str], env: Optional[dict] = None) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})}, cwd=self.root, start_new_session=True,
        )
        log.close()

    def _poll(self, timeout_s: float) -> bool:
        """Whether the service answers (``ready``) within ``timeout_s``; raises if the process this object started exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}:\n{self._tail()}")
            try:
                if self.ready():
                    return True
            except Exception:
                pass
            time.sleep(0.2)
        return False

    def _wait(self, timeout_s: float) -> None:
        if not self._poll(timeout_s):
            self.stop()
            raise TimeoutError(f"{self.name} did not become ready in {timeout_s:.0f} s; see {self.log_path}:\n{self._tail()}")

    def attach(self, timeout_s: float = 180.0):
        """This object for a service that another process started with the same folder and ports, once it answers.
        It stays that process's to stop."""
        if not self._poll(timeout_s):
            raise TimeoutError(f"{self.name} at {self.root} did not answer in {timeout_s:.0f} s; see {self.log_path}:\n"
                               f"{self._tail()}")
        return self

    def ready(self) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def _tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=self.stop_grace_s)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=5)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self):  # pragma: no cover - overridden
        raise NotImplementedError


class S3Server(_Process):
    """SeaweedFS `weed mini`: a real S3 endpoint on 127.0.0.1 with one static access key.

    Every port weed opens is chosen here (master, volume, filer, s3, admin, webdav, their gRPC twins; its Iceberg
    and Lance catalog servers are off), so several servers can run side by side. No telemetry is sent.
    """

    name = "s3"

    def __init__(self, root_dir, port: Optional[int] = None, access_key: str = "laren", secret_key: str = "laren-secret-key"):
        super().__init__(root_dir)
        self.port = port or free_port()
        self.access_key = access_key
        self.secret_key = secret_key

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def env(self) -> dict[str, str]:
        """Standard AWS variables that point boto3 (and so laren.data.storage) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3  # heavy (a second): only where a bucket is made or read
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=Config(signature_version="s3v4", retries={"max_attempts": 5, "mode": "standard"}),
        )

    def create_bucket(self, name: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=name)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass

    def params(self) -> dict[str, Any]:
        """Constructor arguments of an object for this same server (``attach`` in another process)."""
        return dict(root_dir=str(self.root), port=self.port, access_key=self.access_key, secret_key=self.secret_key)

    def start(self) -> "S3Server":
        ids = {
            "identities": [
                {
                    "name": "laren",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        cfg = self.root / "s3-identities.json"
        cfg.write_text(json.dumps(ids))
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        logs = self.root / "logs"  # weed's own logs (by default in the system's temporary folder)
        logs.mkdir(exist_ok=True)
        ports = {k: free_port() for k in ("master", "volume", "filer", "admin", "webdav", "debug")}
        argv = [
            _bin("weed"), f"-logdir={logs}", "mini", f"-dir={data}", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-s3.port={self.port}", f"-s3.port.grpc={free_port()}", f"-s3.config={cfg}",
            f"-master.port={ports['master']}", f"-master.port.grpc={free_port()}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={free_port()}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={free_port()}",
            f"-admin.port={ports['admin']}", f"-admin.port.grpc={free_port()}", "-admin.ui=false",
            f"-webdav.port={ports['webdav']}", "-webdav=false", f"-debug.port={ports['debug']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # catalog servers laren does not use, on fixed default ports
            "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
        ]
        self._spawn(argv)

        self._wait(timeout_s=60)
        return self

    def ready(self) -> bool:
        self.client().list_buckets()
        return True


class MLflowServer(_Process):
    """`mlflow server` on SQLite with artifacts under root_dir, served through the server (clients need no storage access)."""

    name = "mlflow"

    def __init__(self, root_dir, port: Optional[int] = None, workers: int = 1):
        super().__init__(root_dir)
        self.port = port or free_port()
        self.workers = workers

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def params(self) -> dict[str, Any]:
        """Constructor arguments of an object for this same server (``attach`` in another process)."""
        return dict(root_dir=str(self.root), port=self.port, workers=self.workers)

    def start(self) -> "MLflowServer":
        db = self.root / "mlflow.db"
        argv = [
            _bin("mlflow"), "server", "--host", LOOPBACK, "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{db}",
            "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
            "--workers", str(self.workers),
        ]
        self._spawn(argv, env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})

        self._wait(timeout_s=120)
        return self

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
            return r.status == 200


class RayHead(_Process):
    """`ray start --head --block` on 127.0.0.1 with its dashboard (the Jobs API).

    Token auth is off for this loopback-only head (RAY_AUTH_MODE=disabled), so the local CLI and the Jobs SDK need no token.
    """

    name = "ray"
    # Once a job has run, the raylet, GCS and agents take 15-25 s to drain on SIGTERM; a head that goes away with its
    # whole cluster has nothing to drain or keep (GCS state is in memory), so it is killed after 3 s.
    stop_grace_s = 3.0

    def __init__(self, root_dir, num_cpus: Optional[int] = None, port: Optional[int] = None,
                 dashboard_port: Optional[int] = None, object_store_mb: int = 512,
                 node_env: Optional[dict[str, str]] = None):
        super().__init__(root_dir)
        self.num_cpus = num_cpus
        # Environment of the head's processes, which every job and worker on it inherits: how a local cluster gets
        # the local services' credentials without them ever entering a job's runtime env.
        self.node_env = dict(node_env or {})
        self.port = port or free_port()
        self.dashboard_port = dashboard_port or free_port()
        self.object_store_mb = object_store_mb

    @property
    def address(self) -> str:
        """GCS address for `ray.init(address=...)`."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """Jobs API / dashboard address for JobSubmissionClient and `laren submit --address`."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @staticmethod
    def env() -> dict[str, str]:
        """Environment of a local instance (this head, or ensure_ray's in-process one). Besides no token auth and no
        usage stats: no pool of prestarted idle workers (Ray starts num_cpus Python workers, 1.5-3.5 s of CPU each, at
        the first driver, and more as tasks queue); laren runs only actors (the Ray Train controller and workers),
        which start their own process anyway."""
        return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_prestart_worker_first_driver": "0", "RAY_enable_worker_prestart": "0"}

    def params(self) -> dict[str, Any]:
        """Constructor arguments of an object for this same head (``attach`` in another process)."""
        return dict(root_dir=str(self.root), num_cpus=self.num_cpus, port=self.port, dashboard_port=self.dashboard_port,
                    object_store_mb=self.object_store_mb, node_env=self.node_env)

    def start(self) -> "RayHead":
        argv = [
            _bin("ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}", f"--port={self.port}",
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}", "--disable-usage-stats",
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--temp-dir={self.temp_dir()}",
        ]
        if self.num_cpus is not None:
            argv.append(f"--num-cpus={self.num_cpus}")
        # The venv's bin first on PATH: jobs and workers then find the same interpreter and packages.
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        self._spawn(argv, env={**self.node_env, **self.env(), "PATH": path})

        self._wait(timeout_s=120)
        return self

    def ready(self) -> bool:
        with urllib.request.urlopen(f"{self.dashboard_url}/api/version", timeout=2) as r:
            return r.status == 200

    def temp_dir(self) -> str:
        # Ray's socket paths must stay short (AF_UNIX limit of 107 bytes): keep them under /tmp.
        d = Path("/tmp") / f"ray-{self.port}"
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    def stop(self) -> None:
        owned = self.proc is not None  # an attached head's folder (its sockets) is its own process's
        super().stop()
        if owned:
            shutil.rmtree(self.temp_dir(), ignore_errors=True)


STATE_DIR = ".laren"
SERVICES_FILE = "services.json"
S3_BUCKET = "laren"


# ----------------------------------------------------------------------------------------------- the project's local services


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
