"""The transform stage of a lane: a process pool, and the one thread that owns it.

    download threads --put(Fetched)--> Inbox: downloaded bodies, at most queues.fetched
                                         |                ^ finished tasks: the pools' callbacks
                                         v                | only post them here, never decide
                      dispatcher thread (the owner) ------+
                        | submit, at most shape.in_flight images held at once (shape.py)
                        v
                      RestartingPool x shape.workers: decode -> ops -> encode -> write file
                      quarantine pool x 1: images that were in a pool when a worker died
                        |
                        v  Outcome (a small record)
                      results queue

Every decision about the pool is the dispatcher's, taken in its own thread: what to submit and
when a slot is free, whether an image whose worker died is tried again (in the quarantine pool,
one at a time, so that a second crash names its culprit) or recorded as ``worker_crash``, and
what becomes of each result. A worker that dies breaks a ProcessPoolExecutor for good; the
RestartingPool starts a fresh one on the next submit. Once the lane is stopping, bodies are
dropped and killed tasks are not recorded: the next run does them again. What no image is to
blame for (no process can be started, the output folder cannot be written) is not a row either:
``fail`` is told, in one line, and the lane stops the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .budget import ByteBudget
from .config import Config
from .errors import PipelineError, TransformError, limit_hint
from .layout import OutputLayout
from .logs import LogSetup
from .metrics import Stage
from .records import Fetched, Outcome
from .shape import CHUNK, LaneShape
from .stages import DONE, _Done
from .transform import WorkerSetup, init_worker, internal_error, process_many

log = logging.getLogger(__name__)
T = TypeVar("T")


def make_pool(config: Config, out_dir: Path, workers: int) -> ProcessPoolExecutor:
    """A transform pool, started with the configured method (never plain fork)."""
    method = config.transform.start_method
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # workers fork from a server that has already imported Pillow
        context.set_forkserver_preload(["pipeline.transform"])
    setup = WorkerSetup(
        config.transform, str(out_dir), config.output.folder_size, os.getpid(),
        LogSetup.current(), OutputLayout.of(config.output), config.input.hash_column,
        config.output.caption_column,
    )  # fmt: skip
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=init_worker,
        initargs=(setup,),
        max_tasks_per_child=config.transform.max_tasks_per_child or None,
    )
    _widen_pipe(getattr(getattr(pool, "_call_queue", None), "_writer", None))
    return pool


_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux), not exported before Python 3.10 everywhere


def _widen_pipe(conn: object) -> None:
    """Let one image's bytes fit in the pool's task pipe (64 KB by default on Linux).

    A 200 KB body otherwise goes through in four blocking writes, each waiting for the worker to
    read the last: eight thread switches per image. Best effort: no pipe, no Linux, no change.
    """
    fileno = getattr(conn, "fileno", None)
    if fileno is None:
        return
    with contextlib.suppress(OSError, ValueError):
        fcntl.fcntl(fileno(), getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ), _PIPE_BYTES)


class RestartingPool:
    """A ProcessPoolExecutor that is replaced by a fresh one when a worker process dies.

    Only the dispatcher submits; ``processes`` may be read from another thread (the grace timer
    that kills workers), hence the lock.
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
        # ProcessPoolExecutor keeps no public list of its processes before Python 3.14; its
        # manager thread may change the dict meanwhile: dict() copies it in one step (the GIL)
        return [p for pool in pools for p in dict(getattr(pool, "_processes", None) or {}).values()]

    def shutdown(self, *, cancel: bool = False, grace: float | None = None) -> None:
        """Shut every pool down; with ``grace``, a worker still alive that many seconds later (a
        stopped or hung process never reads its sentinel) is killed, so this never hangs."""
        with self._lock:
            pools, self._retired = [*self._retired, self._pool], []
        if grace is None:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=cancel)
            return
        deadline = time.monotonic() + grace
        for pool in pools:
            _shutdown_within(pool, cancel, deadline)


def _shutdown_within(pool: ProcessPoolExecutor, cancel: bool, deadline: float) -> None:
    manager = getattr(pool, "_executor_manager_thread", None)
    workers = list(dict(getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=cancel)  # its manager thread sends the sentinels
    waiting = {worker.sentinel: worker for worker in workers}
    while waiting and (left := deadline - time.monotonic()) > 0:
        for sentinel in connection.wait(list(waiting), left):
            del waiting[sentinel]
    for worker in waiting.values():
        log.warning("transform process %s did not exit within the grace: killed", worker.pid)
        with contextlib.suppress(OSError, ValueError):
            worker.kill()
    if manager is not None:
        manager.join()  # it joins the workers, which are gone now


def _state(pid: int | None) -> str:
    """A process's state letter from /proc (T: stopped), or "" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


# the images of a task, their attempt, whether in quarantine, the task's future
_Finished = tuple[list[Fetched], int, bool, "Future[list[Outcome]]"]


class Results(Protocol):
    """Where the pool puts its rows, then DONE (a lane's queue, which takes other items too)."""

    def put(self, item: Outcome | _Done, /) -> None: ...


class Inbox:
    """Where the dispatcher waits: downloaded bodies (bounded) and finished tasks (unbounded:
    a callback must never block). One lock, two conditions: the dispatcher blocks on both kinds
    of input at once without polling, and each wake-up wakes one thread that can proceed."""

    def __init__(self, bound: int) -> None:
        self.name = "fetched"
        self.bound = bound
        self.peak = 0
        self._bodies: deque[Fetched | _Done] = deque()
        self._finished: deque[_Finished] = deque()
        self._held = 0  # bodies in _bodies (the DONEs there are not bounded)
        self._closed = False
        lock = threading.Lock()
        self._room = threading.Condition(lock)  # download threads wait here for room
        self._work = threading.Condition(lock)  # the dispatcher waits here for input

    def put(self, item: Fetched | _Done) -> None:
        """A body, or a download thread's DONE; blocks while the bodies are at their bound."""
        with self._room:
            if item is not DONE:
                self._room.wait_for(lambda: self._held < self.bound or self._closed)
                if self._closed:
                    return  # the dispatcher has failed: nobody will take it
                self._held += 1
                self.peak = max(self.peak, self._held)
            self._bodies.append(item)
            self._work.notify()

    def finished(self, event: _Finished) -> None:
        with self._work:
            self._finished.append(event)
            self._work.notify()

    def take_ready(self, most: int) -> list[Fetched]:
        """Up to ``most`` more bodies, if they are there now (never waits, stops at a DONE)."""
        taken: list[Fetched] = []
        with self._work:
            while len(taken) < most and self._bodies and self._bodies[0] is not DONE:
                body = self._bodies.popleft()
                assert isinstance(body, Fetched)
                taken.append(body)
            self._held -= len(taken)
            self._room.notify(len(taken))
        return taken

    def take(self, room: bool) -> tuple[_Finished | None, Fetched | _Done | None]:
        """A finished task first, else (when there is ``room``) the next body; blocks for one."""
        with self._work:
            self._work.wait_for(lambda: self._finished or (room and self._bodies))
            if self._finished:
                return self._finished.popleft(), None
            body = self._bodies.popleft()
            if body is not DONE:
                self._held -= 1
                self._room.notify()  # one download thread may go on
            return None, body

    def close(self) -> None:
        """The dispatcher is gone: let the download threads through."""
        with self._room:
            self._closed = True
            self._bodies.clear()
            self._held = 0
            self._room.notify_all()

    def depth(self) -> int:
        return self._held


class TransformPool:
    """The dispatcher thread, its pools and its slots. ``producers`` download threads feed it."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        results: Results,
        stage: Stage,
        stop: threading.Event,
        producers: int,
        shape: LaneShape,
        fail: Callable[[str], None],
        budget: ByteBudget | None = None,
    ) -> None:
        self.config = config
        self.budget = budget  # the lane's: bodies are given back to it as tasks end
        self.fail = fail  # the lane's: stop the run with this one-line error
        self.inbox = Inbox(shape.fetched)
        self.results = results
        self.stage = stage
        self.stop = stop
        self.producers = producers
        self.bound = shape.in_flight
        self.name, self.peak = "pool", 0  # a gauge: images held by the pool
        self.in_flight = 0
        self.pool = RestartingPool(functools.partial(make_pool, config, out_dir, shape.workers))
        self.quarantine = RestartingPool(functools.partial(make_pool, config, out_dir, 1))
        self._suspects: deque[tuple[Fetched, int]] = deque()
        self._suspect_running = False
        self._thread = threading.Thread(target=self._run, name="dispatch")
        self._error: BaseException | None = None
        self._stopped: dict[int, float] = {}  # worker pid: since when it is seen stopped

    def depth(self) -> int:
        return self.in_flight

    @property
    def restarts(self) -> int:
        return self.pool.restarts + self.quarantine.restarts

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        """Wait for the dispatcher; re-raise its error, if any."""
        self._thread.join()
        if self._error is not None:
            raise self._error

    def kill_workers(self) -> None:
        """Called once the grace after a stop is over: whatever is still running is lost."""
        for worker in [*self.pool.processes(), *self.quarantine.processes()]:
            with contextlib.suppress(OSError, ValueError):  # already gone
                worker.kill()

    def kill_stopped(self, after: float) -> None:
        """Kill a worker seen stopped (SIGSTOP) for ``after`` seconds: it would hold its images,
        and the lane, forever. Its pool breaks and its images are tried again, as after a crash.
        Called now and then by the lane's sender thread; reads /proc (Linux), else does nothing."""
        now, seen = time.monotonic(), self._stopped
        self._stopped = {}
        for worker in [*self.pool.processes(), *self.quarantine.processes()]:
            if _state(worker.pid) not in ("T", "t"):
                continue
            since = self._stopped[worker.pid] = seen.get(worker.pid, now)
            if now - since >= after:
                log.warning("transform process %s stopped for %g s: killed", worker.pid, after)
                with contextlib.suppress(OSError, ValueError):
                    worker.kill()

    def close(self) -> None:
        """Shut the pools down (again is harmless); a worker that will not exit is killed."""
        grace = self.config.transform.shutdown_grace
        self.pool.shutdown(cancel=True, grace=grace)
        self.quarantine.shutdown(cancel=True, grace=grace)

    # --- the dispatcher thread ---------------------------------------------------------------

    def _run(self) -> None:
        producers = self.producers
        try:
            while producers or self.in_flight:
                room = self.bound - self.in_flight
                finished, body = self.inbox.take(room > 0 or self.stop.is_set())
                if finished is not None:
                    self._finished(*finished)
                elif body is DONE:
                    producers -= 1
                elif self.stop.is_set():  # once stopping, downloaded bodies are dropped
                    assert isinstance(body, Fetched)
                    self._release([body])
                else:
                    assert isinstance(body, Fetched)
                    chunk = [body, *self.inbox.take_ready(min(CHUNK, room) - 1)]
                    self.in_flight += len(chunk)
                    self.peak = max(self.peak, self.in_flight)
                    self._submit(chunk, 0, quarantined=False)
        except BaseException as exc:
            self._error = exc
            self.stop.set()
            self.inbox.close()
            if self.budget is not None:
                self.budget.cancel()  # no download may wait for room that never comes
        finally:
            try:
                self.close()  # here, not after DONE: the lane still beats while workers exit
            finally:
                self.results.put(DONE)

    def _submit(self, items: list[Fetched], attempt: int, *, quarantined: bool) -> None:
        pool = self.quarantine if quarantined else self.pool
        try:
            future = pool.submit(process_many, items)
        except Exception as exc:  # no worker could be started (EMFILE, ...): not these images'
            hint = limit_hint(exc) if isinstance(exc, OSError) else ""
            self._lose(items, f"cannot start a transform process: {exc}{hint}")
            return
        self._suspect_running |= quarantined
        future.add_done_callback(lambda f: self.inbox.finished((items, attempt, quarantined, f)))

    def _finished(
        self, items: list[Fetched], attempt: int, quarantined: bool, future: Future[list[Outcome]]
    ) -> None:
        if quarantined:
            self._suspect_running = False
        crashed = not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)
        stopping = self.stop.is_set()
        again = crashed and not stopping and attempt < self.config.transform.crash_retries
        if not again:
            self._release(items)  # the task has ended: its bodies leave the lane
        if crashed and not stopping:  # each image of the task is a suspect: tried again alone
            for item in items:
                if again:
                    self._suspects.append((item, attempt + 1))  # its slot stays taken
                else:
                    error = TransformError(
                        "worker_crash", "the transform process died on this image"
                    )
                    self._failed(item, error)
        elif crashed or future.cancelled():  # killed or cancelled at shutdown: redone later
            self.in_flight -= len(items)
        elif isinstance(future.exception(), PipelineError):  # e.g. the disk is full
            self._lose(items, str(future.exception()))
        else:
            for outcome in self._outcomes(items, future):
                self._record(outcome)
        self._next_suspect()

    def _outcomes(self, items: list[Fetched], future: Future[list[Outcome]]) -> list[Outcome]:
        exc = future.exception()
        if exc is not None:  # not an ItemError (process() turns those into rows): still rows
            error = internal_error(items[0].job.key, exc)  # a bug of ours: a rerun retries
            meter = self.stage.meter()
            for item in items:
                meter.record(0.0, ok=False, bytes_in=len(item.body))
            return [Outcome.failed(i.job, error, download_ms=i.download_ms) for i in items]
        done = future.result()
        meter = self.stage.meter()
        for outcome in done:
            meter.record(
                outcome.transform_ms / 1000,
                ok=outcome.status != "failed",  # a filtered image is no failure
                bytes_in=outcome.bytes_in,
                bytes_out=outcome.bytes_out,
                cpu_s=outcome.cpu_ms / 1000,
            )
        return done

    def _lose(self, items: list[Fetched], message: str) -> None:
        """Record nothing for ``items`` (the next run does them) and stop the run."""
        self.in_flight -= len(items)
        self.stop.set()  # no more submits: each would fail the same way
        self.fail(message)

    def _failed(self, item: Fetched, error: TransformError) -> None:
        self.stage.meter().record(0.0, ok=False, bytes_in=len(item.body))
        self._record(Outcome.failed(item.job, error, download_ms=item.download_ms,
                                    bytes_in=len(item.body)))  # fmt: skip

    def _record(self, outcome: Outcome) -> None:
        self.in_flight -= 1
        self.results.put(outcome)

    def _next_suspect(self) -> None:
        while self._suspects and not self._suspect_running and not self.stop.is_set():
            item, attempt = self._suspects.popleft()
            self._submit([item], attempt, quarantined=True)
        if self.stop.is_set():  # not tried again now: the next run does them
            self.in_flight -= len(self._suspects)
            self._release([item for item, _ in self._suspects])
            self._suspects.clear()

    def _release(self, items: list[Fetched]) -> None:
        if self.budget is not None:
            self.budget.release(sum(len(item.body) for item in items))
