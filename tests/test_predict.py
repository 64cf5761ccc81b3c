"""Batch prediction: formats, pass-through columns, documents, shards, rejects, resume."""

import dataclasses
import gzip
import json
import os

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from eventcoder import batch_predict
from eventcoder.batch_predict import PredictOptions, parse_shard, predict_file
from eventcoder.errors import ConfigError, WorkerError
from eventcoder.inference import Predictor, PredictorSpec
from eventcoder.model_dir import save_model_dir
from eventcoder.modeling import MultiTaskModel
from eventcoder.runtime import available_cores
from eventcoder.sentences import split_sentences

SENTENCES = [f"Gunmen attacked village number {i} overnight, officials said." for i in range(23)]
TASK_COLUMNS = [
    "sub_event_type",
    "sub_event_type_score",
    "event_type",
    "actor1",
    "actor1_score",
    "actor2",
    "actor2_score",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_encoder, acled_schema):
    torch.manual_seed(1)
    model = MultiTaskModel.from_encoder(str(tiny_encoder), acled_schema, "mean", 0.0)
    path = tmp_path_factory.mktemp("model")
    save_model_dir(path, model, AutoTokenizer.from_pretrained(tiny_encoder), {}, {}, max_length=32)
    return path


@pytest.fixture(scope="module")
def predictor(model_dir):
    return Predictor.load(model_dir, precision="fp32", batch_size=8)


def _read(path):
    if path.suffix == ".parquet":
        return pd.read_parquet(path).to_dict("records")
    if path.suffix == ".csv":
        return pd.read_csv(path).to_dict("records")
    with gzip.open(path, "rt") if path.suffix == ".gz" else path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _run(predictor, src, dst, **options):
    return predict_file(predictor, src, dst, PredictOptions(progress=False, **options), "test-model")


@pytest.mark.parametrize("out_suffix", [".jsonl", ".jsonl.gz", ".csv", ".parquet"])
@pytest.mark.parametrize("in_suffix", [".txt", ".jsonl", ".csv", ".parquet", ".jsonl.gz"])
def test_formats_keep_input_columns_and_add_every_task(tmp_path, predictor, in_suffix, out_suffix):
    frame = pd.DataFrame({"text": SENTENCES, "story": [f"s{i}" for i in range(len(SENTENCES))]})
    src = tmp_path / f"in{in_suffix}"
    if in_suffix == ".txt":
        src.write_text("\n".join(SENTENCES) + "\n")
    elif in_suffix == ".csv":
        frame.to_csv(src, index=False)
    elif in_suffix == ".parquet":
        frame.to_parquet(src)
    elif in_suffix == ".jsonl":
        frame.to_json(src, orient="records", lines=True)
    else:
        with gzip.open(src, "wt") as handle:
            handle.write(frame.to_json(orient="records", lines=True))
    dst = tmp_path / f"out{out_suffix}"
    report = _run(predictor, src, dst, chunk_rows=10)
    rows = _read(dst)
    assert report.rows_read == len(SENTENCES) == report.rows_written == len(rows)
    assert [r["text"] for r in rows] == SENTENCES  # order kept across chunks
    assert set(TASK_COLUMNS) <= set(rows[0])
    if in_suffix != ".txt":
        assert [r["story"] for r in rows] == list(frame["story"])
    assert not list(tmp_path.glob("*.parts")) and not list(tmp_path.glob(".*.tmp"))


def test_labels_match_the_in_memory_predictor(tmp_path, predictor):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES))
    _run(predictor, src, tmp_path / "out.jsonl", chunk_rows=7)
    expected = predictor.predict(SENTENCES)
    for row, want in zip(_read(tmp_path / "out.jsonl"), expected, strict=True):
        assert row["sub_event_type"] == want["sub_event_type"]
        assert row["actor1_score"] == pytest.approx(want["actor1_score"], abs=1e-5)


def test_bad_rows_are_rejected_with_row_numbers_and_counted(tmp_path, predictor):
    src = tmp_path / "in.jsonl"
    lines = [
        json.dumps({"text": "Police arrested five men."}),
        json.dumps({"text": ""}),
        json.dumps({"txt": "x"}),
        json.dumps({"text": 7}),
        "{broken",
        json.dumps({"text": None}),
        json.dumps({"text": "Rebels seized a town."}),
    ]
    src.write_text("\n".join(lines) + "\n")
    with src.open("ab") as handle:
        handle.write(b'{"text": "bad \xff"}\n')
    report = _run(predictor, src, tmp_path / "out.jsonl")
    assert report.rows_read == 8 and report.rows_coded == 2 and report.rows_rejected == 6
    rejects = {r["row"]: r["reason"] for r in _read(tmp_path / "out.jsonl.rejects.jsonl")}
    assert set(rejects) == {2, 3, 4, 5, 6, 8}
    assert rejects[3] == "missing column 'text'" and "undecodable" in rejects[8]


def test_long_text_is_truncated_and_counted(tmp_path, predictor):
    src = tmp_path / "in.txt"
    src.write_text("short one\n" + "word " * 50_000 + "\n")
    report = _run(predictor, src, tmp_path / "out.jsonl")
    assert report.texts_truncated == 1 and report.rows_written == 2


def test_documents_are_split_with_offsets(tmp_path, predictor):
    article = "Gunmen kill 12 in Niger\n\nGunmen killed 12 people on Tuesday. The U.S. embassy condemned it."
    src = tmp_path / "docs.jsonl"
    src.write_text(
        json.dumps({"doc_id": "n1", "text": article, "outlet": "wire"})
        + "\n"
        + json.dumps({"text": "One more. And two."})
        + "\n"
    )
    _run(predictor, src, tmp_path / "out.jsonl", documents=True)
    rows = _read(tmp_path / "out.jsonl")
    assert [(r["doc_id"], r["sentence_index"]) for r in rows] == [("n1", 0), ("n1", 1), ("n1", 2), ("2", 0), ("2", 1)]
    for row in rows[:3]:
        assert article[row["start"] : row["end"]] == row["text"] and row["outlet"] == "wire"
    assert rows[2]["text"] == "The U.S. embassy condemned it."


def test_sentence_splitter_handles_abbreviations_and_decimals():
    text = "Dr. Musa said 3.5 tonnes of arms were seized in Gen. Ali's district. Nobody was hurt."
    assert [s.text for s in split_sentences(text)] == [
        "Dr. Musa said 3.5 tonnes of arms were seized in Gen. Ali's district.",
        "Nobody was hurt.",
    ]


def test_shards_partition_the_input_exactly_once(tmp_path, predictor):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES))
    texts = []
    for i in range(3):
        _run(predictor, src, tmp_path / f"out{i}.jsonl", shard_index=i, shard_count=3)
        texts.extend(r["text"] for r in _read(tmp_path / f"out{i}.jsonl"))
    assert sorted(texts) == sorted(SENTENCES)
    assert parse_shard("2/3") == (2, 3)
    with pytest.raises(ConfigError):
        parse_shard("3/3")


def test_events_only_and_min_score_filter_and_count(tmp_path, predictor):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES))
    _run(predictor, src, tmp_path / "full.jsonl")
    full = _read(tmp_path / "full.jsonl")
    threshold = sorted(r["sub_event_type_score"] for r in full)[len(full) // 2]
    report = _run(predictor, src, tmp_path / "some.jsonl", min_score=threshold)
    kept = _read(tmp_path / "some.jsonl")
    assert all(r["sub_event_type_score"] >= threshold for r in kept)
    assert report.rows_written + report.rows_filtered == len(SENTENCES) and report.rows_filtered > 0
    _run(predictor, src, tmp_path / "events.jsonl", events_only=True)
    assert all(r["sub_event_type"] != "none" for r in _read(tmp_path / "events.jsonl"))


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path, predictor, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES))
    _run(predictor, src, tmp_path / "clean.jsonl", chunk_rows=5)

    original = batch_predict.ChunkCoder.code
    calls = {"n": 0}

    def crash_on_third_chunk(self, chunk, source):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return original(self, chunk, source)

    monkeypatch.setattr(batch_predict.ChunkCoder, "code", crash_on_third_chunk)
    with pytest.raises(KeyboardInterrupt):
        _run(predictor, src, tmp_path / "out.jsonl", chunk_rows=5)
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ConfigError, match="--resume"):
        _run(predictor, src, tmp_path / "out.jsonl", chunk_rows=5)
    with pytest.raises(ConfigError, match="chunk_rows"):
        _run(predictor, src, tmp_path / "out.jsonl", chunk_rows=6, resume=True)
    monkeypatch.setattr(batch_predict.ChunkCoder, "code", original)
    report = _run(predictor, src, tmp_path / "out.jsonl", chunk_rows=5, resume=True)
    assert report.rows_read == len(SENTENCES)
    assert _read(tmp_path / "out.jsonl") == _read(tmp_path / "clean.jsonl")


def test_worker_processes_write_what_one_process_writes(tmp_path, model_dir):
    src = tmp_path / "in.jsonl"
    texts = [{"text": t} for t in SENTENCES[:11]] + [{"text": ""}] + [{"text": t} for t in SENTENCES[11:]]
    src.write_text("\n".join(json.dumps(r) for r in texts) + "\n")
    spec = PredictorSpec(str(model_dir), {"precision": "fp32", "num_threads": 1})
    options = PredictOptions(progress=False, chunk_rows=4)
    alone = predict_file(spec, src, tmp_path / "one.jsonl", options, "test-model")
    pooled = predict_file(spec, src, tmp_path / "two.jsonl", options, "test-model", workers=2)
    assert _read(tmp_path / "two.jsonl") == _read(tmp_path / "one.jsonl")
    assert _read(tmp_path / "two.jsonl.rejects.jsonl") == [
        {"file": str(src), "row": 12, "reason": "empty or whitespace-only text"}
    ]
    assert (pooled.rows_read, pooled.rows_coded, pooled.rows_rejected) == (24, 23, 1)
    assert pooled.rows_read == alone.rows_read and pooled.rows_written == alone.rows_written
    with pytest.raises(ValueError, match="PredictorSpec"):
        predict_file(Predictor.load(model_dir), src, tmp_path / "x.jsonl", options, "test-model", workers=2)


@dataclasses.dataclass(frozen=True)
class _DyingWorkerSpec(PredictorSpec):
    """Spec whose workers die while loading, as an out-of-memory kill would end them."""

    def load(self) -> Predictor:
        os._exit(3)


def test_a_dead_worker_ends_the_run_in_one_line_and_leaves_the_parts_for_resume(tmp_path, model_dir):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES))
    options = PredictOptions(progress=False, chunk_rows=4)
    with pytest.raises(WorkerError, match=r"worker process died .* rerun with --resume"):
        predict_file(_DyingWorkerSpec(str(model_dir)), src, tmp_path / "out.jsonl", options, "test-model", workers=2)
    assert (tmp_path / "out.jsonl.parts" / "manifest.json").is_file() and not (tmp_path / "out.jsonl").exists()


def test_zero_workers_is_a_one_line_error(tmp_path, model_dir, capsys):
    from eventcoder.cli import main

    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES[:2]))
    args = ["--quiet", "predict", "-m", str(model_dir), "-i", str(src), "-o", str(tmp_path / "o.jsonl")]
    assert main([*args, "--workers", "0"]) == 2
    assert "--workers 0: need at least 1" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_auto_workers_only_for_large_cpu_inputs(tmp_path):
    from eventcoder import cli

    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("A clash.\n" * (2 * cli.ROWS_PER_WORKER))
    small.write_text("A clash.\n" * (cli.ROWS_PER_WORKER - 1))
    parse = cli.build_parser().parse_args
    common = ["predict", "-m", "m", "-o", "out.jsonl", "-i"]
    assert cli._auto_workers(parse([*common, str(big)])) == min(2, available_cores())
    assert cli._auto_workers(parse([*common, str(small)])) == 1
    assert cli._auto_workers(parse([*common, str(big), "--threads", "2"])) == 1
    assert cli._auto_workers(parse([*common, str(big), "--shard", "0/2"])) == 1


def test_row_count_is_read_once_per_file_version(tmp_path, monkeypatch):
    """`eventcoder predict` counts its input twice (worker count, progress bar): one read."""
    from eventcoder import tables

    source = tmp_path / "in.txt"
    source.write_text("A clash.\nA raid.\n")
    opened = []
    real_open = tables._open_binary
    monkeypatch.setattr(tables, "_open_binary", lambda path: opened.append(path) or real_open(path))
    assert tables.count_rows(source) == 2
    assert tables.count_rows(str(source)) == 2
    assert len(opened) == 1
    with source.open("a") as handle:  # a new version of the file is counted again
        handle.write("A shelling.\n")
    assert tables.count_rows(source) == 3
    assert len(opened) == 2


def test_rows_are_not_counted_without_a_progress_bar(tmp_path, predictor, monkeypatch):
    """Counting reads the whole input; a job with no progress bar (no terminal, --quiet) skips it."""
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES[:3]) + "\n")

    def no_count(path):
        raise AssertionError(f"counted {path}")

    monkeypatch.setattr(batch_predict, "count_rows", no_count)
    report = _run(predictor, src, tmp_path / "out.jsonl")
    assert report.rows_read == report.rows_coded == 3


def _int8_check(int8: float, passed: bool, activation_bits: int | None = None) -> dict:
    """An int8 quality-check record as training writes it, against an fp32 score of 0.8."""
    from eventcoder.inference import int8_activation_bits

    return {
        "activation_bits": activation_bits or int8_activation_bits(),
        "metric": "m",
        "split": "validation",
        "fp32": 0.8,
        "int8": int8,
        "delta": int8 - 0.8,
        "max_drop": 0.005,
        "passed": passed,
    }


def test_int8_is_refused_unless_the_model_passed_its_quality_check(tmp_path, model_dir, capsys):
    import shutil

    from eventcoder.cli import main
    from eventcoder.model_dir import update_metadata

    local = tmp_path / "model"
    shutil.copytree(model_dir, local)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(SENTENCES[:4]))
    args = [
        "--quiet",
        "predict",
        "--model",
        str(local),
        "--input",
        str(src),
        "--output",
        str(tmp_path / "o.jsonl"),
        "--int8",
    ]
    assert main(args) == 2
    assert "has no int8 quality check" in capsys.readouterr().err
    update_metadata(local, {"int8_check": _int8_check(int8=0.7, passed=False)})
    assert main(args) == 2
    assert "refused, m drops from 0.8000 (fp32) to 0.7000 (int8)" in capsys.readouterr().err
    # A check run on a CPU with the other activation width does not vouch for this one.
    other_bits = 15 - _int8_check(0.799, True)["activation_bits"]
    update_metadata(local, {"int8_check": _int8_check(int8=0.799, passed=True, activation_bits=other_bits)})
    assert main(args) == 2
    assert f"passed its int8 check with {other_bits}-bit activations" in capsys.readouterr().err
    update_metadata(local, {"int8_check": _int8_check(int8=0.799, passed=True)})
    assert main(args) == 0
    assert len(_read(tmp_path / "o.jsonl")) == 4


def test_int8_recipe_has_per_channel_weights_and_8_bit_activations_where_the_cpu_has_vnni(model_dir):
    from eventcoder.inference import int8_activation_bits, quantize_int8
    from eventcoder.model_dir import load_model_dir

    model = quantize_int8(load_model_dir(model_dir)[0])
    linear = model.encoder.encoder.layer[0].intermediate.dense
    weight = linear.weight()
    assert weight.q_per_channel_scales().numel() == weight.shape[0]
    assert not weight.q_per_channel_zero_points().any()  # symmetric: fbgemm stores it as affine with zero 0
    assert weight.int_repr().min() >= -127
    x = torch.randn(5, linear.in_features) * 3
    expected = {
        bits: torch.ops.quantized.linear_dynamic(x, linear._packed_params._packed_params, reduce_range=bits == 7)
        for bits in (7, 8)
    }
    assert not torch.equal(expected[7], expected[8])  # the two recipes differ on this input
    assert torch.equal(linear(x), expected[int8_activation_bits()])


def test_int8_probabilities_stay_close_to_fp32(model_dir):
    full = Predictor.load(model_dir, precision="fp32").probabilities(SENTENCES)
    int8 = Predictor.load(model_dir, quantize=True).probabilities(SENTENCES)
    for task in full:
        assert abs(full[task] - int8[task]).max() < 0.05


def test_a_folder_of_articles_becomes_sentence_rows_with_file_names_as_doc_ids(tmp_path, predictor):
    folder = tmp_path / "articles"
    (folder / "2024").mkdir(parents=True)
    (folder / "a.txt").write_text("Troops clashed with rebels. Two soldiers died.")
    (folder / "2024" / "b.txt").write_text("Protesters marched in the capital.")
    (folder / "notes.csv").write_text("ignored")
    (folder / "bad.txt").write_bytes(b"caf\xe9")
    report = _run(predictor, folder, tmp_path / "events.parquet", documents=True)
    rows = _read(tmp_path / "events.parquet")
    assert [(r["doc_id"], r["sentence_index"]) for r in rows] == [("2024/b.txt", 0), ("a.txt", 0), ("a.txt", 1)]
    assert report.rows_read == 3 and report.rows_rejected == 1
