"""Deterministic, stratified, article-grouped splits.

All sentences of one article land in the same split (an article seen in training would leak its
context into evaluation). Groups are stratified by the rarest main-task label they contain, so a
rare class still reaches the validation split.
"""

import random
from collections import Counter, defaultdict
from typing import Any


def group_key(example: dict[str, Any]) -> str:
    # A sentence without an article id is its own group.
    return example.get("doc_id") or f"row:{example['source']}"


def assign_splits(
    examples: list[dict[str, Any]],
    main_task: str,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> None:
    """Set example["split"] in place for examples that do not have one yet."""
    pending = [ex for ex in examples if "split" not in ex]
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for example in pending:
        groups[group_key(example)].append(example)

    label_counts: Counter[str] = Counter()
    for example in pending:
        label_counts.update(_labels_of(example, main_task))

    strata: dict[str, list[str]] = defaultdict(list)
    for key in sorted(groups):
        labels = {label for ex in groups[key] for label in _labels_of(ex, main_task)}
        rarest = min(labels, key=lambda label: (label_counts[label], label)) if labels else ""
        strata[rarest].append(key)

    rng = random.Random(seed)
    ordered = []
    for stratum in sorted(strata):
        keys = strata[stratum]
        rng.shuffle(keys)
        ordered.extend(keys)
    # Every k-th article of the stratum-ordered list: each stratum gets its share, and small strata
    # are not all rounded down to nothing, so the overall fractions come out exact.
    validation = set(_every_kth(ordered, validation_fraction))
    rest = [key for key in ordered if key not in validation]
    test = set(_every_kth(rest, test_fraction / (1 - validation_fraction)))
    for key in ordered:
        split = "validation" if key in validation else "test" if key in test else "train"
        for example in groups[key]:
            example["split"] = split


def _every_kth(keys: list[str], fraction: float) -> list[str]:
    return [key for i, key in enumerate(keys) if round((i + 1) * fraction) > round(i * fraction)]


def _labels_of(example: dict[str, Any], task: str) -> list[str]:
    value = example[task]
    return list(value) if isinstance(value, list) else [value]


def check_no_group_leakage(examples: list[dict[str, Any]]) -> None:
    """Raise if an article appears in two splits (a `split` column can do that)."""
    seen: dict[str, str] = {}
    for example in examples:
        key = group_key(example)
        if seen.setdefault(key, example["split"]) != example["split"]:
            raise ValueError(f"article {key!r} appears in both {seen[key]!r} and {example['split']!r} splits")
