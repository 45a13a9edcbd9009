"""Reading WebDataset tar shards (laren/data/pack.py writes them): a tar stream grouped into samples, read defensively.

Only regular members of bounded declared size are read; a broken stream ends with one bad sample naming why. Used by
the training and eval pipelines (laren/data/pipeline.py), the factor data sets (laren/data/synth.py) and
``pack.verify``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Iterator, Optional

SAMPLE_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
SAMPLE_FORMATS = ("PNG", "JPEG", "WEBP")  # decoders for shard members
MAX_MEMBER_BYTES = 64 << 20  # one tar member of a shard (a 1024^2 PNG is ~3 MB)


class HashingReader(io.RawIOBase):
    """A raw stream that counts and hashes (sha256) the bytes read through it; ``drain`` reads the rest."""

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


def member_problem(member: tarfile.TarInfo) -> str:
    """Why a shard member is not read ("" if it may be): only regular, non-sparse members of bounded declared size."""
    if member.issparse():
        return "a sparse member"
    if not member.isreg():
        kind = ("a directory" if member.isdir() else "a link" if member.issym() or member.islnk() else
                "a device" if member.isdev() else "not a regular file")
        return kind
    if member.size > MAX_MEMBER_BYTES:
        return f"declares {member.size} bytes, more than the {MAX_MEMBER_BYTES}-byte limit"
    return ""


def iter_tar_samples(stream) -> Iterator[tuple[str, Optional[dict], str]]:
    """Group a tar stream's members into samples: yields (key, {ext: bytes}, "") or (key, None, reason).

    Only regular members of bounded declared size are read: a sparse, link or device member makes its sample bad (its
    data is never expanded); an oversized one ends the stream there (skipping it would read its declared size). A broken stream (truncated member, bad header) yields one (key or "", None, reason)
    for the sample it hit and stops; callers compare the count with the manifest to account for samples lost after it.
    """
    cur_key, cur, bad = None, {}, ""
    try:
        tf = tarfile.open(fileobj=stream, mode="r|")
        for member in tf:
            base = os.path.basename(member.name)
            key, _, ext = base.partition(".")
            if member.isdir():
                continue
            if key != cur_key:
                if cur_key is not None:
                    yield (cur_key, None, bad) if bad else (cur_key, cur, "")
                cur_key, cur, bad = key, {}, ""
            problem = member_problem(member)
            if problem and not member.issparse() and member.size > MAX_MEMBER_BYTES:
                # skipping its data would read up to the declared size: the rest of the stream is not trusted
                yield key, None, f"tar member {member.name} refused: {problem}"
                return
            if problem:
                bad = bad or f"tar member {member.name} refused: {problem}"
                continue
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
        yield (cur_key, None, bad) if bad else (cur_key, cur, "")


def image_member(files: dict) -> Optional[bytes]:
    """A sample's image bytes (its first member with an image extension), or None."""
    for ext in SAMPLE_IMAGE_EXTS:
        if ext in files:
            return files[ext]
    return None
