"""The pipeline stages as functions: what each CLI subcommand (and each DVC stage) runs."""

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import mlflow

from eventcoder import tracking
from eventcoder.config import Config
from eventcoder.data.prepare import prepare
from eventcoder.evaluation import Evaluation, evaluate_rows, evaluate_split, write_reports
from eventcoder.inference import Predictor
from eventcoder.registry import Promotion, register_and_promote
from eventcoder.runtime import init_runtime
from eventcoder.schema import LabelSchema, load_schema
from eventcoder.training import TrainResult, load_split, train

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
MODEL_URI_FILE = "mlflow_model_uri"


def run_prepare(config: Config) -> dict[str, Any]:
    return prepare(config, load_schema(config.schema_path))


def _prepared_report(config: Config) -> dict[str, Any]:
    path = Path(config.data.prepared_dir) / "report.json"
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def run_train(config: Config, resume: bool = False) -> TrainResult:
    schema = load_schema(config.schema_path)
    runtime = init_runtime(config.train.precision, config.train.num_threads)
    checkpoint_dir = Path(config.train.checkpoint_dir)
    if not runtime.is_main:
        return train(config, schema, runtime, resume=resume)

    tracking.connect(config)  # fail before training, not after it
    run_id_file = checkpoint_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    with tracking.training_run(config, _prepared_report(config)["data_hash"], run_id) as run:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run.info.run_id)
        result = train(config, schema, runtime, resume=resume, log_metrics=tracking.log_metrics)
        best = result.best_metrics
        mlflow.log_metrics(
            {"best_epoch": best["epoch"], **{f"best/validation/{k}": v for k, v in best["headline"].items()}}
        )
        for name in ("schema.yaml", "config.yaml", "metrics.json", "labels.json"):
            mlflow.log_artifact(str(result.model_dir / name), artifact_path="model_files")
        examples = [row["text"] for row in load_split(config, "validation")[:3]]
        model_uri = tracking.log_pyfunc_model(result.model_dir, examples)
        (result.model_dir / RUN_ID_FILE).write_text(run.info.run_id)
        (result.model_dir / MODEL_URI_FILE).write_text(model_uri)
    log.info(
        "trained %s: best %s=%.4f at epoch %d; MLflow run %s",
        result.model_dir,
        best["main_metric"],
        best["main_metric_value"],
        best["epoch"],
        run.info.run_id,
    )
    return result


def run_evaluate(config: Config) -> tuple[Evaluation, Promotion | None]:
    schema = load_schema(config.schema_path)
    model_dir = Path(config.train.output_dir)
    predictor = Predictor.load(
        model_dir,
        precision=config.train.precision,
        batch_size=config.train.eval_batch_size,
        num_threads=config.train.num_threads,
    )
    evaluation = evaluate_split(predictor, config)
    reports = write_reports(evaluation, schema, config)
    log.info(
        "evaluate on %s (%d rows): %s",
        config.evaluate.split,
        len(evaluation.rows),
        ", ".join(f"{k}={v:.4f}" for k, v in evaluation.headline.items() if k.endswith("macro_f1")),
    )

    client = tracking.connect(config)
    run_id_file = model_dir / RUN_ID_FILE
    if not run_id_file.is_file():
        log.warning("%s has no %s: test metrics are not logged to MLflow", model_dir, RUN_ID_FILE)
        return evaluation, None
    split = config.evaluate.split
    with mlflow.start_run(run_id=run_id_file.read_text().strip()):
        mlflow.log_metrics({f"{split}/{k}": v for k, v in evaluation.headline.items()})
        mlflow.log_artifacts(str(reports), artifact_path="reports")
        mlflow.log_table(
            {
                key: [row[key] for row in _misclassified_table(reports)]
                for key in ("text", "gold", "predicted", "score")
            },
            artifact_file="misclassified.json",
        )
        promotion = _register(config, schema, client, model_dir, evaluation)
    return evaluation, promotion


def _misclassified_table(reports: Path) -> list[dict[str, Any]]:
    with (reports / "misclassified.jsonl").open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _register(
    config: Config, schema: LabelSchema, client: Any, model_dir: Path, evaluation: Evaluation
) -> Promotion | None:
    name = config.tracking.registered_model
    uri_file = model_dir / MODEL_URI_FILE
    if not name or not uri_file.is_file():
        return None
    # Champion and challenger are only comparable on identical test rows.
    test_hash = hashlib.sha256(json.dumps(evaluation.rows, sort_keys=True).encode()).hexdigest()[:16]

    def score_model_dir(path: Path) -> float:
        return evaluate_rows(Predictor.load(path), evaluation.rows, config).main_value

    promotion = register_and_promote(
        client,
        name,
        uri_file.read_text().strip(),
        evaluation.main_metric,
        evaluation.main_value,
        test_hash,
        description=(
            f"{schema.name} schema, encoder {config.model.encoder}; "
            f"{config.evaluate.split} {evaluation.main_metric}={evaluation.main_value:.4f}"
        ),
        score_model_dir=score_model_dir,
    )
    mlflow.set_tags({"registered_model": name, "registered_version": promotion.version, "alias": promotion.alias})
    log.info("registered %s v%s as @%s: %s", name, promotion.version, promotion.alias, promotion.reason)
    return promotion
