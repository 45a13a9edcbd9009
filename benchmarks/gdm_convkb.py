"""HMRR's ConvKB sum for one chunk of attributes: the literal ReLU form vs the sorted-unit form laren uses.

    .venv/bin/python benchmarks/gdm_convkb.py

At the paper's widths (J=64 nodes: P = 4032 ordered pairs; C=8, Omega=8; a 256-attribute chunk; batch 2; one thread),
g[b, d] = mean_p sum_{o,k} w_ok ReLU(c[b,p,o,k] + theta_2o rho[b,p,d]) two ways:
- literal: the (B, P, Dc, Omega, C) tensor of ReLUs, summed with w (the form before laren/models/gdm.py's sorted units);
- sorted: ``convkb_sorted`` once, then ``convkb_mean_score``: a search and two lookups per (b, p, o, d) (what
  ``GraphDisentangle`` runs).
Both are timed forward and forward + backward in the same run (best of 3), and their outputs compared in float64.
``measure()`` returns the rows for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def literal(c_BPOC, rho_BPD, theta2_O, w_OC):
    import torch
    import torch.nn.functional as F

    h = F.relu(c_BPOC[:, :, None] + theta2_O[:, None] * rho_BPD[..., None, None])  # (B, P, Dc, Omega, C)
    return torch.einsum("bpdoc,oc->bd", h, w_OC) / h.shape[1]


def sorted_units(c_BPOC, rho_BPD, theta2_O, w_OC):
    from laren.models.gdm import convkb_mean_score, convkb_sorted

    return convkb_mean_score(*convkb_sorted(c_BPOC, w_OC), theta2_O, rho_BPD)


def _best(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(B: int = 2, J: int = 64, C: int = 8, omega: int = 8, chunk: int = 256) -> list[dict]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        P = J * (J - 1)
        c = torch.randn(B, P, omega, C)
        rho = torch.rand(B, P, chunk) * 2 * (torch.rand(B, P, chunk) > 0.5)  # about half the entries off the support
        theta2, w = torch.randn(omega), torch.randn(omega, C) / (omega * C) ** 0.5
        rows = []
        for name, fn in (("literal", literal), ("sorted", sorted_units)):
            leaves = [t.clone().requires_grad_() for t in (c, rho, theta2, w)]

            def fwd():
                with torch.no_grad():
                    fn(*leaves)

            def fwd_bwd():
                fn(*leaves).square().sum().backward()

            rows.append({"form": name, "fwd_s": _best(fwd), "fwd_bwd_s": _best(fwd_bwd)})
        d64 = [t.double() for t in (c, rho, theta2, w)]
        diff = (literal(*d64) - sorted_units(*d64)).abs().max().item()
        for r in rows:
            r["speedup_fwd"] = rows[0]["fwd_s"] / r["fwd_s"]
            r["speedup_fwd_bwd"] = rows[0]["fwd_bwd_s"] / r["fwd_bwd_s"]
            r["max_abs_diff_f64"] = diff
        return rows
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    for r in measure():
        print(f"{r['form']:8s} fwd {r['fwd_s']:.3f} s ({r['speedup_fwd']:.2f}x)  fwd+bwd {r['fwd_bwd_s']:.3f} s "
              f"({r['speedup_fwd_bwd']:.2f}x)  float64 max |diff| {r['max_abs_diff_f64']:.1e}")
