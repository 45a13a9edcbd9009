"""`laren upscale`: files, folders and globs; no warnings on stderr; outputs never overwritten without --overwrite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from laren.cli import main
from laren.config import RunConfig
from laren.upscale import expand_inputs, output_paths
from tests.integration._tiny_jobs import TINY_MODEL

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from laren.models.build import build_model
    from laren.train import state as S

    cfg = RunConfig.model_validate({"name": "up", "model": TINY_MODEL, "data": {"train_url": "unused"}})
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("ck") / "checkpoint_000000001"
    S.write_checkpoint_dir(d, build_model(cfg.model), None, {}, S.TrainState(step=1), cfg.to_dict())
    return str(d)


def _images(folder: Path, names: list[str], size: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / n)
    return [folder / n for n in names]


def test_expand_inputs_and_output_names(tmp_path):
    a, b, c = _images(tmp_path / "in", ["a.png", "b.jpg", "c.png"])
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    assert expand_inputs([str(tmp_path / "in")]) == [a, b, c]
    assert expand_inputs([str(tmp_path / "in" / "*.png"), str(c)]) == [a, c]  # each once, in order
    with pytest.raises(FileNotFoundError, match="no such image, folder or glob match"):
        expand_inputs([str(tmp_path / "nothing*.png")])
    (d,) = _images(tmp_path / "other", ["a.png"])
    with pytest.raises(FileExistsError, match="would both be written to"):
        output_paths([a, d], tmp_path / "out")
    assert output_paths([a, d], tmp_path / "out", overwrite=True) == [tmp_path / "out" / "a_sr.png"] * 2
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b_sr.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"1 output\(s\) exist already .*b_sr.png.*--overwrite"):
        output_paths([a, b], tmp_path / "out")


def test_upscale_cli_folder_glob_resize_no_warnings(checkpoint, tmp_path):
    _images(tmp_path / "in", ["a.png", "b.png"])
    _images(tmp_path / "big", ["c.png"], size=40)  # square: the array crop is the whole (read-only) image
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-W", "error", "-m", "laren.cli", "upscale", "--checkpoint", checkpoint, str(tmp_path / "in"),
           str(tmp_path / "big" / "*.png"), "--resize", "--out", str(tmp_path / "sr")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert sorted(os.listdir(tmp_path / "sr")) == ["a_sr.png", "b_sr.png", "c_sr.png"]
    assert Image.open(tmp_path / "sr" / "c_sr.png").size == (32, 32)
    before = (tmp_path / "sr" / "a_sr.png").read_bytes()
    (tmp_path / "sr" / "a_sr.png").write_bytes(b"mine")
    r = CliRunner().invoke(main, ["upscale", "--checkpoint", checkpoint, str(tmp_path / "in"), "--out", str(tmp_path / "sr")])
    assert r.exit_code == 2 and "exist already" in r.output and (tmp_path / "sr" / "a_sr.png").read_bytes() == b"mine"
    r = CliRunner().invoke(main, ["upscale", "--checkpoint", checkpoint, str(tmp_path / "in"), "--out", str(tmp_path / "sr"),
                                  "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "sr" / "a_sr.png").read_bytes() == before
