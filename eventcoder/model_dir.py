"""The self-describing model directory written by training and read by everything else.

model_dir/
  encoder/            the fine-tuned encoder (config.json + model.safetensors)
  tokenizer/          its tokenizer
  heads.safetensors   one linear head per task
  schema.yaml         the label schema (ids are list positions)
  labels.json         every task's id -> label table, spelled out
  config.yaml         the resolved run config
  metrics.json        validation metrics of the kept checkpoint
  eventcoder.json     format version, pooling, max length, package version
"""

import json
from pathlib import Path
from typing import Any

import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerBase

import eventcoder
from eventcoder.errors import ConfigError
from eventcoder.modeling import MultiTaskModel
from eventcoder.schema import LabelSchema, load_schema
from eventcoder.yaml_io import dump_yaml

FORMAT_VERSION = 1


def save_model_dir(
    path: str | Path,
    model: MultiTaskModel,
    tokenizer: PreTrainedTokenizerBase,
    config: dict[str, Any],
    metrics: dict[str, Any],
    max_length: int,
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(path / "encoder", safe_serialization=True)
    tokenizer.save_pretrained(path / "tokenizer")
    heads = {k: v.detach().cpu().contiguous() for k, v in model.heads.state_dict().items()}
    save_file(heads, str(path / "heads.safetensors"))
    dump_yaml(model.schema.to_dict(), path / "schema.yaml")
    labels = {task.name: dict(enumerate(task.labels)) for task in model.schema.tasks}
    _write_json(path / "labels.json", labels)
    dump_yaml(config, path / "config.yaml")
    _write_json(path / "metrics.json", metrics)
    _write_json(
        path / "eventcoder.json",
        {
            "format_version": FORMAT_VERSION,
            "eventcoder_version": eventcoder.__version__,
            "pooling": model.pooling,
            "max_length": max_length,
            "tasks": model.schema.task_names,
        },
    )
    return path


def _write_json(path: Path, data: Any) -> None:
    with path.open("w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)


def read_metadata(path: str | Path) -> dict[str, Any]:
    meta_path = Path(path) / "eventcoder.json"
    if not meta_path.is_file():
        raise ConfigError(f"{path}: not an eventcoder model directory (no eventcoder.json)")
    with meta_path.open(encoding="utf-8") as handle:
        meta = json.load(handle)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{meta_path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def load_model_dir(path: str | Path) -> tuple[MultiTaskModel, PreTrainedTokenizerBase, LabelSchema, dict[str, Any]]:
    path = Path(path)
    meta = read_metadata(path)
    schema = load_schema(path / "schema.yaml")
    # The encoder's pooler is dropped on purpose (the heads read mean-pooled tokens), so the
    # "missing pooler weights" report transformers prints on load is noise.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        encoder = AutoModel.from_pretrained(path / "encoder")
    finally:
        transformers.logging.set_verbosity(verbosity)
    model = MultiTaskModel(encoder, schema, pooling=meta["pooling"], dropout=0.0)
    model.heads.load_state_dict(load_file(str(path / "heads.safetensors")))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    return model, tokenizer, schema, meta


def update_metadata(path: str | Path, values: dict[str, Any]) -> None:
    """Add facts learned after saving (such as the int8 quality check) to eventcoder.json."""
    meta = read_metadata(path)
    meta.update(values)
    _write_json(Path(path) / "eventcoder.json", meta)
