"""A lane's owner thread and its workers driven directly: bodies posted to its mailbox, jobs and
STOP through a real pipe, real worker processes; no HTTP."""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from pathlib import Path

from helpers import encode, leftover_workers, photo, wait_for
from testops import Crash, Sleep

import pipeline.owner
from pipeline.budget import ByteBudget
from pipeline.config import Config, OutputConfig, QueuesConfig, Thumbnail, TransformConfig
from pipeline.lanes import worker_setup
from pipeline.metrics import Stage
from pipeline.owner import END, STOP, Owner
from pipeline.records import Fetched, Job, Outcome
from pipeline.shape import CHUNK, shape_of
from pipeline.stages import DONE

GUARD = 30  # seconds: a hang fails the test instead of blocking it


def body(size: tuple[int, int], seed: int = 0) -> bytes:
    return encode(photo(*size, seed=seed), "JPEG")


class Run:
    """One Owner, a pipe for its jobs, its results collected, the lane's budget."""

    def __init__(self, tmp_path: Path, workers: int = 1, **transform: object) -> None:
        transform.setdefault("ops", (Thumbnail(32, 32),))
        self.config = Config(
            output=OutputConfig(dir=str(tmp_path)),
            transform=TransformConfig(workers=workers, **transform),  # type: ignore[arg-type]
            queues=QueuesConfig(fetched=64),
        )
        self.jobs: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.budget = ByteBudget(1 << 30)
        self.failures: list[str] = []
        self.stopped = threading.Event()
        self.owner = Owner(
            worker_setup(self.config, tmp_path), self.jobs, self.results,  # type: ignore[arg-type]
            Stage("transform", workers), shape=shape_of(self.config, cores=1).lanes[0],
            heartbeat=self.config.executor.heartbeat, budget=self.budget,
            on_stop=self.stopped.set, failed=self.failures.append,
        )  # fmt: skip
        reader, self.coordinator = multiprocessing.Pipe(duplex=False)
        self.owner.start(reader)
        self.line = 0

    def post(self, data: bytes) -> Fetched:
        self.line += 1
        item = Fetched(
            Job(1, self.line, f"http://x/{self.line}.jpg", "00001-000000001"),
            data,
            200,
            "image/jpeg",
            1.0,
        )
        self.budget.take(len(data))
        self.budget.hand_over(len(data))
        self.owner.mailbox.put(item)
        return item

    def finish(self, tell: str = END) -> list[Outcome]:
        """END (or STOP), the crew's end; the rows, once the owner has ended."""
        self.coordinator.send(tell)
        assert self.jobs.get(timeout=GUARD) is DONE  # the download threads are told
        self.owner.mailbox.end()
        return self.rows()

    def rows(self) -> list[Outcome]:
        rows = []
        while (item := self.results.get(timeout=GUARD)) is not DONE:
            assert isinstance(item, Outcome)
            rows.append(item)
        self.owner.join()
        return rows


def test_jobs_pass_through_and_every_body_comes_back_once_in_chunks(tmp_path):
    run = Run(tmp_path, workers=2)
    run.coordinator.send(["a job"])  # the owner hands the coordinator's jobs to the threads
    assert run.jobs.get(timeout=GUARD) == "a job"
    sent = [run.post(body((64 + i, 48))) for i in range(3 * CHUNK)]
    rows = run.finish()
    assert sorted(r.key for r in rows) == sorted(i.job.key for i in sent)
    assert {r.status for r in rows} == {"ok"}
    assert run.owner.peak <= run.owner.bound
    assert run.budget.used == 0  # every body's bytes are back
    assert run.owner.restarts == 0 and not run.failures
    assert leftover_workers() == []


def test_a_crash_mid_chunk_blames_exactly_its_image(tmp_path):
    # one worker, images in chunks; the victim (the only one of its size) kills its worker
    # each time: it alone is retried (crash_retries), then worker_crash; no bystander is blamed
    run = Run(tmp_path, ops=(Crash(70, 50), Thumbnail(32, 32)), crash_retries=2)
    sizes = [(64, 48), (66, 48), (70, 50), (68, 48), (72, 48), (74, 48)]
    sent = [run.post(body(size)) for size in sizes]
    rows = {r.key: r for r in run.finish()}
    assert len(rows) == len(sent)
    victim = sent[2].job.key
    assert rows[victim].error_kind == "worker_crash"
    assert all(r.status == "ok" for key, r in rows.items() if key != victim)
    assert run.owner.restarts == 3  # the first crash and both retries, nothing else
    assert run.budget.used == 0


def test_a_runaway_image_is_killed_as_transform_timeout_and_the_owner_goes_on(tmp_path):
    run = Run(tmp_path, ops=(Sleep(20.0),), timeout=0.5)
    started = time.monotonic()
    run.post(body((64, 48)))
    run.post(body((66, 48)))
    rows = run.finish()
    assert [r.error_kind for r in rows] == ["transform_timeout", "transform_timeout"]
    assert time.monotonic() - started < 10  # each killed after 0.5 s, not after 20
    assert run.owner.restarts == 2 and not run.failures
    assert run.budget.used == 0


def test_a_body_larger_than_a_busy_workers_pipe_waits_and_never_blocks_the_owner(tmp_path):
    """Sent to a worker busy for 20 s, a 3 MB body would fill its 1 MB pipe and hold the
    owner's write, and with it the 1 s timeout: it waits for an idle worker instead."""
    run = Run(tmp_path, ops=(Sleep(20.0),), timeout=1.0)
    started = time.monotonic()
    run.post(body((64, 48)))
    wait_for(lambda: run.owner.in_flight == 1, what="the worker to hold the first image")
    run.post(b"\xff\xd8" + b"x" * 3_000_000)
    rows = run.finish()
    assert [r.error_kind for r in rows] == ["transform_timeout", "not_image"]
    assert time.monotonic() - started < 10  # the timeout fired after 1 s, not after 20
    assert run.budget.used == 0


def test_a_stop_lets_images_finish_within_the_grace_then_kills_and_records_nothing(tmp_path):
    run = Run(tmp_path, workers=2, ops=(Sleep(20.0),), shutdown_grace=0.5)
    for i in range(6):
        run.post(body((64 + i, 48)))
    wait_for(lambda: run.owner.in_flight == 6, what="the workers to hold every image")
    started = time.monotonic()
    rows = run.finish(STOP)
    assert rows == []  # killed: the next run does them
    assert run.stopped.is_set()  # the downloads were cut
    assert time.monotonic() - started < 5
    assert run.budget.used == 0
    assert leftover_workers() == []


def test_eof_on_the_jobs_pipe_stops_the_lane(tmp_path):
    run = Run(tmp_path)
    run.coordinator.close()  # the coordinator is gone
    assert run.jobs.get(timeout=GUARD) is DONE
    assert run.stopped.is_set()
    run.owner.mailbox.end()
    assert run.rows() == []


def test_no_process_can_be_started_is_one_failure_and_no_row(tmp_path, monkeypatch):
    def refused(*args: object) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(pipeline.owner, "Worker", refused)
    run = Run(tmp_path)
    run.post(body((64, 48)))
    run.post(body((66, 48)))
    assert run.jobs.get(timeout=GUARD) is DONE  # the owner stops the lane itself
    run.owner.mailbox.end()
    assert run.rows() == []
    (failure,) = run.failures
    assert failure.startswith("cannot start a transform process: [Errno 24] Too many open files")
    assert run.budget.used == 0


def test_a_failure_posted_by_a_download_thread_stops_the_lane_once(tmp_path):
    run = Run(tmp_path)
    run.owner.mailbox.fail("the config is wrong")
    run.owner.mailbox.fail("the config is wrong")  # again, from another thread: told once
    assert run.jobs.get(timeout=GUARD) is DONE
    run.owner.mailbox.end()
    assert run.rows() == []
    assert run.failures == ["the config is wrong"]


def test_workers_are_recycled_after_max_tasks_per_child_and_that_is_no_crash(tmp_path, monkeypatch):
    started: list[object] = []
    real = pipeline.owner.Worker

    def counted(*args: object) -> object:
        started.append(real(*args))  # type: ignore[arg-type]
        return started[-1]

    monkeypatch.setattr(pipeline.owner, "Worker", counted)
    run = Run(tmp_path, max_tasks_per_child=1, max_in_flight=1)
    sent = [run.post(body((64 + i, 48))) for i in range(3)]
    rows = run.finish()
    assert {r.status for r in rows} == {"ok"} and len(rows) == len(sent)
    assert len(started) == 3  # one image each, then replaced
    assert run.owner.restarts == 0  # a recycled worker is no crash


def test_the_owner_waits_on_one_selector_not_a_new_wait_each_step(tmp_path, monkeypatch):
    """Each pipe is registered once: ``connection.wait`` (a selector built per call, and per
    ``poll()`` of an outcomes pipe) is called by the owner only as it closes its workers."""
    real, calls = multiprocessing.connection.wait, []

    def counted(*args: object, **kwargs: object) -> object:
        if threading.current_thread().name == "owner":
            calls.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(multiprocessing.connection, "wait", counted)
    run = Run(tmp_path, workers=2)
    wait_for(lambda: len(run.owner.workers) == 2, what="the workers")
    calls.clear()  # a process's start polls its siblings (multiprocessing's own cleanup)
    sent = [run.post(body((64 + i, 48))) for i in range(3 * CHUNK)]
    wait_for(lambda: run.results.qsize() == len(sent), what="every row")
    during = list(calls)
    rows = run.finish()
    assert during == []  # every image in and out, and not one selector built for it
    assert len(rows) == len(sent) and run.budget.used == 0
