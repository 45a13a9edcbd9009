#!/usr/bin/env bash
# GPU check (one H200: under 9 minutes in all). Five independent stages, each in its own process under its own time
# limit; a failing stage is reported and the next one runs. Everything goes to benchmarks/gpu_check.log; the summary
# (one line per stage, then the step table) is printed at the end for benchmarks/RESULTS.md.
#   1. torch   CUDA torch from the same constraints as `make setup` (constraints.txt: torch==2.13.0); installed from
#              the PyTorch CUDA index only when the environment's torch is not a CUDA build           (<= 90 s)
#   2. train   a real `laren train` of a small job through Ray Train, 1 GPU worker (NCCL, bf16): past its first log
#              and eval steps, a checkpoint, a crash at step 6 and the resume (benchmarks/gpu_train_check.py)  (<= 150 s)
#   3. step    the full-size 64x face step (16 -> 1024, batch 8, bf16), eager: images/s, peak memory, FLOPs counted
#              at batch 1 and scaled and MFU against the device's dense bf16 peak, both from laren/flops.py as the
#              training loop's perf/mfu (H200 989 TFLOP/s)                                              (<= 120 s)
#   4. compile the same step under torch.compile                                                         (<= 120 s)
#   5. loader  data.lr_on_device: the LR made on the GPU has the CPU path's bytes (TF32 allowed), and loader
#              samples/s per core, CPU LR vs device LR, at 1024^2 PNG (benchmarks/loader.py, 8 images)      (<= 60 s)
#   bash benchmarks/gpu_check.sh            (from the repository root; PY=... to choose the interpreter)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
LOG=benchmarks/gpu_check.log
: > "$LOG"
declare -a SUMMARY=()

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, log it, record PASS / FAIL (exit code) / TIMEOUT
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit} s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  local verdict=PASS
  [ "$rc" -eq 124 ] && verdict=TIMEOUT
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] && verdict="FAIL (exit $rc)"
  SUMMARY+=("$name: $verdict in $((SECONDS - t0)) s")
  echo "=== $name: $verdict" | tee -a "$LOG"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"

stage torch 90 bash -c "
  '$PY' -c 'import torch; assert torch.version.cuda and torch.__version__.split(\"+\")[0] == \"2.13.0\"; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())' ||
  { '$PY' -m pip install -q --index-url '$TORCH_INDEX_URL' -c constraints.txt torch==2.13.0 &&
    '$PY' -c 'import torch; assert torch.version.cuda; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda)'; }"
stage train 150 "$PY" benchmarks/gpu_train_check.py --device cuda
stage step 120 "$PY" benchmarks/gpu_check.py --device cuda --compile off --out benchmarks/gpu_check.off.json
stage compile 120 "$PY" benchmarks/gpu_check.py --device cuda --compile on --out benchmarks/gpu_check.on.json
stage loader 60 "$PY" benchmarks/loader.py --device cuda --images 8 --batches 4

echo
printf '%s\n' "${SUMMARY[@]}"
grep -h -A6 '^| loader path' "$LOG"
grep -h '^{"run_id"' "$LOG" | tail -1
"$PY" - <<'PY'
import json, pathlib
rows = []
for f in ("benchmarks/gpu_check.off.json", "benchmarks/gpu_check.on.json"):
    p = pathlib.Path(f)
    if p.is_file():
        rows += json.loads(p.read_text())
pathlib.Path("benchmarks/gpu_check.json").write_text(json.dumps(rows, indent=1))
if rows:
    print(f"device {rows[0]['device']}, peak {rows[0]['peak_tflops']} TFLOP/s dense bf16")
    print("| torch.compile | images/s | ms/step | TFLOP/step (batch 1 x B) | TFLOP/s | MFU | peak GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
    print(f"| {'on' if r['compile'] else 'off'} | {r['images_per_s']:.2f} | {r['step_s'] * 1e3:.1f} | "
          f"{r['flops_per_step'] / 1e12:.3f} | {r['tflops_per_s']:.1f} | {mfu} | {r['peak_mem_gib']:.1f} |")
PY
