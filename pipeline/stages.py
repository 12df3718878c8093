"""The generic machinery between stages: bounded queues, end-of-stream sentinels, a shared source.

Shutdown follows one rule: every producer of a queue posts one ``DONE`` when it stops (in a
``finally``, so also when it fails), and the consumer counts them down. Nothing polls, nothing is
killed: threads block on queues and end when their input ends.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final, Generic, TypeVar

T = TypeVar("T")


class _Done:
    """The end-of-stream sentinel type: one per producer."""

    _instance: _Done | None = None

    def __new__(cls) -> _Done:  # a singleton, so ``is DONE`` holds after a pickle round-trip too
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DONE"

    def __reduce__(self) -> str:
        return "DONE"


DONE: Final = _Done()


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``bound`` items whose ``put`` blocks when full; records its peak depth."""

    def __init__(self, name: str, bound: int) -> None:
        self.name = name
        self.bound = bound
        self.peak = 0
        self._queue: queue.Queue[T | _Done] = queue.Queue(maxsize=bound)

    def put(self, item: T | _Done) -> None:
        self._queue.put(item)
        depth = self._queue.qsize()
        if depth > self.peak:  # a racy max is fine: it only ever under-reports by a hair
            self.peak = depth

    def get(self) -> T | _Done:
        return self._queue.get()

    def depth(self) -> int:
        return self._queue.qsize()


class Slots:
    """At most ``bound`` tasks in flight: ``acquire`` blocks while every slot is taken."""

    def __init__(self, name: str, bound: int) -> None:
        self.name = name
        self.bound = bound
        self.peak = 0
        self._used = 0
        self._free = threading.Condition(threading.Lock())

    def acquire(self) -> None:
        with self._free:
            self._free.wait_for(lambda: self._used < self.bound)
            self._used += 1
            self.peak = max(self.peak, self._used)

    def release(self) -> None:
        with self._free:
            if self._used == 0:
                raise ValueError("Slots released more often than acquired")
            self._used -= 1
            self._free.notify_all()

    def drain(self) -> None:
        """Wait until every slot is free again: every task has come back."""
        with self._free:
            self._free.wait_for(lambda: self._used == 0)

    def depth(self) -> int:
        return self._used


class SharedIterator(Generic[T]):
    """An iterator that many threads may pull from; it ends early once ``stop`` is set."""

    def __init__(self, items: Iterator[T], stop: threading.Event) -> None:
        self._items = items
        self._stop = stop
        self._lock = threading.Lock()

    def next(self) -> T | None:
        """The next item, or None when the input is exhausted or the run is stopping."""
        with self._lock:
            if self._stop.is_set():
                return None
            return next(self._items, None)


class RestartingPool:
    """A ProcessPoolExecutor that is replaced by a fresh one when a worker process dies.

    A dead worker (``os._exit``, a signal, the OOM killer) breaks a ProcessPoolExecutor for good:
    every task in it fails with BrokenProcessPool and it takes no more. ``submit`` starts a new pool
    then, so the run carries on; the caller decides what to do with the tasks that were lost.
    """

    def __init__(self, factory: Callable[[], ProcessPoolExecutor]) -> None:
        self._factory = factory
        self._pool = factory()
        self._retired: list[ProcessPoolExecutor] = []
        self._lock = threading.Lock()
        self.restarts = 0

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        with self._lock:
            try:
                return self._pool.submit(fn, *args)
            except BrokenProcessPool:
                self._retired.append(self._pool)
                self._pool = self._factory()
                self.restarts += 1
                return self._pool.submit(fn, *args)

    def processes(self) -> list[Any]:
        """The live worker processes (multiprocessing.Process objects) of every pool."""
        with self._lock:
            pools = [*self._retired, self._pool]
        # ProcessPoolExecutor keeps no public list of its processes before Python 3.14
        return [p for pool in pools for p in (getattr(pool, "_processes", None) or {}).values()]

    def shutdown(self, *, cancel: bool = False) -> None:
        with self._lock:
            pools, self._retired = [*self._retired, self._pool], []
        for pool in pools:
            pool.shutdown(wait=True, cancel_futures=cancel)

    def __enter__(self) -> RestartingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
