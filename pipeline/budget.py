"""A lane's byte budget: image bodies it may hold at once, read so far or waiting for its pool.

    download thread: take(size) per chunk read, or for the whole declared body before reading it
                     --(blocks while the lane holds its budget)
                     hand_over(size): the whole body goes to the pool   | drop(): it failed
    owner thread:    release(size) once the body's image has ended (owner.py)

Without it, a lane holds up to (download.workers + download.max_stragglers) x download.max_bytes
when slow servers send large bodies (gigabytes); with it, at most ``download.max_buffered_bytes``
plus one body. The bytes a thread has read of the body it is reading are its own (a
thread-local), so a failed download gives back exactly what it took.

No deadlock: bodies in the pool are given back as the pool finishes them. The one state nothing
would ever change is every byte held by threads whose bodies are incomplete, all of them waiting
for more: then one of them (the first to see it) may overdraw until its body is complete. So a
lane holds at most the budget and one body more; a body larger than what is left waits for room,
and one body is at most ``max_bytes`` <= the budget.
"""

from __future__ import annotations

import threading

from .errors import FetchError


class ByteBudget:
    """A semaphore of bytes, shared by a lane's download threads and its owner thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # every byte taken and not given back
        self.peak = 0
        self._pooled = 0  # bytes of complete bodies: the pool gives them back
        self._holders = 0  # threads holding part of a body
        self._waiting = 0  # ... of which waiting for room
        self._overdraft: int | None = None  # the thread allowed past the limit, if any
        self._cancelled = False
        self._local = threading.local()
        self._room = threading.Condition()

    @property
    def _held(self) -> int:
        return getattr(self._local, "held", 0)

    def take(self, size: int) -> None:
        """``size`` more bytes of this thread's body; waits for room. Raises FetchError once the
        lane is stopping (``cancel``)."""
        me, held = threading.get_ident(), self._held
        with self._room:
            waiting = bool(held) and not self._fits(size, me)
            if waiting:  # one more holder waits: the others look again (are all stuck now?)
                self._waiting += 1
                self._room.notify_all()
            try:
                while not self._fits(size, me):
                    if self._stuck():
                        self._overdraft = me
                        break
                    self._room.wait()
            finally:
                self._waiting -= waiting
            if self._cancelled:
                raise FetchError("deadline", "cancelled: the lane is stopping")
            self._holders += not held
            self.used += size
            self.peak = max(self.peak, self.used)
        self._local.held = held + size

    def _fits(self, size: int, me: int) -> bool:
        return self._cancelled or self._overdraft == me or self.used + size <= self.limit

    def _stuck(self) -> bool:
        """Nothing would ever give bytes back: the pool holds none, every holder waits."""
        return self._overdraft is None and not self._pooled and self._waiting == self._holders

    def hand_over(self, size: int) -> None:
        """This thread's body is complete (``size`` bytes): the pool holds it now."""
        with self._room:
            self.used += size - self._held  # the same, unless a body was not read by take()
            self._pooled += size
            self.peak = max(self.peak, self.used)
            self._end_body()

    def drop(self) -> None:
        """This thread's body failed: what it took is given back."""
        with self._room:
            self.used -= self._held
            self._end_body()

    def _end_body(self) -> None:  # with the lock held
        if self._held:
            self._holders -= 1
        if self._overdraft == threading.get_ident():
            self._overdraft = None
        self._local.held = 0
        self._room.notify_all()

    def release(self, size: int) -> None:
        """The pool is done with ``size`` bytes of bodies: they have left the lane."""
        if not size:
            return
        with self._room:
            self.used -= size
            self._pooled -= size
            self._room.notify_all()

    def cancel(self) -> None:
        """The lane is stopping: every wait ends now, and every later take() fails."""
        with self._room:
            self._cancelled = True
            self._room.notify_all()
