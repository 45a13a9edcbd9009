"""The tiny data set on the session S3 server, for the Ray Train tests on the shared in-process Ray instance."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from tests.conftest import environ


@contextlib.contextmanager
def ray_with_s3_data(s3_server, bucket: str, work: Path) -> Iterator[str]:
    """AWS_* set to ``s3_server`` in this process for the block (the session Ray instance's workers have them from its
    node: the ``ray_head`` fixture); create ``bucket`` and pack the tiny data set to ``s3://<bucket>/datasets/tiny``;
    yield that URL."""
    from tests.unit.test_train_loop import make_tiny_dataset

    with environ(s3_server.env()):
        s3_server.create_bucket(bucket)
        yield make_tiny_dataset(f"s3://{bucket}/datasets/tiny", work)
