"""The manifest: one JSON line per input URL, one file per shard; and what a rerun can skip.

Rows of shard N are appended to ``manifest/<N>.jsonl.part`` as they arrive (in completion order,
written in batches by the file buffer). When the source has said how many URLs the shard holds
(``ShardEnd``) and that many rows are in, the part is closed and renamed to
``manifest/<N>.jsonl``: a sealed shard's manifest is always whole. Only the thread that owns the
Sink calls it, so it needs no lock.

A rerun with the same output folder resumes (``Resume``): a sealed shard is skipped whole, from its
file name alone; a shard with a part is "adopted" when the source reaches it: its final rows are
kept (rewritten atomically, so a half line left by a kill, a duplicate or a retryable failure is
dropped) and only its other URLs are done again. At most one shard's keys are in memory at once.
``run.json`` holds the settings that decide keys and outputs; a rerun with other ones is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .atomic import write_atomic
from .config import Config
from .errors import PipelineError, is_final
from .records import Job, Outcome, ShardEnd

MANIFEST_DIR = "manifest"
_BUFFER = 1 << 16
_ROW_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one encoder: json.dumps makes one per call


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
        part.file.write(_ROW_ENCODER.encode(outcome.to_row()) + "\n")
        part.rows += 1
        self._seal_if_complete(shard, part)

    def end_shard(self, end: ShardEnd) -> None:
        """The source has read all ``end.count`` URLs of ``end.shard``."""
        part = self._part(end.shard)
        part.expected = end.count
        self._seal_if_complete(end.shard, part)

    def _part(self, shard: int) -> _Part:
        part = self._parts.get(shard)
        if part is None:  # a resumed shard's part holds its final rows already: append to them
            path = self.part_path(shard)
            kept = _count_lines(path) if path.exists() else 0
            file = path.open("a", encoding="utf-8", buffering=_BUFFER)
            part = self._parts[shard] = _Part(file, rows=kept)
        return part

    def _seal_if_complete(self, shard: int, part: _Part) -> None:
        if part.expected is None or part.rows < part.expected:
            return
        part.file.close()
        os.replace(self.part_path(shard), self.shard_path(shard))
        del self._parts[shard]
        self.sealed += 1

    def part_path(self, shard: int) -> Path:
        return part_path(self.folder, shard)

    def shard_path(self, shard: int) -> Path:
        return shard_path(self.folder, shard)

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


def part_path(folder: Path, shard: int) -> Path:
    return folder / f"{shard:06d}.jsonl.part"


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"{shard:06d}.jsonl"


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


class Resume:
    """Filters the job stream of a rerun down to what is not done yet."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.folder = out_dir / MANIFEST_DIR
        self.sealed = _shards(self.folder, ".jsonl")
        self.partial = _shards(self.folder, ".jsonl.part")
        self.skipped = 0  # URLs found done, for the report

    def pending(self, items: Iterable[Job | ShardEnd]) -> Iterator[Job | ShardEnd]:
        """``items`` less the jobs already done (runs in whichever thread pulls from it)."""
        current, done = -1, frozenset[str]()
        for item in items:
            if item.shard in self.sealed:
                self.skipped += isinstance(item, Job)
                continue
            if item.shard != current:
                current = item.shard
                done = self._adopt(item.shard) if item.shard in self.partial else frozenset()
            if isinstance(item, Job) and item.key in done:
                self.skipped += 1
                continue
            yield item

    def _adopt(self, shard: int) -> frozenset[str]:
        """Keep the final rows of a shard's part; return their keys."""
        path = part_path(self.folder, shard)
        kept, keys = [], set()
        with path.open(encoding="utf-8") as f:
            for line in f:
                row = _parse(line)
                if row is None or row["key"] in keys:
                    continue
                if is_final(row.get("error_kind"), row.get("http_status")):
                    kept.append(line)
                    keys.add(row["key"])
        write_atomic(path, "".join(kept).encode("utf-8"))
        for temp in (self.out_dir / "images" / f"{shard:06d}").glob("*/.*.tmp"):
            temp.unlink(missing_ok=True)  # left by a worker killed mid-write
        return frozenset(keys)


def _parse(line: str) -> dict[str, Any] | None:
    """A whole manifest row, or None for a half line (cut by a kill) or a damaged one."""
    if not line.endswith("\n"):
        return None
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and "key" in row else None


def _shards(folder: Path, suffix: str) -> set[int]:
    names = (p.name[: -len(suffix)] for p in folder.glob(f"*{suffix}")) if folder.is_dir() else ()
    return {int(name) for name in names if name.isdigit()}


RUN_FILE = "run.json"


def fingerprint(config: Config) -> dict[str, Any]:
    """The settings that decide keys and output bytes: a resume must use the same ones."""
    transform = config.transform
    return {
        "input": dataclasses.asdict(config.input),
        "folder_size": config.output.folder_size,
        "output": [transform.format, transform.quality, transform.background, transform.resample,
                   transform.reducing_gap, transform.max_pixels],
        "ops": [[type(op).__name__, *dataclasses.astuple(op)] for op in transform.ops],
    }  # fmt: skip


def prepare(out_dir: Path, config: Config, *, restart: bool) -> None:
    """Make ``out_dir`` ready: start over if asked, else check a rerun uses the same settings."""
    run_file = out_dir / RUN_FILE
    if restart:
        shutil.rmtree(out_dir / MANIFEST_DIR, ignore_errors=True)
        run_file.unlink(missing_ok=True)
    wanted = fingerprint(config)
    if run_file.exists():
        if json.loads(run_file.read_text(encoding="utf-8")) != wanted:
            raise PipelineError(
                f"{out_dir}: this output folder was made with other input, output or transform "
                "settings; rerun with --restart to start over, or choose another --out"
            )
        return
    write_atomic(run_file, json.dumps(wanted, indent=1).encode("utf-8"))


def read_manifest(out_dir: Path, *, include_parts: bool = True) -> Iterator[dict[str, Any]]:
    """Every manifest row of ``out_dir``, shard by shard (sealed shards, and parts if asked)."""
    folder = out_dir / MANIFEST_DIR
    patterns = ["*.jsonl", "*.jsonl.part"] if include_parts else ["*.jsonl"]
    paths = sorted(p for pattern in patterns for p in folder.glob(pattern))
    for path in paths:
        yield from read_rows(path)


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of one manifest file."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):  # a half-written last line is not a row
                yield json.loads(line)
