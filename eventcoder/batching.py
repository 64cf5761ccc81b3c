"""Tokenised features, dynamically padded batches and length-bucketed batch order."""

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from eventcoder.schema import LabelSchema


def tokenize(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[int]]:
    """Token ids without padding; padding happens per batch, to the batch's own longest row."""
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_length, return_attention_mask=False, return_token_type_ids=False
    )
    return encoded["input_ids"]


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int, width_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad to the longest row, rounded up to `width_multiple` (few distinct shapes; see inference)."""
    width = -(-max(len(row) for row in ids) // width_multiple) * width_multiple
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def label_arrays(examples: Sequence[dict[str, Any]], schema: LabelSchema) -> dict[str, np.ndarray]:
    """Gold labels as ids (single-label) or 0/1 indicator rows (multi-label)."""
    arrays = {}
    for task in schema.tasks:
        if task.kind == "multi_label":
            matrix = np.zeros((len(examples), task.num_labels), dtype=np.float32)
            for i, example in enumerate(examples):
                for label in example[task.name]:
                    matrix[i, task.label_id(label)] = 1.0
            arrays[task.name] = matrix
        else:
            arrays[task.name] = np.array([task.label_id(ex[task.name]) for ex in examples], dtype=np.int64)
    return arrays


def training_batches(
    lengths: Sequence[int], batch_size: int, rng: random.Random, bucket: bool, bucket_batches: int = 50
) -> list[list[int]]:
    """Shuffled batches of indices. With `bucket`, rows of similar length share a batch.

    Sorting within chunks of `bucket_batches` batches (not globally) keeps enough randomness for
    SGD while cutting most of the padding.
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucket:
        chunk = batch_size * bucket_batches
        order = [
            i
            for start in range(0, len(order), chunk)
            for i in sorted(order[start : start + chunk], key=lambda j: lengths[j])
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def inference_batches(lengths: Sequence[int], batch_size: int, row_multiple: int = 1) -> Iterator[list[int]]:
    """Batches of indices sorted by length: inference needs no randomness, only little padding.

    A short last batch is filled up to a multiple of `row_multiple` by repeating its last index
    (that row is simply coded twice), so a long job sees only a few batch shapes."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        filler = -len(batch) % row_multiple
        yield batch + batch[-1:] * filler
