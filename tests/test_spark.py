"""Spark batch coding gives what `eventcoder predict` gives, row for row, on a real local Spark."""

import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import corpus_rows

pytest.importorskip("pyspark")
if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs a Java runtime", allow_module_level=True)

from pyspark.sql import SparkSession

from eventcoder.batch_predict import PredictOptions, predict_file
from eventcoder.inference import Predictor
from eventcoder.model_source import resolve_model_dir
from eventcoder.spark import code_documents, code_sentences

MODEL = "models:/eventcoder@champion"
TASKS = ("sub_event_type", "actor1", "actor2")


@pytest.fixture(scope="module")
def spark() -> Iterator[SparkSession]:
    with pytest.MonkeyPatch.context() as env:
        # Workers must run this venv's Python, and nothing may bind or call beyond loopback.
        env.setenv("PYSPARK_PYTHON", sys.executable)
        env.setenv("SPARK_LOCAL_IP", "127.0.0.1")
        session = (
            SparkSession.builder.master("local[2]")
            .appName("eventcoder-tests")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "2")
            .getOrCreate()
        )
        yield session
        session.stop()


@pytest.fixture(scope="module")
def expected_predictor(registered_tiny_model: dict[str, Any]) -> Predictor:
    # fp32 on both sides: with `auto`, CPUs with fast bf16 autocast, and bf16 rounding may differ
    # between Spark's batches and predict's; the comparison should not depend on the CPU.
    model_dir = resolve_model_dir(MODEL, registered_tiny_model["tracking_uri"])
    return Predictor.load(model_dir, precision="fp32")


def _predict(predictor: Predictor, source: Path, **options: Any) -> list[dict[str, Any]]:
    """What `eventcoder predict --precision fp32` writes for `source`."""
    output = source.with_suffix(".coded.jsonl")
    predict_file(predictor, source, output, PredictOptions(progress=False, **options), MODEL)
    with output.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _sentence_key(row: dict[str, Any]) -> tuple[str, int]:
    return row["doc_id"], row["sentence_index"]


def _assert_same(spark_rows: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert len(spark_rows) == len(expected)
    for got, want in zip(spark_rows, expected, strict=True):
        assert list(got) == list(want)
        for column, value in want.items():
            if column.endswith("_score"):
                assert got[column] == pytest.approx(value, abs=1e-4), column
            else:
                assert got[column] == value, column


def test_sentences_match_eventcoder_predict(spark, registered_tiny_model, expected_predictor, tmp_path):
    rows = [{"id": i, **row} for i, row in enumerate(corpus_rows(limit_docs=10)[:50])]
    # `predict` rejects blank rows; Spark keeps them, uncoded.
    blank = [{**rows[0], "id": 1000, "text": "  "}, {**rows[0], "id": 1001, "text": None}]
    source = tmp_path / "sentences.parquet"
    pd.DataFrame(rows + blank).to_parquet(source)

    coded = code_sentences(
        spark.read.parquet(str(source)).repartition(3),
        MODEL,
        tracking_uri=registered_tiny_model["tracking_uri"],
        precision="fp32",
    )
    got = sorted((row.asDict() for row in coded.collect()), key=lambda row: row["id"])

    expected = _predict(expected_predictor, source)
    assert "country" in expected[0] and "sub_event_type_score" in expected[0]
    _assert_same(got[: len(rows)], expected)
    # Gold labels in the input are overwritten in place by predictions, as `predict` does.
    assert coded.columns.index("sub_event_type") == list(rows[0]).index("sub_event_type")
    for row in got[len(rows) :]:
        assert row["id"] in (1000, 1001) and row["country"] == rows[0]["country"]
        assert all(row[task] is None and row[f"{task}_score"] is None for task in TASKS)
        assert row["event_type"] is None


def test_articles_split_and_code_like_predict_documents(spark, registered_tiny_model, expected_predictor, tmp_path):
    articles: dict[str, dict[str, Any]] = {}
    for row in corpus_rows(limit_docs=6):
        article = articles.setdefault(row["doc_id"], {"doc_id": row["doc_id"], "country": row["country"], "text": ""})
        # Headlines on their own line, body sentences run together: the splitter has to work.
        article["text"] += row["text"] + ("\n" if row["is_headline"] else " ")
    source = tmp_path / "articles.parquet"
    pd.DataFrame(list(articles.values())).to_parquet(source)

    coded = code_documents(
        spark.read.parquet(str(source)), MODEL, tracking_uri=registered_tiny_model["tracking_uri"], precision="fp32"
    )
    got = sorted((row.asDict() for row in coded.collect()), key=_sentence_key)

    expected = sorted(_predict(expected_predictor, source, documents=True), key=_sentence_key)
    assert len(expected) > len(articles)
    _assert_same(got, expected)
    texts = {doc_id: article["text"] for doc_id, article in articles.items()}
    assert all(texts[row["doc_id"]][row["start"] : row["end"]] == row["text"] for row in got)
