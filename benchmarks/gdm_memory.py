"""GDM peak memory, chunked vs unchunked (model-spec: the (B, P, D, Omega, C) tensor is never built whole).

    .venv/bin/python benchmarks/gdm_memory.py

One HMRR GDM (H=128, J=16 nodes, C=8, Omega=8) at D = N*H attributes for N = 2 and 8 codes, forward + backward at
batch 2, three ways: unchunked (one chunk spanning D, no recomputation), chunked (256 attributes per chunk, each
chunk recomputed in backward: the training default), and chunked without recomputation. Peak = bytes of tensors
alive at once during the call (CPU profiler allocation records, ``benchmarks/model_step.peak_bytes``).
``measure()`` returns the rows for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"unchunked": (10**9, False), "chunked 256 + recompute": (256, True), "chunked 256, no recompute": (256, False)}


def measure(H: int = 128, J: int = 16, C: int = 8, omega: int = 8, batch: int = 2, codes=(2, 8)) -> list[dict]:
    import torch

    from benchmarks.model_step import peak_bytes, time_fn
    from laren.models.gdm import GraphDisentangle

    dev = torch.device("cpu")
    rows = []
    for n in codes:
        for mode, (chunk, ck) in MODES.items():
            torch.manual_seed(0)
            gdm = GraphDisentangle(latent_dim=H, num_nodes=J, node_dim=C, num_codes=n, convkb_filters=omega,
                                   chunk_size=chunk, checkpoint_chunks=ck)
            z = torch.randn(batch, H, requires_grad=True)

            def step():
                out = gdm(z)
                (torch.cat(out, 1) if isinstance(out, list) else out).square().mean().backward()

            t = time_fn(step, dev, repeats=1)
            rows.append({"codes": n, "attributes": n * H, "mode": mode, "peak_mib": peak_bytes(step, dev) / 2**20,
                         "seconds": t})
    return rows


if __name__ == "__main__":
    for r in measure():
        print(f"D={r['attributes']:5d} {r['mode']:28s} peak {r['peak_mib']:8.1f} MiB  fwd+bwd {r['seconds']:.3f} s")
