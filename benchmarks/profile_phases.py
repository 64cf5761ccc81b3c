"""Where the time goes, phase by phase, in our training step and our prediction path.

    python benchmarks/profile_phases.py [--steps 30] [--sentences 2000]

Training: tokenising the split once, then per step padding/collation, forward, backward and the
optimizer step (with the default precision). Prediction: reading the file, tokenising, the
forward pass and writing the output, through the same functions `eventcoder predict` uses.
Prints seconds and shares per phase.
"""

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _harness import REPO

TIMES: dict[str, float] = defaultdict(float)


@contextmanager
def phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    TIMES[name] += time.perf_counter() - started


def report(title: str) -> None:
    total = sum(TIMES.values())
    print(f"\n{title}")
    for name, seconds in TIMES.items():
        print(f"  {name:28s} {seconds:8.2f} s  {100 * seconds / total:5.1f}%")
    TIMES.clear()


def profile_training(steps: int) -> None:
    import torch
    from transformers import AutoTokenizer

    from eventcoder.batching import label_arrays, pad_batch, tokenize, training_batches
    from eventcoder.config import load_config
    from eventcoder.encoder import resolve_encoder
    from eventcoder.modeling import MultiTaskLoss, MultiTaskModel
    from eventcoder.runtime import init_runtime
    from eventcoder.schema import load_schema
    from eventcoder.tables import read_jsonl
    from eventcoder.training import build_optimizer

    config = load_config([REPO / "params.yaml"])
    schema = load_schema(REPO / config.schema_path)
    runtime = init_runtime(config.train.precision)
    encoder = resolve_encoder(config.model.encoder)
    with phase("read prepared split"):
        rows = read_jsonl(REPO / config.data.prepared_dir / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = MultiTaskModel.from_encoder(encoder, schema, config.model.pooling, config.model.dropout).train()
    with phase("tokenise (once, whole split)"):
        ids = tokenize([r["text"] for r in rows], tokenizer, config.model.max_length)
    labels = label_arrays(rows, schema)
    loss_fn = MultiTaskLoss(schema, config.train.task_weights, {})
    optimizer = build_optimizer(model, config, runtime)
    batches = training_batches([len(i) for i in ids], config.train.batch_size, random.Random(0), True)[:steps]
    for batch in batches:
        with phase("pad + collate"):
            inputs = pad_batch([ids[i] for i in batch], tokenizer.pad_token_id)
            targets = {k: torch.from_numpy(v[batch]) for k, v in labels.items()}
        with phase("forward (+loss)"), runtime.autocast():
            loss, _ = loss_fn(model(**inputs), targets)
        with phase("backward"):
            loss.backward()
        with phase("optimizer step"):
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    report(f"training, {len(batches)} steps of {config.train.batch_size} (bf16={runtime.bf16})")


def profile_prediction(sentences: int) -> None:
    from eventcoder.batch_predict import PredictOptions, input_chunks
    from eventcoder.inference import Predictor
    from eventcoder.tables import TableWriter, read_jsonl

    texts = [r["text"] for r in read_jsonl(REPO / "data" / "prepared" / "test.jsonl")]
    texts = (texts * (sentences // len(texts) + 1))[:sentences]
    predictor = Predictor.load(REPO / "models" / "eventcoder")
    options = PredictOptions(progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "in.txt"
        source.write_text("\n".join(texts) + "\n")
        with TableWriter(Path(tmp) / "out.jsonl") as writer:
            chunks = iter(input_chunks(source, options))
            while True:
                with phase("read input"):
                    chunk = next(chunks, None)
                if chunk is None:
                    break
                with phase("tokenise"):
                    token_ids = predictor.tokenize([record["text"] for _, record in chunk])
                with phase("forward"):
                    probs = predictor.probabilities_from_ids(token_ids)
                with phase("labels + scores"):
                    rows = predictor.label_rows(probs)
                with phase("write output"):
                    writer.write([{**record, **row} for (_, record), row in zip(chunk, rows, strict=True)])
    report(f"prediction, {sentences} sentences (bf16={predictor.runtime.bf16})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sentences", type=int, default=2000)
    args = parser.parse_args()
    if not (REPO / "models" / "eventcoder" / "eventcoder.json").is_file():
        print("models/eventcoder missing: run `make train` first", file=sys.stderr)
        return 2
    profile_training(args.steps)
    profile_prediction(args.sentences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
