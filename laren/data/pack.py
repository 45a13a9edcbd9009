"""Raw images -> WebDataset tar shards + ``manifest.json``, local or on S3; and their verification.

Sources (read-only, local): an image folder (recursive; .png .jpg .jpeg .webp .bmp .tif .tiff, sorted by relative
path), a .zip of images (sorted by member name), or an LSUN lmdb directory (``data.mdb``; cursor order, as the LSUN
exports and StyleGAN's ``prepare_data`` read them).

Each image is turned upright (EXIF orientation), becomes 8-bit RGB (16-bit and [0, 1] float samples scaled, palette and
alpha images composited on white), is center-cropped to its largest square (side = min(W, H)) and, when that side
differs from R, resized to R x R with PIL's Lanczos filter (antialiased; the resize StyleGAN2's ``prepare_data`` uses).
Images with min(W, H) < R are rejected (never upsampled), as are undecodable files, files that are not regular files
(FIFOs, devices, links to them) or larger than :data:`MAX_INPUT_BYTES`, images of more than :func:`max_pixels` pixels
(checked from the header, before decoding) and float images outside [0, 1]; all are listed in the manifest with reasons.
Decoding happens in worker processes: one that dies (killed for memory, a crash in a decoder) stops the pack with an
error naming the inputs it held, and re-running the command resumes after the last finished shard.

Shard layout: ``DEST/shard-000000.tar`` ..., each member pair ``<key>.<png|jpg>`` + ``<key>.json`` (source path,
input index, original size), key = the 8-digit input index. Tar headers are fixed (mtime 0, uid 0, mode 0644) so a
shard's bytes and sha256 depend only on its images. A shard closes once it reaches ``shard_size_mb``.

``DEST/manifest.json``::

    {"format_version": 1, "name", "resolution", "format", "quality", "shard_size_mb", "source", "source_kind",
     "resize", "num_inputs", "inputs_done", "complete", "num_samples",
     "shards": [{"name", "count", "bytes", "sha256", "first_input", "end_input"}],
     "rejected": [{"input", "index", "reason"}]}

Resumable and safe to interrupt: shards are written to a temp file and appear at their final name whole (rename /
single S3 object); the manifest is rewritten after each finished shard and lists only finished shards. A re-run with the
same settings keeps the listed shards whose size matches and continues at ``inputs_done``; a re-run with other
settings (a corrected command, an input removed) replaces the output of a pack that did not finish, or finished with
every input rejected (its manifest and ``shard-NNNNNN.tar`` files only), and refuses to touch a finished data set.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing as mp
import os
import re
import stat
import tarfile
import tempfile
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import lmdb
import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from laren.data import storage
from laren.data.shards import SAMPLE_FORMATS, HashingReader, image_member, iter_tar_samples

log = logging.getLogger("laren.data")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RESIZE_DOC = "RGB; center crop to the largest square; PIL Lanczos resize to R x R when the side differs; min(W,H) < R rejected"
INPUT_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF")  # decoders PIL may use on inputs (never EPS, PDF, ...)
MAX_INPUT_BYTES = 256 << 20  # one input file
IMAGE_TIMEOUT_S = 300.0  # one image in a worker
SHARD_NAME = re.compile(r"shard-\d{6}\.tar")


def max_pixels(resolution: int) -> int:
    """Largest input (W x H) decoded for target side R: 256 R^2, at least 2^24 and at most 2^27 pixels."""
    return min(max(256 * resolution * resolution, 1 << 24), 1 << 27)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


# ------------------------------------------------------------------------------------------------ sources


def detect_source(src: str) -> str:
    """'folder' | 'zip' | 'lmdb' for a local source; FileNotFoundError / ValueError with what to pass otherwise."""
    if storage.is_s3(src):
        raise ValueError(f"{src}: SRC must be a local folder, .zip or LSUN lmdb directory (download it first)")
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src}: no such folder or file")
    if os.path.isdir(src):
        return "lmdb" if os.path.isfile(os.path.join(src, "data.mdb")) else "folder"
    if zipfile.is_zipfile(src):
        return "zip"
    raise ValueError(f"{src}: not a folder, a .zip or an lmdb directory (with data.mdb)")


def list_inputs(src: str, kind: str) -> list[str]:
    """Stable, sorted input ids: relative paths (folder), member names (zip), keys as str (lmdb, cursor order)."""
    if kind == "folder":
        out = []
        for d, _, files in os.walk(src):
            for f in files:
                if f.lower().endswith(IMAGE_EXTS) and not f.startswith("."):
                    out.append(os.path.relpath(os.path.join(d, f), src))
        return sorted(out)
    if kind == "zip":
        with zipfile.ZipFile(src) as z:
            return sorted(n for n in z.namelist() if n.lower().endswith(IMAGE_EXTS) and not n.endswith("/"))
    if kind == "lmdb":
        env = lmdb.open(src, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
        try:
            with env.begin(write=False) as txn:
                return [k.decode("latin-1") for k in txn.cursor().iternext(keys=True, values=False)]
        finally:
            env.close()
    raise ValueError(f"unknown source kind {kind}")


_reader_state: dict[str, Any] = {}  # per process: the open zip / lmdb handle


class InputError(ValueError):
    """An input that is not read at all (not a regular file, too large); the reason goes to the manifest."""


def _read_regular_file(path: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """The bytes of a regular file (symlinks followed); FIFOs, devices and sockets are refused without blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"not a regular file ({_file_kind(st.st_mode)})")
        if st.st_size > limit:
            raise InputError(f"file of {st.st_size} bytes is larger than the {limit}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise InputError(f"file grew past the {limit}-byte limit while read")
    return data


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return what
    return "not a plain file"


def _read_input(src: str, kind: str, item: str) -> bytes:
    if kind == "folder":
        return _read_regular_file(os.path.join(src, item))
    key = (os.getpid(), src)
    h = _reader_state.get(key)
    if kind == "zip":
        if h is None:
            h = _reader_state[key] = zipfile.ZipFile(src)
        info = h.getinfo(item)
        if info.file_size > MAX_INPUT_BYTES:
            raise InputError(f"zip member of {info.file_size} bytes is larger than the {MAX_INPUT_BYTES}-byte limit")
        return h.read(info)
    if kind == "lmdb":
        if h is None:
            h = _reader_state[key] = lmdb.open(src, readonly=True, lock=False, readahead=False, meminit=False,
                                               max_readers=64)
        with h.begin(write=False, buffers=True) as txn:
            v = txn.get(item.encode("latin-1"))
            if v is None:
                raise KeyError(f"key {item!r} missing from lmdb")
            if len(v) > MAX_INPUT_BYTES:
                raise InputError(f"lmdb value of {len(v)} bytes is larger than the {MAX_INPUT_BYTES}-byte limit")
            return bytes(v)
    raise ValueError(kind)


def open_image(data: bytes, formats: tuple[str, ...], limit_pixels: int) -> Image.Image:
    """Open (header only) with the given decoders; refuse more than ``limit_pixels`` before any pixel is decoded."""
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: the limit below is the one that counts
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as err:  # beyond PIL's hard limit, checked by PIL from the header
        raise InputError(f"image has more than the {limit_pixels} pixels allowed ({err})") from None
    w, h = img.size
    if w * h > limit_pixels:
        raise InputError(f"{w}x{h} image has more than the {limit_pixels} pixels allowed")
    return img


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB: 16-bit samples scaled (not clipped), float samples in [0, 1] scaled by 255 (others
    refused), palette / alpha images composited on white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise InputError(f"{mode} image with samples outside 0..65535")
        return Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            raise InputError("float image with samples outside [0, 1] (its value range is unknown)")
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def prepare_image(data: bytes, resolution: int) -> tuple[Optional[Image.Image], str, tuple[int, int]]:
    """Decode (upright, 8-bit RGB), center-crop square, resize to R (Lanczos). Returns (image or None, reject reason,
    original (W, H) as stored)."""
    w = h = 0
    try:
        img = open_image(data, INPUT_FORMATS, max_pixels(resolution))
        w, h = img.size
        img.load()
        img = to_rgb8(ImageOps.exif_transpose(img))
    except InputError as err:
        return None, f"refused: {err}", (w, h)
    except Exception as err:
        msg = "not a recognised image format" if isinstance(err, Image.UnidentifiedImageError) else str(err)
        return None, f"undecodable: {type(err).__name__}: {msg}", (w, h)
    uw, uh = img.size  # upright
    if min(uw, uh) < resolution:
        return None, f"too small: {uw}x{uh} < {resolution}x{resolution}", (w, h)
    side = min(uw, uh)
    left, top = (uw - side) // 2, (uh - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return img, "", (w, h)


def encode_image(img: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:  # 4:4:4 chroma: 4:2:0 would blur colour edges of the HR targets
        img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
    return buf.getvalue()


def _process(job: tuple) -> "Sample":
    index, src, kind, item, resolution, fmt, quality = job
    meta = {"source": item, "index": index, "orig_size": [0, 0]}
    try:
        data = _read_input(src, kind, item)
    except InputError as err:
        return Sample(index, None, meta, f"refused: {err}")
    except Exception as err:
        return Sample(index, None, meta, f"unreadable: {type(err).__name__}: {err}")
    img, reason, orig = prepare_image(data, resolution)
    meta["orig_size"] = list(orig)
    if img is None:
        return Sample(index, None, meta, reason)
    return Sample(index, encode_image(img, fmt, quality), meta)


# ------------------------------------------------------------------------------------------------ manifest


def manifest_url(dest: str) -> str:
    return storage.join(dest, MANIFEST)


def read_manifest(url: str, require_complete: bool = True) -> dict:
    """The manifest of dataset ``url``; errors say which file and what to do."""
    murl = manifest_url(url)
    try:
        m = json.loads(storage.read_bytes(murl))
    except FileNotFoundError:
        raise FileNotFoundError(f"{murl}: no manifest; pack the data set first (`laren data pack SRC {url} ...`)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{murl}: not valid JSON ({err}); re-run `laren data pack` to rewrite it") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{murl}: format_version {m.get('format_version')!r}, expected {FORMAT_VERSION}; re-pack the data set")
    if not isinstance(m.get("shards"), list) or not isinstance(m.get("rejected", []), list):
        raise ValueError(f"{murl}: malformed manifest (no shard list); re-pack the data set")
    for s in m["shards"]:
        if not (isinstance(s, dict) and isinstance(s.get("name"), str) and SHARD_NAME.fullmatch(s["name"])
                and all(type(s.get(k)) is int and s[k] >= 0 for k in ("count", "bytes"))):
            raise ValueError(f"{murl}: malformed shard entry {str(s)[:200]} (names must be shard-NNNNNN.tar inside "
                             "the data set, counts and sizes non-negative integers); re-pack the data set")
    if require_complete and not m.get("complete"):
        raise ValueError(f"{murl}: packing is incomplete ({m.get('inputs_done')} of {m.get('num_inputs')} inputs); "
                         f"re-run the same `laren data pack` command to finish it")
    return m


def _write_manifest(dest: str, m: dict) -> None:
    m["num_samples"] = sum(s["count"] for s in m["shards"])
    storage.write_bytes(manifest_url(dest), (json.dumps(m, indent=1) + "\n").encode())


# ------------------------------------------------------------------------------------------------ pack


@dataclass
class PackResult:
    manifest: dict
    shards_written: int = 0
    shards_kept: int = 0
    rejected_now: list = field(default_factory=list)


def _tarinfo(name: str, n: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = n, 0, 0o644, 0, 0, "", ""
    return ti


class _ShardWriter:
    """One shard being written to a local temp file; ``finish`` publishes it whole under its final name."""

    def __init__(self, dest: str, index: int, first_input: int, tmpdir: str):
        self.dest, self.index, self.first_input = dest, index, first_input
        fd, self.tmp = tempfile.mkstemp(prefix=f".{shard_name(index)}.", suffix=".part", dir=tmpdir)
        self.fobj = os.fdopen(fd, "wb")
        self.tar = tarfile.open(fileobj=self.fobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.count = 0

    def add(self, key: str, ext: str, image: bytes, meta: dict, extra: Optional[dict[str, bytes]] = None) -> None:
        """``<key>.<ext>`` (the image), ``<key>.json`` (meta), then ``<key>.<name>`` for each extra member."""
        js = json.dumps(meta, sort_keys=True).encode()
        for name, data in ((ext, image), ("json", js), *sorted((extra or {}).items())):
            self.tar.addfile(_tarinfo(f"{key}.{name}", len(data)), io.BytesIO(data))
        self.count += 1

    def nbytes(self) -> int:
        return self.fobj.tell()

    def finish(self, end_input: int) -> dict:
        self.tar.close()
        self.fobj.close()
        entry = {"name": shard_name(self.index), "count": self.count, "bytes": os.path.getsize(self.tmp),
                 "sha256": storage.sha256_file(self.tmp), "first_input": self.first_input, "end_input": end_input}
        final = storage.join(self.dest, entry["name"])
        try:
            if storage.is_s3(final):
                storage.upload_file(self.tmp, final)  # one object, appears whole (multipart when large)
            else:
                with storage.atomic_local_file(storage.local_path(final)) as out:
                    os.replace(self.tmp, out)  # same folder: a rename, then the one atomic publish
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return entry

    def abort(self) -> None:
        try:
            self.tar.close()
            self.fobj.close()
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


@dataclass
class Sample:
    """One input's outcome: the encoded image (None: rejected for ``reason``), its ``<key>.json`` meta (``source``
    names the input) and extra members ``{ext: bytes}`` stored beside it (e.g. ``factors.json``)."""

    index: int
    payload: Optional[bytes]
    meta: dict
    reason: str = ""
    extra: dict = field(default_factory=dict)


def check_settings(name: str, resolution: int, fmt: str, quality: int, shard_size_mb: float) -> None:
    if fmt not in ("png", "jpg"):
        raise ValueError(f"--format must be png or jpg, got {fmt!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"--quality must be in 1..100, got {quality}")
    if resolution < 4:
        raise ValueError(f"--resolution must be >= 4, got {resolution}")
    if shard_size_mb <= 0:
        raise ValueError(f"--shard-size-mb must be > 0, got {shard_size_mb}")
    if "." in name or "/" in name or not name:
        raise ValueError(f"--name must be a non-empty name without '.' or '/', got {name!r}")


def pack(src: str, dest: str, name: str, resolution: int, fmt: str = "png", quality: int = 95,
         shard_size_mb: float = 512.0, workers: int = 0, progress: bool = True,
         on_shard: Optional[Callable[[dict], None]] = None) -> PackResult:
    """Pack ``src`` into shards + manifest at ``dest`` (local folder or s3://bucket/prefix). See the module docstring.

    workers: processes decoding / resizing / encoding (0 or 1: in this process). ``on_shard`` is called with each
    finished shard's manifest entry (after the manifest lists it).
    """
    check_settings(name, resolution, fmt, quality, shard_size_mb)
    kind = detect_source(src)
    items = list_inputs(src, kind)
    if not items:
        raise ValueError(f"{src}: no images found (looked for {', '.join(IMAGE_EXTS)})")
    settings = {"name": name, "resolution": resolution, "format": fmt, "quality": quality if fmt == "jpg" else None,
                "shard_size_mb": shard_size_mb, "source": os.path.abspath(src), "source_kind": kind,
                "num_inputs": len(items)}
    def jobs(start: int) -> Iterator[tuple]:
        return ((i, src, kind, items[i], resolution, fmt, quality) for i in range(start, len(items)))

    result = write_samples(dest, settings, jobs, _process, workers, progress, on_shard)
    if result.manifest["num_samples"] == 0:
        raise ValueError(f"{src}: every input was rejected (see {manifest_url(dest)}, 'rejected'); "
                         f"is --resolution {resolution} larger than the images?")
    return result


def write_samples(dest: str, settings: dict, jobs: Callable[[int], Iterator], process: Callable[[Any], Sample],
                  workers: int = 0, progress: bool = True, on_shard: Optional[Callable[[dict], None]] = None) -> PackResult:
    """The shard writer behind every data set: ``process`` (in ``workers`` processes) turns each job of ``jobs(start)``
    (inputs ``start`` .. ``settings["num_inputs"]``) into a :class:`Sample`, written in input order to shards + manifest
    at ``dest``; resumable (``start`` is where a previous run with the same ``settings`` stopped)."""
    storage.ensure_local_dir(dest)
    if not storage.is_s3(dest):  # temp shards of a killed run
        for f in os.listdir(storage.local_path(dest)):
            if f.startswith(".shard-") and f.endswith(".part"):
                os.unlink(os.path.join(storage.local_path(dest), f))

    m = _resume_state(dest, settings)
    result = PackResult(manifest=m, shards_kept=len(m["shards"]))
    if m["complete"]:
        log.info("%s: already complete (%d shards, %d samples)", dest, len(m["shards"]), m["num_samples"])
        return result

    total = settings["num_inputs"]
    limit = int(settings["shard_size_mb"] * 1024 * 1024)
    start = m["inputs_done"]
    tmpdir = storage.local_path(dest) if not storage.is_s3(dest) else None
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) if workers and workers > 1 else None
    results: Iterator = _ordered_results(pool, process, jobs(start), 4 * workers) if pool else map(process, jobs(start))

    bar = tqdm(total=total, initial=start, unit="img", desc=f"pack {settings['name']}", disable=not progress)
    writer: Optional[_ShardWriter] = None
    pending_rejected: list[dict] = []
    ext = "jpg" if settings["format"] == "jpg" else "png"
    try:
        for sample in results:
            index = sample.index
            bar.update(1)
            if sample.payload is None:
                rej = {"input": sample.meta.get("source"), "index": index, "reason": sample.reason}
                pending_rejected.append(rej)
                result.rejected_now.append(rej)
                log.warning("rejected %s: %s", rej["input"], sample.reason)
                continue
            if writer is None:
                writer = _ShardWriter(dest, len(m["shards"]), index, tmpdir or tempfile.gettempdir())
            writer.add(f"{index:08d}", ext, sample.payload, sample.meta, sample.extra)
            if writer.nbytes() >= limit:
                _close_shard(dest, m, writer, index + 1, pending_rejected, result, on_shard)
                writer = None
        if writer is not None:
            _close_shard(dest, m, writer, total, pending_rejected, result, on_shard)
            writer = None
        m["rejected"].extend(pending_rejected)
        m["inputs_done"] = total
        m["complete"] = True
        _write_manifest(dest, m)
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
        if pool is not None:
            _stop_pool(pool)
    return result


class WorkerDiedError(ValueError):
    """A pack worker process died or hung; nothing of its inputs was written, finished shards are kept."""


def _ordered_results(pool: ProcessPoolExecutor, process: Callable[[Any], "Sample"], jobs: Iterator[tuple],
                     window: int) -> Iterator:
    """``process`` over ``jobs`` in the pool, in order, at most ``window`` in flight. A worker that dies
    (BrokenProcessPool) or one input that takes longer than IMAGE_TIMEOUT_S ends the pack with an error naming the
    inputs in flight (a job is ``(index, ...)``; its input is named by its last path-like field, else by its index)."""
    inflight: collections.deque = collections.deque()
    jobs = iter(jobs)
    current = None
    try:
        while True:
            while len(inflight) < window:
                job = next(jobs, None)
                if job is None:
                    break
                inflight.append((job, pool.submit(process, job)))
            if not inflight:
                return
            current, fut = inflight.popleft()
            yield fut.result(timeout=IMAGE_TIMEOUT_S)
            current = None
    except (BrokenProcessPool, FutureTimeout) as err:
        held = [_job_name(j) for j in ([current] if current is not None else []) + [j for j, _ in inflight]]
        what = "a worker process died (killed for memory, or crashed in a decoder)" \
            if isinstance(err, BrokenProcessPool) else f"decoding took longer than {IMAGE_TIMEOUT_S:.0f} s"
        raise WorkerDiedError(f"pack stopped: {what} while processing one of {len(held)} inputs starting at "
                              f"{held[0] if held else '?'!r} (also {held[1:4]}); finished shards are kept: remove or "
                              "fix the input and re-run the same command to resume") from None


def _job_name(job: tuple) -> str:
    return next((x for x in reversed(job[1:]) if isinstance(x, str) and ("/" in x or "." in x)), f"input #{job[0]}")


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop the workers now (a hung decoder included); never waits on them."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


def _close_shard(dest, m, writer, end_input, pending_rejected, result, on_shard) -> None:
    entry = writer.finish(end_input)
    m["shards"].append(entry)
    m["rejected"].extend(pending_rejected)
    pending_rejected.clear()
    m["inputs_done"] = end_input
    _write_manifest(dest, m)
    result.shards_written += 1
    if on_shard:
        on_shard(entry)


def _resume_state(dest: str, settings: dict) -> dict:
    """The manifest to continue from: the existing one (same settings, shards checked) or a fresh one."""
    fresh = {"format_version": FORMAT_VERSION, "resize": RESIZE_DOC, **settings, "inputs_done": 0, "complete": False,
             "num_samples": 0, "shards": [], "rejected": []}
    if not storage.exists(manifest_url(dest)):
        return fresh
    old = read_manifest(dest, require_complete=False)
    diff = [f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in settings.items() if old.get(k) != v]
    if diff and old.get("complete") and old.get("num_samples"):
        raise ValueError(f"{dest} already holds a data set packed with other settings ({'; '.join(diff)}); "
                         f"pack into another DEST, or delete {dest} first")
    if diff:  # the partial output of a failed pack (or one whose every input was rejected): the corrected run replaces it
        _remove_pack_output(dest, old)
        return fresh
    kept = []
    for s in old["shards"]:
        url = storage.join(dest, s["name"])
        try:
            ok = storage.size(url) == s["bytes"]
        except FileNotFoundError:
            ok = False
        if not ok:
            log.warning("%s: missing or wrong size; re-packing from input %d", url, s["first_input"])
            break
        kept.append(s)
    all_kept = len(kept) == len(old["shards"])
    old["shards"] = kept
    done = kept[-1]["end_input"] if kept else 0
    if old.get("complete") and all_kept and old["inputs_done"] == settings["num_inputs"]:
        done = old["inputs_done"]
    else:
        old["complete"] = False
    old["inputs_done"] = done
    old["rejected"] = [r for r in old["rejected"] if r["index"] < done]
    old["num_samples"] = sum(s["count"] for s in kept)
    return old


def _remove_pack_output(dest: str, old: dict) -> None:
    """Delete what a failed pack wrote at ``dest``: its manifest and the ``shard-NNNNNN.tar`` files directly under it
    (listed or left unlisted by an interruption). Nothing else is touched: other files in the folder stay."""
    names = {s["name"] for s in old["shards"]}
    base = dest.rstrip("/")
    names |= {f[len(base):].lstrip("/") for f in storage.list_files(dest) if f.startswith(base)}
    shards = sorted(n for n in names if SHARD_NAME.fullmatch(n))
    log.warning("%s: removing the partial output of an earlier pack with other settings (%d shards, %d of %d inputs "
                "done)", dest, len(shards), old.get("inputs_done", 0), old.get("num_inputs", 0))
    for n in shards:
        storage.delete(storage.join(dest, n))
    storage.delete(manifest_url(dest))


# ------------------------------------------------------------------------------------------------ verify


def verify(url: str, decode: bool = False, progress: bool = True) -> dict:
    """Check every shard against the manifest: presence, size, sha256, sample count (and with ``decode``, that every
    image decodes at the manifest resolution). Returns a report dict; ``report["ok"]`` is the verdict."""
    m = read_manifest(url, require_complete=False)
    problems: list[str] = []
    if not m.get("complete"):
        problems.append(f"incomplete: {m.get('inputs_done')} of {m.get('num_inputs')} inputs packed; re-run the pack command")
    samples = 0
    nbytes = 0
    res = m["resolution"]
    listed = {s["name"] for s in m["shards"]}
    for s in tqdm(m["shards"], unit="shard", desc="verify", disable=not progress):
        surl = storage.join(url, s["name"])
        try:
            raw = storage.open_read(surl)
        except FileNotFoundError:
            problems.append(f"{s['name']}: missing")
            continue
        hr = HashingReader(raw)
        count, bad = 0, 0
        with raw:
            for key, files, reason in iter_tar_samples(io.BufferedReader(hr, 1 << 20)):
                if files is None:
                    problems.append(f"{s['name']}: {key}: {reason}")
                    bad += 1
                    continue
                count += 1
                if decode:
                    try:
                        im = open_image(image_member(files) or b"", SAMPLE_FORMATS, res * res)
                        im.load()
                        if im.size != (res, res):
                            problems.append(f"{s['name']}: {key}: size {im.size[0]}x{im.size[1]}, expected {res}x{res}")
                    except Exception as err:
                        problems.append(f"{s['name']}: {key}: undecodable: {err}")
            hr.drain()
        samples += count
        nbytes += hr.n
        if count != s["count"]:
            problems.append(f"{s['name']}: {count} samples, manifest says {s['count']}")
        if hr.n != s["bytes"]:
            problems.append(f"{s['name']}: {hr.n} bytes, manifest says {s['bytes']}")
        if hr.h.hexdigest() != s["sha256"]:
            problems.append(f"{s['name']}: sha256 mismatch")
    extra = [os.path.basename(f) for f in storage.list_files(url)
             if os.path.basename(f).startswith("shard-") and f.endswith(".tar") and os.path.basename(f) not in listed]
    return {"url": url, "name": m["name"], "ok": not problems, "problems": problems, "shards": len(m["shards"]),
            "samples": samples, "manifest_samples": m["num_samples"], "bytes": nbytes, "rejected": len(m["rejected"]),
            "resolution": res, "format": m["format"], "complete": bool(m.get("complete")), "unlisted_shards": extra}
