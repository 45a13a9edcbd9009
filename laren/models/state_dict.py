"""The one strict loader of weights into a module: every key and every shape must match before anything is copied.

``torch.nn.Module.load_state_dict(strict=True)`` names missing and unexpected keys but fails on the first shape
mismatch with a long trace; here a mismatch of any kind is one error, raised as the caller's type (``ValueError``,
``CheckpointError``) with the caller's words for the source, and the module is left untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from laren.data import storage


def read_torch_state_dict(url: str | Path, not_found: str) -> dict[str, torch.Tensor]:
    """A torch-saved state dict (torchvision's ``.pth``) at a local path or s3:// URL (cached once per node), read with
    ``weights_only=True``: no pickled code runs. ``FileNotFoundError(not_found)`` when it is absent."""
    try:
        p = storage.local_copy(url)
    except FileNotFoundError:
        raise FileNotFoundError(not_found) from None
    state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{p}: expected a state dict (name -> tensor), got {type(state).__name__}.")
    return state

def load_strict(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str,
                error: type[Exception] = ValueError, ignore_unexpected: bool = False) -> None:
    """Load ``weights`` into ``module`` when they hold exactly its keys with its shapes; else raise ``error`` with
    ``what`` (the source and what it should be) and the first missing, unexpected and mis-shaped keys.
    ``ignore_unexpected``: keys the module lacks are dropped (a backbone's classifier in a full-network file)."""
    own = module.state_dict()
    if ignore_unexpected:
        weights = {k: v for k, v in weights.items() if k in own}
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in weights.items()
              if k in own and tuple(v.shape) != tuple(own[k].shape)]
    problems = [f"{name} {keys[:4]}" for name, keys in
                (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        raise error(f"{what}: " + ", ".join(problems))
    module.load_state_dict(dict(weights), strict=True)
