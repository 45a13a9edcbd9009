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

Data position and resume. A worker's stream (shard draws, flip coins, buffer pops) depends only on its RNG, the
manifest's shard counts and which sample positions are bad, never on pixels. ``TrainLoader.position()`` is this rank's
position in the current pass, JSON-ready::

    {"epoch": pass, "layout": [world_size, loader workers (>= 1)],
     "items": [items (batches and bad-sample reports) taken from each loader worker],
     "at": [[shard visit, shard name, offset] of each worker: the next sample position it reads, or None],
     "bad": [[worker, shard visit, offset, n], ...]}   # the bad samples met this pass

(worker = the stream's index on this rank; visit v = its (v+1)-th shard draw; offsets count tar samples). On resume
(``seek``), each worker replays its ``items`` items at index level (draws, coins and pops, the saved bad positions
marked bad, nothing read), checks that it reaches ``at``, reads and decodes only the samples in its buffer and partial
batch, and goes on reading its shard from the offset: the batches are exactly those of the uninterrupted pass, and at
most shuffle_buffer + batch_size images are decoded before the first. The resumed DataLoader starts its round robin
at the worker that was next. A position of another layout (world size or loader workers changed) cannot be
continued exactly: the pass goes on at the saved batch count with fresh streams. Without a position (checkpoints of
older versions), the pass is replayed and the consumed batches decoded and dropped. Bad-sample counts
(``stats()``) are those of this loader object: a resumed rank does not count the bad samples met before the cut again.

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
import json
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
from laren.data.shards import SAMPLE_FORMATS, image_member, iter_tar_samples
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
        im = _pack.open_image(data, SAMPLE_FORMATS, hr_size * hr_size)  # header only
        if im.size != (hr_size, hr_size):  # a wrong size is never decoded
            return None, f"wrong size {im.size[0]}x{im.size[1]} (expected {hr_size}x{hr_size})"
        im.load()
    except _pack.InputError as err:  # larger than HR: refused from the header
        return None, f"wrong size: {err} (expected {hr_size}x{hr_size})"
    except Exception as err:
        return None, f"undecodable image: {type(err).__name__}"
    return np.asarray(im.convert("RGB")), ""


def _shard_events(base_url: str, entry: dict, hr_size: int,
                  start: int = 0) -> Iterator[tuple[int, str, Optional[np.ndarray], str]]:
    """Every sample position of one shard from ``start`` on: (n, "shard/key", image, "") for a good one,
    (n, "shard/key", None, reason) for n >= 1 bad ones (n > 1 only for samples lost after a truncation, counted from the
    manifest). Samples before ``start`` are read through, not decoded."""
    name, expected = entry["name"], entry["count"]
    seen, last = 0, "start"
    if start >= expected:
        return
    try:
        stream = storage.open_read(storage.join(base_url, name))
    except Exception as err:
        yield expected - start, f"{name}/*", None, f"unreadable shard: {type(err).__name__}: {err}"
        return
    try:
        with stream:
            for key, files, reason in iter_tar_samples(stream):
                if seen >= expected:
                    break
                seen += 1
                last = key or last
                if seen <= start:
                    continue
                if files is None:
                    yield 1, f"{name}/{key}", None, reason
                    continue
                img, reason = decode_image(image_member(files), hr_size)
                yield 1, f"{name}/{key}", img, reason
    except Exception as err:  # a broken connection that the storage retries could not heal
        if seen < expected:
            seen += 1
            if seen > start:
                yield 1, f"{name}/after-{last}", None, f"read error: {type(err).__name__}: {err}"
    if max(seen, start) < expected:
        lost = expected - max(seen, start)
        yield lost, f"{name}/after-{last}", None, f"{lost} samples missing (shard ends early)"


def _fetch_samples(base_url: str, name: str, positions: set[int], hr_size: int) -> dict[int, tuple[str, np.ndarray]]:
    """The decoded images at ``positions`` of one shard (others are read through, not decoded): {position: (key, img)}.
    A sample that no longer decodes means the shard changed since the position was saved: an error."""
    out: dict[int, tuple[str, np.ndarray]] = {}
    with storage.open_read(storage.join(base_url, name)) as stream:
        for pos, (key, files, reason) in enumerate(iter_tar_samples(stream)):
            if pos in positions:
                img, reason = decode_image(image_member(files), hr_size) if files is not None else (None, reason)
                if img is None:
                    raise BadDataError(f"{name}/{key}: {reason}; it was good when the data position was saved (the "
                                       f"shard changed?): resume from a checkpoint of this data set")
                out[pos] = (f"{name}/{key}", img)
                if len(out) == len(positions):
                    break
    if len(out) < len(positions):
        raise BadDataError(f"{name}: samples {sorted(positions - set(out))[:5]} missing; they were read when the data "
                           f"position was saved (the shard changed?): resume from a checkpoint of this data set")
    return out


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


class _Walk:
    """One loader worker's stream, as positions: its RNG, shard visit (0 for its first draw; index ``shard`` into its
    shards), offset in that shard, shuffle buffer and partial batch, each sample held as (key, payload, flip).

    :meth:`run` advances it over the sample events that ``events(visit, entry, start)`` gives for each shard from
    ``start`` on. The order of draws, flips and pops depends only on the RNG and on which positions are bad, never on
    the payload, so the same walk over decoded images (training) or over (shard, position) references (a resume's
    seek) takes the same path. Between two items it yields, the walk's fields are exactly its state.
    """

    def __init__(self, rng: random.Random, mine: list[dict], shuffle_buffer: int, batch_size: int, hflip: bool):
        self.rng, self.mine = rng, mine
        self.shuffle_buffer, self.batch_size, self.hflip = shuffle_buffer, batch_size, hflip
        self.visit, self.shard, self.offset = -1, None, 0
        self.buf: list[tuple] = []
        self.pending: list[tuple] = []

    def run(self, events) -> Iterator[tuple]:
        """Yields ("bad", (n, key, reason, offset)) and ("batch", [(key, payload, flip)] * batch_size), forever."""
        while True:
            if self.shard is None:
                self.shard = self.rng.randrange(len(self.mine))  # resampled: with replacement, forever
                self.visit, self.offset = self.visit + 1, 0
            for n, key, x, reason in events(self.visit, self.mine[self.shard], self.offset):
                at, self.offset = self.offset, self.offset + n
                if x is None:
                    yield "bad", (n, key, reason, at)
                    continue
                self.buf.append((key, x, self.hflip and self.rng.random() < 0.5))
                if len(self.buf) < self.shuffle_buffer:
                    continue
                j = self.rng.randrange(len(self.buf))
                self.buf[j], self.buf[-1] = self.buf[-1], self.buf[j]
                self.pending.append(self.buf.pop())
                if len(self.pending) == self.batch_size:
                    out, self.pending = self.pending, []
                    yield "batch", out
            self.shard = None

    def where(self) -> Optional[list]:
        """[visit, shard name, offset]: the next sample position to read (None before the first draw)."""
        return None if self.shard is None else [self.visit, self.mine[self.shard]["name"], self.offset]


class _TrainStream(IterableDataset):
    def __init__(self, url, shards, hr_size, lr_size, batch_size, rank, world_size, seed, shuffle_buffer, hflip,
                 lr_on_device=False):
        super().__init__()
        self.url, self.shards = url, shards
        self.hr_size, self.lr_size, self.batch_size, self.lr_on_device = hr_size, lr_size, batch_size, lr_on_device
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.hflip = shuffle_buffer, hflip
        self.epoch = 0
        self.resume: Optional[dict] = None  # this rank's data position in the pass (TrainLoader.position())

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # A resumed pass starts the DataLoader's round robin at worker 0; the uninterrupted one was at item k mod nw.
        w = (wid + (sum(self.resume["items"]) if self.resume else 0)) % nw
        g, G = self.rank * nw + w, self.world_size * nw
        mine = [self.shards[i] for i in assign_shards(len(self.shards), g, G)]
        walk = _Walk(random.Random(f"laren-train/{self.seed}/{self.epoch}/{g}"), mine, self.shuffle_buffer,
                     self.batch_size, self.hflip)
        if self.resume:
            self._seek(walk, w)
        for kind, x in walk.run(lambda visit, entry, start: _shard_events(self.url, entry, self.hr_size, start)):
            if kind == "bad":
                n, key, reason, at = x
                item = _bad_item(n, key, reason)
                item["_pos"] = {"w": w, "at": walk.where(), "bad": [walk.visit, at, n]}
            else:
                item = _make_batch([img[:, ::-1] if flip else img for _, img, flip in x], [k for k, _, _ in x],
                                   self.lr_size, self.lr_on_device)
                item["_stats"] = {"bad": 0, "bad_keys": []}
                item["_pos"] = {"w": w, "at": walk.where()}
            yield item

    def _seek(self, walk: _Walk, w: int) -> None:
        """Bring ``walk`` (worker ``w``'s, fresh) to the saved position: replay its ``items`` items over sample
        references (nothing read, the saved bad positions marked bad), then decode only its buffer and partial batch."""
        target = self.resume["items"][w]
        bad = {(v, o): n for ww, v, o, n in self.resume["bad"] if ww == w}

        def refs(visit, entry, start):
            pos = start
            while pos < entry["count"]:
                n = bad.get((visit, pos))
                yield (n, "", None, "") if n else (1, "", (entry["name"], pos), "")
                pos += n or 1

        if target:
            for i, _ in enumerate(walk.run(refs), 1):
                if i == target:
                    break
        if walk.where() != self.resume["at"][w]:
            raise RuntimeError(f"data position of loader worker {w} does not replay: at {walk.where()} after "
                               f"{target} items, saved {self.resume['at'][w]}")
        wanted: dict[str, set[int]] = {}
        for _, (name, pos), _ in walk.buf + walk.pending:
            wanted.setdefault(name, set()).add(pos)
        got = {(name, pos): v for name, ps in wanted.items()
               for pos, v in _fetch_samples(self.url, name, ps, self.hr_size).items()}
        walk.buf = [(*got[ref], flip) for _, ref, flip in walk.buf]
        walk.pending = [(*got[ref], flip) for _, ref, flip in walk.pending]


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
    """Endless (or ``batches_per_epoch`` long) training batches of one rank. Each ``iter()`` is a new epoch.

    :meth:`position` is this rank's data position in the current pass (JSON-ready); :meth:`seek` makes the next pass
    start from a saved one (see the module docstring).
    """

    def __init__(self, stream: _TrainStream, num_workers: int, batches_per_epoch: Optional[int], expected: int,
                 max_bad_fraction: float, pin_memory: bool = False):
        super().__init__(stream.url, stream.rank, expected, max_bad_fraction)
        self.stream, self.num_workers, self.batches_per_epoch = stream, num_workers, batches_per_epoch
        self.pin_memory = pin_memory
        self.epoch = 0
        self._start: tuple[int, Optional[list]] = (0, None)
        self._pos = self._fresh_position()

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("endless training loader: pass batches_per_epoch for a length")
        return self.batches_per_epoch

    def _fresh_position(self) -> dict:
        nw = max(self.num_workers, 1)
        return {"epoch": self.epoch, "layout": [self.stream.world_size, nw], "items": [0] * nw, "at": [None] * nw,
                "bad": []}

    def position(self) -> dict:
        """This rank's data position in the current pass: {"epoch", "layout": [world size, loader workers], "items":
        items taken from each worker, "at": each worker's [shard visit, shard name, offset], "bad": [[worker, visit,
        offset, n], ...] the bad samples met}."""
        return json.loads(json.dumps(self._pos))

    def seek(self, batch: int, positions: Optional[list[dict]]) -> None:
        """Start the next ``iter()`` (pass ``self.epoch``) after its first ``batch`` batches, given the ranks' saved
        ``positions`` (``position()`` of every rank). Without positions (a checkpoint from before they were saved),
        the batches are decoded and dropped; with positions of another layout (world size, loader workers), the
        streams start afresh for the rest of the pass."""
        self._start = (batch, positions)

    def _account(self, item: dict) -> bool:
        pos = item.pop("_pos", None)
        if pos is not None:
            w = pos["w"]
            self._pos["items"][w] += 1
            self._pos["at"][w] = pos["at"]
            if "bad" in pos:
                self._pos["bad"].append([w, *pos["bad"]])
        return super()._account(item)

    def __iter__(self):
        start, positions = self._start
        self._start = (0, None)
        self._pos = self._fresh_position()
        mine = positions[self.rank] if positions and len(positions) == self.stream.world_size else None
        exact = start > 0 and isinstance(mine, dict) and [mine.get("epoch"), mine.get("layout")] == [
            self.epoch, self._pos["layout"]]
        if exact:
            _check_position(mine, self.rank)
            self._pos = json.loads(json.dumps(mine))
        elif start > 0 and positions:
            saved = positions[0].get("layout") if isinstance(positions[0], dict) else None
            log.warning("data position saved for another layout ([ranks, loader workers] %s, now %s): pass %d "
                        "continues at batch %d with fresh streams", saved, self._pos["layout"], self.epoch, start)
        skip = start if start > 0 and not positions else 0  # no saved position: decode and drop (old checkpoints)
        self.stream.epoch = self.epoch  # workers copy the stream when the DataLoader iterator starts
        self.stream.resume = mine if exact else None  # (not self._pos, which this process updates)
        self.epoch += 1
        n = start  # batches of this pass already consumed
        if self.batches_per_epoch is not None and n >= self.batches_per_epoch:
            return
        # A private generator: starting the iterator draws a base seed, which must not come from (and shift) the
        # training process's global torch RNG, or a resumed run would not repeat its random draws.
        dl = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                        prefetch_factor=2 if self.num_workers else None, persistent_workers=False,
                        generator=torch.Generator().manual_seed(self.epoch), pin_memory=self.pin_memory,
                        multiprocessing_context=_mp_context() if self.num_workers else None,
                        worker_init_fn=functools.partial(_set_environ, dict(os.environ)) if self.num_workers else None)
        it = iter(dl)
        try:
            while self.batches_per_epoch is None or n < self.batches_per_epoch:
                item = next(it)
                if self._account(item):
                    if skip:
                        skip -= 1
                        continue
                    n += 1
                    yield item
        finally:
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            del it


def _counts(xs, n: int) -> bool:
    return isinstance(xs, list) and len(xs) == n and all(type(x) is int and x >= 0 for x in xs)


def _check_position(pos: dict, rank: int) -> None:
    """A saved position has the shape :meth:`TrainLoader.position` gives, or a clear error."""
    nw = pos["layout"][1]
    at, bad = pos.get("at"), pos.get("bad")
    ok = (_counts(pos.get("items"), nw) and isinstance(at, list) and len(at) == nw and isinstance(bad, list)
          and all(a is None or (isinstance(a, list) and len(a) == 3 and _counts(a[::2], 2) and isinstance(a[1], str))
                  for a in at)
          and all(_counts(b, 4) and b[0] < nw and b[3] > 0 for b in bad))
    if not ok:
        raise ValueError(f"checkpoint data position of rank {rank} (state.json data_ranks[{rank}]) is malformed: "
                         f"expected {{'items': [{nw} counts], 'at': [{nw} x [visit, shard, offset] or null], 'bad': "
                         f"[[worker, visit, offset, n], ...]}}")


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
