"""The generic machinery between stages: bounded queues and end-of-stream sentinels.

Shutdown follows one rule: every producer of a queue posts one ``DONE`` when it stops (in a
``finally``, so also when it fails), and the consumer counts them down. Nothing polls, nothing is
killed: threads block on queues and end when their input ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import queue
import threading
import time
from typing import Final, Generic, TypeVar

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


class _Gathering(queue.Queue[T]):
    """A ``queue.Queue`` whose put wakes a gatherer (``BoundedQueue.gather``) only once there
    are as many items as it waits for, not at each put (a wake-up is a system call each side)."""

    def __init__(self, maxsize: int) -> None:
        self.wanted = 0  # items a gatherer waits for (0: none waits)
        super().__init__(maxsize)
        self.enough = threading.Condition(self.mutex)

    def _put(self, item: T) -> None:  # with the mutex held
        super()._put(item)
        if self.wanted and len(self.queue) >= self.wanted:
            self.enough.notify()


class BoundedQueue(Generic[T]):
    """A FIFO of at most ``bound`` items whose ``put`` blocks when full; records its peak depth."""

    def __init__(self, name: str, bound: int) -> None:
        self.name = name
        self.bound = bound
        self.peak = 0
        self._queue: _Gathering[T | _Done] = _Gathering(maxsize=bound)

    def put(self, item: T | _Done) -> None:
        self._queue.put(item)
        depth = self._queue.qsize()
        if depth > self.peak:  # a racy max is fine: it only ever under-reports by a hair
            self.peak = depth

    def get(self) -> T | _Done:
        return self._queue.get()

    def get_until(self, deadline: float) -> T | _Done | None:
        """The next item, waiting until ``deadline`` (time.monotonic()) at most; else None."""
        try:
            return self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None

    def gather(self, most: int, deadline: float) -> list[T | _Done]:
        """Up to ``most`` items, taken once that many are there (or the queue is full), or at
        ``deadline`` (time.monotonic()) at the latest: one wake-up for them all."""
        gathering = self._queue
        if self.bound > 0:
            most = min(most, self.bound)
        with gathering.mutex:
            gathering.wanted = most
            try:
                gathering.enough.wait_for(
                    lambda: len(gathering.queue) >= most, max(0.0, deadline - time.monotonic())
                )
            finally:
                gathering.wanted = 0
            items = [gathering.queue.popleft() for _ in range(min(most, len(gathering.queue)))]
            if items:
                gathering.not_full.notify(len(items))
        return items

    def depth(self) -> int:
        return self._queue.qsize()


_PR_SET_NAME = 15


def label_thread(name: str | None = None) -> None:
    """Give the calling OS thread its Python name (or ``name``), as ``/proc/<pid>/task/*/comm``,
    ``top -H`` and ``python -m pipeline.bench.lanecpu`` show it (15 bytes at most; Linux only)."""
    label = (name or threading.current_thread().name).encode()[:15]
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
