"""`laren validate`: missing inputs (data manifests, prior, VGG16 / AlexNet weights) are warnings; --strict fails."""

from __future__ import annotations

import numpy as np
import yaml
from click.testing import CliRunner
from PIL import Image

from laren.cli import main
from laren.data.pack import pack
from tests.integration._tiny_jobs import TINY_MODEL


def _job(path, **sections):
    doc = {"name": "v", "kind": "train", "model": TINY_MODEL, **sections}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_missing_inputs_warn_and_strict_fails(tmp_path):
    (tmp_path / "raw").mkdir()
    for i in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(tmp_path / "raw" / f"{i}.png")
    pack(str(tmp_path / "raw"), str(tmp_path / "ds"), "v", 32, progress=False)
    missing = _job(tmp_path / "jobs" / "missing.yaml",
                   model={**TINY_MODEL, "prior": {**TINY_MODEL["prior"], "path": str(tmp_path / "nope" / "prior")}},
                   data={"train_url": str(tmp_path / "no-such-set"), "val_url": str(tmp_path / "ds")},
                   loss={"vgg16_path": str(tmp_path / "vgg16.pth")}, eval={"alexnet_path": str(tmp_path / "alex.pth")})
    args = ["validate", missing, "--no-summary", "--no-health"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.output.splitlines() if ln.startswith("warning: ")]
    assert len(warnings) == 4, res.output
    for what in ("vgg16.pth", "alex.pth", "nope/prior.json", "data.train_url: " + str(tmp_path / "no-such-set")):
        assert any(what in w for w in warnings), what
    assert "# inputs: 4 missing or not fitting" in res.output
    res = CliRunner().invoke(main, [*args, "--strict"])
    assert res.exit_code == 1 and "error: 4 input(s) missing or not fitting (--strict)" in res.output

    ok = _job(tmp_path / "jobs" / "ok.yaml", data={"train_url": str(tmp_path / "ds")}, loss={"perceptual_weight": 0.0})
    res = CliRunner().invoke(main, ["validate", ok, "--no-summary", "--no-health", "--strict"])
    assert res.exit_code == 0 and "# inputs: all found" in res.output and "warning" not in res.output, res.output
