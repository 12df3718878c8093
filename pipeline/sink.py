"""The manifest: one JSON line per input line, one file per shard; and the output folder's lock.

Rows of shard S are appended to ``manifest/<S>.jsonl.part`` as they arrive, in completion order.
They are written (one ``write`` per open shard) every ``output.flush_rows`` rows and at least every
``output.flush_seconds``: a kill -9 loses at most that many finished rows, so repeated kills still
make progress. A write that fails (a full disk) is cut back to the last whole row, and raises an
OutputError: no half line is ever left for a rerun to read. When the source has said how many
lines the shard holds (``ShardEnd``) and that many rows are in, its stats (``<S>.stats.json``)
and its seal (``<S>.seal.json``: the file id, the lines it covers and their fingerprint) are
written, then the part is renamed to ``manifest/<S>.jsonl``: a sealed shard's manifest is always
whole, and always has its seal (seals.py). With an output in a store, the folder is its staging,
and a sealed shard is then put there, its seal last (``mirror.publish_shard``). With
``output.format = "webdataset"`` or ``output.parquet``, a complete shard is first handed to a
packing process (formats.py), and sealed once its tars and parquet are written (``settle``,
called from the coordinator's loop); its tars are then named ``shards/NNNNN.tar``, in the order
the shards were met (seals.py).
Nothing here follows a symbolic link (atomic.py). Only the thread that owns the Sink calls it,
so it needs no lock.

One run at a time may write into an output folder: ``lock`` holds ``.lock`` with ``flock`` for the
whole run, and a second run is refused with the first one's pid and start time.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .atomic import open_append, open_dir, output_error, write_all, write_atomic
from .config import OutputConfig
from .errors import OutputError, PipelineError
from .formats import Packed, make_formats, remove_staged
from .layout import LOCK, MANIFEST, OutputLayout, manifest_file, parse_manifest
from .mirror import publish_shard
from .objects import ObjectStore
from .parent import exit_with
from .records import Outcome, Row, ShardEnd
from .seals import MANIFEST_DIR as MANIFEST_DIR
from .seals import InOrder, ShardStats, seal_json, stats_path
from .seals import part_path as part_path
from .seals import read_seal as read_seal
from .seals import seal_path as seal_path
from .seals import shard_path as shard_path


@dataclass(slots=True)
class _Part:
    fd: int
    size: int  # bytes written: the file ends with a whole row there
    rows: int = 0
    pending: list[str] = field(default_factory=list)  # rows not written yet
    end: ShardEnd | None = None
    stats: ShardStats = field(default_factory=ShardStats)


class Sink:
    """Appends manifest rows per shard and seals each shard's file once it is complete."""

    def __init__(
        self,
        out_dir: Path,
        config: OutputConfig | None = None,
        start_method: str = "spawn",
        *,
        name_tars: bool = True,
        store: ObjectStore | None = None,
    ) -> None:
        config = config or OutputConfig()
        self.store = store  # each sealed shard is put there too, its seal last (mirror.py)
        self.config = config
        self.start_method = start_method  # of the process that packs tars and parquet
        self._packer: ProcessPoolExecutor | None = None
        self._packing: deque[tuple[str, ShardEnd, Future[Packed]]] = deque()
        # webdataset: shards in the order they were met, to name their tars in that order (not
        # with name_tars: a cluster task's, which the driver names)
        self._stats: dict[str, ShardStats] = {}  # of the shards being packed
        self._names: InOrder | None = None
        self.out_dir = out_dir
        self.layout = OutputLayout.of(config)
        self.folder = out_dir / MANIFEST
        self.flush_rows = config.flush_rows
        self.flush_seconds = config.flush_seconds
        self._parts: dict[str, _Part] = {}
        self._pending = 0  # rows not written yet, every part together
        self._since: float | None = None  # when the oldest of them came
        self.sealed = 0
        self.written = 0  # rows written to the manifest by this Sink
        try:
            os.close(open_dir(out_dir, Path(MANIFEST)))
        except OSError as exc:
            raise output_error(self.folder, exc) from None
        if self.layout.webdataset and name_tars:
            self._names = InOrder.start(out_dir, store)  # in the store, with one

    def add(self, outcome: Outcome) -> None:
        """Record one line's outcome."""
        self.write(outcome.encode())

    def write(self, row: Row) -> None:
        """Record one line's outcome, already encoded. Raises OutputError."""
        part = self._part(row.shard)
        part.pending.append(row.line)
        part.rows += 1
        part.stats.add(row.status, row.error_kind, row.bytes_in, row.bytes_out)
        self._pending += 1
        if self._since is None:
            self._since = time.monotonic()
        if self._pending >= self.flush_rows:
            self.flush()
        self._seal_if_complete(row.shard, part)

    def end_shard(self, end: ShardEnd) -> None:
        """The source has read all ``end.count`` lines of ``end.shard``."""
        part = self._part(end.shard)
        part.end = end
        if self._names is not None:
            self._names.met(end.shard)
        self._seal_if_complete(end.shard, part)

    def flush_due(self) -> float | None:
        """Seconds until rows waiting must be written (0: now), None when none are waiting."""
        if self._since is None:
            return None
        return max(0.0, self._since + self.flush_seconds - time.monotonic())

    def flush(self) -> None:
        """Write every waiting row. Raises OutputError, leaving each part at a whole row."""
        for shard, part in self._parts.items():
            self._write(shard, part)
        self._pending, self._since = 0, None

    def _write(self, shard: str, part: _Part) -> None:
        if not part.pending:
            return
        rows, part.pending = part.pending, []
        try:
            self._append(part, "".join(rows).encode("utf-8"), len(rows))
        except OSError:  # a full disk: keep as many whole rows as still fit, one at a time
            try:
                for row in rows:
                    self._append(part, row.encode("utf-8"), 1)
            except OSError as exc:
                raise output_error(part_path(self.folder, shard), exc) from None

    def _append(self, part: _Part, data: bytes, rows: int) -> None:
        try:
            write_all(part.fd, data)
        except OSError:
            with contextlib.suppress(OSError):  # no half row for a rerun to read
                os.ftruncate(part.fd, part.size)
            raise
        part.size += len(data)
        self.written += rows

    def _part(self, shard: str) -> _Part:
        part = self._parts.get(shard)
        if part is None:  # a resumed shard's part holds its final rows already: append to them
            path = part_path(self.folder, shard)
            fd = open_append(path, root=self.out_dir)
            size = os.fstat(fd).st_size
            stats = _count_rows(path) if size else ShardStats()
            kept = sum(stats.statuses.values())
            part = self._parts[shard] = _Part(fd, size, rows=kept, stats=stats)
        return part

    def _seal_if_complete(self, shard: str, part: _Part) -> None:
        if part.end is None or part.rows < part.end.count:
            return
        self._pending -= len(part.pending)
        self._write(shard, part)
        os.close(part.fd)
        del self._parts[shard]
        if not self.layout.packs:
            self._seal(shard, part.end, part.stats, Packed())
            return
        if self._packer is None:  # one process packs, off the coordinator's GIL; it ends with
            context = multiprocessing.get_context(self.start_method)  # us, even on a kill -9
            self._packer = ProcessPoolExecutor(
                1, mp_context=context, initializer=exit_with, initargs=(os.getpid(),)
            )
        parquet = self.out_dir / manifest_file(shard, "parquet")
        part_file = part_path(self.folder, shard)
        future = self._packer.submit(
            make_formats, self.out_dir, part_file, parquet, self.config, self.store
        )  # with a store, the packer puts the tars and the parquet: no body passes through here
        self._packing.append((shard, part.end, future))
        self._stats[shard] = part.stats

    def settle(self, *, wait: bool = False) -> None:
        """Seal the shards whose tars and parquet are written (all of them, with ``wait``), in
        the order their last rows came. Raises OutputError when packing one failed."""
        while self._packing and (wait or self._packing[0][2].done()):
            shard, end, future = self._packing.popleft()
            try:
                packed = future.result()
            except BrokenProcessPool:
                raise OutputError(f"{shard}: the process packing its shards died") from None
            self._seal(shard, end, self._stats.pop(shard), packed)

    def _seal(self, shard: str, end: ShardEnd, stats: ShardStats, packed: Packed) -> None:
        write_atomic(stats_path(self.folder, shard), stats.to_json(end), root=self.out_dir)
        more = {"tar_samples": list(packed.samples)} if self.layout.webdataset else {}
        write_atomic(seal_path(self.folder, shard), seal_json(end, **more), root=self.out_dir)
        try:
            os.replace(part_path(self.folder, shard), shard_path(self.folder, shard))
        except OSError as exc:
            raise output_error(shard_path(self.folder, shard), exc) from None
        remove_staged(self.out_dir, packed.staged)
        if self.store is not None:  # OutputError: not sealed in the store, redone by a rerun
            publish_shard(self.store, self.out_dir, shard)
        self.sealed += 1
        if self._names is not None:
            self._names.sealed(shard)

    @property
    def open_shards(self) -> list[str]:
        """Shards with rows still missing (empty after a complete run; shards being packed have
        all theirs)."""
        return sorted(self._parts)

    def close(self) -> None:
        """Write what waits, seal what is being packed, and close every open part; an incomplete
        shard keeps its ``.part`` name. Raises OutputError (after closing them all) when a write
        fails."""
        try:
            self.flush()
            self.settle(wait=True)
            if self._names is not None:  # the run stopped with a shard open: name those after it
                self._names.finish()
        finally:
            for part in self._parts.values():
                os.close(part.fd)
            self._parts.clear()
            if self._packer is not None:
                self._packer.shutdown(wait=True, cancel_futures=True)
                self._packer = None

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        with contextlib.suppress(OutputError):  # the first error is the one to report
            self.close()


def _count_rows(path: Path) -> ShardStats:
    """The figures of a resumed part's rows (whole rows only: resume rewrote it)."""
    stats = ShardStats()
    for row in read_rows(path):
        stats.add(row["status"], row.get("error_kind"), row["bytes_in"], row["bytes_out"])
    return stats


def read_manifest(out_dir: Path, *, include_parts: bool = True) -> Iterator[dict[str, Any]]:
    """Every manifest row of ``out_dir``, shard by shard (sealed shards, and parts if asked)."""
    folder = out_dir / MANIFEST
    kinds = ("rows", "part") if include_parts else ("rows",)
    found = [(parse_manifest(p.name), p) for p in folder.iterdir()] if folder.is_dir() else []
    paths = sorted(path for named, path in found if named is not None and named[1] in kinds)
    for path in paths:
        yield from read_rows(path)


_ROW_KEYS = frozenset({"key", "line", "url", "status"})  # what readers of rows rely on


def read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of one manifest file (a half-written last line is not a row); a damaged line
    stops the reader with one line naming the file and the line."""
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.endswith(b"\n"):
                try:
                    row = json.loads(line)
                except ValueError:
                    row = None
                if not isinstance(row, dict) or not row.keys() >= _ROW_KEYS:
                    raise OutputError(f"{path}: line {number} is damaged (not a manifest row)")
                yield row


@contextlib.contextmanager
def lock(out_dir: Path, *, what: str = "") -> Iterator[None]:
    """Hold the output folder for one run; raise PipelineError when another run holds it.
    ``what``: the setting that named the folder (``output.staging``), named in the errors as
    the one to change; by default --out."""
    path, named = out_dir / LOCK, f"{what} " if what else ""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise PipelineError(f"{named}{path}: cannot open the lock file: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise PipelineError(f"{named}{path}: cannot lock: {exc.strerror}") from None
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            raise PipelineError(
                f"{named}{out_dir}: another pipeline run is writing into this folder ({holder}); "
                f"wait for it to end, or choose another {what or '--out'}"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, started {started}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the flock
