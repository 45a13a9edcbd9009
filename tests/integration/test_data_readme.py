"""The README's "Preparing data" commands, run as written (paths and the S3 endpoint pointed at this test's folder and server)."""

from __future__ import annotations

import io
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from laren.cli import main

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def _section() -> str:
    text = README.read_text()
    start = text.index("## Preparing data")
    end = text.find("\n## ", start + 3)
    return text[start: end if end > 0 else len(text)]


def _laren(args: list[str]):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    assert r.exit_code == 0, f"laren {' '.join(args)} failed:\n{r.output}"
    return r.output


def test_demo_block_runs(s3_env, tmp_path, monkeypatch):
    block = re.search(r"```bash\n(.*?)```", _section(), re.S).group(1)
    lines = [ln for ln in block.splitlines() if ln.strip()]
    bucket = f"readme-{uuid.uuid4().hex[:8]}"
    s3_env.create_bucket(bucket)
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in lines:
        line = line.replace("s3://laren/", f"s3://{bucket}/")
        argv = shlex.split(line)
        if argv[0] == ".venv/bin/python":
            subprocess.run([sys.executable, *argv[1:]], check=True, cwd=tmp_path)
        elif argv[0] == "export":
            names = [a.split("=", 1)[0] for a in argv[1:]]
            assert set(names) == set(s3_env.env()), names  # the README names exactly the variables the server needs
            for k, v in s3_env.env().items():
                monkeypatch.setenv(k, v)
        else:
            assert argv[0] == ".venv/bin/laren", line
            outputs.append(_laren(argv[1:]))
    assert len(outputs) == 6
    assert "6 samples" in outputs[0] and outputs[1].rstrip().endswith("OK")
    assert "batch 3: lr (2, 3, 16, 16) hr (2, 3, 256, 256)" in outputs[2] and (tmp_path / "demo-grid.png").is_file()
    assert "6 samples" in outputs[3] and outputs[4].rstrip().endswith("OK")
    assert "6 samples in" in outputs[5] and "bad 0" in outputs[5]  # --eval: the whole set once


def _table_commands() -> list[list[str]]:
    cmds = re.findall(r"`(laren data pack [^`]+)`", _section())
    return [shlex.split(c)[1:] for c in cmds if "--name" in c]


def _source(kind: str, root: Path, side: int) -> Path:
    """A tiny source of the given layout with two real images of at least ``side`` pixels."""
    import skimage.data as d

    imgs = [d.retina(), d.retina()[::-1]] if side > 512 else [d.astronaut(), d.coffee()]
    if kind == "lmdb":
        import lmdb

        root.mkdir(parents=True)
        env = lmdb.open(str(root), map_size=1 << 27)
        with env.begin(write=True) as txn:
            for i, a in enumerate(imgs):
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="WEBP", quality=90)
                txn.put(f"{i:040x}".encode(), buf.getvalue())
        env.close()
    else:
        root.mkdir(parents=True)
        for i, a in enumerate(imgs):
            Image.fromarray(np.ascontiguousarray(a)).save(root / f"{i:05d}.png")
    return root


def test_dataset_table_commands(s3_env, tmp_path):
    cmds = _table_commands()
    names = [c[c.index("--name") + 1] for c in cmds]
    for expected in ("ffhq", "celebahq-test", "lsun-cat", "cat-test", "lsun-car", "car-test", "lsun-church", "lsun-church-test",
                     "lsun-bedroom", "lsun-bedroom-test", "lsun-tower", "lsun-tower-test"):
        assert expected in names
    bucket = f"table-{uuid.uuid4().hex[:8]}"
    s3_env.create_bucket(bucket)
    for argv in cmds:
        src, dest = argv[2], argv[3]
        res = int(argv[argv.index("--resolution") + 1])
        assert res == (1024 if "face" in dest or "ffhq" in dest or "celebahq" in dest else 256), argv
        kind = "lmdb" if "/lsun/" in src else "folder"
        local_src = _source(kind, tmp_path / "src" / src.strip("/").replace("/", "_"), res)
        dest = dest.replace("s3://laren/", f"s3://{bucket}/")
        out = _laren([*argv[:2], str(local_src), dest, *argv[4:], "--quiet", "--workers", "1"])
        assert "2 samples" in out, out
        assert _laren(["data", "verify", dest, "--quiet", "--decode"]).rstrip().endswith("OK")
        out = _laren(["data", "stream", dest, "--hr-size", str(res), "--lr-size", str(res // 16), "--eval",
                      "--batch-size", "2"])
        assert f"lr (2, 3, {res // 16}, {res // 16}) hr (2, 3, {res}, {res})" in out
