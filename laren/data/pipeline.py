"""Shards -> batches of (LR, HR) pairs, for training (endless, shuffled) and evaluation (deterministic, exact).

Batch dict (one per step, per rank)::

    {"lr": (B, 3, l, l) float32 in [-1, 1], "hr": (B, 3, h, h) float32 in [-1, 1],
     "key": [B sample keys], "shard": [B shard names]}

LR synthesis is the GLEAN / mmagic pipeline on the (flipped) HR image: uint8 -> /255 -> MATLAB bicubic at l/h
(``laren.imresize``, antialiased) -> clip -> x255 -> round -> uint8, then both images map to [-1, 1] as x/127.5 - 1
(:func:`lr_hr_pair`). With ``lr_on_device`` the training loader ships the decoded HR only, ``{"hr_u8": (B, 3, h, h)
uint8, "key", "shard"}`` (64x fewer bytes than float32 HR and no bicubic on the loader's CPU), and
:func:`batch_to_device` makes the pair on the training device with the same function: the same bytes as the CPU path
(``laren.imresize``'s docstring says why).

Training (:func:`make_train_loader`). The shards listed in the manifest are split explicitly over the G = world_size x
num_workers loader workers of the job (global worker g = rank * num_workers + worker id takes shards g, g+G, ...; with
fewer shards than workers, worker g reads shard g mod S and a warning says so). Each worker *resamples* its shards
(draws with replacement, seeded by (seed, epoch, g)) forever, as WebDataset's maintainers recommend for DDP: the
stream never runs dry, so every rank yields exactly ``batches_per_epoch`` batches and no rank waits on another in a
collective. Samples pass a shuffle buffer, are decoded, flipped (p = 0.5) and batched inside the worker.

Evaluation (:func:`make_eval_loader`). The first N = min(limit, num_samples) samples in manifest order are cut into
contiguous ranges, rank r taking [r*N/W, (r+1)*N/W): every sample exactly once across ranks, in the same order with
the same LR on every run (no randomness at all). The last batch may be short; ranks differ by at most one sample, so
a trainer that evaluates under DDP gathers results (or evaluates on rank 0) rather than pairing collectives per batch.

Bad samples (a truncated tar member, a broken or missing shard, an undecodable image, a wrong size, no image member)
are counted, logged with their ``shard/key`` and skipped; samples lost after a truncation are counted from the
manifest's per-shard count. When bad > max_bad_fraction x max(seen, this rank's share of the data set), the loader raises
:class:`BadDataError`. ``loader.stats()`` gives ``{"samples", "bad", "bad_keys"}`` for this rank (cumulative).

Loader processes start from a ``forkserver``, not by ``fork``: forking a process that runs threads (a Ray worker, CUDA,
boto3) can deadlock the child. The server is a clean single-threaded process that imports this module once, so a
worker starts in ~0.1 s where ``spawn`` pays Python + torch imports per worker (seconds); each worker takes the
environment of the loader that starts it (S3 endpoint and credentials come from the environment), not the server's.
Batches go to pinned memory when CUDA is available, so the copy to the GPU is asynchronous.
:func:`auto_loader_workers` sizes the worker count from the CPUs a training process holds.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import random
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from laren.data import pack as _pack
from laren.data import storage
from laren.imresize import imresize_uint8

log = logging.getLogger("laren.data")

__all__ = ["make_train_loader", "make_eval_loader", "BadDataError", "assign_shards", "decode_image", "lr_hr_pair",
           "batch_to_device", "auto_loader_workers"]

MAX_BAD_KEYS = 1000  # bad keys kept per loader (the count is always exact)
START_METHOD = "forkserver"  # loader worker processes (see the module docstring)
_UNIT = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # uint8 value -> [-1, 1], made once on the CPU


class BadDataError(RuntimeError):
    """Too many bad samples: the data set needs fixing (or the threshold raising)."""


# ------------------------------------------------------------------------------------------------ samples


def decode_image(data: Optional[bytes], hr_size: int) -> tuple[Optional[np.ndarray], str]:
    """Image bytes -> (uint8 (h, h, 3) array, "") or (None, reason)."""
    if data is None:
        return None, "no image member"
    try:
        im = _pack.open_image(data, _pack.SAMPLE_FORMATS, hr_size * hr_size)  # header only
        if im.size != (hr_size, hr_size):  # a wrong size is never decoded
            return None, f"wrong size {im.size[0]}x{im.size[1]} (expected {hr_size}x{hr_size})"
        im.load()
    except _pack.InputError as err:  # larger than HR: refused from the header
        return None, f"wrong size: {err} (expected {hr_size}x{hr_size})"
    except Exception as err:
        return None, f"undecodable image: {type(err).__name__}"
    return np.asarray(im.convert("RGB")), ""


def _shard_events(base_url: str, entry: dict, hr_size: int) -> Iterator[tuple[int, str, Optional[np.ndarray], str]]:
    """Every sample position of one shard: (n, "shard/key", image, "") for a good one, (n, "shard/key", None, reason)
    for n >= 1 bad ones (n > 1 only for samples lost after a truncation, counted from the manifest)."""
    name, expected = entry["name"], entry["count"]
    seen, last = 0, "start"
    try:
        stream = storage.open_read(storage.join(base_url, name))
    except Exception as err:
        yield expected, f"{name}/*", None, f"unreadable shard: {type(err).__name__}: {err}"
        return
    try:
        with stream:
            for key, files, reason in _pack.iter_tar_samples(stream):
                if seen >= expected:
                    break
                seen += 1
                last = key or last
                if files is None:
                    yield 1, f"{name}/{key}", None, reason
                    continue
                img, reason = decode_image(_pack.image_member(files), hr_size)
                yield 1, f"{name}/{key}", img, reason
    except Exception as err:  # a broken connection that the storage retries could not heal
        if seen < expected:
            seen += 1
            yield 1, f"{name}/after-{last}", None, f"read error: {type(err).__name__}: {err}"
    if seen < expected:
        yield expected - seen, f"{name}/after-{last}", None, f"{expected - seen} samples missing (shard ends early)"


def _to_unit(img: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 x/127.5 - 1 by table lookup: the same values on every device (CUDA divides by a Python scalar
    as a product with its reciprocal, which differs in the last bit for about half of the 256 values). On the CPU a
    numpy gather, ~3x faster than torch's indexing (which widens the indices to int64)."""
    if img.device.type == "cpu":
        return torch.from_numpy(_UNIT.numpy()[img.numpy()])
    return _unit_on(img.device)[img.int()]


@functools.lru_cache(maxsize=8)
def _unit_on(device: torch.device) -> torch.Tensor:
    return _UNIT.to(device)  # once per device: no host-to-device copy per batch


def lr_hr_pair(hr: torch.Tensor, lr_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 HR (B, 3, h, h) on any device -> (LR (B, 3, l, l), HR) float32 in [-1, 1] on that device; the same
    values on every device (the loader's CPU or the training GPU)."""
    lr = imresize_uint8(hr, lr_size / hr.shape[-1])  # (B, 3, l, l) uint8
    assert lr.shape[-1] == lr_size, (lr.shape, lr_size)
    return _to_unit(lr), _to_unit(hr)


def batch_to_device(batch: dict, device: torch.device, lr_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch -> (LR, HR) float32 on ``device``: copied as they are (non-blocking from pinned memory), or, for
    a batch of uint8 HR (``lr_on_device``), the uint8 copied and the pair made there."""
    if "hr_u8" in batch:
        return lr_hr_pair(batch["hr_u8"].to(device, non_blocking=True), lr_size)
    return batch["lr"].to(device, non_blocking=True), batch["hr"].to(device, non_blocking=True)


def _make_batch(imgs: list[np.ndarray], keys: list[str], lr_size: int, lr_on_device: bool = False) -> dict:
    hr = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # (B, 3, h, h) uint8
    b = {"key": [k.split("/", 1)[1] for k in keys], "shard": [k.split("/", 1)[0] for k in keys]}
    if lr_on_device:
        b["hr_u8"] = hr
    else:
        b["lr"], b["hr"] = lr_hr_pair(hr, lr_size)
    return b


def _bad_item(n: int, key: str, reason: str) -> dict:
    log.warning("bad sample %s: %s (skipped)", key, reason)
    return {"_stats": {"bad": n, "bad_keys": [key]}}


def auto_loader_workers(cpus: Optional[float] = None) -> int:
    """Loader processes for one training process: its CPUs (``cpus``: what Ray reserves for the worker,
    ``resources.cpus_per_worker``), capped by the CPUs this process may run on, minus one for the training process
    itself; at least 1."""
    n = len(os.sched_getaffinity(0))
    if cpus is not None:
        n = min(n, int(cpus))
    return max(1, n - 1)


def assign_shards(num_shards: int, worker: int, num_workers: int) -> list[int]:
    """Shard indices of global loader worker ``worker`` of ``num_workers``: disjoint when num_shards >= num_workers."""
    if num_shards >= num_workers:
        return list(range(worker, num_shards, num_workers))
    return [worker % num_shards]


# ------------------------------------------------------------------------------------------------ streams


class _TrainStream(IterableDataset):
    def __init__(self, url, shards, hr_size, lr_size, batch_size, rank, world_size, seed, shuffle_buffer, hflip,
                 lr_on_device=False):
        super().__init__()
        self.url, self.shards = url, shards
        self.hr_size, self.lr_size, self.batch_size, self.lr_on_device = hr_size, lr_size, batch_size, lr_on_device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.hflip = shuffle_buffer, hflip
        self.epoch = 0

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        g, G = self.rank * nw + wid, self.world_size * nw
        mine = [self.shards[i] for i in assign_shards(len(self.shards), g, G)]
        rng = random.Random(f"laren-train/{self.seed}/{self.epoch}/{g}")
        buf: list[tuple[str, np.ndarray]] = []
        imgs, keys = [], []
        while True:
            entry = mine[rng.randrange(len(mine))]  # resampled: with replacement, forever
            for n, key, img, reason in _shard_events(self.url, entry, self.hr_size):
                if img is None:
                    yield _bad_item(n, key, reason)
                    continue
                if self.hflip and rng.random() < 0.5:
                    img = img[:, ::-1]
                buf.append((key, img))
                if len(buf) < self.shuffle_buffer:
                    continue
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                key, img = buf.pop()
                keys.append(key)
                imgs.append(img)
                if len(imgs) == self.batch_size:
                    b = _make_batch(imgs, keys, self.lr_size, self.lr_on_device)
                    b["_stats"] = {"bad": 0, "bad_keys": []}
                    yield b
                    imgs, keys = [], []


class _Loader:
    """Iterates one pass (an epoch); keeps this rank's bad-sample counts; enforces max_bad_fraction."""

    def __init__(self, url: str, rank: int, expected: int, max_bad_fraction: float):
        self.url, self.rank, self.expected, self.max_bad_fraction = url, rank, expected, max_bad_fraction
        self._samples = 0
        self._bad = 0
        self._bad_keys: list[str] = []

    def stats(self) -> dict:
        """This rank's counts since creation: {"samples": good samples delivered, "bad": skipped, "bad_keys": [...]}."""
        return {"samples": self._samples, "bad": self._bad, "bad_keys": list(self._bad_keys)}

    def _account(self, item: dict) -> bool:
        """Fold an item's counts in; True when it carries a batch."""
        st = item.pop("_stats", None)
        if st:
            self._bad += st["bad"]
            room = MAX_BAD_KEYS - len(self._bad_keys)
            if room > 0:
                self._bad_keys.extend(st["bad_keys"][:room])
        if "key" in item:
            self._samples += len(item["key"])
        seen = self._samples + self._bad
        if self._bad > self.max_bad_fraction * max(seen, self.expected):
            raise BadDataError(
                f"{self.url}: {self._bad} bad samples out of {seen} read on rank {self.rank} "
                f"(over data.max_bad_fraction = {self.max_bad_fraction} of {max(seen, self.expected)}); first: "
                f"{', '.join(self._bad_keys[:5])}. Inspect with `laren data verify {self.url} --decode` and re-pack, "
                f"or raise data.max_bad_fraction."
            )
        return "key" in item


def _mp_context():
    ctx = multiprocessing.get_context(START_METHOD)
    if START_METHOD == "forkserver":  # no effect once the server runs
        ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


def _set_environ(env: dict, worker_id: int) -> None:
    """A loader worker's environment: its loader's, not the (older) forkserver's."""
    os.environ.clear()
    os.environ.update(env)


class TrainLoader(_Loader):
    """Endless (or ``batches_per_epoch`` long) training batches of one rank. Each ``iter()`` is a new epoch."""

    def __init__(self, stream: _TrainStream, num_workers: int, batches_per_epoch: Optional[int], expected: int,
                 max_bad_fraction: float, pin_memory: bool = False):
        super().__init__(stream.url, stream.rank, expected, max_bad_fraction)
        self.stream, self.num_workers, self.batches_per_epoch = stream, num_workers, batches_per_epoch
        self.pin_memory = pin_memory
        self.epoch = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("endless training loader: pass batches_per_epoch for a length")
        return self.batches_per_epoch

    def __iter__(self):
        self.stream.epoch = self.epoch  # workers copy the stream when the DataLoader iterator starts
        self.epoch += 1
        # A private generator: starting the iterator draws a base seed, which must not come from (and shift) the
        # training process's global torch RNG, or a resumed run would not repeat its random draws.
        dl = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                        prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(self.epoch), pin_memory=self.pin_memory,
                        multiprocessing_context=_mp_context() if self.num_workers else None,
                        worker_init_fn=functools.partial(_set_environ, dict(os.environ)) if self.num_workers else None)
        it = iter(dl)
        n = 0
        try:
            while self.batches_per_epoch is None or n < self.batches_per_epoch:
                item = next(it)
                if self._account(item):
                    n += 1
                    yield item
        finally:
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            del it


class EvalLoader(_Loader):
    """Deterministic evaluation batches of one rank (its contiguous range of the first ``limit`` samples)."""

    def __init__(self, url, shards, hr_size, lr_size, batch_size, rank, world_size, limit, max_bad_fraction):
        total = sum(s["count"] for s in shards)
        n = total if limit is None else min(int(limit), total)
        self.lo, self.hi = rank * n // world_size, (rank + 1) * n // world_size
        super().__init__(url, rank, self.hi - self.lo, max_bad_fraction)
        self.shards, self.hr_size, self.lr_size, self.batch_size = shards, hr_size, lr_size, batch_size

    def __len__(self) -> int:
        """Batches when no sample is bad."""
        return -(-(self.hi - self.lo) // self.batch_size)

    def __iter__(self):
        imgs, keys = [], []
        offset = 0  # global position of the shard's first sample
        for entry in self.shards:
            start, offset = offset, offset + entry["count"]
            if offset <= self.lo:
                continue
            if start >= self.hi:
                break
            pos = start
            for n, key, img, reason in _shard_events(self.url, entry, self.hr_size):
                take = min(pos + n, self.hi) - max(pos, self.lo)  # positions of this event inside [lo, hi)
                pos += n
                if take <= 0:
                    if pos >= self.hi:
                        break
                    continue
                if img is None:
                    self._account(_bad_item(take, key, reason))
                    continue
                imgs.append(img)
                keys.append(key)
                if len(imgs) == self.batch_size:
                    b = _make_batch(imgs, keys, self.lr_size)
                    self._account(b)
                    yield b
                    imgs, keys = [], []
        if imgs:
            b = _make_batch(imgs, keys, self.lr_size)
            self._account(b)
            yield b


# ------------------------------------------------------------------------------------------------ factories


def _open_dataset(url: str, hr_size: int, lr_size: int, batch_size: int, rank: int, world_size: int) -> list[dict]:
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside 0..world_size-1 ({world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (1 <= lr_size < hr_size) or hr_size % lr_size:
        raise ValueError(f"lr_size ({lr_size}) must divide hr_size ({hr_size}) and be smaller (scale 1/4 ... 1/64)")
    m = _pack.read_manifest(url)
    if m["resolution"] != hr_size:
        raise ValueError(f"{storage.join(url, _pack.MANIFEST)}: packed at {m['resolution']}x{m['resolution']}, but the job "
                         f"expects HR {hr_size}x{hr_size} (model.prior.resolution); re-pack with --resolution {hr_size}")
    shards = [s for s in m["shards"] if s["count"] > 0]
    if not shards:
        raise ValueError(f"{url}: the manifest lists no samples")
    return shards


def make_train_loader(url: str, hr_size: int, lr_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                      num_workers: int = 2, seed: int = 0, shuffle_buffer: int = 256, hflip: bool = True,
                      max_bad_fraction: float = 0.01, batches_per_epoch: Optional[int] = None,
                      lr_on_device: bool = False, pin_memory: Optional[bool] = None) -> TrainLoader:
    """Training batches of rank ``rank`` (see the module docstring). ``batch_size`` is per rank.

    Endless unless ``batches_per_epoch`` is given; then every ``iter()`` yields exactly that many batches on every rank.
    ``lr_on_device``: batches of uint8 HR (``hr_u8``) for :func:`batch_to_device`. ``pin_memory``: page-locked batches
    (None: when CUDA is available).
    """
    shards = _open_dataset(url, hr_size, lr_size, batch_size, rank, world_size)
    nw = max(0, int(num_workers))
    G = world_size * max(nw, 1)
    if len(shards) < G:
        log.warning("%s: %d shards for %d loader workers (%d ranks x %d): workers share shards; pack with a smaller "
                    "--shard-size-mb for disjoint streams", url, len(shards), G, world_size, max(nw, 1))
    mine = {i for w in range(max(nw, 1)) for i in assign_shards(len(shards), rank * max(nw, 1) + w, G)}
    expected = sum(shards[i]["count"] for i in mine)
    stream = _TrainStream(url, shards, hr_size, lr_size, batch_size, rank, world_size, seed,
                          max(1, int(shuffle_buffer)), hflip, lr_on_device)
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    return TrainLoader(stream, nw, batches_per_epoch, expected, max_bad_fraction, pin)


def make_eval_loader(url: str, hr_size: int, lr_size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                     limit: Optional[int] = None, max_bad_fraction: float = 0.01) -> EvalLoader:
    """Deterministic evaluation batches of rank ``rank``: its share of the first ``limit`` samples, each exactly once."""
    shards = _open_dataset(url, hr_size, lr_size, batch_size, rank, world_size)
    return EvalLoader(url, shards, hr_size, lr_size, batch_size, rank, world_size, limit, max_bad_fraction)
