"""An output in an object store: objects put whole, read, listed and copied there; its lock.

A store has no rename and no append, so a run into ``s3://bucket/prefix`` writes every file to
local staging first (``output.staging``) and puts each finished one whole, under the same
relative name it has in a local output folder (layout.py): nothing half-written is ever an
object. ``ObjectStore`` is what every part of a run uses to reach it (it is pickled to lanes,
the packer and Dask workers, and makes its filesystem in each process, through fsspec):

    put_file(local, name)   one finished file, whole (an image, a caption, a tar)
    put_bytes(name, data)   a small record (a manifest, a seal, run.json, a report)
    get_bytes(name)         a record, or None when there is none
    get_many(names)         records, fetched concurrently
    names(prefix)           the names under a prefix, relative to the output
    copy(src, dst)          in the store (S3: CopyObject), never through this process
    delete(names)           gone, missing ones ignored

``output_of(config.output)`` says where a run writes: a local folder, or an ObjectStore.

``Uploads`` puts files concurrently without a thread of its own each: at most ``limit`` puts
run at once as coroutines on fsspec's own event loop (one thread a process, which the
filesystem starts), and each put's result is a ``concurrent.futures.Future``.

One writer per output (``store_lock``): a store has no flock, so the lock is an object,
``<output>/.lock``, created only where none is (a conditional put, ``If-None-Match: *``),
holding its owner and its lease. The owner rewrites it every third of the lease, each time only
if it is still its own (``If-Match`` its ETag); a run that finds it renewed within the lease is
refused with the one line a locked local folder gives. An owner killed (kill -9, a lost
machine) stops renewing: once its lease is over, the next run takes it over, again with
``If-Match`` on the stale object's ETag, so of two runs taking it at once one wins. The lease is
measured against the store's own time of the last renewal (LastModified), not the owner's clock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime
import json
import logging
import os
import posixpath
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import OutputConfig
from .errors import OutputError, PipelineError
from .layout import LOCK
from .storage import Location, failures, parse_location, redact

log = logging.getLogger(__name__)

LEASE_S = 60.0  # a crashed owner's lock is taken over this long after its last renewal
LOCKING_SCHEMES = frozenset({"s3", "s3a"})  # conditional puts: If-None-Match / If-Match


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class ObjectStore:
    """An output location in a store, as every process of a run reaches it (see the module)."""

    location: Location

    @classmethod
    def check(cls, location: Location) -> ObjectStore:
        """A store a run can write into: one other processes reach too (not ``memory://``),
        through an asynchronous filesystem, at a path with no empty, . or .. part (``s3://b//x``
        would be the objects ``/x/...``, not ``x/...``). Raises PipelineError (one line)."""
        if location.scheme == "memory":
            raise PipelineError(
                f"output.dir {location}: memory:// lives in one process, and a run writes from "
                "several; give a store or a local folder"
            )
        parts = location.path.split("/")
        if any(part in ("", ".", "..") for part in parts):
            tidy = redact(location.child(posixpath.normpath(location.path)))
            raise PipelineError(
                f"output.dir {location}: an empty, . or .. part in its path names other objects "
                f"in a store than in a folder (a store keeps them as they are); write {tidy}"
            )
        if not getattr(location.filesystem(), "async_impl", False):
            raise PipelineError(f"output.dir {location}: cannot write to this store")
        return cls(location)

    @property
    def fs(self) -> Any:
        return self.location.filesystem()  # fsspec caches one per options, per process

    @property
    def root(self) -> str:
        """The output's path in the store's own form (``bucket/prefix``)."""
        return str(self.fs._strip_protocol(self.location.url)).rstrip("/")

    def key(self, name: str) -> str:
        """The store path of ``name``, a path relative to the output (``manifest/x.seal.json``)."""
        return f"{self.root}/{name}"

    def __str__(self) -> str:
        return str(self.location)

    def url(self, name: str) -> str:
        """``name`` as it may be shown: the full URL, redacted."""
        return redact(self.location.child(self.key(name)))

    def _error(self, name: str, exc: BaseException) -> OutputError:
        return OutputError(f"{self.url(name)}: {_why(exc)}")

    def put_file(self, local: Path, name: str) -> None:
        """Put one finished local file whole. Raises OutputError."""
        try:
            self.fs.put_file(str(local), self.key(name))
        except failures() as exc:
            raise self._error(name, exc) from None

    def put_bytes(self, name: str, data: bytes) -> None:
        """Put a small record whole. Raises OutputError."""
        try:
            self.fs.pipe_file(self.key(name), data)
        except failures() as exc:
            raise self._error(name, exc) from None

    def get_bytes(self, name: str) -> bytes | None:
        """A record's bytes; None when there is none. Raises OutputError."""
        try:
            return bytes(self.fs.cat_file(self.key(name)))
        except FileNotFoundError:
            return None
        except failures() as exc:
            raise self._error(name, exc) from None

    def get_many(self, names: Iterable[str]) -> dict[str, bytes]:
        """Records' bytes by name, fetched concurrently; missing ones left out. Raises
        OutputError."""
        keys = {self.key(name): name for name in names}
        if not keys:
            return {}
        try:
            found = self.fs.cat(list(keys), on_error="return")
        except failures() as exc:
            raise self._error(next(iter(keys.values())), exc) from None
        data = {}
        for key, value in found.items():
            name = keys.get(str(key)) or keys[self.fs._strip_protocol(str(key))]
            if isinstance(value, FileNotFoundError):
                continue
            if isinstance(value, BaseException):
                raise self._error(name, value)
            data[name] = bytes(value)
        return data

    def names(self, prefix: str = "") -> list[str]:
        """Every name under ``prefix`` (relative to the output, sorted); none under a prefix
        without objects. Raises OutputError, also when the bucket itself is not there (fsspec's
        find gives [] for a missing prefix: its FileNotFoundError is the bucket's), so a dry
        run or a report never takes a missing bucket for an empty output."""
        base = self.key(prefix).rstrip("/")
        try:
            found = self.fs.find(base, refresh=True)
        except failures() as exc:
            raise self._error(prefix, exc) from None
        finally:  # a listing kept would answer later reads (and listings) of newer objects
            self.fs.invalidate_cache()
        start = len(self.root) + 1
        return sorted(str(key)[start:] for key in found if str(key).startswith(self.root + "/"))

    def copy(self, source: str, target: str) -> None:
        """Copy an object inside the store (its bytes never come here). Raises OutputError."""
        try:
            self.fs.copy(self.key(source), self.key(target))
        except failures() as exc:
            raise self._error(target, exc) from None

    def delete(self, names: Iterable[str]) -> None:
        """Remove objects; missing ones are ignored. Raises OutputError."""
        keys = [self.key(name) for name in names]
        if not keys:
            return
        try:
            self.fs.rm(keys)
        except FileNotFoundError:
            pass
        except failures() as exc:
            raise self._error(str(len(keys)) + " objects", exc) from None


class Uploads:
    """At most ``limit`` puts at once, as coroutines on the filesystem's own loop (no thread of
    their own); ``put`` returns at once with a Future, which holds the put's OutputError."""

    def __init__(self, store: ObjectStore, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 (got {limit})")
        self.store, self.limit = store, limit
        self.fs = store.fs
        self._loop: asyncio.AbstractEventLoop = self.fs.loop
        self._slots: asyncio.Semaphore | None = None  # made on the loop, by its first put
        self._running = 0
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Puts submitted and not finished yet."""
        return self._running

    def put(self, local: Path, name: str) -> concurrent.futures.Future[None]:
        with self._lock:
            self._running += 1
        future = asyncio.run_coroutine_threadsafe(self._put(local, name), self._loop)
        future.add_done_callback(self._done)
        return future

    def _done(self, _: concurrent.futures.Future[None]) -> None:
        with self._lock:
            self._running -= 1

    async def _put(self, local: Path, name: str) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            try:
                await self.fs._put_file(str(local), self.store.key(name))
            except failures() as exc:
                raise self.store._error(name, exc) from None


def output_of(output: OutputConfig) -> Path | ObjectStore:
    """Where ``output.dir`` says a run writes: a local folder (not made here), or a store a run
    can write into. Raises PipelineError (one line) before any work, and never makes a local
    folder named after a URL (``s3:``)."""
    where = parse_location(output.dir, output.storage_options, what="output.dir")
    if isinstance(where, Path):
        return where
    return ObjectStore.check(where)


# --- the lock of an output in a store --------------------------------------------------------


class StoreLock:
    """The lock object of one output in a store; see the module docstring. ``lost`` is set when
    another run took it over (this one's lease had ended: the owner must stop writing)."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.time,
        renew_s: float | None = None,  # lease_s / 3
    ) -> None:
        if store.location.scheme not in LOCKING_SCHEMES:
            raise PipelineError(
                f"{store.location}: an output in {store.location.scheme}:// cannot be locked "
                "yet (only s3://)"
            )
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0 (got {lease_s})")
        self.store, self.lease_s, self.clock = store, lease_s, clock
        self.renew_s = lease_s / 3 if renew_s is None else renew_s
        self._token, self._renewals = secrets.token_hex(6), 0  # each put's bytes (ETag) differ
        self.fs = store.fs
        self.key = store.key(LOCK)
        self.etag = ""
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew, name="lock-lease", daemon=True)

    def acquire(self) -> None:
        """Take the lock, or raise PipelineError (one line) naming the run holding it."""
        try:
            self.etag = self._put(mode="create")
        except FileExistsError:
            self.etag = self._take_over()
        except failures() as exc:
            raise PipelineError(f"{self.store.location}: cannot lock: {_why(exc)}") from None
        self._renewer.start()

    def release(self) -> None:
        """Stop renewing; delete the lock object if it is still this run's."""
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        if self.etag and not self.lost.is_set():
            bucket, key, _ = self.fs.split_path(self.key)
            with contextlib.suppress(*failures()):  # taken over meanwhile: not ours to delete
                self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)

    def _put(self, **match: str) -> str:
        owner = f"pid {os.getpid()} on {socket.gethostname()}, started {_now()}"
        self._renewals += 1
        body = json.dumps(
            {"owner": owner, "lease_s": self.lease_s, "run": self._token, "put": self._renewals}
        ).encode()
        response = self.fs.pipe_file(self.key, body, **match)
        return str(response["ETag"])

    def _take_over(self) -> str:
        """The lock object is there: refuse if its lease runs, else replace it, only as it is."""
        try:
            info = self.fs.info(self.key, refresh=True)
            held = json.loads(self.fs.cat_file(self.key))
        except FileNotFoundError:  # released meanwhile
            try:
                return self._put(mode="create")
            except FileExistsError:
                raise self._refusal("another run took it meanwhile") from None
        except failures() as exc:
            where = self.store.location
            raise PipelineError(f"{where}: cannot read its lock: {_why(exc)}") from None
        lease = held.get("lease_s") if isinstance(held, dict) else None
        lease = float(lease) if isinstance(lease, int | float) else LEASE_S
        left = info["LastModified"].timestamp() + lease - self.clock()
        owner = held.get("owner", "unknown") if isinstance(held, dict) else "unknown"
        if left >= 0:
            raise self._refusal(f"{owner}; its lease ends in {left:.0f} s unless renewed")
        try:
            etag = self._put(IfMatch=info["ETag"])
        except OSError:  # another run took it over first
            raise self._refusal("another run took over its expired lock") from None
        where = self.store.location
        log.warning("%s: took over the lock of a run whose lease ended (%s)", where, owner)
        return etag

    def _refusal(self, holder: str) -> PipelineError:
        return PipelineError(
            f"{self.store.location}: another pipeline run is writing into this output ({holder}); "
            "wait for it to end, or choose another --out"
        )

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.etag = self._put(IfMatch=self.etag)
            except failures() as exc:
                if self._taken():
                    log.error("%s: the lock was taken over by another run", self.store.location)
                    self.lost.set()
                    return
                log.warning(
                    "%s: renewing the lock failed (%s); retrying", self.store.location, _why(exc)
                )

    def _taken(self) -> bool:
        try:
            return bool(self.fs.info(self.key, refresh=True)["ETag"] != self.etag)
        except FileNotFoundError:
            return True
        except failures():
            return False  # the store cannot be reached: try again at the next renewal


@contextlib.contextmanager
def store_lock(store: ObjectStore, *, lease_s: float = LEASE_S) -> Iterator[StoreLock]:
    """Hold ``store`` for one run (StoreLock); raise PipelineError when another run holds it."""
    held = StoreLock(store, lease_s=lease_s)
    held.acquire()
    try:
        yield held
    finally:
        held.release()


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
