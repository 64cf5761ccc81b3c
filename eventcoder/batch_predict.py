"""`eventcoder predict`: stream a file of sentences or articles through a model, in bounded memory.

Input is read in chunks of rows; each chunk is coded and written to its own part file under
`OUT.parts/` (atomically), so a killed job loses at most the chunk in flight and `--resume`
skips the chunks already written. When all chunks are done the parts are joined into `OUT`
(again atomically) and the parts folder is removed.
"""

import json
import logging
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from eventcoder.errors import ConfigError, DataError
from eventcoder.inference import Predictor, PredictorSpec
from eventcoder.schema import NO_LABEL
from eventcoder.sentences import split_sentences
from eventcoder.tables import WRITE_FORMATS, BadRow, TableWriter, count_rows, detect_format, is_missing, iter_records

log = logging.getLogger(__name__)

# Characters kept per text before tokenising: far past any max_length, but a 50 MB "sentence"
# must not stall the tokenizer.
MAX_CHARS_PER_TOKEN = 20


# A chunk of input rows: (1-based row number, the record or why it could not be read).
InputChunk = list[tuple[int, dict[str, Any] | BadRow]]


@dataclass
class PredictOptions:
    text_column: str = "text"
    documents: bool = False
    doc_id_column: str = "doc_id"
    shard_index: int = 0
    shard_count: int = 1
    all_scores: bool = False
    events_only: bool = False
    min_score: float | None = None
    chunk_rows: int = 2048
    resume: bool = False
    progress: bool = True


@dataclass
class PredictReport:
    rows_read: int = 0
    rows_coded: int = 0
    rows_rejected: int = 0
    rows_written: int = 0
    rows_filtered: int = 0
    texts_truncated: int = 0
    reject_file: str | None = None
    reasons: dict[str, int] = field(default_factory=dict)

    def add(self, other: "PredictReport") -> None:
        for name in ("rows_read", "rows_coded", "rows_rejected", "rows_written", "rows_filtered", "texts_truncated"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count


def parse_shard(text: str | None) -> tuple[int, int]:
    if not text:
        return 0, 1
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/8") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n")
    return index, count


def input_chunks(path: Path, options: PredictOptions) -> Iterator[InputChunk]:
    """Chunks of this shard's rows. Row r (1-based) belongs to shard (r - 1) % n."""
    chunk: InputChunk = []
    for row, record in iter_records(path, options.text_column):
        if (row - 1) % options.shard_count != options.shard_index:
            continue
        chunk.append((row, record))
        if len(chunk) >= options.chunk_rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _validate(row: int, record: dict[str, Any] | BadRow, column: str) -> str | None:
    """The reason a row cannot be coded, or None."""
    if isinstance(record, BadRow):
        return record.reason
    if column not in record:
        return f"missing column {column!r}"
    value = record[column]
    if is_missing(value):
        return "missing text"
    if not isinstance(value, str):
        return f"text is {type(value).__name__}, not a string"
    if not value.strip():
        return "empty or whitespace-only text"
    return None


class ChunkCoder:
    """Codes one chunk of input rows into output rows plus rejects."""

    def __init__(self, predictor: Predictor, options: PredictOptions):
        self.predictor = predictor
        self.options = options
        self.main_task = predictor.schema.main_task
        self.max_chars = predictor.max_length * MAX_CHARS_PER_TOKEN

    def code_to_part(self, index: int, chunk: InputChunk, source: Path, parts: Path) -> PredictReport:
        """Code a chunk and write its part file. In `--workers` runs the worker writes it: only the
        small report travels back to the parent, not every coded row to be pickled and encoded
        there while both cores are busy coding."""
        rows, rejects, report = self.code(chunk, source)
        _write_part(parts, index, rows, rejects, report)
        return report

    def code(self, chunk: InputChunk, source: Path) -> tuple[list[dict], list[dict], PredictReport]:
        report = PredictReport(rows_read=len(chunk))
        units: list[dict[str, Any]] = []
        rejects = []
        column = self.options.text_column
        for row, record in chunk:
            reason = _validate(row, record, column)
            if reason:
                rejects.append({"file": str(source), "row": row, "reason": reason})
                report.reasons[reason.split(" (")[0]] = report.reasons.get(reason.split(" (")[0], 0) + 1
                continue
            assert isinstance(record, dict)
            report.rows_coded += 1
            units.extend(self._units(row, record))
        report.rows_rejected = len(rejects)
        if not units:
            return [], rejects, report

        texts = []
        for unit in units:
            text = unit[column]
            if len(text) > self.max_chars:
                text = text[: self.max_chars]
            texts.append(text)
        token_ids = self.predictor.tokenize(texts)
        report.texts_truncated = sum(len(ids) >= self.predictor.max_length for ids in token_ids)
        labels = self.predictor.label_rows(self.predictor.probabilities_from_ids(token_ids), self.options.all_scores)
        rows = []
        for unit, coded in zip(units, labels, strict=True):
            if self.options.events_only and coded[self.main_task] == NO_LABEL:
                continue
            if self.options.min_score is not None and coded[f"{self.main_task}_score"] < self.options.min_score:
                continue
            rows.append({**unit, **coded})
        report.rows_filtered = len(units) - len(rows)
        report.rows_written = len(rows)
        return rows, rejects, report

    def _units(self, row: int, record: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows to code: the record itself, or one row per sentence of the article."""
        column = self.options.text_column
        if not self.options.documents:
            return [record]
        doc_id = record.get(self.options.doc_id_column)
        doc_id = str(row) if is_missing(doc_id) else doc_id
        # Input columns named like the computed ones must not overwrite the offsets.
        reserved = {column, self.options.doc_id_column, "doc_id", "sentence_index", "start", "end"}
        passthrough = {k: v for k, v in record.items() if k not in reserved}
        return [
            {"doc_id": doc_id, "sentence_index": i, "start": s.start, "end": s.end, **passthrough, column: s.text}
            for i, s in enumerate(split_sentences(record[column]))
        ]


def predict_file(
    predictor: Predictor | PredictorSpec,
    input_path: str | Path,
    output_path: str | Path,
    options: PredictOptions,
    model_ref: str,
    workers: int = 1,
) -> PredictReport:
    """Code `input_path` into `output_path`. With `workers` > 1, `predictor` must be a
    PredictorSpec: each worker process loads its own (see eventcoder.predict_pool)."""
    input_path, output_path = Path(input_path), Path(output_path)
    if not input_path.exists():
        raise DataError(f"{input_path}: file not found")
    detect_format(input_path)
    detect_format(output_path, WRITE_FORMATS)
    if workers > 1 and not isinstance(predictor, PredictorSpec):
        raise ValueError("predict_file: workers > 1 needs a PredictorSpec that the workers can load")
    parts = output_path.with_name(output_path.name + ".parts")
    manifest = {
        "input": str(input_path.resolve()),
        "model": model_ref,
        "shard": [options.shard_index, options.shard_count],
        "chunk_rows": options.chunk_rows,
        "documents": options.documents,
        "text_column": options.text_column,
        "events_only": options.events_only,
        "min_score": options.min_score,
        "all_scores": options.all_scores,
    }
    done = _open_parts(parts, manifest, options.resume)

    report = PredictReport()
    # Counting reads the whole file: only for a progress bar someone will see.
    total = count_rows(input_path) if options.progress else None
    progress = tqdm(
        total=None if total is None else -(-total // options.shard_count),
        unit="row",
        desc="predict",
        disable=not options.progress,
        dynamic_ncols=True,
    )

    def chunks_to_code() -> Iterator[tuple[int, InputChunk]]:
        for index, chunk in enumerate(input_chunks(input_path, options)):
            if index in done:
                report.add(PredictReport(**done[index]))
                progress.update(len(chunk))
            else:
                yield index, chunk

    for chunk_report in _code_chunks(predictor, options, workers, chunks_to_code(), input_path, parts):
        report.add(chunk_report)
        progress.update(chunk_report.rows_read)
    progress.close()

    _join_parts(parts, output_path, report)
    shutil.rmtree(parts)
    # The invariant batch users audit: every input row is coded or rejected, never lost.
    assert report.rows_read == report.rows_coded + report.rows_rejected
    if report.texts_truncated:
        log.warning("%d texts were longer than the model's max_length and were truncated", report.texts_truncated)
    return report


def _code_chunks(
    predictor: Predictor | PredictorSpec,
    options: PredictOptions,
    workers: int,
    chunks: Iterable[tuple[int, InputChunk]],
    source: Path,
    parts: Path,
) -> Iterator[PredictReport]:
    """Each chunk's report, once its part file is written."""
    if workers > 1:
        assert isinstance(predictor, PredictorSpec)
        # Imported here: predict_pool imports this module.
        from eventcoder.predict_pool import code_in_workers

        yield from code_in_workers(predictor, options, workers, chunks, source, parts)
        return
    coder = ChunkCoder(predictor.load() if isinstance(predictor, PredictorSpec) else predictor, options)
    for index, chunk in chunks:
        yield coder.code_to_part(index, chunk, source, parts)


def _open_parts(parts: Path, manifest: dict[str, Any], resume: bool) -> dict[int, dict[str, Any]]:
    """Return the finished chunks' reports, keyed by chunk index."""
    manifest_path = parts / "manifest.json"
    if parts.exists() and not resume:
        raise ConfigError(f"{parts} holds an interrupted run: pass --resume to continue it, or delete it")
    if resume and parts.exists():
        with manifest_path.open(encoding="utf-8") as handle:
            previous = json.load(handle)
        if previous != manifest:
            changed = sorted(k for k in manifest if previous.get(k) != manifest[k])
            raise ConfigError(f"--resume: {parts} was started with different {changed}; delete it to start over")
        done = {}
        for report_path in parts.glob("part-*.report.json"):
            with report_path.open(encoding="utf-8") as handle:
                done[int(report_path.name.split("-")[1].split(".")[0])] = json.load(handle)
        log.info("resuming: %d chunks already written in %s", len(done), parts)
        return done
    parts.mkdir(parents=True)
    with manifest_path.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
    return {}


def _write_part(parts: Path, index: int, rows: list[dict], rejects: list[dict], report: PredictReport) -> None:
    # The report is written last: its presence is what marks the chunk as complete.
    with TableWriter(parts / f"part-{index:06d}.jsonl") as writer:
        writer.write(rows)
    with TableWriter(parts / f"part-{index:06d}.rejects.jsonl") as writer:
        writer.write(rejects)
    tmp = parts / f".part-{index:06d}.report.json.tmp"
    with tmp.open("w", encoding="utf-8") as handle:
        json.dump({k: v for k, v in asdict(report).items() if k != "reject_file"}, handle)
    tmp.replace(parts / f"part-{index:06d}.report.json")


def _iter_part(path: Path, batch: int = 4096) -> Iterator[list[dict[str, Any]]]:
    rows = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            rows.append(json.loads(line))
            if len(rows) >= batch:
                yield rows
                rows = []
    if rows:
        yield rows


def _append_part(writer: TableWriter, part: Path) -> None:
    if writer.format == "jsonl":  # parts are JSONL already: copied, not decoded and encoded again
        writer.copy_jsonl(part)
        return
    for rows in _iter_part(part):
        writer.write(rows)


def _join_parts(parts: Path, output_path: Path, report: PredictReport) -> None:
    indices = sorted(int(p.name.split("-")[1].split(".")[0]) for p in parts.glob("part-*.report.json"))
    with TableWriter(output_path) as writer:
        for index in indices:
            _append_part(writer, parts / f"part-{index:06d}.jsonl")
    if report.rows_rejected:
        reject_path = output_path.with_name(output_path.name + ".rejects.jsonl")
        with TableWriter(reject_path) as writer:
            for index in indices:
                _append_part(writer, parts / f"part-{index:06d}.rejects.jsonl")
        report.reject_file = str(reject_path)
