"""Inference speed: `eventcoder predict` against `transformers.pipeline("text-classification")`.

Same trained model, same sentences (drawn from the held-out test split up to --sentences), each path
in its own process. The baseline is the pipeline a hand-rolled script would use: fp32, batch size
32, sentences in file order. Every row is a steady rate (start-up and warm-up excluded). Quality is
sub_event_type macro-F1 on the held-out split, for every path, so speed never hides a quality loss.

The rows in between add one optimisation at a time through `Predictor`, the class behind the
command, in one process. The last row runs the command itself, `eventcoder predict` on a file, with
its defaults for a long input (see `cli`); first_call_s is then the wall time of its short run,
start-up included. The baseline and the command, the two rows the ratio compares, run --repeats
times each (default 3), alternately; the table shows each one's median run and the runs are listed
under it.

    make train && python benchmarks/predict_speed.py

The last line reads `ratio=<eventcoder predict / baseline sentences per second>
f1_delta=<eventcoder predict - the same model in fp32>`; the line before it gives the one-process
`Predictor` ratio.
"""

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
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


def _run_cli(texts: list[str], model_dir: str, folder: Path, name: str, workers: int | None) -> tuple[float, str, Path]:
    source, output = folder / f"{name}.txt", folder / f"{name}.out.jsonl"
    source.write_text("\n".join(texts) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "eventcoder.cli", "predict", "-m", model_dir, "-i", str(source), "-o", str(output)]
    command += [] if workers is None else ["--workers", str(workers)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"eventcoder predict on {source} exited {result.returncode}: {last[0]}")
    return time.perf_counter() - started, result.stderr, output


def cli(model_dir: str, prepared: str, sentences: int) -> dict[str, Any]:
    """The `eventcoder predict` command itself, with its defaults, on a long input: on a CPU that
    means one single-threaded worker process per core from ROWS_PER_WORKER rows per core on. Two
    files, both starting with the held-out split (quality is read from the command's own output)
    followed by drawn sentences: the long one (default settings) and a short one run with the
    worker count the long one chose, so that start-up (imports, model load, compile) cancels out:
    rate = extra rows / extra seconds, the steady rate of a long job like the other rows."""
    from eventcoder.cli import ROWS_PER_WORKER
    from eventcoder.runtime import available_cores

    rows = _test_rows(Path(prepared))
    held_out = [r["text"] for r in rows]
    long_rows = max(ROWS_PER_WORKER * available_cores(), len(held_out) + 4 * sentences)
    drawn = random.Random(0).choices(held_out, k=long_rows - len(held_out))
    with tempfile.TemporaryDirectory() as tmp:
        long_seconds, log, output = _run_cli(held_out + drawn, model_dir, Path(tmp), "long", None)
        chosen = re.search(r"coding in (\d+) worker processes", log)
        workers = int(chosen.group(1)) if chosen else 1
        short_seconds, _, _ = _run_cli(held_out + drawn[:sentences], model_dir, Path(tmp), "short", workers)
        with output.open(encoding="utf-8") as handle:
            quality = [json.loads(line)["sub_event_type"] for line, _ in zip(handle, held_out, strict=False)]
    return {
        "path": f"eventcoder predict, {len(drawn) - sentences} extra rows ({workers} worker processes)",
        "sentences_per_s": (len(drawn) - sentences) / (long_seconds - short_seconds),
        "macro_f1": _macro_f1(rows, quality),
        "first_call_s": short_seconds,
        # The largest process: the parent or a worker (RUSAGE_CHILDREN counts waited-for descendants).
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median rate (the lower middle one for an even count)."""
    return sorted(runs, key=lambda run: run["sentences_per_s"])[(len(runs) - 1) // 2]


def _rates(runs: list[dict[str, Any]]) -> list[str]:
    return [f"{run['sentences_per_s']:.1f}" for run in runs]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "eventcoder"))
    parser.add_argument("--prepared", default=str(REPO / "data" / "prepared"))
    parser.add_argument("--sentences", type=int, default=6144)
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternate runs of the baseline and of the command (default 3)"
    )
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: need at least 1")
    if not (Path(args.model) / "eventcoder.json").is_file() or not (Path(args.prepared) / "test.jsonl").is_file():
        print(f"{args.model} or {args.prepared}/test.jsonl missing: run `make train` first", file=sys.stderr)
        return 2
    common = {"model_dir": args.model, "prepared": args.prepared, "sentences": args.sentences}
    # The two rows the ratio compares run alternately, several times: this shared machine has slow
    # spells of a minute or more that would otherwise land on one side of the ratio only.
    base_runs, command_runs = [], []
    for _ in range(args.repeats):
        base_runs.append(run_isolated(baseline, **common))
        command_runs.append(run_isolated(cli, **common))
    base, command = _median_run(base_runs), _median_run(command_runs)
    steps = [
        run_isolated(padded_loop, **common),
        run_isolated(ours, **common, precision="fp32", label="+ length-sorted bs128, few shapes (fp32 reference)"),
        run_isolated(ours, **common, precision="bf16", label="+ bf16 weights (AMX)"),
        run_isolated(ours, **common, precision="bf16", compile=True, label="+ torch.compile"),
        run_isolated(
            ours, **common, precision="bf16", compile=True, packing=True, label="+ packed sentences (default)"
        ),
        run_isolated(ours, **common, precision="fp32", quantize=True, packing=True, label="int8 (--int8)"),
        command,
    ]
    rows = [base, *steps]
    for row in rows:
        row["speedup"] = row["sentences_per_s"] / base["sentences_per_s"]
    print_table(rows, ["path", "sentences_per_s", "speedup", "first_call_s", "peak_rss_mib", "macro_f1"])
    if args.json:
        save_json(Path(args.json), rows)
    reference, in_process = steps[1], steps[4]
    for name, runs in (("baseline", base_runs), ("eventcoder predict", command_runs)):
        print(f"{name} runs (sentences/s, the median in the table): " + ", ".join(_rates(runs)))
    print(f"in-process ratio (Predictor, one process): {in_process['sentences_per_s'] / base['sentences_per_s']:.2f}")
    print(
        f"ratio={command['sentences_per_s'] / base['sentences_per_s']:.2f} "
        f"f1_delta={command['macro_f1'] - reference['macro_f1']:+.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
