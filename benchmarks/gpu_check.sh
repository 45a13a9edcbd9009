#!/usr/bin/env bash
# GPU check: the 64x face training step at batch 8 in bf16 on one GPU (H200: under 8 minutes in all):
# images/s, FLOPs per step (PyTorch's FLOP counter), MFU against 790 TFLOP/s, peak memory; torch.compile off and on.
# Writes benchmarks/gpu_check.json and benchmarks/gpu_check.log; paste the printed lines into benchmarks/RESULTS.md.
#   bash benchmarks/gpu_check.sh            (from the repository root, after `make setup` with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# Each setting in its own process, with its own time limit, so a slow compile cannot eat the eager figures.
timeout 180 "$PY" benchmarks/gpu_check.py --device cuda --compile off --out benchmarks/gpu_check.off.json 2>&1 | tee benchmarks/gpu_check.log
timeout 270 "$PY" benchmarks/gpu_check.py --device cuda --compile on --out benchmarks/gpu_check.on.json 2>&1 | tee -a benchmarks/gpu_check.log \
  || echo "compile on: did not finish within 270 s (see benchmarks/gpu_check.log)" | tee -a benchmarks/gpu_check.log
"$PY" - <<'PY'
import json, pathlib
rows = []
for f in ("benchmarks/gpu_check.off.json", "benchmarks/gpu_check.on.json"):
    p = pathlib.Path(f)
    if p.is_file():
        rows += json.loads(p.read_text())
pathlib.Path("benchmarks/gpu_check.json").write_text(json.dumps(rows, indent=1))
print("| torch.compile | images/s | ms/step | TFLOP/step (counted) | TFLOP/s | MFU (790) | peak GiB |")
print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {'on' if r['compile'] else 'off'} | {r['images_per_s']:.2f} | {r['step_s'] * 1e3:.1f} | "
          f"{r['flops_per_step'] / 1e12:.3f} | {r['tflops_per_s']:.1f} | {100 * r['mfu']:.2f}% | {r['peak_mem_gib']:.1f} |")
PY
