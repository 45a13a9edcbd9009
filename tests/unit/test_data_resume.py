"""Resume without replay: a training loader that seeks to a saved data position yields exactly the batches (keys and
pixels) of the uninterrupted pass, with 0 and 2 loader workers, 2 ranks and a bad sample in a shard, and decodes only
its shuffle buffer and partial batch before its first batch; the training loop's DataStream resumes across the end of
a pass. Real shards packed from scikit-image photos."""

from __future__ import annotations

import pytest
import torch

from laren.data import pipeline as P
from laren.data.pack import pack, read_manifest
from tests.integration.test_data_local import _rewrite_member
from tests.unit.test_train_loop import make_tiny_images

BATCH, BUFFER, PASS = 3, 5, 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """40 samples in 8 shards of 5; the second sample of the first shard does not decode."""
    work = tmp_path_factory.mktemp("resume")
    url = str(work / "shards")
    pack(str(make_tiny_images(work / "raw", 40)), url, "t", 32, shard_size_mb=0.02, progress=False)
    s0 = read_manifest(url)["shards"][0]
    _rewrite_member(work / "shards" / s0["name"], f"{s0['first_input'] + 1:08d}", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    return url


def _loader(url: str, nw: int = 0, rank: int = 0, world: int = 1) -> P.TrainLoader:
    return P.make_train_loader(url, 32, 8, BATCH, rank=rank, world_size=world, num_workers=nw, seed=1,
                               shuffle_buffer=BUFFER, max_bad_fraction=0.5, batches_per_epoch=PASS)


def _take(loader: P.TrainLoader, n: int) -> list[dict]:
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a["key"], a["shard"]) == (b["key"], b["shard"])
        tensors = [k for k in ("hr", "lr", "hr_u8") if k in b]  # hr_u8 alone when the LR is made on the device
        assert tensors and [k for k in ("hr", "lr", "hr_u8") if k in a] == tensors
        assert all(torch.equal(a[k], b[k]) for k in tensors)


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_seeks_to_the_exact_batches(shards, nw):
    full = _loader(shards, nw)
    ref = list(full)
    assert full.stats()["bad"] >= 1  # the pass meets the bad sample
    met_bad = False
    for cut in (1, 5, 10):
        a = _loader(shards, nw)
        head = _take(a, cut)
        pos = a.position()
        met_bad |= bool(pos["bad"])
        b = _loader(shards, nw)
        b.seek(cut, [pos])
        mid = _take(b, 2)  # resumed once more, from a position that carries the first one's
        c = _loader(shards, nw)
        c.seek(cut + 2, [b.position()])
        rest = list(c)
        _assert_same(head + mid + rest, ref)
        assert a.stats()["bad"] + b.stats()["bad"] + c.stats()["bad"] == full.stats()["bad"]  # each bad counted once
        # a checkpoint without worker positions (older laren) replays the pass: the same batches
        old = _loader(shards, nw)
        old.seek(cut, None)
        _assert_same(head + list(old), ref)
    assert met_bad  # some cut point lies after the bad sample: its position is part of the saved one


def test_two_ranks_and_a_resized_group(shards):
    refs = [list(_loader(shards, 0, r, 2)) for r in range(2)]
    heads, positions = [], []
    for r in range(2):
        a = _loader(shards, 0, r, 2)
        heads.append(_take(a, 7))
        positions.append(a.position())
    for r in range(2):
        b = _loader(shards, 0, r, 2)
        b.seek(7, positions)
        _assert_same(heads[r] + list(b), refs[r])
    # one rank now: the pass continues at batch 7 with fresh streams (no exact continuation exists), nothing replayed
    one = _loader(shards, 0, 0, 1)
    one.seek(7, positions)
    rest = list(one)
    _assert_same(rest, list(_loader(shards, 0, 0, 1))[:PASS - 7])


def test_resume_decodes_only_the_buffer_and_partial_batch(shards, monkeypatch):
    a = _loader(shards)
    _take(a, 10)
    pos = a.position()
    decoded = []
    real = P.decode_image
    monkeypatch.setattr(P, "decode_image", lambda data, size: decoded.append(1) or real(data, size))
    b = _loader(shards)
    b.seek(10, [pos])
    next(iter(b))
    assert 0 < len(decoded) <= BUFFER + BATCH
    decoded.clear()
    old = _loader(shards)
    old.seek(10, None)
    next(iter(old))
    assert len(decoded) >= 10 * BATCH  # the replay decodes every sample already consumed


@pytest.mark.parametrize("cut", [4, 10])
def test_data_stream_resumes_across_the_end_of_a_pass(shards, tmp_path, cut):
    """The training loop's stream, from a state saved mid-pass and at the pass's end, through the next pass."""
    from laren.data.stream import DataStream
    from laren.train.state import TrainState
    from tests.unit.test_train_loop import tiny_config

    data = dict(loader_workers=2, shuffle_buffer=BUFFER, max_bad_fraction=0.5)
    cfg = tiny_config(shards, f"sqlite:///{tmp_path}/m.db", data=data)
    with DataStream(cfg, 0, 1, TrainState()) as ref:
        assert ref.per_pass == 10  # 40 samples, batch 4
        want = [next(ref) for _ in range(cut + 8)]
    st = TrainState()
    with DataStream(cfg, 0, 1, st) as a:
        head = [next(a) for _ in range(cut)]
        saved = TrainState(data_epoch=st.data_epoch, data_batch=st.data_batch, data_ranks=[a.position()])
    with DataStream(cfg, 0, 1, saved) as b:
        _assert_same(head + [next(b) for _ in range(8)], want)
    assert (saved.data_epoch, saved.data_batch) == (1, cut - 2)


def test_malformed_saved_position_is_refused(shards):
    a = _loader(shards)
    _take(a, 2)
    pos = a.position()
    for field, value in (("items", [-1]), ("at", [[0, 3, 1]]), ("bad", [[0, 0, 1]])):
        b = _loader(shards)
        b.seek(2, [{**pos, field: value}])
        with pytest.raises(ValueError, match=r"data_ranks\[0\]\) is malformed"):
            next(iter(b))
