"""The pipeline stages as functions: what each CLI subcommand (and each DVC stage) runs."""

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow

from eventcoder import tracking
from eventcoder.config import Config
from eventcoder.data.prepare import prepare
from eventcoder.evaluation import Evaluation, evaluate_rows, evaluate_split, int8_check, write_reports
from eventcoder.inference import Predictor
from eventcoder.model_card import render_model_card
from eventcoder.model_dir import update_metadata
from eventcoder.plots import training_curves_png
from eventcoder.registry import Promotion, register_and_promote
from eventcoder.runtime import Runtime, distributed_cleanup, init_runtime
from eventcoder.schema import LabelSchema, load_schema
from eventcoder.training import TrainResult, load_split, train

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
MODEL_URI_FILE = "mlflow_model_uri"


def run_prepare(config: Config) -> dict[str, Any]:
    return prepare(config, load_schema(config.schema_path))


def prepared_report(config: Config) -> dict[str, Any]:
    path = Path(config.data.prepared_dir) / "report.json"
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def run_train(config: Config, resume: bool = False) -> TrainResult:
    schema = load_schema(config.schema_path)
    runtime = init_runtime(config.train.precision, config.train.num_threads)
    with distributed_cleanup(runtime):
        if not runtime.is_main:  # under torchrun, only rank 0 talks to MLflow and writes files
            return train(config, schema, runtime, resume=resume)
        return _train_and_log(config, schema, runtime, resume)


def _train_and_log(config: Config, schema: LabelSchema, runtime: Runtime, resume: bool) -> TrainResult:
    checkpoint_dir = Path(config.train.checkpoint_dir)
    tracking.connect(config)  # fail before training, not after it
    run_id_file = checkpoint_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if resume and run_id_file.is_file() else None
    with tracking.training_run(config, prepared_report(config)["data_hash"], run_id) as run:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run.info.run_id)
        if run_id is None:
            for split in ("train", "validation"):
                tracking.log_dataset(
                    Path(config.data.prepared_dir) / f"{split}.jsonl",
                    split,
                    schema.main_task,
                    context="training" if split == "train" else "validation",
                )
        result = train(config, schema, runtime, resume=resume, log_metrics=tracking.log_metrics)
        best = result.best_metrics
        with tempfile.TemporaryDirectory() as tmp:
            curves = training_curves_png(result.state.history, Path(tmp) / "training_curves.png")
            mlflow.log_artifact(str(curves), artifact_path="reports/figures")
        mlflow.log_metrics(
            {"best_epoch": best["epoch"], **{f"best/validation/{k}": v for k, v in best["headline"].items()}}
        )
        for name in ("schema.yaml", "config.yaml", "metrics.json", "labels.json"):
            mlflow.log_artifact(str(result.model_dir / name), artifact_path="model_files")
        validation_rows = load_split(config, "validation")
        check = int8_check(result.model_dir, validation_rows, config)
        update_metadata(result.model_dir, {"int8_check": check})
        mlflow.log_metrics({"int8/validation/main_metric": check["int8"], "int8/validation/delta": check["delta"]})
        model_uri = tracking.log_pyfunc_model(result.model_dir, [row["text"] for row in validation_rows[:3]])
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

    run_id_file = model_dir / RUN_ID_FILE
    run_id = run_id_file.read_text().strip() if run_id_file.is_file() else None
    validation = json.loads((model_dir / "metrics.json").read_text())["headline"]
    card = render_model_card(config, schema, prepared_report(config), evaluation.headline, validation, run_id)
    (reports / "model_card.md").write_text(card, encoding="utf-8")

    client = tracking.connect(config)
    if run_id is None:
        log.warning("%s has no %s: test metrics are not logged to MLflow", model_dir, RUN_ID_FILE)
        return evaluation, None
    split = config.evaluate.split
    with mlflow.start_run(run_id=run_id):
        tracking.log_dataset(
            Path(config.data.prepared_dir) / f"{split}.jsonl", split, schema.main_task, context="evaluation"
        )
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
