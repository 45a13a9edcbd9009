"""The one place that turns a :class:`laren.config.ModelConfig` into modules (architecture rule 1).

    build_model(cfg, device)     -> LarenSR (the prior's weights via load_prior(cfg.prior.path) when set; else random)
    build_discriminator(cfg)     -> StyleGAN2 Discriminator (the prior's D when the checkpoint has one; else random)
    parameter_summary(cfg)       -> [(row, parameters, trainable)] built on the meta device: instant at full size

Table IV rows are config choices (model-spec section 5): latent_space w / w+ / s / g, gdm_relation hmrr / vrr,
noise_source random / cgm, cgm_relation rerr / vrr.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from laren.config import ConfigError, ModelConfig
from laren.models.cgm import CodeGeneration
from laren.models.encoder import GleanEncoder
from laren.models.gdm import GraphDisentangle, GraphDisentangleVRR
from laren.models.laren import GleanDecoder, LarenSR
from laren.models.latent import SHead, WHead, WPlusHead
from laren.models.prior_io import load_prior
from laren.models.stylegan2 import Discriminator, Generator

__all__ = ["build_model", "build_discriminator", "build_generator", "parameter_summary", "SUMMARY_ROWS"]

log = logging.getLogger(__name__)

SUMMARY_ROWS = (
    "encoder",
    "latent head",
    "GDM",
    "CGM",
    "GLEAN fusion+decoder",
    "generator (frozen)",
    "discriminator",
    "total trainable",
)


def check_combination(cfg: ModelConfig) -> None:
    """A ConfigError for model options that cannot work together (checked by build_model and by the run plan)."""
    if cfg.noise_source == "cgm" and cfg.latent_space == "s":
        raise ConfigError(
            "model.noise_source: 'cgm' reads the latent codes g_n, which a StyleSpace head (model.latent_space: s) does "
            "not produce; use latent_space w, w+ or g with the CGM, or noise_source: random with s"
        )


def build_generator(cfg: ModelConfig) -> Generator:
    """A randomly initialised generator with the architecture of ``cfg.prior``."""
    p = cfg.prior
    return Generator(
        p.resolution,
        style_dim=p.style_dim,
        mapping_layers=p.mapping_layers,
        channel_multiplier=p.channel_multiplier,
        channel_max=p.channel_max,
        channel_base=p.channel_base(),
    )


def _load_prior(cfg: ModelConfig) -> tuple[Generator, Any, Any]:
    G, D, meta = load_prior(cfg.prior.path)
    mget = meta.get if isinstance(meta, dict) else (lambda k, d=None: getattr(meta, k, d))
    for field in ("resolution", "style_dim"):
        want, got = getattr(cfg.prior, field), mget(field, None)
        if got is not None and int(got) != int(want):
            raise ConfigError(
                f"model.prior.{field}: the job says {want} but the prior at {cfg.prior.path} has {got}; "
                f"set model.prior.{field}: {got} (or point model.prior.path at a matching prior)"
            )
    return G, D, meta


def _build_head(cfg: ModelConfig, G: Generator) -> nn.Module:
    H, N = G.style_dim, G.num_latents
    if cfg.latent_space == "w":
        return WHead(N)
    if cfg.latent_space == "w+":
        return WPlusHead(H, N)
    if cfg.latent_space == "s":
        return SHead(H, G.style_dims)
    g = cfg.gdm
    cls = GraphDisentangle if cfg.gdm_relation == "hmrr" else GraphDisentangleVRR
    return cls(
        latent_dim=H,
        num_nodes=g.num_nodes,
        node_dim=g.node_dim,
        num_codes=N,
        convkb_filters=g.convkb_filters,
        relation_scale=None if g.relation_scale == "dim" else float(g.relation_scale),
        chunk_size=g.chunk_size,
        checkpoint_chunks=g.checkpoint_chunks,
        relation_logits=g.relation_logits,
    )


def _assemble(cfg: ModelConfig, G: Generator) -> LarenSR:
    check_combination(cfg)
    H = G.style_dim
    e = cfg.encoder
    encoder = GleanEncoder(cfg.lr_size, G.channels, H, e.rrdb_blocks, e.rrdb_channels, e.rrdb_growth)
    head = _build_head(cfg, G)
    cgm = None
    if cfg.noise_source == "cgm":
        cgm = CodeGeneration(H, cfg.cgm.code_dim, G.noise_resolutions, cfg.cgm.noise_proj_max_res, cfg.cgm_relation,
                             activation=cfg.cgm_activation)
    decoder = None
    if cfg.glean_skips:
        decoder = GleanDecoder(cfg.lr_size, G.resolution, G.channels, encoder.channels, lr_skip=cfg.glean_lr_skip)
    return LarenSR(encoder, head, G, cgm=cgm, decoder=decoder, eval_noise_seed=cfg.eval_noise_seed,
                   learn_noise_strength=cfg.learn_noise_strength)


# A random generator's noise strengths start at 0 (StyleGAN2's init), so its noise inputs, and with them the CGM, would
# have no effect at all: the CGM gets exactly zero gradient. Trained priors have non-zero strengths (about 0.01-0.3
# in published FFHQ checkpoints); a random prior that stands in for one gets this value in every layer.
RANDOM_PRIOR_NOISE_STRENGTH = 0.1


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> LarenSR:
    """The SR model of ``cfg``: the prior's pre-trained generator when ``cfg.prior.path`` is set, else a random one
    (with noise strengths ``RANDOM_PRIOR_NOISE_STRENGTH``, so that noise and the CGM matter, as with a trained prior)."""
    if cfg.prior.path:
        G = _load_prior(cfg)[0]
    else:
        G = build_generator(cfg)
        with torch.no_grad():
            for name, p in G.named_parameters():
                if name.endswith("noise.weight"):
                    p.fill_(RANDOM_PRIOR_NOISE_STRENGTH)
    return _assemble(cfg, G).to(device)


def build_discriminator(cfg: ModelConfig, device: str | torch.device = "cpu") -> Discriminator:
    """The StyleGAN2 discriminator: the prior's pre-trained D when present, else a random one (with a warning)."""
    if cfg.prior.path:
        D = _load_prior(cfg)[1]
        if D is not None:
            return D.to(device)
        log.warning("the prior at %s has no discriminator; the discriminator starts from random weights", cfg.prior.path)
    p = cfg.prior
    return Discriminator(
        p.resolution, channel_multiplier=p.channel_multiplier, channel_max=p.channel_max, channel_base=p.channel_base()
    ).to(device)


def _count(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def parameter_summary(cfg: ModelConfig) -> list[tuple[str, int, bool]]:
    """Rows (name, parameters, trainable) in SUMMARY_ROWS order, built on the meta device (no weights are read
    or allocated). "latent head" is the W+ / S head (0 for W and for G); "GDM" is the G head. "total trainable"
    is the SR model's (encoder + head + CGM + decoder), without the discriminator, as in Table III."""
    cfg_nopath = cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"path": None})})
    with torch.device("meta"):
        model = _assemble(cfg_nopath, build_generator(cfg_nopath))
        D = build_discriminator(cfg_nopath, device="meta")
    is_gdm = cfg.latent_space == "g"
    rows = [
        ("encoder", _count(model.encoder), True),
        ("latent head", 0 if is_gdm else _count(model.head), True),
        ("GDM", _count(model.head) if is_gdm else 0, True),
        ("CGM", _count(model.cgm), True),
        ("GLEAN fusion+decoder", _count(model.decoder), True),
        ("generator (frozen)", _count(model.generator), False),
        ("discriminator", _count(D), True),
        ("total trainable", sum(p.numel() for p in model.trainable_parameters()), True),
    ]
    return rows
