"""Model FLOPs utilisation: the FLOPs of one training step per image, and the accelerator's peak.

    step_flops_per_image(model_cfg, loss_cfg)   FLOPs of one training step per image (counted once, on the meta device)
    count_step_flops(model, disc, vgg, ...)     FLOPs of one step of given modules and inputs, any batch and device
    peak_tflops(device_name, bf16)              the device's dense peak in TFLOP/s, or None when unknown
    mfu_metrics(images_per_s, ...)              ``perf/tflops_per_gpu`` and (with a peak) ``perf/mfu``

How the FLOPs are counted
-------------------------
``torch.utils.flop_counter.FlopCounterMode`` records the matrix products and convolutions (forward and backward; a
multiply-add is 2 FLOPs; elementwise ops, pooling, the optimizers and the loss reductions are not counted, as usual for
MFU) of one training step, ``laren.train.step.train_step`` itself, run on the meta device (shapes only: no memory,
no weights; the prior is the job's architecture with random weights, which changes no FLOP):

    generator step      sr = F(lr) (encoder, latent head / GDM, CGM, the frozen StyleGAN2 generator); pixel loss;
                        VGG16 on sr (with grad) and on hr (under no_grad); D(sr); backward to the generator's
                        trainable parameters only
    discriminator step  D(hr); backward of D's loss (its fake term reuses D(sr) above) to D's parameters only

Backward is counted for what autograd computes, i.e. what the trainer differentiates: gradients reach the trainable
parameters (encoder, head, CGM; then D) and the activations on the way to them. The frozen generator's weights get
no weight gradient (``requires_grad`` False: torch's ``convolution_backward`` skips it and the counter sees its
``output_mask``), nor do D's in the generator's backward (restricted to the generator's parameters), but the
modulated weights (frozen weight x style) do, since the style is trained.
The GDM's chunks are built without recomputation here (``gdm.checkpoint_chunks`` off): recomputation is work done,
not model FLOPs, so MFU does not count it (as PaLM's definition). Everything in the step is per sample, so

    FLOPs per step at per-rank batch B = B x step_flops_per_image

counted at batch 1. Counting directly at batch B is wrong with torch's counter: StyleGAN2's modulated convolutions run
as ONE grouped convolution with groups = B (each sample its own weights), and torch's formula for a convolution's
weight gradient ignores the groups, counting every output channel against all C_in input channels instead of
C_in / groups: B times too many for that term. At batch 1 groups = 1 and the count is exact (the only other grouped
convolutions, the FIR blurs, have a fixed kernel: no weight gradient). The counter used here also corrects that term
(:func:`_conv_backward_flop`, divided by the groups), so a batch-B count equals B x the batch-1 count
(tests/unit/test_flops.py checks both against a hand count). The precision (bf16 autocast or fp32) changes no count.

The full-size 64x face step (jobs/face64x.yaml, 16 -> 1024) counts 3.32 TFLOP per image: the SR model forward and
backward 0.48 (almost all in the frozen generator), VGG16 1.75 (SR image forward and backward 1.17, HR image forward
0.58), D 1.09 (forward on the fake once and on the real image, the fake's input gradient for the generator, D's
weight gradients). (The first count, 4.06, was made while the HR image still went through VGG16 in the SR image's
graph, its backward 0.58 since gone, and D saw each fake twice, 0.16 more.) MFU =
images/s per GPU x FLOPs per image / the device's dense peak at the run's precision (bf16 autocast on, or fp32).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.utils import flop_counter as fc

from laren import losses as L
from laren.config import LossConfig, ModelConfig
from laren.models.build import build_discriminator, build_model
from laren.train.step import train_step

aten = torch.ops.aten

#: Dense (no sparsity) peaks in TFLOP/s by device-name substring (``torch.cuda.get_device_name``), most specific
#: first: (bf16 tensor cores, fp32). NVIDIA data sheets, sparse figures halved. fp32 is the TF32 tensor-core peak on
#: Ampere and later: cuDNN runs fp32 convolutions (the bulk of this model) in TF32 by default
#: (``torch.backends.cudnn.allow_tf32``).
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
    ("GH200", 989.0, 494.5), ("H200 NVL", 835.0, 417.5), ("H200", 989.0, 494.5),
    ("H100 NVL", 835.0, 417.5), ("H100 PCIe", 756.0, 378.0), ("H100", 989.0, 494.5),
    ("B200", 2250.0, 1125.0), ("A100", 312.0, 156.0), ("L40S", 362.0, 183.0), ("A10G", 70.0, 35.0),
    ("L4", 121.0, 60.0),
)


def peak_tflops(device_name: Optional[str], bf16: bool = True) -> Optional[float]:
    """The dense bf16 (or fp32) peak of the device named ``device_name``, or None (CPU, or not in the table)."""
    for key, p_bf16, p_fp32 in PEAK_TFLOPS:
        if device_name and key in device_name:
            return p_bf16 if bf16 else p_fp32
    return None


def device_peak_tflops(device: torch.device, bf16: bool, configured: Optional[float] = None) -> Optional[float]:
    """The peak that MFU is measured against: ``configured`` (``resources.peak_tflops``) when set, else the table's
    figure for a CUDA device's name; None on the CPU or an unknown device (no MFU then)."""
    if configured:
        return float(configured)
    return peak_tflops(torch.cuda.get_device_name(device), bf16) if device.type == "cuda" else None


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """torch's ``conv_backward_flop`` with the weight-gradient term divided by ``groups`` (see the docstring)."""
    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flop = fc.conv_flop_count(grad_out_shape, w_shape, x_shape, not transposed) if output_mask[0] else 0
    if output_mask[1]:  # the weight gradient as a convolution of the input with grad_out (swapped for transposed)
        a, b = (grad_out_shape, x_shape) if transposed else (x_shape, grad_out_shape)
        flop += fc.conv_flop_count(t(a), t(b), t(w_shape), transposed=False) // groups
    return flop


def flop_counter() -> fc.FlopCounterMode:
    """torch's FLOP counter with the grouped-convolution backward corrected."""
    return fc.FlopCounterMode(display=False, custom_mapping={aten.convolution_backward: _conv_backward_flop})


def count_step_flops(model, disc, vgg, lr_img: torch.Tensor, hr_img: torch.Tensor, loss_cfg: LossConfig) -> int:
    """FLOPs (corrected counter) of one ``train_step`` of these modules on this batch: its forward and backward
    passes, the very code training runs (the optimizers here are SGD with a zero rate: their elementwise updates
    count no FLOP and change nothing)."""
    opt_g = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    opt_d = torch.optim.SGD(disc.parameters(), lr=0.0)
    with flop_counter() as counter:
        train_step(model, disc, vgg, opt_g, opt_d, lr_img, hr_img, loss_cfg, dict(device_type="cpu", enabled=False))
    return int(counter.get_total_flops())


def step_flops_per_image(model_cfg: ModelConfig, loss_cfg: LossConfig) -> int:
    """FLOPs of one training step per image: counted at batch 1 on the meta device (see the module docstring).
    Leaves the random number generators as it found them."""
    cfg = model_cfg.model_copy(update={"prior": model_cfg.prior.model_copy(update={"path": None}),
                                       "gdm": model_cfg.gdm.model_copy(update={"checkpoint_chunks": False})})
    R, l = cfg.prior.resolution, cfg.lr_size
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model(cfg, device="meta").train()
        disc = build_discriminator(cfg, device="meta").train()
        vgg = L.VGG16Features() if loss_cfg.perceptual_weight > 0 else None
        return count_step_flops(model, disc, vgg, torch.empty(1, 3, l, l), torch.empty(1, 3, R, R), loss_cfg)


def mfu_metrics(images_per_s_per_gpu: float, flops_per_image: int, peak: Optional[float]) -> dict[str, float]:
    """``perf/tflops_per_gpu`` (achieved model TFLOP/s per GPU) and, with a peak, ``perf/mfu`` (its share of it)."""
    tflops = images_per_s_per_gpu * flops_per_image / 1e12
    return {"perf/tflops_per_gpu": tflops, **({"perf/mfu": tflops / peak} if peak else {})}
