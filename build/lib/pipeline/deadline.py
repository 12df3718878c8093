"""A total deadline per download, which socket timeouts cannot give.

A socket timeout bounds each ``recv``; a server that drips one byte a second satisfies every one of
them and holds a download thread forever. So each download runs under a Ticket: the download
thread registers the socket it is using (``attach``), and one watchdog thread, asleep until the
earliest deadline, shuts that socket down when time is up. The blocked ``recv`` returns at once,
and the download fails as ``deadline`` instead of hanging.

    download thread:  with watchdog.deadline(60):  ... attach(sock) ... recv ...
    watchdog thread:  sleeps until the next expiry -> sock.shutdown() -> the recv above ends

Anything about to (re)connect or sleep for a retry after the deadline calls ``check()``, which
raises DeadlineExceeded: an exception urllib3 does not catch, so no retry is attempted past it.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType


class DeadlineExceeded(Exception):
    """The download's total deadline has passed."""


@dataclass(eq=False, slots=True)
class Ticket:
    """One download's deadline, and the socket it is reading from."""

    expires: float
    sock: socket.socket | None = None
    fired: bool = False
    done: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    woken: threading.Event = field(default_factory=threading.Event)  # set when fired

    def remaining(self) -> float:
        return self.expires - time.monotonic()


_local = threading.local()


def current() -> Ticket | None:
    """The Ticket of the download running in this thread, if any."""
    return getattr(_local, "ticket", None)


def attach(sock: socket.socket | None) -> None:
    """Register the socket this thread's download now uses (and cut it if already expired)."""
    ticket = current()
    if ticket is None or sock is None:
        return
    with ticket.lock:
        ticket.sock = sock
        if not ticket.fired:
            return
    _cut(sock)
    raise DeadlineExceeded


def check() -> None:
    """Raise DeadlineExceeded if this thread's download is past its deadline."""
    ticket = current()
    if ticket is not None and (ticket.fired or ticket.remaining() <= 0):
        raise DeadlineExceeded


def sleep(seconds: float) -> None:
    """Sleep, but no later than this thread's deadline or its cancellation (a retry's backoff)."""
    ticket = current()
    if ticket is None:
        time.sleep(seconds)
        return
    ticket.woken.wait(min(seconds, max(ticket.remaining(), 0.0)))
    check()


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # already closed
        sock.shutdown(socket.SHUT_RDWR)


class Watchdog:
    """One thread that cuts the sockets of downloads past their deadline."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Ticket]] = []
        self._running = 0  # tickets not done yet; the heap also holds done ones, until compacted
        self._order = itertools.count()
        self._wakeup = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="deadline-watchdog")

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[Ticket]:
        """Run the body under a deadline of ``seconds``; it is this thread's current Ticket."""
        ticket = Ticket(time.monotonic() + seconds)
        with self._wakeup:
            if not self._heap or ticket.expires < self._heap[0][0]:
                self._wakeup.notify()  # the watchdog must wake earlier than it planned
            heapq.heappush(self._heap, (ticket.expires, next(self._order), ticket))
            self._running += 1
        _local.ticket = ticket
        try:
            yield ticket
        finally:
            _local.ticket = None
            with ticket.lock:
                ticket.done = True
                ticket.sock = None
            self._finished()

    def _finished(self) -> None:
        """A download ended. Done tickets leave the heap when they reach its top, which with one
        deadline for all is only at their expiry: at 250 downloads/s and a 60 s deadline, 15,000
        tickets. So once done ones are the majority, drop them all (amortized O(1))."""
        with self._wakeup:
            self._running -= 1
            if len(self._heap) > 2 * self._running + 64:
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)

    def pending(self) -> int:
        """Tickets held: the running ones, and done ones not dropped yet."""
        with self._wakeup:
            return len(self._heap)

    def _watch(self) -> None:
        with self._wakeup:
            while not self._closed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)  # finished in time: forget it
                if not self._heap:
                    self._wakeup.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._wakeup.wait(delay)  # until the earliest deadline, or a new one
                    continue
                self._fire(heapq.heappop(self._heap)[2])

    @staticmethod
    def _fire(ticket: Ticket) -> None:
        with ticket.lock:
            if ticket.done:
                return
            ticket.fired = True
            sock = ticket.sock
        ticket.woken.set()
        if sock is not None:
            _cut(sock)

    def cut_all(self) -> None:
        """Fire every running download's deadline now (the run is being interrupted)."""
        with self._wakeup:
            tickets = [ticket for _, _, ticket in self._heap]
        for ticket in tickets:
            self._fire(ticket)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def close(self) -> None:
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
