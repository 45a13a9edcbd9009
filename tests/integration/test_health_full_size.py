"""Model health (model-spec 9) at the paper's widths: one full-size face64x forward on CPU passes the criteria (the
shipped models at test widths, 20 seeds each: tests/unit/test_health.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from laren.models import health
from laren.models.build import build_model
from laren.specs import load_any

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_full_size_face64x_forward_is_healthy():
    """One full-size face64x forward on CPU (encoder, GDM and CGM at the paper's widths; random prior). A pure
    compute test: it uses its share of the cores, all of them in one process (the suite's other tests keep to one
    intra-op thread); with pytest-xdist, the cores over the workers: more threads than cores spin and slow both."""
    share = len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, share))  # restored after the test (tests/conftest.py: one_torch_thread)
    cfg = load_any(REPO / "jobs" / "face64x.yaml").run_config().model
    cfg = cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"path": None})})
    torch.manual_seed(0)
    model = build_model(cfg)
    f = health.forward_figures(model, health.probe_images(2, cfg.lr_size))
    assert f["g_spread"] > 0.05 and f["gdm_mask_share"] <= 0.6 and f["cgm_noise_differ"] >= 0.9, f
    assert len([k for k in f if k.startswith("cgm_live/")]) == 17
