"""In a process that is already a Ray driver (laren called from a program that started Ray), a malformed RAY_ADDRESS
is still refused, before any work starts on the running instance."""

from __future__ import annotations

import pytest
import ray

from laren.config import ConfigError
from laren.train.distributed import ensure_ray

pytestmark = pytest.mark.integration


def test_a_remote_dashboard_url_is_refused_while_connected(local_ray, monkeypatch):
    assert ray.is_initialized()
    monkeypatch.setenv("RAY_ADDRESS", "http://10.9.9.9:8265")
    with pytest.raises(ConfigError, match="is a dashboard URL"):
        ensure_ray()
    assert ray.is_initialized()  # the running connection is left as it was
    monkeypatch.delenv("RAY_ADDRESS")
    ensure_ray()  # no address: the running instance serves
