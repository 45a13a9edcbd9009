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

# ==== section: train / eval / upscale ====

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
              help="Node label that resources.gpu_type must equal (e.g. cloud.google.com/gke-accelerator).")
@click.option("--retries", default=2, show_default=True, type=int,
              help="RayJob backoffLimit: fresh-cluster retries; each resumes from the run's last checkpoint.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write here instead of stdout.")
def render_k8s_cmd(job_file, image, namespace, env_configmap, env_secret, service_account, worker_memory, head_cpus,
                   head_memory, gpu_label_key, retries, output) -> None:
    """A KubeRay RayJob (and the ConfigMap carrying JOB_FILE) running JOB_FILE: `... | kubectl apply -f -`."""
    from laren.render import K8sOptions, render_k8s_file, to_yaml

    opts = K8sOptions(
        **({"image": image} if image else {}), namespace=namespace, env_configmap=env_configmap,
        env_secret=env_secret, service_account=service_account, worker_memory=worker_memory, head_cpus=head_cpus,
        head_memory=head_memory, gpu_label_key=gpu_label_key, backoff_limit=retries,
    )
    text = to_yaml(render_k8s_file(job_file, opts))
    if output:
        with open(output, "w") as f:
            f.write(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


if __name__ == "__main__":
    main()
