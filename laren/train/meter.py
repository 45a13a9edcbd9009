"""The training figures between two log steps, kept on the training device.

Each step adds its loss tensors (summed on the device in float64, as Python floats would be: no host sync in the
step), its image count and the time it waited for data. At a log step :meth:`StepMeter.read` sums everything over
the ranks in one all-reduce (one host sync) and gives the same values on every rank:

    train/<key>            the mean over the interval's steps and the ranks
    perf/images_per_s      images of all ranks per second of the interval
    perf/data_wait_share   the ranks' summed wait for data over their summed interval
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from laren.train import collectives as C


class StepMeter:
    def __init__(self, keys: Sequence[str], device: torch.device):
        self.keys, self.device = tuple(keys), device
        self._sums = torch.zeros(len(self.keys), dtype=torch.float64, device=device)
        self._reset()

    def _reset(self) -> None:
        self._sums.zero_()
        self.steps, self.images, self.wait_s, self.t0 = 0, 0, 0.0, time.perf_counter()

    def add(self, out: dict[str, torch.Tensor], images: int, wait_s: float = 0.0) -> None:
        """One step's figures: ``out[key]`` scalar tensors on the device, this rank's images, its wait for data."""
        self._sums += torch.stack([out[k].detach().double() for k in self.keys])
        self.steps, self.images, self.wait_s = self.steps + 1, self.images + images, self.wait_s + wait_s

    def read(self, extra: Sequence[float] = ()) -> tuple[dict[str, float], list[float]]:
        """(the interval's metrics, ``extra`` summed over the ranks); starts the next interval."""
        dt = time.perf_counter() - self.t0
        counts = torch.tensor([self.steps, self.images, self.wait_s, dt, *extra], dtype=torch.float64, device=self.device)
        sums = C.sum_across(torch.cat([self._sums, counts]), self.device)
        k = len(self.keys)
        metrics = {f"train/{key}": sums[i] / max(sums[k], 1.0) for i, key in enumerate(self.keys)}
        metrics["perf/images_per_s"] = sums[k + 1] / max(dt, 1e-9)
        metrics["perf/data_wait_share"] = sums[k + 2] / max(sums[k + 3], 1e-9)
        self._reset()
        return metrics, sums[k + 4:]
