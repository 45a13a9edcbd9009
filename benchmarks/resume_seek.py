"""Time to the first batch after resume at 90 % of a pass: the old path (re-create the pass, decode and drop every
batch already consumed) vs the new one (seek to the saved data position: replay indices, decode only the shuffle
buffer and the partial batch).

    .venv/bin/python benchmarks/resume_seek.py [--images 3000] [--side 128] [--batch-size 8] [--buffer 32] [--workers 1]

Packs real images (scikit-image photos, as benchmarks/data_pipeline.py) into a local folder, runs the training loader
for 90 % of a pass to get the saved position (not timed), then times, for each path, a fresh loader from the start of
its ``iter()`` (worker start-up included) to its first batch, and checks that both give the same batch.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.data_pipeline import make_sources  # noqa: E402
from laren.data import pack as P  # noqa: E402
from laren.data.pipeline import make_train_loader  # noqa: E402


def first_batch_s(loader, batch: int, position) -> tuple[float, dict]:
    """Seconds from the start of the resumed pass to its first batch; the batch."""
    loader.seek(batch, position)
    t0 = time.perf_counter()
    it = iter(loader)
    b = next(it)
    dt = time.perf_counter() - t0
    it.close()
    return dt, b


def measure(images: int = 3000, side: int = 128, batch_size: int = 8, buffer: int = 32, workers: int = 1,
            at: float = 0.9) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="laren-bench-resume-"))
    url = str(tmp / "ds")
    P.pack(str(make_sources(tmp, images, side)), url, "resume", side, shard_size_mb=2, workers=2, progress=False)
    per_pass = math.ceil(images / batch_size)
    cut = int(at * per_pass)

    def loader():
        return make_train_loader(url, side, side // 4, batch_size, num_workers=workers, seed=0, shuffle_buffer=buffer,
                                 batches_per_epoch=per_pass)

    run = loader()
    it = iter(run)
    for _ in range(cut):  # the run that saved the checkpoint
        next(it)
    position = run.position()
    it.close()
    old_s, old_b = first_batch_s(loader(), cut, None)
    new_s, new_b = first_batch_s(loader(), cut, [position])
    same = old_b["key"] == new_b["key"] and all(torch.equal(old_b[k], new_b[k]) for k in ("hr", "lr"))
    return {"images": images, "side": side, "batch_size": batch_size, "buffer": buffer, "workers": workers,
            "batches_per_pass": per_pass, "cut": cut, "old_s": old_s, "new_s": new_s, "ratio": new_s / old_s,
            "same_batch": same}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--side", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--buffer", type=int, default=32, help="shuffle buffer (samples per loader worker)")
    ap.add_argument("--workers", type=int, default=1, help="loader workers")
    a = ap.parse_args(argv)
    r = measure(a.images, a.side, a.batch_size, a.buffer, a.workers)
    print(f"{r['images']} images {r['side']}^2, batch {r['batch_size']}, buffer {r['buffer']}, {r['workers']} loader "
          f"worker(s); resume at batch {r['cut']} of {r['batches_per_pass']}\n"
          f"old (decode and drop): {r['old_s']:.2f} s   new (seek): {r['new_s']:.3f} s   new / old: "
          f"{100 * r['ratio']:.1f} %   same first batch: {r['same_batch']}")
    return r


if __name__ == "__main__":
    main()
