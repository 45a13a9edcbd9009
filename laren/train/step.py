"""One training step of the SR model (paper Eq. 5; model-spec section 6), and the modules as the step calls them.

    generator step      sr = F(lr);  L_G = w_pix·mean((sr−hr)²) + w_per·mean((φ(sr)−φ(hr))²) + w_adv·softplus(−D(sr))
    discriminator step  L_D = softplus(−D(hr)) + softplus(D(sr))  (D's gradient only; no R1, as GLEAN)

:func:`step_modules` wraps the SR model and D for the step: torch DDP when a process group exists (bucketed gradient
all-reduce overlapped with the backward pass), then ``torch.compile`` when asked. laren/flops.py counts the FLOPs of
this same function.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from laren import losses as L
from laren.config import LossConfig
from laren.train import collectives as C

LOSS_KEYS = ("loss_g", "loss_pix", "loss_per", "loss_adv", "loss_d", "d_real", "d_fake")  # train_step's figures, in order

GradSync = Callable[[list[torch.nn.Parameter]], None]


def step_modules(model: torch.nn.Module, disc: torch.nn.Module, device: torch.device, compile_: bool = False,
                 compile_backend: str = "inductor") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The SR model and D as :func:`train_step` calls them: DDP wrappers when a process group exists (bucketed
    gradient all-reduce that overlaps the backward pass; parameters that need no gradient, the frozen generator's,
    are left out of its buckets), then ``torch.compile`` when asked. Optimizers, checkpoints, evaluation and health
    figures keep using the plain modules, whose parameters the wrappers share."""
    fwd_g, fwd_d = model, disc
    if C.active():
        ids = [device] if device.type == "cuda" else None
        # No broadcast at construction or per forward: the ranks start equal (broadcast at set-up) and no buffer
        # changes in training. Gradients live in DDP's buckets (no second fp32 copy of them).
        kw = dict(device_ids=ids, init_sync=False, forward_sync_buffers=False, gradient_as_bucket_view=True)
        fwd_g, fwd_d = DDP(model, **kw), DDP(disc, **kw)
    if compile_:
        fwd_g, fwd_d = torch.compile(fwd_g, backend=compile_backend), torch.compile(fwd_d, backend=compile_backend)
    return fwd_g, fwd_d


def train_step(model, disc, vgg, opt_g, opt_d, lr_img: torch.Tensor, hr_img: torch.Tensor, loss_cfg: LossConfig,
               autocast: dict[str, Any], average_grads: Optional[GradSync] = None) -> dict[str, torch.Tensor]:
    """One generator step, then one discriminator step (Eq. 5; see the module docstring), on one batch.

    ``model`` and ``disc`` are the modules as :func:`step_modules` gives them (DDP and/or ``torch.compile`` wrappers
    of the modules the optimizers hold, or those modules). ``average_grads``: called with each optimizer's
    parameters after its backward, for modules not wrapped in DDP (the hand-written all-reduce that DDP replaced,
    kept as the reference of the equivalence test and the benchmark). ``vgg`` is None when
    ``loss_cfg.perceptual_weight`` is 0; ``autocast`` holds the keyword arguments of ``torch.autocast``.

    D sees each fake image once: its logits on ``sr`` give the generator's adversarial term and, with the graph
    kept, the fake term of D's loss. That is the same value D's step would compute again on ``sr.detach()`` (D has
    not been updated yet and ``sr`` is the batch's SR image), so the maths is the two-pass step's. The backward
    passes are restricted to each optimizer's parameters (``inputs=``): the generator loss gives D no gradient, and
    D's loss none to the generator.

    Returns the scalar tensors ``loss_g``, ``loss_pix``, ``loss_per``, ``loss_adv``, ``loss_d``, ``d_real``,
    ``d_fake`` (D terms are 0 when ``loss_cfg.adversarial_weight`` is 0: D is then not trained).
    """
    use_adv = loss_cfg.adversarial_weight > 0
    g_params, d_params = optimizer_params(opt_g), optimizer_params(opt_d)
    # -- generator step
    with torch.autocast(**autocast):
        sr = model(lr_img)
        l_pix = L.pixel_loss(sr.float(), hr_img)
        l_per = L.perceptual_loss(vgg, sr, hr_img) if vgg is not None else sr.new_zeros(())
        logit_fake = disc(sr) if use_adv else None
        l_adv = L.g_adversarial_loss(logit_fake, loss_cfg.adversarial) if use_adv else sr.new_zeros(())
        loss_g = (loss_cfg.pixel_weight * l_pix + loss_cfg.perceptual_weight * l_per.float()
                  + loss_cfg.adversarial_weight * l_adv.float())
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward(inputs=g_params, retain_graph=use_adv)  # D's graph on the fake is used again below
    if average_grads is not None:
        average_grads(g_params)
    opt_g.step()

    # -- discriminator step
    l_d = d_real = d_fake = loss_g.detach().new_zeros(())  # on the training device, as every figure the loop sums
    if use_adv:
        with torch.autocast(**autocast):
            logit_real = disc(hr_img)
            l_d = L.d_loss(logit_real.float(), logit_fake.float())
        opt_d.zero_grad(set_to_none=True)
        l_d.backward(inputs=d_params)
        if average_grads is not None:
            average_grads(d_params)
        opt_d.step()
        d_real, d_fake = logit_real.detach().float().mean(), logit_fake.detach().float().mean()
    return {"loss_g": loss_g, "loss_pix": l_pix, "loss_per": l_per, "loss_adv": l_adv,
            "loss_d": l_d, "d_real": d_real, "d_fake": d_fake}


def optimizer_params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The optimizer's parameters, in the order they were given to it."""
    return [p for group in opt.param_groups for p in group["params"]]
