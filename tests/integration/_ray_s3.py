"""A local Ray instance whose workers reach the local S3 server, with the tiny data set on it (Ray Train tests)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def ray_with_s3_data(s3_server, bucket: str, work: Path) -> Iterator[str]:
    """Set AWS_* to ``s3_server`` before the local Ray instance (4 logical CPUs) starts, so its workers inherit them;
    create ``bucket`` and pack the tiny data set to ``s3://<bucket>/datasets/tiny``; yield that URL. On exit: Ray shut
    down and the AWS_* variables restored."""
    import ray

    from laren.train.distributed import ensure_ray
    from tests.unit.test_train_loop import make_tiny_dataset

    saved = {k: os.environ.get(k) for k in s3_server.env()}
    os.environ.update(s3_server.env())
    try:
        s3_server.create_bucket(bucket)
        data = make_tiny_dataset(f"s3://{bucket}/datasets/tiny", work)
        ensure_ray(num_cpus=4)
        yield data
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
