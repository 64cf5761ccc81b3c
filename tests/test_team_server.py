"""Team setup: the real CLI trains against `mlflow server` backed by PostgreSQL, with a separate artifact store."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import sqlalchemy
from conftest import REPO, write_config
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from servers import mlflow_server, postgres_server
from test_e2e import _raw_data, cli

from eventcoder.inference import Predictor

pytestmark = pytest.mark.e2e

TEXTS = [
    "Iraqi airstrikes in northern Ramadi killed 11 people, including three IS fighters",
    "Thousands marched peacefully through Nairobi on Tuesday.",
]
# What a local run leaves in its working directory; with a tracking server, none of it may appear.
LOCAL_STORES = ("mlruns", "mlartifacts", "mlflow.db")


@dataclass(frozen=True)
class TeamServer:
    url: str
    database_uri: str
    artifacts: Path
    workdir: Path


@pytest.fixture
def team_server(tmp_path: Path) -> Iterator[TeamServer]:
    workdir, artifacts = tmp_path / "server", tmp_path / "artifacts"
    workdir.mkdir()
    with postgres_server() as database_uri, mlflow_server(database_uri, artifacts, workdir) as url:
        yield TeamServer(url, database_uri, artifacts, workdir)


def _local_stores(directory: Path) -> set[str]:
    return {name for name in LOCAL_STORES if (directory / name).exists()}


def test_cli_trains_against_a_postgres_backed_server(
    team_server: TeamServer, tmp_path: Path, tiny_encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # the CLI runs inherit it: nothing leaves loopback
    project = tmp_path / "project"
    _raw_data(project, docs=25)
    config = str(write_config(project, tiny_encoder, {"tracking.tracking_uri": team_server.url}))
    cli("prepare", "-c", config, cwd=project)
    cli("train", "-c", config, cwd=project)
    evaluated = cli("evaluate", "-c", config, cwd=project)
    assert "registered version 1 as @champion" in evaluated.stdout

    # The run, read back over HTTP.
    client = MlflowClient(team_server.url)
    run_id = (project / "model" / "mlflow_run_id").read_text().strip()
    run = client.get_run(run_id)
    assert run.data.params["train.batch_size"] == "16"
    assert run.data.params["tracking.tracking_uri"] == team_server.url
    assert {"best_epoch", "test/sub_event_type/macro_f1", "validation/sub_event_type/macro_f1"} <= set(run.data.metrics)
    history = client.get_metric_history(run_id, "validation/sub_event_type/macro_f1")
    assert [m.step for m in history] == [1, 2]
    # mlflow-artifacts: means the client uploaded through the server, not to a path of its own.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    figures = [f.path for f in client.list_artifacts(run_id, "reports/figures")]
    assert "reports/figures/confusion_sub_event_type.png" in figures

    champion = client.get_model_version_by_alias("eventcoder", "champion")
    assert (champion.version, champion.run_id) == ("1", run_id)
    assert client.get_registered_model("eventcoder").aliases == {"champion": "1"}

    # The server really keeps runs and registry in PostgreSQL.
    engine = sqlalchemy.create_engine(team_server.database_uri)
    try:
        with engine.connect() as db:
            stored = db.execute(sqlalchemy.text("SELECT name FROM runs WHERE run_uuid = :id"), {"id": run_id})
            assert stored.scalar_one() == run.info.run_name
            aliases = db.execute(sqlalchemy.text("SELECT name, alias, version FROM registered_model_aliases"))
            assert aliases.all() == [("eventcoder", "champion", 1)]
    finally:
        engine.dispose()

    # The champion, served from the registry over HTTP, codes like the model on disk. The URI is set
    # only for this block: later tests in this process must not talk to a server that is gone.
    (tmp_path / "downloaded").mkdir()
    with _use_tracking_uri(team_server.url):
        served = mlflow.pyfunc.load_model("models:/eventcoder@champion", dst_path=str(tmp_path / "downloaded"))
        predictions = served.predict(pd.DataFrame({"text": TEXTS}))
    assert len(predictions) == 2
    local = Predictor.load(project / "model").predict(TEXTS)
    assert predictions["sub_event_type"].tolist() == [row["sub_event_type"] for row in local]

    # Every artifact landed in the server's artifact store, under the run's experiment.
    run_artifacts = team_server.artifacts / run.info.experiment_id / run_id / "artifacts"
    for name in ("reports/figures/confusion_sub_event_type.png", "model_files/labels.json", "misclassified.json"):
        assert (run_artifacts / name).is_file(), name
    assert list((team_server.artifacts / run.info.experiment_id / "models").glob("m-*/artifacts/MLmodel"))
    # ...and nowhere else: not in the project, the server's working directory or the repository.
    assert _local_stores(project) == set()
    assert _local_stores(team_server.workdir) == set()
    # The repository may hold local runs of its own (its mlruns/ is git-ignored), but not this one.
    assert not list(REPO.glob(f"ml*/*/{run_id}"))
