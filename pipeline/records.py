"""The records that travel between the stages: small, frozen, picklable.

Job       one input line: where it came from, its URL, its other columns   sources  -> download
ShardEnd  "shard S covers lines a..b of file F: K records, fingerprint D"  sources  -> sink
Fetched   a downloaded body                                               download -> transform
Outcome   the result for one input line, ok or not: one manifest row      any stage
Row       an Outcome encoded where it was made: what the coordinator writes   lane -> sink

A key names one input line for good: ``<file id>-<line>`` (``00002-000000017``: line 17 of the
input file that ``run.json`` numbers 2). A shard is named by the key of its first line, so neither
changes when lines are appended to a file or when a new file joins the input.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from .errors import Filtered, ItemError

# "filtered": a filter of the config left the image out (error_kind says which); final
Status = Literal["ok", "failed", "duplicate", "filtered"]


def make_key(file: int, line: int) -> str:
    return f"{file:05d}-{line:09d}"


def caption(columns: Mapping[str, Any] | None, column: str) -> bytes | None:
    """The caption cell as UTF-8 text, as it is; None when there is none (no column asked for,
    a line without that column, or null)."""
    value = columns.get(column) if column and isinstance(columns, Mapping) else None
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.encode("utf-8", "replace")  # a lone surrogate (from JSON) cannot be UTF-8


@dataclass(frozen=True, slots=True)
class Job:
    """One input line to process: a URL with its provenance and the input's other columns."""

    file: int  # the input file's id, fixed in run.json when the file is first seen
    line: int  # 1-based line of the file (row, for parquet)
    url: str
    shard: str  # the key of the shard's first line
    source: str = ""  # the file, relative to the input root
    columns: Mapping[str, Any] | None = None  # the input's other columns, passed through
    problem: str | None = None  # why the line holds no usable URL: an invalid_url row
    duplicate_of: str | None = None  # the key of the line that first had this URL (dedupe)

    @property
    def key(self) -> str:
        return make_key(self.file, self.line)

    def __reduce__(self) -> tuple[Any, ...]:  # values, not a state dict: far cheaper to pickle
        return (Job, (self.file, self.line, self.url, self.shard, self.source, self.columns,
                      self.problem, self.duplicate_of))  # fmt: skip


@dataclass(frozen=True, slots=True)
class ShardEnd:
    """Sent after the last line of a shard: the sink seals the shard once ``count`` rows are in.

    ``first``..``last`` are the lines the shard covers; ``digest`` fingerprints their content, so
    a rerun can tell whether they changed.
    """

    shard: str
    count: int
    file: int = 0
    first: int = 0
    last: int = 0
    digest: str = ""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful download, on its way to a pool worker."""

    job: Job
    body: bytes
    http_status: int
    content_type: str
    download_ms: float

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fetched, (self.job, self.body, self.http_status, self.content_type,
                          self.download_ms))  # fmt: skip


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one input line: exactly one manifest row."""

    key: str
    shard: str
    source: str
    line: int
    url: str
    status: Status
    error_kind: str | None = None
    error: str | None = None
    http_status: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    width_in: int | None = None
    height_in: int | None = None
    width_out: int | None = None
    height_out: int | None = None
    path: str | None = None
    sha256: str | None = None  # of the output's bytes, computed where they were made
    original_sha256: str | None = None  # of the downloaded bytes
    download_ms: float = 0.0
    transform_ms: float = 0.0
    cpu_ms: float = 0.0  # CPU time the transform process spent on it
    duplicate_of: str | None = None
    columns: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, job: Job, status: Status, **fields: Any) -> Outcome:
        """The row of ``job``, its provenance filled in."""
        return cls(
            key=job.key,
            shard=job.shard,
            source=job.source,
            line=job.line,
            url=job.url,
            status=status,
            columns=job.columns,
            **fields,
        )

    @classmethod
    def failed(
        cls, job: Job, error: ItemError, *, download_ms: float = 0.0, **fields: Any
    ) -> Outcome:
        """The row of a URL that failed with ``error`` (or that a filter left out)."""
        fields.setdefault("http_status", error.http_status)
        return cls.of(
            job,
            "filtered" if isinstance(error, Filtered) else "failed",
            error_kind=error.kind,
            error=error.message,
            download_ms=download_ms,
            **fields,
        )

    @classmethod
    def duplicate(cls, job: Job) -> Outcome:
        """The row of a line whose URL an earlier line of the input already had."""
        return cls.of(job, "duplicate", duplicate_of=job.duplicate_of)

    def to_row(self) -> dict[str, Any]:
        """The manifest row: every field, in declaration order."""
        return {name: getattr(self, name) for name in _OUTCOME_FIELDS}

    def encode(self) -> Row:
        """The manifest line, and what the coordinator needs to file and count it."""
        row = self.to_row()
        try:
            line = _ROW_ENCODER.encode(row) + "\n"
        except ValueError:  # a NaN or an infinity in an input column: no JSON parser reads them
            line = _ROW_ENCODER.encode(_finite(row)) + "\n"
        return Row(self.key, self.shard, self.status, self.error_kind, self.url,
                   self.bytes_in, self.bytes_out, line)  # fmt: skip

    def __reduce__(self) -> tuple[Any, ...]:  # a tuple of values: ~8x cheaper than the default
        return (Outcome, tuple(getattr(self, name) for name in _OUTCOME_FIELDS))


class Row(NamedTuple):
    """An outcome ready for the manifest, encoded in the process that made it (a lane), so that
    the coordinator only files the line and counts it."""

    key: str
    shard: str
    status: str
    error_kind: str | None
    url: str
    bytes_in: int
    bytes_out: int
    line: str  # the JSON row, with its newline


_OUTCOME_FIELDS = tuple(f.name for f in dataclasses.fields(Outcome))
# one encoder: json.dumps makes one per call; default=str for a parquet column's dates or decimals;
# strict JSON (no bare NaN), which every parser reads
_ROW_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False)


def _finite(value: Any) -> Any:
    """``value`` with every NaN and infinity made null (only for the rare row that holds one)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
