"""pack -> verify -> stream on local folders: folder / zip / LSUN lmdb sources, resume, bad samples, rank x worker split."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from laren.data import pack as P
from laren.data.pipeline import (BadDataError, auto_loader_workers, batch_to_device, make_eval_loader,
                                 make_train_loader)
from laren.data.shards import iter_tar_samples
from laren.imresize import imresize_uint8

R = 32  # packed resolution
L = 8  # LR side (x1/4)


def sample_arrays(n: int, seed: int = 0) -> list[np.ndarray]:
    """n real-image crops (scikit-image samples), sizes from 36x36 to 60x45 (some non-square)."""
    import skimage.data as d

    srcs = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = srcs[i % len(srcs)]
        h, w = int(rng.integers(36, 61)), int(rng.integers(36, 61))
        y, x = int(rng.integers(0, a.shape[0] - h)), int(rng.integers(0, a.shape[1] - w))
        out.append(np.ascontiguousarray(a[y:y + h, x:x + w]))
    return out


def make_folder(root, n: int, seed: int = 0) -> list[np.ndarray]:
    arrs = sample_arrays(n, seed)
    for i, a in enumerate(arrs):
        sub = os.path.join(str(root), "sub" if i % 3 == 0 else "")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(a).save(os.path.join(sub, f"img{i:03d}.png"))
    return arrs


def shards_of(url):
    return P.read_manifest(url)["shards"]


def test_pack_folder_verify_stream(tmp_path):
    src = tmp_path / "images"
    make_folder(src, 14)
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(src / "tiny.png")  # min side 20 < 32
    (src / "broken.jpg").write_bytes(b"not an image")
    dest = str(tmp_path / "ds")
    res = P.pack(str(src), dest, "demo", R, shard_size_mb=0.012, workers=2, progress=False)
    m = res.manifest
    assert m["complete"] and m["num_samples"] == 14 and m["num_inputs"] == 16
    assert len(m["shards"]) >= 3 and sum(s["count"] for s in m["shards"]) == 14
    assert {r["input"]: r["reason"].split(":")[0] for r in m["rejected"]} == {"tiny.png": "too small",
                                                                               "broken.jpg": "undecodable"}
    assert json.loads((tmp_path / "ds" / "manifest.json").read_text()) == m

    rep = P.verify(dest, decode=True, progress=False)
    assert rep["ok"] and rep["samples"] == 14 and rep["problems"] == []

    # the packed image is the exact center square crop when the source side equals R (no resampling)
    img = np.zeros((R, R + 10, 3), np.uint8)
    img[:, 5:5 + R] = np.arange(R * R * 3, dtype=np.uint32).reshape(R, R, 3) % 251
    out, reason, orig = P.prepare_image(_png(img), R)
    assert reason == "" and orig == (R + 10, R) and np.array_equal(np.asarray(out), img[:, 5:5 + R])

    # evaluation: each sample exactly once over 2 ranks, in manifest order, identical on a second run
    inputs = sorted(set(range(16)) - {r["index"] for r in m["rejected"]})
    keys = []
    for rank in range(2):
        ev = make_eval_loader(dest, R, L, batch_size=3, rank=rank, world_size=2)
        b1, b2 = list(ev), list(ev)
        assert [b["key"] for b in b1] == [b["key"] for b in b2]
        assert all(torch.equal(x["lr"], y["lr"]) and torch.equal(x["hr"], y["hr"]) for x, y in zip(b1, b2))
        keys += [k for b in b1 for k in b["key"]]
        b = b1[0]
        assert b["lr"].shape == (3, 3, L, L) and b["hr"].shape == (3, 3, R, R) and b["lr"].dtype == torch.float32
        assert b["hr"].min() >= -1 and b["hr"].max() <= 1
        # LR is the uint8 MATLAB-bicubic round trip of HR
        hr_u8 = torch.round((b["hr"] + 1) * 127.5).to(torch.uint8)
        assert torch.equal(torch.round((b["lr"] + 1) * 127.5).to(torch.uint8), imresize_uint8(hr_u8, L / R))
        assert ev.stats() == {"samples": 14, "bad": 0, "bad_keys": []}  # 7 per rank, two passes
    assert keys == [f"{i:08d}" for i in inputs]
    assert [k for b in make_eval_loader(dest, R, L, 4, limit=5) for k in b["key"]] == keys[:5]

    # training: exact batch count, HR pixels are the packed image (maybe flipped), LR follows HR
    packed = _packed_images(dest)
    tr = make_train_loader(dest, R, L, batch_size=4, num_workers=2, shuffle_buffer=8, batches_per_epoch=5, seed=1)
    batches = list(tr)
    assert len(batches) == 5 and len(tr) == 5 and tr.stats()["samples"] == 20
    flips = 0
    for b in batches:
        for i, k in enumerate(b["key"]):
            hr = torch.round((b["hr"][i] + 1) * 127.5).to(torch.uint8).permute(1, 2, 0).numpy()
            ref = packed[k]
            assert np.array_equal(hr, ref) or np.array_equal(hr, ref[:, ::-1])
            flips += not np.array_equal(hr, ref)
        hr_u8 = torch.round((b["hr"] + 1) * 127.5).to(torch.uint8)
        assert torch.equal(torch.round((b["lr"] + 1) * 127.5).to(torch.uint8), imresize_uint8(hr_u8, L / R))
    assert 0 < flips < 20


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _packed_images(dest) -> dict[str, np.ndarray]:
    out = {}
    for s in shards_of(dest):
        with open(os.path.join(dest, s["name"]), "rb") as f:
            for key, files, _ in iter_tar_samples(f):
                out[key] = np.asarray(Image.open(io.BytesIO(files["png"])).convert("RGB"))
    return out


def test_zip_and_lmdb_sources(tmp_path):
    import lmdb

    src = tmp_path / "images"
    arrs = make_folder(src, 6, seed=3)
    folder = P.pack(str(src), str(tmp_path / "f"), "x", R, progress=False).manifest
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        for dirpath, _, files in os.walk(src):
            for f in files:
                z.write(os.path.join(dirpath, f), os.path.relpath(os.path.join(dirpath, f), src))
    zipped = P.pack(str(tmp_path / "images.zip"), str(tmp_path / "z"), "x", R, progress=False).manifest
    assert zipped["source_kind"] == "zip" and zipped["num_samples"] == 6
    # same images, same relative names -> byte-identical shards
    assert [s["sha256"] for s in zipped["shards"]] == [s["sha256"] for s in folder["shards"]]

    # LSUN layout: an lmdb of encoded images (webp, as LSUN ships them; one jpeg; one bad value)
    db = tmp_path / "cat_lmdb"
    env = lmdb.open(str(db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for i, a in enumerate(arrs):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="WEBP" if i else "JPEG", quality=90)
            txn.put(f"{i:040x}".encode(), buf.getvalue())
        txn.put(b"f" * 40, b"\x00garbage")
    env.close()
    assert P.detect_source(str(db)) == "lmdb"
    res = P.pack(str(db), str(tmp_path / "l"), "lsun-cat", R, fmt="jpg", quality=90, workers=2, progress=False)
    m = res.manifest
    assert m["source_kind"] == "lmdb" and m["num_samples"] == 6 and m["format"] == "jpg"
    assert [r["input"] for r in m["rejected"]] == ["f" * 40]
    assert P.verify(str(tmp_path / "l"), decode=True, progress=False)["ok"]
    b = next(iter(make_eval_loader(str(tmp_path / "l"), R, L, batch_size=6)))
    assert b["hr"].shape == (6, 3, R, R) and b["key"] == [f"{i:08d}" for i in range(6)]


def test_resume_after_interruption(tmp_path):
    src = tmp_path / "images"
    make_folder(src, 12, seed=5)
    ref = P.pack(str(src), str(tmp_path / "ref"), "r", R, shard_size_mb=0.01, progress=False).manifest
    assert len(ref["shards"]) >= 4
    dest = str(tmp_path / "ds")

    class Killed(Exception):
        pass

    def kill_after_two(entry):
        if entry["name"] == P.shard_name(1):
            raise Killed

    with pytest.raises(Killed):
        P.pack(str(src), dest, "r", R, shard_size_mb=0.01, workers=2, progress=False, on_shard=kill_after_two)
    m = P.read_manifest(dest, require_complete=False)
    assert not m["complete"] and [s["name"] for s in m["shards"]] == [P.shard_name(0), P.shard_name(1)]
    assert not [f for f in os.listdir(dest) if f.endswith(".part")]  # no half shard left
    rep = P.verify(dest, progress=False)
    assert not rep["ok"] and rep["problems"][0].startswith("incomplete")
    with pytest.raises(ValueError, match="incomplete"):
        make_train_loader(dest, R, L, 2)
    # a half-written shard from a harder kill is neither listed nor kept
    with open(os.path.join(dest, ".shard-000002.tar.x.part"), "wb") as f:
        f.write(b"half")
    res = P.pack(str(src), dest, "r", R, shard_size_mb=0.01, progress=False)
    assert res.shards_kept == 2 and res.shards_written == len(ref["shards"]) - 2
    assert [s["sha256"] for s in res.manifest["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert P.verify(dest, progress=False)["ok"]
    again = P.pack(str(src), dest, "r", R, shard_size_mb=0.01, progress=False)
    assert again.shards_written == 0 and again.shards_kept == len(ref["shards"])
    with pytest.raises(ValueError, match="other settings.*resolution"):
        P.pack(str(src), dest, "r", 16, shard_size_mb=0.01, progress=False)


def _rewrite_member(shard_path, key, new_bytes):
    """Replace one sample's image bytes inside a shard (keeps the tar valid)."""
    with tarfile.open(shard_path) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(shard_path, "w", format=tarfile.USTAR_FORMAT) as t:
        for m, data in members:
            if m.name == f"{key}.png":
                data = new_bytes
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))


def test_bad_samples_counted_and_skipped(tmp_path):
    src = tmp_path / "images"
    make_folder(src, 12, seed=7)
    dest = tmp_path / "ds"
    m = P.pack(str(src), str(dest), "b", R, shard_size_mb=0.012, progress=False).manifest
    s0, s1, s2 = m["shards"][0], m["shards"][1], m["shards"][-1]
    assert s1["count"] >= 2 and s2["count"] >= 2 and s2 is not s1
    # shard 0: one undecodable image and one of the wrong size
    k_bad, k_small = f"{s0['first_input']:08d}", f"{s0['first_input'] + 1:08d}"
    _rewrite_member(dest / s0["name"], k_bad, b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    _rewrite_member(dest / s0["name"], k_small, _png(np.zeros((16, 16, 3), np.uint8)))
    # last shard: cut inside the second sample's image (a truncated member); its later samples are lost too
    raw = (dest / s2["name"]).read_bytes()
    with tarfile.open(dest / s2["name"]) as t:
        second = [mm for mm in t.getmembers() if mm.name.endswith(".png")][1]
    (dest / s2["name"]).write_bytes(raw[: second.offset_data + 10])
    lost = s2["count"] - 1

    rep = P.verify(str(dest), progress=False)
    assert not rep["ok"] and any("sha256" in p for p in rep["problems"])
    assert any("truncated" in p for p in rep["problems"])

    ev = make_eval_loader(str(dest), R, L, batch_size=4, max_bad_fraction=0.5)
    keys = [k for b in ev for k in b["key"]]
    st = ev.stats()
    assert st["bad"] == 2 + lost and st["samples"] == 12 - 2 - lost == len(keys)  # exact skip count, stream continued
    assert st["bad_keys"][:2] == [f"{s0['name']}/{k_bad}", f"{s0['name']}/{k_small}"]
    assert st["bad_keys"][2].startswith(s2["name"] + "/")
    assert k_bad not in keys and k_small not in keys and f"{s2['first_input']:08d}" in keys

    # training keeps streaming past bad samples and reports them
    tr = make_train_loader(str(dest), R, L, batch_size=2, num_workers=0, shuffle_buffer=2, max_bad_fraction=0.9,
                           batches_per_epoch=12)
    assert len(list(tr)) == 12 and tr.stats()["bad"] > 0 and tr.stats()["samples"] == 24
    # a strict threshold aborts with a message that names the bad sample and what to do
    with pytest.raises(BadDataError, match=f"{k_bad}.*laren data verify"):
        list(make_eval_loader(str(dest), R, L, batch_size=4, max_bad_fraction=0.0))


def test_two_ranks_two_workers_disjoint_shards_equal_batches(tmp_path):
    src = tmp_path / "images"
    make_folder(src, 16, seed=9)
    dest = str(tmp_path / "ds")
    m = P.pack(str(src), dest, "d", R, shard_size_mb=0.006, progress=False).manifest
    names = [s["name"] for s in m["shards"]]
    assert len(names) >= 4
    seen: dict[tuple[int, int], set] = {}
    counts = []
    for rank in range(2):
        tr = make_train_loader(dest, R, L, batch_size=2, rank=rank, world_size=2, num_workers=2, shuffle_buffer=2,
                               batches_per_epoch=6, seed=3)
        for epoch in range(2):
            batches = list(tr)
            counts.append(len(batches))
            for i, b in enumerate(batches):  # the DataLoader takes batches from its workers in turn
                seen.setdefault((rank, i % 2), set()).update(b["shard"])
    assert counts == [6, 6, 6, 6]
    for (r, w), shards in seen.items():
        g = r * 2 + w
        assert shards <= set(names[g::4]), (r, w, shards)  # global worker g reads shards g, g+4, ...
    groups = list(seen.values())
    assert len(groups) == 4 and all(a.isdisjoint(b) for i, a in enumerate(groups) for b in groups[i + 1:])


def test_lr_on_device_batches_equal_cpu_batches(tmp_path):
    """data.lr_on_device: the loader (a spawned worker) ships uint8 HR; batch_to_device makes the same (lr, hr) floats,
    bit for bit, as the loader's own CPU path, from the same stream (keys, flips, order)."""
    src = tmp_path / "images"
    make_folder(src, 10, seed=4)
    dest = str(tmp_path / "ds")
    P.pack(str(src), dest, "d", R, shard_size_mb=0.012, progress=False)
    kw = dict(batch_size=3, num_workers=1, shuffle_buffer=4, batches_per_epoch=4, seed=5, pin_memory=False)
    cpu = list(make_train_loader(dest, R, L, **kw))
    dev = list(make_train_loader(dest, R, L, lr_on_device=True, **kw))
    assert len(cpu) == len(dev) == 4
    for a, b in zip(cpu, dev):
        assert set(b) == {"hr_u8", "key", "shard"} and b["hr_u8"].dtype == torch.uint8 and b["hr_u8"].shape == (3, 3, R, R)
        assert b["key"] == a["key"] and b["shard"] == a["shard"]
        lr, hr = batch_to_device(b, torch.device("cpu"), L)
        assert torch.equal(lr, a["lr"]) and torch.equal(hr, a["hr"])
        lr2, hr2 = batch_to_device(a, torch.device("cpu"), L)  # a CPU-path batch passes through unchanged
        assert torch.equal(lr2, a["lr"]) and torch.equal(hr2, a["hr"])


def test_auto_loader_workers():
    """data.loader_workers: null -> the worker's CPUs (resources.cpus_per_worker) capped by the process's, minus one."""
    mine = len(os.sched_getaffinity(0))
    assert auto_loader_workers(None) == max(1, mine - 1)
    assert auto_loader_workers(1) == auto_loader_workers(0.5) == 1
    assert auto_loader_workers(2) == max(1, min(2, mine) - 1)
    assert auto_loader_workers(10_000) == max(1, mine - 1)


def test_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        make_train_loader(str(tmp_path), R, L, 2)
    src = tmp_path / "images"
    make_folder(src, 2)
    P.pack(str(src), str(tmp_path / "ds"), "e", R, progress=False)
    with pytest.raises(ValueError, match="re-pack with --resolution 64"):
        make_eval_loader(str(tmp_path / "ds"), 64, 16, 2)
    with pytest.raises(ValueError, match="lr_size"):
        make_eval_loader(str(tmp_path / "ds"), R, 5, 2)
    with pytest.raises(ValueError, match="every input was rejected"):
        P.pack(str(src), str(tmp_path / "big"), "e", 4096, progress=False)
