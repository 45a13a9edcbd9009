"""`laren data synth`: deterministic per seed, independent factors within their ranges, shards the pipeline reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from laren.data import pack, synth
from laren.data.pipeline import make_eval_loader, make_train_loader
from laren.data.shards import iter_tar_samples


def _write(dest, count=24, seed=5, resolution=32):
    return synth.synth("faces", str(dest), resolution, count, seed=seed, shard_size_mb=0.02, progress=False)


def test_deterministic_per_seed(tmp_path):
    a, b, c = _write(tmp_path / "a").manifest, _write(tmp_path / "b").manifest, _write(tmp_path / "c", seed=6).manifest
    assert len(a["shards"]) > 1  # several shards, each byte-identical for the same seed
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert [s["sha256"] for s in a["shards"]] != [s["sha256"] for s in c["shards"]]
    # a sample depends on (seed, index) only: the first samples of a longer set are the same images
    ia, fa, _ = synth.read_factor_samples(str(tmp_path / "a"))
    _write(tmp_path / "d", count=30)
    id_, fd, _ = synth.read_factor_samples(str(tmp_path / "d"), limit=24)
    assert np.array_equal(ia, id_) and np.array_equal(fa, fd)


def test_factors_independent_and_in_range():
    specs = synth.factor_specs("faces")
    assert len(specs) >= 6 and {s["kind"] for s in specs} == {"continuous", "discrete"}
    f = synth.factor_matrix(specs, [synth.sample_factors("faces", 0, i) for i in range(3000)])
    for j, s in enumerate(specs):
        if s["kind"] == "continuous":
            lo, hi = s["range"]
            assert lo <= f[:, j].min() and f[:, j].max() <= hi
            assert f[:, j].min() < lo + 0.02 * (hi - lo) and f[:, j].max() > hi - 0.02 * (hi - lo)  # covers the range
        else:
            assert set(np.unique(f[:, j]).astype(int)) == set(range(len(s["values"])))
    corr = np.corrcoef(f.T)
    off = np.abs(corr - np.eye(len(specs)))
    assert off.max() < 0.08, off.max()  # independent draws: |r| ~ 1/sqrt(3000) = 0.018


def test_factors_change_the_image():
    base = synth.sample_factors("faces", 0, 0)
    img = np.asarray(synth.render_face(base, 32), dtype=np.int32)
    for s in synth.factor_specs("faces"):
        f = dict(base)
        if s["kind"] == "continuous":
            lo, hi = s["range"]
            f[s["name"]] = hi if base[s["name"]] < (lo + hi) / 2 else lo
        else:
            f[s["name"]] = (base[s["name"]] + 1) % len(s["values"])
        assert np.abs(np.asarray(synth.render_face(f, 32), dtype=np.int32) - img).sum() > 0, s["name"]


def test_shards_hold_factors_and_stream(tmp_path):
    m = _write(tmp_path / "s", count=20).manifest
    assert m["complete"] and m["num_samples"] == 20 and m["kind"] == "faces" and m["seed"] == 5
    assert [f["name"] for f in m["factors"]] == [f["name"] for f in synth.FACE_FACTORS]
    with open(tmp_path / "s" / m["shards"][0]["name"], "rb") as fh:
        key, files, _ = next(iter_tar_samples(fh))
    assert set(files) == {"png", "json", "factors.json"}
    assert json.loads(files["factors.json"]) == synth.sample_factors("faces", 5, int(key))
    assert pack.verify(str(tmp_path / "s"), decode=True, progress=False)["ok"]
    ev = list(make_eval_loader(str(tmp_path / "s"), 32, 8, batch_size=8))
    assert sum(len(b["key"]) for b in ev) == 20 and ev[0]["hr"].shape == (8, 3, 32, 32) and ev[0]["lr"].shape[-1] == 8
    tr = make_train_loader(str(tmp_path / "s"), 32, 4, batch_size=4, num_workers=0, shuffle_buffer=4, batches_per_epoch=3)
    assert [b["hr"].shape[0] for b in tr] == [4, 4, 4]


def test_cli_and_bad_input(tmp_path):
    from laren.cli import main

    r = CliRunner().invoke(main, ["data", "synth", "faces", str(tmp_path / "c"), "--resolution", "32", "--count", "6",
                                  "--seed", "1", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "6 faces samples" in r.output and "eye_color" in r.output
    with pytest.raises(ValueError, match="count"):
        synth.synth("faces", str(tmp_path / "x"), 32, 0)
    with pytest.raises(ValueError, match="unknown synthetic"):
        synth.synth("cars", str(tmp_path / "x"), 32, 4)
    with pytest.raises(ValueError, match="other settings"):  # a DEST holding another seed is not overwritten
        synth.synth("faces", str(tmp_path / "c"), 32, 6, seed=2, progress=False)


def test_demo_data_is_written_once(tmp_path):
    """`make demo`'s data step: train (seed 0) and held-out (seed 1) sets; a complete set is kept, not rewritten."""
    from laren.demo import synth_demo_data

    urls = str(tmp_path / "train"), str(tmp_path / "val")
    said: list[str] = []
    assert synth_demo_data(*urls, train_count=12, val_count=6, log=said.append) == {"train": 12, "val": 6}
    first = pack.read_manifest(urls[1])
    assert first["seed"] == 1 and "already" not in " ".join(said)
    said.clear()
    assert synth_demo_data(*urls, train_count=12, val_count=6, log=said.append) == {"train": 12, "val": 6}
    assert len(said) == 2 and all("already written" in s for s in said)
    assert pack.read_manifest(urls[1]) == first
