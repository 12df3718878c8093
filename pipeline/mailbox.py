"""What a lane's download threads post to its owner (owner.py): bodies, the crew's end, failures.

A post wakes the owner by a byte on a pipe, which the owner waits on beside its other pipes
(one epoll, kept for the lane's life); a byte is written only when the owner has not been woken
since it last looked, and, for a body, only when it can take one: one write per wake-up.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections import deque

from .records import Fetched


class Mailbox:
    """What the download threads post to the owner: bodies (at most ``bound`` waiting; a put
    blocks for room), the crew's end, failures. A post writes a byte on the wake pipe when the
    owner has not been woken since it last looked, and wants bodies: one write per wake-up, not
    per post."""

    def __init__(self, bound: int) -> None:
        self.name = "fetched"
        self.bound = bound
        self.peak = 0
        self._bodies: deque[Fetched] = deque()
        self._ended = False
        self._failures: list[str] = []
        self._closed = False
        self._woken = False
        self._wanted = True  # the owner can take a body now: wake it for one
        self._room = threading.Condition()
        self.fileno, self._wake = os.pipe()
        os.set_blocking(self.fileno, False)
        os.set_blocking(self._wake, False)

    def put(self, body: Fetched) -> None:
        with self._room:
            self._room.wait_for(lambda: len(self._bodies) < self.bound or self._closed)
            if self._closed:
                return  # the owner has ended: nobody will take it
            self._bodies.append(body)
            self.peak = max(self.peak, len(self._bodies))
            if self._wanted:
                self._post()

    def end(self) -> None:
        with self._room:
            self._ended = True
            self._post()

    def fail(self, message: str) -> None:
        with self._room:
            self._failures.append(message)
            self._post()

    def _post(self) -> None:  # with the lock held
        if not self._woken and not self._closed:
            self._woken = True
            with contextlib.suppress(OSError):
                os.write(self._wake, b"\0")

    def want(self, wanted: bool) -> None:
        """Whether a body should wake the owner (not while its workers are full: the wake-up
        would find nothing to do)."""
        with self._room:
            self._wanted = wanted
            if wanted and self._bodies:
                self._post()

    def drain(self) -> tuple[bool, list[str]]:
        """The owner, woken: whether the crew has ended, and the failures posted since."""
        with self._room:
            self._woken = False
            with contextlib.suppress(OSError):
                os.read(self.fileno, 64)
            failures, self._failures = self._failures, []
            return self._ended, failures

    def take(self, most: int, max_bytes: float = math.inf) -> list[Fetched]:
        """Up to ``most`` bodies there now, in order, while they fit in ``max_bytes`` (a busy
        worker's room: a body that does not fit waits for the next idle worker)."""
        taken: list[Fetched] = []
        size = 0
        with self._room:
            while self._bodies and len(taken) < most:
                size += len(self._bodies[0].body)
                if size > max_bytes:
                    break
                taken.append(self._bodies.popleft())
            if taken:
                self._room.notify(len(taken))
        return taken

    def close(self) -> None:
        """The owner has ended: let the download threads through."""
        with self._room:
            self._closed = True
            self._bodies.clear()
            self._room.notify_all()

    def dispose(self) -> None:
        """Close the wake pipe, once no thread may post any more."""
        for fd in (self.fileno, self._wake):
            with contextlib.suppress(OSError):
                os.close(fd)

    def depth(self) -> int:
        return len(self._bodies)
