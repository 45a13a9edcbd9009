"""What a run used and cost: worker-hours, GPU-hours and USD, logged by training as ``perf/*`` and ``cost/usd``.

    perf/worker_hours  workers x wall hours of training (every worker, CPU or GPU)
    perf/gpu_hours     the same for GPU workers (one GPU each), 0 on CPU-only runs
    cost/usd           perf/worker_hours x resources.hourly_price_usd (logged only when a price is set)

Each worker's wall time is the training loop's, from its first step (data start-up, evaluations and checkpoints
included; Ray start-up, queueing and model build not); they are summed over workers and over attempts (so an elastic
run counts the workers it had): a resumed run carries on from the figure its checkpoint recorded, so the time between
the last checkpoint and a crash is not counted.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

COST_KEYS = ("perf/gpu_hours", "perf/worker_hours", "cost/usd")


def usage_metrics(worker_s: float, use_gpu: bool, hourly_price_usd: Optional[float]) -> dict[str, float]:
    """The ``perf/*`` (and, with a price, ``cost/usd``) figures of ``worker_s`` worker-seconds of training (the wall
    seconds of every worker, summed)."""
    worker_h = worker_s / 3600.0
    out = {"perf/worker_hours": worker_h, "perf/gpu_hours": worker_h if use_gpu else 0.0}
    if hourly_price_usd is not None:
        out["cost/usd"] = worker_h * hourly_price_usd
    return out


def format_cost(metrics: Mapping[str, float]) -> Optional[str]:
    """One line for `laren status` and tables, e.g. ``2.50 GPU-h, $7.25`` (``0.10 worker-h`` on CPU runs); None when
    the metrics hold no usage figures."""
    def num(k: str) -> Optional[float]:
        v = metrics.get(k)
        return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None

    gpu, workers, usd = num("perf/gpu_hours"), num("perf/worker_hours"), num("cost/usd")
    if gpu is None and workers is None:
        return None
    parts = [f"{gpu:.2f} GPU-h" if gpu else f"{workers or 0.0:.2f} worker-h"]
    if usd is not None:
        parts.append(f"${usd:.2f}")
    return ", ".join(parts)
