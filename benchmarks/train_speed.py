"""Training speed: `eventcoder train` against a plain `transformers.Trainer`, side by side.

Both paths train the same encoder on the same prepared split for the same epochs, batch size and
max length, each in its own process. The baseline is what a hand-rolled script does: fp32,
default TrainingArguments, one classification head (sub_event_type). Ours is the eventcoder loop
with all three heads. Quality is the validation macro-F1 of sub_event_type after the last epoch.

    python benchmarks/train_speed.py                 # full comparison (about 6 min on 2 idle cores)
    python benchmarks/train_speed.py --ablation      # ours, one more optimisation per row (short runs)

The last line reads `ratio=<ours/baseline samples per second> f1_delta=<ours - baseline>`.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from _harness import REPO, print_table, run_isolated, save_json


def _rows(prepared: Path, split: str, limit: int | None) -> list[dict[str, Any]]:
    with (prepared / f"{split}.jsonl").open(encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return rows[:limit] if limit else rows


def baseline(
    prepared: str, encoder: str, epochs: int, batch_size: int, max_length: int, seed: int, limit: int | None
) -> dict[str, Any]:
    import datasets
    import numpy as np
    from sklearn.metrics import f1_score
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from eventcoder.schema import load_schema

    labels = load_schema(REPO / "configs" / "schemas" / "acled.yaml").task("sub_event_type").labels
    tokenizer = AutoTokenizer.from_pretrained(encoder)

    def dataset(split: str, rows_limit: int | None) -> datasets.Dataset:
        rows = _rows(Path(prepared), split, rows_limit)
        data = datasets.Dataset.from_dict(
            {"text": [r["text"] for r in rows], "label": [labels.index(r["sub_event_type"]) for r in rows]}
        )
        return data.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )

    train_set, validation_set = dataset("train", limit), dataset("validation", None)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=len(labels))
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch_size,
            num_train_epochs=epochs,
            seed=seed,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer)
        )
        stats = trainer.train().metrics
        predictions = trainer.predict(validation_set).predictions.argmax(axis=1)
    f1 = f1_score(np.array(validation_set["label"]), predictions, average="macro")
    return {"path": "baseline: Trainer fp32", "samples_per_s": stats["train_samples_per_second"], "macro_f1": f1}


def ours(
    prepared: str,
    encoder: str,
    epochs: int,
    batch_size: int,
    max_length: int,
    seed: int,
    limit: int | None,
    overrides: list[str],
    label: str,
    max_steps: int | None = None,
) -> dict[str, Any]:
    from eventcoder.config import load_config
    from eventcoder.runtime import init_runtime
    from eventcoder.schema import load_schema
    from eventcoder.training import train

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(prepared)
        if limit:  # the same first `limit` training rows the baseline sees
            (Path(tmp) / "prepared").mkdir()
            (Path(tmp) / "prepared" / "train.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in _rows(source, "train", limit))
            )
            (Path(tmp) / "prepared" / "validation.jsonl").write_text((source / "validation.jsonl").read_text())
            source = Path(tmp) / "prepared"
        config = load_config(
            [REPO / "params.yaml"],
            [
                f"model.encoder={encoder}",
                f"model.max_length={max_length}",
                f"seed={seed}",
                f"train.epochs={epochs}",
                f"train.batch_size={batch_size}",
                f"data.prepared_dir={source}",
                f"train.output_dir={tmp}/model",
                f"train.checkpoint_dir={tmp}/checkpoints",
                f"train.early_stopping_patience={epochs + 1}",
                "train.progress=false",
                *([f"train.max_steps={max_steps}"] if max_steps else []),
                *overrides,
            ],
        )
        schema = load_schema(REPO / config.schema_path)
        result = train(config, schema, init_runtime(config.train.precision, config.train.num_threads))
    last = result.state.history[-1]
    return {
        "path": label,
        "samples_per_s": result.train_samples_per_second,
        "macro_f1": last["validation/sub_event_type/macro_f1"],
    }


# The ablation starts with every optimisation off and switches one more on at each step.
ALL_OFF = ["train.length_bucketing=false", "train.freeze_word_embeddings=false", "train.fast_dropout=false"]
ABLATION_STEPS = [
    ("fp32, random batches, fused AdamW", "train.precision=fp32"),
    ("+ bf16 autocast (AMX)", "train.precision=bf16"),
    ("+ length-bucketed batches", "train.length_bucketing=true"),
    ("+ frozen word embeddings", "train.freeze_word_embeddings=true"),
    ("+ fast CPU dropout (the default)", "train.fast_dropout=true"),
]


def ablation() -> list[tuple[str, list[str]]]:
    """(label, overrides) per step, each step's overrides extending the previous step's."""
    steps, overrides = [], list(ALL_OFF)
    for label, switch in ABLATION_STEPS:
        overrides = [*overrides, switch]
        steps.append((label, overrides))
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--encoder", default=None, help="default: the bundled all-MiniLM-L6-v2")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--limit", type=int, help="use only the first N training rows")
    parser.add_argument("--ablation", action="store_true", help="our loop with one optimisation added at a time")
    parser.add_argument("--ablation-steps", type=int, default=40)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not (Path(args.prepared) / "train.jsonl").is_file():
        print(
            f"{args.prepared}/train.jsonl not found: run `make train` (or `eventcoder prepare`) first", file=sys.stderr
        )
        return 2
    from eventcoder.encoder import resolve_encoder

    encoder = resolve_encoder(args.encoder or "default")
    common = {
        "prepared": args.prepared,
        "encoder": encoder,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seed": 13,
        "limit": args.limit,
    }

    if args.ablation:
        rows = [
            run_isolated(ours, **common, overrides=o, label=label, max_steps=args.ablation_steps)
            for label, o in ablation()
        ]
        for row in rows:
            row["speedup"] = row["samples_per_s"] / rows[0]["samples_per_s"]
        print_table(rows, ["path", "samples_per_s", "speedup", "peak_rss_mib"])
        if args.json:
            save_json(Path(args.json), rows)
        return 0

    base = run_isolated(baseline, **common)
    mine = run_isolated(ours, **common, overrides=[], label="eventcoder train (default)")
    print_table([base, mine], ["path", "samples_per_s", "peak_rss_mib", "macro_f1"])
    if args.json:
        save_json(Path(args.json), [base, mine])
    print(
        f"ratio={mine['samples_per_s'] / base['samples_per_s']:.2f} f1_delta={mine['macro_f1'] - base['macro_f1']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
