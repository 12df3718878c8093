"""A lane's transform processes, each with its own pipes: the lane knows which image each holds.

    lane's owner thread --tasks pipe: a task of up to CHUNK bodies, or b"" (exit)--> worker
                        <--outcomes pipe: the task's Outcomes (or Lost), in order--
                        <--progress (shared memory): images begun, when the last began--

A worker takes a task, transforms its images one by one, writes the output files itself and
sends the task's small records back at once (one message a task, not an image). Before each
image it counts it in its progress record, two numbers in shared memory (no message, no
system call): the lane knows which image a worker is on, and since when, without being woken.
A worker that dies (its sentinel) is blamed for exactly that image; the images of its task
done before it (their records lost with it) and those not begun are sent again, unblamed.

A task is one message: its records pickled without their bodies, then the bodies end to end,
written with one ``writev``: a body is not copied into a pickle first (that copy was a third of
the owner thread's CPU for a hand-off; the worker copies each body out of the message, as
unpickling did).

A worker blocks on its tasks pipe between tasks: when the lane is gone, it reads an end of
file and exits, so it needs no thread to watch its parent. It ignores Ctrl-C: the lane decides.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import math
import multiprocessing
import multiprocessing.sharedctypes  # imported now: not when files may be short
import os
import pickle
import select
import signal
import struct
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .errors import PipelineError
from .records import Fetched, Outcome
from .stages import label_thread
from .transform import WorkerSetup, init_worker, internal_error, process

_PIPE_BYTES = 1 << 20  # a worker's tasks pipe: a task's bodies fit, the owner's write never waits
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux)
_PICKLING = 64 << 10  # a task's bytes besides its bodies (URLs, columns): kept free in a pipe
_META = struct.Struct("!I")  # a task's message: the length of its pickled records, first
_NUMBERS = itertools.count(1)  # a lane's transform processes, numbered as they start


@dataclass(frozen=True, slots=True)
class Lost:
    """A worker's answer for an image it could not write for a cause not the image's (the disk
    is full): no row; the lane stops the run with ``message``."""

    key: str
    message: str


def worker_main(
    setup: WorkerSetup, tasks: Connection, outcomes: Connection, progress: Any, lane: int
) -> None:
    """The body of a transform process: tasks in, their answers out, until EOF or None; it
    ends between two images of a task too once its lane (process ``lane``) has ended."""
    watch = _pidfd(lane)
    init_worker(setup)
    label_thread("transform")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            message = tasks.recv_bytes()
        except (EOFError, OSError):  # the lane is gone
            return
        if not message:
            return
        task = unpack(message)
        answers = []
        for item in task:
            if watch is not None and select.select([watch], [], [], 0)[0]:
                return  # killed (a second Ctrl-C): nobody will read the rest
            progress[1] = time.monotonic()  # the clock is the system's: the lane reads it too
            progress[0] += 1
            answers.append(_answer(item))
        try:
            outcomes.send(answers)
        except OSError:  # the lane is gone (killed: a second Ctrl-C)
            return


def pack(items: list[Fetched]) -> list[bytes]:
    """A task as one message of a ``Connection`` (its length, then its bytes), in pieces: the
    frame and the records without their bodies, then each body, as it is."""
    records = [
        (item.job, len(item.body), item.http_status, item.content_type, item.download_ms)
        for item in items
    ]
    meta = pickle.dumps(records, pickle.HIGHEST_PROTOCOL)
    size = _META.size + len(meta) + sum(len(item.body) for item in items)
    frame = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
    return [frame + _META.pack(len(meta)) + meta, *(item.body for item in items)]


def unpack(message: bytes) -> list[Fetched]:
    """The task that ``pack`` wrote, as ``Connection.recv_bytes`` reads it."""
    (length,) = _META.unpack_from(message)
    view = memoryview(message)
    items, at = [], _META.size + length
    for job, size, status, content_type, ms in pickle.loads(view[_META.size : at]):
        items.append(Fetched(job, bytes(view[at : at + size]), status, content_type, ms))
        at += size
    return items


def write_all(fd: int, pieces: list[bytes]) -> None:
    """``pieces`` written to ``fd`` end to end, with as few system calls as it takes."""
    views = [memoryview(piece) for piece in pieces if piece]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if written:
            views[0] = views[0][written:]


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # gone already, or no pidfd: the pipes tell, later
        return None


def _answer(item: Fetched) -> Outcome | Lost:
    try:
        return process(item)
    except PipelineError as exc:  # the output folder, not the image: the lane stops the run
        return Lost(item.job.key, str(exc))
    except Exception as exc:  # not an ItemError: a bug, but still only this image's row
        error = internal_error(item.job.key, exc)
        return Outcome.failed(item.job, error, download_ms=item.download_ms)


def context_of(method: str) -> Any:
    """The context of a start method (transform.start_method: never plain fork); a forkserver
    preloads Pillow."""
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["pipeline.workers"])
    return context


def _name() -> str:
    """``transform-0:3``: the lane's index (its process is ``lane-0``) and the worker's number;
    its log lines carry it."""
    lane = multiprocessing.current_process().name.rpartition("-")[2]
    return f"transform-{lane}:{next(_NUMBERS)}"


class Worker:
    """The lane's side of one transform process: its pipes and the images it holds, in order."""

    def __init__(self, context: Any, setup: WorkerSetup) -> None:
        tasks_end, self.tasks = context.Pipe(duplex=False)
        self.outcomes, outcomes_end = context.Pipe(duplex=False)
        self.progress = context.RawArray("d", 2)  # images begun, when the last one began
        try:
            self.process = context.Process(
                target=worker_main,
                args=(setup, tasks_end, outcomes_end, self.progress, os.getpid()),
                name=_name(), daemon=True,
            )  # fmt: skip
            self.process.start()
        except BaseException:
            for conn in (tasks_end, outcomes_end, self.tasks, self.outcomes):
                conn.close()
            raise
        tasks_end.close()  # the worker holds the only other ends: its death closes them
        outcomes_end.close()
        self.capacity = 1 << 16  # Linux's default pipe size
        with contextlib.suppress(OSError, ValueError):
            self.capacity = fcntl.fcntl(self.tasks.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        self.pid: int = self.process.pid
        self.sentinel: int = self.process.sentinel
        self.held: deque[tuple[Fetched, int]] = deque()  # sent, unanswered: (body, attempt)
        self.bytes = 0  # of the bodies held
        self.images = 0  # sent so far (transform.max_tasks_per_child)
        self.answered = 0  # images answered so far
        self.since = 0.0  # a lower bound of when its next image begins, as the owner saw it
        self.pause = (0, 0.0)  # (image, seconds): a pause of the whole lane, not its time
        self.killed_for = ""  # "timeout" or "stopped", once the owner has killed it
        self.retiring = False  # told to exit

    def send(self, task: list[tuple[Fetched, int]]) -> None:
        if not self.held:
            self.since = time.monotonic()
        write_all(self.tasks.fileno(), pack([item for item, _ in task]))
        self.held.extend(task)
        self.bytes += sum(len(item.body) for item, _ in task)
        self.images += len(task)

    def room(self) -> float:
        """Bytes of bodies that may be sent now: any to an idle worker; to a busy one, what fits
        in its pipe beside what it holds, so that the owner's write never waits for it."""
        return math.inf if not self.held else self.capacity - self.bytes - _PICKLING

    def answer(self) -> tuple[Fetched, int]:
        """The first image held, now answered."""
        item = self.held.popleft()
        self.bytes -= len(item[0].body)
        self.answered += 1
        self.since = time.monotonic()
        return item

    def busy_since(self) -> float | None:
        """When it began the image it is on now (minus a pause of the lane), or None when it
        is between tasks."""
        begun, started = int(self.progress[0]), float(self.progress[1])
        if begun <= self.answered or not self.held:
            return None
        return started + (self.pause[1] if self.pause[0] == begun else 0.0)

    def paused(self, seconds: float) -> None:
        begun = int(self.progress[0])
        self.pause = (begun, seconds + (self.pause[1] if self.pause[0] == begun else 0.0))

    def split(self) -> tuple[tuple[Fetched, int] | None, list[tuple[Fetched, int]]]:
        """Once it has died: the image it died on (None: between tasks), and the others it held
        (done, but their records lost with it, or not begun)."""
        on = int(self.progress[0]) - self.answered  # images of its task begun, the last its own
        held = list(self.held)
        if on <= 0 or on > len(held):
            return None, held
        return held[on - 1], held[: on - 1] + held[on:]

    def retire(self) -> None:
        self.retiring = True
        with contextlib.suppress(OSError):
            self.tasks.send_bytes(b"")

    def kill(self, why: str) -> None:
        self.killed_for = self.killed_for or why
        with contextlib.suppress(OSError, ValueError):
            self.process.kill()

    def close(self) -> None:
        self.tasks.close()
        self.outcomes.close()
        self.process.join()


def state(pid: int) -> str:
    """A process's state letter from /proc (T: stopped), or "" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
