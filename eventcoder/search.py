"""`eventcoder search`: an Optuna hyperparameter search, one nested MLflow run per trial.

The parent run records the search space, every trial's score and the best trial's params, so the
whole search reads as one row in the MLflow UI that expands into its trials.
"""

import logging
from pathlib import Path
from typing import Any

import mlflow
import optuna

from eventcoder import tracking
from eventcoder.config import Config
from eventcoder.runtime import init_runtime
from eventcoder.schema import load_schema
from eventcoder.training import main_metric_key, train

log = logging.getLogger(__name__)


def _trial_config(config: Config, trial: optuna.Trial, root: Path) -> Config:
    space = config.search
    trial_config = config.model_copy(deep=True)
    trial_config.train.learning_rate = trial.suggest_float("train.learning_rate", *space.learning_rate, log=True)
    trial_config.train.head_learning_rate = trial.suggest_float(
        "train.head_learning_rate", *space.head_learning_rate, log=True
    )
    trial_config.train.batch_size = trial.suggest_categorical("train.batch_size", space.batch_size)
    trial_config.train.class_weights = trial.suggest_categorical("train.class_weights", space.class_weights)
    trial_config.model.dropout = trial.suggest_float("model.dropout", *space.dropout)
    trial_config.train.output_dir = str(root / f"trial-{trial.number}" / "model")
    trial_config.train.checkpoint_dir = str(root / f"trial-{trial.number}" / "checkpoints")
    trial_config.tracking.run_name = f"trial-{trial.number}"
    return trial_config


def run_search(config: Config, data_hash: str) -> dict[str, Any]:
    """Run the study; return the best trial's number, value and params."""
    schema = load_schema(config.schema_path)
    runtime = init_runtime(config.train.precision, config.train.num_threads)
    metric = f"validation/{main_metric_key(config, schema)}"
    root = Path(config.train.checkpoint_dir) / "search"
    tracking.connect(config)
    tracking.use_experiment(config.tracking.experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=config.seed))

    with mlflow.start_run(run_name=f"search-{tracking.run_name(config)}") as parent:
        mlflow.log_params({f"search.{k}": str(v) for k, v in config.search.model_dump().items()})
        mlflow.set_tags({"search": "optuna", "data_hash": data_hash, "git_commit": tracking.git_commit()})

        def objective(trial: optuna.Trial) -> float:
            trial_config = _trial_config(config, trial, root)
            with tracking.training_run(trial_config, data_hash, nested=True) as run:
                result = train(trial_config, schema, runtime, log_metrics=tracking.log_metrics)
                score = result.best_metrics["main_metric_value"]
                mlflow.log_metric(f"best/{metric}", score)
                trial.set_user_attr("run_id", run.info.run_id)
            mlflow.log_metric(f"trial/{metric}", score, step=trial.number, run_id=parent.info.run_id)
            log.info("trial %d: %s=%.4f %s", trial.number, metric, score, trial.params)
            return score

        timeout = config.search.timeout_minutes * 60 if config.search.timeout_minutes else None
        study.optimize(objective, n_trials=config.search.trials, timeout=timeout)
        best = study.best_trial
        mlflow.log_params({f"best.{k}": v for k, v in best.params.items()})
        mlflow.log_metric(f"best/{metric}", best.value)
        mlflow.set_tag("best_run_id", best.user_attrs["run_id"])
    return {
        "trial": best.number,
        "value": best.value,
        "params": best.params,
        "run_id": best.user_attrs["run_id"],
        "parent_run_id": parent.info.run_id,
    }
