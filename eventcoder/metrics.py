"""Classification metrics per task, computed from label ids with the schema's fixed label lists."""

from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from eventcoder.schema import DerivedTask, LabelSchema, Task


def single_label_metrics(gold: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, macro/micro/weighted F1, per-class P/R/F1/support and the confusion matrix.

    Macro-F1 averages over the classes present in gold or predictions (scikit-learn's rule): a
    class absent from both says nothing about the model and would otherwise count as 0.
    """
    all_ids = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, labels=all_ids, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, average="weighted", zero_division=0)),
        "support": len(gold),
        "per_class": {
            labels[i]: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in all_ids
        },
        "confusion_matrix": {"labels": list(labels), "matrix": confusion_matrix(gold, pred, labels=all_ids).tolist()},
    }


def multi_label_metrics(gold: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Subset accuracy, macro/micro/weighted F1 and per-label P/R/F1 for 0/1 indicator matrices."""
    precision, recall, f1, support = precision_recall_fscore_support(gold, pred, zero_division=0)
    return {
        "accuracy": float(accuracy_score(gold, pred)),
        "macro_f1": float(f1_score(gold, pred, average="macro", zero_division=0)),
        "micro_f1": float(f1_score(gold, pred, average="micro", zero_division=0)),
        "weighted_f1": float(f1_score(gold, pred, average="weighted", zero_division=0)),
        "support": len(gold),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def task_metrics(task: Task, gold: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    if task.kind == "multi_label":
        return multi_label_metrics(gold, pred, task.labels)
    return single_label_metrics(gold, pred, task.labels)


def derived_ids(derived: DerivedTask, source: Task, ids: np.ndarray) -> np.ndarray:
    """Map source-task label ids to the derived task's label ids."""
    parent_labels = derived.labels
    lookup = np.array([parent_labels.index(derived.mapping[label]) for label in source.labels])
    return lookup[ids]


def all_metrics(schema: LabelSchema, gold: dict[str, np.ndarray], pred: dict[str, np.ndarray]) -> dict[str, Any]:
    """Metrics for every task and every derived task (derived from the predicted child label)."""
    results = {task.name: task_metrics(task, gold[task.name], pred[task.name]) for task in schema.tasks}
    for derived in schema.derived:
        source = schema.task(derived.source)
        results[derived.name] = single_label_metrics(
            derived_ids(derived, source, gold[source.name]),
            derived_ids(derived, source, pred[source.name]),
            derived.labels,
        )
    return results


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat `{task}/{metric}` scalars, for logs, MLflow and `dvc metrics`."""
    flat = {}
    for task, values in metrics.items():
        for name in ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "ece"):
            if name in values:
                flat[f"{task}/{name}"] = round(values[name], 6)
    return flat


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Mean gap between confidence and accuracy, weighted by how many predictions fall in each bin."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            error += mask.mean() * abs(confidence[mask].mean() - correct[mask].mean())
    return float(error)
