"""MLflow tracking for training, evaluation and sweeps: one logger, used on rank 0 only (house rule 4).

Ray's MLflow helpers do not fit Ray Train V2 (no images from trials, duplicate runs after restarts, nested-dict params
crash; ecosystem notes, section 2), so this module is our own small rank-0 logger over ``MlflowClient``:

- **Identity.** A run is found by its tag ``laren.run_id`` (= the job's run id, also the MLflow run name). Starting a
  tracker for a run id that exists in the experiment *continues* that run (a resumed job never makes a duplicate);
  otherwise the run is created. Sweep trials / ablation rows are child runs: ``parent_run_id`` sets the
  ``mlflow.parentRunId`` tag, which the MLflow UI shows as a nested run.
- **Explicit run ids.** Every call names its run id (no fluent "active run"), so several trackers can live in one
  process (a sweep driver, tests).
- **Params.** Nested config dicts are flattened with dots (``model.gdm.num_nodes``). On resume, params already logged with
  the same value are skipped; MLflow params are immutable, so a changed value is reported and not logged.
- **No credentials.** Keys that look like credentials (secret, password, token, key_id, access_key, api_key,
  credential) have their value replaced by ``***``; ``user:password@`` in URLs keeps only the user (``laren.redact``).
  The same applies to tags, the ``resolved_config.yaml`` artifact and this module's log messages.
- **Never kills training.** If the server is unreachable, params, tags and metrics are buffered in memory (bounded:
  oldest metrics dropped first), and texts, images and artifact paths are queued (bounded by count and bytes); one
  warning is logged per outage. Every later call retries at most once per ``retry_interval_s`` and flushes everything
  on success. If the server is still down when the run finishes, what is unsent (params, tags, metrics, texts,
  images, the end status) is written as JSON to ``<run dir>/tracking-buffer/`` in the run's storage;
  ``laren tracking sync RUN`` replays it into the same MLflow run (by name) and deletes it.
- **Refused credentials stop the run.** HTTP 401 / 403 (``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` wrong or
  missing) is no outage: :class:`TrackingAuthError`, one line, at once; ``laren submit`` and ``laren train`` check it
  before anything is queued (:func:`check_tracking_auth`).

HTTP settings (read by MLflow at each request; set here only when the user has not set them, so a down server costs a
few seconds, not MLflow's default of minutes of retries):

    MLFLOW_HTTP_REQUEST_MAX_RETRIES      2   (MLflow default 7: ~4 min of back-off on a down server)
    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR   1   (default 2)
    MLFLOW_HTTP_REQUEST_TIMEOUT          10  seconds per request (default 120)
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import requests
import yaml

from laren.config import ConfigError
from laren.data import storage
from laren.redact import has_password, is_secret_key, redact, redact_text

# mlflow is imported inside the functions that use it: it takes seconds to load, and importing this module must not.


class _RedactFilter(logging.Filter):
    """Log records of this module with URI passwords removed (MLflow errors quote the tracking URI)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact_text(record.getMessage()), None
        return True


log = logging.getLogger("laren.tracking")
log.addFilter(_RedactFilter())

RUN_ID_TAG = "laren.run_id"
PARENT_TAG = "mlflow.parentRunId"

HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


_MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
_PARAMS_PER_BATCH = 100  # MAX_PARAMS_TAGS_PER_BATCH
_METRICS_PER_BATCH = 1000  # MAX_METRICS_PER_BATCH
_METRIC_KEY = re.compile(r"^[a-zA-Z0-9_\-./ ]+$")
# MLflow answers these for a bad request: retrying cannot help, so the item is dropped (with a warning), not buffered.
_PERMANENT_CODES = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "INVALID_STATE",
}
# ... and these for credentials it refuses: no retry can help either, and nothing may be dropped, so the run stops.
_AUTH_CODES = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}
BUFFER_DIR = "tracking-buffer"  # under the run's storage folder: what an MLflow outage left unsent


# ----------------------------------------------------------------------------------------------- helpers


def set_http_env_defaults() -> None:
    """Make a down MLflow server fail fast (seconds); user-set variables win. See the module docstring."""
    for k, v in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def ui_url(tracking_uri: str, page: str, **query: str) -> str:
    """The MLflow UI's ``page`` (e.g. ``experiments/1/runs/<id>``) at ``tracking_uri``, credentials redacted, in the UI's
    "Model training" view: MLflow 3's UI otherwise opens an experiment in its GenAI view, which hides the runs table."""
    q = urllib.parse.urlencode({**query, "workflowType": "machine_learning"}, quote_via=urllib.parse.quote)
    return f"{redact_text(tracking_uri.rstrip('/'))}/#/{page}?{q}"


def mlflow_client(tracking_uri: str):
    """An ``MlflowClient`` of ``tracking_uri`` that fails fast on a down server (:func:`set_http_env_defaults`)."""
    from mlflow.tracking import MlflowClient  # mlflow is heavy (seconds): loaded only where MLflow is used

    set_http_env_defaults()
    return MlflowClient(tracking_uri)


def find_run(client, experiment_ids: list[str], value: str, tag: str = RUN_ID_TAG, newest: bool = False):
    """The run of these experiments whose ``tag`` (default ``laren.run_id``) is ``value``: the oldest (the one a
    resumed job continues) or, with ``newest``, the newest; None if there is none. Several such runs are
    warned about."""
    if not experiment_ids:
        return None
    runs = client.search_runs(list(experiment_ids), filter_string=f"tags.`{tag}` = '{value}'", max_results=2,
                              order_by=[f"attributes.start_time {'DESC' if newest else 'ASC'}"])
    if len(runs) > 1:
        log.warning("several MLflow runs carry %s=%s; using the %s", tag, value, "newest" if newest else "oldest")
    return runs[0] if runs else None


def create_experiment(client, tracking_uri: str, name: str) -> str:
    """Create the MLflow experiment ``name``; returns its id. With a local SQLite store (``sqlite:///path/x.db``, no
    server) its artifacts go to ``path/x-artifacts/`` beside the database, not to MLflow's default ``./mlruns`` of
    whichever process creates it (a Ray worker's temporary folder)."""
    location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).absolute()
        location = (db.parent / f"{db.stem}-artifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"gdm": {"num_nodes": 64}}}`` -> ``{"model.gdm.num_nodes": 64}``. Lists stay leaves."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def _param_str(value: Any) -> str:
    s = "None" if value is None else (value if isinstance(value, str) else str(list(value) if isinstance(value, tuple) else value))
    return s if len(s) <= _MAX_PARAM_VALUE else s[: _MAX_PARAM_VALUE - 14] + "...(truncated)"


class TrackingConfigError(ValueError):
    """A user error in the tracking settings (raised, unlike server trouble, which is buffered)."""


class TrackingAuthError(TrackingConfigError, ConfigError):
    """The MLflow server refused the credentials (HTTP 401 / 403): a user error, raised at once, never buffered."""


def auth_error(tracking_uri: str, experiment: str, status: int) -> TrackingAuthError:
    what = "401 Unauthorized" if status == 401 else "403 Forbidden"
    return TrackingAuthError(
        f"MLflow at {redact_text(tracking_uri)} refused the credentials (HTTP {what}): set MLFLOW_TRACKING_USERNAME and "
        f"MLFLOW_TRACKING_PASSWORD (on a cluster: from the Secret laren-credentials) to a user that may write to "
        f"experiment {experiment!r}"
    )


def _auth_status(err: BaseException) -> Optional[int]:
    """401 / 403 when ``err`` is the server refusing the credentials, else None."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return _AUTH_CODES.get(err.error_code)
    status = getattr(getattr(err, "response", None), "status_code", None)
    return status if status in (401, 403) else None


def check_tracking_auth(tracking_uri: str, experiment: str = "", timeout_s: float = 5.0) -> None:
    """Before a run is queued: an http(s) MLflow server that refuses this environment's credentials is an error
    (:class:`TrackingAuthError`); an unreachable one is not (the run buffers, see the module docstring)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    user, pw = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    try:
        r = requests.get(tracking_uri.rstrip("/") + "/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                         auth=(user, pw or "") if user else None, timeout=timeout_s)
    except requests.RequestException:
        return
    if r.status_code in (401, 403):
        raise auth_error(tracking_uri, experiment, r.status_code)


def _is_permanent(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in _PERMANENT_CODES


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class _Pending:
    """A queued artifact-like call (text, image, file) that waits for the server; ``nbytes`` bounds the queue."""

    what: str
    nbytes: int
    call: Callable[[str], None]  # takes the run id
    record: Optional[dict] = None  # the same call as JSON-able data, for the buffer file (None: cannot be replayed)


# ----------------------------------------------------------------------------------------------- trackers


class NullTracker:
    """What ranks other than 0 get: the Tracker API, doing nothing."""

    run_id: Optional[str] = None
    resumed = False
    resumed_tags: Mapping[str, str] = {}  # a resumed run's tags and status as found (laren.progress: attempts)
    previous_status = ""

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_config(self, config: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_image(self, image_hwc: np.ndarray, key: str, step: int) -> None: ...
    def log_artifact(self, local_path: str | os.PathLike, artifact_path: Optional[str] = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def flush(self, force: bool = False) -> bool:
        return True
    def finish(self, status: str = "FINISHED") -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        self.finish("FAILED" if exc_type else "FINISHED")


class Tracker(NullTracker):
    """One MLflow run, started or resumed by its run name (``laren.run_id`` tag). Rank 0 only.

    Args (plain values): ``tracking_uri`` (``http://…`` server or ``sqlite:///…``), ``experiment`` (created if
    missing), ``run_name`` (the job's run id), ``parent_run_id`` (MLflow run id of a sweep/grid parent),
    ``tags`` (extra run tags), ``system_metrics`` (CPU/GPU/memory as ``system/*`` metrics every
    ``system_metrics_interval_s``), ``retry_interval_s`` (least time between attempts while the server is down),
    ``max_buffered_metrics`` and ``max_queued_bytes`` (memory bounds of the outage buffers), ``buffer_url`` (a
    storage folder: what is still unsent when the run finishes is written there, for ``laren tracking sync``).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        parent_run_id: Optional[str] = None,
        tags: Optional[Mapping[str, Any]] = None,
        system_metrics: bool = True,
        *,
        system_metrics_interval_s: float = 10.0,
        retry_interval_s: float = 30.0,
        max_buffered_metrics: int = 100_000,
        max_queued_bytes: int = 256 * 2**20,
        max_queued_items: int = 256,
        buffer_url: Optional[str] = None,
    ) -> None:
        if not run_name or "'" in run_name or "\\" in run_name:
            raise ValueError(f"tracking run name must be non-empty without quotes or backslashes, got {run_name!r}")
        if not experiment:
            raise ValueError("tracking.experiment is empty: name the MLflow experiment (the job family)")
        set_http_env_defaults()
        if has_password(tracking_uri):
            # MLflow prints "View run ... at: <tracking URI>" when a run ends: with a password in the URI, that line
            # would put it in every log. (Prefer MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.)
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.parent_run_id = parent_run_id
        self.client = mlflow_client(tracking_uri)
        self.run_id = None
        self.resumed = False
        self.finished = False
        self._extra_tags = {str(k): _param_str(redact(v)) for k, v in (tags or {}).items() if not is_secret_key(str(k))}
        self._system_metrics = system_metrics
        self._system_interval = system_metrics_interval_s
        self._monitor = None
        self._retry_interval = retry_interval_s
        self._next_try = 0.0
        self._down = False
        # Outage buffers.
        self._metrics: deque = deque(maxlen=max_buffered_metrics)
        self.dropped_metrics = 0
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._max_queued_bytes = max_queued_bytes
        self._max_queued_items = max_queued_items
        self.dropped_items = 0
        self._logged_params: dict[str, str] = {}
        self._lock = threading.RLock()
        self.buffer_url = buffer_url
        self.flush()

    # ------------------------------------------------------------------ run identity

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise TrackingConfigError(
                    f"MLflow experiment {self.experiment!r} is deleted: restore it in the MLflow UI or choose another "
                    "tracking.experiment"
                )
            return exp.experiment_id
        try:
            return create_experiment(self.client, self.tracking_uri, self.experiment)
        except MlflowException as err:  # created concurrently by another process (sweep trials)
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def find_run(self, experiment_id: str):
        """The existing run with ``laren.run_id == run_name`` in the experiment (the oldest if several), or None."""
        return find_run(self.client, [experiment_id], self.run_name)

    def _start_or_resume(self) -> None:
        from mlflow.entities import RunStatus

        exp_id = self._experiment_id()
        run = self.find_run(exp_id)
        if run is not None:
            self.run_id = run.info.run_id
            self.resumed = True
            self.resumed_tags, self.previous_status = dict(run.data.tags), run.info.status
            self._logged_params = dict(run.data.params)
            if run.info.status != "RUNNING":
                self.client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            log.info("MLflow: continuing run %s (%s) in experiment %s", self.run_name, self.run_id, self.experiment)
        else:
            tags = {RUN_ID_TAG: self.run_name, **self._extra_tags}
            if self.parent_run_id:
                tags[PARENT_TAG] = self.parent_run_id
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
            self.run_id = run.info.run_id
            log.info("MLflow: created run %s (%s) in experiment %s", self.run_name, self.run_id, self.experiment)
        if self.resumed and self._extra_tags:
            self._tags.update(self._extra_tags)
        # Params buffered before the run was known may now turn out to be logged already.
        self._params = {k: v for k, v in self._params.items() if not self._already_logged(k, v)}

    def _start_system_metrics(self) -> None:
        if not self._system_metrics or self.finished or (self._monitor is not None and self._monitor._process is not None
                                                         and self._monitor._process.is_alive()):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self._system_interval, resume_logging=True, tracking_uri=self.tracking_uri
            )
            self._monitor.start()
        except Exception as err:  # psutil missing, etc.: metrics of the run matter more than system metrics
            log.warning("MLflow system metrics are off: %s", err)
            self._system_metrics = False

    # ------------------------------------------------------------------ flushing

    def _already_logged(self, key: str, value: str) -> bool:
        old = self._logged_params.get(key)
        if old is None:
            return False
        if old != value:
            log.warning(
                "MLflow param %s was logged as %r; the new value %r is not logged (MLflow params are immutable)",
                key, old, value,
            )
        return True

    def _outage(self, err: BaseException) -> None:
        if not self._down:
            log.warning(
                "MLflow at %s is unreachable (%s: %s). Buffering metrics and params in memory (up to %d metric values) "
                "and retrying at most every %.0f s; training continues.",
                self.tracking_uri, type(err).__name__, str(err).splitlines()[0][:200], self._metrics.maxlen,
                self._retry_interval,
            )
        self._down = True
        self._next_try = time.monotonic() + self._retry_interval

    def flush(self, force: bool = False) -> bool:
        """Send everything buffered. True when nothing is left; never raises for server trouble.

        While the server is down, a call inside ``retry_interval_s`` of the last failure returns at once (False)
        unless ``force``."""
        with self._lock:
            if self.finished:
                return not self._has_pending()
            if self._down and not force and time.monotonic() < self._next_try:
                return False
            try:
                self._flush_once()
            except TrackingConfigError:
                raise
            except Exception as err:
                status = _auth_status(err)
                if status:
                    raise auth_error(self.tracking_uri, self.experiment, status) from None
                self._outage(err)
                return False
            if self._down:
                log.warning("MLflow at %s is reachable again; buffered data was sent", self.tracking_uri)
                self._down = False
            self._start_system_metrics()
            return True

    def _has_pending(self) -> bool:
        return bool(self._metrics or self._params or self._tags or self._queue)

    def _flush_once(self) -> None:
        from mlflow.entities import Param, RunTag

        if self.run_id is None:
            self._start_or_resume()
        rid = self.run_id
        while self._params:
            keys = list(self._params)[:_PARAMS_PER_BATCH]
            batch = [Param(k, self._params[k]) for k in keys]
            self._send(lambda: self.client.log_batch(rid, params=batch), f"{len(batch)} params")
            for k in keys:
                self._logged_params[k] = self._params.pop(k)
        while self._tags:
            keys = list(self._tags)[:_PARAMS_PER_BATCH]
            batch = [RunTag(k, self._tags[k]) for k in keys]
            self._send(lambda: self.client.log_batch(rid, tags=batch), f"{len(batch)} tags")
            for k in keys:
                self._tags.pop(k)
        while self._metrics:
            batch = [self._metrics[i] for i in range(min(_METRICS_PER_BATCH, len(self._metrics)))]
            self._send(lambda: self.client.log_batch(rid, metrics=batch), f"{len(batch)} metric values")
            for _ in batch:
                self._metrics.popleft()
        while self._queue:
            item = self._queue[0]
            self._send(lambda: item.call(rid), item.what)
            self._queue.popleft()
            self._queued_bytes -= item.nbytes

    def _send(self, call: Callable[[], None], what: str) -> None:
        """Run one MLflow call. A rejected request (bad input) is reported and skipped; anything else propagates as an
        outage (the caller keeps the item and retries later)."""
        try:
            call()
        except Exception as err:
            if not _is_permanent(err):
                raise
            log.warning("MLflow rejected %s for run %s; dropped: %s", what, self.run_name, err)

    def _enqueue(self, item: _Pending) -> None:
        with self._lock:
            self._queue.append(item)
            self._queued_bytes += item.nbytes
            while len(self._queue) > 1 and (
                self._queued_bytes > self._max_queued_bytes or len(self._queue) > self._max_queued_items
            ):
                old = self._queue.popleft()
                self._queued_bytes -= old.nbytes
                self.dropped_items += 1
                log.warning("MLflow outage buffer full: dropped queued %s", old.what)
            self.flush()

    # ------------------------------------------------------------------ public API

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params flattened with dots; credentials redacted; already-logged keys skipped."""
        flat = flatten(redact(dict(params)))
        with self._lock:
            for k, v in flat.items():
                s = _param_str(v)
                if not self._already_logged(k, s):
                    self._params[k] = s
            self.flush()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (credential-like keys are not logged)."""
        with self._lock:
            for k, v in tags.items():
                if not is_secret_key(str(k)):
                    self._tags[str(k)] = _param_str(redact(v))
            self.flush()

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved run config as the ``resolved_config.yaml`` artifact (credentials redacted). Params are separate:
        ``log_params(config)``."""
        text = yaml.safe_dump(redact(dict(config)), sort_keys=False)
        self._enqueue(_text_item(self.client, text, "resolved_config.yaml"))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalar metrics at ``step`` (names like ``train/loss_pix``, ``val/psnr``)."""
        from mlflow.entities import Metric

        ts = _now_ms()
        for k in metrics:
            if not _METRIC_KEY.match(k):
                raise ValueError(f"metric name {k!r}: use letters, digits and _ - . / space only")
        with self._lock:
            for k, v in metrics.items():
                if len(self._metrics) == self._metrics.maxlen:
                    self.dropped_metrics += 1
                self._metrics.append(Metric(k, float(v), ts, int(step)))
            self.flush()

    def log_image(self, image_hwc: np.ndarray, key: str, step: int) -> None:
        """An image (uint8, H×W×3 or H×W) under ``key`` at ``step`` (MLflow's stepped image charts)."""
        img = np.asarray(image_hwc)
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3, 4)):
            raise ValueError(f"log_image expects a uint8 HxW or HxWx{{1,3,4}} array, got {img.dtype} {img.shape}")
        if not _METRIC_KEY.match(key):
            raise ValueError(f"image key {key!r}: use letters, digits and _ - . / space only")
        img = img.copy()  # the caller may reuse its buffer before an outage ends
        step, ts = int(step), _now_ms()
        self._enqueue(_image_item(self.client, img, key, step, ts))

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file or directory. During an outage the *path* is queued; it is uploaded later if it still exists."""
        p = Path(local_path)
        if not p.exists():
            raise FileNotFoundError(f"artifact to log does not exist: {p}")

        def call(rid: str) -> None:
            if not p.exists():
                log.warning("queued MLflow artifact %s no longer exists; skipped", p)
            elif p.is_dir():
                self.client.log_artifacts(rid, str(p), artifact_path)
            else:
                self.client.log_artifact(rid, str(p), artifact_path)

        self._enqueue(_Pending(f"artifact {p.name}", 0, call))

    def finish(self, status: str = "FINISHED") -> None:
        """Flush, stop system metrics, and mark the run FINISHED / FAILED / KILLED. Idempotent."""
        with self._lock:
            if self.finished:
                return
            ok = self.flush(force=True)  # one last attempt even inside the retry interval
            self.finished = True
            if self._monitor is not None:
                try:
                    self._monitor.finish()
                except Exception as err:
                    log.debug("system metrics monitor finish: %s", err)
            if self.run_id is None or not ok:
                where = self._write_buffer(status)
                log.warning(
                    "MLflow at %s unreachable at finish: %d metric values, %d params and %d queued items not sent%s",
                    self.tracking_uri, len(self._metrics), len(self._params), len(self._queue),
                    f"; written to {where}: replay them with `laren tracking sync {self.run_name}`" if where else "",
                )
                if where:
                    return
            if self.run_id is not None:
                try:
                    self.client.set_terminated(self.run_id, status=status)
                except Exception as err:
                    log.warning("MLflow: could not mark run %s %s: %s", self.run_name, status, err)


    def _write_buffer(self, status: str) -> Optional[str]:
        """The unsent params, tags, metrics and queued texts / images as one JSON file under ``buffer_url`` (its URL),
        or None without a ``buffer_url`` or when the storage fails too."""
        if not self.buffer_url:
            return None
        doc = {
            "format": "laren-tracking-buffer", "version": 1, "experiment": self.experiment, "run_name": self.run_name,
            "parent_run_id": self.parent_run_id, "run_tags": self._extra_tags, "mlflow_run_id": self.run_id,
            "status": status, "params": self._params, "tags": self._tags,
            "metrics": [[m.key, m.value, m.timestamp, m.step] for m in self._metrics],
            "items": [i.record for i in self._queue if i.record is not None],
            "not_replayable": [i.what for i in self._queue if i.record is None],
        }
        url = storage.join(self.buffer_url, f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.json")
        try:
            storage.write_bytes(url, json.dumps(doc).encode())
        except Exception as err:  # noqa: BLE001 - nothing else can be done; said in the warning
            log.warning("could not write the MLflow outage buffer to %s: %s", url, err)
            return None
        return url


def _text_item(client, text: str, name: str) -> _Pending:
    return _Pending(name, len(text), lambda rid: client.log_text(rid, text, name), {"kind": "text", "name": name, "text": text})


def _image_item(client, img: np.ndarray, key: str, step: int, ts: int) -> _Pending:
    buf = io.BytesIO()
    np.save(buf, img, allow_pickle=False)
    rec = {"kind": "image", "key": key, "step": step, "timestamp": ts, "npy": base64.b64encode(buf.getvalue()).decode()}
    return _Pending(f"image {key}@{step}", img.nbytes,
                    lambda rid: client.log_image(rid, img, key=key, step=step, timestamp=ts, synchronous=True), rec)


def tracking_buffer_url(cfg, run_id: str, run_dir: Optional[str] = None) -> str:
    """Where a run's unsent tracking records go: ``<run dir>/tracking-buffer`` (run dir: ``<storage.root>/runs/<id>``)."""
    return storage.join(run_dir or storage.join(cfg.storage.root, "runs", run_id), BUFFER_DIR)


def sync_buffers(buffer_url: str, tracking_uri: str) -> list[str]:
    """Replay every buffer file under ``buffer_url`` (written by a run whose MLflow server stayed down) into MLflow,
    oldest first: the run is found (or created) by its name, its params, tags, metrics (original steps and times),
    texts and images are sent, and it is marked with the status it ended with. Each file is deleted once all of it
    is sent. Returns the URLs replayed; an error (naming the file) if the server is still unreachable."""
    from mlflow.entities import Metric

    done = []
    for url in [u for u in storage.list_files(buffer_url) if u.endswith(".json")]:
        doc = json.loads(storage.read_bytes(url))
        if not isinstance(doc, dict) or doc.get("format") != "laren-tracking-buffer":
            raise ValueError(f"{url}: not a laren tracking buffer")
        t = Tracker(tracking_uri, doc["experiment"], doc["run_name"], doc.get("parent_run_id"), doc.get("run_tags"),
                    system_metrics=False)
        with t._lock:
            t._params.update({k: v for k, v in doc["params"].items() if not t._already_logged(k, v)})
            t._tags.update(doc["tags"])
            t._metrics.extend(Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in doc["metrics"])
            for rec in doc["items"]:
                if rec["kind"] == "text":
                    t._queue.append(_text_item(t.client, rec["text"], rec["name"]))
                else:
                    img = np.load(io.BytesIO(base64.b64decode(rec["npy"])), allow_pickle=False)
                    t._queue.append(_image_item(t.client, img, rec["key"], rec["step"], rec["timestamp"]))
            if not t.flush(force=True):
                raise ConnectionError(f"MLflow at {redact_text(tracking_uri)} is still unreachable; {url} is kept, "
                                      "run `laren tracking sync` again later")
        t.finish(doc["status"] if doc["status"] != "RUNNING" else "FINISHED")
        storage.delete(url)
        done.append(url)
    return done


def make_tracker(rank: int, *args: Any, **kwargs: Any) -> NullTracker:
    """``Tracker(*args, **kwargs)`` on rank 0 (the arguments are :class:`Tracker`'s), a :class:`NullTracker` elsewhere
    (every rank can call the same methods)."""
    if rank != 0:
        return NullTracker()
    return Tracker(*args, **kwargs)


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
