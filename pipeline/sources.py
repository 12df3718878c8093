"""URL sources: find the input files, read their lines as Records, and cut them into shards.

Nothing here holds more than one line (or one parquet row group) at a time, so a 10-million-line
list costs no memory. Formats, by suffix:
  .txt      one URL per line; blank lines and ``#`` comments are not records
  .csv      a header row, one column of which holds the URL (``input.url_column``)
  .tsv      the same, tab-separated
  .jsonl    one JSON object per line, whose ``url`` field (``input.url_column``) holds the URL
  .parquet  a column holding the URL, read a row group at a time (needs pyarrow)
and each text format gzip- or zstd-compressed (``urls.csv.gz``, ``urls.jsonl.zst``: inputs.py).
Every other column or field is kept and passed through to the manifest row unchanged. A line with
no usable URL (an empty cell, a JSON line that is no object or nests too deep, a CSV record a
stray quote ran over lines) is still a record: it becomes a failed ``invalid_url`` row, never
nothing. A file that cannot be read (``UnreadableSource``) never stops the others: the stream
tells ``Findings`` and goes on with the next file. A folder's output folders are never input.

A shard is a run of at most ``input.shard_size`` records of one file, named by the key of its
first line. A rerun is given the shards earlier runs made (``Known``): they are cut again at the
same lines, and records past the last of them (appended lines) start shards of their own.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import PipelineError, UnreadableSource, install_hint
from .inputs import (
    COMPRESSIONS,
    FORMATS,
    Findings,
    InputFile,
    Lines,
    input_kind,
    open_binary,
    open_lines,
    sniff,
)
from .records import Job, ShardEnd, make_key

PARQUET_INSTALL = install_hint("pyarrow", "parquet", "reading .parquet files")
MAX_DEPTH = 100  # JSON nested deeper is a failed row: it could not travel (pickle) or be written
_PARQUET_BATCH = 4096
_SAMPLE_LINES = 1000  # a .jsonl's first lines, looked at for its URL field before the run


@dataclass(frozen=True, slots=True)
class Source:
    """One input file: ``name`` is its path relative to the input root, ``id`` fixed in run.json.
    ``path`` is a local file, or a file in an object store (storage.StoredFile)."""

    path: InputFile
    name: str
    id: int = 0

    @property
    def compression(self) -> str | None:
        return COMPRESSIONS.get(self.path.suffix.lower())

    @property
    def format(self) -> str:
        inner = self.path.stem if self.compression else self.path.name
        return FORMATS.get(Path(inner).suffix.lower(), "txt")  # a file named on its own: a list


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


# --- checking the files --------------------------------------------------------------------------


def check_source(source: Source, url_column: str) -> None:
    """Fail now, not mid-run, when a file cannot be read as its name says, or has no URL column
    (csv/tsv/parquet) or field (.jsonl: none in its first lines). Raises UnreadableSource."""
    if input_kind(source.path.name) == "unread":
        raise UnreadableSource(
            f"{source.path}: cannot read a {source.path.suffix} file (inputs may be .gz or .zst; "
            "parquet is compressed inside)"
        )
    if source.format == "parquet":
        names = _parquet(source).schema_arrow.names
        if url_column not in names:
            raise UnreadableSource(_no_column(source, url_column, names))
        return
    sniff(source.path, source.compression)
    if source.format in ("csv", "tsv"):
        with open_lines(source.path, source.compression) as lines:
            _column_index(source, _header(lines, source.format), url_column)
    elif source.format == "jsonl":
        _check_field(source, url_column)


def _check_field(source: Source, url_column: str) -> None:
    objects, fields = 0, set[str]()
    with open_lines(source.path, source.compression) as lines:
        for text in lines:
            if lines.count > _SAMPLE_LINES:
                break
            record = _json_record(lines.count, text, url_column, source)
            if record is None or record.columns is None:
                continue  # a blank line, a line that is no object
            if record.problem != f"no {url_column!r} field":
                return  # the field is there
            objects += 1
            fields.update(record.columns)
    if objects:
        found = ", ".join(sorted(fields)[:8])
        raise UnreadableSource(
            f"{source.path}: no line has a {url_column!r} field (found: {found}); "
            "input.url_column names the URL field"
        )


# --- reading records -----------------------------------------------------------------------------


def read_records(
    source: Source, url_column: str = "url", findings: Findings | None = None
) -> Iterator[Record]:
    """Stream the records of one file, lazily; ``findings`` is told what is worth a warning."""
    reader = {
        "txt": _read_txt,
        "csv": _read_table,
        "tsv": _read_table,
        "jsonl": _read_jsonl,
        "parquet": _read_parquet,
    }[source.format]
    return reader(source, url_column, Findings() if findings is None else findings)


def _read_txt(source: Source, url_column: str, findings: Findings) -> Iterator[Record]:
    with open_lines(source.path, source.compression, findings) as lines:
        for number, line in enumerate(lines, 1):
            url = line.strip()
            if url and not url.startswith("#"):
                yield Record(number, url)


def _read_table(source: Source, url_column: str, findings: Findings) -> Iterator[Record]:
    with open_lines(source.path, source.compression, findings) as lines:
        rows = _reader(lines, source.format)
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
            url = row[at].strip() if at < len(row) else ""
            if rows.line_num > line and _swallows(row):
                yield _stray_quote(source, line, rows.line_num, url, findings)
                continue
            columns = {name: row[i] for i, name in enumerate(header) if i != at and i < len(row)}
            yield Record(line, url, columns, None if url else f"empty {url_column!r} cell")


def _swallows(row: list[str]) -> bool:
    """A quoted cell that runs over lines holding URLs: a stray quote took them in."""
    return any("://" in cell.partition("\n")[2] for cell in row if "\n" in cell)


def _stray_quote(source: Source, line: int, last: int, url: str, findings: Findings) -> Record:
    span = f"a quote opened on line {line} runs to line {last}"
    findings.warn(
        f"{source.path}: {span}, taking the {last - line} lines after it into one record "
        "(a stray quote?); "
        "it is a failed row; fix the file and rerun with --restart"
    )
    return Record(
        line, url, None, f"{span}, {last - line + 1} lines read as one record: a stray quote?"
    )


def _read_jsonl(source: Source, url_column: str, findings: Findings) -> Iterator[Record]:
    with open_lines(source.path, source.compression, findings) as lines:
        for number, text in enumerate(lines, 1):
            record = _json_record(number, text, url_column, source)
            if record is not None:
                yield record


def _json_record(number: int, text: str, url_column: str, source: Source) -> Record | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except RecursionError:
        return Record(number, "", None, f"JSON nested deeper than {MAX_DEPTH} levels")
    except ValueError:
        return Record(number, text[:2000], None, "not a JSON object")
    if not isinstance(value, dict):
        return Record(number, text[:2000], None, "not a JSON object")
    # a line cannot nest deeper than its brackets: only a line with many is walked
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        url = value.get(url_column)
        return Record(number, url if isinstance(url, str) else "", None,
                      f"JSON nested deeper than {MAX_DEPTH} levels")  # fmt: skip
    return _record(number, value, url_column)


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value`` (stops counting past MAX_DEPTH)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_DEPTH:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _read_parquet(source: Source, url_column: str, findings: Findings) -> Iterator[Record]:
    """Row group by row group: a damaged one stops the file there, naming it; the rows of the
    groups before it are records (and are recorded) all the same."""
    parquet, number = _parquet(source), 0
    for group in range(parquet.num_row_groups):
        batches = parquet.iter_batches(batch_size=_PARQUET_BATCH, row_groups=[group])
        while True:
            rows = _next_rows(source, batches, group, number)
            if rows is None:
                break
            for row in rows:
                number += 1
                yield _record(number, row, url_column)


def _next_rows(
    source: Source, batches: Any, group: int, number: int
) -> list[dict[str, Any]] | None:
    from pyarrow import ArrowException

    try:
        batch = next(batches, None)
        return None if batch is None else batch.to_pylist()
    except (OSError, ValueError, ArrowException) as exc:
        raise UnreadableSource(
            f"{source.path}: row group {group + 1} (from line {number + 1}) is unreadable: "
            + " ".join(str(exc).split())  # pyarrow's messages run over lines
        ) from None


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
        where = source.path if isinstance(source.path, Path) else open_binary(source.path)
        return pq.ParquetFile(where)
    except (OSError, ValueError) as exc:  # pyarrow's errors derive from these
        raise UnreadableSource(f"{source.path}: not a readable parquet file: {exc}") from None


def _reader(lines: Lines, fmt: str) -> Any:  # a csv reader: iterates rows, has line_num
    """CSV with its quoting; TSV as it is usually written: a record a line, quotes kept as text,
    so that a stray quote in a caption cannot swallow the lines after it."""
    if fmt == "tsv":
        return csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(lines)


def _header(lines: Lines, fmt: str) -> list[str]:
    row = next(_reader(lines, fmt), None)
    return [name.strip() for name in row or []]


def _column_index(source: Source, header: list[str], column: str) -> int:
    if column not in header:
        raise UnreadableSource(_no_column(source, column, header))
    return header.index(column)


def _no_column(source: Source, column: str, names: Sequence[str]) -> str:
    return (
        f"{source.path}: the header has no {column!r} column (found: "
        f"{', '.join(names) or 'nothing'}); input.url_column names the URL column"
    )


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
    findings: Findings | None = None,
) -> Iterator[Job | ShardEnd]:
    """Every record of ``sources`` as a Job, with a ShardEnd after the last Job of each shard.

    A file that cannot be read to its end is told to ``findings`` and the next one is read: the
    shard it was in stays open (not sealed), so a rerun of the mended file goes on from there.
    """
    findings = Findings() if findings is None else findings
    for source in sources:
        shards = shard_records(
            source, shard_size, url_column, (known or {}).get(source.id, ()), findings
        )
        try:
            for item in shards:
                if isinstance(item, ShardEnd):
                    yield item
                else:
                    yield _job(source, *item)
        except UnreadableSource as exc:
            findings.failed(str(exc))


def _job(source: Source, record: Record, shard: str) -> Job:
    return Job(
        source.id, record.line, record.url, shard, source.name, record.columns, record.problem
    )


def shard_records(
    source: Source,
    shard_size: int,
    url_column: str,
    known: Sequence[Known] = (),
    findings: Findings | None = None,
) -> Iterator[tuple[Record, str] | ShardEnd]:
    """The records of one file, each with the name of its shard, and a ShardEnd after each shard.

    A shard ends after ``shard_size`` records, after the last line of the known sealed shard it
    is, or before the first line of the next known shard.
    """
    findings = Findings() if findings is None else findings
    ahead = sorted(known, key=lambda k: k.first)
    at = records = usable = 0  # ahead[at] is the next known shard
    shard: _Open | None = None
    for record in read_records(source, url_column, findings):
        line = record.line
        records, usable = records + 1, usable + (record.problem is None)
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
    findings.counted(source.path, records, usable)
    if shard is not None:
        yield shard.end()
