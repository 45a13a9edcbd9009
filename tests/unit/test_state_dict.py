"""laren.models.state_dict.load_strict: every key and shape must match, or nothing is loaded."""

from __future__ import annotations

import pytest
import torch

from laren.models.state_dict import load_strict


class Refused(Exception):
    pass


def _net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_matching_weights_load():
    dst, src = _net(0), _net(1)
    load_strict(dst, src.state_dict(), "src")
    assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), src.state_dict().values()))


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("1.bias"), r"src: missing \['1.bias'\]$"),
    (lambda sd: sd.update(extra=torch.zeros(1)), r"src: unexpected \['extra'\]$"),
    (lambda sd: sd.update({"0.weight": torch.zeros(4, 5)}), r"src: shape mismatch \['0.weight \(4, 5\) \(expected \(4, 3\)\)'\]$"),
])
def test_any_mismatch_is_one_error_and_loads_nothing(change, words):
    dst, sd = _net(0), dict(_net(1).state_dict())
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    change(sd)
    with pytest.raises(Refused, match=words):
        load_strict(dst, sd, "src", error=Refused)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_ignore_unexpected_drops_keys_the_module_lacks():
    dst, src = _net(0), _net(1)
    load_strict(dst, {**src.state_dict(), "classifier.weight": torch.zeros(9)}, "src", ignore_unexpected=True)
    assert torch.equal(dst[1].bias, src[1].bias)
