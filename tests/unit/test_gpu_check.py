"""benchmarks/gpu_check.py's Python part on the CPU: the device peak read from the device name, and FLOPs counted at
batch 1 and scaled (torch's counter, run directly at batch B, counts more than B single-sample steps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_check as G  # noqa: E402 - the benchmark script, importable from its folder


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0),
                                       ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                       ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)])
def test_peak_from_device_name(name, peak):
    assert G.peak_bf16_tflops(name) == peak


def test_flops_counted_at_batch_one_and_scaled():
    from torch.utils.flop_counter import FlopCounterMode

    mcfg, loss = G.load_setup(tiny=True)
    cpu = torch.device("cpu")
    one = G.count_flops(mcfg, loss, 1, cpu, bf16=False)
    assert G.count_flops(mcfg, loss, 4, cpu, bf16=False) == 4 * one
    step = G.Step(mcfg, loss, 4, cpu, bf16=False, compile_=False)
    with FlopCounterMode(display=False) as fc:
        step()
    assert fc.get_total_flops() > 4 * one  # the batched (grouped) modulated convolutions' backward is over-counted
