"""Where the time goes, phase by phase, in our training step and our prediction path.

    python benchmarks/profile_phases.py [--steps 30] [--sentences 6144] [--operators]

Training: tokenising the split once, then per step padding/collation, forward, backward and the
optimizer step (with the default precision). Prediction: reading the file, tokenising, the
forward pass and writing the output, through the same functions `eventcoder predict` uses.
Prints seconds and shares per phase; `--operators` instead profiles training steps and the
compiled forward pass kernel by kernel (torch.profiler).
"""

import argparse
import random
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
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


def training_steps(steps: int) -> tuple[list[list[int]], Callable[[list[int]], None]]:
    """The first `steps` batches of the default training run and a function running one step of
    it, phase by phase, set up the way `eventcoder train` sets it up (params.yaml defaults)."""
    import torch
    from transformers import AutoTokenizer

    from eventcoder.batching import label_arrays, pad_batch, tokenize, training_batches
    from eventcoder.config import load_config
    from eventcoder.encoder import resolve_encoder
    from eventcoder.modeling import MultiTaskLoss
    from eventcoder.runtime import init_runtime
    from eventcoder.schema import load_schema
    from eventcoder.tables import read_jsonl
    from eventcoder.training import build_model, build_optimizer

    config = load_config([REPO / "params.yaml"])
    schema = load_schema(REPO / config.schema_path)
    runtime = init_runtime(config.train.precision)
    encoder = resolve_encoder(config.model.encoder)
    with phase("read prepared split"):
        rows = read_jsonl(REPO / config.data.prepared_dir / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = build_model(config, schema, runtime).train()
    with phase("tokenise (once, whole split)"):
        ids = tokenize([r["text"] for r in rows], tokenizer, config.model.max_length)
    labels = label_arrays(rows, schema)
    loss_fn = MultiTaskLoss(schema, config.train.task_weights, {})
    optimizer = build_optimizer(model, config, runtime)
    batches = training_batches([len(i) for i in ids], config.train.batch_size, random.Random(0), True)[:steps]

    def step(batch: list[int]) -> None:
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

    return batches, step


def profile_training(steps: int) -> None:
    batches, step = training_steps(steps)
    for batch in batches:
        step(batch)
    report(f"training, {len(batches)} steps of {len(batches[0])}")


def profile_training_operators(steps: int) -> None:
    """torch.profiler over training steps (after 10 untimed ones): which kernels a step runs."""
    from torch.profiler import ProfilerActivity, profile

    batches, step = training_steps(steps + 10)
    for batch in batches[:10]:
        step(batch)
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches[10:]:
            step(batch)
    TIMES.clear()
    print(f"\ntraining operators, {steps} steps")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))


def profile_prediction(sentences: int) -> None:
    from eventcoder.batch_predict import PredictOptions, input_chunks
    from eventcoder.inference import Predictor
    from eventcoder.tables import TableWriter, read_jsonl

    held_out = [r["text"] for r in read_jsonl(REPO / "data" / "prepared" / "test.jsonl")]
    texts = random.Random(0).choices(held_out, k=sentences)
    predictor = Predictor.load(REPO / "models" / "eventcoder")
    options = PredictOptions(progress=False)
    with phase("torch.compile + warm-up (once)"):
        predictor.probabilities(random.Random(1).choices(held_out, k=options.chunk_rows))
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
    dtype = next(predictor.model.encoder.parameters()).dtype
    report(f"prediction, {sentences} sentences (encoder {dtype}, compiled={predictor.is_compiled})")


def profile_operators(sentences: int) -> None:
    """torch.profiler over the compiled forward pass: which kernels the forward time is spent in."""
    from torch.profiler import ProfilerActivity, profile

    from eventcoder.batch_predict import PredictOptions
    from eventcoder.inference import Predictor
    from eventcoder.tables import read_jsonl

    held_out = [r["text"] for r in read_jsonl(REPO / "data" / "prepared" / "test.jsonl")]
    predictor = Predictor.load(REPO / "models" / "eventcoder", compile=True)
    warm_up = random.Random(1).choices(held_out, k=PredictOptions().chunk_rows)
    predictor.probabilities(warm_up)  # compile and warm up
    token_ids = predictor.tokenize(random.Random(0).choices(held_out, k=sentences))
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        predictor.probabilities_from_ids(token_ids)
    print(f"\nforward operators, {sentences} sentences (compiled)")
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sentences", type=int, default=6144)
    parser.add_argument("--operators", action="store_true", help="only: kernel-level profiles (training, forward pass)")
    args = parser.parse_args()
    if not (REPO / "models" / "eventcoder" / "eventcoder.json").is_file():
        print("models/eventcoder missing: run `make train` first", file=sys.stderr)
        return 2
    if args.operators:
        profile_training_operators(args.steps)
        profile_operators(args.sentences)
        return 0
    profile_training(args.steps)
    profile_prediction(args.sentences)
    return 0


if __name__ == "__main__":
    sys.exit(main())
