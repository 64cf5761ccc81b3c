"""The `eventcoder` command: one thin subcommand per pipeline stage, plus predict and promote."""

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from eventcoder.config import DEFAULT_CONFIG, default_tracking_uri, load_config
from eventcoder.errors import EventcoderError

log = logging.getLogger("eventcoder")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        action="append",
        default=None,
        help=f"YAML config file; repeat to layer variants over a base (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override any config value, e.g. train.learning_rate=3e-5"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eventcoder", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="validate raw data, split it by article, write data/prepared/")
    _add_config_args(prepare)

    train = commands.add_parser("train", help="fine-tune the multi-task model and log the run to MLflow")
    _add_config_args(train)
    train.add_argument("--resume", action="store_true", help="continue from the last epoch checkpoint")

    evaluate = commands.add_parser("evaluate", help="score the trained model, write reports, register it")
    _add_config_args(evaluate)

    predict = commands.add_parser("predict", help="code a file of sentences or articles")
    predict.add_argument(
        "--model", "-m", required=True, help="model directory or MLflow URI (models:/eventcoder@champion)"
    )
    predict.add_argument("--input", "-i", required=True, help=".txt, .jsonl, .csv, .tsv or .parquet (optionally .gz)")
    predict.add_argument("--output", "-o", required=True, help=".jsonl, .csv, .tsv or .parquet (optionally .gz)")
    predict.add_argument("--text-column", default="text")
    predict.add_argument("--documents", action="store_true", help="split each text into sentences first")
    predict.add_argument("--doc-id-column", default="doc_id")
    predict.add_argument("--shard", help="i/n: code only rows r with (r-1) %% n == i, for job arrays")
    predict.add_argument("--all-scores", action="store_true", help="add every label's probability per task")
    predict.add_argument("--events-only", action="store_true", help="keep only rows whose main label is not 'none'")
    predict.add_argument("--min-score", type=float, help="keep only rows whose main-task score is at least this")
    predict.add_argument("--batch-size", type=int, default=128, help="rows per forward pass (padded batches)")
    predict.add_argument(
        "--batch-tokens", type=int, default=2048, help="tokens per forward pass (packed batches, the CPU default)"
    )
    predict.add_argument("--chunk-rows", type=int, default=2048, help="input rows per resumable part")
    predict.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    predict.add_argument("--threads", type=int, help="torch threads per process (default: cores / workers)")
    predict.add_argument(
        "--workers",
        type=int,
        help="worker processes, each with its own model (default on CPUs: one single-threaded worker per core "
        "for inputs of 32,768+ rows per core, else 1)",
    )
    predict.add_argument(
        "--packing",
        action=argparse.BooleanOptionalAction,
        help="padding-free batches of whole sentences laid end to end (default: on CPUs, for BERT encoders)",
    )
    predict.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile the model (default: only for chunks large enough to repay its 20-40 s)",
    )
    predict.add_argument(
        "--int8",
        action="store_true",
        help="int8 dynamic quantisation; refused unless the model passed its int8 quality check",
    )
    predict.add_argument("--resume", action="store_true", help="continue an interrupted run from its parts")
    predict.add_argument(
        "--tracking-uri", help="MLflow store for models:/ URIs (default: MLFLOW_TRACKING_URI or ./mlflow.db)"
    )

    promote = commands.add_parser("promote", help="point an alias (default: champion) at a registered version")
    promote.add_argument("--version", required=True)
    promote.add_argument("--alias", default="champion")
    _add_config_args(promote)

    compare = commands.add_parser("compare", help="table of an experiment's runs: differing params, metrics")
    compare.add_argument("--experiment", help="default: tracking.experiment of the config")
    compare.add_argument("--metric", help="sort by this metric (default: test/<main metric>)")
    compare.add_argument("--max-runs", type=int, default=50)
    _add_config_args(compare)

    search = commands.add_parser("search", help="Optuna hyperparameter search, one nested MLflow run per trial")
    _add_config_args(search)
    return parser


def _config(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> None:
    # Imported directly, not through eventcoder.pipeline: preparing data needs neither torch nor MLflow.
    from eventcoder.data.prepare import prepare
    from eventcoder.schema import load_schema

    config = _config(args)
    report = prepare(config, load_schema(config.schema_path))
    print(
        f"read {report['rows_read']} rows: kept {report['rows_kept']} {report['split_rows']}, "
        f"rejected {report['rows_rejected']} {report['reject_reasons'] or ''}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from eventcoder.pipeline import run_train

    result = run_train(_config(args), resume=args.resume)
    if result.best_metrics:
        print(
            f"model: {result.model_dir}  best {result.best_metrics['main_metric']}="
            f"{result.best_metrics['main_metric_value']:.4f} (epoch {result.best_metrics['epoch']}), "
            f"{result.train_samples_per_second:.1f} samples/s"
        )


def cmd_evaluate(args: argparse.Namespace) -> None:
    from eventcoder.pipeline import run_evaluate

    evaluation, promotion = run_evaluate(_config(args))
    print(json.dumps({k: round(v, 4) for k, v in evaluation.headline.items() if k.endswith("macro_f1")}, indent=2))
    if promotion:
        print(f"registered version {promotion.version} as @{promotion.alias}: {promotion.reason}")


def require_int8_check(model_dir: Path) -> None:
    from eventcoder.errors import ConfigError
    from eventcoder.inference import int8_activation_bits
    from eventcoder.model_dir import read_metadata

    check = read_metadata(model_dir).get("int8_check")
    if not check:
        raise ConfigError(f"--int8: {model_dir} has no int8 quality check (models trained by eventcoder >= 0.1 have)")
    if not check["passed"]:
        raise ConfigError(
            f"--int8: refused, {check['metric']} drops from {check['fp32']:.4f} (fp32) to "
            f"{check['int8']:.4f} (int8) on {check['split']}, more than {check['max_drop']:.3f}"
        )
    checked_bits, bits_here = check.get("activation_bits", 7), int8_activation_bits()
    if checked_bits != bits_here:
        raise ConfigError(
            f"--int8: refused, {model_dir} passed its int8 check with {checked_bits}-bit activations but this "
            f"CPU runs {bits_here}-bit ones (AVX-512 VNNI decides); train it on a CPU like this one to check it here"
        )


# Rows per worker below which extra workers do not pay: each costs about 2.5 s to start (import,
# load, compile) and saves about 0.06 ms per row on two cores (issue 6 notes).
ROWS_PER_WORKER = 32768


def _auto_workers(args: argparse.Namespace) -> int:
    """One single-threaded worker per core for large CPU jobs, else one process."""
    import torch

    from eventcoder.batch_predict import parse_shard
    from eventcoder.runtime import available_cores
    from eventcoder.tables import count_rows

    if args.threads or torch.cuda.is_available():
        return 1
    rows = count_rows(args.input) if Path(args.input).exists() else None
    if rows is None:
        return 1
    shard_rows = rows // parse_shard(args.shard)[1]
    return max(1, min(available_cores(), shard_rows // ROWS_PER_WORKER))


def cmd_predict(args: argparse.Namespace) -> None:
    from eventcoder.batch_predict import PredictOptions, parse_shard, predict_file
    from eventcoder.inference import PredictorSpec
    from eventcoder.model_source import resolve_model_dir
    from eventcoder.runtime import available_cores, keep_freed_memory

    shard_index, shard_count = parse_shard(args.shard)
    model_dir = resolve_model_dir(args.model, default_tracking_uri(args.tracking_uri))
    if args.int8:
        require_int8_check(model_dir)
    keep_freed_memory()  # this process codes the chunks itself unless workers do
    workers = _auto_workers(args) if args.workers is None else args.workers
    if workers < 1:
        from eventcoder.errors import ConfigError

        raise ConfigError(f"--workers {workers}: need at least 1")
    if workers > 1:
        log.info("coding in %d worker processes", workers)
    spec = PredictorSpec(
        str(model_dir),
        {
            "precision": args.precision,
            "batch_size": args.batch_size,
            "num_threads": args.threads or (available_cores() // workers if workers > 1 else None),
            "quantize": args.int8,
            "compile": args.compile,
            "packing": args.packing,
            "tokens_per_batch": args.batch_tokens,
        },
    )
    options = PredictOptions(
        text_column=args.text_column,
        documents=args.documents,
        doc_id_column=args.doc_id_column,
        shard_index=shard_index,
        shard_count=shard_count,
        all_scores=args.all_scores,
        events_only=args.events_only,
        min_score=args.min_score,
        chunk_rows=args.chunk_rows,
        resume=args.resume,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    report = predict_file(spec, args.input, args.output, options, args.model, workers)
    line = (
        f"read {report.rows_read} rows: coded {report.rows_coded}, rejected {report.rows_rejected}; "
        f"wrote {report.rows_written} rows to {args.output}"
    )
    if report.rows_filtered:
        line += f" ({report.rows_filtered} filtered by --events-only/--min-score)"
    if report.reject_file:
        line += f"; rejects with reasons in {report.reject_file}"
    print(line)


def cmd_promote(args: argparse.Namespace) -> None:
    from eventcoder import registry, tracking

    config = _config(args)
    client = tracking.connect(config)
    registry.promote(client, config.tracking.registered_model, args.version, args.alias)
    print(f"{config.tracking.registered_model} v{args.version} is now @{args.alias}")


def cmd_compare(args: argparse.Namespace) -> None:
    from eventcoder import compare, tracking
    from eventcoder.schema import load_schema
    from eventcoder.training import main_metric_key

    config = _config(args)
    schema = load_schema(config.schema_path)
    split = config.evaluate.split
    sort_metric = args.metric or f"{split}/{main_metric_key(config, schema)}"
    tasks = [*schema.task_names, *(d.name for d in schema.derived)]
    metrics = list(dict.fromkeys([sort_metric, *(f"{split}/{task}/macro_f1" for task in tasks)]))
    header, rows = compare.compare_table(
        tracking.connect(config),
        args.experiment or config.tracking.experiment,
        sort_metric,
        metrics,
        config.tracking.registered_model,
        args.max_runs,
    )
    print(compare.format_table(header, rows) if rows else "no finished runs")


def cmd_search(args: argparse.Namespace) -> None:
    from eventcoder.pipeline import prepared_report
    from eventcoder.search import run_search

    config = _config(args)
    best = run_search(config, prepared_report(config)["data_hash"])
    print(
        f"best trial {best['trial']}: {best['value']:.4f} {best['params']} (run {best['run_id']}, "
        f"parent {best['parent_run_id']})"
    )


COMMANDS = {
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "promote": cmd_promote,
    "compare": cmd_compare,
    "search": cmd_search,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # MLflow, transformers and friends are chatty; our own messages are the ones users need.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.command != "prepare":  # importing transformers costs seconds; prepare never needs it
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    for noisy in ("mlflow", "alembic", "httpx", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # urllib3 warns on every retry against a dead tracking server; the one-line error says it all.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        COMMANDS[args.command](args)
    except EventcoderError as exc:
        print(f"eventcoder {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
