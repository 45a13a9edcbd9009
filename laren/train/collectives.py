"""Every ``torch.distributed`` call of a training run, with its tensors on the training device.

NCCL, the backend of GPU runs, only moves CUDA tensors: a collective given a CPU tensor fails at its first call. So
every tensor handed to a collective here is made on (or already lives on) ``device``, the step's device, and
:func:`_check` refuses any other before the call. Collectives run whenever a process group exists, world size 1
included, so that a one-GPU run exercises the same calls as an eight-GPU one; without a process group (a plain
Python run) they do nothing.

    allreduce_mean_grads(params, device)   one flat all-reduce, divided by the world size (the prior's GAN training;
                                           the SR step's modules are in DDP)
    mean_across(tensor, device)            a tensor averaged over ranks, on the device (no host sync)
    broadcast_module(module, device)       rank 0's parameters and buffers to every rank
    sum_across(values, device)             a float64 vector summed over ranks (log and eval steps: a host sync)
    barrier(device)                        every rank waits for the others (resume: after a node's download)
    gather_objects(obj, device)            one picklable object per rank (RNG states at checkpoints)
    broadcast_object(obj, device)          rank 0's picklable object to every rank (the resume choice)
"""

from __future__ import annotations

from typing import Any, Union

import torch
import torch.distributed as dist


def active() -> bool:
    """A process group exists (Ray Train creates one for every world size, 1 included)."""
    return dist.is_available() and dist.is_initialized()


def _check(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    dev = torch.device(device)
    if t.device.type != dev.type or (dev.index is not None and t.device.index != dev.index):
        raise RuntimeError(f"collective tensor on {t.device}, but the training device is {dev}")
    return t


def allreduce_mean_grads(params: list[torch.nn.Parameter], device: torch.device) -> None:
    """Average gradients over ranks with one flat all-reduce (params without a grad contribute zeros)."""
    if not active() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p, device=device) for p in params]
    flat = _check(torch.cat([g.reshape(-1) for g in grads]), device)
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def mean_across(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` averaged over ranks (a new tensor; ``t`` itself without a process group)."""
    if not active():
        return t
    out = _check(t.detach().clone(), device)
    dist.all_reduce(out)
    return out / dist.get_world_size()


def broadcast_module(module: torch.nn.Module, device: torch.device) -> None:
    """Every parameter and buffer of ``module`` (already on ``device``) from rank 0."""
    if active():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(_check(t.data, device), src=0)


def sum_across(values: Union[list[float], torch.Tensor], device: torch.device) -> list[float]:
    """``values`` (floats, or a float64 vector already on ``device``) summed over ranks, as floats: the one host sync
    (unchanged values without a process group)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.float64, device=device)
    if active():
        dist.all_reduce(_check(t, device))
    return t.tolist()


def barrier(device: torch.device) -> None:
    """Wait for every rank: an all-reduce of one element on ``device`` (NCCL-safe; nothing without a process group)."""
    if active():
        dist.all_reduce(torch.zeros(1, device=device))


def gather_objects(obj: Any, device: torch.device) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group). For NCCL, torch moves the pickled
    bytes through the current CUDA device, which Ray Train sets to ``device``."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, device: torch.device) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself without a process group)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=torch.device(device))
    return box[0]
