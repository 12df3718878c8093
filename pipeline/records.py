"""The records that travel between the stages: small, frozen, picklable.

Job       one input URL with its stable key          sources  -> download
ShardEnd  "shard N had K URLs"                        sources  -> sink (via the download stage)
Fetched   a downloaded body                          download -> transform
Outcome   the result for one URL, ok or failed       transform/download -> sink (one manifest row)
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ItemError

Status = Literal["ok", "failed"]


@dataclass(frozen=True, slots=True)
class Job:
    """One URL to process. ``(shard, index)`` is stable for the same input files."""

    shard: int
    index: int
    url: str

    @property
    def key(self) -> str:
        return f"{self.shard:06d}-{self.index:06d}"

    def output_path(self, extension: str, folder_size: int) -> str:
        """The output file, relative to the output folder: named by a hash, never by the URL.

        ``images/<shard>/<block>/<index>-<hash>.<ext>``: at most ``folder_size`` files a folder.
        """
        digest = hashlib.blake2b(self.url.encode("utf-8", "surrogatepass"), digest_size=8)
        block = self.index // folder_size
        return (
            f"images/{self.shard:06d}/{block:04d}/{self.index:06d}-{digest.hexdigest()}.{extension}"
        )


@dataclass(frozen=True, slots=True)
class ShardEnd:
    """Sent after the last URL of a shard: the sink seals the shard once ``count`` rows are in."""

    shard: int
    count: int


@dataclass(frozen=True, slots=True)
class Fetched:
    """A successful download, on its way to a pool worker."""

    job: Job
    body: bytes
    http_status: int
    content_type: str
    download_ms: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one URL: exactly one manifest row."""

    key: str
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
    download_ms: float = 0.0
    transform_ms: float = 0.0
    cpu_ms: float = 0.0  # CPU time the transform process spent on it

    @property
    def shard(self) -> int:
        return int(self.key.partition("-")[0])

    @classmethod
    def failed(
        cls, job: Job, error: ItemError, *, download_ms: float = 0.0, **fields: Any
    ) -> Outcome:
        """The row of a URL that failed with ``error``."""
        fields.setdefault("http_status", error.http_status)
        return cls(
            key=job.key,
            url=job.url,
            status="failed",
            error_kind=error.kind,
            error=error.message,
            download_ms=download_ms,
            **fields,
        )

    def to_row(self) -> dict[str, Any]:
        """The manifest row: every field, in declaration order."""
        return {name: getattr(self, name) for name in _OUTCOME_FIELDS}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Outcome:
        return cls(**row)


_OUTCOME_FIELDS = tuple(f.name for f in dataclasses.fields(Outcome))
