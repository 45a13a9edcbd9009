"""laren/flops.py: torch's FLOP counter over-counts a grouped convolution's weight gradient by the group count (a hand
count), counting at batch 1 avoids it, the per-image count of the training step does not depend on the batch; the device
peaks. (The training loop's perf/tflops_per_gpu and perf/mfu: tests/integration/test_train_in_process.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from laren import flops, losses as L
from laren.models.build import build_discriminator, build_model
from laren.specs import load_job
from tests.unit.test_train_loop import tiny_config


def _counts(fn) -> tuple[int, int]:
    """(torch's plain count, the corrected count) of ``fn()``: both counters watch the same ops."""
    with FlopCounterMode(display=False) as plain, flops.flop_counter() as corrected:
        fn()
    return plain.get_total_flops(), corrected.get_total_flops()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_grouped_conv_backward_over_count_and_correction(groups, transposed):
    # x (N=2, 8 channels, 6x6), 3x3 kernel, 12 output channels in `groups` groups; stride 1, no padding.
    n, cin, cout, k, s = 2, 8, 12, 3, 6
    x = torch.randn(n, cin, s, s, requires_grad=True)
    if transposed:  # conv_transpose2d: weight (cin, cout / groups, k, k); output 8x8; MACs per input pixel
        w = torch.randn(cin, cout // groups, k, k, requires_grad=True)
        macs = n * s * s * k * k * cin * (cout // groups)
        step = lambda: F.conv_transpose2d(x, w, groups=groups).sum().backward()  # noqa: E731
    else:  # conv2d: weight (cout, cin / groups, k, k); output 4x4; MACs per output pixel
        w = torch.randn(cout, cin // groups, k, k, requires_grad=True)
        macs = n * (s - k + 1) ** 2 * k * k * cout * (cin // groups)
        step = lambda: F.conv2d(x, w, groups=groups).sum().backward()  # noqa: E731
    # By hand: forward, grad of the input and grad of the weight are each `macs` multiply-adds (2 FLOPs each).
    plain, corrected = _counts(step)
    assert corrected == 3 * 2 * macs
    assert plain == (2 + groups) * 2 * macs  # torch counts the weight gradient `groups` times
    # without a weight gradient (a frozen weight) there is nothing to over-count
    w.requires_grad_(False)
    assert _counts(step) == (2 * 2 * macs, 2 * 2 * macs)


def _tiny(batch: int):
    """The tiny training step's FLOP count at ``batch``, as a call (GDM chunks without recomputation, as counted)."""
    cfg = tiny_config("unused", "unused")
    mcfg = cfg.model.model_copy(update={"gdm": cfg.model.gdm.model_copy(update={"checkpoint_chunks": False})})
    with torch.device("meta"):  # shapes only: the counts do not depend on the values
        model, disc, vgg = build_model(mcfg, "meta").train(), build_discriminator(mcfg, "meta").train(), L.VGG16Features()
        R, l = mcfg.prior.resolution, mcfg.lr_size
        lr, hr = torch.empty(batch, 3, l, l), torch.empty(batch, 3, R, R)
    return lambda: flops.count_step_flops(model, disc, vgg, lr, hr, cfg.loss)


def test_step_flops_per_image_is_batch_independent():
    cfg = tiny_config("unused", "unused")
    rng = torch.get_rng_state()
    with FlopCounterMode(display=False) as plain1:
        per_image = flops.step_flops_per_image(cfg.model, cfg.loss)  # meta device, batch 1, corrected counter
    assert torch.equal(torch.get_rng_state(), rng)  # counting draws no random numbers from the run's streams
    assert per_image > 1e9  # the tiny step: about 2 GFLOP per image
    assert plain1.get_total_flops() == per_image  # at batch 1 (groups = 1) torch's own counter agrees
    # batch 2: the corrected count is twice the per-image figure; torch's plain count is more (modulated convolutions
    # batched as groups = 2)
    plain2, corrected2 = _counts(_tiny(2))
    assert corrected2 == 2 * per_image
    assert plain2 > corrected2


@pytest.mark.parametrize("name,bf16,peak", [("NVIDIA H200", True, 989.0), ("NVIDIA H200 NVL", True, 835.0),
                                            ("NVIDIA GH200 480GB", True, 989.0), ("NVIDIA H100 80GB HBM3", False, 494.5),
                                            ("NVIDIA H100 PCIe", True, 756.0), ("NVIDIA A100-SXM4-80GB", True, 312.0),
                                            ("NVIDIA L4", True, 121.0), ("Some Future GPU", True, None), (None, True, None)])
def test_peak_from_device_name(name, bf16, peak):
    assert flops.peak_tflops(name, bf16) == peak


def test_cpu_has_no_peak_unless_configured():
    cpu = torch.device("cpu")
    assert flops.device_peak_tflops(cpu, bf16=False) is None
    assert flops.device_peak_tflops(cpu, bf16=False, configured=2.5) == 2.5
    assert flops.mfu_metrics(10.0, 2 * 10**11, None) == {"perf/tflops_per_gpu": pytest.approx(2.0)}
    assert flops.mfu_metrics(10.0, 2 * 10**11, 4.0) == {"perf/tflops_per_gpu": pytest.approx(2.0),
                                                        "perf/mfu": pytest.approx(0.5)}


def test_peak_tflops_is_bounded_and_not_part_of_the_run_id():
    from pydantic import ValidationError

    cfg = tiny_config("data", "sqlite:///x.db")
    with_peak = tiny_config("data", "sqlite:///x.db", resources=dict(peak_tflops=100.0))
    assert with_peak.run_id == cfg.run_id  # the peak changes no result
    for job in ("jobs/face64x.yaml", "jobs/eval-demo.yaml", "jobs/ablation-synth.yaml"):  # train, eval, grid
        spec = load_job(Path(__file__).parents[2] / job)
        peaked = spec.model_copy(update={"resources": spec.resources.model_copy(update={"peak_tflops": 100.0})})
        assert peaked.config_hash() == spec.config_hash(), job
    for bad in (0, -1.0, 1e6):
        with pytest.raises(ValidationError, match="peak_tflops"):
            tiny_config("data", "sqlite:///x.db", resources=dict(peak_tflops=bad))

