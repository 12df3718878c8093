"""The bounded queue between a lane's threads: a gather takes a batch with one wake-up."""

from __future__ import annotations

import threading
import time

from pipeline.stages import BoundedQueue

FAR = 30.0  # seconds: a deadline no passing test reaches


def test_a_gather_returns_once_as_many_items_as_it_wants_are_there():
    rows: BoundedQueue[int] = BoundedQueue("results", 64)
    gathered: list[list[int]] = []
    waiting = threading.Thread(
        target=lambda: gathered.append(rows.gather(5, time.monotonic() + FAR))
    )
    waiting.start()
    for n in range(7):  # put one by one: the gatherer is woken by the fifth, not the first
        rows.put(n)
    waiting.join(FAR)
    assert gathered == [[0, 1, 2, 3, 4]]
    assert rows.depth() == 2  # the rest wait for the next gather


def test_a_gather_takes_what_is_there_at_its_deadline():
    rows: BoundedQueue[int] = BoundedQueue("results", 64)
    rows.put(1)
    rows.put(2)
    started = time.monotonic()
    assert rows.gather(5, started + 0.2) == [1, 2]
    assert time.monotonic() - started >= 0.2  # it waited for more, until its deadline
    assert rows.gather(5, time.monotonic()) == []


def test_a_full_queue_wakes_a_gather_that_wants_more_than_it_holds():
    """A producer blocked on a full queue is not left waiting until the gather's deadline."""
    rows: BoundedQueue[int] = BoundedQueue("results", 3)
    producer = threading.Thread(target=lambda: [rows.put(n) for n in range(6)])
    producer.start()
    started = time.monotonic()
    first = rows.gather(64, started + FAR)
    assert first == [0, 1, 2] and time.monotonic() - started < FAR / 3
    rest = rows.gather(64, time.monotonic() + FAR)
    producer.join(FAR)
    assert rest == [3, 4, 5]
