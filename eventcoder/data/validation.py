"""Turn raw records into labelled examples, or into rejects with a reason.

Nothing is dropped silently: every row read ends up either kept or in the rejects list.
"""

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eventcoder.config import DataConfig
from eventcoder.errors import DataError
from eventcoder.schema import LabelSchema, Task
from eventcoder.tables import BadRow, is_missing, iter_records

SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
}


@dataclass
class Reject:
    file: str
    row: int
    reason: str
    text: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "row": self.row, "reason": self.reason, "text": self.text[:300]}


@dataclass
class ReadResult:
    examples: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    rows_read: int = 0


def normalise_for_duplicates(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


class ExampleBuilder:
    """Validates records against the config's column mapping and the label schema."""

    def __init__(self, config: DataConfig, schema: LabelSchema) -> None:
        self.config = config
        self.schema = schema
        self.columns = {task.name: config.label_columns.get(task.name, task.name) for task in schema.tasks}
        unknown = sorted(set(config.label_columns) - set(schema.task_names))
        if unknown:
            raise DataError(f"data.label_columns: {unknown} are not tasks of schema {schema.name!r}")
        unknown = sorted(set(config.label_map) - set(schema.task_names))
        if unknown:
            raise DataError(f"data.label_map: {unknown} are not tasks of schema {schema.name!r}")
        self.seen_texts: dict[str, str] = {}

    def read_files(self, patterns: Iterable[str], result: ReadResult, role: str) -> None:
        for path in expand_patterns(patterns):
            self._read_file(path, result, role)

    def _read_file(self, path: Path, result: ReadResult, role: str) -> None:
        checked_columns = False
        for row, record in iter_records(path, self.config.text_column):
            result.rows_read += 1
            if isinstance(record, BadRow):
                result.rejects.append(Reject(str(path), row, record.reason, record.raw))
                continue
            if not checked_columns:
                self._check_columns(path, record)
                checked_columns = True
            example = self._build(record)
            if isinstance(example, str):
                text = record.get(self.config.text_column)
                result.rejects.append(Reject(str(path), row, example, text if isinstance(text, str) else ""))
                continue
            key = normalise_for_duplicates(example["text"])
            first = self.seen_texts.get(key)
            if first is not None and self.config.drop_duplicate_texts:
                result.rejects.append(
                    Reject(str(path), row, f"duplicate text (first seen at {first})", example["text"])
                )
                continue
            self.seen_texts.setdefault(key, f"{path}:{row}")
            example["source"] = f"{path}:{row}"
            if role == "test":
                example["split"] = "test"
            result.examples.append(example)

    def _check_columns(self, path: Path, record: dict[str, Any]) -> None:
        """A column absent from the first row is absent from the file: fail once, not per row."""
        needed = [self.config.text_column]
        for column in self.columns.values():
            needed.extend(column.values() if isinstance(column, dict) else [column])
        if self.config.split_column:
            needed.append(self.config.split_column)
        missing = [name for name in needed if name not in record]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {sorted(record)}")

    def _build(self, record: dict[str, Any]) -> dict[str, Any] | str:
        text = record.get(self.config.text_column)
        if is_missing(text):
            return f"missing text in column {self.config.text_column!r}"
        if not isinstance(text, str):
            return f"text in column {self.config.text_column!r} is {type(text).__name__}, not a string"
        if not text.strip():
            return "empty or whitespace-only text"
        example: dict[str, Any] = {"text": text.strip()}
        doc_column = self.config.doc_id_column
        if doc_column and not is_missing(record.get(doc_column)):
            example["doc_id"] = str(record[doc_column])
        for task in self.schema.tasks:
            label = self._label(task, record)
            if isinstance(label, Reject):
                return label.reason
            example[task.name] = label
        if self.config.split_column:
            value = str(record.get(self.config.split_column, "")).strip().lower()
            if value not in SPLIT_NAMES:
                return f"split column {self.config.split_column!r} has {value!r}; expected train/validation/test"
            example["split"] = SPLIT_NAMES[value]
        return example

    def _label(self, task: Task, record: dict[str, Any]) -> str | list[str] | Reject:
        column = self.columns[task.name]
        mapping = self.config.label_map.get(task.name, {})
        if isinstance(column, dict):
            if task.kind != "multi_label":
                return Reject("", 0, f"task {task.name!r}: per-label 0/1 columns need a multi_label task")
            labels = []
            for label, source in column.items():
                flag = record.get(source)
                if is_missing(flag) or str(flag).strip() not in {"0", "1", "True", "False", "true", "false"}:
                    return Reject("", 0, f"column {source!r} must be 0 or 1, got {flag!r}")
                if str(flag).strip() in {"1", "True", "true"}:
                    labels.append(label)
            values: list[Any] = labels
        else:
            value = record.get(column)
            if is_missing(value) or (isinstance(value, str) and not value.strip()):
                return Reject("", 0, f"missing label in column {column!r}")
            values = _as_list(value) if task.kind == "multi_label" else [value]
        resolved = []
        for value in values:
            label = mapping.get(str(value).strip(), str(value).strip())
            if label not in task.labels:
                return Reject("", 0, f"unknown label {value!r} in column {column!r} for task {task.name!r}")
            resolved.append(label)
        return resolved if task.kind == "multi_label" else resolved[0]


def _as_list(value: Any) -> list[Any]:
    """Multi-label cells: a real list, a JSON list in a string, or `a|b|c`."""
    if isinstance(value, list | tuple):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    text = str(value).strip()
    if text.startswith("["):
        try:
            return list(json.loads(text))
        except json.JSONDecodeError:
            pass
    return [part for part in text.split("|") if part.strip()]


def expand_patterns(patterns: Iterable[str]) -> list[Path]:
    """Expand glob patterns in a stable order; a pattern matching nothing is an error."""
    paths: list[Path] = []
    for pattern in patterns:
        if any(char in pattern for char in "*?["):
            matches = (
                sorted(Path().glob(pattern))
                if not Path(pattern).is_absolute()
                else sorted(Path("/").glob(pattern.lstrip("/")))
            )
            if not matches:
                raise DataError(f"{pattern}: no file matches this pattern")
            paths.extend(matches)
        else:
            if not Path(pattern).exists():
                raise DataError(f"{pattern}: file not found")
            paths.append(Path(pattern))
    return paths
