"""`laren ...`: a thin command line over the library. Each command group lives in its own section below."""

from __future__ import annotations

import sys

import click

from laren.config import ConfigError


class _Group(click.Group):
    """Turns user errors (ConfigError, FileNotFoundError, ValueError from validation) into one clean line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (ConfigError, FileNotFoundError) as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="laren")
def main() -> None:
    """laren: large-factor GAN-prior super-resolution (LAREN): data, training, sweeps, jobs."""


@main.group()
def model() -> None:
    """Inspect models."""


@main.group()
def prior() -> None:
    """Import pre-trained StyleGAN2 priors."""


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
    from laren.specs import load_job

    job = load_job(job_file)
    m = job.model
    latent = m.latent_space + (f" ({m.gdm_relation})" if m.latent_space == "g" else "")
    noise = m.noise_source + (f" ({m.cgm_relation})" if m.noise_source == "cgm" else "")
    click.echo(f"{job.name}: {m.scale}x SR, {m.lr_size} -> {m.prior.resolution}; latent space {latent}; noise {noise}")
    click.echo(f"{'module':<24}{'parameters':>14}{'':>10}  trainable")
    for name, n, trainable in parameter_summary(m):
        click.echo(f"{name:<24}{n:>14,}{n / 1e6:>9.2f}M  {'yes' if trainable else 'no'}")


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
    command skips shards already complete; an interrupted run lists no half shard."""
    import os

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
    import time

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
@click.argument("job", type=click.Path(dir_okay=False))
@click.option("--storage", "storage_path", default=None, help="Ray Train storage for checkpoints (default <storage.root>/runs).")
@click.option("--run-id", default=None, help="Run name (default: the job's deterministic <name>-<config hash>).")
def train_cmd(job: str, storage_path, run_id) -> None:
    """Train JOB.yaml with Ray Train on a local Ray instance, or on the cluster at RAY_ADDRESS when set.

    Re-running the same job resumes it from its latest checkpoint and continues the same MLflow run.
    """
    import json

    from laren.specs import load_job
    from laren.train.distributed import run_training

    spec = load_job(job)
    if spec.kind != "train":
        raise click.UsageError(f"{job}: kind is {spec.kind!r}; `laren train` runs kind: train jobs")
    out = run_training(spec.run_config(), run_id=run_id, storage_path=storage_path)
    click.echo(json.dumps(out, indent=1, default=str))


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
    import json

    from laren.evaluate import run_eval

    summary = run_eval(checkpoint_url, data_url, out_dir, limit=limit, batch_size=batch_size, alexnet_path=alexnet_path,
                       tracking_uri=tracking_uri, experiment=experiment)
    click.echo(json.dumps(summary, indent=1))


@main.command("upscale")
@click.option("--checkpoint", "checkpoint_url", required=True, help="Checkpoint directory (local path or s3://).")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, help="Output folder (<stem>_sr.png per image).")
@click.option("--resize", is_flag=True, help="Centre-crop and bicubic-resize inputs to the model's input size.")
def upscale_cmd(checkpoint_url, images, out_dir, resize) -> None:
    """Super-resolve IMAGE... with a trained checkpoint (inputs must be the model's LR size, or pass --resize)."""
    from laren.upscale import ImageSizeError, upscale_files

    try:
        for p in upscale_files(checkpoint_url, images, out_dir, resize=resize):
            click.echo(str(p))
    except ImageSizeError as err:
        raise click.UsageError(str(err)) from None


# ==== section: jobs (validate / submit / status / logs / stop / list / sweep) ====

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


if __name__ == "__main__":
    main()
