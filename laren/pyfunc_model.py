"""The file MLflow runs to load a laren SR model ("models from code": no pickled object). It only imports laren,
which must be installed where the model is loaded (`--env-manager local`); see laren/registry.py."""

import mlflow.models

from laren.registry import LarenPyfunc

mlflow.models.set_model(LarenPyfunc())
