"""Raw images -> WebDataset tar shards + ``manifest.json``, local or on S3; and their verification.

Sources (read-only, local): an image folder (recursive; .png .jpg .jpeg .webp .bmp .tif .tiff, sorted by relative
path), a .zip of images (sorted by member name), or an LSUN lmdb directory (``data.mdb``; cursor order, as the LSUN
exports and StyleGAN's ``prepare_data`` read them).

Each image becomes RGB, is center-cropped to its largest square (side = min(W, H)) and, when that side differs from R,
resized to R x R with PIL's Lanczos filter (antialiased; the resize StyleGAN2's ``prepare_data`` uses). Images with
min(W, H) < R are rejected (never upsampled), as are undecodable files; both are listed in the manifest with reasons.

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
same settings keeps the listed shards whose size matches and continues at ``inputs_done``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from PIL import Image

from laren.data import storage

log = logging.getLogger("laren.data")

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
RESIZE_DOC = "RGB; center crop to the largest square; PIL Lanczos resize to R x R when the side differs; min(W,H) < R rejected"
SAMPLE_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")


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
        import lmdb

        env = lmdb.open(src, readonly=True, lock=False, readahead=False, meminit=False, max_readers=64)
        try:
            with env.begin(write=False) as txn:
                return [k.decode("latin-1") for k in txn.cursor().iternext(keys=True, values=False)]
        finally:
            env.close()
    raise ValueError(f"unknown source kind {kind}")


_reader_state: dict[str, Any] = {}  # per process: the open zip / lmdb handle


def _read_input(src: str, kind: str, item: str) -> bytes:
    if kind == "folder":
        with open(os.path.join(src, item), "rb") as f:
            return f.read()
    key = (os.getpid(), src)
    h = _reader_state.get(key)
    if kind == "zip":
        if h is None:
            h = _reader_state[key] = zipfile.ZipFile(src)
        return h.read(item)
    if kind == "lmdb":
        if h is None:
            import lmdb

            h = _reader_state[key] = lmdb.open(src, readonly=True, lock=False, readahead=False, meminit=False,
                                               max_readers=64)
        with h.begin(write=False) as txn:
            v = txn.get(item.encode("latin-1"))
        if v is None:
            raise KeyError(f"key {item!r} missing from lmdb")
        return bytes(v)
    raise ValueError(kind)


def prepare_image(data: bytes, resolution: int) -> tuple[Optional[Image.Image], str, tuple[int, int]]:
    """Decode, center-crop square, resize to R (Lanczos). Returns (image or None, reject reason, original (W, H))."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as err:
        msg = "not a recognised image format" if isinstance(err, Image.UnidentifiedImageError) else str(err)
        return None, f"undecodable: {type(err).__name__}: {msg}", (0, 0)
    w, h = img.size
    if min(w, h) < resolution:
        return None, f"too small: {w}x{h} < {resolution}x{resolution}", (w, h)
    img = img.convert("RGB")
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
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


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
                 "sha256": _sha256_file(self.tmp), "first_input": self.first_input, "end_input": end_input}
        final = storage.join(self.dest, entry["name"])
        try:
            if storage.is_s3(final):
                storage.upload_file(self.tmp, final)  # one object, appears whole (multipart when large)
            else:
                os.chmod(self.tmp, storage._file_mode())
                os.replace(self.tmp, storage._local(final))  # same folder: atomic rename
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
        for f in os.listdir(storage._local(dest)):
            if f.startswith(".shard-") and f.endswith(".part"):
                os.unlink(os.path.join(storage._local(dest), f))

    m = _resume_state(dest, settings)
    result = PackResult(manifest=m, shards_kept=len(m["shards"]))
    if m["complete"]:
        log.info("%s: already complete (%d shards, %d samples)", dest, len(m["shards"]), m["num_samples"])
        return result

    total = settings["num_inputs"]
    limit = int(settings["shard_size_mb"] * 1024 * 1024)
    start = m["inputs_done"]
    tmpdir = storage._local(dest) if not storage.is_s3(dest) else None
    pool = mp.get_context("fork").Pool(workers) if workers and workers > 1 else None
    results: Iterator = pool.imap(process, jobs(start), chunksize=4) if pool else map(process, jobs(start))

    from tqdm import tqdm

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
            pool.terminate()
            pool.join()
    return result


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
    if diff:
        raise ValueError(f"{dest} already holds a data set packed with other settings ({'; '.join(diff)}); "
                         f"pack into another DEST, or delete {dest} first")
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


# ------------------------------------------------------------------------------------------------ shard reading


class _HashingReader(io.RawIOBase):
    def __init__(self, raw):
        super().__init__()
        self.raw, self.h, self.n = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        self.h.update(data)
        self.n += len(data)
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        for chunk in iter(lambda: self.raw.read(1 << 20), b""):
            self.h.update(chunk)
            self.n += len(chunk)


def iter_tar_samples(stream) -> Iterator[tuple[str, Optional[dict], str]]:
    """Group a tar stream's members into samples: yields (key, {ext: bytes}, "") or (key, None, reason).

    A broken stream (truncated member, bad header) yields one (key or "", None, reason) for the sample it hit and stops;
    callers compare the count with the manifest to account for samples lost after it.
    """
    cur_key, cur = None, {}
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")
        for member in tf:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if key != cur_key:
                if cur_key is not None:
                    yield cur_key, cur, ""
                cur_key, cur = key, {}
            try:
                cur[ext.lower()] = tf.extractfile(member).read()
            except Exception as err:
                yield key, None, f"truncated tar member {member.name}: {err}"
                return
    except Exception as err:
        if cur_key is not None:
            yield cur_key, None, f"broken tar after {cur_key}: {type(err).__name__}: {err}"
        else:
            yield "", None, f"unreadable tar: {type(err).__name__}: {err}"
        return
    if cur_key is not None:
        yield cur_key, cur, ""


def image_member(files: dict) -> Optional[bytes]:
    for ext in SAMPLE_IMAGE_EXTS:
        if ext in files:
            return files[ext]
    return None


# ------------------------------------------------------------------------------------------------ verify


def verify(url: str, decode: bool = False, progress: bool = True) -> dict:
    """Check every shard against the manifest: presence, size, sha256, sample count (and with ``decode``, that every
    image decodes at the manifest resolution). Returns a report dict; ``report["ok"]`` is the verdict."""
    m = read_manifest(url, require_complete=False)
    from tqdm import tqdm

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
        hr = _HashingReader(raw)
        count, bad = 0, 0
        with raw:
            for key, files, reason in iter_tar_samples(io.BufferedReader(hr, 1 << 20)):
                if files is None:
                    problems.append(f"{s['name']}: {key}: {reason}")
                    bad += 1
                    continue
                count += 1
                if decode:
                    data = image_member(files)
                    try:
                        im = Image.open(io.BytesIO(data))
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
