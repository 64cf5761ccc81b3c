"""Training under torchrun: two CPU processes (gloo), one MLflow run, one model."""

import os
import socket
import subprocess
import sys

import pytest
from conftest import corpus_rows, write_config, write_jsonl
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_ddp_training_logs_once_and_writes_one_model(tmp_path, tiny_encoder):
    rows = corpus_rows(limit_docs=30)
    docs = list(dict.fromkeys(r["doc_id"] for r in rows))
    write_jsonl(tmp_path / "raw" / "train.jsonl", [r for r in rows if r["doc_id"] not in docs[::5]])
    write_jsonl(tmp_path / "raw" / "test.jsonl", [r for r in rows if r["doc_id"] in docs[::5]])
    config = str(write_config(tmp_path, tiny_encoder, {"tracking.registered_model": None}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    python = sys.executable
    prepare = subprocess.run(
        [python, "-m", "eventcoder.cli", "prepare", "-c", config],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert prepare.returncode == 0, prepare.stderr
    result = subprocess.run(
        [
            python,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            "-m",
            "eventcoder.cli",
            "train",
            "-c",
            config,
            "train.num_threads=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    # Only rank 0 prints the summary line and logs.
    assert result.stdout.count("model: ") == 1

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2]
    assert (tmp_path / "model" / "heads.safetensors").is_file()
    assert (tmp_path / "model" / "mlflow_run_id").read_text() == runs[0].info.run_id
