"""Readers, validation, rejects and leakage-safe splits."""

import gzip
import json

import pandas as pd
import pytest
from conftest import write_jsonl

from eventcoder.config import load_config
from eventcoder.data.prepare import prepare
from eventcoder.data.split import assign_splits, group_key
from eventcoder.errors import DataError
from eventcoder.schema import schema_from_dict

GOOD = [
    {
        "doc_id": "d1",
        "text": "Troops clashed with rebels near the border.",
        "sub_event_type": "Armed clash",
        "actor1": "State forces",
        "actor2": "Rebel groups",
    },
    {
        "doc_id": "d1",
        "text": "The region has been unstable for years.",
        "sub_event_type": "none",
        "actor1": "none",
        "actor2": "none",
    },
    {
        "doc_id": "d2",
        "text": "Hundreds marched in the capital.",
        "sub_event_type": "Peaceful protest",
        "actor1": "Protesters",
        "actor2": "none",
    },
]


def _config(tmp_path, train_files, **data):
    text = {
        "schema": "configs/schemas/acled.yaml",
        "data": {
            "train_files": [str(p) for p in train_files],
            "validation_fraction": 0.0,
            "prepared_dir": str(tmp_path / "prepared"),
            **data,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps(text))
    return load_config([path])


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    from conftest import REPO

    monkeypatch.chdir(REPO)


def _prepared(tmp_path, name):
    with (tmp_path / "prepared" / name).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".csv", ".tsv", ".csv.gz", ".parquet", "hf"])
def test_every_format_reads_the_same_rows(tmp_path, acled_schema, suffix):
    frame = pd.DataFrame(GOOD)
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, GOOD)
    elif suffix == ".jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in GOOD)
    elif suffix.startswith(".csv") or suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        import datasets

        datasets.Dataset.from_pandas(frame).save_to_disk(str(path))
    report = prepare(_config(tmp_path, [path]), acled_schema)
    assert report["rows_read"] == 3 and report["rows_kept"] == 3 and report["rows_rejected"] == 0
    assert sorted(r["text"] for r in _prepared(tmp_path, "train.jsonl")) == sorted(r["text"] for r in GOOD)


def test_bad_rows_go_to_rejects_with_row_numbers(tmp_path, acled_schema):
    rows = [
        *GOOD,
        {"doc_id": "d3", "text": "   ", "sub_event_type": "none", "actor1": "none", "actor2": "none"},
        {
            "doc_id": "d3",
            "text": "Police fired tear gas.",
            "sub_event_type": "Tear gas",
            "actor1": "none",
            "actor2": "none",
        },
        {
            "doc_id": "d3",
            "text": "Hundreds marched in the capital.",
            "sub_event_type": "Peaceful protest",
            "actor1": "Protesters",
            "actor2": "none",
        },
        {"doc_id": "d4", "text": None, "sub_event_type": "none", "actor1": "none", "actor2": "none"},
        {"doc_id": "d4", "text": "A sentence with no actor2 label.", "sub_event_type": "none", "actor1": "none"},
        {"doc_id": "d4", "text": 42, "sub_event_type": "none", "actor1": "none", "actor2": "none"},
    ]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    with path.open("ab") as handle:
        handle.write(b'{"doc_id": "d5", "text": "caf\xe9 bombing", "sub_event_type": "none"}\n')
        handle.write(b"{not json}\n")
    report = prepare(_config(tmp_path, [path]), acled_schema)
    assert report["rows_read"] == 11
    assert report["rows_kept"] == 3
    assert report["rows_read"] == report["rows_kept"] + report["rows_rejected"]
    rejects = {r["row"]: r["reason"] for r in _prepared(tmp_path, "rejects.jsonl")}
    assert rejects[4] == "empty or whitespace-only text"
    assert "unknown label 'Tear gas'" in rejects[5]
    assert rejects[6].startswith("duplicate text (first seen at")
    assert "missing text" in rejects[7]
    assert "missing label in column 'actor2'" in rejects[8]
    assert "not a string" in rejects[9]
    assert "undecodable bytes" in rejects[10]
    assert "invalid JSON" in rejects[11]


def test_undecodable_csv_cell_rejects_only_its_row(tmp_path, acled_schema):
    path = tmp_path / "raw.csv"
    pd.DataFrame(GOOD).to_csv(path, index=False)
    with path.open("ab") as handle:
        handle.write(b"d9,Bad \xff byte here,none,none,none\n")
    report = prepare(_config(tmp_path, [path]), acled_schema)
    assert report["rows_kept"] == 3 and report["rows_rejected"] == 1
    assert _prepared(tmp_path, "rejects.jsonl")[0]["row"] == 4


def test_missing_column_is_one_clear_error(tmp_path, acled_schema):
    path = write_jsonl(tmp_path / "raw.jsonl", [{k: v for k, v in r.items() if k != "actor2"} for r in GOOD])
    with pytest.raises(DataError, match=r"raw\.jsonl: missing column\(s\) \['actor2'\]"):
        prepare(_config(tmp_path, [path]), acled_schema)


def test_column_mapping_and_label_map(tmp_path, acled_schema):
    rows = [
        {
            "id": r["doc_id"],
            "sentence": r["text"],
            "event": r["sub_event_type"].upper(),
            "a1": r["actor1"],
            "a2": r["actor2"],
        }
        for r in GOOD
    ]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    label_map = {
        "sub_event_type": {"ARMED CLASH": "Armed clash", "NONE": "none", "PEACEFUL PROTEST": "Peaceful protest"}
    }
    config = _config(
        tmp_path,
        [path],
        text_column="sentence",
        doc_id_column="id",
        label_columns={"sub_event_type": "event", "actor1": "a1", "actor2": "a2"},
        label_map=label_map,
    )
    report = prepare(config, acled_schema)
    assert report["rows_kept"] == 3
    assert {r["sub_event_type"] for r in _prepared(tmp_path, "train.jsonl")} == {
        "Armed clash",
        "none",
        "Peaceful protest",
    }


def test_multi_label_list_column_and_indicator_columns(tmp_path):
    schema = schema_from_dict(
        {
            "name": "topics",
            "main_task": "topic",
            "tasks": [{"name": "topic", "kind": "multi_label", "labels": ["violence", "protest", "politics"]}],
        }
    )
    as_list = write_jsonl(
        tmp_path / "list.jsonl",
        [
            {"text": "Riot police clashed with marchers.", "topic": ["violence", "protest"]},
            {"text": "Parliament passed the budget.", "topic": "politics"},
            {"text": "Bad label here.", "topic": ["weather"]},
        ],
    )
    report = prepare(_config(tmp_path, [as_list], doc_id_column=None), schema)
    assert report["rows_kept"] == 2 and report["rows_rejected"] == 1
    kept = {r["text"]: r["topic"] for r in _prepared(tmp_path, "train.jsonl")}
    assert kept["Riot police clashed with marchers."] == ["violence", "protest"]

    indicators = tmp_path / "flags.csv"
    pd.DataFrame(
        [
            {"text": "Riot police clashed.", "v": 1, "p": 1, "g": 0},
            {"text": "Cabinet reshuffle.", "v": 0, "p": 0, "g": 1},
        ]
    ).to_csv(indicators, index=False)
    config = _config(
        tmp_path,
        [indicators],
        doc_id_column=None,
        label_columns={"topic": {"violence": "v", "protest": "p", "politics": "g"}},
    )
    prepare(config, schema)
    kept = {r["text"]: r["topic"] for r in _prepared(tmp_path, "train.jsonl")}
    assert kept == {"Riot police clashed.": ["violence", "protest"], "Cabinet reshuffle.": ["politics"]}


def _synthetic_examples(n_docs=200):
    labels = ["common"] * 8 + ["rare"]
    examples = []
    for d in range(n_docs):
        for s in range(3):
            examples.append(
                {
                    "doc_id": f"doc{d}",
                    "source": f"f:{d * 3 + s}",
                    "t": labels[(d + s) % len(labels)] if d % 20 else "rare",
                }
            )
    return examples


def test_split_keeps_articles_whole_and_is_deterministic():
    first, second = _synthetic_examples(), _synthetic_examples()
    assign_splits(first, "t", 0.2, 0.1, seed=5)
    assign_splits(second, "t", 0.2, 0.1, seed=5)
    assert [e["split"] for e in first] == [e["split"] for e in second]
    splits_of_doc = {}
    for example in first:
        splits_of_doc.setdefault(group_key(example), set()).add(example["split"])
    assert all(len(s) == 1 for s in splits_of_doc.values())
    counts = {s: sum(e["split"] == s for e in first) for s in ("train", "validation", "test")}
    assert 0.15 < counts["validation"] / len(first) < 0.25 and 0.05 < counts["test"] / len(first) < 0.15
    other = _synthetic_examples()
    assign_splits(other, "t", 0.2, 0.1, seed=6)
    assert [e["split"] for e in other] != [e["split"] for e in first]


def test_split_is_stratified_so_rare_labels_reach_validation():
    examples = [{"doc_id": f"d{i}", "source": str(i), "t": "rare" if i < 10 else "common"} for i in range(100)]
    assign_splits(examples, "t", 0.2, 0.0, seed=1)
    rare_validation = sum(e["split"] == "validation" for e in examples if e["t"] == "rare")
    assert rare_validation == 2


def test_split_column_is_honoured_and_leakage_is_refused(tmp_path, acled_schema):
    rows = [dict(r, split=s) for r, s in zip(GOOD, ["train", "train", "validation"], strict=True)]
    path = write_jsonl(tmp_path / "raw.jsonl", rows)
    report = prepare(_config(tmp_path, [path], split_column="split"), acled_schema)
    assert report["split_rows"] == {"train": 2, "validation": 1, "test": 0}
    leaky = [dict(r, split=s) for r, s in zip(GOOD, ["train", "test", "validation"], strict=True)]
    path = write_jsonl(tmp_path / "leaky.jsonl", leaky)
    with pytest.raises(DataError, match="article 'd1' appears in both"):
        prepare(_config(tmp_path, [path], split_column="split"), acled_schema)


def test_training_copy_of_a_test_sentence_is_rejected(tmp_path, acled_schema):
    train = write_jsonl(tmp_path / "train.jsonl", GOOD)
    test = write_jsonl(tmp_path / "test.jsonl", [dict(GOOD[2], doc_id="t1")])
    report = prepare(_config(tmp_path, [train], test_files=[str(test)]), acled_schema)
    assert report["split_rows"]["test"] == 1 and report["split_rows"]["train"] == 2
    assert "duplicate text" in _prepared(tmp_path, "rejects.jsonl")[0]["reason"]


def test_glob_matching_nothing_is_an_error(tmp_path, acled_schema):
    with pytest.raises(DataError, match="no file matches"):
        prepare(_config(tmp_path, [tmp_path / "nothing*.jsonl"]), acled_schema)


def test_small_strata_still_fill_validation_to_the_requested_fraction():
    # Ten labels, one article each: per-stratum rounding would put nothing in validation.
    examples = [{"doc_id": f"d{i}", "source": str(i), "t": f"label{i}"} for i in range(10)]
    assign_splits(examples, "t", 0.2, 0.1, seed=3)
    assert sum(e["split"] == "validation" for e in examples) == 2
    assert sum(e["split"] == "test" for e in examples) == 1
