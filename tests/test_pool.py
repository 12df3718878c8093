"""The transform stage driven directly: TransformPool and its Inbox, without any HTTP.

Each test plays the lane's part: producers put Fetched bodies and one DONE each into the inbox,
a collector thread reads outcomes from the results queue until DONE. Every wait is an Event or a
join with a timeout, so a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import functools
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import pytest
from helpers import encode, leftover_workers, photo, wait_for
from testops import Crash, Sleep

import pipeline.pool
from pipeline.config import Config, QueuesConfig, Thumbnail, TransformConfig
from pipeline.metrics import Stage
from pipeline.pool import Inbox, TransformPool
from pipeline.records import Fetched, Job, Outcome
from pipeline.shape import CHUNK, shape_of
from pipeline.stages import DONE, BoundedQueue

GUARD = 10.0  # seconds: far above what any wait here needs; only a hang reaches it
JUNK = b"\x00\x01 no image in here at all " * 20
EMFILE = OSError(24, "Too many open files")


def job(i: int) -> Job:
    return Job(file=0, line=i, url=f"http://x/{i}.jpg", shard="00000-000000001")


def fetched(i: int, body: bytes) -> Fetched:
    return Fetched(job(i), body, 200, "image/jpeg", 1.0)


def jpeg(i: int, size: tuple[int, int] = (96, 64)) -> bytes:
    return encode(photo(*size, seed=i), "JPEG")


def lines(outcomes: Iterable[Outcome]) -> list[int]:
    return sorted(o.line for o in outcomes)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    """Run ``fn`` in a daemon thread; what it raises is kept in the list."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


class Run:
    """One TransformPool with its results queue, stop event, stage, and a collector thread."""

    def __init__(
        self,
        out: Path,
        *,
        workers: int = 1,
        producers: int = 1,
        fetched: int = 32,
        results: BoundedQueue[Outcome] | None = None,
        stop: threading.Event | None = None,
        **transform: Any,
    ) -> None:
        transform.setdefault("ops", (Thumbnail(32, 32),))
        self.config = Config(
            transform=TransformConfig(workers=workers, **transform),
            queues=QueuesConfig(fetched=fetched),
        )
        self.out = out
        self.results = results if results is not None else BoundedQueue("results", 1000)
        self.stage = Stage("transform", workers)
        self.stop = stop if stop is not None else threading.Event()
        self.failures: list[str] = []  # what the pool told the lane to stop the run with
        self.shape = shape_of(self.config, cores=1).lanes[0]  # one lane: every worker its own
        self.pool = TransformPool(
            self.config, out, self.results, self.stage, self.stop, producers, self.shape,
            fail=self.failures.append,
        )  # fmt: skip
        self.outcomes: list[Outcome] = []
        self.ended = threading.Event()  # the results queue gave DONE
        self._collector = threading.Thread(target=self._collect, name="collector", daemon=True)

    def _collect(self) -> None:
        while (item := self.results.get()) is not DONE:
            assert isinstance(item, Outcome)
            self.outcomes.append(item)
        self.ended.set()

    def start(self) -> None:
        self.pool.start()
        self._collector.start()

    def produce(self, items: Iterable[Fetched]) -> None:
        """One producer's part: its bodies, then its DONE."""
        try:
            for item in items:
                self.pool.inbox.put(item)
        finally:
            self.pool.inbox.put(DONE)

    def finish(self, timeout: float = GUARD) -> BaseException | None:
        """Wait for DONE on the results and for join(); close. Returns what join() raised."""
        assert self.ended.wait(timeout), "the results queue never got DONE"
        joiner, errors = in_thread(self.pool.join)
        joiner.join(timeout)
        assert not joiner.is_alive(), "TransformPool.join() did not return"
        self.pool.close()
        return errors[0] if errors else None

    def abort(self) -> None:
        """Teardown: whatever a test left running is ended, never waited for."""
        thread = self.pool._thread
        if thread.is_alive():
            self.stop.set()
            self.pool.kill_workers()
            self.pool.inbox.finished(("abort",))  # type: ignore[arg-type]  # _finished raises
            thread.join(GUARD)
        if thread.is_alive():
            self.pool.kill_workers()  # a closing pool would wait for it: leave it be
        else:
            self.pool.close()


@pytest.fixture
def make_run(tmp_path: Path):
    runs: list[Run] = []

    def make(**options: Any) -> Run:
        run = Run(tmp_path / f"out{len(runs)}", **options)
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.abort()
    assert leftover_workers() == []


# --- every body once, within the bounds -------------------------------------------------------


def test_every_body_comes_back_once_and_the_bounds_hold(make_run):
    run = make_run(workers=2, producers=2, fetched=2, max_in_flight=4)
    bodies = {i: JUNK if i % 4 == 3 else jpeg(i) for i in range(12)}
    run.start()
    shares = [[fetched(i, b) for i, b in bodies.items() if i % 2 == p] for p in range(2)]
    producers = [in_thread(functools.partial(run.produce, share))[0] for share in shares]

    assert run.finish() is None
    for producer in producers:
        producer.join(GUARD)
        assert not producer.is_alive()

    assert lines(run.outcomes) == list(range(12))  # each exactly once
    for outcome in run.outcomes:
        if bodies[outcome.line] is JUNK:
            assert (outcome.status, outcome.error_kind, outcome.path) == (
                "failed",
                "not_image",
                None,
            )
        else:
            assert outcome.status == "ok", outcome
            assert (run.out / str(outcome.path)).is_file()
            assert (outcome.width_out, outcome.height_out) == (32, 21)
    pool = run.pool
    assert pool.bound == 4 and 1 <= pool.peak <= pool.bound
    assert pool.inbox.bound == 2 and 1 <= pool.inbox.peak <= 2
    assert pool.in_flight == 0 and pool.inbox.depth() == 0
    assert pool.restarts == 0
    total = run.stage.total()
    assert (total.items, total.failed) == (12, 3)


def test_the_pool_holds_what_its_lane_shape_says(make_run):
    assert CHUNK > 1
    run = make_run(workers=3, fetched=5)
    assert run.pool.bound == run.shape.in_flight == 2 * 3 * CHUNK  # two chunks a worker
    assert run.pool.inbox.bound == 5
    assert make_run(workers=3, max_in_flight=5).pool.bound == 5


def record_chunks(
    monkeypatch: pytest.MonkeyPatch, run: Run, chunks: list[tuple[list[int], int]]
) -> None:
    """Wrap the main pool's submit: each task's lines, and the room the dispatcher had for it.

    The wrapper runs in the dispatcher's thread, after in_flight counted the task's images."""
    real = run.pool.pool.submit

    def submit(fn, items):
        chunks.append(
            ([i.job.line for i in items], run.pool.bound - run.pool.in_flight + len(items))
        )
        return real(fn, items)

    monkeypatch.setattr(run.pool.pool, "submit", submit)


def test_waiting_bodies_go_to_the_pool_in_chunks_within_the_room(make_run, monkeypatch):
    run = make_run(workers=2, max_in_flight=6)  # 6: a second chunk of 4 would not fit
    chunks: list[tuple[list[int], int]] = []
    record_chunks(monkeypatch, run, chunks)
    run.produce(fetched(i, jpeg(i)) for i in range(20))  # all waiting before the dispatcher starts
    run.start()

    assert run.finish() is None

    sizes = [len(lines_) for lines_, _ in chunks]
    assert any(1 < size <= CHUNK for size in sizes), sizes  # chunking happened
    assert all(1 <= size <= CHUNK for size in sizes), sizes
    assert all(len(lines_) <= room for lines_, room in chunks), chunks  # never past the bound
    assert [line for lines_, _ in chunks for line in lines_] == list(range(20))  # once, in order
    assert lines(run.outcomes) == list(range(20))  # each comes back exactly once
    assert all(o.status == "ok" and (run.out / str(o.path)).is_file() for o in run.outcomes)
    assert 1 <= run.pool.peak <= run.pool.bound == 6
    assert run.pool.in_flight == 0 and run.pool.restarts == 0
    total = run.stage.total()
    assert (total.items, total.failed) == (20, 0)


# --- a worker that dies -------------------------------------------------------------------------


def test_a_dead_worker_blames_its_image_only_and_the_others_are_retried(make_run):
    # the culprit (40x30) kills its worker at once; the others take a little while, so some are
    # in the pool with it when it dies and some are still in the inbox
    run = make_run(workers=2, ops=(Crash(40, 30), Sleep(0.02), Thumbnail(32, 32)), crash_retries=1)
    bodies = {0: jpeg(0, (40, 30)), **{i: jpeg(i) for i in range(1, 10)}}
    run.produce(fetched(i, b) for i, b in bodies.items())
    run.start()

    assert run.finish() is None

    assert lines(run.outcomes) == list(range(10))
    crashed = [o for o in run.outcomes if o.status != "ok"]
    assert [(o.line, o.error_kind) for o in crashed] == [(0, "worker_crash")]
    assert crashed[0].error == "the transform process died on this image"
    assert crashed[0].bytes_in == len(bodies[0])
    assert all((run.out / str(o.path)).is_file() for o in run.outcomes if o.status == "ok")
    assert run.pool.restarts > 0
    assert run.pool.in_flight == 0
    total = run.stage.total()
    assert (total.items, total.failed) == (10, 1)


def test_a_crash_inside_a_chunk_blames_only_its_image(make_run, monkeypatch):
    # two chunks of 4 go to the pool at once; 5 (40x30) kills its worker in the middle of the
    # second: every image of both tasks is a suspect and is tried again alone in the quarantine
    run = make_run(workers=2, max_in_flight=8, ops=(Crash(40, 30), Thumbnail(32, 32)))
    assert run.config.transform.crash_retries == 1
    chunks: list[tuple[list[int], int]] = []
    record_chunks(monkeypatch, run, chunks)
    alone: list[list[int]] = []
    real_quarantine = run.pool.quarantine.submit

    def quarantine(fn, items):
        alone.append([i.job.line for i in items])
        return real_quarantine(fn, items)

    monkeypatch.setattr(run.pool.quarantine, "submit", quarantine)
    bodies = {i: jpeg(i, (40, 30)) if i == 5 else jpeg(i) for i in range(12)}
    run.produce(fetched(i, b) for i, b in bodies.items())
    run.start()

    assert run.finish() is None

    culprit_chunk = next(lines_ for lines_, _ in chunks if 5 in lines_)
    assert len(culprit_chunk) > 1, chunks  # it really crashed inside a chunk
    assert all(len(images) == 1 for images in alone), alone  # suspects are tried alone
    assert {5, *culprit_chunk} <= {line for images in alone for line in images}
    assert lines(run.outcomes) == list(range(12))
    crashed = [o for o in run.outcomes if o.status != "ok"]
    assert [(o.line, o.error_kind) for o in crashed] == [(5, "worker_crash")]
    assert crashed[0].error == "the transform process died on this image"
    assert crashed[0].bytes_in == len(bodies[5])
    ok = [o for o in run.outcomes if o.status == "ok"]
    assert len(ok) == 11 and all((run.out / str(o.path)).is_file() for o in ok)
    assert run.pool.restarts > 0
    assert run.pool.in_flight == 0
    total = run.stage.total()
    assert (total.items, total.failed) == (12, 1)


# --- submit fails -------------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["first", "third"])
def test_a_submit_that_fails_stops_the_run_and_records_no_image(make_run, monkeypatch, failing):
    # no process can be started: no image is to blame, so none gets a row; the lane is told to
    # stop the run, in one line, and the dispatcher ends (one image a task: max_in_flight=1)
    run = make_run(workers=1, max_in_flight=1)
    real = run.pool.pool.submit
    chunks: list[list[int]] = []

    def submit(fn, items):
        chunks.append([i.job.line for i in items])
        if failing == "first" or len(chunks) == 3:
            raise EMFILE
        return real(fn, items)

    monkeypatch.setattr(run.pool.pool, "submit", submit)
    run.produce(fetched(i, jpeg(i)) for i in range(5))
    run.start()

    assert run.finish() is None

    assert run.failures == [
        "cannot start a transform process: [Errno 24] Too many open files (open files are "
        f"limited to {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} here: raise ulimit -n)"
    ]
    assert run.stop.is_set()
    assert chunks == ([[0]] if failing == "first" else [[0], [1], [2]])  # nothing submitted after
    done = [] if failing == "first" else [0, 1]
    assert lines(run.outcomes) == done  # the failed one and those after it: left to a rerun
    assert all(o.status == "ok" for o in run.outcomes)
    assert run.pool.in_flight == 0
    if failing == "first":
        assert run.pool.pool.processes() == []  # no worker was ever started


def test_a_failed_quarantine_submit_strands_no_other_suspect(make_run, monkeypatch):
    run = make_run(workers=1, max_in_flight=3)
    tasks: list[Future[list[Outcome]]] = []
    images = 0
    submitted = threading.Event()
    alone: list[list[int]] = []  # the lines of each quarantine submit
    suspect: Future[list[Outcome]] = Future()
    quarantine_submitted = threading.Event()

    def submit(fn, items):  # the main pool: futures the test settles itself
        nonlocal images
        tasks.append(Future())
        images += len(items)
        if images == 3:
            submitted.set()
        return tasks[-1]

    def quarantine(fn, items):  # the first suspect runs; then no process can be started
        alone.append([i.job.line for i in items])
        if len(alone) > 1:
            raise EMFILE
        quarantine_submitted.set()
        return suspect

    monkeypatch.setattr(run.pool.pool, "submit", submit)
    monkeypatch.setattr(run.pool.quarantine, "submit", quarantine)
    run.produce(fetched(i, jpeg(i)) for i in range(3))
    run.start()
    assert submitted.wait(GUARD)
    for task in tasks:  # a worker died: all three are suspects; 0 goes to the quarantine
        task.set_exception(BrokenProcessPool("a child process terminated abruptly"))
    assert quarantine_submitted.wait(GUARD)
    # the finished tasks are taken in order: 1 and 2 queue behind 0 before 0 is settled
    suspect.set_result([Outcome.of(job(0), "ok", bytes_in=3)])

    assert run.finish(timeout=3) is None

    assert alone == [[0], [1]]  # one at a time; then the run stops, and 2 is not stranded
    assert [(o.line, o.status) for o in run.outcomes] == [(0, "ok")]
    assert len(run.failures) == 1 and "Too many open files" in run.failures[0]
    assert run.pool.in_flight == 0


# --- a task that raises -------------------------------------------------------------------------


def test_a_task_that_raises_is_one_retryable_internal_error_row_per_image(make_run, monkeypatch):
    # a local function cannot be pickled: every task fails in the pool's feeder thread
    monkeypatch.setattr(pipeline.pool, "process_many", lambda items: None)
    run = make_run(workers=1)
    chunks: list[tuple[list[int], int]] = []
    record_chunks(monkeypatch, run, chunks)
    run.produce(fetched(i, jpeg(i)) for i in range(3))  # waiting before the start: one task
    run.start()

    assert run.finish() is None

    assert [lines_ for lines_, _ in chunks] == [[0, 1, 2]]
    assert lines(run.outcomes) == [0, 1, 2]  # one task's error, a row for each of its images
    for outcome in run.outcomes:
        assert (outcome.status, outcome.error_kind) == ("failed", "internal_error")  # a bug
        assert "pickle" in str(outcome.error)
    assert run.pool.in_flight == 0 and run.pool.restarts == 0
    total = run.stage.total()
    assert (total.items, total.failed) == (3, 3)


# --- stopping -----------------------------------------------------------------------------------


class StopOnFirst(BoundedQueue[Outcome]):
    """A results queue that sets ``stop`` as the first outcome is put: in the dispatcher's thread,
    so what was in flight then is known exactly."""

    def __init__(self, stop: threading.Event) -> None:
        super().__init__("results", 1000)
        self.stop = stop

    def put(self, item: Any) -> None:
        if item is not DONE:
            self.stop.set()
        super().put(item)


def test_a_stop_drops_the_bodies_and_lets_the_tasks_in_flight_settle(make_run):
    stop = threading.Event()
    run = make_run(
        workers=1, ops=(Sleep(0.1), Thumbnail(32, 32)), stop=stop, results=StopOnFirst(stop)
    )
    run.produce(fetched(i, jpeg(i)) for i in range(12))
    run.start()

    assert run.finish() is None

    assert run.stop.is_set()
    got = lines(run.outcomes)
    # the bodies wait before the start: the pool is filled to its bound (bodies are taken in
    # order), the stop comes with the first outcome, then the rest are dropped
    assert run.pool.bound == run.shape.in_flight < 12
    assert got == list(range(run.pool.bound))
    assert all(o.status == "ok" for o in run.outcomes)
    written = {p.name.split("-")[0] for p in (run.out / "images").rglob("*.jpg")}
    assert written == {f"{i:09d}" for i in got}  # nothing was done with the dropped bodies
    assert run.pool.in_flight == 0 and run.pool.inbox.depth() == 0


def test_kill_workers_ends_the_sleeping_tasks_and_they_are_not_recorded(make_run, monkeypatch):
    run = make_run(workers=2, max_in_flight=8, ops=(Sleep(30), Thumbnail(32, 32)))
    real = run.pool.pool.submit
    submitted = threading.Event()
    chunks: list[int] = []

    def submit(fn, items):
        future = real(fn, items)
        chunks.append(len(items))
        if sum(chunks) == 8:
            submitted.set()
        return future

    monkeypatch.setattr(run.pool.pool, "submit", submit)
    run.produce(fetched(i, jpeg(i)) for i in range(10))
    run.start()
    assert submitted.wait(GUARD)  # the pool holds its bound of 8 images, two bodies wait
    assert chunks == [CHUNK, CHUNK]  # they waited before the start: both workers have a task
    assert run.pool.in_flight == 8 and run.pool.inbox.depth() == 2
    assert run.pool.pool.processes()

    started = time.monotonic()
    run.stop.set()
    run.pool.kill_workers()
    assert run.finish(timeout=GUARD) is None  # a 30 s sleep would trip the guard

    assert time.monotonic() - started < GUARD
    assert run.outcomes == []
    assert not (run.out / "images").exists()
    assert run.pool.in_flight == 0 and run.pool.inbox.depth() == 0
    assert all(not p.is_alive() for p in run.pool.pool.processes())


# --- a bug in the dispatcher --------------------------------------------------------------------


def test_a_dispatcher_error_is_reraised_and_releases_producer_and_consumer(make_run, monkeypatch):
    # 2 images in flight (in one task or two), 1 body in the inbox, then put blocks
    run = make_run(workers=1, fetched=1, max_in_flight=2)
    tasks: list[Future[list[Outcome]]] = []
    images = 0
    full = threading.Event()

    def submit(fn, items):  # futures the test settles itself: nothing else wakes the inbox
        nonlocal images
        tasks.append(Future())
        images += len(items)
        if images == 2:
            full.set()
        return tasks[-1]

    calls = 0

    def broken(*event):
        nonlocal calls
        calls += 1
        raise RuntimeError("a bug in the dispatcher")

    monkeypatch.setattr(run.pool.pool, "submit", submit)
    monkeypatch.setattr(run.pool, "_finished", broken)
    run.start()
    producer, producer_errors = in_thread(
        lambda: run.produce(fetched(i, jpeg(i)) for i in range(6))
    )
    assert full.wait(GUARD)
    producer.join(0.2)
    assert producer.is_alive(), "the producer should be blocked on the full inbox"
    assert run.pool.inbox.depth() == 1

    tasks[0].set_result([Outcome.of(job(0), "ok")])  # the dispatcher takes it, and fails

    producer.join(GUARD)
    assert not producer.is_alive(), "a producer is still blocked in inbox.put"
    assert producer_errors == []
    error = run.finish()
    assert isinstance(error, RuntimeError) and str(error) == "a bug in the dispatcher"
    assert calls == 1
    assert run.outcomes == []  # the results queue got its DONE all the same
    assert run.stop.is_set()
    assert run.pool.inbox.depth() == 0


# --- the inbox alone ----------------------------------------------------------------------------


def body(i: int) -> Fetched:
    return fetched(i, b"x")


def event(i: int) -> Any:
    return (body(i), 0, False, Future())


def test_inbox_put_blocks_when_full_until_take_makes_room():
    inbox = Inbox(2)
    inbox.put(body(0))
    inbox.put(body(1))
    put, errors = in_thread(lambda: inbox.put(body(2)))

    put.join(0.2)
    assert put.is_alive(), "put did not block on a full inbox"
    assert inbox.depth() == 2
    assert inbox.take(room=True) == (None, body(0))
    put.join(GUARD)
    assert not put.is_alive() and errors == []
    assert inbox.depth() == 2 and inbox.peak == 2
    assert [inbox.take(room=True)[1] for _ in range(2)] == [body(1), body(2)]
    assert inbox.depth() == 0


def test_inbox_done_and_finished_never_block():
    inbox = Inbox(1)
    inbox.put(body(0))

    def flood() -> None:
        inbox.put(DONE)  # not a body: not bounded
        for i in range(100):
            inbox.finished(event(i))

    thread, errors = in_thread(flood)
    thread.join(GUARD)
    assert not thread.is_alive() and errors == []
    assert inbox.depth() == 1
    # finished tasks come first, in order, then the bodies
    assert [inbox.take(room=True)[0][0] for _ in range(100)] == [body(i) for i in range(100)]
    assert inbox.take(room=True) == (None, body(0))
    assert inbox.take(room=True) == (None, DONE)


def test_inbox_take_without_room_waits_for_a_finished_task_only():
    inbox = Inbox(4)
    inbox.put(body(0))
    first = event(1)
    inbox.finished(first)
    assert inbox.take(room=False) == (first, None)

    taken: list[Any] = []
    thread, errors = in_thread(lambda: taken.append(inbox.take(room=False)))
    thread.join(0.2)
    assert thread.is_alive() and taken == [], "take(room=False) returned a body"
    second = event(2)
    inbox.finished(second)
    thread.join(GUARD)
    assert not thread.is_alive() and errors == []
    assert taken == [(second, None)]
    assert inbox.depth() == 1 and inbox.take(room=True) == (None, body(0))


def test_inbox_close_lets_a_blocked_put_through_and_drops_the_bodies():
    inbox = Inbox(1)
    inbox.put(body(0))
    put, errors = in_thread(lambda: inbox.put(body(1)))
    put.join(0.1)
    assert put.is_alive()

    inbox.close()

    put.join(GUARD)
    assert not put.is_alive() and errors == []
    assert inbox.depth() == 0
    inbox.put(body(2))  # returns at once: nobody will take it
    assert inbox.depth() == 0


def test_inbox_take_ready_takes_what_is_there_up_to_most_and_stops_at_a_done():
    inbox = Inbox(3)
    for i in range(3):
        inbox.put(body(i))
    put, errors = in_thread(lambda: inbox.put(body(3)))  # full: it waits for room

    assert inbox.take_ready(2) == [body(0), body(1)]  # the room it makes lets the put through
    put.join(GUARD)
    assert not put.is_alive() and errors == []
    assert inbox.depth() == 2
    inbox.put(DONE)
    inbox.put(body(4))
    assert inbox.take_ready(0) == []
    assert inbox.take_ready(5) == [body(2), body(3)]  # stops at the DONE
    assert inbox.take_ready(5) == []  # a DONE first: nothing, and no wait
    assert inbox.depth() == 1
    assert inbox.take(room=True) == (None, DONE)
    assert inbox.take_ready(5) == [body(4)]
    assert inbox.take_ready(5) == [] and inbox.depth() == 0 and inbox.peak == 3


def test_a_stopped_worker_is_killed_after_the_grace_instead_of_hanging_the_end(make_run):
    run = make_run(workers=1, shutdown_grace=0.5)
    run.start()
    run.pool.inbox.put(fetched(0, jpeg(0)))
    wait_for(lambda: len(run.outcomes) == 1, timeout=GUARD, what="the image")
    (worker,) = run.pool.pool.processes()
    os.kill(worker.pid, signal.SIGSTOP)  # idle: it would never read its shutdown sentinel
    started = time.monotonic()
    run.pool.inbox.put(DONE)  # the dispatcher ends and shuts its pool down
    assert run.finish() is None
    assert time.monotonic() - started < 0.5 + 2.0
    worker.join(GUARD)
    assert worker.exitcode == -signal.SIGKILL
