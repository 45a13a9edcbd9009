"""Progress of a run: the line rank 0 prints at each log step, the attempt and failure tags of its MLflow run, and the
same figures read back from MLflow for `laren status`.

The printed line uses only values the log step has already brought to the host (``train/kimg``,
``perf/images_per_s``: all ranks' images over the interval's wall time, evaluation included, and the latest ``val/*``),
so printing adds no synchronisation to the step::

    [face64x-1a2b3c4d] kimg 12.3/300 (4%)  45.1 img/s  ETA 1h46m  val psnr 18.41 ssim 0.339 (at kimg 12.0)

Attempts: rank 0 counts every start of the run (a Ray Train worker-group restart, a re-submission, a re-run of
``laren train``) in the MLflow tag ``laren.attempts``. An attempt that raises records ``laren.last_failure`` (the
exception, one line) before it ends; one that was killed (out of memory, preemption, a lost node, ``laren stop``) cannot,
so the next attempt records that for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from laren.tracking import find_run, mlflow_client

ATTEMPTS_TAG = "laren.attempts"
FAILURE_TAG = "laren.last_failure"
FAILED_ATTEMPT_TAG = "laren.last_failure_attempt"
VAL_SHOWN = ("psnr", "ssim", "lpips_alex", "factor_fd")  # val/* (SR) and eval/* (prior) figures on the line
_MAX_REASON = 400
log = logging.getLogger("laren.progress")


def duration(seconds: Optional[float]) -> str:
    """``3h05m``, ``7m12s``, ``42s``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def eta_s(kimg: float, total_kimg: float, images_per_s: float) -> Optional[float]:
    """Seconds left at the current rate (None without a rate)."""
    if not images_per_s or images_per_s <= 0 or not math.isfinite(images_per_s):
        return None
    return max(0.0, (total_kimg - kimg) * 1000.0 / images_per_s)


def val_text(metrics: Mapping[str, Any]) -> str:
    """``val psnr 18.41 ssim 0.339`` from the latest val/* (or eval/*) figures; "" when there are none yet."""
    parts = []
    for name in VAL_SHOWN:
        for prefix in ("val/", "eval/"):
            v = metrics.get(prefix + name)
            if isinstance(v, (int, float)) and math.isfinite(v):
                parts.append(f"{name} {v:.4g}")
    return ("val " + " ".join(parts)) if parts else ""


def progress_line(run_id: str, kimg: float, total_kimg: float, images_per_s: float,
                  last: Mapping[str, Any], val_kimg: Optional[float] = None) -> str:
    """The line rank 0 prints at each log step (see the module docstring)."""
    pct = 100.0 * kimg / total_kimg if total_kimg else 0.0
    line = (f"[{run_id}] kimg {kimg:.4g}/{total_kimg:g} ({pct:.0f}%)  {images_per_s:.1f} img/s  "
            f"ETA {duration(eta_s(kimg, total_kimg, images_per_s))}")
    val = val_text(last)
    if val:
        line += f"  {val}" + (f" (at kimg {val_kimg:.4g})" if val_kimg is not None else "")
    return line


def write_line(text: str) -> None:
    """``text`` and a newline to this process's stdout, flushed. Not through ``print``: on a Ray Train worker,
    ``print`` is patched to log through the root logger and, when Ray has wrapped stdout, to print as well, so each line
    reached a job's log twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


class ProgressPrinter:
    """Rank 0's progress line at each log step of a training loop (other ranks print nothing)."""

    def __init__(self, run_id: str, total_kimg: float, rank: int, out: Callable[[str], None] = write_line):
        self.run_id, self.total_kimg, self.enabled, self.out = run_id, total_kimg, rank == 0, out
        self.val_kimg: Optional[float] = None

    def __call__(self, kimg: float, metrics: Mapping[str, Any], last: Mapping[str, Any]) -> None:
        """``metrics``: this step's logged values (host floats); ``last``: every latest value, val/* included."""
        if any(k.startswith(("val/", "eval/")) for k in metrics):
            self.val_kimg = kimg
        if not self.enabled or "perf/images_per_s" not in metrics:
            return
        self.out(progress_line(self.run_id, kimg, self.total_kimg, float(metrics["perf/images_per_s"]), last,
                               self.val_kimg))


# ----------------------------------------------------------------------------------------------- attempts


def record_attempt(tracker, start_step: int) -> int:
    """Count this start of the run on its MLflow run (rank 0's tracker; a NullTracker does nothing). When the previous
    attempt neither finished nor recorded its failure, it was killed: that is recorded as the last failure. Returns
    this attempt's number (1 when MLflow was unreachable at the start)."""
    tags = tracker.resumed_tags
    prev = int(tags.get(ATTEMPTS_TAG, 0) or 0)
    new: dict[str, Any] = {ATTEMPTS_TAG: prev + 1}
    if prev and tracker.previous_status == "RUNNING" and tags.get(FAILED_ATTEMPT_TAG) != str(prev):
        new[FAILURE_TAG] = (f"attempt {prev} ended without an error report (its process was killed: out of memory, "
                            f"preemption, a lost node or a stop); attempt {prev + 1} resumed at step {start_step}")
        new[FAILED_ATTEMPT_TAG] = prev
    tracker.set_tags(new)
    return prev + 1


def record_failure(tracker, attempt: int, step: int, err: BaseException) -> None:
    """Record why this attempt fails (one line) on its MLflow run, now: the process may be gone a moment later."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    try:
        tracker.set_tags({FAILURE_TAG: f"attempt {attempt} failed at step {step}: {text}", FAILED_ATTEMPT_TAG: attempt})
        tracker.flush(force=True)
    except Exception as rec_err:  # noqa: BLE001 - never hide the failure being recorded behind one of the recording
        log.warning("could not record the failure of attempt %d in MLflow: %s", attempt, type(rec_err).__name__)


@contextlib.contextmanager
def attempt_outcome(tracker, attempt: int, st) -> Iterator[None]:
    """Around a training loop: a failure is recorded (:func:`record_failure`, at step ``st.step``) and raised again,
    leaving the MLflow run open for the restarted attempt to resume (no duplicate run); the end of the body closes
    the run as FINISHED."""
    try:
        yield
    except Exception as err:
        record_failure(tracker, attempt, st.step, err)
        raise
    tracker.finish("FINISHED")


# ----------------------------------------------------------------------------------------------- status from MLflow


def find_mlflow_run(tracking_uri: str, run_name: str):
    """The MLflow run named ``run_name`` (tag ``laren.run_id``) in any experiment, or None."""
    c = mlflow_client(tracking_uri)
    return find_run(c, [e.experiment_id for e in c.search_experiments()], run_name)


def status_lines(run, now: Optional[float] = None) -> list[str]:
    """What `laren status` shows of an MLflow run: progress (kimg, img/s, ETA), the last validation, attempts and the
    last failure."""
    now = time.time() if now is None else now
    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    lines = [f"MLflow run {run.info.run_id}: {run.info.status}"]
    total = _float(p.get("train.total_kimg"))
    kimg, rate = m.get("train/kimg"), m.get("perf/images_per_s")
    if kimg is not None:
        of = f"/{total:g} ({100.0 * kimg / total:.0f}%)" if total else ""
        eta = duration(eta_s(kimg, total, rate or 0.0)) if total and run.info.status == "RUNNING" else "-"
        lines.append(f"  progress: kimg {kimg:.4g}{of}  {rate or 0.0:.1f} img/s  ETA {eta}")
    val = val_text(m)
    if val:
        lines.append(f"  last {val}")
    if run.info.end_time:
        lines.append(f"  ended:    {duration(now - run.info.end_time / 1000.0)} ago")
    elif run.info.start_time:
        lines.append(f"  started:  {duration(now - run.info.start_time / 1000.0)} ago")
    lines.append(f"  attempts: {tags.get(ATTEMPTS_TAG, '1' if kimg is not None else '0')}")
    if tags.get(FAILURE_TAG):
        lines.append(f"  last failure: {tags[FAILURE_TAG]}")
    return lines


def _float(x: Any) -> Optional[float]:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
