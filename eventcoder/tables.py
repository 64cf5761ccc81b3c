"""Streaming readers and writers for the tabular formats eventcoder accepts.

Readers yield one record at a time with its 1-based row number, so a bad row can be reported
by number and skipped instead of failing the whole file. Writers write to a temporary name and
rename on close: a killed job never leaves a file that looks complete.
"""

import csv
import functools
import gzip
import io
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from eventcoder.errors import DataError

READ_FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet", "hf", "folder")
WRITE_FORMATS = ("jsonl", "csv", "tsv", "parquet")


@dataclass(frozen=True)
class BadRow:
    """A row that could not be decoded; it goes to the rejects file with this reason."""

    reason: str
    raw: str = ""


def detect_format(path: str | Path, allowed: tuple[str, ...] = READ_FORMATS) -> str:
    path = Path(path)
    if path.is_dir():
        # A dataset saved by `datasets` has its state file; any other folder holds one article a file.
        fmt = "hf" if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file() else "folder"
    else:
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes = suffixes[:-1]
        ext = suffixes[-1].lstrip(".") if suffixes else ""
        fmt = {"json": "jsonl", "ndjson": "jsonl", "pq": "parquet"}.get(ext, ext)
    if fmt not in allowed:
        raise DataError(f"{path}: unsupported format {fmt or '(no extension)'!r}; use one of {allowed}")
    return fmt


def _is_gzip(path: Path) -> bool:
    return path.suffix.lower() == ".gz"


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if _is_gzip(path) else path.open("rb")


def count_rows(path: str | Path) -> int | None:
    """Cheap row count for progress bars and sharding; None where it would cost a full parse.

    Remembered per file version (size and modification time): `eventcoder predict` counts once to
    choose its worker count and again for its progress bar, and a count reads the whole file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    status = path.stat()
    return _count_rows(str(path.absolute()), status.st_size, status.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _count_rows(absolute: str, size: int, mtime_ns: int) -> int | None:
    # size and mtime_ns are not read here: they are part of the cache key.
    path = Path(absolute)
    fmt = detect_format(path)
    if fmt == "folder":
        return len(_article_files(path))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt in ("txt", "jsonl"):
        with _open_binary(path) as handle:
            return sum(1 for line in handle if line.strip())
    return None


def iter_records(path: str | Path, text_column: str = "text") -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """Yield (row_number, record or BadRow). Row numbers count data rows from 1 (no header)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    fmt = detect_format(path)
    reader = {
        "txt": _iter_txt,
        "jsonl": _iter_jsonl,
        "csv": _iter_delimited,
        "tsv": _iter_delimited,
        "parquet": _iter_parquet,
        "hf": _iter_hf,
        "folder": _iter_folder,
    }[fmt]
    yield from reader(path, text_column)


def _iter_txt(path: Path, text_column: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with _open_binary(path) as handle:
        for row, line in enumerate(handle, 1):
            try:
                text = line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield row, BadRow(f"undecodable bytes at offset {exc.start} (not UTF-8)")
                continue
            yield row, {text_column: text}


def _iter_jsonl(path: Path, text_column: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    with _open_binary(path) as handle:
        row = 0
        for line in handle:
            if not line.strip():
                continue
            row += 1
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield row, BadRow(f"undecodable bytes at offset {exc.start} (not UTF-8)")
                continue
            except json.JSONDecodeError as exc:
                yield row, BadRow(f"invalid JSON: {exc.msg}", line.decode("utf-8", "replace")[:200])
                continue
            if not isinstance(record, dict):
                yield row, BadRow("a JSONL row must be an object")
                continue
            yield row, record


def _iter_delimited(path: Path, text_column: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    delimiter = "\t" if detect_format(path) == "tsv" else ","
    # surrogateescape keeps undecodable bytes visible as lone surrogates, so one bad cell
    # rejects one row instead of aborting the whole file.
    with _open_binary(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        reader = csv.reader(text, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        if header and header[0].startswith("\ufeff"):
            header[0] = header[0][1:]
        for row, values in enumerate(reader, 1):
            if not values:
                continue
            if len(values) != len(header):
                yield row, BadRow(f"expected {len(header)} fields, found {len(values)}")
                continue
            if any(_has_surrogates(value) for value in values):
                yield row, BadRow("undecodable bytes (not UTF-8)")
                continue
            yield row, dict(zip(header, values, strict=True))


def _has_surrogates(value: str) -> bool:
    return any("\udc80" <= char <= "\udcff" for char in value)


def _iter_parquet(path: Path, text_column: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=8192):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _article_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".txt", ".md"))


def _iter_folder(path: Path, text_column: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    """One row per .txt/.md file, in sorted order, with its relative path as `doc_id`."""
    for row, file in enumerate(_article_files(path), 1):
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            yield row, BadRow(f"{file.name}: undecodable bytes at offset {exc.start} (not UTF-8)")
            continue
        yield row, {"doc_id": str(file.relative_to(path)), text_column: text}


def _iter_hf(path: Path, text_column: str) -> Iterator[tuple[int, dict[str, Any] | BadRow]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({exc})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{path}: is a DatasetDict; point to one split folder, e.g. {path}/train")
    yield from enumerate(dataset, 1)


def is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class TableWriter:
    """Append records in batches; the file appears under its final name only on `close()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.format = detect_format(self.path, WRITE_FORMATS)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.rows = 0
        self._handle: Any = None
        self._csv: Any = None
        self._columns: list[str] | None = None
        self._parquet: Any = None

    def write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self.format == "parquet":
            self._write_parquet(records)
        elif self.format == "jsonl":
            self._text_handle().write(
                "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in records)
            )
        else:
            self._write_delimited(records)
        self.rows += len(records)

    def copy_jsonl(self, path: Path) -> None:
        """Append the lines of a JSONL file as they are (this writer's format is JSONL too)."""
        assert self.format == "jsonl", self.path
        handle = self._text_handle()
        with path.open(encoding="utf-8") as source:
            while block := source.read(1 << 20):
                handle.write(block)
                self.rows += block.count("\n")

    def _text_handle(self) -> IO[str]:
        if self._handle is None:
            if _is_gzip(self.path):
                # Held open across write() calls and closed in close()/abort().
                self._handle = gzip.open(self.tmp_path, "wt", encoding="utf-8", newline="")  # noqa: SIM115
            else:
                self._handle = self.tmp_path.open("w", encoding="utf-8", newline="")
        return self._handle

    def _write_delimited(self, records: list[dict[str, Any]]) -> None:
        if self._csv is None:
            self._columns = list(records[0])
            delimiter = "\t" if self.format == "tsv" else ","
            self._csv = csv.DictWriter(self._text_handle(), self._columns, delimiter=delimiter, extrasaction="ignore")
            self._csv.writeheader()
        self._csv.writerows(
            {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in r.items()} for r in records
        )

    def _write_parquet(self, records: list[dict[str, Any]]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self._parquet is None:
            table = pa.Table.from_pylist(records)
            # A column that is empty in the first batch would be typed `null` and reject every
            # later value; type it as string instead.
            schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
            table = table.cast(schema)
            self._parquet = pq.ParquetWriter(self.tmp_path, schema)
        else:
            table = pa.Table.from_pylist(records, schema=self._parquet.schema)
        self._parquet.write_table(table)

    def close(self) -> Path:
        """Finish the file and move it to its final name."""
        if self._parquet is not None:
            self._parquet.close()
        elif self._handle is not None:
            self._handle.close()
        else:
            self._write_empty()
        os.replace(self.tmp_path, self.path)
        return self.path

    def _write_empty(self) -> None:
        if self.format == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({}), self.tmp_path)
        else:
            self._text_handle().close()

    def abort(self) -> None:
        for closer in (self._parquet, self._handle):
            if closer is not None:
                closer.close()
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "TableWriter":
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def write_jsonl(path: str | Path, records: list[dict[str, Any]]) -> Path:
    with TableWriter(path) as writer:
        writer.write(records)
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file written by eventcoder itself (trusted, so any bad row is an error)."""
    records = []
    for row, record in iter_records(path):
        if isinstance(record, BadRow):
            raise DataError(f"{path}: row {row}: {record.reason}")
        records.append(record)
    return records
