"""Shared fixtures: a tiny random BERT (no downloads) and small labelled data written per test."""

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from eventcoder.config import Config, load_config
from eventcoder.encoder import resolve_encoder
from eventcoder.modeling import MultiTaskModel
from eventcoder.schema import LabelSchema, load_schema

REPO = Path(__file__).resolve().parents[1]
ACLED_SCHEMA = REPO / "configs" / "schemas" / "acled.yaml"


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with random weights and the default encoder's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder("default"))
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(path)
    return path


def tiny_model(tiny_encoder: Path, schema: LabelSchema, pooling: str = "mean") -> MultiTaskModel:
    """The tiny encoder with fresh heads, seeded so two calls give the same weights; no dropout."""
    torch.manual_seed(0)
    return MultiTaskModel.from_encoder(str(tiny_encoder), schema, pooling, 0.0)


@pytest.fixture(scope="session")
def acled_schema() -> LabelSchema:
    return load_schema(ACLED_SCHEMA)


def corpus_rows(limit_docs: int | None = None) -> list[dict[str, Any]]:
    """Rows of the bundled corpus (training part), whole articles only."""
    rows = []
    for path in sorted((REPO / "data" / "raw" / "train").glob("*.jsonl")):
        with path.open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    if limit_docs is None:
        return rows
    keep = list(dict.fromkeys(row["doc_id"] for row in rows))[:limit_docs]
    keep_set = set(keep)
    return [row for row in rows if row["doc_id"] in keep_set]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_config(
    directory: Path,
    encoder: Path | str,
    overrides: dict[str, Any] | None = None,
    train_files: list[str] | None = None,
    test_files: list[str] | None = None,
) -> Path:
    """A small run config in `directory`: tiny model, few steps, store and outputs inside it."""
    config: dict[str, Any] = {
        "seed": 3,
        "schema": str(ACLED_SCHEMA),
        "data": {
            "train_files": train_files or [str(directory / "raw" / "train.jsonl")],
            "test_files": test_files if test_files is not None else [str(directory / "raw" / "test.jsonl")],
            "validation_fraction": 0.2,
            "prepared_dir": str(directory / "prepared"),
        },
        "model": {"encoder": str(encoder), "max_length": 48},
        "train": {
            "output_dir": str(directory / "model"),
            "checkpoint_dir": str(directory / "checkpoints"),
            "epochs": 2,
            "batch_size": 16,
            "learning_rate": 1e-3,
            "progress": False,
            "early_stopping_patience": 5,
        },
        "evaluate": {"reports_dir": str(directory / "reports")},
        "tracking": {"tracking_uri": f"sqlite:///{directory / 'mlflow.db'}", "experiment": "test"},
    }
    for key, value in (overrides or {}).items():
        section, name = key.split(".")
        config[section][name] = value
    path = directory / "config.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture
def small_run(tmp_path: Path, tiny_encoder: Path) -> Config:
    """Raw train/test files from the bundled corpus and a config for a short tiny-model run."""
    rows = corpus_rows(limit_docs=40)
    docs = list(dict.fromkeys(row["doc_id"] for row in rows))
    test_docs = set(docs[::5])
    write_jsonl(tmp_path / "raw" / "train.jsonl", [r for r in rows if r["doc_id"] not in test_docs])
    write_jsonl(tmp_path / "raw" / "test.jsonl", [r for r in rows if r["doc_id"] in test_docs])
    return load_config([write_config(tmp_path, tiny_encoder)])


@pytest.fixture(scope="session")
def registered_tiny_model(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path) -> dict[str, Any]:
    """A tiny model trained, evaluated and registered as eventcoder@champion in a SQLite store.

    Returns {"dir": run folder, "tracking_uri": ..., "config": config path, "model_dir": ...}.
    """
    from eventcoder.pipeline import run_evaluate, run_prepare, run_train

    directory = tmp_path_factory.mktemp("registered")
    rows = corpus_rows(limit_docs=30)
    docs = list(dict.fromkeys(row["doc_id"] for row in rows))
    write_jsonl(directory / "raw" / "train.jsonl", [r for r in rows if r["doc_id"] not in docs[::5]])
    write_jsonl(directory / "raw" / "test.jsonl", [r for r in rows if r["doc_id"] in docs[::5]])
    config_path = write_config(directory, tiny_encoder)
    config = load_config([config_path])
    # MLflow puts a SQLite store's artifacts under ./mlruns: run from the fixture's folder.
    previous = Path.cwd()
    os.chdir(directory)
    try:
        run_prepare(config)
        run_train(config)
        run_evaluate(config)
    finally:
        os.chdir(previous)
    return {
        "dir": directory,
        "tracking_uri": config.tracking.tracking_uri,
        "config": config_path,
        "model_dir": Path(config.train.output_dir),
    }
