"""MLflow helpers that must hold under concurrent runs."""

import mlflow
from mlflow.tracking import MlflowClient

from eventcoder import tracking


def test_use_experiment_joins_an_experiment_created_by_a_concurrent_run(tmp_path, monkeypatch):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    existing = MlflowClient().create_experiment("shared")
    real_lookup = MlflowClient.get_experiment_by_name
    calls = {"n": 0}

    def stale_first_lookup(self, name):
        # The first lookup happens before the other run's create lands: it sees nothing.
        calls["n"] += 1
        return None if calls["n"] == 1 else real_lookup(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", stale_first_lookup)
    assert tracking.use_experiment("shared") == existing
    with mlflow.start_run() as run:
        assert run.info.experiment_id == existing
