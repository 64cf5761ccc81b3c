"""A short model card (markdown): what the model codes, what it was trained on, how well it does."""

from typing import Any

from eventcoder.config import Config
from eventcoder.schema import LabelSchema


def render_model_card(
    config: Config,
    schema: LabelSchema,
    data_report: dict[str, Any],
    test: dict[str, Any],
    validation: dict[str, Any],
    run_id: str | None,
) -> str:
    tasks = [*schema.task_names, *(d.name for d in schema.derived)]
    split = config.evaluate.split
    nan = float("nan")
    rows = "\n".join(
        f"| {task} | {test.get(f'{task}/macro_f1', nan):.3f} | {test.get(f'{task}/accuracy', nan):.3f} "
        f"| {validation.get(f'{task}/macro_f1', nan):.3f} |"
        for task in tasks
    )
    counts = data_report["split_rows"]
    return f"""# eventcoder model card

**Codes** English news sentences about armed conflict with the `{schema.name}` schema: {
        ", ".join(f"`{t.name}` ({t.num_labels} labels)" for t in schema.tasks)
    }{"".join(f"; `{d.name}` derived from `{d.source}`" for d in schema.derived)}.

**Encoder** `{config.model.encoder}` (max {config.model.max_length} tokens, {config.model.pooling} pooling),
fine-tuned with one linear head per task. MLflow run `{run_id or "n/a"}`, config hash `{config.digest()}`.

## Data

Training files {config.data.train_files}; test files {config.data.test_files or "carved from training files"}.
Rows: train {counts["train"]}, validation {counts["validation"]}, test {counts["test"]};
{data_report["rows_rejected"]} rows rejected at preparation (reasons in the rejects file).
Data hash `{data_report["data_hash"]}`.

## Quality

| task | {split} macro-F1 | {split} accuracy | validation macro-F1 |
|---|---|---|---|
{rows}

## Intended use

Coding sentences from news reports for event datasets, with a human reviewing low-score
predictions. Scores are softmax probabilities; see the reliability diagrams for how far they can
be trusted. Not for: decisions about individuals, or text far from news reporting on conflict.

## Limitations

Trained on a corpus written for the project (see `data/DATASHEET.md`): rare event types are
over-represented relative to real news, and quality on real wire text is lower than on the
held-out file. One label per sentence: a sentence reporting two events gets one code.
"""
