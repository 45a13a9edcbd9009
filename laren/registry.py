"""Trained SR models in the MLflow Model Registry: logged at the end of a training run, loaded by `laren upscale
--model` and by `mlflow models predict` / `mlflow models serve`.

The model (MLflow artifact ``model/`` of the training run, registered as ``laren-<job name>``) holds

    artifacts/weights.safetensors  the LarenSR state dict (``model.<key>``): encoder, GDM, CGM, heads and the frozen
                                   StyleGAN2 generator it renders with; no discriminator, no optimizer state
    artifacts/config.json          the run's resolved config (credentials redacted)
    artifacts/prior.json           the prior's metadata (laren's prior format) and its path; for a random prior, that
    pyfunc_model.py                MLflow "models from code": the pyfunc class, importing the rest from the installed laren

No pickle anywhere: MLflow runs ``pyfunc_model.py`` (source, which only imports laren), the weights are safetensors,
the rest JSON. `laren upscale --model` reads only the weights and the config: it runs no code from the model. The
frozen prior's generator is copied into the weights (a 1024 px FFHQ generator is ~120 MB; the model is then
self-contained and renders without access to the prior's storage).

Serving input (the signature): a DataFrame with one string column ``image``, each value a base64-encoded image file
(PNG, JPEG, ...) of the model's input size ``model.lr_size`` (param ``resize: true`` centre-crops and resizes others);
the output has the same column holding base64 PNGs of the super-resolved images. As a JSON file for
`mlflow models predict -t json`: ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

import mlflow
from mlflow.exceptions import MlflowException
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import laren
from laren.config import RunConfig
from laren.data import storage
from laren.evaluate import load_model_from_checkpoint
from laren.models.build import build_model
from laren.models.prior_io import prior_paths
from laren.redact import redact, redact_text
from laren.tracking import set_http_env_defaults
from laren.train.state import FORMAT, load_prefixed

log = logging.getLogger("laren.registry")

ARTIFACT_PATH = "model"
WEIGHTS, CONFIG, PRIOR = "weights.safetensors", "config.json", "prior.json"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
URI_SCHEMES = ("models:/", "runs:/")


def model_name(job_name: str) -> str:
    return f"laren-{job_name}"


def is_model_uri(source: str) -> bool:
    return source.startswith(URI_SCHEMES)


# ----------------------------------------------------------------------------------------------- files


def write_inference_files(model: torch.nn.Module, config: Mapping[str, Any], dest: str | Path) -> dict[str, str]:
    """The inference weights, the config and the prior's metadata under ``dest``; {artifact name: local path}."""
    d = Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    weights = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(weights, str(d / WEIGHTS), metadata={"format": FORMAT})
    config = redact(dict(config))
    (d / CONFIG).write_text(json.dumps(config, indent=1))
    path = config["model"]["prior"].get("path")
    prior: dict[str, Any] = {"path": path, "source": config["model"]["prior"].get("source")}
    if path:
        prior["metadata"] = json.loads(storage.read_bytes(prior_paths(path)[1]))
    else:
        prior["metadata"] = None
        prior["note"] = "randomly initialised generator (no model.prior.path); its weights are in weights.safetensors"
    (d / PRIOR).write_text(json.dumps(prior, indent=1))
    return {"weights": str(d / WEIGHTS), "config": str(d / CONFIG), "prior": str(d / PRIOR)}


def load_inference_model(weights: str | Path, config: str | Path, device="cpu") -> tuple[torch.nn.Module, RunConfig]:
    """(model in eval mode, its RunConfig) from the files :func:`write_inference_files` wrote."""
    cfg = RunConfig.model_validate(json.loads(Path(config).read_text()))
    # The weights hold the frozen generator too: no prior file is read.
    model = build_model(cfg.model.model_copy(update={"prior": cfg.model.prior.model_copy(update={"path": None})}))
    load_prefixed(model, load_file(str(weights)), "model.", str(weights))
    return model.to(device).eval(), cfg


def load_model(source: str, device="cpu") -> tuple[torch.nn.Module, RunConfig]:
    """A model from a checkpoint directory (local or s3://) or an MLflow model URI (``models:/laren-<job>/latest``,
    ``runs:/<run id>/model``); MLflow URIs use MLFLOW_TRACKING_URI, for runs and the registry alike (MLflow's
    ``download_artifacts(tracking_uri=...)`` would still look models:/ names up in the default registry)."""
    if not is_model_uri(source):
        model, cfg, _ = load_model_from_checkpoint(source, device)
        return model, cfg
    set_http_env_defaults()
    with tempfile.TemporaryDirectory(prefix="laren-model-") as tmp:  # removed once the weights are in memory
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source.rstrip("/") + "/artifacts",
                                                             dst_path=tmp))
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            where = redact_text(mlflow.get_registry_uri())
            raise FileNotFoundError(f"{source}: no such model in the MLflow registry at {where} (a finished training run "
                                    "registers laren-<job name>; set MLFLOW_TRACKING_URI to the server that holds it)") from None
        return load_inference_model(local / WEIGHTS, local / CONFIG, device)


# ----------------------------------------------------------------------------------------------- pyfunc


def encode_png(img_hwc: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img_hwc).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode_image(b64: str) -> np.ndarray:
    """A base64-encoded image file -> uint8 (H, W, 3)."""
    return np.array(Image.open(io.BytesIO(base64.b64decode(b64, validate=True))).convert("RGB"))  # writable: torch-ready


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "image")]), outputs=Schema([ColSpec("string", "image")]),
                          params=ParamSchema([ParamSpec("resize", "boolean", False)]))


def log_and_register(tracking_uri: str, run_id: str, model: torch.nn.Module, cfg: RunConfig,
                     metrics: Mapping[str, float], laren_run_id: Optional[str] = None) -> Any:
    """Log ``model`` as the MLflow model ``model/`` of the run ``run_id`` and register it as ``laren-<job name>``, the
    version tagged with the laren run id, the data sets and the val metrics; returns the ModelVersion."""
    import mlflow.pyfunc  # function-local: importing it warns (MLflow's own type hints); laren upscale must not
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="laren-model-") as tmp:
        files = write_inference_files(model, cfg.to_dict(), Path(tmp) / "files")
        with warnings.catch_warnings():  # no input example on purpose: it would load a second model on rank 0
            warnings.filterwarnings("ignore", message=".*An input example was not provided")
            mlflow.pyfunc.save_model(
                str(Path(tmp) / ARTIFACT_PATH), python_model=str(MODEL_CODE), artifacts=files, signature=signature(),
                pip_requirements=[f"laren=={laren.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                                  f"mlflow=={mlflow.__version__}"],
            )
        client.log_artifacts(run_id, str(Path(tmp) / ARTIFACT_PATH), ARTIFACT_PATH)
    name = model_name(cfg.name)
    try:
        client.create_registered_model(name, description=f"laren SR models of the job {cfg.name}")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    laren_run_id = laren_run_id or cfg.run_id  # the run's id as its plan names it (a worker's copy of paths may differ)
    tags = {"laren.run_id": laren_run_id, "mlflow_run_id": run_id, "data.train": cfg.data.train_url,
            "data.val": cfg.data.val_url or cfg.data.train_url}
    tags.update({k: f"{v:.6g}" for k, v in metrics.items() if k.startswith("val/") and isinstance(v, (int, float))})
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    return client.create_model_version(name, source, run_id=run_id, tags=redact(tags),
                                       description=f"{laren_run_id}, step {metrics.get('step', '?')}")
