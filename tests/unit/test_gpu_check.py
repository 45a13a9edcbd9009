"""benchmarks/gpu_check.py's Python part on the CPU (smoke mode): it reports images/s, the step's FLOPs as the training
loop counts them (laren.flops: batch 1 x B) and MFU against the given peak."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from laren.flops import step_flops_per_image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check as G  # noqa: E402 - the benchmark script, importable from its folder


def test_cpu_smoke_reports_images_per_s_flops_and_mfu(tmp_path):
    out = tmp_path / "gpu_check.json"
    [r] = G.main(["--device", "cpu", "--tiny", "--compile", "off", "--batch", "2", "--warmup", "0", "--steps", "1",
                  "--peak-tflops", "0.5", "--out", str(out)])
    mcfg, loss = G.load_setup(tiny=True)
    assert r["flops_per_step"] == 2 * step_flops_per_image(mcfg, loss) > 0
    assert r["images_per_s"] == pytest.approx(2 / r["step_s"]) and r["images_per_s"] > 0
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] / r["step_s"] / 1e12)
    assert r["mfu"] == pytest.approx(r["tflops_per_s"] / 0.5)
    assert r["peak_mem_gib"] is None and r["device"] == "cpu"  # CUDA only
    assert out.is_file()
