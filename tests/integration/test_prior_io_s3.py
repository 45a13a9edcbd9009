"""Prior import to and from S3: ``s3://`` destinations of laren.models.prior_io go through laren.data.storage to a
real S3 server, and the prior loads back bit for bit (the local formats: tests/unit/test_prior_io.py)."""

from __future__ import annotations

import pytest
import torch

from laren.models.prior_io import import_prior, load_prior
from tests.conftest import rosinality_checkpoint

pytestmark = pytest.mark.integration


def test_s3_round_trip_on_real_server(s3_env):
    """s3:// destinations go through laren.data.storage to a real S3 server; the prior loads back bit for bit."""
    ckpt = rosinality_checkpoint()
    s3_env.create_bucket("priors-test")
    meta = import_prior(str(ckpt), "s3://priors-test/priors/fx")
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket="priors-test")["Contents"]}
    assert keys == {"priors/fx.safetensors", "priors/fx.json"}
    g, _, meta2 = load_prior("s3://priors-test/priors/fx")
    assert meta2 == meta and g.resolution == 32
    ref = torch.load(ckpt, map_location="cpu", weights_only=True)["g_ema"]
    for k, v in g.state_dict().items():
        if k in ref:
            assert torch.equal(v, ref[k]), k
    with pytest.raises(FileNotFoundError, match="laren prior import"):
        load_prior("s3://priors-test/priors/other")
