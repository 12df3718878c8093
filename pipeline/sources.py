"""URL sources: find the URL files of a folder, and stream them into Jobs grouped in shards.

Nothing here holds more than one line at a time, so a 10-million-line list costs no memory.
``.txt``: one URL per line; blank lines and ``#`` comments are skipped, whitespace is stripped.
``.csv``: a header row with a URL column (``input.csv_column``, default ``url``).
A shard is a run of at most ``input.shard_size`` URLs of one file; shards are numbered across
files in sorted order, so the same input always gives the same keys.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from .errors import SourceError
from .records import Job, ShardEnd

SUFFIXES = (".txt", ".csv")


def find_sources(paths: Sequence[Path], csv_column: str = "url") -> list[Path]:
    """The URL files named by ``paths``: files as given, folders searched recursively, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file())
            if not files:
                raise SourceError(f"{path}: no .txt or .csv files in this folder")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise SourceError(f"{path}: no such file or folder")
    for path in found:
        if path.suffix == ".csv":
            _csv_column_index(path, csv_column)  # fail now, not mid-run
    return found


def read_urls(path: Path, csv_column: str = "url") -> Iterator[str]:
    """Stream the URLs of one file, lazily."""
    if path.suffix == ".csv":
        return _read_csv(path, csv_column)
    return _read_txt(path)


def iter_jobs(
    files: Iterable[Path], shard_size: int, csv_column: str = "url"
) -> Iterator[Job | ShardEnd]:
    """Every URL of ``files`` as a Job, with a ShardEnd after the last Job of each shard."""
    shard = 0
    for path in files:
        index = 0
        for url in read_urls(path, csv_column):
            yield Job(shard, index, url)
            index += 1
            if index == shard_size:
                yield ShardEnd(shard, index)
                shard, index = shard + 1, 0
        if index:
            yield ShardEnd(shard, index)
            shard += 1


def _read_txt(path: Path) -> Iterator[str]:
    # surrogateescape: a stray non-UTF-8 byte makes an invalid URL (a failed row), not a crash
    with _open(path) as lines:
        for line in lines:
            url = line.strip()
            if url and not url.startswith("#"):
                yield url


def _read_csv(path: Path, column: str) -> Iterator[str]:
    with _open(path) as f:
        rows = csv.reader(f)
        header = next(rows, None)
        at = _column_index(path, header, column)
        for row in rows:
            url = row[at].strip() if at < len(row) else ""
            if url:
                yield url


def _csv_column_index(path: Path, column: str) -> int:
    with _open(path) as f:
        return _column_index(path, next(csv.reader(f), None), column)


def _column_index(path: Path, header: list[str] | None, column: str) -> int:
    names = [name.strip() for name in header or []]
    if column not in names:
        raise SourceError(
            f"{path}: the CSV header has no {column!r} column"
            f" (found: {', '.join(names) or 'nothing'})"
        )
    return names.index(column)


def _open(path: Path) -> TextIO:
    try:
        return path.open(encoding="utf-8", errors="surrogateescape", newline="")
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror}") from None
