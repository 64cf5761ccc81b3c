"""`mlflow models serve` on the registered champion answers like `Predictor.predict`."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventcoder.inference import Predictor
from eventcoder.model_source import resolve_model_dir

BIN = Path(sys.executable).parent
MODEL = "models:/eventcoder@champion"
TASKS = ("sub_event_type", "actor1", "actor2")
TEXTS = [
    "Iraqi airstrikes in northern Ramadi killed 11 people, including three IS fighters.",
    "Thousands marched peacefully through Nairobi on Tuesday.",
    "Police arrested four opposition leaders in Harare overnight.",
]
# Importing MLflow, torch and the model in the server takes a while on a small, busy machine.
STARTUP_SECONDS = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server(registered_tiny_model: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    # The server execs `uvicorn` by name, so this venv's bin must come first on PATH.
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": registered_tiny_model["tracking_uri"],
    }
    command = [str(BIN / "mlflow"), "models", "serve", "-m", MODEL, "--env-manager", "local"]
    with log_path.open("wb") as log:
        # Its own session: the server forks workers, and teardown must stop all of them.
        process = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping after {STARTUP_SECONDS}s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def expected(registered_tiny_model: dict[str, Any]) -> list[dict[str, Any]]:
    # The same registered version the server loads, in the same one-batch call.
    predictor = Predictor.load(resolve_model_dir(MODEL, registered_tiny_model["tracking_uri"]))
    return predictor.predict(TEXTS)


def test_invocations_return_every_task_like_predictor(server, expected):
    answer = _post(
        f"{server}/invocations", {"dataframe_split": {"columns": ["text"], "data": [[text] for text in TEXTS]}}
    )
    predictions = answer["predictions"]
    assert len(predictions) == len(TEXTS)
    for got, want in zip(predictions, expected, strict=True):
        assert set(got) == set(want) == {*TASKS, *(f"{task}_score" for task in TASKS), "event_type"}
        for task in TASKS:
            assert got[task] == want[task]
            assert got[f"{task}_score"] == pytest.approx(want[f"{task}_score"], abs=1e-4)
        assert got["event_type"] == want["event_type"]


def test_all_scores_param_adds_every_label_probability(server, expected):
    answer = _post(
        f"{server}/invocations",
        {"dataframe_split": {"columns": ["text"], "data": [[TEXTS[0]]]}, "params": {"all_scores": True}},
    )
    (row,) = answer["predictions"]
    scores = row["sub_event_type_scores"]
    assert scores[expected[0]["sub_event_type"]] == pytest.approx(expected[0]["sub_event_type_score"], abs=1e-4)
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-3)
