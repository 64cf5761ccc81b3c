"""End-to-end: the real CLI, a real MLflow SQLite store and registry, real DVC in a real git repo."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import REPO, corpus_rows, write_config, write_jsonl
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [str(BIN / "eventcoder"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    if check and result.returncode != 0:
        raise AssertionError(f"eventcoder {' '.join(args)} failed:\n{result.stdout}\n{result.stderr[-3000:]}")
    return result


def _raw_data(directory: Path, docs: int = 40) -> None:
    rows = corpus_rows(limit_docs=docs)
    test_docs = set(list(dict.fromkeys(r["doc_id"] for r in rows))[::5])
    write_jsonl(directory / "raw" / "train.jsonl", [r for r in rows if r["doc_id"] not in test_docs])
    write_jsonl(directory / "raw" / "test.jsonl", [r for r in rows if r["doc_id"] in test_docs])


def test_cli_pipeline_logs_registers_and_serves_the_champion(tmp_path, tiny_encoder):
    _raw_data(tmp_path)
    config = str(write_config(tmp_path, tiny_encoder))
    assert "kept" in cli("prepare", "-c", config, cwd=tmp_path).stdout
    cli("train", "-c", config, cwd=tmp_path)
    evaluated = cli("evaluate", "-c", config, cwd=tmp_path)
    assert "registered version 1 as @champion" in evaluated.stdout

    model_dir = tmp_path / "model"
    assert json.loads((model_dir / "metrics.json").read_text())["main_metric"] == "sub_event_type/macro_f1"
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert 0 <= metrics["sub_event_type/macro_f1"] <= 1 and "event_type/macro_f1" in metrics

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run = client.get_run((model_dir / "mlflow_run_id").read_text().strip())
    assert run.data.params["train.batch_size"] == "16"
    assert "test/sub_event_type/macro_f1" in run.data.metrics and "data_hash" in run.data.tags
    history = client.get_metric_history(run.info.run_id, "validation/sub_event_type/macro_f1")
    assert [m.step for m in history] == [1, 2]

    texts = [
        "Iraqi airstrikes in northern Ramadi killed 11 people, including three IS fighters",
        "Thousands marched peacefully through Nairobi on Tuesday.",
    ]
    served = mlflow.pyfunc.load_model("models:/eventcoder@champion").predict(pd.DataFrame({"text": texts}))
    assert list(served.columns[:2]) == ["sub_event_type", "sub_event_type_score"]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    cli(
        "predict",
        "--model",
        "models:/eventcoder@champion",
        "--input",
        "in.txt",
        "--output",
        "out.jsonl",
        "--tracking-uri",
        uri,
        cwd=tmp_path,
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["sub_event_type"] for r in rows] == served["sub_event_type"].tolist()
    assert [r["actor1"] for r in rows] == served["actor1"].tolist()

    # A second model: champion moves only if it scores higher on the same test data.
    cli("train", "-c", config, "seed=4", "train.learning_rate=1e-6", cwd=tmp_path)
    second = cli("evaluate", "-c", config, cwd=tmp_path)
    v1 = float(client.get_model_version("eventcoder", "1").tags["main_metric_value"])
    v2 = float(client.get_model_version("eventcoder", "2").tags["main_metric_value"])
    expected = "champion" if v2 > v1 else "challenger"
    assert f"registered version 2 as @{expected}" in second.stdout
    assert str(client.get_model_version_by_alias("eventcoder", expected).version) == "2"

    cli("promote", "-c", config, "--version", "1", cwd=tmp_path)
    assert str(client.get_model_version_by_alias("eventcoder", "champion").version) == "1"

    table = cli("compare", "-c", config, cwd=tmp_path).stdout.splitlines()
    header, body = table[0].split(), table[2:]
    assert {"seed", "train.learning_rate", "test/sub_event_type/macro_f1"} <= set(header)
    assert len(body) == 2 and any("champion (v1)" in line for line in body)
    scores = [float(line.split()[header.index("test/sub_event_type/macro_f1")]) for line in body]
    assert scores == sorted(scores, reverse=True)


def test_search_logs_each_trial_as_a_nested_run(tmp_path, tiny_encoder):
    _raw_data(tmp_path, docs=25)
    config = str(write_config(tmp_path, tiny_encoder, {"tracking.registered_model": None}))
    cli("prepare", "-c", config, cwd=tmp_path)
    out = cli("search", "-c", config, "search.trials=2", "train.epochs=1", cwd=tmp_path).stdout
    assert out.startswith("best trial ")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    best_value = parents[0].data.metrics["best/validation/sub_event_type/macro_f1"]
    assert best_value == max(c.data.metrics["best/validation/sub_event_type/macro_f1"] for c in children)
    assert parents[0].data.tags["best_run_id"] in {c.info.run_id for c in children}


def test_resume_continues_the_same_run_from_the_last_epoch(tmp_path, tiny_encoder):
    _raw_data(tmp_path, docs=25)
    config = str(write_config(tmp_path, tiny_encoder, {"tracking.registered_model": None}))
    cli("prepare", "-c", config, cwd=tmp_path)
    cli("train", "-c", config, "train.epochs=1", cwd=tmp_path)
    run_id = (tmp_path / "model" / "mlflow_run_id").read_text()
    resumed = cli("train", "-c", config, "train.epochs=2", "--resume", cwd=tmp_path)
    assert "resumed from" in resumed.stderr and "after epoch 1" in resumed.stderr
    assert (tmp_path / "model" / "mlflow_run_id").read_text() == run_id
    history = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]


def test_unreachable_tracking_server_fails_before_training(tmp_path, tiny_encoder):
    _raw_data(tmp_path, docs=10)
    config = str(write_config(tmp_path, tiny_encoder, {"tracking.tracking_uri": "http://127.0.0.1:9"}))
    cli("prepare", "-c", config, cwd=tmp_path)
    result = cli("train", "-c", config, cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "MLflow tracking server http://127.0.0.1:9 is unreachable" in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_bad_config_is_one_line_error(tmp_path, tiny_encoder):
    config = str(write_config(tmp_path, tiny_encoder))
    result = cli("train", "-c", config, "train.batch_sise=8", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"eventcoder train: error: {config} + overrides: train.batch_sise: unknown key"
    ]


def test_default_encoder_trains_a_few_steps(tmp_path):
    _raw_data(tmp_path, docs=12)
    config = str(
        write_config(tmp_path, "default", {"train.max_steps": 3, "train.epochs": 1, "tracking.registered_model": None})
    )
    cli("prepare", "-c", config, cwd=tmp_path)
    out = cli("train", "-c", config, cwd=tmp_path).stdout
    assert "best sub_event_type/macro_f1=" in out
    encoder_config = json.loads((tmp_path / "model" / "encoder" / "config.json").read_text())
    assert encoder_config["num_hidden_layers"] == 6 and encoder_config["hidden_size"] == 384


def test_dvc_repro_and_experiments_in_a_fresh_git_repo(tmp_path, tiny_encoder):
    repo = tmp_path / "repo"
    repo.mkdir()
    # .gitignore matters: `dvc exp run --queue` stashes untracked files, and a stashed (deleted
    # and restored) mlflow.db leaves every open reader, such as a running MLflow UI, on a dead file.
    for name in ("dvc.yaml", "params.yaml", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    shutil.copytree(REPO / "configs", repo / "configs")
    shutil.copytree(REPO / "eventcoder", repo / "eventcoder", ignore=shutil.ignore_patterns("__pycache__"))
    rows = corpus_rows(limit_docs=30)
    docs = list(dict.fromkeys(r["doc_id"] for r in rows))
    write_jsonl(repo / "data" / "raw" / "train" / "part.jsonl", [r for r in rows if r["doc_id"] not in docs[::5]])
    write_jsonl(repo / "data" / "raw" / "heldout.jsonl", [r for r in rows if r["doc_id"] in docs[::5]])
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["model"].update(encoder=str(tiny_encoder), max_length=48)
    params["train"].update(epochs=1, batch_size=16, learning_rate=1e-3, progress=False)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.org",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.org",
    }
    env.pop("MLFLOW_TRACKING_URI", None)

    def run(*args: str) -> str:
        result = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{args}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result.stdout

    run("git", "init", "-q")
    run(str(BIN / "dvc"), "init", "-q")
    run("git", "add", "-A")
    run("git", "commit", "-qm", "init")
    run(str(BIN / "dvc"), "repro")
    assert (repo / "models" / "eventcoder" / "heads.safetensors").is_file()
    metrics = json.loads(run(str(BIN / "dvc"), "metrics", "show", "--json"))
    shown = json.dumps(metrics)
    assert "sub_event_type/macro_f1" in shown and "rows_read" in shown
    plots = run(str(BIN / "dvc"), "plots", "show", "--json")
    assert "confusion_sub_event_type.json" in plots
    assert "up to date" in run(str(BIN / "dvc"), "status") or "Data and pipelines are up to date" in run(
        str(BIN / "dvc"), "status"
    )

    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")
    run(str(BIN / "dvc"), "exp", "run", "-S", "train.learning_rate=0.002")
    experiments = run(str(BIN / "dvc"), "exp", "show", "--json")
    assert "0.002" in experiments
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("eventcoder").experiment_id])
    assert sorted(r.data.params["train.learning_rate"] for r in runs) == ["0.001", "0.002"]

    # A queued grid runs each experiment in a temporary copy of the repo; its runs must still
    # reach the project's MLflow store (eventcoder follows DVC_ROOT back to the project).
    run(str(BIN / "dvc"), "exp", "run", "--queue", "-S", "train.learning_rate=0.003,0.004")
    try:
        run(str(BIN / "dvc"), "queue", "start", "--jobs", "1")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            status = run(str(BIN / "dvc"), "queue", "status")
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(3)
        assert "Failed" not in status and "Queued" not in status and "Running" not in status, status
    finally:
        subprocess.run([str(BIN / "dvc"), "queue", "stop"], cwd=repo, env=env, capture_output=True, timeout=120)
    experiments = run(str(BIN / "dvc"), "exp", "show", "--json")
    assert "0.003" in experiments and "0.004" in experiments
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("eventcoder").experiment_id])
    logged = sorted(r.data.params["train.learning_rate"] for r in runs)
    assert logged == ["0.001", "0.002", "0.003", "0.004"], run(str(BIN / "dvc"), "queue", "status")
    for queued in (r for r in runs if r.data.params["train.learning_rate"] in ("0.003", "0.004")):
        artifacts = {a.path for a in client.list_artifacts(queued.info.run_id)}
        assert artifacts, f"queued run {queued.info.run_id} has no artifacts in the project store"
