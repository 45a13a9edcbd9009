"""A failed pack can be re-run in place with corrected settings; a finished data set and foreign files are kept."""

from __future__ import annotations

import os

import pytest

from laren.data import pack as P
from tests.conftest import write_random_pngs


@pytest.fixture
def src(tmp_path):
    return str(write_random_pngs(tmp_path / "src", [f"im{i}" for i in range(6)], (40, 48)))


def test_every_input_rejected_then_the_corrected_run_packs_in_place(src, tmp_path):
    dest = str(tmp_path / "ds")
    os.makedirs(dest)
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="every input was rejected"):
        P.pack(src, dest, "d", 64, progress=False)
    res = P.pack(src, dest, "d", 32, progress=False)
    assert res.manifest["num_samples"] == 6 and res.manifest["resolution"] == 32 and not res.manifest["rejected"]
    assert P.verify(dest, progress=False)["ok"]
    assert (tmp_path / "ds" / "notes.txt").read_text() == "mine"


def test_interrupted_pack_rerun_with_other_settings_replaces_only_its_own_shards(src, tmp_path):
    dest = str(tmp_path / "ds")

    class Killed(Exception):
        pass

    def kill(entry):
        raise Killed

    with pytest.raises(Killed):
        P.pack(src, dest, "d", 16, shard_size_mb=0.001, progress=False, on_shard=kill)
    assert os.listdir(dest) and not P.read_manifest(dest, require_complete=False)["complete"]
    for name in ("shard-000007.tar", "shard-x.tar", "keep.json"):  # an unlisted leftover of ours; two foreign files
        (tmp_path / "ds" / name).write_bytes(b"x")
    res = P.pack(src, dest, "d", 32, shard_size_mb=1, progress=False)
    assert res.shards_kept == 0 and res.manifest["num_samples"] == 6 and len(res.manifest["shards"]) == 1
    assert sorted(os.listdir(dest)) == ["keep.json", "manifest.json", "shard-000000.tar", "shard-x.tar"]
    assert P.verify(dest, progress=False)["ok"]
    with pytest.raises(ValueError, match="already holds a data set packed with other settings"):
        P.pack(src, dest, "d", 16, progress=False)  # a finished data set is never replaced
