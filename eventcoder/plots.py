"""Pictures of a model's quality: confusion matrices and per-class F1, as PNG for people."""

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # batch jobs and CI have no display
import matplotlib.pyplot as plt
import numpy as np


def confusion_png(matrix: list[list[int]], labels: list[str], title: str, path: Path) -> Path:
    counts = np.array(matrix, dtype=float)
    # Row-normalised, so rare classes are as readable as common ones; raw counts are printed.
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(6.0, 0.42 * len(labels) + 3)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=70, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if counts[i, j]:
                ax.text(
                    j,
                    i,
                    int(counts[i, j]),
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_class_f1_png(per_class: dict[str, dict[str, Any]], title: str, path: Path) -> Path:
    labels = [label for label, values in per_class.items() if values["support"] > 0]
    scores = [per_class[label]["f1"] for label in labels]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * len(labels) + 1)))
    ax.barh(range(len(labels)), scores, color="#4472c4")
    ax.set_yticks(range(len(labels)), [f"{label} (n={per_class[label]['support']})" for label in labels], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reliability_png(confidence: np.ndarray, correct: np.ndarray, title: str, path: Path, bins: int = 10) -> Path:
    """Calibration: accuracy within each confidence bin against the bin's mean confidence."""
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    centers, accuracy, counts = [], [], []
    for b in range(bins):
        mask = index == b
        if mask.any():
            centers.append(confidence[mask].mean())
            accuracy.append(correct[mask].mean())
            counts.append(int(mask.sum()))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(centers, accuracy, marker="o", color="#c0504d", label="model")
    for x, y, n in zip(centers, accuracy, counts, strict=True):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top score)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_curves_png(history: list[dict[str, float]], path: Path) -> Path:
    """Per-epoch validation macro-F1 of every task, and the training loss."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key in sorted(k for k in history[0] if k.startswith("validation/") and k.endswith("/macro_f1")):
        left.plot(epochs, [h[key] for h in history], marker="o", label=key.split("/")[1])
    left.set_xlabel("epoch")
    left.set_ylabel("validation macro-F1")
    left.legend(fontsize=8)
    right.plot(epochs, [h["train/loss"] for h in history], marker="o", color="#4472c4")
    right.set_xlabel("epoch")
    right.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
