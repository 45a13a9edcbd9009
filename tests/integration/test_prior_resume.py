"""`laren prior train` on Ray Train: a run whose worker is killed (max_failures 0) and is run again continues from its
last checkpoint in the same MLflow run, reproduces the uninterrupted run's loss curve and factor-FD, and writes a prior
that `laren prior import` / `load_prior` read back unchanged. Local Ray (2 gloo workers), local checkpoints, MLflow in
SQLite, a tiny synthetic set (`laren data synth`).

Tiny sizes: 32x32, style_dim 16, 8 channels, batch 4 (2 per rank); 8 steps, checkpoints at steps 4 and 8.
"""

from __future__ import annotations

import pytest
import torch

from laren.config import PriorRunConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]

EXPERIMENT = "prior-resume"


@pytest.fixture(scope="module")
def env(local_ray, tmp_path_factory):
    from laren.data.synth import synth

    work = tmp_path_factory.mktemp("prior-resume")
    synth("faces", str(work / "train"), 32, 64, seed=0, shard_size_mb=0.05, progress=False)
    synth("faces", str(work / "val"), 32, 32, seed=1, progress=False)
    return work


def _cfg(work, name: str) -> PriorRunConfig:
    return PriorRunConfig.model_validate(dict(
        name=name,
        model=dict(lr_size=8, prior=dict(resolution=32, style_dim=16, mapping_layers=2, channel_multiplier=1, channel_max=8)),
        data=dict(train_url=str(work / "train"), val_url=str(work / "val"), loader_workers=0, shuffle_buffer=8),
        train=dict(batch_size_global=4, total_kimg=0.032, log_every_kimg=0.004, eval_every_kimg=0.016,
                   checkpoint_every_kimg=0.016, max_failures=0, keep_checkpoints=2, seed=1),
        gan=dict(r1_gamma=1.0, r1_every=2, pl_weight=1.0, pl_every=2, diffaugment=["translation", "color"],
                 metric_images=32, regressor_steps=20, grid_images=4, output=str(work / "priors" / name)),
        storage=dict(root=str(work / "storage")),
        tracking=dict(tracking_uri=f"sqlite:///{work}/mlflow.db", experiment=EXPERIMENT, system_metrics=False),
        resources=dict(num_workers=2, cpus_per_worker=1),
    ))


def _history(uri: str, run_name: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name(EXPERIMENT).experiment_id],
                         filter_string=f"attributes.run_name = '{run_name}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one MLflow run, however many attempts
    return sorted((m.step, m.value) for m in c.get_metric_history(runs[0].info.run_id, key))


def test_killed_prior_run_resumes_in_the_same_mlflow_run(env, monkeypatch, tmp_path):
    import ray.train

    from laren.models.prior_io import import_prior, load_prior
    from laren.train.distributed import run_training
    from laren.train.faults import KillOnce

    uri = f"sqlite:///{env}/mlflow.db"
    ref = run_training(_cfg(env, "ref"), run_id="ref")
    assert ref["step"] == 8

    marker = tmp_path / "killed"
    kill = KillOnce(5, rank=1, marker=str(marker))
    cfg = _cfg(env, "job")
    with pytest.raises(ray.train.WorkerGroupError):
        run_training(cfg, run_id="job", on_step=kill)
    assert "step 5" in marker.read_text()
    assert not (env / "priors" / "job.json").exists()  # no prior from a failed run
    out = run_training(cfg, run_id="job")
    assert out["step"] == 8 and out["checkpoint"].endswith("checkpoint_000000008")

    for key in ("train/loss_d", "train/loss_g", "eval/factor_fd"):
        got, want = _history(uri, "job", key), _history(uri, "ref", key)
        assert [s for s, _ in got] == [s for s, _ in want], key  # nothing logged twice, nothing missing
        for (s, v), (_, w) in zip(got, want):
            assert v == pytest.approx(w, rel=1e-4, abs=1e-6), (key, s, v, w)
    assert [s for s, _ in _history(uri, "job", "eval/factor_fd")] == [0, 4, 8]

    # The prior: the same as the uninterrupted run's, and unchanged through `laren prior import` / load.
    g, d, meta = load_prior(str(env / "priors" / "job"))
    g_ref, _, _ = load_prior(str(env / "priors" / "ref"))
    z = torch.randn(3, 16)
    img = g.generate(z, randomize_noise=False)[0]
    assert torch.allclose(img, g_ref.generate(z, randomize_noise=False)[0], atol=1e-5)
    again = import_prior(str(env / "priors" / "job.safetensors"), str(tmp_path / "imported"))
    assert again.sha256 == meta.sha256
    g2, _, _ = load_prior(str(tmp_path / "imported"))
    assert torch.equal(g2.generate(z, randomize_noise=False)[0], img)
