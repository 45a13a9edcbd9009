"""The run config: one frozen pydantic section per concern, validated before any worker starts.

Every section forbids unknown keys, so a typo in a job YAML is an error that names the field path
(``model.gdm.num_nodes``) rather than a silently ignored setting. Units are in the field names
(``total_kimg``, ``batch_size_global``); durations a user sets are counted in images (kimg), never steps.

Only ``laren/models/build.py`` turns :class:`ModelConfig` into modules; modules themselves take plain numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    """Base of every config section: immutable, unknown keys rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# ----------------------------------------------------------------------------------------------- model


class PriorConfig(Section):
    """The frozen pre-trained StyleGAN2 (architecture + where its laren-format weights live)."""

    path: Optional[str] = Field(
        None,
        description="URL (local path or s3://) of the laren-format prior (.safetensors + .json) written by "
        "`laren prior import`. None builds a randomly initialised generator (tests, summaries).",
    )
    resolution: int = Field(1024, ge=32, le=1024, description="Output resolution of the generator in pixels (a power of 2, 32..1024).")
    style_dim: int = Field(512, ge=1, le=4096, description="Style / latent width H of the generator (512 for official weights).")
    mapping_layers: int = Field(8, ge=1, le=32, description="Depth of the mapping MLP (8 for official weights).")
    channel_multiplier: int = Field(2, ge=1, le=64, description="StyleGAN2 channel multiplier (2 for FFHQ-1024 config-f, 1 for some 256 models).")
    channel_table_base: Optional[int] = Field(
        None, ge=1, le=1 << 24,
        description="channel_base of a non-stock channel table, channels(r) = min(channel_table_base // r, channel_max), "
        "as `laren prior import` records it (PriorMeta.channel_base); None: the stock 16384 * channel_multiplier. "
        "Filled in from the prior's metadata when a run is planned.",
    )
    channel_max: int = Field(512, ge=1, le=4096, description="Cap on feature channels per resolution (512 for official weights; small in tests).")
    source: str = Field(
        "",
        description="Human note: which pre-trained checkpoint this job expects and where to obtain it.",
    )

    @model_validator(mode="after")
    def _check(self) -> "PriorConfig":
        r = self.resolution
        if r < 32 or r > 1024 or r & (r - 1):
            raise ValueError(f"resolution must be a power of 2 in 32..1024, got {r}")
        return self

    def channel_base(self) -> int:
        """NVIDIA-style ``channels(r) = min(channel_base / r, channel_max)``: ``channel_table_base``, else rosinality's
        stock table."""
        return self.channel_table_base or 16384 * self.channel_multiplier


class EncoderConfig(Section):
    """GLEAN-style encoder (LR image -> z); model-spec section 2.1."""

    rrdb_blocks: int = Field(23, ge=1, le=100, description="Number of RRDB blocks in the feature extractor.")
    rrdb_channels: int = Field(64, ge=1, le=1024, description="RRDB feature channels.")
    rrdb_growth: int = Field(32, ge=1, le=1024, description="RRDB dense-block growth channels.")


class GDMConfig(Section):
    """Graph Disentangled Module; model-spec section 2.2 (choices C1-C8)."""

    num_nodes: int = Field(64, ge=2, le=1024, description="J: number of graph nodes derived from z.")
    node_dim: int = Field(8, ge=1, le=1024, description="C: width of each node.")
    convkb_filters: int = Field(8, ge=1, le=1024, description="Omega: ConvKB 1x3 filters.")
    relation_scale: Union[Literal["dim"], Annotated[float, Field(gt=0, le=1e6)]] = Field(
        "dim",
        description="kappa in rho = kappa * r (choice C5): 'dim' multiplies by the size of the softmax support: D for HMRR (default), J-1 for VRR; "
        "1.0 is the paper-literal reading, which leaves g nearly constant.",
    )
    relation_logits: Literal["std", "rms", "l2"] = Field(
        "std",
        description="Normaliser of the relation logits before the softmax over attributes: 'std' over the support "
        "(default: graded relations at the real encoder's init), 'rms' over the support (model-spec 9 v2), or 'l2', "
        "the paper-literal unit L2 norm, which makes rho a binary gate (model-spec 9, R2).",
    )
    chunk_size: int = Field(256, ge=1, le=1 << 20, description="Attributes processed per chunk; bounds peak memory (never the full (B,P,D,Omega,C) tensor).")
    checkpoint_chunks: bool = Field(True, description="Recompute each attribute chunk in backward (gradient checkpointing).")


class CGMConfig(Section):
    """Code Generation Module; model-spec section 2.3 (choices C9-C15)."""

    code_dim: int = Field(64, ge=1, le=4096, description="F: width of each image-specific code c_n.")
    noise_proj_max_res: int = Field(
        128, ge=4, le=1024, description="Each code is projected to a min(res, this)^2 map, then bilinearly upsampled (choice C14)."
    )


class ModelConfig(Section):
    """LAREN and its Table IV ablations, as config choices."""

    lr_size: int = Field(16, ge=4, le=512, description="Input (low-resolution) image size in pixels.")
    prior: PriorConfig = Field(default_factory=PriorConfig, description="The frozen StyleGAN2 prior.")
    encoder: EncoderConfig = Field(default_factory=EncoderConfig, description="Encoder (LR image -> z).")
    latent_space: Literal["w", "w+", "s", "g"] = Field(
        "g", description="Latent head: w (z broadcast), w+ (linear head), s (StyleSpace head), g (GDM)."
    )
    gdm_relation: Literal["hmrr", "vrr"] = Field("hmrr", description="GDM relation reasoning (used when latent_space = g).")
    noise_source: Literal["random", "cgm"] = Field("cgm", description="Generator noise: random N(0,1) or codes from the CGM.")
    cgm_relation: Literal["rerr", "vrr"] = Field("rerr", description="CGM relation reasoning (used when noise_source = cgm).")
    cgm_activation: Literal["leaky_relu", "relu"] = Field(
        "leaky_relu",
        description="delta in the CGM's Eqs. 3-4: LeakyReLU(0.2) (v2 default) or 'relu', the paper-literal reading, "
        "under which the CGM starts dead (model-spec 9, R1).",
    )
    gdm: GDMConfig = Field(default_factory=GDMConfig, description="GDM sizes.")
    cgm: CGMConfig = Field(default_factory=CGMConfig, description="CGM sizes.")
    learn_noise_strength: bool = Field(
        False,
        description="Also learn the prior's per-layer noise strengths w_m (choice C15's alternative, +N_noise "
        "parameters; the rest of the prior stays frozen). For a prior trained on data without stochastic detail, whose "
        "strengths are ~0 (priors/synth32: |w_m| <= 0.008), so that frozen they would make the CGM's codes inert.",
    )
    glean_skips: bool = Field(
        False, description="Add GLEAN's multi-scale encoder features and decoder (off by default; choice C17)."
    )
    glean_lr_skip: bool = Field(
        False, description="With glean_skips: the decoder's final conv also reads the bicubically upsampled LR image."
    )
    eval_noise_seed: int = Field(
        0, ge=0, lt=1 << 63, description="Seed of the fixed generator noise maps used at evaluation when noise_source = random."
    )

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        lr, hr = self.lr_size, self.prior.resolution
        if lr < 4 or lr & (lr - 1) or lr >= hr:
            raise ValueError(f"lr_size must be a power of 2, >= 4 and < prior.resolution ({hr}), got {lr}")
        if self.glean_lr_skip and not self.glean_skips:
            raise ValueError("glean_lr_skip is a switch of the GLEAN decoder: set glean_skips: true as well (or drop it)")
        return self

    @property
    def scale(self) -> int:
        """Upscaling factor HR / LR (16, 32, 64 in the paper)."""
        return self.prior.resolution // self.lr_size


# ----------------------------------------------------------------------------------------------- data


class DataConfig(Section):
    """Where the shards are and how batches are made."""

    train_url: str = Field("", description="Dataset URL (local dir or s3://bucket/prefix) holding manifest.json and shards.")
    val_url: str = Field("", description="Evaluation dataset URL (same layout); empty uses train_url.")
    num_val_images: int = Field(64, ge=1, le=10_000_000, description="Images evaluated at each periodic evaluation (the full set in `laren eval`).")
    shuffle_buffer: int = Field(256, ge=1, le=1_000_000, description="Samples held in the training shuffle buffer per loader worker.")
    loader_workers: Optional[int] = Field(
        None, ge=0, le=256,
        description="DataLoader worker processes per training rank (0: load in the training process). None (auto): "
                    "resources.cpus_per_worker (the CPUs Ray reserves for the worker), capped by the CPUs the process may "
                    "run on, minus one for the training process, at least 1. The count splits the shards, so it is part of "
                    "the data order: set it to keep that order across machines of other sizes.",
    )
    lr_on_device: bool = Field(
        True,
        description="Make the LR images on the training device: the loader ships the decoded uint8 HR only and the loop "
                    "runs the same MATLAB bicubic there (the same bytes as on the CPU). False: loader workers make them.",
    )
    hflip: bool = Field(True, description="Random horizontal flip (p = 0.5) of training images.")
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="Abort with a clear error when more than this fraction of samples is undecodable or malformed."
    )


# ----------------------------------------------------------------------------------------------- loss / optim


class LossConfig(Section):
    """Eq. 5: pixel MSE + perceptual (VGG16 conv4_3) + adversarial (StyleGAN2 D)."""

    pixel_weight: float = Field(1.0, ge=0, le=1e6, description="Weight of mean((sr - hr)^2).")
    perceptual_weight: float = Field(0.01, ge=0, le=1e6, description="Weight of the VGG16 conv4_3 feature MSE (choice C20).")
    adversarial_weight: float = Field(0.01, ge=0, le=1e6, description="Weight of the generator's adversarial term.")
    adversarial: Literal["nonsaturating", "saturating"] = Field(
        "nonsaturating", description="softplus(-D(sr)) (GLEAN) or the paper-literal log(1 - sigmoid(D(sr))) (choice C19)."
    )
    vgg16_path: Optional[str] = Field(
        None, description="torchvision-format VGG16 state dict (vgg16-397923af.pth). Required when perceptual_weight > 0."
    )
    random_backbone_for_tests: bool = Field(
        False, description="TEST ONLY: use a randomly initialised VGG16 instead of vgg16_path."
    )


class OptimConfig(Section):
    """Adam for the trainable modules and for D (paper section IV-A)."""

    lr: float = Field(1e-4, gt=0, le=1, description="Adam learning rate of the SR model.")
    lr_d: float = Field(1e-4, gt=0, le=1, description="Adam learning rate of the discriminator.")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam epsilon.")
    cosine_min_lr: Optional[float] = Field(
        1e-7, ge=0, le=1, description="Floor (eta_min) of the cosine learning-rate schedule (None: constant learning rate)."
    )
    cosine_period_kimg: Optional[float] = Field(
        None, gt=0, le=1e9,
        description="Period (T_max) of the cosine schedule in kimg; None means 2 x train.total_kimg, as GLEAN "
        "(600k iterations over a 300k run), so the rate ends at about half of lr rather than at cosine_min_lr.",
    )


# Metrics every SR training run reports with its checkpoints (val/lpips_alex needs eval.alexnet_path).
KeepBestMetric = Literal["val/psnr", "val/ssim", "val/lpips_alex", "val/loss_pix", "train/loss_g", "train/loss_pix"]


class TrainConfig(Section):
    """Durations in kimg (thousands of images), so they survive changes of batch size and worker count."""

    batch_size_global: int = Field(8, ge=1, le=1 << 20, description="Images per optimizer step, summed over all workers.")
    total_kimg: float = Field(2400.0, gt=0, le=1e9, description="Training length in thousands of images.")
    log_every_kimg: float = Field(1.0, gt=0, le=1e9, description="Metric logging interval.")
    eval_every_kimg: float = Field(40.0, gt=0, le=1e9, description="Validation + sample grid interval.")
    checkpoint_every_kimg: float = Field(40.0, gt=0, le=1e9, description="Checkpoint interval.")
    keep_checkpoints: int = Field(
        3, ge=1, le=10_000,
        description="Checkpoints kept in storage: the newest ones, or with keep_best_metric the best ones (the newest is always kept).",
    )
    keep_best_metric: Optional[KeepBestMetric] = Field(
        None,
        description="Score checkpoints by this metric (Ray Train's checkpoint_score_attribute): the keep_checkpoints best "
                    "are kept, plus the newest. A checkpoint's score is the last evaluation at or before it.",
    )
    keep_best_mode: Literal["max", "min"] = Field("max", description="Whether a higher (max) or lower (min) keep_best_metric is better.")
    max_failures: int = Field(3, ge=0, le=1000, description="Worker-group restarts (from the last checkpoint) before the run fails.")
    seed: int = Field(0, ge=0, lt=1 << 63, description="Seed of model init, data order and noise.")
    bf16: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="How a checkpoint reaches storage under Ray Train: async (uploaded in the background "
                             "while training goes on; a resume verifies state.json's checksums, so a partial upload "
                             "is never resumed from) or sync (the step waits for the upload).")
    compile: bool = Field(
        False, description="torch.compile the SR model and D for training (inductor; the first steps compile). Off by "
                           "default: it pays on GPUs, where the eager step issues ~25k small ops; on CPU it only costs.")
    sample_grid_images: int = Field(4, ge=1, le=256, description="Images in each logged LR | bicubic | SR | HR sample grid.")


class EvalConfig(Section):
    """Metrics: PSNR and SSIM always, LPIPS (AlexNet v0.1) when its backbone weights are given."""

    alexnet_path: Optional[str] = Field(
        None, description="torchvision-format AlexNet state dict (alexnet-owt-7be5be79.pth) for LPIPS; None skips LPIPS."
    )
    random_backbone_for_tests: bool = Field(False, description="TEST ONLY: LPIPS on a randomly initialised AlexNet.")


# ----------------------------------------------------------------------------------------------- infra


class StorageConfig(Section):
    """Where datasets, priors and runs live."""

    root: str = Field(
        default_factory=lambda: os.environ.get("LAREN_STORAGE", "./.laren/storage"),
        description="Storage root: a local path or s3://bucket/prefix (env LAREN_STORAGE).",
    )


class TrackingConfig(Section):
    """MLflow."""

    tracking_uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///.laren/mlflow.db"),
        description="MLflow tracking URI (env MLFLOW_TRACKING_URI); default a local SQLite file.",
    )
    experiment: str = Field("", description="MLflow experiment; empty uses the job family (the job name).")
    system_metrics: bool = Field(True, description="Log CPU / memory / GPU system metrics.")
    system_metrics_interval_s: float = Field(10.0, gt=0, le=86_400, description="Seconds between system metric samples.")
    register_model: bool = Field(
        True,
        description="At the end of a training run, log the inference model (an MLflow pyfunc: weights as safetensors, "
                    "config, prior metadata) and register it as laren-<job name>.",
    )


class ResourcesConfig(Section):
    """What the run asks the cluster for."""

    num_workers: int = Field(1, ge=1, le=100_000, description="Training workers (one per GPU on a GPU cluster).")
    min_workers: Optional[int] = Field(None, ge=1, le=100_000, description="Elastic minimum; None = fixed num_workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs reserved per worker.")
    gpu_type: Optional[str] = Field(None, description="Accelerator type label (e.g. H100) for cluster scheduling.")
    hourly_price_usd: Optional[float] = Field(
        None, ge=0, le=1e6,
        description="Price of one worker (its GPU, or its CPUs) per hour in USD; training then logs cost/usd.",
    )
    peak_tflops: Optional[float] = Field(
        None, gt=0, le=1e5,
        description="Dense peak TFLOP/s of one worker's accelerator at the run's precision, for perf/mfu; default: "
                    "the device's figure from its name (laren/flops.py: H200, H100, A100, L4, ...), none on the CPU.",
    )

    @model_validator(mode="after")
    def _check(self) -> "ResourcesConfig":
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.min_workers is not None and not (1 <= self.min_workers <= self.num_workers):
            raise ValueError("min_workers must be in 1..num_workers")
        return self


class RunConfig(Section):
    """Everything one training run needs; the job's effective config."""

    name: str = Field(..., description="Job name (the run id is <name>-<hash of this config>).")
    description: str = Field("", description="What this job is for.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Loss.")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimisers.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training schedule.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Storage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Tracking.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Cluster resources.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of the config, excluding where it runs (storage, tracking, a prior's output) and how it is described. A pure function of
        the resolved config, and the same before and after ``resolve_paths`` or a run plan: local paths are hashed in
        their canonical form (:func:`path_identity`), and with ``model.prior.path`` set, the prior's metadata is its
        architecture (a plan copies it into ``model.prior``), so those fields are left out."""
        d = self.to_dict()
        for k in ("storage", "tracking", "description"):
            d.pop(k, None)
        d.get("gan", {}).pop("output", None)  # a prior run's output: where it runs too (default under storage.root)
        prior = d["model"]["prior"]
        if prior["path"]:
            for k in PRIOR_ARCH_FIELDS:
                prior.pop(k)
            prior["path"] = path_identity(prior["path"])
        elif prior["channel_table_base"] is None:  # unset: the ids of runs from before the field stay
            prior.pop("channel_table_base")
        for section, key in (("data", "train_url"), ("data", "val_url"), ("loss", "vgg16_path"), ("eval", "alexnet_path")):
            d[section][key] = path_identity(d[section][key])
        d["resources"].pop("hourly_price_usd", None)  # a price changes no result
        d["resources"].pop("peak_tflops", None)  # nor does the peak MFU is measured against
        d["data"].pop("lr_on_device", None)  # nor where the LR is made (the same bytes on every device)
        if d.get("train", {}).get("keep_best_metric") is None:  # unset: the ids of runs from before the fields stay
            d["train"].pop("keep_best_metric", None)
            d["train"].pop("keep_best_mode", None)
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:8]

    @property
    def run_id(self) -> str:
        """Deterministic identity: the Ray submission id, Ray Train run name and MLflow run name."""
        return f"{self.name}-{self.config_hash()}"


# The prior's architecture as its metadata records it (laren.plan.resolve_prior copies it into model.prior).
PRIOR_ARCH_FIELDS = ("mapping_layers", "channel_multiplier", "channel_max", "channel_table_base")


def checkout(start: Optional[str | Path] = None) -> Optional[Path]:
    """The laren checkout containing ``start`` (default: the working directory): the nearest folder with pyproject.toml
    and laren/, or None."""
    p = Path(start or os.getcwd()).resolve()
    return next((d for d in [p, *p.parents] if (d / "pyproject.toml").is_file() and (d / "laren").is_dir()), None)


def project_root(start: Optional[str | Path] = None) -> Path:
    """:func:`checkout`, else the working directory."""
    return checkout(start) or Path(os.getcwd()).resolve()


def path_identity(p: Optional[str]) -> Optional[str]:
    """A local input path in the form a run id hashes: made absolute as ``resolve_paths`` makes it (links resolved),
    then, in a laren checkout, written relative to it (``<project>/priors/synth32``) when it lies in it or in its state
    folder ``.laren`` wherever that links to (``<project>/.laren/storage/datasets/x``), else absolute. So the form is
    the same before and after ``resolve_paths``, in any clone of the project, and in Ray's copy of it (a job's working
    dir, whose ``.laren`` links to the project's). URLs are unchanged."""
    if not p or "://" in p:
        return p
    a, root = Path(p).expanduser().resolve(), checkout()
    for name, base in ((("<project>/.laren", (root / ".laren").resolve()), ("<project>", root)) if root else ()):
        if a == base or base in a.parents:
            return f"{name}/{a.relative_to(base).as_posix()}".rstrip("/")
    return str(a)


# ----------------------------------------------------------------------------------------------- prior training


class PriorTrainConfig(Section):
    """StyleGAN2 training of a prior (job kind ``prior``; :mod:`laren.train.prior`). The architecture is
    ``model.prior``; the data, schedule (``train``), storage, tracking and resources sections are those of SR jobs."""

    lr: float = Field(0.002, gt=0, le=1, description="Adam learning rate of G and D (StyleGAN2: 0.002).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.0, 0.99), description="Adam betas of G and D (StyleGAN2: 0, 0.99).")
    r1_gamma: float = Field(10.0, ge=0, le=1e4, description="R1 weight gamma on real images (lazy; 0 disables).")
    r1_every: int = Field(16, ge=1, le=1000, description="Lazy R1: every this many D steps, scaled by it.")
    pl_weight: float = Field(0.0, ge=0, le=100, description="Path-length regularisation weight (StyleGAN2: 2; 0 disables).")
    pl_every: int = Field(4, ge=1, le=1000, description="Lazy path-length regularisation interval (G steps).")
    pl_decay: float = Field(0.01, gt=0, lt=1, description="Decay of the path-length running mean.")
    style_mixing: float = Field(0.9, ge=0, le=1, description="Probability of style mixing (two z, one crossover layer).")
    ema_kimg: float = Field(10.0, gt=0, le=1e4, description="Half-life of the EMA generator in kimg.")
    ema_rampup: Optional[float] = Field(
        0.05, gt=0, le=1, description="EMA half-life at most this fraction of the images seen so far (StyleGAN2-ADA; None: off)."
    )
    diffaugment: list[Literal["translation", "color"]] = Field(
        default_factory=list, description="DiffAugment policies applied to every image D sees (small data sets)."
    )
    metric_images: int = Field(
        512, ge=0, le=100000,
        description="Real and generated images of the factor-FD metric at each evaluation (0: off; the data set "
        "must be written by `laren data synth`, whose factors train the feature network).",
    )
    regressor_steps: int = Field(600, ge=1, le=100000, description="Training steps of the factor regressor (batch 64).")
    grid_images: int = Field(16, ge=1, le=256, description="Fixed-z EMA samples in each logged grid.")
    output: str = Field(
        "", description="Where the prior is written (DEST.safetensors + DEST.json, laren's prior format); empty: "
        "<storage.root>/priors/<job name>."
    )

    @model_validator(mode="after")
    def _check(self) -> "PriorTrainConfig":
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {list(self.betas)}")
        if self.ema_rampup is not None and not 0 < self.ema_rampup <= 1:
            raise ValueError(f"ema_rampup must be in (0, 1] or null, got {self.ema_rampup}")
        return self


class PriorRunConfig(RunConfig):
    """A prior-training run: a run config plus its GAN settings."""

    gan: PriorTrainConfig = Field(default_factory=PriorTrainConfig, description="GAN training.")

    @model_validator(mode="after")
    def _check_prior(self) -> "PriorRunConfig":
        if self.train.keep_best_metric is not None:  # the prior loop reports eval/factor_fd, not the SR metrics
            raise ValueError("train.keep_best_metric applies to SR training jobs only; remove it from this prior job")
        return self

    def output_url(self) -> str:
        return self.gan.output or self.storage.root.rstrip("/") + f"/priors/{self.name}"


# ----------------------------------------------------------------------------------------------- analysis


class AnalysisTarget(Section):
    """One trained model of an analysis job (a row of Table II)."""

    label: str = Field(..., min_length=1, max_length=80, description="Row label in Table II (e.g. 'LAREN', 'Base').")
    checkpoint: str = Field(
        ..., min_length=1,
        description="A train job file (its run's latest checkpoint), a grid job file + '#row' (that row's run, e.g. "
        "jobs/ablation-synth.yaml#base-s0), a run id, or a checkpoint directory URL (local path or s3://).",
    )


class AnalysisConfig(Section):
    """Table II and Fig. 7 (job kind ``analysis``; :mod:`laren.analysis`): DCI of each code space of trained models
    against ground-truth labels of the images they encode, and |Pearson rho| maps of Z and G."""

    checkpoints: list[AnalysisTarget] = Field(..., min_length=1, description="The models to analyse, one or more.")
    labels_csv: Optional[str] = Field(
        None, description="Attributes of a real data set: a CSV whose first column names the image (file name, matched "
        "on its stem to each sample's packed source) and each other column one attribute (CelebA-HQ: 40 columns of "
        "-1 / 1). None: the factors of a `laren data synth` set, read from its shards.",
    )
    max_images: int = Field(1024, ge=16, le=1_000_000, description="Images encoded (the first of data.val_url).")
    test_fraction: float = Field(0.5, gt=0, lt=1, description="Share of the images whose codes test the estimators.")
    batch_size: int = Field(64, ge=1, le=4096, description="Images per forward pass when encoding.")
    continuous: Literal["regress", "bin"] = Field(
        "regress", description="Continuous factors: regress (regressor; informativeness = held-out R^2 clipped to "
        "[0, 1]) or bin (quantile bins, classifier; informativeness = accuracy as for discrete factors).",
    )
    bins: int = Field(4, ge=2, le=100, description="continuous: bin: quantile bins per continuous factor.")
    min_class_share: float = Field(
        0.05, ge=0, lt=0.5, description="A discrete attribute is kept only if every class holds this share of the "
        "images (StyleSpace keeps an attribute with >= 5 % on each side).",
    )
    colour_max: float = Field(0.4, gt=0, le=1, description="Top of the heatmaps' colour range (Fig. 7: 0.4).")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Train/test split and estimator seed.")
    estimator: Literal["gbt", "lasso"] = Field(
        "gbt", description="gbt: scikit-learn gradient-boosted trees, importance = feature_importances_ (Eastwood & "
        "Williams; StyleSpace); lasso: L1 linear models on standardised codes, importance = |coef|.",
    )
    gbt_trees: int = Field(100, ge=1, le=10_000, description="gbt: boosting stages (scikit-learn default 100).")
    gbt_depth: int = Field(3, ge=1, le=32, description="gbt: tree depth (scikit-learn default 3).")
    lasso_alpha: float = Field(0.01, gt=0, le=100, description="lasso: L1 weight (Lasso alpha; 1 / C of logistic).")


# ----------------------------------------------------------------------------------------------- loading


class ConfigError(ValueError):
    """A user error in a config file: the message names the file and the field path."""


def format_validation_error(err: ValidationError, source: str = "") -> str:
    lines = [f"invalid config{(' in ' + source) if source else ''}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see `laren validate --help` for the schema)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def parse_section(cls: type[Section], data: Any, source: str = "", prefix: str = "") -> Any:
    """Validate ``data`` as ``cls``; raise ConfigError naming every bad field path (prefixed)."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        msg = format_validation_error(err, source)
        if prefix:
            msg = msg.replace("\n  ", f"\n  {prefix}.")
        raise ConfigError(msg) from None


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
