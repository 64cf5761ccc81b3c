"""Code Spark DataFrames of sentences or articles with a registered eventcoder model.

    coded = code_sentences(spark.read.parquet("sentences.parquet"), "models:/eventcoder@champion")
    events = code_documents(spark.read.parquet("articles.parquet"), "models:/eventcoder@champion")

The output has the columns `eventcoder predict` writes: the input's columns, then for each task
its label and `<task>_score`, then the derived tasks (`event_type`). Articles become one row per
sentence with `doc_id, sentence_index, start, end` first, split exactly as `predict --documents`.

Why an own pandas UDF and not `mlflow.pyfunc.spark_udf(spark, uri, result_type=...)`: both end
in the same `Predictor`, but

* in local mode `spark_udf` loads the model again at the start of every task (on clusters it
  caches per worker). Here the driver downloads the model once, ships it with `addFile`, and
  each Python worker loads it once and keeps it across tasks. On local[2], 2,400 sentences and
  a MiniLM-sized model: as fast at 4 partitions, about 30% faster at 32 (docs/spark.md).
* its `result_type` has to be spelled out and kept in step with the model by hand; here it
  follows the model's own label schema (multi-label tasks become array columns).
* the pyfunc codes null or blank text as "" and returns a label for it; `predict` rejects such
  rows, and here they keep null labels.

Threads need no handling: Spark sets OMP_NUM_THREADS to `spark.task.cpus` in each Python
worker, and torch follows it, so concurrent tasks do not oversubscribe the cores.
"""

import atexit
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from pyspark import SparkFiles
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, DataType, DoubleType, IntegerType, StringType, StructField, StructType

from eventcoder.config import default_tracking_uri
from eventcoder.schema import LabelSchema, load_schema
from eventcoder.sentences import split_sentences

# torch, transformers and MLflow are imported where they are used: executors import this module
# to run the sentence splitter too, and that Python worker should not pay seconds to load them.
if TYPE_CHECKING:
    from eventcoder.inference import Predictor

SENTENCE_COLUMNS = ("doc_id", "sentence_index", "start", "end")
_SENTENCES = ArrayType(
    StructType(
        [StructField("start", IntegerType()), StructField("end", IntegerType()), StructField("text", StringType())]
    )
)

# The predictor last used in this Python worker, keyed by (shipped model, batch size, precision).
# One slot only: a session that codes with several models must not keep each one in every worker.
_LOADED: dict[tuple[str, int, str], "Predictor"] = {}


def _output_type(schema: LabelSchema) -> StructType:
    """The coded columns, in the order `Predictor.label_rows` produces them."""
    fields = []
    for task in schema.tasks:
        label: DataType = StringType()
        score: DataType = DoubleType()
        if task.kind == "multi_label":
            label, score = ArrayType(StringType()), ArrayType(DoubleType())
        fields += [StructField(task.name, label), StructField(f"{task.name}_score", score)]
    fields += [StructField(derived.name, StringType()) for derived in schema.derived]
    return StructType(fields)


def _ship_model(spark: SparkSession, model_uri: str, tracking_uri: str | None = None) -> tuple[str, LabelSchema]:
    """Download the model on the driver and add it to the job's files; return its file name and schema.

    `model_uri` is a models:/ or runs:/ URI or a local model directory. The copy under a fresh
    name lets two models (or two versions behind one alias) be shipped in one session:
    `addFile` refuses a second, different path under a name it has seen.
    """
    from eventcoder.model_source import resolve_model_dir

    source = resolve_model_dir(model_uri, default_tracking_uri(tracking_uri))
    staging = Path(tempfile.mkdtemp(prefix="eventcoder-spark-"))
    atexit.register(shutil.rmtree, staging, ignore_errors=True)
    shipped = staging / f"model-{uuid.uuid4().hex}"
    shutil.copytree(source, shipped)
    spark.sparkContext.addFile(str(shipped), recursive=True)
    return shipped.name, load_schema(shipped / "schema.yaml")


def _predictor(name: str, batch_size: int, precision: str) -> "Predictor":
    key = (name, batch_size, precision)
    if key not in _LOADED:
        import transformers

        from eventcoder.inference import Predictor
        from eventcoder.runtime import keep_freed_memory

        keep_freed_memory()  # as in `eventcoder predict`: batch buffers are reused, not faulted in again
        # Executor logs get no load progress bars or the expected "pooler weights missing" report.
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        _LOADED.clear()
        _LOADED[key] = Predictor.load(SparkFiles.get(name), precision, batch_size)
    return _LOADED[key]


def _coder_column(text: Column, name: str, schema: LabelSchema, batch_size: int, precision: str) -> Column:
    """A struct column of coded fields for a shipped model (see `_ship_model`)."""
    result = _output_type(schema)

    @F.pandas_udf(result)
    def code(texts: pd.Series) -> pd.DataFrame:
        from eventcoder.batch_predict import MAX_CHARS_PER_TOKEN

        predictor = _predictor(name, batch_size, precision)
        max_chars = predictor.max_length * MAX_CHARS_PER_TOKEN
        # `predict` rejects null and blank rows; a UDF must return a row for each, so they get nulls.
        keep = [isinstance(text, str) and bool(text.strip()) for text in texts]
        coded = iter(predictor.predict([text[:max_chars] for text, ok in zip(texts, keep, strict=True) if ok]))
        return pd.DataFrame([next(coded) if ok else {} for ok in keep], columns=result.names)

    return code(text)


def code_sentences(
    df: DataFrame,
    model_uri: str,
    text_column: str = "text",
    tracking_uri: str | None = None,
    batch_size: int = 128,
    precision: str = "auto",
) -> DataFrame:
    """Add every task's label and score to each row; the other columns pass through.

    An input column named like an output column (e.g. a gold `sub_event_type`) is replaced in
    place, as `eventcoder predict` does. Rows with null or blank text keep null labels.
    """
    name, schema = _ship_model(df.sparkSession, model_uri, tracking_uri)
    return _with_coded(df, _coder_column(F.col(text_column), name, schema, batch_size, precision))


def _with_coded(df: DataFrame, coded: Column) -> DataFrame:
    # One struct column, expanded in a second projection: the plan then runs the model once per
    # row, where `udf(text).field` per output column would run it once per field.
    df = df.withColumn("__coded", coded)
    fields = df.schema["__coded"].dataType.names
    kept = [F.col(f"__coded.{c}").alias(c) if c in fields else F.col(c) for c in df.columns if c != "__coded"]
    added = [F.col(f"__coded.{c}").alias(c) for c in fields if c not in df.columns]
    return df.select(*kept, *added)


@F.udf(_SENTENCES, useArrow=True)
def _split(document: str | None) -> list[tuple[int, int, str]]:
    if document is None or not document.strip():
        return []
    return [(s.start, s.end, s.text) for s in split_sentences(document)]


def split_documents(df: DataFrame, text_column: str = "text", doc_id_column: str = "doc_id") -> DataFrame:
    """One row per sentence: doc_id, sentence_index, start, end, the other columns, then the sentence text.

    Character offsets index the article text. Articles with no sentence (null or blank text)
    yield no rows, as in `eventcoder predict --documents`.
    """
    if doc_id_column not in df.columns:
        # `predict` numbers rows instead; a DataFrame has no stable row number to fall back on.
        raise ValueError(f"no {doc_id_column!r} column to identify the articles by (set doc_id_column)")
    passthrough = [c for c in df.columns if c not in (text_column, doc_id_column, *SENTENCE_COLUMNS)]
    exploded = df.select("*", F.posexplode(_split(F.col(text_column))).alias("__index", "__sentence"))
    return exploded.select(
        F.col(doc_id_column).alias("doc_id"),
        F.col("__index").alias("sentence_index"),
        F.col("__sentence.start").alias("start"),
        F.col("__sentence.end").alias("end"),
        *passthrough,
        F.col("__sentence.text").alias(text_column),
    )


def code_documents(
    df: DataFrame,
    model_uri: str,
    text_column: str = "text",
    doc_id_column: str = "doc_id",
    tracking_uri: str | None = None,
    batch_size: int = 128,
    precision: str = "auto",
) -> DataFrame:
    """Split articles into sentences (see `split_documents`) and code each sentence."""
    sentences = split_documents(df, text_column, doc_id_column)
    return code_sentences(sentences, model_uri, text_column, tracking_uri, batch_size, precision)
