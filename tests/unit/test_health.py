"""Model health (model-spec 9): the criteria hold at initialisation for every shipped model, with the statistics the
real upstream modules produce (the real encoder on image-like probe inputs, never N(0, 1) codes); the paper-literal
v1 switches fail them; the quick check of validate refuses a dead configuration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from laren.config import ConfigError, ModelConfig
from laren.models import health
from laren.models.build import build_model
from laren.specs import JobSpec, load_any
from laren.jobs.checks import validate
from laren.jobs.entrypoints import run_configs

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "jobs").glob("*.yaml")) + sorted((REPO / "sweeps").glob("*.yaml"))
SEEDS = range(20)


def small_widths(m: ModelConfig) -> ModelConfig:
    """tiny_widths, with the latent width H capped at 32 and the GDM's nodes J at 16, so that 20 seeds of every
    shipped model run in seconds (the GDM's cost grows with J^2 * H). C, Omega, F, N, the lr size and every switch are
    the job's. The job's own J and H are checked by `laren validate` (tiny widths) and the full-size face64x test
    (tests/integration/test_health_full_size.py)."""
    t = health.tiny_widths(m)
    return t.model_copy(update={"prior": t.prior.model_copy(update={"style_dim": min(t.prior.style_dim, 32)}),
                                "gdm": t.gdm.model_copy(update={"num_nodes": min(t.gdm.num_nodes, 16)})})


def shipped_models() -> list[tuple[str, ModelConfig]]:
    """Every distinct model of every train job, grid row and sweep point under jobs/ and sweeps/, at test widths.
    Models that differ only in ``prior.source`` (a description: bedroom16x, car16x, ... at test widths) are one."""
    out, seen = [], set()
    for path in SHIPPED:
        spec = load_any(path)
        if isinstance(spec, JobSpec) and spec.kind == "eval":
            continue
        for label, cfg in run_configs(spec):
            m = small_widths(cfg.model)
            key = m.model_copy(update={"prior": m.prior.model_copy(update={"source": ""})}).model_dump_json()
            if key not in seen:
                seen.add(key)
                out.append((f"{path.stem}:{label}", m))
    return out


SHIPPED_MODELS = shipped_models()


def test_the_shipped_models_are_covered():
    names = " ".join(n for n, _ in SHIPPED_MODELS)
    assert len(SHIPPED_MODELS) >= 10 and "ablation-face64x" in names and "jcf-face64x" in names and "demo" in names


@pytest.mark.slow
@pytest.mark.parametrize("name,model", SHIPPED_MODELS, ids=[n for n, _ in SHIPPED_MODELS])
def test_every_shipped_model_is_alive_at_init(name, model):
    """20 seeds per model. The SR loss is replaced by a fixed random function of the noise maps (the generator adds
    strength * noise to its features: the SR loss reaches each map as a dense gradient map), so a 1024 px generator
    need not run 20 times per model; the forward figures are those of the real encoder and head."""
    for seed in SEEDS:
        rep = health.check_init(model, seed, through_generator=False, head_backward=False)
        assert rep.passed, (name, seed, rep.checks)


def test_demo_alive_through_the_generator_for_20_seeds():
    """The demo's own model, with the real SR loss through its (random, 32 px) generator."""
    cfg = load_any(REPO / "jobs" / "demo-photos.yaml").run_config().model
    for seed in SEEDS:
        rep = health.check_init(cfg, seed)
        assert rep.passed, (seed, rep.checks)
        assert rep.figures["grad_ratio/cgm.query"] > 0 and rep.figures["cgm_noise_differ"] == 1.0


def test_v1_switches_reproduce_the_v1_failures():
    """cgm_activation: relu and relation_logits: l2 (spec v1): rho is a binary gate in every seed, and the CGM is
    dead (zero gradient to W_Q / W_K / W_t, image-independent noise maps) in some."""
    cfg = load_any(REPO / "jobs" / "demo-photos.yaml").run_config().model
    v1 = cfg.model_copy(update={"cgm_activation": "relu", "gdm": cfg.gdm.model_copy(update={"relation_logits": "l2"})})
    reps = [health.check_init(v1, seed) for seed in range(6)]
    assert all(r.figures["gdm_mask_share"] > 0.99 for r in reps)
    dead = [r for r in reps if not r.checks["cgm_grads"][0]]
    assert dead and all(r.figures["cgm_noise_differ"] == 0.0 for r in dead)
    assert "query.weight" in dead[0].checks["cgm_grads"][1]


def test_validate_refuses_a_dead_model(tmp_path):
    text = (REPO / "jobs" / "demo-photos.yaml").read_text()
    text = text.replace("  cgm_relation: rerr\n", "  cgm_relation: rerr\n  cgm_activation: relu\n")
    text = text.replace("    relation_scale: dim\n", "    relation_scale: dim\n    relation_logits: l2\n")
    (tmp_path / "dead.yaml").write_text(text.replace("name: demo-photos", "name: dead"))
    with pytest.raises(ConfigError, match=r"(?s)model health: .*dead \(train\): gdm_mask_share \(0\.99"):
        validate(tmp_path / "dead.yaml", summary=False)
    _, ok = validate(REPO / "jobs" / "demo-photos.yaml", summary=False)
    assert "# model health (quick check, tiny widths): PASS, 1 model(s)" in ok


def test_rerr_and_vrr_rows_give_different_image_specific_noise():
    """Table IV's CGM(ReRR) and CGM(VRR) rows: for the same inputs, their noise maps depend on the image, and differ
    from each other beyond the projections' biases (v1: both were the biases alone)."""
    spec = load_any(REPO / "jobs" / "ablation-face64x.yaml")
    rows = {cfg.model.cgm_relation: small_widths(cfg.model) for _, cfg in run_configs(spec)
            if cfg.model.noise_source == "cgm" and cfg.model.latent_space == "g" and cfg.model.gdm_relation == "hmrr"}
    assert set(rows) == {"rerr", "vrr"}
    lr = health.probe_images(2, rows["rerr"].lr_size, seed=0)
    parts = {}
    for rel, m in rows.items():
        torch.manual_seed(0)
        model = build_model(m)
        with torch.no_grad():
            z = model.encode(lr)[0]
            codes = model.cgm.codes(model.latent_codes(z)[0])
            parts[rel] = [p.weight @ codes[:, i].T for i, p in enumerate(model.cgm.proj)]  # bias-free part of each map
    for rel, maps in parts.items():
        assert all((m[:, 0] != m[:, 1]).any() for m in maps), rel  # image-specific
    assert all((a - b).abs().amax() > 1e-6 * b.abs().amax() for a, b in zip(parts["rerr"], parts["vrr"]))


def test_figures_read_on_device_equal_their_definitions():
    """step_figures reads its figures from the device in one transfer per function: they equal their definitions,
    computed here per tensor in float64 from the model's parts (rms(grad) / rms(param) per group; rho's variance
    decomposition; per CGM layer the share of positive pre-activations and max T, layer 1 rebuilt by hand; maps that
    differ between two images, and none between an image and itself)."""
    cfg = load_any(REPO / "jobs" / "demo-photos.yaml").run_config().model
    torch.manual_seed(0)
    model = build_model(cfg.model_copy(update={"prior": cfg.prior.model_copy(update={"path": None})})).train()
    lr = health.probe_images(2, cfg.lr_size, seed=0)
    z, _ = model.encode(lr)
    g, _ = model.latent_codes(z)
    sum(m.square().mean() for m in model.cgm(g)).backward()
    fig = health.step_figures(model, lr)

    with torch.no_grad():
        for name, params in health._groups(model).items():
            g2 = sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None)
            p2 = sum(float(p.double().square().sum()) for p in params)
            assert fig[f"grad_ratio/{name}"] == pytest.approx(math.sqrt(g2) / math.sqrt(p2), rel=1e-10), name
        assert fig["grad_ratio/cgm.query"] > 0 and fig["grad_ratio/decoder"] == 0.0  # this loss stops at the CGM

        z, _ = model.encode(lr)
        g, _ = model.latent_codes(z)
        assert {k: fig[f"gdm_{k}"] for k in ("mask_share", "support_share")} == pytest.approx(
            model.head.relation_stats(z[:1]), rel=1e-12)
        flat = g.flatten(1).double()
        assert fig["g_spread"] == pytest.approx(float((flat.std(1) / flat.mean(1).abs()).mean()), rel=1e-12)
        stats = {}
        maps = model.cgm.noise_maps(model.cgm.codes(g, stats))
        layers = range(len(stats["live"]))
        assert [fig[f"cgm_live/L{i:02d}"] for i in layers] == [float(t) for t in stats["live"]]
        assert [fig[f"cgm_tmax/L{i:02d}"] for i in layers] == [float(t) for t in stats["t_max"]]
        assert fig["cgm_live_min"] == min(float(t) for t in stats["live"])
        T1 = torch.softmax(model.cgm.relation_logits(g[:, 0]), dim=1)  # layer 1 by hand: T^1 = softmax(R_1), x = g_1
        pre1 = torch.einsum("bif,bi->bf", T1, g[:, 0])
        assert fig["cgm_live/L00"] == float((pre1 > 0).float().mean()) and fig["cgm_tmax/L00"] == float(T1.amax())
        assert fig["cgm_noise_differ"] == sum(bool((m[0] != m[1]).any()) for m in maps) / len(maps) > 0.9
        assert health.forward_figures(model, lr[[0, 0]])["cgm_noise_differ"] == 0.0  # an image and itself
