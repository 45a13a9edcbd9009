"""GPU path check: a real `laren train` of a small job through Ray Train with one worker (NCCL on a GPU, bf16),
past its first log and eval steps, a checkpoint, a crash and the resume from that checkpoint.

    .venv/bin/python benchmarks/gpu_train_check.py [--device cuda|cpu] [--work DIR]

The job: the tiny LAREN (32 px prior, 8 px input) on crops of scikit-image's photographs, 8 steps of batch 4, a log
every step, evaluations and checkpoints at steps 4 and 8, one worker (use_gpu with --device cuda: NCCL; gloo on the
CPU), ``train.max_failures: 1``. The worker kills itself at step 6 (the test fault hook), Ray Train restarts the
worker group, and the run resumes from checkpoint 4. Checked afterwards: the run succeeded; ``plan.json`` and both
checkpoints exist; MLflow holds steps 1..8 of ``train/loss_g``, steps 1..4 once each (nothing trained twice before
the checkpoint), ``perf/tflops_per_gpu`` at steps 1..8 (and which steps have ``perf/mfu``: those of a GPU in
laren/flops.py's table), and ``val/psnr`` at 4 and 8. Prints one JSON line of findings; exit 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_job(work: Path, device: str) -> Path:
    from laren.demo import pack_demo_data
    from tests.integration._tiny_jobs import tiny_job

    train, val = str(work / "data" / "train"), str(work / "data" / "val")
    pack_demo_data(train, val, resolution=32, train_per_image=4, val_per_image=1, log=lambda *_: None)
    gpu = device == "cuda"
    return tiny_job(work, "gpu-path", (train, val), steps=8, eval_every=4, ckpt_every=4,
                    train={"bf16": True, "max_failures": 1},
                    resources={"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 1})


def check(work: Path, job: Path, proc: subprocess.CompletedProcess, seconds: float) -> dict:
    from mlflow.tracking import MlflowClient

    from laren.specs import load_job

    run_id = load_job(job).run_id
    run_dir = work / "storage" / "runs" / run_id
    out: dict = {"run_id": run_id, "exit_code": proc.returncode, "seconds": round(seconds, 1),
                 "killed_at_6": (work / "killed").exists(), "plan": (run_dir / "plan.json").is_file(),
                 "checkpoints": sorted(p.name for p in run_dir.glob("checkpoint_0*") if (p / "state.json").is_file())}
    try:
        c = MlflowClient(f"sqlite:///{work}/mlflow.db")
        exp = c.get_experiment_by_name("gpu-path")
        run = c.search_runs([exp.experiment_id], f"attributes.run_name = '{run_id}'")[0]
        steps = [m.step for m in c.get_metric_history(run.info.run_id, "train/loss_g")]
        out.update(loss_steps=sorted(set(steps)), once_before_ckpt=all(steps.count(s) == 1 for s in range(1, 5)),
                   val_steps=sorted(m.step for m in c.get_metric_history(run.info.run_id, "val/psnr")),
                   status=run.info.status, params_bf16=run.data.params.get("train.bf16"),
                   # laren/flops.py: perf/tflops_per_gpu at every log step; perf/mfu where the GPU's peak is known
                   tflops_steps=sorted({m.step for m in c.get_metric_history(run.info.run_id, "perf/tflops_per_gpu")}),
                   mfu_steps=sorted({m.step for m in c.get_metric_history(run.info.run_id, "perf/mfu")}))
    except Exception as err:  # noqa: BLE001 - reported as a finding
        out["mlflow_error"] = f"{type(err).__name__}: {err}"
    out["ok"] = (proc.returncode == 0 and out["killed_at_6"] and out["plan"]
                 and out["checkpoints"] == ["checkpoint_000000004", "checkpoint_000000008"]
                 and out.get("loss_steps") == out.get("tflops_steps") == list(range(1, 9))
                 and out.get("once_before_ckpt") is True
                 and set(out.get("val_steps", [])) == {4, 8} and out.get("status") == "FINISHED")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one)")
    args = ap.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="laren-gpu-path-"))
    job = make_job(work, args.device)
    env = {**os.environ, "LAREN_STORAGE": str(work / "storage"), "MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
           "LAREN_TEST_KILL_AT_STEP": "6", "LAREN_TEST_KILL_RANK": "0", "LAREN_TEST_KILL_MARKER": str(work / "killed"),
           "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance on this machine
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "laren.cli", "train", str(job)], cwd=work, env=env,
                          capture_output=True, text=True)
    (work / "train.log").write_text(proc.stdout + proc.stderr)
    out = check(work, job, proc, time.perf_counter() - t0)
    out["log"] = str(work / "train.log")
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
