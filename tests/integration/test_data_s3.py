"""laren.data against a real S3 server (SeaweedFS on 127.0.0.1, the `s3_env` fixture): storage, WebDataset, pack -> verify -> stream."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch

from laren.data import pack as P
from laren.data import storage
from laren.data.pipeline import make_eval_loader, make_train_loader
from tests.integration.test_data_local import L, R, make_folder

pytestmark = pytest.mark.integration


@pytest.fixture
def bucket(s3_env):
    name = f"t-{uuid.uuid4().hex[:10]}"
    s3_env.create_bucket(name)
    return name


def test_storage_round_trip_listing_multipart(bucket, tmp_path, monkeypatch):
    base = f"s3://{bucket}/x"
    storage.write_bytes(storage.join(base, "a.bin"), b"hello")
    assert storage.read_bytes(storage.join(base, "a.bin")) == b"hello"
    assert storage.exists(storage.join(base, "a.bin")) and not storage.exists(storage.join(base, "nope"))
    assert storage.size(storage.join(base, "a.bin")) == 5
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(base, "nope"))
    for i in range(5):
        storage.write_bytes(storage.join(base, "many", f"{i}.txt"), str(i).encode())
    storage.write_bytes(f"s3://{bucket}/xy/other.txt", b"-")  # a sibling prefix is not "under x"
    listed = storage.list_files(base, page_size=2)  # 3 pages
    assert listed == [storage.join(base, "a.bin")] + [storage.join(base, "many", f"{i}.txt") for i in range(5)]
    storage.delete(storage.join(base, "many", "0.txt"))
    assert len(storage.list_files(storage.join(base, "many"))) == 4

    # multipart above the threshold (S3 parts are >= 5 MiB): the ETag of a multipart object ends in -<parts>
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 1024 * 1024)
    monkeypatch.setattr(storage, "MULTIPART_CHUNK", 5 * 1024 * 1024)
    big = os.urandom(11 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(big)
    storage.upload_file(tmp_path / "big.bin", storage.join(base, "big.bin"))
    etag = storage.s3_client().head_object(Bucket=bucket, Key="x/big.bin")["ETag"].strip('"')
    assert etag.endswith("-3")
    storage.download_file(storage.join(base, "big.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big
    storage.write_bytes(storage.join(base, "big2.bin"), big)
    assert storage.read_bytes(storage.join(base, "big2.bin")) == big


def test_streaming_read_resumes_after_broken_connection(bucket, monkeypatch):
    url = f"s3://{bucket}/r.bin"
    data = os.urandom(3 * 1024 * 1024)
    storage.write_bytes(url, data)
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    reader = storage._S3Reader(url)
    real_body = reader.body
    calls = {"n": 0}

    class Flaky:  # the first body breaks after 1 MiB, like a reset connection
        def read(self, n):
            calls["n"] += 1
            if calls["n"] > 1:
                raise ConnectionResetError("reset by peer")
            return real_body.read(min(n, 1024 * 1024))

        def close(self):
            real_body.close()

    reader.body = Flaky()
    got = io_read_all(reader)
    assert got == data and calls["n"] == 2  # resumed with a ranged GET from byte 1 MiB


def io_read_all(raw) -> bytes:
    import io

    with io.BufferedReader(raw, 256 * 1024) as f:
        return f.read()


def test_pack_verify_stream_on_s3(bucket, tmp_path):
    src = tmp_path / "images"
    make_folder(src, 10, seed=11)
    local = P.pack(str(src), str(tmp_path / "ds"), "s3demo", R, shard_size_mb=0.012, progress=False).manifest
    dest = f"s3://{bucket}/datasets/s3demo"
    m = P.pack(str(src), dest, "s3demo", R, shard_size_mb=0.012, workers=2, progress=False).manifest
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in local["shards"]]  # same bytes as a folder pack
    assert P.read_manifest(dest) == m
    assert P.verify(dest, decode=True, progress=False)["ok"]
    again = P.pack(str(src), dest, "s3demo", R, shard_size_mb=0.012, progress=False)
    assert again.shards_written == 0  # re-run skips complete shards

    # evaluation over 2 ranks = the local evaluation, sample for sample
    s3_batches = [b for r in range(2) for b in make_eval_loader(dest, R, L, 4, rank=r, world_size=2)]
    loc_batches = [b for r in range(2) for b in make_eval_loader(str(tmp_path / "ds"), R, L, 4, rank=r, world_size=2)]
    assert [b["key"] for b in s3_batches] == [b["key"] for b in loc_batches]
    assert all(torch.equal(a["lr"], b["lr"]) and torch.equal(a["hr"], b["hr"]) for a, b in zip(s3_batches, loc_batches))
    assert sum(len(b["key"]) for b in s3_batches) == 10

    tr = make_train_loader(dest, R, L, batch_size=2, num_workers=2, shuffle_buffer=4, batches_per_epoch=4)
    batches = list(tr)
    assert len(batches) == 4 and batches[0]["lr"].shape == (2, 3, L, L) and tr.stats()["bad"] == 0

    # a shard deleted from the bucket: counted as bad (its whole count), the stream goes on
    gone = m["shards"][0]
    storage.delete(storage.join(dest, gone["name"]))
    ev = make_eval_loader(dest, R, L, 4, max_bad_fraction=0.9)
    assert sum(len(b["key"]) for b in ev) == 10 - gone["count"] and ev.stats()["bad"] == gone["count"]
    assert not P.verify(dest, progress=False)["ok"]


def test_webdataset_reads_s3_urls(bucket, tmp_path):
    import webdataset as wds

    src = tmp_path / "images"
    make_folder(src, 6, seed=13)
    dest = f"s3://{bucket}/ffhq"
    m = P.pack(str(src), dest, "ffhq", R, shard_size_mb=0.012, progress=False).manifest
    n = len(m["shards"])
    assert n >= 2
    ds = wds.WebDataset(f"{dest}/shard-{{000000..{n - 1:06d}}}.tar", shardshuffle=False, empty_check=False,
                        nodesplitter=wds.split_by_node).decode("rgb8")
    samples = list(ds)
    assert sorted(s["__key__"] for s in samples) == [f"{i:08d}" for i in range(6)]
    assert samples[0]["png"].shape == (R, R, 3)

    # and writing through gopen("s3://...", "wb") (ShardWriter-style) lands one object on close
    from webdataset.gopen import gopen

    with gopen(f"s3://{bucket}/w/one.bin", "wb") as f:
        f.write(b"abc")
    assert storage.read_bytes(f"s3://{bucket}/w/one.bin") == b"abc"


def test_missing_bucket_is_a_clear_error(s3_env, tmp_path):
    src = tmp_path / "images"
    make_folder(src, 1)
    with pytest.raises(FileNotFoundError, match="no such bucket.*create it"):
        P.pack(str(src), "s3://no-such-bucket-laren/ds", "x", R, progress=False)


def test_attach_to_a_running_server_and_refuse_a_dead_one(s3_server, ray_head, tmp_path):
    """A service another process started (how the workers of a parallel test run share the controller's): attached by
    its parameters, usable, and not stopped (nor its files removed) with the attached object; a port nobody serves is
    refused."""
    from laren.services import MLflowServer, RayHead, S3Server, free_port

    other = S3Server(**s3_server.params()).attach(timeout_s=30)
    other.create_bucket("attached")
    other.stop()  # not its process: nothing happens
    assert "attached" in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    head = RayHead(**ray_head.params()).attach(timeout_s=30)
    session = Path(head.temp_dir()) / "session_latest"  # the head's sockets and logs
    assert session.exists()
    head.stop()
    assert session.exists() and ray_head.ready()
    with pytest.raises(TimeoutError, match=r"mlflow at .* did not answer in 1 s"):
        MLflowServer(tmp_path / "none", port=free_port()).attach(timeout_s=1)
