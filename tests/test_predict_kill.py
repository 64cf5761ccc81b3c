"""A real `eventcoder predict` process killed mid-run resumes to exactly the clean output."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoTokenizer

from eventcoder.model_dir import save_model_dir
from eventcoder.modeling import MultiTaskModel

pytestmark = pytest.mark.e2e


def test_sigkill_then_resume_matches_a_clean_run(tmp_path, tiny_encoder, acled_schema):
    torch.manual_seed(2)
    model = MultiTaskModel.from_encoder(str(tiny_encoder), acled_schema, "mean", 0.0)
    save_model_dir(tmp_path / "model", model, AutoTokenizer.from_pretrained(tiny_encoder), {}, {}, max_length=32)
    source = tmp_path / "in.jsonl"
    with source.open("w") as handle:
        for i in range(6000):
            handle.write(
                json.dumps({"id": i, "text": f"Report {i}: gunmen attacked a convoy near town {i % 97}."}) + "\n"
            )

    def command(output: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "eventcoder.cli",
            "--quiet",
            "predict",
            "--model",
            str(tmp_path / "model"),
            "--input",
            str(source),
            "--output",
            str(tmp_path / output),
            "--chunk-rows",
            "200",
            "--threads",
            "1",
            *extra,
        ]

    clean = subprocess.run(command("clean.jsonl"), capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr

    process = subprocess.Popen(
        command("out.jsonl"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.monotonic() + 300
    while len(list(parts.glob("part-*.report.json"))) < 5:
        assert process.poll() is None, "predict finished before it could be killed; use a bigger input"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert not (tmp_path / "out.jsonl").exists(), "a killed run must not leave a file that looks complete"
    done_before = len(list(parts.glob("part-*.report.json")))
    assert 5 <= done_before < 30

    resumed = subprocess.run(command("out.jsonl", "--resume"), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "read 6000 rows: coded 6000, rejected 0; wrote 6000 rows" in resumed.stdout
    assert (tmp_path / "out.jsonl").read_text() == (tmp_path / "clean.jsonl").read_text()
    assert not parts.exists()
