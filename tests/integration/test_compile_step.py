"""``train.compile``: the training step through ``torch.compile`` gives the eager step's losses on a tiny LAREN.

The test compiles with the ``aot_eager`` backend (Dynamo's graph capture and AOTAutograd's joint forward/backward
graphs, run by eager kernels): the part of compilation that breaks on unsupported code, in seconds of CPU rather than
inductor's C++ code generation (measured: ~10 min for this model on 2 loaded CPU cores, losses equal to 2e-7 over
3 steps). The GPU check (benchmarks/gpu_check.sh) times the inductor-compiled full-size step."""

from __future__ import annotations

import pytest
import torch

from laren.train.step import step_modules, train_step
from tests.unit.test_train_loop import tiny_step_parts


def _losses(compile_: bool, steps: int = 2) -> list[dict[str, float]]:
    cfg, model, disc, vgg, opt_g, opt_d, lr, hr = tiny_step_parts()
    fwd_g, fwd_d = step_modules(model, disc, torch.device("cpu"), compile_, compile_backend="aot_eager")
    out = []
    for _ in range(steps):
        o = train_step(fwd_g, fwd_d, vgg, opt_g, opt_d, lr, hr, cfg.loss, dict(device_type="cpu", enabled=False))
        out.append({k: v.item() for k, v in o.items()})
    return out


@pytest.mark.slow
def test_compiled_step_gives_the_eager_losses():
    eager, compiled = _losses(False), _losses(True)
    for e, c in zip(eager, compiled):
        for k in ("loss_g", "loss_pix", "loss_per", "loss_adv", "loss_d"):
            assert c[k] == pytest.approx(e[k], rel=1e-5), k
    assert compiled[1]["loss_g"] != compiled[0]["loss_g"]  # the compiled step trains
