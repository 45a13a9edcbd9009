"""Fault injection for tests and failure drills: a worker that dies at a chosen step, once.

The training loops call ``WorkerContext.on_step(step, rank)`` after every optimizer step; :class:`KillOnce` is such a
callback. Give it to :func:`laren.train.distributed.run_training` (``on_step=``), or, for a process that laren starts
itself (a submitted job's driver and its Ray workers), set the environment variables below: :func:`from_env` turns
them into the same callback on every worker.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

OnStep = Callable[[int, int], None]  # (step just done, rank)

KILL_STEP_ENV, KILL_RANK_ENV, KILL_MARKER_ENV = "LAREN_TEST_KILL_AT_STEP", "LAREN_TEST_KILL_RANK", "LAREN_TEST_KILL_MARKER"


@dataclass(frozen=True)
class KillOnce:
    """SIGKILL the process of rank ``rank`` after step ``step``, once: ``marker`` is created just before, so that a
    restarted attempt passes that step."""

    step: int
    rank: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        if step != self.step or rank != self.rank or Path(self.marker).exists():
            return
        Path(self.marker).write_text(f"killed rank {rank} (pid {os.getpid()}) at step {step}\n")
        os.kill(os.getpid(), signal.SIGKILL)


def from_env() -> Optional[KillOnce]:
    """The :class:`KillOnce` the environment asks for (all three variables; the rank defaults to 1), or None."""
    at, marker = os.environ.get(KILL_STEP_ENV), os.environ.get(KILL_MARKER_ENV)
    if not at or not marker:
        return None
    return KillOnce(int(at), int(os.environ.get(KILL_RANK_ENV, "1")), marker)
