"""Inference speed: `eventcoder predict` against `transformers.pipeline("text-classification")`.

Same trained model, same sentences (drawn from the held-out test split up to --sentences), each path
in its own process. The baseline is the pipeline a hand-rolled script would use: fp32, batch size
32, sentences in file order. Quality is sub_event_type macro-F1 on the held-out split, for every
path, so speed never hides a quality loss; `f1_delta` compares our default path with the same
model run in plain fp32.

    make train && python benchmarks/predict_speed.py

The last line reads `ratio=<ours/baseline sentences per second> f1_delta=<ours - fp32 reference>`.
"""

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

from _harness import REPO, print_table, run_isolated, save_json

CHUNK_ROWS = 2048  # the default --chunk-rows of `eventcoder predict`


def _test_rows(prepared: Path) -> list[dict[str, Any]]:
    with (prepared / "test.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _macro_f1(rows: list[dict[str, Any]], predicted: list[str]) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score([r["sub_event_type"] for r in rows], predicted, average="macro"))


def _workload(rows: list[dict[str, Any]], sentences: int) -> tuple[list[str], list[str]]:
    """A warm-up chunk and the timed sentences, drawn with replacement (seeded) from the held-out
    split, so every chunk is a different mix, like news. The untimed warm-up chunk lets every path
    build its kernels for the usual shapes: the table is the steady rate of a long job."""
    texts = random.Random(0).choices([r["text"] for r in rows], k=CHUNK_ROWS + sentences)
    return texts[:CHUNK_ROWS], texts[CHUNK_ROWS:]


def _predict_in_chunks(predictor: Any, texts: list[str]) -> None:
    """Code `texts` chunk by chunk, as `eventcoder predict` reads its input."""
    for start in range(0, len(texts), CHUNK_ROWS):
        predictor.predict(texts[start : start + CHUNK_ROWS])


def baseline(model_dir: str, prepared: str, sentences: int) -> dict[str, Any]:
    """transformers.pipeline over the same encoder and sub_event_type head, fp32, batch 32."""
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, pipeline
    from transformers.modeling_outputs import SequenceClassifierOutput

    from eventcoder.model_dir import load_model_dir

    model, tokenizer, schema, meta = load_model_dir(model_dir)
    labels = schema.task("sub_event_type").labels

    class SubEventClassifier(PreTrainedModel):
        """Exposes our encoder + sub_event_type head as a Hugging Face sequence classifier."""

        config_class = PretrainedConfig

        def __init__(self) -> None:
            config = PretrainedConfig(
                id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)}
            )
            super().__init__(config)
            self.inner = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> SequenceClassifierOutput:
            return SequenceClassifierOutput(logits=self.inner(input_ids, attention_mask)["sub_event_type"])

    classifier = pipeline(
        "text-classification", model=SubEventClassifier().eval(), tokenizer=tokenizer, device="cpu", batch_size=32
    )
    kwargs = {"truncation": True, "max_length": meta["max_length"]}
    rows = _test_rows(Path(prepared))
    quality = [out["label"] for out in classifier([r["text"] for r in rows], **kwargs)]
    warm_up, texts = _workload(rows, sentences)
    classifier(warm_up, **kwargs)
    started = time.perf_counter()
    classifier(texts, **kwargs)
    seconds = time.perf_counter() - started
    return {
        "path": "baseline: pipeline fp32 bs32",
        "sentences_per_s": len(texts) / seconds,
        "macro_f1": _macro_f1(rows, quality),
    }


def padded_loop(model_dir: str, prepared: str, sentences: int) -> dict[str, Any]:
    """What a hand-written loop over our model does: fp32, padded batches of 32 in file order."""
    import torch

    from eventcoder.batching import pad_batch, tokenize
    from eventcoder.model_dir import load_model_dir

    model, tokenizer, schema, meta = load_model_dir(model_dir)
    model.eval()
    labels = schema.task("sub_event_type").labels

    @torch.inference_mode()
    def predict(texts: list[str]) -> list[str]:
        predicted = []
        for start in range(0, len(texts), 32):
            ids = tokenize(texts[start : start + 32], tokenizer, meta["max_length"])
            logits = model(**pad_batch(ids, tokenizer.pad_token_id))["sub_event_type"]
            predicted += [labels[i] for i in logits.argmax(-1).tolist()]
        return predicted

    rows = _test_rows(Path(prepared))
    quality = predict([r["text"] for r in rows])
    warm_up, texts = _workload(rows, sentences)
    predict(warm_up)
    started = time.perf_counter()
    predict(texts)
    seconds = time.perf_counter() - started
    return {
        "path": "ours fp32, padded bs32, file order",
        "sentences_per_s": len(texts) / seconds,
        "macro_f1": _macro_f1(rows, quality),
    }


def ours(
    model_dir: str,
    prepared: str,
    sentences: int,
    label: str,
    precision: str,
    compile: bool = False,
    quantize: bool = False,
    packing: bool = False,
) -> dict[str, Any]:
    """`Predictor`, the code behind `eventcoder predict`. The held-out pass comes first and, when
    compiling, pays the one-off compile cost (reported as first_call_s); the timed pass follows."""
    from eventcoder.inference import Predictor

    predictor = Predictor.load(model_dir, precision=precision, quantize=quantize, compile=compile, packing=packing)
    rows = _test_rows(Path(prepared))
    started = time.perf_counter()
    quality = [p["sub_event_type"] for p in predictor.predict([r["text"] for r in rows])]
    first_call = time.perf_counter() - started
    warm_up, texts = _workload(rows, sentences)
    predictor.predict(warm_up)
    started = time.perf_counter()
    _predict_in_chunks(predictor, texts)
    seconds = time.perf_counter() - started
    return {
        "path": label,
        "sentences_per_s": len(texts) / seconds,
        "macro_f1": _macro_f1(rows, quality),
        "first_call_s": first_call,
    }


def _shard_worker(model_dir: str, warm_up: list[str], texts: list[str], start: Any, results: Any) -> None:
    """One worker of `predict --workers n` (or one `--shard i/n --threads 1` process): warm up,
    wait for the others, code its rows."""
    import torch

    from eventcoder.inference import Predictor

    torch.set_num_threads(1)
    predictor = Predictor.load(model_dir)
    predictor.predict(warm_up)
    start.wait()
    _predict_in_chunks(predictor, texts)
    results.put(time.perf_counter())


def sharded(model_dir: str, prepared: str, sentences: int, shards: int) -> dict[str, Any]:
    """`shards` processes with one thread each, started together, each coding every shards-th row
    (what `predict --workers n` does for large inputs, chunk by chunk); the rate is all rows over
    the wall time from the common start to the last process's end. Quality: the default path's."""
    import multiprocessing as mp

    warm_up, texts = _workload(_test_rows(Path(prepared)), sentences)
    context = mp.get_context("spawn")
    start, results = context.Barrier(shards + 1), context.Queue()
    workers = [
        context.Process(target=_shard_worker, args=(model_dir, warm_up, texts[i::shards], start, results))
        for i in range(shards)
    ]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    finished = max(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return {
        "path": f"{shards} worker processes x 1 thread (--workers {shards})",
        "sentences_per_s": len(texts) / (finished - started),
        # The largest of the worker processes (RUSAGE_CHILDREN: the biggest child that has exited).
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "eventcoder"))
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--sentences", type=int, default=6144)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if not (Path(args.model) / "eventcoder.json").is_file() or not (Path(args.prepared) / "test.jsonl").is_file():
        print(f"{args.model} or {args.prepared}/test.jsonl missing: run `make train` first", file=sys.stderr)
        return 2
    common = {"model_dir": args.model, "prepared": args.prepared, "sentences": args.sentences}
    base = run_isolated(baseline, **common)
    steps = [
        run_isolated(padded_loop, **common),
        run_isolated(ours, **common, precision="fp32", label="+ length-sorted bs128, few shapes (fp32 reference)"),
        run_isolated(ours, **common, precision="bf16", label="+ bf16 weights (AMX)"),
        run_isolated(ours, **common, precision="bf16", compile=True, label="+ torch.compile"),
        run_isolated(
            ours, **common, precision="bf16", compile=True, packing=True, label="+ packed sentences (default)"
        ),
        run_isolated(ours, **common, precision="fp32", quantize=True, packing=True, label="int8 (--int8)"),
        run_isolated(sharded, **common, shards=os.cpu_count() or 1),
    ]
    rows = [base, *steps]
    for row in rows:
        row["speedup"] = row["sentences_per_s"] / base["sentences_per_s"]
    print_table(rows, ["path", "sentences_per_s", "speedup", "first_call_s", "peak_rss_mib", "macro_f1"])
    if args.json:
        save_json(Path(args.json), rows)
    reference, default = steps[1], steps[4]
    print(
        f"ratio={default['sentences_per_s'] / base['sentences_per_s']:.2f} "
        f"f1_delta={default['macro_f1'] - reference['macro_f1']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
