"""What a sealed shard leaves beside its manifest: its seal, its stats, its tars' names.

    manifest/<S>.jsonl.part   the shard's rows while it is open
    manifest/<S>.stats.json   written first when it is complete: counts by status and by error
                              kind, bytes in and out, its lines, the seconds it took
    manifest/<S>.seal.json    then its seal: file, lines, fingerprint; with webdataset, the
                              samples of each of its tars ("tar_samples") ...
    manifest/<S>.jsonl        ... then the part is renamed: the shard is sealed

    webdataset: shards/.packed/<S>-00000.tar (formats.py) -> shards/NNNNN.tar (names: layout.py)
      a sealed shard's tars are named in the order the run met its shards, each shard once every
      shard before it is named: the seal gets "tar_first" (the record, written before any
      rename), then the tars are renamed, then shards/index.json is written again. Numbers run
      from 00000 across the whole folder, with no gap and no repeat, whatever appends, new files
      and kills came between runs: a kill before the record leaves the tars packed, and the next
      run names them; a kill after it, the next run finishes the renames (``TarNames.load``).
      Two builds of the same input name the same tars the same way. In a store
      (``StoredTarNames``) the same steps: the record put in the store's seal, each packed
      tar copied there to its name (a server-side copy) and then deleted, the index put.

A record here is written atomically (atomic.py): whole or absent.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

from .atomic import open_dir, output_error, write_atomic
from .errors import OutputError
from .layout import (
    INDEX,
    MANIFEST,
    PACKED,
    SHARDS,
    manifest_file,
    packed_tar,
    parse_manifest,
    tar_file,
)
from .records import ShardEnd

if TYPE_CHECKING:
    from .objects import ObjectStore

log = logging.getLogger(__name__)

MANIFEST_DIR = MANIFEST  # the manifest folder, under the output root


def _in(folder: Path, shard: str, kind: str) -> Path:
    """A shard's file of ``kind`` in the manifest ``folder`` (named by layout.py)."""
    return folder / PurePath(manifest_file(shard, kind)).name


def part_path(folder: Path, shard: str) -> Path:
    return _in(folder, shard, "part")


def shard_path(folder: Path, shard: str) -> Path:
    return _in(folder, shard, "rows")


def seal_path(folder: Path, shard: str) -> Path:
    return _in(folder, shard, "seal")


def stats_path(folder: Path, shard: str) -> Path:
    return _in(folder, shard, "stats")


def shards_of(folder: Path, kind: str) -> list[str]:
    """The shards that have a file of ``kind`` in the manifest ``folder``, by name."""
    if not folder.is_dir():
        return []
    found = (parse_manifest(path.name) for path in folder.iterdir())
    return sorted(shard for shard, what in filter(None, found) if what == kind)


def seal_json(end: ShardEnd, **more: Any) -> bytes:
    return _json({**dataclasses.asdict(end), **more})


def read_seal(path: Path) -> ShardEnd | None:
    """A shard's seal, or None when it is missing or damaged."""
    data = _read_json(path)
    if data is None:
        return None
    try:
        return ShardEnd(**{f.name: data[f.name] for f in dataclasses.fields(ShardEnd)})
    except (KeyError, TypeError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode("utf-8")


def _utc(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="seconds")


@dataclass(slots=True)
class ShardStats:
    """A shard's figures, counted as its rows are recorded (a resumed part's, when it opens)."""

    statuses: Counter[str] = field(default_factory=Counter)
    error_kinds: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    started: float = field(default_factory=time.time)  # the part opened, in this run
    clock: float = field(default_factory=time.monotonic)

    def add(self, status: str, error_kind: str | None, bytes_in: int, bytes_out: int) -> None:
        self.statuses[status] += 1
        if error_kind is not None:
            self.error_kinds[error_kind] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def to_json(self, end: ShardEnd) -> bytes:
        """``manifest/<S>.stats.json``: ``seconds`` is the time from the shard's part being
        opened by the run that sealed it to its seal (an earlier run's share is not in it)."""
        return _json(
            {
                "shard": end.shard,
                "file": end.file,
                "first_line": end.first,
                "last_line": end.last,
                "lines": end.count,
                "status": dict(sorted(self.statuses.items())),
                "error_kinds": dict(sorted(self.error_kinds.items())),
                "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out,
                "started": _utc(self.started),
                "sealed": _utc(time.time()),
                "seconds": round(time.monotonic() - self.clock, 3),
            }
        )


class TarNames:
    """Names the tars of sealed shards ``shards/NNNNN.tar``, in order; keeps the index."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.folder = out_dir / MANIFEST
        self.tars: list[dict[str, Any]] = []  # shards/index.json's entries, by number
        self.unnamed: list[str] = []  # sealed shards whose tars are packed still, by name

    def load(self) -> None:
        """What earlier runs named (renames a kill cut short are finished now), and which
        sealed shards they left unnamed; writes the index."""
        for shard in self._seals():
            data = self._seal(shard)
            if data is None or "tar_samples" not in data:
                continue
            if not self._sealed(shard):
                continue  # not sealed: its tars were never named, and will be packed again
            if data.get("tar_first") is None:
                self.unnamed.append(shard)
            else:
                self._rename(shard, int(data["tar_first"]), list(data["tar_samples"]))
        self.tars.sort(key=lambda entry: str(entry["name"]))
        self._write_index()

    @property
    def next(self) -> int:
        return len(self.tars)

    def name(self, shard: str) -> None:
        """Give the sealed ``shard``'s packed tars the next numbers (none when it has none, or
        when it is named already)."""
        data = self._seal(shard)
        if data is None or "tar_samples" not in data or data.get("tar_first") is not None:
            return
        first = self.next
        self._record(shard, _json({**data, "tar_first": first}))
        self._rename(shard, first, list(data["tar_samples"]))
        self._write_index()

    def _seals(self) -> list[str]:
        return shards_of(self.folder, "seal")

    def _seal(self, shard: str) -> dict[str, Any] | None:
        return _read_json(seal_path(self.folder, shard))

    def _sealed(self, shard: str) -> bool:
        return shard_path(self.folder, shard).exists()

    def _record(self, shard: str, seal: bytes) -> None:
        write_atomic(seal_path(self.folder, shard), seal, root=self.out_dir)

    def _rename(self, shard: str, first: int, samples: list[int]) -> None:
        packed = _folder(self.out_dir, PACKED)
        try:
            named = _folder(self.out_dir, SHARDS)
            try:
                for index, count in enumerate(samples):
                    source = PurePath(packed_tar(shard, index)).name
                    target = tar_file(first + index)
                    _move(packed, source, named, PurePath(target).name, self.out_dir / target)
                    self._named(shard, target, count)
            finally:
                os.close(named)
        finally:
            os.close(packed)

    def _write_index(self) -> None:
        total = sum(int(entry["samples"]) for entry in self.tars)
        index = {"tars": self.tars, "samples": total}
        self._put_index(_json(index))

    def _put_index(self, index: bytes) -> None:
        write_atomic(self.out_dir / INDEX, index, root=self.out_dir)

    def _named(self, shard: str, target: str, count: int) -> None:
        self.tars.append({"name": PurePath(target).name, "samples": count, "shard": shard})


class StoredTarNames(TarNames):
    """The same names in a store (objects.py): the seal there holds the record, each packed
    tar is copied in the store to its name and then deleted, the index is put. ``out_dir`` is
    the store's staging, which holds the seals the store held when the run began (mirror.py:
    a shard is sealed in the store once its seal is, put last); a seal put since (by a Dask
    task) is read from the store."""

    def __init__(self, out_dir: Path, store: ObjectStore) -> None:
        super().__init__(out_dir)
        self.store = store

    def _seal(self, shard: str) -> dict[str, Any] | None:
        if seal_path(self.folder, shard).is_file():
            return super()._seal(shard)
        data = self.store.get_bytes(manifest_file(shard, "seal"))
        try:
            seal = None if data is None else json.loads(data)
        except ValueError:
            return None
        return seal if isinstance(seal, dict) else None

    def _sealed(self, shard: str) -> bool:
        return True  # its seal is in the store: it was put last

    def _record(self, shard: str, seal: bytes) -> None:
        self.store.put_bytes(manifest_file(shard, "seal"), seal)
        super()._record(shard, seal)  # staging's copy, as the store's

    def _rename(self, shard: str, first: int, samples: list[int]) -> None:
        """Each packed tar copied to its name, then all deleted: a kill between them copies
        again; a packed tar gone means it was copied and deleted (or removed by hand)."""
        copied = []
        for index, count in enumerate(samples):
            source, target = packed_tar(shard, index), tar_file(first + index)
            try:
                self.store.copy(source, target)
            except OutputError:
                present = set(self.store.names(SHARDS))  # listed only when a copy failed
                if source in present:  # there, yet not copied: the store's error stands
                    raise
                if target not in present:
                    log.warning("%s: missing (neither named nor packed); its samples are lost",
                                self.store.url(target))  # fmt: skip
            else:
                copied.append(source)
            self._named(shard, target, count)
        self.store.delete(copied)

    def _put_index(self, index: bytes) -> None:
        self.store.put_bytes(INDEX, index)


class InOrder:
    """Names sealed shards' tars in the order the run met the shards: each once it and every
    shard before it is sealed (``finish``: the sealed ones left, when the run ends)."""

    def __init__(self, names: TarNames) -> None:
        self.names = names
        self._order: deque[str] = deque()
        self._sealed: set[str] = set()

    def met(self, shard: str) -> None:
        self._order.append(shard)

    def sealed(self, shard: str) -> None:
        self._sealed.add(shard)
        while self._order and self._order[0] in self._sealed:
            self._name(self._order.popleft())

    def finish(self) -> None:
        """The run ends with a shard still open: those sealed after it are named too."""
        for shard in [shard for shard in self._order if shard in self._sealed]:
            self._name(shard)
        self._order.clear()

    def _name(self, shard: str) -> None:
        self._sealed.discard(shard)
        self.names.name(shard)

    @classmethod
    def start(cls, out_dir: Path, store: ObjectStore | None = None) -> InOrder:
        """What earlier runs named finished, what they sealed unnamed named now, in name order
        (in ``store``, when the output is there)."""
        names = TarNames(out_dir) if store is None else StoredTarNames(out_dir, store)
        names.load()
        for shard in names.unnamed:
            names.name(shard)
        return cls(names)


def _move(packed: int, source: str, named: int, target: str, path: Path) -> None:
    try:
        os.replace(source, target, src_dir_fd=packed, dst_dir_fd=named)
    except FileNotFoundError:
        try:
            os.stat(target, dir_fd=named, follow_symlinks=False)
        except FileNotFoundError:  # removed by hand: said, and the numbers stay as they are
            log.warning("%s: missing (neither named nor packed); its samples are lost", path)
    except OSError as exc:
        raise output_error(path, exc) from None


def _folder(out_dir: Path, name: str) -> int:
    try:
        return open_dir(out_dir, PurePath(name))
    except OSError as exc:
        raise output_error(out_dir / name, exc) from None
