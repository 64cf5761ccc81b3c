"""The `evaluate` stage: score a model directory on a prepared split and write reports.

Reports are what `dvc metrics` and `dvc plots` read:
    reports/metrics.json                   headline `{task}/{metric}` scalars (dvc metrics)
    reports/per_class.json                 every task's per-class P/R/F1 and confusion matrix
    reports/plots/confusion_{task}.json    actual/predicted pairs (dvc plots confusion template)
    reports/figures/*.png                  confusion matrices, per-class F1 bars, reliability diagrams
    reports/misclassified.jsonl            the model's errors on the main task, for reading
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eventcoder.batching import label_arrays
from eventcoder.config import Config
from eventcoder.inference import Predictor, decide, int8_activation_bits
from eventcoder.metrics import all_metrics, expected_calibration_error, headline
from eventcoder.plots import confusion_png, per_class_f1_png, reliability_png
from eventcoder.schema import LabelSchema
from eventcoder.tables import write_jsonl
from eventcoder.training import load_split, main_metric_key


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    headline: dict[str, float]
    main_metric: str
    rows: list[dict[str, Any]]
    predictions: list[dict[str, Any]]

    @property
    def main_value(self) -> float:
        return self.headline[self.main_metric]


def evaluate_rows(predictor: Predictor, rows: list[dict[str, Any]], config: Config) -> Evaluation:
    schema = predictor.schema
    probs = predictor.probabilities([r["text"] for r in rows])
    predicted = decide(schema, probs)
    gold = label_arrays(rows, schema)
    metrics = all_metrics(schema, gold, predicted)
    for task in schema.tasks:
        if task.kind == "single_label":
            confidence = probs[task.name].max(axis=1)
            metrics[task.name]["ece"] = expected_calibration_error(confidence, predicted[task.name] == gold[task.name])
    return Evaluation(metrics, headline(metrics), main_metric_key(config, schema), rows, predictor.label_rows(probs))


def evaluate_split(predictor: Predictor, config: Config) -> Evaluation:
    return evaluate_rows(predictor, load_split(config, config.evaluate.split), config)


def write_reports(evaluation: Evaluation, schema: LabelSchema, config: Config) -> Path:
    reports = Path(config.evaluate.reports_dir)
    plots, figures = reports / "plots", reports / "figures"
    plots.mkdir(parents=True, exist_ok=True)
    figures.mkdir(parents=True, exist_ok=True)
    with (reports / "metrics.json").open("w", encoding="utf-8") as handle:
        json.dump(
            {"split": config.evaluate.split, "rows": len(evaluation.rows), **evaluation.headline}, handle, indent=2
        )
    with (reports / "per_class.json").open("w", encoding="utf-8") as handle:
        json.dump(evaluation.metrics, handle, indent=2, ensure_ascii=False)

    for task in [t.name for t in schema.tasks if t.kind == "single_label"] + [d.name for d in schema.derived]:
        pairs = [
            {"actual": _gold(row, task, schema), "predicted": pred[task]}
            for row, pred in zip(evaluation.rows, evaluation.predictions, strict=True)
        ]
        with (plots / f"confusion_{task}.json").open("w", encoding="utf-8") as handle:
            json.dump(pairs, handle, ensure_ascii=False)
        task_metrics = evaluation.metrics[task]
        matrix = task_metrics["confusion_matrix"]
        confusion_png(
            matrix["matrix"], matrix["labels"], f"{task} ({config.evaluate.split})", figures / f"confusion_{task}.png"
        )
        per_class_f1_png(task_metrics["per_class"], f"{task}: per-class F1", figures / f"f1_{task}.png")
        if task in schema.task_names:
            confidence = np.array([pred[f"{task}_score"] for pred in evaluation.predictions])
            correct = np.array(
                [pred[task] == row[task] for row, pred in zip(evaluation.rows, evaluation.predictions, strict=True)],
                dtype=float,
            )
            reliability_png(
                confidence,
                correct,
                f"{task}: reliability (ECE {task_metrics['ece']:.3f})",
                figures / f"reliability_{task}.png",
            )

    write_jsonl(
        reports / "misclassified.jsonl", misclassified(evaluation, schema, config.evaluate.misclassified_examples)
    )
    return reports


def _gold(row: dict[str, Any], task: str, schema: LabelSchema) -> str:
    for derived in schema.derived:
        if derived.name == task:
            return derived.mapping[row[derived.source]]
    return row[task]


def misclassified(evaluation: Evaluation, schema: LabelSchema, limit: int) -> list[dict[str, Any]]:
    """Errors on the main task, most confident first: the ones most worth reading."""
    task = schema.main_task
    errors = [
        {
            "text": row["text"],
            "doc_id": row.get("doc_id"),
            "gold": row[task],
            "predicted": pred[task],
            "score": pred[f"{task}_score"],
        }
        for row, pred in zip(evaluation.rows, evaluation.predictions, strict=True)
        if pred[task] != row[task]
    ]
    errors.sort(key=lambda e: -e["score"])
    return errors[:limit]


# An int8 model is only offered (`predict --int8`) when it loses at most half a point of the main
# metric against the same model in fp32.
INT8_MAX_DROP = 0.005


def int8_check(model_dir: Path, rows: list[dict[str, Any]], config: Config) -> dict[str, Any]:
    full = evaluate_rows(Predictor.load(model_dir, precision="fp32"), rows, config)
    int8 = evaluate_rows(Predictor.load(model_dir, quantize=True), rows, config)
    delta = int8.main_value - full.main_value
    return {
        "metric": full.main_metric,
        "split": "validation",
        "fp32": full.main_value,
        "int8": int8.main_value,
        "delta": delta,
        "max_drop": INT8_MAX_DROP,
        "passed": delta >= -INT8_MAX_DROP,
        "activation_bits": int8_activation_bits(),
    }
