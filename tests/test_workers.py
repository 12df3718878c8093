"""The hand-off of a task's bodies from a lane's owner to a transform process (workers.py)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading

import pytest

from pipeline import workers
from pipeline.records import Fetched, Job


def task(*sizes: int) -> list[Fetched]:
    items = []
    for n, size in enumerate(sizes):
        job = Job(1, n, f"http://127.0.0.1/{n}.jpg", "s", columns={"caption": "é"})
        items.append(Fetched(job, bytes([n % 256]) * size, 200, "image/jpeg", 1.5 + n))
    return items


def through_a_pipe(items: list[Fetched]) -> tuple[list[Fetched], bytes]:
    """``items`` written by the owner's side and read by a worker's; the bytes on the wire."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    got: list[list[Fetched]] = []

    def read() -> None:
        with contextlib.suppress(EOFError):  # a message cut short: got stays empty
            got.append(workers.unpack(reader.recv_bytes()))

    with reader:
        thread = threading.Thread(target=read)
        thread.start()  # (a task larger than the pipe: the writer waits for the reader)
        pieces = workers.pack(items)
        with writer:
            workers.write_all(writer.fileno(), pieces)
        thread.join()
    assert got, "the message was cut short"
    return got[0], b"".join(pieces)


@pytest.mark.parametrize("sizes", [(5000, 0, 3), (300_000, 200_000, 1, 700_000), ()])
def test_a_task_arrives_whole_and_in_order(sizes):
    items = task(*sizes)
    assert through_a_pipe(items)[0] == items


def test_a_task_is_one_message_of_a_connection():
    items = task(100, 20_000)
    _, wire = through_a_pipe(items)
    reader, writer = multiprocessing.Pipe(duplex=False)
    with reader, writer:
        writer.send_bytes(wire[4:])  # the same payload, framed by the Connection itself
        assert os.read(reader.fileno(), len(wire) + 1) == wire


def test_a_short_write_is_continued(monkeypatch):
    writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, views: writev(fd, [views[0][:777]]))
    items = task(5000, 3, 40_000)
    assert through_a_pipe(items)[0] == items
