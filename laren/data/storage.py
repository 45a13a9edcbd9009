"""One small URL API over local paths and ``s3://bucket/key`` objects.

S3 goes through boto3 with the standard AWS configuration: credentials from the environment / ``~/.aws`` / instance
role, the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (any S3-compatible server: SeaweedFS, MinIO,
Ceph, R2 ...). Requests are retried with exponential backoff (botocore "standard" mode, ``LAREN_S3_MAX_ATTEMPTS``,
default 10; a CLI command uses a quick budget until the endpoint has answered once, :data:`QUICK`); failures a user
can fix (unreachable endpoint, credentials, access, bucket) raise :class:`StorageError`, one line; streaming reads that break mid-object resume with a ranged GET from the byte they reached; uploads
above :data:`MULTIPART_THRESHOLD` are multipart; listings are paginated.

Local writes are atomic (temp file in the same folder + ``os.replace``); S3 objects are atomic by nature. So a reader
never sees half a file.

Importing this module registers the ``s3`` scheme with WebDataset's ``gopen``, so
``webdataset.WebDataset("s3://bucket/ffhq/shard-{000000..000069}.tar", ...)`` reads through the same client.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import laren.data

log = logging.getLogger("laren.data")

__all__ = [
    "is_s3", "split_s3", "join", "read_bytes", "write_bytes", "open_read", "exists", "list_files", "delete",
    "upload_file", "download_file", "s3_client", "size", "register_webdataset_s3", "local_copy", "StorageError",
    "endpoint_url", "local_path", "atomic_local_file", "file_mode", "sha256_file", "arrow_filesystem",
]

MULTIPART_THRESHOLD = 64 * 1024 * 1024  # bytes; S3 parts must be >= 5 MiB (except the last)
MULTIPART_CHUNK = 64 * 1024 * 1024
READ_RETRIES = 5  # resumptions of one streaming read after a broken connection


def is_s3(url: str | os.PathLike) -> bool:
    return str(url).startswith("s3://")


def local_path(url: str | os.PathLike) -> str:
    """The local path of a local URL (``file://`` dropped)."""
    u = str(url)
    return u[len("file://"):] if u.startswith("file://") else u


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> (``bucket``, ``a/b``)."""
    if not is_s3(url):
        raise ValueError(f"not an s3:// URL: {url}")
    rest = url[len("s3://"):]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"{url}: no bucket name (expected s3://bucket/key)")
    return bucket, key


def join(url: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URL (always '/' for S3)."""
    u = str(url)
    if is_s3(u):
        out = u.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(u, *[str(p) for p in parts])


# ------------------------------------------------------------------------------------------------ client

_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()
_reached: set = set()  # endpoints that have answered this process (a forked loader worker inherits it)
# A command run by a person fails fast on an endpoint it has never reached (a wrong AWS_ENDPOINT_URL: one line in
# seconds, not minutes of retries); once the endpoint has answered, requests get the patient budget of a long job.
QUICK = {"total_max_attempts": 2, "connect_timeout": 4, "read_timeout": 20}  # at most ~9 s on an unreachable endpoint
PATIENT = {"connect_timeout": 10, "read_timeout": 60}  # retries: LAREN_S3_MAX_ATTEMPTS, default 10


def endpoint_url() -> Optional[str]:
    """The S3 endpoint of this environment (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``), None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def arrow_filesystem(url: str) -> tuple[str, object]:
    """(path, pyarrow filesystem or None) for ``url``: an s3:// URL as ``bucket/key`` on a pyarrow S3FileSystem with
    the endpoint of :func:`endpoint_url` (so Ray's checkpoint uploads reach a custom server: SeaweedFS, MinIO); a
    local folder (created) as itself with None."""
    if not is_s3(url):
        Path(local_path(url)).mkdir(parents=True, exist_ok=True)
        return local_path(url), None
    import pyarrow.fs as pafs  # heavy, and needed only by Ray Train's storage

    endpoint = endpoint_url()
    kw: dict = {"region": os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kw.update(endpoint_override=host.rstrip("/"), scheme=scheme or "https", force_virtual_addressing=False)
    return url[len("s3://"):], pafs.S3FileSystem(**kw)


def s3_client():
    """A boto3 S3 client for this process and AWS environment (endpoint from AWS_ENDPOINT_URL[_S3]), with retries.

    Cached per (process, endpoint, access key, budget), so forked loader workers make their own and a changed
    environment (another endpoint) gets a fresh one.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    quick = laren.data.S3_FAIL_FAST and endpoint not in _reached
    key = (os.getpid(), endpoint, os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_PROFILE"), quick)
    with _clients_lock:
        c = _clients.get(key)
        if c is None:
            budget = dict(QUICK) if quick else {"max_attempts": int(os.environ.get("LAREN_S3_MAX_ATTEMPTS", "10")), **PATIENT}
            attempts = {k: budget.pop(k) for k in ("total_max_attempts", "max_attempts") if k in budget}
            cfg = Config(
                signature_version="s3v4", retries={**attempts, "mode": "standard"}, **budget,
                max_pool_connections=32, s3={"addressing_style": "path"} if endpoint else None,
            )
            session = boto3.session.Session()
            c = session.client("s3", endpoint_url=endpoint, config=cfg)
            if quick:  # any HTTP answer (an error status included) shows the endpoint is there
                c.meta.events.register("after-call.s3", lambda **_: _reached.add(endpoint))
            _clients[key] = c
        return c


class StorageError(Exception):
    """An S3 request that failed for a reason the user can act on: one line naming the endpoint, the bucket, what
    failed and what to check (``laren`` prints it without a traceback; ``laren --debug`` shows it). Not an OSError:
    code that treats an unreadable file as absent or corrupt must not mistake an unreachable server for one."""


def _storage_error(err: Exception, url: str, what: str) -> Optional[StorageError]:
    """``err`` (from botocore) as a :class:`StorageError`, or None when it is not an S3 / network error."""
    from botocore import exceptions as bx

    endpoint = endpoint_url() or "AWS S3 (no AWS_ENDPOINT_URL set)"
    bucket = split_s3(url)[0] if is_s3(url) else "?"
    if isinstance(err, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ConnectionClosedError,
                        bx.ReadTimeoutError, bx.SSLError, bx.ProxyConnectionError)):
        reason, check = f"cannot reach the endpoint ({type(err).__name__})", \
            "that AWS_ENDPOINT_URL is right and the S3 server is running and reachable from here"
    elif isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        reason, check = "no credentials", "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or the instance role"
    elif isinstance(err, bx.ClientError):
        code = str(err.response.get("Error", {}).get("Code", "")) or "error"
        reason = f"{code} ({err.response.get('Error', {}).get('Message') or 'no message'})"
        if code == "NoSuchBucket":
            check = f"the bucket name, or create it (`aws s3 mb s3://{bucket}`)"
        elif code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            check = "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and the bucket's policy"
        else:
            check = "the URL and the server's logs"
    else:
        return None
    return StorageError(f"S3 {endpoint}, bucket {bucket}: {what} {url} failed: {reason}; check {check}")


@contextlib.contextmanager
def _s3_errors(url: str, what: str) -> Iterator[None]:
    """S3 errors inside the block: a missing object -> FileNotFoundError naming ``url``, S3 / network failures ->
    :class:`StorageError`; anything else unchanged."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except Exception as err:
        if _is_missing(err):
            code = getattr(err, "response", {}).get("Error", {}).get("Code")
            raise (_not_found(url) if code != "NoSuchBucket" else FileNotFoundError(
                f"{url}: no such bucket at {endpoint_url() or 'AWS'}; check the bucket name, or create it")) from None
        mapped = _storage_error(err, url, what)
        if mapped is None:
            raise
        raise mapped from err


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                          max_concurrency=4, use_threads=True)


def _is_missing(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")
    return False


def file_mode() -> int:
    """0666 minus the umask: what open() would give (mkstemp makes 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _not_found(url: str, err: Exception | None = None) -> FileNotFoundError:
    return FileNotFoundError(f"{url}: no such object" + (f" ({err})" if err else ""))


# ------------------------------------------------------------------------------------------------ reads


class _S3Reader(io.RawIOBase):
    """A streaming GetObject body that resumes (ranged GET from the current byte, with backoff) when it breaks."""

    def __init__(self, url: str):
        super().__init__()
        self.url = url
        self.bucket, self.key = split_s3(url)
        self.pos = 0
        self.body = None
        self.size: Optional[int] = None
        self._open()

    def _open(self) -> None:
        kw = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            kw["Range"] = f"bytes={self.pos}-"
        with _s3_errors(self.url, "reading"):
            r = s3_client().get_object(**kw)
        if self.size is None:
            self.size = int(r.get("ContentLength", 0))
        self.body = r["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.size is not None and self.pos >= self.size:
            return 0
        for attempt in range(READ_RETRIES + 1):
            try:
                data = self.body.read(len(b))
                break
            except Exception as err:  # connection reset, read timeout, incomplete read
                if attempt == READ_RETRIES:
                    raise OSError(f"{self.url}: read failed at byte {self.pos} after {READ_RETRIES} retries: {err}") from err
                delay = min(8.0, 0.2 * 2**attempt) * (0.5 + random.random())
                log.warning("%s: read broke at byte %d (%s); resuming in %.1f s", self.url, self.pos, err, delay)
                time.sleep(delay)
                self._close_body()
                self._open()
        n = len(data)
        b[:n] = data
        self.pos += n
        return n

    def _close_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:
                pass
            self.body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def open_read(url: str | os.PathLike) -> BinaryIO:
    """A buffered binary stream over the object (S3: streamed, resumed on broken connections)."""
    u = str(url)
    if is_s3(u):
        return io.BufferedReader(_S3Reader(u), buffer_size=1 << 20)
    return open(local_path(u), "rb")


def read_bytes(url: str | os.PathLike) -> bytes:
    with open_read(url) as f:
        return f.read()


def exists(url: str | os.PathLike) -> bool:
    u = str(url)
    if is_s3(u):
        bucket, key = split_s3(u)
        try:
            with _s3_errors(u, "looking up"):
                s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except FileNotFoundError:
            return False
    return os.path.exists(local_path(u))


def size(url: str | os.PathLike) -> int:
    """Size in bytes; FileNotFoundError when absent."""
    u = str(url)
    if is_s3(u):
        bucket, key = split_s3(u)
        with _s3_errors(u, "looking up"):
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(local_path(u))


def list_files(url_prefix: str | os.PathLike, page_size: int = 1000) -> list[str]:
    """Every file under the folder ``url_prefix`` (recursive), as sorted full URLs / paths.

    S3: a paginated ListObjectsV2 under ``prefix/`` (``page_size`` keys per request). Local: a recursive walk.
    A missing folder lists as [].
    """
    u = str(url_prefix)
    if is_s3(u):
        bucket, prefix = split_s3(u)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        out: list[str] = []
        with _s3_errors(u, "listing"):
            pages = s3_client().get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})
            for page in pages:
                for obj in page.get("Contents", []) or []:
                    if not obj["Key"].endswith("/"):
                        out.append(f"s3://{bucket}/{obj['Key']}")
        return sorted(out)
    root = local_path(u)
    if not os.path.isdir(root):
        return []
    out = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files]
    return sorted(out)


# ------------------------------------------------------------------------------------------------ writes


@contextlib.contextmanager
def atomic_local_file(dest: str | os.PathLike, mode: Optional[int] = None) -> Iterator[str]:
    """A temporary file beside the local file ``dest`` (its folder created), for the caller to fill. On success it is
    flushed to disk, gets ``mode`` (default: what open() would give) and replaces ``dest`` in one os.replace, so
    readers see the old file or the new one, never a part, even after a crash; on any error it is removed and
    ``dest`` is left as it was."""
    folder = os.path.dirname(os.path.abspath(dest))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dest)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a local file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes(url: str | os.PathLike, data: bytes) -> None:
    """Write atomically (local: temp file + os.replace; S3: one PUT, or multipart above MULTIPART_THRESHOLD)."""
    u = str(url)
    if is_s3(u):
        bucket, key = split_s3(u)
        with _s3_errors(u, "writing"):
            if len(data) < MULTIPART_THRESHOLD:
                s3_client().put_object(Bucket=bucket, Key=key, Body=data)
            else:
                s3_client().upload_fileobj(io.BytesIO(data), bucket, key, Config=_transfer_config())
        return
    with atomic_local_file(local_path(u)) as tmp, open(tmp, "wb") as f:
        f.write(data)


def upload_file(src: str | os.PathLike, url: str | os.PathLike) -> None:
    """Copy a local file to ``url`` (S3: multipart above MULTIPART_THRESHOLD; local: atomic copy)."""
    u = str(url)
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src}: no such file to upload")
    if is_s3(u):
        bucket, key = split_s3(u)
        with _s3_errors(u, "uploading"):
            s3_client().upload_file(str(src), bucket, key, Config=_transfer_config())
        return
    with atomic_local_file(local_path(u)) as tmp:
        shutil.copyfile(src, tmp)


def download_file(url: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``url`` to a local file (atomically)."""
    u = str(url)
    with atomic_local_file(dest) as tmp:
        if is_s3(u):
            bucket, key = split_s3(u)
            with _s3_errors(u, "downloading"):
                s3_client().download_file(bucket, key, tmp, Config=_transfer_config())
        else:
            shutil.copyfile(local_path(u), tmp)


def delete(url: str | os.PathLike) -> None:
    """Remove one file / object; absent is fine."""
    u = str(url)
    if is_s3(u):
        bucket, key = split_s3(u)
        with _s3_errors(u, "deleting"):
            s3_client().delete_object(Bucket=bucket, Key=key)
        return
    try:
        os.unlink(local_path(u))
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------------ node cache


def cache_dir() -> Path:
    """Where :func:`local_copy` keeps objects: ``LAREN_CACHE`` or ``~/.cache/laren`` (one per node)."""
    return Path(os.environ.get("LAREN_CACHE") or Path.home() / ".cache" / "laren")


def local_copy(url: str | os.PathLike) -> str:
    """A local file holding ``url``: a local path itself (``~`` expanded), an S3 object downloaded once per node.

    The cache entry is keyed by the URL and the object's ETag (its content hash for single-part uploads), so a
    replaced object is fetched again; the download is atomic and serialised by a lock file, so the workers of one
    node download it once and never read a partial file. FileNotFoundError (naming the URL) when it is absent.
    """
    u = str(url)
    if not is_s3(u):
        p = os.path.expanduser(local_path(u))
        if not os.path.isfile(p):
            raise _not_found(u)
        return p
    bucket, key = split_s3(u)
    with _s3_errors(u, "looking up"):
        etag = str(s3_client().head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')
    digest = hashlib.sha256(f"{u}\n{etag}".encode()).hexdigest()[:24]
    dest = cache_dir() / "objects" / f"{digest}-{os.path.basename(key) or 'object'}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{dest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.is_file():
            download_file(u, dest)
    return str(dest)


# ------------------------------------------------------------------------------------------------ WebDataset


class _S3Writer(io.BufferedWriter):
    """A write stream for ``gopen(s3://..., "wb")``: spools to a temp file, uploads (multipart) on close."""

    def __init__(self, url: str):
        self.url = url
        fd, self.tmp = tempfile.mkstemp(prefix="laren-upload-")
        super().__init__(io.FileIO(fd, "wb"))

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()
            upload_file(self.tmp, self.url)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    if mode == "rb":
        return open_read(url)
    if mode == "wb":
        return _S3Writer(url)
    raise ValueError(f"{url}: unsupported mode {mode!r}")


def register_webdataset_s3() -> bool:
    """Make ``s3://`` URLs work in WebDataset (``webdataset.gopen.gopen_schemes["s3"]``). False if not installed."""
    try:
        import webdataset.gopen  # noqa: F401  (the package re-exports a function named gopen)

        wds_gopen = sys.modules["webdataset.gopen"]
    except ImportError:  # pragma: no cover - webdataset is a dependency
        return False
    wds_gopen.gopen_schemes["s3"] = _gopen_s3
    return True


register_webdataset_s3()


def ensure_local_dir(path: str | os.PathLike) -> None:
    """Create a local folder; for S3 (no folders) check that the bucket exists, with an error saying what to do."""
    if not is_s3(path):
        Path(local_path(path)).mkdir(parents=True, exist_ok=True)
        return
    bucket, _ = split_s3(str(path))
    try:
        with _s3_errors(f"s3://{bucket}", "checking the bucket"):
            s3_client().head_bucket(Bucket=bucket)
    except FileNotFoundError:
        raise FileNotFoundError(f"s3://{bucket}: no such bucket at {endpoint_url() or 'AWS'}; create it first "
                                f"(e.g. `aws s3 mb s3://{bucket}`)") from None
