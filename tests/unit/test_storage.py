"""laren.data.storage on local paths (the S3 half runs against a real server in tests/integration/test_data_s3.py)."""

from __future__ import annotations

import hashlib
import os

import pytest

from laren.data import storage


def test_join_and_is_s3():
    assert storage.join("s3://b/pre/", "ds", "/manifest.json") == "s3://b/pre/ds/manifest.json"
    assert storage.join("s3://b", "k") == "s3://b/k"
    assert storage.join("/tmp/x", "a", "b") == os.path.join("/tmp/x", "a", "b")
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://")
    assert storage.split_s3("s3://bucket/a/b.tar") == ("bucket", "a/b.tar")
    with pytest.raises(ValueError):
        storage.split_s3("s3:///key")


def test_write_read_list_delete(tmp_path):
    root = str(tmp_path / "root")
    storage.write_bytes(storage.join(root, "b", "two.bin"), b"2" * 10)
    storage.write_bytes(storage.join(root, "a.bin"), b"one")
    storage.write_bytes(storage.join(root, "a.bin"), b"one!")  # overwrite in place
    assert storage.read_bytes(storage.join(root, "a.bin")) == b"one!"
    with storage.open_read(storage.join(root, "b", "two.bin")) as f:
        assert f.read(4) == b"2222" and f.read() == b"2" * 6
    assert storage.list_files(root) == [storage.join(root, "a.bin"), storage.join(root, "b", "two.bin")]
    assert not [f for f in os.listdir(root) if f.startswith(".")]  # atomic writes leave no temp files
    assert storage.size(storage.join(root, "a.bin")) == 4
    assert storage.exists(storage.join(root, "a.bin"))
    storage.delete(storage.join(root, "a.bin"))
    storage.delete(storage.join(root, "a.bin"))  # absent is fine
    assert not storage.exists(storage.join(root, "a.bin"))
    assert storage.list_files(str(tmp_path / "nothing")) == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "missing"))


def test_upload_download_local(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(1000))
    storage.upload_file(src, str(tmp_path / "up" / "x.bin"))
    storage.download_file(str(tmp_path / "up" / "x.bin"), tmp_path / "down" / "y.bin")
    assert (tmp_path / "down" / "y.bin").read_bytes() == src.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "up" / "x.bin", tmp_path / "down" / "y.bin"):  # the mode open() gives, not mkstemp's 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(FileNotFoundError):
        storage.upload_file(tmp_path / "nope", str(tmp_path / "z"))
    # a failed download leaves the previous file as it was, and no temporary file beside it
    with pytest.raises(FileNotFoundError):
        storage.download_file(str(tmp_path / "up" / "missing.bin"), tmp_path / "down" / "y.bin")
    assert (tmp_path / "down" / "y.bin").read_bytes() == src.read_bytes()
    assert os.listdir(tmp_path / "down") == ["y.bin"]


def test_webdataset_s3_scheme_registered():
    import sys

    import webdataset  # noqa: F401

    assert sys.modules["webdataset.gopen"].gopen_schemes["s3"] is storage._gopen_s3


def test_local_copy_of_a_local_file_is_the_file(tmp_path, monkeypatch):
    p = tmp_path / "w.pth"
    p.write_bytes(b"x")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.local_copy(str(p)) == str(p) and storage.local_copy("~/w.pth") == str(p)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        storage.local_copy(str(tmp_path / "nope.pth"))


def test_atomic_local_file_publishes_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "sub" / "f.json"
    with storage.atomic_local_file(dest, mode=0o600) as tmp:
        assert os.path.dirname(tmp) == str(dest.parent) and not dest.exists()  # beside dest: the rename is atomic
        with open(tmp, "w") as f:
            f.write("one")
    assert dest.read_text() == "one" and (dest.stat().st_mode & 0o777) == 0o600
    with pytest.raises(RuntimeError), storage.atomic_local_file(dest) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("crash mid-write")
    assert dest.read_text() == "one" and os.listdir(dest.parent) == ["f.json"]  # old file kept, no temp left


def test_sha256_file(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"abc" * 700_000)  # more than one 1 MiB block
    assert storage.sha256_file(p) == hashlib.sha256(b"abc" * 700_000).hexdigest()


def test_arrow_filesystem_uses_the_one_endpoint_rule(tmp_path, monkeypatch):
    local = tmp_path / "runs"
    assert storage.arrow_filesystem(str(local)) == (str(local), None) and local.is_dir()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2/")  # the S3-specific variable wins, as for boto3
    path, fs = storage.arrow_filesystem("s3://bucket/runs")
    kw = fs.__reduce__()[1][0]
    assert path == "bucket/runs" and (kw["scheme"], kw["endpoint_override"]) == ("http", "127.0.0.1:2")
    assert storage.endpoint_url() == "http://127.0.0.1:2/"
