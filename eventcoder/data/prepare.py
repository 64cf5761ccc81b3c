"""The `prepare` stage: read raw files, validate rows, split by article, write prepared JSONL."""

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from eventcoder.config import Config
from eventcoder.data.split import assign_splits, check_no_group_leakage
from eventcoder.data.validation import ExampleBuilder, ReadResult, expand_patterns
from eventcoder.errors import DataError
from eventcoder.schema import LabelSchema
from eventcoder.tables import write_jsonl

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


def prepare(config: Config, schema: LabelSchema) -> dict[str, Any]:
    """Write `{prepared_dir}/{split}.jsonl`, `rejects.jsonl` and `report.json`; return the report."""
    data = config.data
    builder = ExampleBuilder(data, schema)
    result = ReadResult()
    # Test files first: a training sentence that repeats a test sentence is rejected as a
    # duplicate, which keeps the test split free of leaked text.
    builder.read_files(data.test_files, result, role="test")
    builder.read_files(data.train_files, result, role="train")
    if not result.examples:
        raise DataError(f"{data.train_files}: no usable rows ({len(result.rejects)} rejected; see the rejects file)")

    test_fraction = 0.0 if data.test_files else data.test_fraction
    assign_splits(result.examples, schema.main_task, data.validation_fraction, test_fraction, config.seed)
    try:
        check_no_group_leakage(result.examples)
    except ValueError as exc:
        raise DataError(f"{data.split_column or 'split'}: {exc}") from None

    out_dir = Path(data.prepared_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = ["text", "doc_id", *schema.task_names, "source"]
    counts = {}
    for split in SPLITS:
        rows = [{k: ex[k] for k in columns if k in ex} for ex in result.examples if ex["split"] == split]
        write_jsonl(out_dir / f"{split}.jsonl", rows)
        counts[split] = len(rows)
    write_jsonl(out_dir / "rejects.jsonl", [reject.to_dict() for reject in result.rejects])

    report = {
        "rows_read": result.rows_read,
        "rows_kept": len(result.examples),
        "rows_rejected": len(result.rejects),
        "split_rows": counts,
        "reject_reasons": dict(Counter(_reason_kind(r.reason) for r in result.rejects).most_common()),
        "data_hash": data_hash(expand_patterns([*data.train_files, *data.test_files])),
        "label_counts": {
            task.name: dict(Counter(_label_key(ex[task.name]) for ex in result.examples).most_common())
            for task in schema.tasks
        },
    }
    # The invariant users rely on: every row read is either kept or rejected with a reason.
    assert report["rows_read"] == report["rows_kept"] + report["rows_rejected"]
    with (out_dir / "report.json").open("w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, ensure_ascii=False)
    log.info(
        "prepare: read %d rows, kept %d (train %d, validation %d, test %d), rejected %d -> %s",
        report["rows_read"],
        report["rows_kept"],
        counts["train"],
        counts["validation"],
        counts["test"],
        report["rows_rejected"],
        out_dir / "rejects.jsonl",
    )
    return report


def _reason_kind(reason: str) -> str:
    return reason.split(" (")[0].split(" in column")[0].split(":")[0]


def _label_key(value: str | list[str]) -> str:
    return "|".join(value) if isinstance(value, list) else value


def data_hash(paths: list[Path]) -> str:
    """Content hash of the input files, to tag runs with the exact data they saw."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
