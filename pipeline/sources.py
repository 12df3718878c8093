"""URL sources: find the input files, read their lines as Records, and cut them into shards.

Nothing here holds more than one line (or one parquet row group) at a time, so a 10-million-line
list costs no memory. Formats, by suffix:
  .txt      one URL per line; blank lines and ``#`` comments are not records
  .csv      a header row, one column of which holds the URL (``input.url_column``)
  .tsv      the same, tab-separated
  .jsonl    one JSON object per line, whose ``url`` field (``input.url_column``) holds the URL
  .parquet  a column holding the URL, read a row group at a time (needs pyarrow)
Every other column or field is kept and passed through to the manifest row unchanged. A line with
no usable URL (an empty cell, a JSON line that is no object) is still a record: it becomes a
failed ``invalid_url`` row, never nothing.

A shard is a run of at most ``input.shard_size`` records of one file, named by the key of its
first line. A rerun is given the shards earlier runs made (``Known``): they are cut again at the
same lines, and records past the last of them (appended lines) start shards of their own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os.path
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .errors import PipelineError, SourceError, install_hint
from .records import Job, ShardEnd, make_key

FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
PARQUET_INSTALL = install_hint("pyarrow", "parquet", "reading .parquet files")
_PARQUET_BATCH = 4096


@dataclass(frozen=True, slots=True)
class Source:
    """One input file: ``name`` is its path relative to the input root, ``id`` fixed in run.json."""

    path: Path
    name: str
    id: int = 0

    @property
    def format(self) -> str:
        return FORMATS.get(self.path.suffix.lower(), "txt")  # a file named on its own: a list


@dataclass(frozen=True, slots=True)
class Record:
    """One line of an input file."""

    line: int
    url: str
    columns: Mapping[str, Any] | None = None
    problem: str | None = None  # why there is no usable URL

    def canonical(self) -> bytes:
        """What the fingerprint of a shard covers: the line's number, URL and columns."""
        extra = "" if self.columns is None else canonical_columns(self.columns)
        return f"{self.line}\x1f{self.url}\x1f{extra}\x1e".encode("utf-8", "surrogatepass")


def canonical_columns(columns: Mapping[str, Any]) -> str:
    return json.dumps(columns, sort_keys=True, default=str, separators=(",", ":"))


# --- finding the files ---------------------------------------------------------------------------


def find_files(paths: Sequence[Path]) -> list[Path]:
    """The input files named by ``paths``: files as given, folders searched recursively, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in FORMATS and p.is_file()
            )
            if not files:
                raise SourceError(f"{path}: no {', '.join(FORMATS)} files in this folder")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise SourceError(f"{path}: no such file or folder")
    return found


def input_root(paths: Sequence[Path]) -> Path:
    """The folder that source names are relative to: the deepest one holding every input."""
    roots = [str(p.resolve() if p.is_dir() else p.resolve().parent) for p in paths]
    return Path(os.path.commonpath(roots))


def check_header(source: Source, url_column: str) -> None:
    """Fail now, not mid-run, when a csv/tsv/parquet file has no URL column."""
    if source.format in ("csv", "tsv"):
        with _open(source.path) as f:
            _column_index(source, _header(f, source.format), url_column)
    elif source.format == "parquet":
        names = _parquet(source).schema_arrow.names
        if url_column not in names:
            raise SourceError(_no_column(source, url_column, names))


# --- reading records -----------------------------------------------------------------------------


def read_records(source: Source, url_column: str = "url") -> Iterator[Record]:
    """Stream the records of one file, lazily."""
    reader = {
        "txt": _read_txt,
        "csv": _read_table,
        "tsv": _read_table,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
    }[source.format]
    return reader(source, url_column)


def _read_txt(source: Source, url_column: str) -> Iterator[Record]:
    # surrogateescape: a stray non-UTF-8 byte makes an invalid URL (a failed row), not a crash
    with _open(source.path) as lines:
        for number, line in enumerate(lines, 1):
            url = line.strip()
            if url and not url.startswith("#"):
                yield Record(number, url)


def _read_table(source: Source, url_column: str) -> Iterator[Record]:
    with _open(source.path) as f:
        rows = _reader(f, source.format)
        header = [name.strip() for name in next(rows, None) or []]
        at = _column_index(source, header, url_column)
        while True:
            line = rows.line_num + 1  # a quoted cell may span lines: a record starts here
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Record(line, "", None, f"unreadable {source.format} line: {exc}")
                continue
            if not any(cell.strip() for cell in row):
                continue  # a blank line
            columns = {name: row[i] for i, name in enumerate(header) if i != at and i < len(row)}
            url = row[at].strip() if at < len(row) else ""
            yield Record(line, url, columns, None if url else f"empty {url_column!r} cell")


def _read_jsonl(source: Source, url_column: str) -> Iterator[Record]:
    with _open(source.path) as lines:
        for number, text in enumerate(lines, 1):
            text = text.strip()
            if not text:
                continue
            try:
                value = json.loads(text)
            except ValueError:
                yield Record(number, text[:2000], None, "not a JSON object")
                continue
            if not isinstance(value, dict):
                yield Record(number, text[:2000], None, "not a JSON object")
                continue
            yield _record(number, value, url_column)


def _read_parquet(source: Source, url_column: str) -> Iterator[Record]:
    number = 0
    for batch in _parquet(source).iter_batches(batch_size=_PARQUET_BATCH):
        for row in batch.to_pylist():
            number += 1
            yield _record(number, row, url_column)


def _record(number: int, row: dict[str, Any], url_column: str) -> Record:
    if url_column not in row:
        return Record(number, "", row, f"no {url_column!r} field")
    url = row.pop(url_column)
    if not isinstance(url, str) or not url.strip():
        return Record(number, "" if url is None else str(url), row, f"no URL in {url_column!r}")
    return Record(number, url.strip(), row)


def _parquet(source: Source) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PipelineError(f"{source.path}: {PARQUET_INSTALL}") from None
    try:
        return pq.ParquetFile(source.path)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise SourceError(f"{source.path}: not a readable parquet file: {exc}") from None


def _reader(f: TextIO, fmt: str) -> Any:  # a csv reader: iterates rows, has line_num
    """CSV with its quoting; TSV as it is usually written: a record a line, quotes kept as text,
    so that a stray quote in a caption cannot swallow the lines after it."""
    if fmt == "tsv":
        return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(f)


def _header(f: TextIO, fmt: str) -> list[str]:
    row = next(_reader(f, fmt), None)
    return [name.strip() for name in row or []]


def _column_index(source: Source, header: list[str], column: str) -> int:
    if column not in header:
        raise SourceError(_no_column(source, column, header))
    return header.index(column)


def _no_column(source: Source, column: str, names: Sequence[str]) -> str:
    return (
        f"{source.path}: the header has no {column!r} column (found: "
        f"{', '.join(names) or 'nothing'}); input.url_column names the URL column"
    )


def _open(path: Path) -> TextIO:
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first line
        return path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None


# --- shards --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Known:
    """A shard an earlier run made: sealed (``last`` and ``digest`` known) or left open."""

    first: int
    last: int | None = None
    count: int | None = None
    digest: str | None = None


@dataclass(slots=True)
class _Open:
    file: int
    first: int
    until: int | None  # a known sealed shard ends at this line
    count: int = 0
    last: int = 0
    hasher: Any = field(default_factory=lambda: hashlib.blake2b(digest_size=16))
    name: str = ""

    def __post_init__(self) -> None:
        self.name = make_key(self.file, self.first)

    def end(self) -> ShardEnd:
        return ShardEnd(
            self.name, self.count, self.file, self.first, self.last, self.hasher.hexdigest()
        )


def iter_jobs(
    sources: Iterable[Source],
    shard_size: int,
    url_column: str = "url",
    known: Mapping[int, Sequence[Known]] | None = None,
) -> Iterator[Job | ShardEnd]:
    """Every record of ``sources`` as a Job, with a ShardEnd after the last Job of each shard."""
    for source in sources:
        for item in shard_records(source, shard_size, url_column, (known or {}).get(source.id, ())):
            if isinstance(item, ShardEnd):
                yield item
            else:
                record, shard = item
                yield Job(
                    source.id,
                    record.line,
                    record.url,
                    shard,
                    source.name,
                    record.columns,
                    record.problem,
                )


def shard_records(
    source: Source, shard_size: int, url_column: str, known: Sequence[Known] = ()
) -> Iterator[tuple[Record, str] | ShardEnd]:
    """The records of one file, each with the name of its shard, and a ShardEnd after each shard.

    A shard ends after ``shard_size`` records, after the last line of the known sealed shard it
    is, or before the first line of the next known shard.
    """
    ahead = sorted(known, key=lambda k: k.first)
    at = 0  # ahead[at] is the next known shard
    shard: _Open | None = None
    for record in read_records(source, url_column):
        line = record.line
        if shard is not None and (
            shard.count >= shard_size
            or (shard.until is not None and line > shard.until)
            or (at < len(ahead) and line >= ahead[at].first)
        ):
            yield shard.end()
            shard = None
        if shard is None:
            if at < len(ahead) and line >= ahead[at].first:
                shard = _Open(source.id, ahead[at].first, ahead[at].last)
                at += 1
            else:
                shard = _Open(source.id, line, None)
        shard.count += 1
        shard.last = line
        shard.hasher.update(record.canonical())
        yield record, shard.name
    if shard is not None:
        yield shard.end()
