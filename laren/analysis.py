"""Table II and Fig. 7 for trained laren models (`laren analyze JOB`, job kind ``analysis``; `laren submit` runs it too).

The images: the first ``analysis.max_images`` of ``data.val_url``, made LR at each model's scale as evaluation does.
Their labels: the factors of a `laren data synth` set (its shards' ``<key>.factors.json``), or the attributes of
``analysis.labels_csv`` (CelebA-HQ's 40), matched to each sample by the stem of its packed source file. One seeded
train/test split of the images serves every model and space. Each model's codes of every image, per space:

| space | code | dims (synth32 / 64x face) |
|---|---|---|
| Z | the encoder output z = E(x); for a Base model (``latent_space: w``) it is its W code, shown as ``W (= Z)`` | H |
| W+ | the W+ head's per-layer codes, flattened (``latent_space: w+``) | N*H |
| G | the GDM's per-layer codes g, flattened (``latent_space: g``) | N*H |
| S | the style codes the frozen generator modulates with: the S head's output (``latent_space: s``), else the prior's own modulation affines applied to the per-layer latents (StyleSpace of that model) | sum of style widths |

The paper's Table II samples w ~ mapping(z) and annotates rendered images with CelebA classifiers (model-spec 7); here
the images and their labels are given, and each space is what a trained model feeds its generator for that image, so
a Table II column comes from the model trained with that space (the Table IV rows). DCI per space:
:mod:`laren.disentangle`.

Fig. 7: |Pearson rho| over the test images between dims 16-20 and 1-15 (1-based) of Z and of G (the first 20 dims of
flattened g, model-spec 7), as 5x15 heatmaps with the colour range [0, ``analysis.colour_max``] (paper: 0.4).

One MLflow run ``<job run id>`` (tag ``laren.kind: analysis``): metrics ``dci/<model>/<space>/{D,C,I}`` and
``dci/<model>/<space>/score/<factor>``, artifacts ``results/table2.{md,csv}``, ``results/importance-<model>-<space>.csv``
(R, d x K), ``fig7/fig7-<model>-<space>.{png,csv}``, and the heatmaps as images ``fig7/<model>/<space>``.
"""

from __future__ import annotations

import csv
import io
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from laren import disentangle as DI
from laren.config import AnalysisConfig, ConfigError
from laren.data import storage
from laren.data.synth import read_factor_samples, read_samples
from laren.evaluate import load_model_from_checkpoint, lr_images
from laren.jobs.grid import checkpoint_run_id, checkpoint_url
from laren.metrics import latent_correlation
from laren.specs import JobSpec, experiment_name
from laren.tracking import Tracker
from laren.train.distributed import resolve_paths, runs_root

HEAD_SPACE = {"w": "W", "w+": "W+", "s": "S", "g": "G"}
# Paper Table II (W / W+ / S / G): D, C, I.
PAPER = {"W": (0.47, 0.51, 0.94), "W+": (0.56, 0.63, 0.96), "S": (0.68, 0.76, 0.99), "G": (0.82, 0.88, 0.99)}
SPACE_SLUG = {"Z": "z", "W (= Z)": "w", "W+": "wplus", "S": "s", "G": "g"}
FIG7_ROWS, FIG7_COLS = slice(15, 20), slice(0, 15)  # dims 16-20 x 1-15, 1-based


# ----------------------------------------------------------------------------------------------- labels


def read_labels_csv(path: str) -> tuple[dict[str, list[float]], list[str]]:
    """({image stem: attribute values}, attribute names) of a CSV: header row, image name first, one column per attribute."""
    with open(storage.local_copy(path), newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or len(rows[0]) < 2:
        raise ConfigError(f"analysis.labels_csv: {path}: needs a header (image, attribute, ...) and one row per image")
    names, table = [h.strip() for h in rows[0][1:]], {}
    for i, r in enumerate(rows[1:], start=2):
        if len(r) != len(names) + 1:
            raise ConfigError(f"analysis.labels_csv: {path}: line {i} has {len(r)} fields, the header {len(names) + 1}")
        try:
            table[Path(r[0].strip()).stem] = [float(v) for v in r[1:]]
        except ValueError:
            raise ConfigError(f"analysis.labels_csv: {path}: line {i}: attribute values must be numbers") from None
    return table, names


def load_labelled(url: str, limit: int, labels_csv: Optional[str]) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(uint8 HR images (N, R, R, 3), labels (N, K), label specs [{name, kind}]) of the first ``limit`` samples."""
    if labels_csv is None:
        try:
            return read_factor_samples(url, limit)
        except ValueError as err:
            raise ConfigError(f"data.val_url: {err}; give analysis.labels_csv for a set without factors") from None
    table, names = read_labels_csv(labels_csv)
    imgs, metas, _ = read_samples(url, limit)
    stems = [Path(str(m.get("source", ""))).stem for m in metas]
    missing = [s for s in stems if s not in table]
    if missing:
        raise ConfigError(f"analysis.labels_csv: no row for {len(missing)} of {len(stems)} images of {url} "
                          f"(first: {missing[:3]}); the first column must name each packed source file")
    labels = np.array([table[s] for s in stems], dtype=np.float64)
    return imgs, labels, [{"name": n, "kind": "discrete"} for n in names]


# ----------------------------------------------------------------------------------------------- codes


@torch.no_grad()
def code_spaces(model, latent_space: str, lr: torch.Tensor) -> dict[str, torch.Tensor]:
    """{space: codes (B, d)} of LR images (see the module docstring's table)."""
    z, _ = model.encode(lr)
    latents, styles = model.latent_codes(z)
    own = HEAD_SPACE[latent_space]
    out = {"W (= Z)" if own == "W" else "Z": z}
    if own in ("W+", "G"):
        out[own] = latents.flatten(1)
    out["S"] = torch.cat(styles if styles is not None else model.generator.compute_styles(latents), dim=1)
    return {k: v.float().cpu() for k, v in out.items()}


def encode_all(model, latent_space: str, lr: torch.Tensor, batch_size: int) -> dict[str, np.ndarray]:
    parts: dict[str, list[torch.Tensor]] = {}
    for i in range(0, lr.shape[0], batch_size):
        for k, v in code_spaces(model, latent_space, lr[i: i + batch_size]).items():
            parts.setdefault(k, []).append(v)
    return {k: torch.cat(v).numpy().astype(np.float64) for k, v in parts.items()}


def fig7_map(codes_nd: np.ndarray) -> np.ndarray:
    """|rho| (5, 15) between dims 16-20 and 1-15 (1-based) of the codes."""
    if codes_nd.shape[1] < 20:
        raise ValueError(f"Fig. 7 needs at least 20 code dimensions, got {codes_nd.shape[1]}")
    return latent_correlation(codes_nd[:, :20], codes_nd[:, :20])[FIG7_ROWS, FIG7_COLS]


def heatmap(rho: np.ndarray, title: str, vmax: float, path: Path) -> np.ndarray:
    """Save the Fig. 7 heatmap of ``rho`` (5, 15) as PNG; return it as uint8 (H, W, 3)."""
    import matplotlib  # optional heavy dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    im = ax.imshow(rho, vmin=0.0, vmax=vmax, cmap="viridis", aspect="equal")
    ax.set_xticks(range(15), [f"dim{j:02d}" for j in range(1, 16)], rotation=90, fontsize=7)
    ax.set_yticks(range(5), [f"dim{j:02d}" for j in range(16, 21)], fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.025)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return np.asarray(Image.open(path).convert("RGB"))


# ----------------------------------------------------------------------------------------------- tables


def slug(text: str) -> str:
    """A metric-name part: a space's short name ('W+' -> 'wplus', 'W (= Z)' -> 'w'), or a label in lowercase letters,
    digits and '-' ('Base+GDM (HMRR)' -> 'base-plus-gdm-hmrr')."""
    if text in SPACE_SLUG:
        return SPACE_SLUG[text]
    return re.sub(r"[^a-z0-9]+", "-", text.lower().replace("+", " plus ")).strip("-") or "x"


def table2(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """(markdown, csv) of Table II: one row per model and space, with the paper's value for that space."""
    def paper(space: str) -> str:
        p = PAPER.get(space.split(" (")[0])
        return " / ".join(f"{v:.2f}" for v in p) if p else "-"

    head = ["Model", "Space", "dims", "Disentanglement", "Completeness", "Informativeness", "paper D / C / I"]
    md = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    md += [f"| {r['model']} | {r['space']} | {r['dims']} | {r['D']:.3f} | {r['C']:.3f} | {r['I']:.3f} | {paper(r['space'])} |"
           for r in rows]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "space", "dims", "disentanglement", "completeness", "informativeness", "checkpoint"])
    for r in rows:
        w.writerow([r["model"], r["space"], r["dims"], f"{r['D']:.6f}", f"{r['C']:.6f}", f"{r['I']:.6f}", r["checkpoint"]])
    return "\n".join(md) + "\n", buf.getvalue()


def _matrix_csv(r: np.ndarray, factors: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["dim", *factors])
    for i, row in enumerate(r):
        w.writerow([i, *(f"{v:.6g}" for v in row)])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------- the job


def check_targets(spec: JobSpec, root: Optional[Path] = None) -> None:
    """Every job file an analysis job names exists and, with '#row', names a row of a grid (before anything runs)."""
    for i, t in enumerate(spec.analysis.checkpoints):
        path = t.checkpoint.partition("#")[0]
        if path.endswith((".yaml", ".yml")):
            try:
                checkpoint_run_id(t.checkpoint, root)
            except (ConfigError, FileNotFoundError) as err:
                raise ConfigError(f"analysis.checkpoints.{i}.checkpoint: {err}") from None


def run_analysis(spec: JobSpec, root: Optional[Path] = None, out_dir: Optional[str] = None,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run an analysis job (see the module docstring); returns {"run_id", "rows", "table_md", "fig7"}."""
    if spec.kind != "analysis" or spec.analysis is None:
        raise ConfigError(f"{spec.name}: kind is {spec.kind!r}; `laren analyze` runs kind: analysis jobs")
    acfg: AnalysisConfig = spec.analysis
    cfg = resolve_paths(spec.run_config())
    if not cfg.data.val_url:
        raise ConfigError(f"{spec.name}: data.val_url is empty: set it to the labelled images (a synthetic set, or a "
                          "packed set with analysis.labels_csv)")
    check_targets(spec, root)
    labels = [slug(t.label) for t in acfg.checkpoints]
    if len(set(labels)) < len(labels):
        raise ConfigError(f"analysis.checkpoints: labels must differ in letters and digits (metric names: {labels})")
    runs = runs_root(cfg)
    cks = [(t.label, checkpoint_url(t.checkpoint, runs, root)) for t in acfg.checkpoints]  # all found before any work
    imgs, labels, specs = load_labelled(cfg.data.val_url, acfg.max_images, acfg.labels_csv)
    targets, dropped = DI.prepare_targets(labels, specs, acfg)
    if len(targets) < 2:
        raise ConfigError(f"{spec.name}: {len(targets)} usable factor(s) of {len(specs)}; DCI needs two or more "
                          f"(dropped: {dropped})")
    train, test = DI.split(len(imgs), acfg.test_fraction, acfg.seed)
    out = Path(out_dir or tempfile.mkdtemp(prefix=f"laren-analysis-{spec.name}-"))
    out.mkdir(parents=True, exist_ok=True)
    tr = Tracker(cfg.tracking.tracking_uri, experiment_name(spec), spec.run_id,
                 tags={"laren.kind": "analysis", "laren.job": spec.name}, system_metrics=False)
    tr.log_params({"images": len(imgs), "train_images": len(train), "test_images": len(test), "data": cfg.data.val_url,
                   "factors": ",".join(t.name for t in targets), "dropped": "; ".join(dropped) or "none",
                   **{f"checkpoint.{slug(label)}": url for label, url in cks}})
    tr.log_config(spec.to_dict())
    log(f"analysis {spec.run_id}: {len(imgs)} images ({len(train)} train / {len(test)} test), factors "
        f"{[t.name for t in targets]}" + (f"; dropped {dropped}" if dropped else ""))
    rows, figs, metrics = [], {}, {}
    status = "FAILED"
    try:
        for label, url in cks:
            model, mcfg, _ = load_model_from_checkpoint(url)
            lr = lr_images(imgs, mcfg.model.lr_size)
            if imgs.shape[1] != mcfg.model.prior.resolution:
                raise ConfigError(f"{label}: {cfg.data.val_url} is {imgs.shape[1]} px, the model's output "
                                  f"{mcfg.model.prior.resolution} px")
            codes = encode_all(model, mcfg.model.latent_space, lr, acfg.batch_size)
            for space, x in codes.items():
                res = DI.dci_of_codes(x, targets, train, test, acfg)
                key = f"dci/{slug(label)}/{slug(space)}"
                metrics.update({f"{key}/{m}": res[m] for m in ("D", "C", "I")})
                metrics.update({f"{key}/score/{n}": v for n, v in res["scores"].items()})
                rows.append({"model": label, "space": space, "dims": x.shape[1], "checkpoint": url,
                             **{m: res[m] for m in ("D", "C", "I")}})
                p = out / f"importance-{slug(label)}-{slug(space)}.csv"
                p.write_text(_matrix_csv(res["R"], [t.name for t in targets]))
                tr.log_artifact(str(p), "results")
                log(f"  {label} {space} ({x.shape[1]} dims): D {res['D']:.3f} C {res['C']:.3f} I {res['I']:.3f}")
                if space.startswith(("Z", "W (= Z)", "G")):
                    rho = fig7_map(x[test])
                    name = f"{slug(label)}-{slug(space)}"
                    png = out / f"fig7-{name}.png"
                    img = heatmap(rho, f"{label}: |Pearson rho| in {space} over {len(test)} test images",
                                  acfg.colour_max, png)
                    np.savetxt(out / f"fig7-{name}.csv", rho, delimiter=",", fmt="%.6f")
                    tr.log_image(img, f"fig7/{slug(label)}/{slug(space)}", 0)
                    tr.log_artifact(str(png), "fig7")
                    tr.log_artifact(str(out / f"fig7-{name}.csv"), "fig7")
                    figs[name] = rho
                    metrics[f"fig7/{slug(label)}/{slug(space)}/mean_abs_rho"] = float(rho.mean())
        tr.log_metrics(metrics, step=0)
        md, csv_text = table2(rows)
        title = (f"# {spec.name}: Table II (DCI, {acfg.estimator}) on {len(test)} test images of {cfg.data.val_url}\n\n"
                 f"Factors: {', '.join(t.name for t in targets)}" + (f"; dropped: {'; '.join(dropped)}" if dropped else "")
                 + "\n\n")
        (out / "table2.md").write_text(title + md)
        (out / "table2.csv").write_text(csv_text)
        tr.log_artifact(str(out / "table2.md"), "results")
        tr.log_artifact(str(out / "table2.csv"), "results")
        log(title + md)
        status = "FINISHED"
    finally:
        tr.finish(status)
    return {"run_id": spec.run_id, "mlflow_run_id": tr.run_id, "rows": rows, "table_md": md, "fig7": figs,
            "out_dir": str(out)}
