"""Checkpoint save time to S3 for the full-size 64x face model (LarenSR 1024 px + StyleGAN2 D + both Adam states), the
way a run saves one: ``laren.train.state.save_checkpoint`` to a local directory (safetensors + sha256 + JSON), then the
three files uploaded to a SeaweedFS S3 server on 127.0.0.1 (``laren.data.storage.upload_file``: multipart above
64 MiB, as Ray Train's pyarrow upload also does for large files).

    .venv/bin/python benchmarks/checkpoint_s3.py

``measure()`` returns {"bytes", "local_s", "upload_s", "total_s"} for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure() -> dict:
    import torch

    from laren.config import ModelConfig
    from laren.data import storage
    from laren.models.build import build_discriminator, build_model
    from laren.services import S3Server
    from laren.train import state as S

    cfg = ModelConfig()
    model, disc = build_model(cfg), build_discriminator(cfg)
    opts = {}
    for name, params in (("g", [p for p in model.parameters() if p.requires_grad]), ("d", list(disc.parameters()))):
        opt = torch.optim.Adam(params, lr=1e-4)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # creates exp_avg / exp_avg_sq, as after the first training step
        opts[name] = opt
    tmp = Path(tempfile.mkdtemp(prefix="laren-bench-ck-"))
    try:
        with S3Server(tmp / "s3") as s3:
            os.environ.update(s3.env())
            s3.create_bucket("bench")
            t0 = time.perf_counter()
            d = S.save_checkpoint(tmp / "ck", model, disc, opts, S.TrainState(step=1), {"model": cfg.model_dump(mode="json")})
            t1 = time.perf_counter()
            for f in (S.WEIGHTS_FILE, S.OPTIM_FILE, S.STATE_FILE):
                storage.upload_file(d / f, f"s3://bench/runs/bench/checkpoint_000000001/{f}")
            t2 = time.perf_counter()
            nbytes = sum((d / f).stat().st_size for f in (S.WEIGHTS_FILE, S.OPTIM_FILE, S.STATE_FILE))
            assert storage.size(f"s3://bench/runs/bench/checkpoint_000000001/{S.WEIGHTS_FILE}") == (d / S.WEIGHTS_FILE).stat().st_size
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"bytes": nbytes, "local_s": t1 - t0, "upload_s": t2 - t1, "total_s": t2 - t0,
            "params": sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in disc.parameters())}


if __name__ == "__main__":
    r = measure()
    print(f"checkpoint {r['bytes'] / 2**20:.0f} MiB: local save {r['local_s']:.1f} s, upload {r['upload_s']:.1f} s "
          f"({r['bytes'] / 2**20 / r['upload_s']:.0f} MiB/s), total {r['total_s']:.1f} s")
