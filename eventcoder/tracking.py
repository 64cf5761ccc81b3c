"""MLflow: where runs go, what a run records, and the pyfunc model it logs."""

import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import eventcoder
from eventcoder.config import Config, default_tracking_uri, project_root
from eventcoder.errors import TrackingError

log = logging.getLogger(__name__)

# MLflow stores a param value of at most 6000 characters; longer ones are cut with a marker.
MAX_PARAM_LENGTH = 6000
PYFUNC_REQUIREMENTS_PACKAGES = (
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "pydantic",
    "pyyaml",
    "scikit-learn",
    "numpy",
    "pandas",
    "pysbd",
    "mlflow",
    "tqdm",
)


def tracking_uri(config: Config) -> str:
    """Config, then MLFLOW_TRACKING_URI, then MLflow's own default store `mlflow.db` in this folder."""
    return default_tracking_uri(config.tracking.tracking_uri)


def connect(config: Config) -> MlflowClient:
    """Point MLflow at the store and fail now, not after hours of training, if it is unreachable."""
    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    if uri.startswith(("http://", "https://")):
        # MLflow's client retries for minutes by default; a dead server should fail in seconds.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    client = MlflowClient(tracking_uri=uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({_root_cause(exc)}); "
            "set MLFLOW_TRACKING_URI or tracking.tracking_uri"
        ) from None
    return client


def _root_cause(exc: BaseException) -> str:
    """The innermost error (e.g. 'Connection refused'), not MLflow's retry wrapper around it."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.rsplit(": ", 1)[-1] if "Errno" in text or "refused" in text else text[:300]


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def params_for_mlflow(config: Config) -> dict[str, str]:
    params = {}
    for key, value in flatten(config.to_dict()).items():
        text = str(value)
        if len(text) > MAX_PARAM_LENGTH:
            text = text[: MAX_PARAM_LENGTH - 14] + "...[truncated]"
        params[key] = text
    return params


def run_name(config: Config) -> str:
    if config.tracking.run_name:
        return config.tracking.run_name
    encoder = "minilm-l6" if config.model.encoder == "default" else Path(config.model.encoder.rstrip("/")).name
    t = config.train
    return f"{encoder}-lr{t.learning_rate:g}-bs{t.batch_size}-ep{t.epochs}-seed{config.seed}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def use_experiment(name: str) -> str:
    """Make `name` the active experiment, creating it if needed; return its id.

    Two runs starting at once in a new experiment both try to create it and the server refuses
    the second; that run must join the experiment the first one made, not fail or go elsewhere.
    """
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A local store keeps artifacts in ./mlruns of whoever creates the experiment; anchor it
        # to the project so a queued DVC experiment (run in a temporary copy) does not own it.
        local = mlflow.get_tracking_uri().startswith("sqlite:")
        location = (project_root() / "mlruns").as_uri() if local else None
        try:
            experiment_id = client.create_experiment(name, artifact_location=location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
            experiment_id = experiment.experiment_id
    else:
        experiment_id = experiment.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


@contextmanager
def training_run(
    config: Config, data_hash: str, run_id: str | None = None, nested: bool = False
) -> Iterator[mlflow.ActiveRun]:
    """Start (or, on resume, reopen) the run and record params and lineage tags."""
    use_experiment(config.tracking.experiment)
    # System metrics (CPU, memory, GPU when present) are sampled in the background for the whole run.
    with mlflow.start_run(
        run_id=run_id, run_name=None if run_id else run_name(config), nested=nested, log_system_metrics=True
    ) as run:
        if run_id is None:
            mlflow.log_params(params_for_mlflow(config))
            mlflow.set_tags(
                {
                    "mlflow.source.git.commit": git_commit(),
                    "git_commit": git_commit(),
                    "data_hash": data_hash,
                    "config_hash": config.digest(),
                    "eventcoder_version": eventcoder.__version__,
                }
            )
        yield run


def log_dataset(path: Path, name: str, target: str, context: str) -> None:
    """Record a prepared split as an MLflow dataset (digest, source, schema) for lineage in the UI."""
    frame = pd.read_json(path, lines=True)
    dataset = mlflow.data.from_pandas(
        frame, source=str(path.resolve()), name=name, targets=target if target in frame.columns else None
    )
    # Two runs logging the same dataset at once can both try to insert it; the server rejects the
    # second insert. A retry then finds the stored dataset and links it. Lineage is worth one
    # retry, never the training run itself.
    for attempt in range(2):
        try:
            mlflow.log_input(dataset, context=context)
            return
        except MlflowException as exc:
            if attempt == 1:
                log.warning("could not log dataset %s to MLflow (%s); training goes on", name, exc)
            else:
                time.sleep(1.0)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    mlflow.log_metrics(dict(metrics), step=step)


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in PYFUNC_REQUIREMENTS_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            continue
    return pins


def log_pyfunc_model(model_dir: Path, example_texts: list[str]) -> str:
    """Log the model directory as a pyfunc model; return its model URI."""
    from eventcoder.inference import Predictor

    example = pd.DataFrame({"text": example_texts[:3]})
    output = pd.DataFrame(Predictor.load(model_dir).predict(example["text"].tolist()))
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(eventcoder.__file__).parent / "pyfunc_model.py"),
        artifacts={"model_dir": str(model_dir)},
        code_paths=[str(Path(eventcoder.__file__).parent)],
        signature=infer_signature(example, output, params={"all_scores": False}),
        input_example=example,
        pip_requirements=pip_requirements(),
    )
    return info.model_uri
