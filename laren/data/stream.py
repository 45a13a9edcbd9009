"""The training data stream: endless batches of the train set from a run's saved data position (laren/train/loop.py
and laren/train/prior.py draw from it; the position goes into every checkpoint)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Iterator

from laren.config import RunConfig
from laren.data import pack
from laren.data.pipeline import auto_loader_workers, make_train_loader

if TYPE_CHECKING:  # annotations only: laren.data sits below laren.train
    from laren.train.state import TrainState


class DataStream:
    """Endless training batches from a saved data position (``st.data_epoch``, ``st.data_batch``, ``st.data_ranks``).

    A pass ("data epoch") is ``ceil(samples / batch_size_global)`` batches per rank; the loader's random streams are
    seeded by (seed, pass, loader worker), so the batches of a pass are the same on every run. On resume the loader
    seeks to the position of every loader worker saved in ``st.data_ranks`` (nothing already consumed is decoded; see
    laren.data.pipeline); a checkpoint without it replays the pass (decodes and drops the consumed batches). Updates
    ``st`` as it yields; ``position()`` is this rank's part of ``st.data_ranks``; ``skipped()`` counts the bad
    samples dropped. ``close()`` (or leaving a ``with`` block) stops the loader workers at once; a stream left to
    the garbage collector keeps them alive until a collection, which then waits for each in turn.
    """

    def __init__(self, cfg: RunConfig, rank: int, world_size: int, st: TrainState):
        manifest = pack.read_manifest(cfg.data.train_url)
        samples = sum(int(s["count"]) for s in manifest["shards"])
        self.per_pass = max(1, math.ceil(samples / cfg.train.batch_size_global))
        self.loader = make_train_loader(
            cfg.data.train_url, cfg.model.prior.resolution, cfg.model.lr_size,
            cfg.train.batch_size_global // world_size, rank=rank, world_size=world_size,
            num_workers=auto_loader_workers(cfg.resources.cpus_per_worker) if cfg.data.loader_workers is None
            else cfg.data.loader_workers, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
            hflip=cfg.data.hflip, max_bad_fraction=cfg.data.max_bad_fraction, batches_per_epoch=self.per_pass,
            lr_on_device=cfg.data.lr_on_device,
        )
        self.st = st
        self._it = self._gen()

    def _gen(self) -> Iterator[dict[str, Any]]:
        st = self.st
        self.loader.seek(st.data_batch, st.data_ranks)
        while True:
            self.loader.epoch = st.data_epoch
            for batch in self.loader:
                st.data_batch += 1
                yield batch
            st.data_epoch += 1
            st.data_batch = 0

    def position(self) -> dict[str, Any]:
        return self.loader.position()

    def __next__(self) -> dict[str, Any]:
        return next(self._it)

    def take(self) -> tuple[dict[str, Any], float]:
        """The next batch and the seconds spent waiting for it."""
        t0 = time.perf_counter()
        batch = next(self._it)
        return batch, time.perf_counter() - t0

    def skipped(self) -> float:
        return float(self.loader.stats()["bad"])

    def close(self) -> None:
        self._it.close()  # runs the loader's finally: its DataLoader workers shut down now

    def __enter__(self) -> "DataStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
