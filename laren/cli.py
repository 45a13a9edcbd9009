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

# ==== section: prior (laren prior ...) ====

# ==== section: data (laren data ...) ====

# ==== section: train / eval / upscale ====

# ==== section: jobs (validate / submit / status / logs / stop / list / sweep) ====

# ==== section: infra (render ...) ====


if __name__ == "__main__":
    main()
