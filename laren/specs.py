"""Job files: a run config plus what kind of job it is.

A job YAML is self-contained (no inheritance): the fields of :class:`laren.config.RunConfig` at top level,
plus ``kind`` and, for grids, ``variants``. Validation errors name the file and the field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from laren.config import ConfigError, RunConfig, Section, load_yaml, parse_section


class Variant(Section):
    """One row of a grid job: a name and dotted-path overrides of the job's config."""

    name: str = Field(..., description="Row name (e.g. 'base', 'base+gdm-hmrr').")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted field path -> value, e.g. model.latent_space: w.")


class JobSpec(RunConfig):
    """A job file."""

    kind: Literal["train", "eval", "grid"] = Field("train", description="train: one run; eval: evaluate a checkpoint; grid: one child run per variant.")
    variants: list[Variant] = Field(default_factory=list, description="Grid rows (kind: grid).")

    def run_config(self) -> RunConfig:
        d = self.model_dump(mode="json", exclude={"kind", "variants"})
        return RunConfig.model_validate(d)


def load_job(path: str | Path) -> JobSpec:
    """Load and validate a job YAML; errors name the file and the field path."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file must be a mapping of fields")
    if "name" not in data:
        data = {**data, "name": Path(path).stem}
    return parse_section(JobSpec, data, source=str(path))
