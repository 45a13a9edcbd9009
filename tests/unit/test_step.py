"""The training step under bf16 autocast on the CPU (torch supports bf16 autocast for CPU convolutions and matrix
products): the step runs, its losses are the fp32 step's to bf16 precision, and it trains the same parameters."""

from __future__ import annotations

import pytest
import torch

from laren.train.step import train_step
from tests.unit.test_train_loop import tiny_step_parts


def _step(bf16: bool) -> tuple[dict[str, float], set[str]]:
    cfg, model, disc, vgg, opt_g, opt_d, lr, hr = tiny_step_parts()
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *(("D." + n, p) for n, p in disc.named_parameters())]}
    out = train_step(model, disc, vgg, opt_g, opt_d, lr, hr, cfg.loss,
                     dict(device_type="cpu", dtype=torch.bfloat16, enabled=bf16))
    moved = {n for n, p in [*model.named_parameters(), *(("D." + n, p) for n, p in disc.named_parameters())]
             if not torch.equal(p.detach(), before[n])}
    return {k: v.item() for k, v in out.items()}, moved


def test_bf16_autocast_step_on_cpu_matches_fp32():
    fp32, moved32 = _step(False)
    bf16, moved16 = _step(True)
    for k in ("loss_g", "loss_pix", "loss_per", "loss_adv", "loss_d"):
        assert bf16[k] == pytest.approx(fp32[k], rel=0.05), k  # bf16 keeps 8 bits of mantissa: ~0.4 % per op
        assert bf16[k] != fp32[k], k  # autocast did run in bf16
    assert moved16 == moved32 and not any(n.startswith("generator.") for n in moved16)
