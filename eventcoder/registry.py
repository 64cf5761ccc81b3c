"""The model registry: every trained model becomes a version; `champion` moves only on merit."""

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from eventcoder.model_source import download_model_dir

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass
class Promotion:
    version: str
    alias: str
    new_score: float
    champion_score: float | None
    reason: str


def current_champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def register_and_promote(
    client: MlflowClient,
    name: str,
    model_uri: str,
    metric: str,
    score: float,
    test_hash: str,
    description: str,
    score_model_dir: Callable[[Path], float],
) -> Promotion:
    """Register `model_uri`; give it `champion` if it beats the champion on the same test data.

    When the champion was scored on other test data, it is re-scored on this test data first, so
    the comparison is never between numbers from different test sets.
    """
    version = mlflow.register_model(model_uri, name).version
    client.update_model_version(name, version, description=description)
    for key, value in {"main_metric": metric, "main_metric_value": f"{score:.6f}", "test_data_hash": test_hash}.items():
        client.set_model_version_tag(name, version, key, value)

    champion = current_champion(client, name)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        return Promotion(version, CHAMPION, score, None, "first version")
    if champion.tags.get("test_data_hash") == test_hash and champion.tags.get("main_metric") == metric:
        champion_score = float(champion.tags["main_metric_value"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            champion_score = score_model_dir(download_model_dir(f"models:/{name}/{champion.version}", Path(tmp)))
        log.info("re-scored champion v%s on this test data: %s=%.4f", champion.version, metric, champion_score)
    if score > champion_score:
        client.set_registered_model_alias(name, CHAMPION, version)
        return Promotion(
            version,
            CHAMPION,
            score,
            champion_score,
            f"beats champion v{champion.version} ({score:.4f} > {champion_score:.4f})",
        )
    client.set_registered_model_alias(name, CHALLENGER, version)
    return Promotion(
        version,
        CHALLENGER,
        score,
        champion_score,
        f"does not beat champion v{champion.version} ({score:.4f} <= {champion_score:.4f})",
    )


def promote(client: MlflowClient, name: str, version: str, alias: str = CHAMPION) -> None:
    """Move an alias by hand (e.g. roll back the champion)."""
    try:
        client.get_model_version(name, version)
    except MlflowException:
        raise MlflowException(f"registered model {name!r} has no version {version}") from None
    client.set_registered_model_alias(name, alias, version)
