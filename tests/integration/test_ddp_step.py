"""The training step under torch DDP, in two real gloo processes (no Ray): DDP's bucketed, overlapped all-reduce gives
the gradients of the hand-written flat all-reduce it replaced, and two workers give the gradients of one worker on
the same global batch. Tiny LAREN (32 px prior, 8 px LR), one ``train_step``."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from laren.train import collectives as C
from laren.train.step import step_modules, train_step
from tests.unit.test_train_loop import tiny_step_parts

GLOBAL_BATCH = 8


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(GLOBAL_BATCH, 3, 8, 8, generator=g) * 2 - 1, torch.rand(GLOBAL_BATCH, 3, 32, 32, generator=g) * 2 - 1


def _step(rank: int, world: int, adversarial_weight: float, ddp: bool) -> dict[str, torch.Tensor]:
    """One train_step of rank ``rank`` on its share of the global batch; returns every gradient and the losses."""
    cfg, model, disc, vgg, opt_g, opt_d, _, _ = tiny_step_parts(adversarial_weight)
    lr, hr = (t.chunk(world)[rank] for t in _batch())
    cpu = torch.device("cpu")
    fwd_g, fwd_d = step_modules(model, disc, cpu) if ddp else (model, disc)
    sync = None if ddp else (lambda params: C.allreduce_mean_grads(params, cpu))
    out = train_step(fwd_g, fwd_d, vgg, opt_g, opt_d, lr, hr, cfg.loss, dict(device_type="cpu", enabled=False), sync)
    grads = {f"G.{n}": p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    grads |= {f"D.{n}": p.grad.clone() for n, p in disc.named_parameters() if p.grad is not None}
    return grads | {f"out.{k}": v.detach().clone() for k, v in out.items()}


def _worker(rank: int, world: int, port: int, adversarial_weight: float, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {mode: _step(rank, world, adversarial_weight, ddp=mode == "ddp") for mode in ("ddp", "manual")}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _two_ranks(adversarial_weight: float, tmp_path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, adversarial_weight, str(tmp_path)), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_ddp_gradients_equal_the_manual_all_reduce(tmp_path):
    """With D trained (adversarial term on): every G and D gradient of the DDP step equals the hand-written
    all-reduce's, bit for bit (a/2 + b/2 == (a + b)/2 in floating point), and both ranks hold the same gradients."""
    ranks = _two_ranks(0.01, tmp_path)
    ddp, manual = ranks[0]["ddp"], ranks[0]["manual"]
    grads = [k for k in ddp if not k.startswith("out.")]
    assert any(k.startswith("D.") for k in grads) and any(k.startswith("G.cgm") for k in grads)
    assert set(grads) == {k for k in manual if not k.startswith("out.")}
    for k in grads:
        assert torch.equal(ddp[k], manual[k]), k
        assert torch.equal(ddp[k], ranks[1]["ddp"][k]), k  # averaged: the same on both ranks
    assert ddp["out.loss_d"] > 0 and torch.equal(ddp["out.loss_g"], manual["out.loss_g"])


def test_two_workers_give_the_gradients_of_one_on_the_same_global_batch(tmp_path):
    """Two ranks of 4 images vs one process with all 8: the same generator gradients (to float rounding). The
    adversarial term is off here because D's minibatch-stddev layer computes its statistics over each rank's images
    (as StyleGAN2's does), so D's maths depends on the per-rank batch by design."""
    ranks = [r["ddp"] for r in _two_ranks(0.0, tmp_path)]
    one = _step(0, 1, 0.0, ddp=False)
    keys = [k for k in one if k.startswith("G.")]
    assert keys and set(keys) == {k for k in ranks[0] if k.startswith("G.")}
    # float32 rounding through the deep graph: measured 6e-5 of a gradient's norm at most (a batch-coupled op would
    # show as a difference of order 1)
    worst = max(((ranks[0][k] - one[k]).norm() / one[k].norm().clamp_min(1e-30)).item() for k in keys)
    assert worst < 2e-4, worst
    # the pixel loss is a mean over images: the ranks' mean of their half-batch losses is the whole batch's
    halves = (ranks[0]["out.loss_pix"] + ranks[1]["out.loss_pix"]) / 2
    assert halves.item() == pytest.approx(one["out.loss_pix"].item(), rel=1e-6)
