"""The manifest: one JSON line per input URL, one file per shard.

Rows of shard N go to ``manifest/<N>.jsonl.part`` as they arrive (in completion order, written
in batches by the file buffer). When the source has said how many URLs the shard holds
(``ShardEnd``) and that many rows are written, the part is closed and renamed to
``manifest/<N>.jsonl``: a finished shard's manifest is always whole. Only the thread that owns the
Sink calls it, so it needs no lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .records import Outcome, ShardEnd

MANIFEST_DIR = "manifest"
_BUFFER = 1 << 16


@dataclass(slots=True)
class _Part:
    file: IO[str]
    rows: int = 0
    expected: int | None = None


class Sink:
    """Appends manifest rows per shard and seals each shard's file once it is complete."""

    def __init__(self, out_dir: Path) -> None:
        self.folder = out_dir / MANIFEST_DIR
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parts: dict[int, _Part] = {}
        self.sealed = 0

    def add(self, outcome: Outcome) -> None:
        """Record one URL's outcome."""
        shard = outcome.shard
        part = self._part(shard)
        part.file.write(json.dumps(outcome.to_row(), separators=(",", ":")) + "\n")
        part.rows += 1
        self._seal_if_complete(shard, part)

    def end_shard(self, end: ShardEnd) -> None:
        """The source has read all ``end.count`` URLs of ``end.shard``."""
        part = self._part(end.shard)
        part.expected = end.count
        self._seal_if_complete(end.shard, part)

    def _part(self, shard: int) -> _Part:
        part = self._parts.get(shard)
        if part is None:
            path = self.part_path(shard)
            part = self._parts[shard] = _Part(path.open("w", encoding="utf-8", buffering=_BUFFER))
        return part

    def _seal_if_complete(self, shard: int, part: _Part) -> None:
        if part.expected is None or part.rows < part.expected:
            return
        part.file.close()
        os.replace(self.part_path(shard), self.shard_path(shard))
        del self._parts[shard]
        self.sealed += 1

    def part_path(self, shard: int) -> Path:
        return self.folder / f"{shard:06d}.jsonl.part"

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"{shard:06d}.jsonl"

    @property
    def open_shards(self) -> list[int]:
        """Shards with rows still missing (empty after a complete run)."""
        return sorted(self._parts)

    def close(self) -> None:
        """Flush and close every open part; an incomplete shard keeps its ``.part`` name."""
        for part in self._parts.values():
            part.file.close()
        self._parts.clear()

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_manifest(out_dir: Path, *, include_parts: bool = True) -> Iterator[dict[str, Any]]:
    """Every manifest row of ``out_dir``, shard by shard (sealed shards, and parts if asked)."""
    folder = out_dir / MANIFEST_DIR
    patterns = ["*.jsonl", "*.jsonl.part"] if include_parts else ["*.jsonl"]
    paths = sorted(p for pattern in patterns for p in folder.glob(pattern))
    for path in paths:
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):  # a half-written last line is not a row
                    yield json.loads(line)
