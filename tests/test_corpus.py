"""The bundled corpus meets its datasheet's promises: valid, large, balanced, written not generated."""

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from conftest import REPO

TRAIN_FILES = sorted((REPO / "data" / "raw" / "train").glob("*.jsonl"))
HELDOUT = REPO / "data" / "raw" / "heldout.jsonl"
FIELDS = {"doc_id", "sentence_index", "text", "sub_event_type", "actor1", "actor2"}


def _load(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            rows.extend(json.loads(line) for line in handle if line.strip())
    return rows


@pytest.fixture(scope="module")
def train_rows():
    return _load(TRAIN_FILES)


@pytest.fixture(scope="module")
def heldout_rows():
    return _load([HELDOUT])


def test_every_row_is_valid_against_the_schema(train_rows, heldout_rows, acled_schema):
    sub, actors = acled_schema.task("sub_event_type"), acled_schema.task("actor1")
    for row in train_rows + heldout_rows:
        assert set(row) >= FIELDS, row
        assert row["sub_event_type"] in sub.labels, row
        assert row["actor1"] in actors.labels and row["actor2"] in actors.labels, row
        assert row["text"].strip() == row["text"] and row["text"], row
        if row["sub_event_type"] == "none":
            assert row["actor1"] == row["actor2"] == "none", row
        else:
            assert row["actor1"] != "none", row


def test_articles_are_whole_and_in_order(train_rows, heldout_rows):
    for rows in (train_rows, heldout_rows):
        articles = defaultdict(list)
        for row in rows:
            articles[row["doc_id"]].append(row["sentence_index"])
        for doc_id, indices in articles.items():
            assert indices == list(range(len(indices))), doc_id
            assert 3 <= len(indices) <= 12, doc_id


def test_size_and_coverage_minimums(train_rows, heldout_rows, acled_schema):
    assert len(train_rows) >= 4000
    assert len({r["doc_id"] for r in train_rows}) >= 600
    assert len(heldout_rows) >= 800
    sub_counts = Counter(r["sub_event_type"] for r in train_rows)
    for label in acled_schema.task("sub_event_type").labels:
        assert sub_counts[label] >= 80, (label, sub_counts[label])
    assert sub_counts["none"] / len(train_rows) >= 0.25
    actor_counts = Counter()
    for row in train_rows:
        actor_counts.update({row["actor1"], row["actor2"]} - {"none"})
    for label in acled_schema.task("actor1").labels[1:]:
        assert actor_counts[label] >= 100, (label, actor_counts[label])
    assert len({r["country"] for r in train_rows + heldout_rows}) >= 40


def test_heldout_is_apart_from_training(train_rows, heldout_rows):
    assert not {r["doc_id"] for r in train_rows} & {r["doc_id"] for r in heldout_rows}
    assert not {r["text"].casefold() for r in train_rows} & {r["text"].casefold() for r in heldout_rows}
    # Other places: held-out articles come from countries the training articles never cover.
    assert not {r["country"] for r in train_rows} & {r["country"] for r in heldout_rows}


def skeleton(text: str) -> str:
    """Mask numbers and capitalised words (names), so filled-in templates collapse together."""
    text = re.sub(r"\d[\d,.]*", "#", text)
    text = re.sub(r"\b[A-Z][\w'’-]*", "X", text)
    return re.sub(r"\s+", " ", text.lower()).strip()


def test_masking_names_and_numbers_leaves_almost_no_shared_skeletons(train_rows, heldout_rows):
    rows = train_rows + heldout_rows
    counts = Counter(skeleton(r["text"]) for r in rows)
    repeated = sum(c for s, c in counts.items() if c > 1)
    assert repeated / len(rows) < 0.005, [s for s, c in counts.items() if c > 1][:10]


def five_grams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + 5]) for i in range(len(words) - 4)}


def test_no_two_sentences_share_most_of_their_five_grams(train_rows, heldout_rows):
    rows = train_rows + heldout_rows
    grams = [five_grams(r["text"]) for r in rows]
    index = defaultdict(list)
    for i, sentence_grams in enumerate(grams):
        for gram in sentence_grams:
            index[gram].append(i)
    offenders = []
    for i, sentence_grams in enumerate(grams):
        if len(sentence_grams) < 3:
            continue
        shared = Counter(j for gram in sentence_grams for j in index[gram] if j != i)
        for j, count in shared.items():
            if count / min(len(sentence_grams), len(grams[j]) or 1) > 0.5:
                offenders.append((rows[i]["text"], rows[j]["text"]))
    assert not offenders, offenders[:5]


def test_no_exact_duplicates(train_rows, heldout_rows):
    texts = Counter(r["text"].casefold() for r in train_rows + heldout_rows)
    assert [t for t, c in texts.items() if c > 1] == []


def test_datasheet_tables_are_generated_from_the_current_files():
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO / "data" / "datasheet_tables.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
