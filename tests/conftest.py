"""Shared fixtures: real services on 127.0.0.1 (started once per run of the suite, stopped after; with pytest-xdist, by
the controller for all its workers) and reference data paths."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Iterator, Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"  # reference data with its provenance (README.md there)

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray Train's preemption watcher (an extra actor process per run) polls for node drains, which a single-node test
# instance never has; every Ray instance of the session (in-process ones and the head's jobs) inherits this.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's Prometheus metrics (controller and worker callbacks) feed a dashboard no test reads; laren's figures go to
# MLflow.
os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
# One intra-op thread, in this process (fixture below) and in the processes tests start (CLI calls, servers, Ray
# workers: Ray gives its workers OMP_NUM_THREADS = their CPUs, 1 here, anyway). The tests' tensors are small, and on
# the 2-core machine two OpenMP threads mostly wait for each other while the suite's services run: a tiny training run
# took 47.6 CPU-s with two threads against 6.4 with one (58 s against 9 s of wall time).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


# ---- the session's services. With pytest-xdist (`make test`), the controller starts one set for all its workers (its
# Ray head has 4 logical CPUs per worker), in the background while the workers collect; a worker attaches to it at its
# first use and never stops it. In one process, the first test that needs a service starts it.
SHARED = "laren_services"  # the workers' key (workerinput) for the shared services' parameters


def _needs_services(config) -> bool:
    """Whether a run may use the services: not the unit tier alone (its paths, or ``-m "not integration"``)."""
    unit = REPO / "tests" / "unit"
    paths = [Path(a.split("::")[0]).resolve() for a in config.args] or [REPO / "tests"]
    return "not integration" not in (config.option.markexpr or "") and not all(p.is_relative_to(unit) for p in paths)


def _start_shared_services(config, workers: int) -> dict:
    """The controller's services, each started in a thread of its own (a failure is written to ``<name>.failed``
    beside its folder, for the workers to report) and stopped at the end of the run; their parameters."""
    from laren.services import MLflowServer, RayHead, S3Server

    root = Path(tempfile.mkdtemp(prefix="laren-test-services-"))
    s3 = S3Server(root / "s3")
    services = [s3, MLflowServer(root / "mlflow"), RayHead(root / "ray", num_cpus=4 * workers, node_env=s3.env())]

    def start(service) -> None:
        try:
            service.start()
        except BaseException:
            (root / f"{service.name}.failed").write_text(traceback.format_exc())
            raise

    threads = [threading.Thread(target=start, args=(sv,), name=f"laren-test-{sv.name}", daemon=True) for sv in services]
    for t in threads:
        t.start()

    def stop() -> None:
        for t in threads:
            t.join()
        for service in services:
            service.stop()
        shutil.rmtree(root, ignore_errors=True)

    config.add_cleanup(stop)
    return {sv.name: sv.params() for sv in services}


def _attach(service, timeout_s: float = 300.0):
    """``service`` (a worker's object for a controller's service) once it answers; the controller's error if its
    start failed."""
    failed = service.root.parent / f"{service.name}.failed"
    deadline = time.monotonic() + timeout_s
    while True:
        if failed.is_file():
            raise RuntimeError(f"the shared {service.name} did not start:\n{failed.read_text()}")
        try:
            return service.attach(timeout_s=2.0)
        except TimeoutError:
            if time.monotonic() > deadline:
                raise


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist's controller, for each worker: the shared services' parameters (started for the first worker)."""
    config = node.config
    if not hasattr(config, "_laren_services"):
        workers = int(node.workerinput["workercount"])
        config._laren_services = _start_shared_services(config, workers) if _needs_services(config) else None
    if config._laren_services:
        node.workerinput[SHARED] = config._laren_services


def _shared(request, name: str) -> Optional[dict]:
    return (getattr(request.config, "workerinput", {}).get(SHARED) or {}).get(name)


@pytest.fixture(scope="session")
def s3_server(request, tmp_path_factory):
    """A SeaweedFS S3 server; yields the S3Server (endpoint_url, env(), create_bucket(), client())."""
    from laren.services import S3Server

    if shared := _shared(request, "s3"):
        yield _attach(S3Server(**shared))
        return
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Points boto3 (AWS_* variables) at the test S3 server for one test."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    return s3_server


@pytest.fixture(scope="session")
def mlflow_server(request, tmp_path_factory):
    """An MLflow server on SQLite; yields the MLflowServer (uri)."""
    from laren.services import MLflowServer

    if shared := _shared(request, "mlflow"):
        yield _attach(MLflowServer(**shared))
        return
    with MLflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_head(request, s3_server, tmp_path_factory):
    """The session's one Ray instance: a head with its dashboard / Jobs API and 4 logical CPUs (per xdist worker),
    whose node holds the session S3 server's keys (AWS_*), so that its jobs and workers reach that server as a local
    cluster's do (laren/services.py). Yields the RayHead (address, dashboard_url, num_cpus, env())."""
    import ray

    from laren.services import RayHead

    os.environ.update(RayHead.env())
    if shared := _shared(request, "ray"):
        yield _attach(RayHead(**shared))
        ray.shutdown()  # this process as a driver (local_ray)
        return
    with RayHead(tmp_path_factory.mktemp("ray"), num_cpus=4, node_env=s3_server.env()) as head:
        yield head
        ray.shutdown()  # this process as a driver (local_ray), before its head goes


@pytest.fixture(scope="module")
def local_ray(ray_head) -> None:
    """This process as a Ray driver on the session's head (``ray_head``), for the modules that run Ray Train here: one
    Ray instance for the whole session, whose workers reach the session S3 server. A test whose workers need another
    environment disconnects and starts its own instance (test_reliability_secrets); the next user connects again."""
    import ray

    from laren.train.distributed import ensure_ray

    if ray.is_initialized() and ray.get_runtime_context().gcs_address != ray_head.address:
        ray.shutdown()  # an instance of a test's own, left running
    if not ray.is_initialized():
        with environ({"RAY_ADDRESS": ray_head.address}):  # only for this connection: RAY_ADDRESS steers laren's client
            ensure_ray()


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables ``values`` for the duration of the block; the previous values are restored."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_random_pngs(folder: Path, names: list[str], size: tuple[int, int], seed: int = 0) -> Path:
    """Seeded uniform-noise RGB PNGs ``<name>.png`` of ``size`` (height, width) in ``folder`` (created)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    return folder


def rosinality_checkpoint() -> Path:
    """The rosinality-format checkpoint ``{"g_ema": state dict, "latent_avg"}`` of the 32 px StyleGAN2 fixture, written
    once per process with ``torch.save`` from its tensors (tests/fixtures/stylegan2/rosinality-32px.safetensors), so
    that no pickled weights file is tracked in git."""
    import tempfile
    from collections import OrderedDict

    import torch
    from safetensors.torch import load_file

    out = Path(tempfile.gettempdir()) / f"laren-fixture-{os.getpid()}" / "rosinality-32px.pt"
    if not out.is_file():
        flat = load_file(str(FIXTURES / "stylegan2" / "rosinality-32px.safetensors"))
        g = OrderedDict((k[len("g_ema."):], v) for k, v in flat.items() if k.startswith("g_ema."))
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"g_ema": g, "latent_avg": flat["latent_avg"]}, out)
    return out


def pytest_collection_modifyitems(items) -> None:
    """Every test under tests/integration carries the ``integration`` mark (``-m "not integration"``: the unit tier).

    The order of the modules:
    - one process (``pytest tests``): the unit tier first, so that its failures show within minutes, before the
      session's services (Ray head, MLflow and S3 servers, started at their first use) share the CPU with it;
    - several workers (``make test``: pytest-xdist, one module per worker at a time, handed out in this order): the
      longest first, so that the short ones fill the end and no worker waits alone on a long module. A module with a
      ``slow`` test counts as long, an integration module as longer than a unit one."""
    for item in items:
        if "integration" in Path(str(item.path)).parts:
            item.add_marker(pytest.mark.integration)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("integration") is not None)  # stable: file order kept
        return
    slow = {item.path for item in items if item.get_closest_marker("slow")}
    integration = {item.path for item in items if item.get_closest_marker("integration")}
    items.sort(key=lambda item: (item.path not in slow, item.path not in integration))  # stable: file order kept
