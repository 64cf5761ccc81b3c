"""Resolve `--model`: a model directory, or an MLflow model URI downloaded to a local folder."""

import atexit
import shutil
import tempfile
from pathlib import Path

import mlflow

from eventcoder.errors import ConfigError, TrackingError
from eventcoder.yaml_io import load_yaml

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def download_model_dir(uri: str, destination: Path) -> Path:
    """Download a logged eventcoder pyfunc model and return its model directory inside it."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(destination)))
    except Exception as exc:
        raise TrackingError(
            f"model {uri}: cannot load from {mlflow.get_tracking_uri()}: {str(exc).splitlines()[0][:200]}"
        ) from None
    mlmodel = local / "MLmodel"
    artifacts = {}
    if mlmodel.is_file():
        artifacts = load_yaml(mlmodel).get("flavors", {}).get("python_function", {}).get("artifacts") or {}
    if "model_dir" not in artifacts:
        raise ConfigError(f"model {uri}: not an eventcoder pyfunc model (no model_dir artifact)")
    return local / artifacts["model_dir"]["path"]


def resolve_model_dir(reference: str, tracking_uri: str) -> Path:
    if reference.startswith(MLFLOW_SCHEMES):
        mlflow.set_tracking_uri(tracking_uri)
        destination = Path(tempfile.mkdtemp(prefix="eventcoder-model-"))
        atexit.register(shutil.rmtree, destination, ignore_errors=True)
        return download_model_dir(reference, destination)
    path = Path(reference)
    if not path.is_dir():
        raise ConfigError(f"--model {reference}: no such model directory (or use models:/NAME@ALIAS)")
    return path
