"""`laren ...`: a thin command line over the library. Each command group lives in its own section below."""

from __future__ import annotations

import json
import os
import sys
import time

import click

import laren.data
from laren.config import ConfigError, project_root
from laren.redact import redact_text
from laren.specs import LoadedSweep, load_any, load_job, load_sweep

# Each command imports the modules it runs inside its function: they load torch, Ray, MLflow or WebDataset (seconds),
# and `laren --help`, `laren validate` and a mistyped command must answer at once.


class _Group(click.Group):
    """Turns user errors (ConfigError, FileNotFoundError, a refused checkpoint, storage and network failures) into one
    clean line; ``laren --debug`` shows their traceback instead."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Exception as err:  # noqa: BLE001 - re-raised unless _user_error
            if ctx.params.get("debug") or not _user_error(err):
                raise
            click.echo(f"error: {redact_text(str(err))}", err=True)
            sys.exit(2)


def _user_error(err: BaseException) -> bool:
    """An error whose message says what to fix; its module (torch, boto3) is loaded only once a command needs it."""
    if isinstance(err, (ConfigError, FileNotFoundError, ConnectionError)):
        return True
    storage, state = sys.modules.get("laren.data.storage"), sys.modules.get("laren.train.state")
    return (storage is not None and isinstance(err, storage.StorageError)) or (
        state is not None and isinstance(err, state.CheckpointError))


@click.group(cls=_Group)
@click.version_option(package_name="laren")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error instead of its one-line message.")
def main(debug: bool) -> None:
    """laren: large-factor GAN-prior super-resolution (LAREN): data, training, sweeps, jobs."""
    # A person at a terminal: a wrong S3 endpoint is one line in seconds, not minutes of retries. The command of a
    # submitted job (LAREN_JOB, set by `laren submit`) keeps the long-job budget: a brief outage must not fail it.
    laren.data.S3_FAIL_FAST = os.environ.get("LAREN_JOB") != "1"


@main.group()
def model() -> None:
    """Inspect models."""


@main.group()
def prior() -> None:
    """Import or train StyleGAN2 priors."""


@main.group()
def data() -> None:
    """Pack, verify and stream data sets."""


# --- commands are registered below, one section per area (model, prior, data, train, jobs). ---

# ==== section: model (laren model ...) ====


@model.command("summary")
@click.argument("job_file", type=click.Path(dir_okay=False))
def model_summary_cmd(job_file) -> None:
    """Parameter counts per module of JOB_FILE's model (Table III style); no weights are read."""
    from laren.models.build import parameter_summary

    job = load_job(job_file)
    m = job.model
    latent = m.latent_space + (f" ({m.gdm_relation})" if m.latent_space == "g" else "")
    noise = m.noise_source + (f" ({m.cgm_relation})" if m.noise_source == "cgm" else "")
    click.echo(f"{job.name}: {m.scale}x SR, {m.lr_size} -> {m.prior.resolution}; latent space {latent}; noise {noise}")
    click.echo(f"{'module':<24}{'parameters':>14}{'':>10}  trainable")
    for name, n, trainable in parameter_summary(m):
        click.echo(f"{name:<24}{n:>14,}{n / 1e6:>9.2f}M  {'yes' if trainable else 'no'}")


@model.command("health")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(1, 100), help="Initialisations checked: train.seed, +1, ...")
@click.option("--tiny", is_flag=True, help="Small channel widths (the quick check of validate / submit); H, J, C, F kept.")
@click.option("--per-layer", is_flag=True, help="Also print the per-layer CGM figures.")
def model_health_cmd(job_file, seeds, tiny, per_layer) -> None:
    """Is JOB_FILE's model alive at initialisation? Builds it as a run does (random prior where its file is absent),
    runs one SR-loss backward on probe images and prints the health figures with pass/fail per criterion
    (model-spec 9). Exits 1 on a fail. A grid or sweep checks each distinct row."""
    from laren.data import storage
    from laren.jobs.entrypoints import run_configs
    from laren.models import health
    from laren.models.prior_io import prior_paths

    failed = False
    seen = set()
    for label, cfg in run_configs(load_any(job_file)):
        m = cfg.model
        if m.model_dump_json() in seen:
            continue
        seen.add(m.model_dump_json())
        have_prior = bool(m.prior.path) and all(storage.exists(u) for u in prior_paths(m.prior.path))
        prior = f"prior {m.prior.path}" if have_prior else "random prior (same architecture)"
        if tiny:
            m, prior = health.tiny_widths(m), prior + ", tiny widths"
        click.echo(f"# {cfg.name} ({label}): {prior}; seeds {cfg.train.seed}..{cfg.train.seed + seeds - 1}")
        reports = [health.check_init(m, cfg.train.seed + k, prior_available=have_prior and not tiny)
                   for k in range(seeds)]
        click.echo(health.format_report(reports, per_layer=per_layer))
        failed |= not all(r.passed for r in reports)
    click.echo("FAIL: a module is dead or degenerate at initialisation" if failed else "PASS: every criterion")
    sys.exit(1 if failed else 0)


# ==== section: prior (laren prior ...) ====


@prior.command("import")
@click.argument("src")
@click.argument("dest")
def prior_import(src: str, dest: str) -> None:
    """Convert a StyleGAN2 checkpoint SRC (rosinality .pt, NVIDIA .pkl, mmagic .pth) to DEST.safetensors + DEST.json.

    No code from SRC is run. DEST is a local path or an s3:// URL (suffix optional).
    """
    from laren.models.prior_io import UnsafePickleError, import_prior, prior_paths

    try:
        meta = import_prior(src, dest)
    except (UnsafePickleError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    st_url, json_url = prior_paths(dest)
    click.echo(f"detected: {meta.describe()}")
    click.echo(f"wrote {st_url} (sha256 {meta.sha256}) and {json_url}")


def _address_option(help_text: str):
    """``--address`` (env RAY_ADDRESS), in any of Ray's forms (laren/ray_address.py)."""
    return click.option("--address", default=None, envvar="RAY_ADDRESS", help=help_text)


_driver_address_opt = _address_option(
    "Ray cluster to drive (env RAY_ADDRESS): GCS address host:6379, ray://host:10001, or the local head's dashboard URL.")


def _train_options(fn):
    """JOB, --storage, --run-id and --address: the arguments of `laren train` and `laren prior train`."""
    for option in reversed((
        click.argument("job", type=click.Path(dir_okay=False)),
        click.option("--storage", "storage_path", default=None,
                     help="Ray Train storage for checkpoints (default <storage.root>/runs)."),
        click.option("--run-id", default=None, help="Run name (default: the job's deterministic <name>-<config hash>)."),
        _driver_address_opt,
    )):
        fn = option(fn)
    return fn


@prior.command("train")
@_train_options
def prior_train(job: str, storage_path, run_id, address) -> None:
    """Train the StyleGAN2 prior of JOB.yaml (kind: prior) with Ray Train (local, or the cluster at RAY_ADDRESS) and
    write it in laren's prior format to gan.output, ready for an SR job's model.prior.path.

    Re-running the same job resumes it from its latest checkpoint and continues the same MLflow run.
    """
    _train_job(job, "prior", "laren prior train", storage_path, run_id, address)


def _train_job(job: str, kind: str, command: str, storage_path, run_id, address=None) -> None:
    """Run a kind: train or kind: prior job with Ray Train and print its final metrics."""
    from laren.train.distributed import run_training

    spec = load_job(job)
    if spec.kind != kind:
        raise click.UsageError(f"{job}: kind is {spec.kind!r}; `{command}` runs kind: {kind} jobs")
    cfg = spec.prior_config() if kind == "prior" else spec.run_config()
    saved = os.environ.get("RAY_ADDRESS")
    if address:  # any form: ensure_ray converts it (laren/ray_address.py) once the job's inputs are checked
        os.environ["RAY_ADDRESS"] = address
    try:
        out = run_training(cfg, run_id=run_id, storage_path=storage_path)
    finally:  # this process's environment as it was (the command may run inside another program)
        if saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = saved
    click.echo(json.dumps(out, indent=1, default=str))


# ==== section: data (laren data ...) ====


@data.command("pack", context_settings={"show_default": True})
@click.argument("src")
@click.argument("dest")
@click.option("--name", required=True, help="Data set name (recorded in the manifest; no '.' or '/').")
@click.option("--resolution", "resolution", type=int, required=True,
              help="Output side R: each image becomes RGB, is center-cropped to its largest square (side min(W,H)) and "
                   "resized to RxR with PIL Lanczos (antialiased) when that side differs from R; images with "
                   "min(W,H) < R are rejected (never upsampled) and listed in the manifest.")
@click.option("--format", "fmt", type=click.Choice(["png", "jpg"]), default="png", help="Stored image format.")
@click.option("--quality", type=click.IntRange(1, 100), default=95, help="JPEG quality (4:4:4 chroma); jpg only.")
@click.option("--shard-size-mb", type=float, default=512.0, help="Close a shard once it reaches this size.")
@click.option("--workers", type=int, default=None, help="Decode/resize/encode processes [default: CPU count].")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_pack(src, dest, name, resolution, fmt, quality, shard_size_mb, workers, quiet):
    """Pack SRC (an image folder, searched recursively; a .zip; or an LSUN lmdb directory) into WebDataset shards
    DEST/shard-000000.tar ... and DEST/manifest.json (counts, bytes, sha256, rejected inputs). DEST is a local folder
    or s3://bucket/prefix (endpoint and keys from the AWS environment, e.g. AWS_ENDPOINT_URL). Re-running the same
    command skips shards already complete; an interrupted run lists no half shard; a corrected re-run (other
    settings) replaces what a failed pack left."""
    from laren.data.pack import pack

    try:
        res = pack(src, dest, name=name, resolution=resolution, fmt=fmt, quality=quality, shard_size_mb=shard_size_mb,
                   workers=(os.cpu_count() or 1) if workers is None else workers, progress=not quiet)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    m = res.manifest
    click.echo(f"{dest}: {m['num_samples']} samples in {len(m['shards'])} shards "
               f"({res.shards_written} written, {res.shards_kept} kept), {len(m['rejected'])} inputs rejected, "
               f"{m['resolution']}x{m['resolution']} {m['format']}")


@data.command("synth", context_settings={"show_default": True})
@click.argument("kind", type=click.Choice(["faces"]))
@click.argument("dest")
@click.option("--resolution", type=int, required=True, help="Image side R in pixels (>= 16).")
@click.option("--count", type=int, required=True, help="Number of samples.")
@click.option("--seed", type=int, default=0, help="Seed of the set: sample i depends only on (seed, i).")
@click.option("--name", default=None, help="Data set name [default: synth-KIND].")
@click.option("--shard-size-mb", type=float, default=64.0, help="Close a shard once it reaches this size.")
@click.option("--workers", type=int, default=0, help="Rendering processes (0: in this process).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_synth(kind, dest, resolution, count, seed, name, shard_size_mb, workers, quiet):
    """Render a procedural data set KIND with known generative factors into WebDataset shards at DEST (a folder or
    s3://bucket/prefix), as `laren data pack` writes them; each sample's factors are stored beside its image
    (<key>.factors.json) and the manifest names them."""
    from laren.data.synth import synth

    try:
        res = synth(kind, dest, resolution, count, seed=seed, name=name, shard_size_mb=shard_size_mb, workers=workers,
                    progress=not quiet)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    m = res.manifest
    click.echo(f"{dest}: {m['num_samples']} {kind} samples (seed {seed}) in {len(m['shards'])} shards, "
               f"{m['resolution']}x{m['resolution']} png, factors: {', '.join(f['name'] for f in m['factors'])}")


@data.command("verify")
@click.argument("dest")
@click.option("--decode", is_flag=True, help="Also decode every image and check its size.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def data_verify(dest, decode, quiet):
    """Check DEST's shards against its manifest (presence, bytes, sha256, sample counts); exit 1 on any problem."""
    from laren.data.pack import verify

    try:
        r = verify(dest, decode=decode, progress=not quiet)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"{r['url']}: data set {r['name']!r}, {r['resolution']}x{r['resolution']} {r['format']}, "
               f"{r['shards']} shards, {r['samples']} samples (manifest {r['manifest_samples']}), "
               f"{r['bytes'] / 1e6:.1f} MB, {r['rejected']} inputs rejected at pack time")
    if r["unlisted_shards"]:
        click.echo(f"note: {len(r['unlisted_shards'])} shard files not in the manifest (left by an interrupted pack; "
                   f"ignored): {', '.join(r['unlisted_shards'][:5])}")
    for p in r["problems"]:
        click.echo(f"problem: {p}")
    if not r["ok"]:
        raise click.ClickException(f"{len(r['problems'])} problem(s) found in {dest}")
    click.echo("OK")


@data.command("stream")
@click.argument("url")
@click.option("--hr-size", type=int, required=True, help="HR side (must equal the packed resolution).")
@click.option("--lr-size", type=int, required=True, help="LR side; LR = MATLAB bicubic at lr/hr (1/4 ... 1/64).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Images per batch (per rank).")
@click.option("--batches", type=int, default=10, show_default=True, help="Batches to read (training stream).")
@click.option("--eval", "eval_", is_flag=True, help="The deterministic evaluation stream (whole set once) instead.")
@click.option("--workers", type=int, default=2, show_default=True, help="Loader worker processes (training stream).")
@click.option("--rank", type=int, default=0, show_default=True, help="Simulated DDP rank.")
@click.option("--world-size", type=int, default=1, show_default=True, help="Simulated DDP world size.")
@click.option("--save-grid", type=click.Path(dir_okay=False), default=None,
              help="Write the first batch as a PNG grid (LR upsampled by pixel repeat | HR).")
def data_stream(url, hr_size, lr_size, batch_size, batches, eval_, workers, rank, world_size, save_grid):
    """Stream batches from a packed data set (local or s3://) and print their shapes, throughput and bad-sample counts."""
    from laren.data.pipeline import BadDataError, make_eval_loader, make_train_loader

    try:
        if eval_:
            loader = make_eval_loader(url, hr_size, lr_size, batch_size, rank=rank, world_size=world_size)
        else:
            loader = make_train_loader(url, hr_size, lr_size, batch_size, rank=rank, world_size=world_size,
                                       num_workers=workers, batches_per_epoch=batches)
        t0, n, first = time.perf_counter(), 0, None
        for i, b in enumerate(loader):
            first = first or b
            n += len(b["key"])
            click.echo(f"batch {i}: lr {tuple(b['lr'].shape)} hr {tuple(b['hr'].shape)} "
                       f"range [{b['hr'].min().item():.2f}, {b['hr'].max().item():.2f}] keys {b['key'][0]}..{b['key'][-1]}")
        dt = time.perf_counter() - t0
    except (ValueError, BadDataError) as err:
        raise click.ClickException(str(err)) from None
    st = loader.stats()
    click.echo(f"{n} samples in {dt:.2f} s ({n / max(dt, 1e-9):.1f} samples/s); bad {st['bad']}"
               + (f": {', '.join(st['bad_keys'][:5])}" if st["bad"] else ""))
    if save_grid and first is not None:
        import numpy as np
        from PIL import Image

        s = hr_size // lr_size
        lr = first["lr"].repeat_interleave(s, -1).repeat_interleave(s, -2)
        grid = torch_cat_rows(lr, first["hr"])
        Image.fromarray(np.ascontiguousarray(grid)).save(save_grid)
        click.echo(f"wrote {save_grid}")


def torch_cat_rows(lr, hr):
    """(B,3,h,h) pairs in [-1, 1] -> uint8 (B*h, 2*h, 3) grid: LR | HR per row."""
    import torch

    rows = torch.cat([lr, hr], dim=-1)  # (B, 3, h, 2h)
    img = ((rows + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return img.permute(0, 2, 3, 1).reshape(-1, img.shape[-1], 3).numpy()


# ==== section: train / eval / upscale ====


@main.command("train")
@_train_options
def train_cmd(job: str, storage_path, run_id, address) -> None:
    """Train JOB.yaml with Ray Train on a local Ray instance, or on the cluster at --address / RAY_ADDRESS when set.

    Re-running the same job resumes it from its latest checkpoint and continues the same MLflow run.
    """
    _train_job(job, "train", "laren train", storage_path, run_id, address)


@main.command("eval")
@click.option("--checkpoint", "checkpoint_url", required=True, help="Checkpoint directory (local path or s3://).")
@click.option("--data", "data_url", required=True, help="Test shard set written by `laren data pack` (local or s3://).")
@click.option("--out", "out_dir", default="eval-out", show_default=True, help="Where per_image.csv and summary.json go.")
@click.option("--limit", type=int, default=None, help="Evaluate only the first N images.")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--alexnet", "alexnet_path", default=None, help="torchvision AlexNet weights for LPIPS (else the checkpoint config's).")
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI", help="Log the results to MLflow (env MLFLOW_TRACKING_URI).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the job name).")
def eval_cmd(checkpoint_url, data_url, out_dir, limit, batch_size, alexnet_path, tracking_uri, experiment) -> None:
    """Evaluate a checkpoint: PSNR (RGB, uint8, no crop), SSIM, LPIPS (AlexNet v0.1) per image and on average."""
    from laren.evaluate import run_eval

    summary = run_eval(checkpoint_url, data_url, out_dir, limit=limit, batch_size=batch_size, alexnet_path=alexnet_path,
                       tracking_uri=tracking_uri, experiment=experiment)
    click.echo(json.dumps(summary, indent=1))


@main.command("upscale")
@click.option("--checkpoint", "checkpoint_url", default=None, help="Checkpoint directory (local path or s3://).")
@click.option("--model", "model_uri", default=None,
              help="Or a registered model: models:/laren-<job>/latest, models:/laren-<job>/<version>, runs:/<id>/model "
                   "(MLflow at MLFLOW_TRACKING_URI, else the project's local MLflow, as `laren status`).")
@click.argument("images", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, help="Output folder (<stem>_sr.png per image).")
@click.option("--resize", is_flag=True, help="Centre-crop and bicubic-resize inputs to the model's input size.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs (and let a later input win a shared stem).")
def upscale_cmd(checkpoint_url, model_uri, images, out_dir, resize, overwrite) -> None:
    """Super-resolve IMAGES (files, folders, glob patterns) with a trained checkpoint or registered model (inputs must
    be the model's LR size, or pass --resize). Existing outputs are not overwritten without --overwrite."""
    from laren.jobs.entrypoints import job_env
    from laren.registry import is_model_uri
    from laren.upscale import ImageSizeError, upscale_files

    if (checkpoint_url is None) == (model_uri is None):
        raise click.UsageError("pass one of --checkpoint DIR or --model models:/laren-<job>/latest")
    if model_uri is not None and not is_model_uri(model_uri):
        raise click.UsageError(f"--model {model_uri}: expected models:/<name>/<version or latest> or runs:/<run id>/model")
    if model_uri:  # the registry the project's jobs log to: MLFLOW_TRACKING_URI, else the local services' MLflow
        os.environ["MLFLOW_TRACKING_URI"] = job_env(project_root())["MLFLOW_TRACKING_URI"]
    try:
        for p in upscale_files(checkpoint_url or model_uri, images, out_dir, resize=resize, overwrite=overwrite):
            click.echo(str(p))
    except (ImageSizeError, FileExistsError) as err:
        raise click.UsageError(str(err)) from None


# ==== section: jobs (validate / submit / status / logs / stop / list / sweep) ====


_address_opt = _address_option(
    "Ray cluster (env RAY_ADDRESS): dashboard URL http://host:8265, GCS address host:6379 or ray://host:10001 "
    "(default: the local head in .laren/services.json).")


@main.command("validate")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--no-summary", is_flag=True, help="Skip the model parameter table.")
@click.option("--no-health", is_flag=True, help="Skip the quick model-health check (`laren model health --tiny`).")
@click.option("--strict", is_flag=True, help="Fail (exit 1) when an input is missing, not only warn.")
def validate_cmd(job: str, no_summary: bool, no_health: bool, strict: bool) -> None:
    """Check JOB (a job or sweep YAML): print the resolved config, run id, resources asked for, model summary, and
    the quick model-health check (a dead or degenerate GDM / CGM at initialisation is refused). Missing inputs (data
    manifests, prior, VGG16 / AlexNet weights, as seen from here) are warnings; --strict makes them errors."""
    from laren.jobs.checks import input_warnings, validate

    _, text = validate(job, summary=not no_summary, health=not no_health)
    click.echo(text)
    warnings = input_warnings(job)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"# inputs: {len(warnings)} missing or not fitting" if warnings else "# inputs: all found")
    if warnings and strict:
        click.echo(f"error: {len(warnings)} input(s) missing or not fitting (--strict)", err=True)
        sys.exit(1)


def _print_submission(sub, address) -> None:
    what = {"submitted": "submitted", "resumed": f"resubmitted (previous attempt {sub.previous_status}; training resumes "
            "from its last checkpoint)", "running": "already running: nothing submitted",
            "finished": "already SUCCEEDED: nothing submitted (change the config for a new run)"}[sub.action]
    click.echo(f"{sub.kind} job {sub.run_id}: {what}")
    click.echo(f"  cluster:  {redact_text(sub.address)}")
    click.echo(f"  MLflow:   {sub.mlflow_url or '(tracking server not reachable from here)'}")
    click.echo("  follow:   " + "\n            ".join(sub.commands))


def _follow_to_the_end(run_id: str, address) -> None:
    """Stream the job's logs until it ends (as `ray job submit`); exit 1 unless it SUCCEEDED. Ctrl-C stops following
    only: the job keeps running."""
    from laren.jobs import client as S

    try:
        for line in S.follow_logs(run_id, address):
            click.echo(line, nl=False)
        st = S.wait(run_id, address, timeout_s=24 * 3600)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; job {run_id} keeps running (`laren logs {run_id} -f`, `laren stop {run_id}`)",
                   err=True)
        sys.exit(130)
    click.echo(f"job {run_id}: {st}")
    if st != "SUCCEEDED":
        sys.exit(1)


def _detach_opt(f):
    return click.option("--detach", is_flag=True,
                        help="Return once the job is queued; by default its logs are streamed until it ends and the "
                             "exit code is 0 only if it SUCCEEDED (Ctrl-C stops following, not the job).")(f)


def _submit_and_follow(path: str, address, detach: bool) -> None:
    from laren.jobs import client as S

    sub = S.submit(path, address=address, log=click.echo)
    _print_submission(sub, address)
    if not detach and sub.action in ("submitted", "resumed", "running"):
        _follow_to_the_end(sub.run_id, sub.address)


@main.command("submit")
@click.argument("job", type=click.Path(dir_okay=False))
@_address_opt
@_detach_opt
def submit_cmd(job: str, address, detach: bool) -> None:
    """Validate JOB and submit it to the Ray cluster (Ray Jobs API, the project as working_dir, run id as submission id),
    then follow its logs until it ends (--detach: return at once).

    With no --address / RAY_ADDRESS and no local services, a local Ray head (with its dashboard) is started.
    Submitting a job whose last attempt FAILED or was STOPPED resumes it from its checkpoints.
    """
    _submit_and_follow(job, address, detach)


@main.command("sweep")
@click.argument("sweep", type=click.Path(dir_okay=False))
@_address_opt
@_detach_opt
def sweep_cmd(sweep: str, address, detach: bool) -> None:
    """Submit a sweep file (sweeps/*.yaml): Ray Tune on the cluster, one Ray Train run and MLflow child run per trial;
    then follow its logs until it ends (--detach: return at once)."""
    if not isinstance(load_any(sweep), LoadedSweep):
        raise click.UsageError(f"{sweep}: not a sweep file (no search_space); use `laren submit` for jobs")
    _submit_and_follow(sweep, address, detach)


@main.command("status")
@click.argument("run", required=False)
@_address_opt
@click.option("--tracking-uri", default=None, envvar="MLFLOW_TRACKING_URI",
              help="MLflow server of the run (env MLFLOW_TRACKING_URI; default: the local services').")
def status_cmd(run, address, tracking_uri) -> None:
    """Status of RUN (run id, job file or job name): its Ray job and, from MLflow, its progress (kimg, img/s, ETA), last
    validation figures, attempts and last failure. Without RUN, every laren job on the cluster."""
    from laren.jobs import client as S

    if not run:
        click.echo(S.format_table(S.list_jobs(address)))
        return
    try:
        info = S.job_info(run, address)
    except ConfigError as err:  # not a Ray job here (e.g. a `laren train` run): MLflow may still know it
        lines = S.mlflow_status(S.run_name(run), tracking_uri)
        if not lines:
            raise
        click.echo(f"{S.run_name(run)}: no Ray job ({err})")
        click.echo("\n".join(lines))
        return
    click.echo(f"{info.submission_id}: {info.status.value}")
    if info.message:
        click.echo(f"  {info.message}")
    md = info.metadata or {}
    if md.get("laren.file"):
        click.echo(f"  job file: {md['laren.file']} (kind {md.get('laren.kind', '?')})")
    click.echo(f"  entrypoint: {info.entrypoint}")
    click.echo("\n".join(S.mlflow_status(info.submission_id, tracking_uri)
                         or [f"  MLflow: no run named {info.submission_id} (yet)"]))


@main.command("logs")
@click.argument("run")
@click.option("-f", "--follow", is_flag=True, help="Keep streaming until the job ends.")
@_address_opt
def logs_cmd(run, follow, address) -> None:
    """Logs of RUN (run id, job file or job name)."""
    from laren.jobs import client as S

    if follow:
        for line in S.follow_logs(run, address):
            click.echo(line, nl=False)
    else:
        click.echo(S.logs(run, address), nl=False)


@main.command("stop")
@click.argument("run")
@_address_opt
def stop_cmd(run, address) -> None:
    """Stop RUN; submitting its job again later resumes it from its last checkpoint."""
    from laren.jobs import client as S

    run_id, stopped = S.stop(run, address)
    click.echo(f"{run_id}: {'stop requested' if stopped else 'not running'}")


@main.command("list")
@click.option("--all", "all_jobs", is_flag=True, help="Include Ray jobs not submitted by laren.")
@_address_opt
def list_cmd(all_jobs, address) -> None:
    """Every laren job on the cluster, newest first."""
    from laren.jobs import client as S

    click.echo(S.format_table(S.list_jobs(address, all_jobs=all_jobs)))


@main.command("run-grid", hidden=True)
@click.argument("job", type=click.Path(dir_okay=False))
def run_grid_cmd(job: str) -> None:
    """(On the cluster) run a grid job's rows under one MLflow parent run and log the results table."""
    from laren.jobs.grid import run_grid

    run_grid(load_job(job), log=click.echo)


@main.command("run-plan", hidden=True)
@click.argument("plan_url")
def run_plan_cmd(plan_url: str) -> None:
    """(On the cluster) train the run that `laren submit` planned (PLAN_URL: its plan.json in the run's storage)."""
    from laren.plan import read_plan
    from laren.train.distributed import run_plan

    click.echo(json.dumps(run_plan(read_plan(plan_url)), indent=1, default=str))


@main.command("run-sweep", hidden=True)
@click.argument("sweep", type=click.Path(dir_okay=False))
def run_sweep_cmd(sweep: str) -> None:
    """(On the cluster) run a sweep with Ray Tune."""
    from laren.jobs.sweep import run_sweep

    run_sweep(load_sweep(sweep), log=click.echo)


@main.command("run-eval", hidden=True)
@click.argument("job", type=click.Path(dir_okay=False))
def run_eval_cmd(job: str) -> None:
    """(On the cluster) evaluate the checkpoint an eval job names."""
    from laren.jobs.grid import run_eval_job

    click.echo(json.dumps(run_eval_job(load_job(job)), indent=1, default=str))


@main.command("analyze")
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", default=None, help="Keep table2.md/.csv, importances and heatmaps here (default: a temp dir).")
def analyze_cmd(job: str, out_dir) -> None:
    """Table II and Fig. 7 of JOB.yaml (kind: analysis): DCI of each code space (Z, W, W+, S, G) of trained models
    against the images' ground-truth labels, and |Pearson rho| maps of Z and G, as one MLflow run."""
    from laren.analysis import run_analysis

    run_analysis(load_job(job), out_dir=out_dir, log=click.echo)


@main.group("services")
def services_grp() -> None:
    """The local services (Ray head, MLflow on SQLite, SeaweedFS S3) on 127.0.0.1, state under .laren/."""


@services_grp.command("up")
@click.option("--num-cpus", type=int, default=None, help="CPUs the local Ray head offers (default: all).")
def services_up_cmd(num_cpus) -> None:
    """Start the local services that are not running; they keep running after this command."""
    from laren import services as S

    svc = S.start_services(num_cpus=num_cpus, log=click.echo)
    click.echo(f"running: Ray {svc['ray']['dashboard_url']}  MLflow {svc['mlflow']['uri']}  S3 {svc['s3']['endpoint_url']}"
               f"  (addresses in {S.state_dir() / S.SERVICES_FILE})")


@services_grp.command("down")
def services_down_cmd() -> None:
    """Stop the local services started by `laren services up` (their data stays under .laren/)."""
    from laren import services as S

    if not S.stop_services(log=click.echo):
        click.echo("no local services recorded")


@services_grp.command("url")
@click.argument("service", type=click.Choice(["mlflow", "ray", "s3"]))
def services_url_cmd(service) -> None:
    """Print a running local service's address."""
    from laren import services as S

    svc = S.read_services()
    if service not in svc:
        raise click.ClickException(f"{service} is not running: `make services`")
    click.echo({"mlflow": lambda s: s["uri"], "ray": lambda s: s["dashboard_url"], "s3": lambda s: s["endpoint_url"]}[service](svc[service]))


@main.command("demo")
@click.option("--num-cpus", type=int, default=None, help="CPUs the local Ray head offers (default: all).")
@click.option("--photos", is_flag=True, help="The scikit-image photographs with a random prior (jobs/demo-photos.yaml) "
              "instead of the synthetic faces with the laren-trained prior.")
def demo_cmd(num_cpus, photos) -> None:
    """The embedded default: local services, synthetic faces in the local S3, LAREN and Base trained on the
    laren-trained 32 px prior through `laren submit`, LAREN evaluated; all on CPU."""
    from laren.demo import run_demo

    if not run_demo(num_cpus=num_cpus, log=click.echo, photos=photos):
        sys.exit(1)


# ==== section: infra (render ...) ====


@main.group()
def render() -> None:
    """Render cluster manifests for a job file (nothing secret is written)."""


@render.command("k8s")
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--image", envvar="LAREN_IMAGE", default=None, show_envvar=True,
              help="Container image of the Ray pods (built from infra/docker/Dockerfile). Default laren:<version>-gpu.")
@click.option("--namespace", "-n", default=None, help="Kubernetes namespace of the rendered objects.")
@click.option("--env-configmap", default="laren-env", show_default=True,
              help="ConfigMap with LAREN_STORAGE, MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL … (infra/k8s/laren-env.example.yaml).")
@click.option("--env-secret", default="laren-credentials", show_default=True,
              help="Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / MLFLOW_TRACKING_USERNAME / _PASSWORD.")
@click.option("--service-account", default=None, help="Pod service account (e.g. one bound to an IAM role for S3).")
@click.option("--worker-memory", default="32Gi", show_default=True, help="Memory of each worker pod.")
@click.option("--head-cpus", default=4, show_default=True, type=int, help="CPUs of the head pod (driver + controller).")
@click.option("--head-memory", default="16Gi", show_default=True, help="Memory of the head pod.")
@click.option("--gpu-label-key", default="nvidia.com/gpu.product", show_default=True,
              help="Node label that selects GPU nodes of resources.gpu_type (e.g. cloud.google.com/gke-accelerator).")
@click.option("--gpu-label-value", default=None,
              help="Value of --gpu-label-key to select (default resources.gpu_type, e.g. NVIDIA-H100-80GB-HBM3 for H100).")
@click.option("--retries", default=2, show_default=True, type=int,
              help="RayJob backoffLimit: fresh-cluster retries; each resumes from the run's last checkpoint.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write here instead of stdout.")
def render_k8s_cmd(job_file, image, namespace, env_configmap, env_secret, service_account, worker_memory, head_cpus,
                   head_memory, gpu_label_key, gpu_label_value, retries, output) -> None:
    """A KubeRay RayJob (and the ConfigMap carrying JOB_FILE) running JOB_FILE: `... | kubectl apply -f -`."""
    from laren.render import K8sOptions, render_k8s_file, to_yaml

    opts = K8sOptions(
        **({"image": image} if image else {}), namespace=namespace, env_configmap=env_configmap,
        env_secret=env_secret, service_account=service_account, worker_memory=worker_memory, head_cpus=head_cpus,
        head_memory=head_memory, gpu_label_key=gpu_label_key,
        gpu_label_value=gpu_label_value, backoff_limit=retries,
    )
    text = to_yaml(render_k8s_file(job_file, opts, warn=lambda m: click.echo(f"warning: {m}", err=True)))
    if output:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


# ==== section: tracking ====


@main.group("tracking")
def tracking_group() -> None:
    """MLflow records of runs."""


@tracking_group.command("sync")
@click.argument("run")
@click.option("--storage", envvar="LAREN_STORAGE", default="./.laren/storage", show_default=True,
              help="Storage root of the run (env LAREN_STORAGE); a job file's storage.root when RUN is one.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow server (env MLFLOW_TRACKING_URI).")
def tracking_sync_cmd(run, storage, tracking_uri) -> None:
    """Replay what an MLflow outage left unsent by RUN (a run id or its job file) into MLflow."""
    from laren.tracking import sync_buffers, tracking_buffer_url

    if run.endswith((".yaml", ".yml")):
        cfg = load_job(run).run_config()
        run, url = cfg.run_id, tracking_buffer_url(cfg, cfg.run_id)
        tracking_uri = tracking_uri or cfg.tracking.tracking_uri
    else:
        from laren.data import storage as st

        url = st.join(storage, "runs", run, "tracking-buffer")
    if not tracking_uri:
        raise ConfigError("no MLflow server: set MLFLOW_TRACKING_URI or --tracking-uri")
    try:
        done = sync_buffers(url, tracking_uri)
    except ConnectionError as err:
        click.echo(f"error: {redact_text(str(err))}", err=True)
        sys.exit(1)
    click.echo(f"{run}: {len(done)} buffer file(s) replayed into MLflow at {redact_text(tracking_uri)}"
               if done else f"{run}: nothing to replay under {redact_text(url)}")


if __name__ == "__main__":
    main()
