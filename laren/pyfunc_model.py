"""The file MLflow runs to load a laren SR model ("models from code": no pickled object): the pyfunc class, which
imports the rest from laren, installed where the model is loaded (`--env-manager local`); see laren/registry.py.
Only MLflow's loader imports this module (importing ``mlflow.pyfunc`` warns, which `laren upscale` must not)."""

from __future__ import annotations

from typing import Any, Optional

import mlflow.models
import mlflow.pyfunc
import pandas as pd
import torch

from laren.evaluate import to_uint8_hwc
from laren.registry import decode_image, encode_png, load_inference_model
from laren.upscale import lr_from_array


class LarenPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc of a laren SR model: base64 images in, base64 PNGs out (see the module docstring)."""

    def load_context(self, context) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg = load_inference_model(context.artifacts["weights"], context.artifacts["config"], self.device)

    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> pd.DataFrame:
        # torch.no_grad() inside, not as a decorator: MLflow reads predict's type hints when the class is defined.
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise ValueError("input: a DataFrame with a column 'image' of base64-encoded image files")
        resize = bool((params or {}).get("resize", False))
        out = []
        with torch.no_grad():
            for i, b64 in enumerate(model_input["image"]):
                lr = lr_from_array(decode_image(b64), self.cfg.model.lr_size, resize, f"image {i}")
                out.append(encode_png(to_uint8_hwc(self.model(lr.to(self.device)).float()[0])))
        return pd.DataFrame({"image": out})


mlflow.models.set_model(LarenPyfunc())
