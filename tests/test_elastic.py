"""The elastic download crew: a slow job stops holding a worker's place, within bounds."""

from __future__ import annotations

import queue
import threading
import time

from pipeline.elastic import Crew
from pipeline.records import Job
from pipeline.stages import DONE, _Done

GUARD = 30.0  # seconds a test waits for what must happen before it fails


class Jobs:
    """Jobs whose work blocks until the test releases it; which thread ran each."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Job | _Done] = queue.SimpleQueue()
        self.release: dict[str, threading.Event] = {}
        self.started: dict[str, threading.Event] = {}
        self.threads: dict[str, str] = {}
        self.ended = threading.Event()
        self.ends = 0

    def add(self, url: str, *, held: bool) -> None:
        self.release[url] = threading.Event()
        self.started[url] = threading.Event()
        if not held:
            self.release[url].set()
        self.queue.put(Job(0, len(self.release), url, "s"))

    def work(self, job: Job) -> None:
        self.threads[job.url] = threading.current_thread().name
        self.started[job.url].set()
        assert self.release[job.url].wait(GUARD)

    def on_end(self) -> None:
        self.ends += 1
        self.ended.set()


def crew(jobs: Jobs, workers: int, max_stragglers: int) -> Crew:
    return Crew(
        jobs.queue, jobs.work, jobs.on_end,
        workers=workers, max_stragglers=max_stragglers, straggler_after=0.05,
    )  # fmt: skip


def test_stragglers_are_replaced_up_to_the_cap_then_threads_shrink_back():
    jobs = Jobs()
    for url in ("slow-1", "slow-2", "slow-3"):
        jobs.add(url, held=True)
    for i in range(20):
        jobs.add(f"fast-{i}", held=False)
    group = crew(jobs, workers=2, max_stragglers=2)
    group.start()
    # two workers take slow-1 and slow-2; both become stragglers and are replaced; slow-3
    # becomes one too, but the cap is reached: its thread still counts. One place is left:
    # the fast jobs all go through it while the three slow ones are held
    for i in range(20):
        assert jobs.started[f"fast-{i}"].wait(GUARD), f"fast-{i} never started"
    deadline = time.monotonic() + GUARD
    while group.stats.count < 3:  # slow-3 passes the threshold 0.05 s after it started
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert group.threads == 2 + 2
    assert (group.stats.count, group.stats.capped, group.stats.peak) == (3, 1, 3)
    assert group.stats.hosts == {"?": 3}  # these URLs have no host
    jobs.queue.put(DONE)
    for url in ("slow-1", "slow-2", "slow-3"):
        jobs.release[url].set()
    group.join()
    assert jobs.ends == 1  # the last thread out, and only it, ends the stream
    assert group.threads == 0
    assert group.stats.longest_s >= 0.05
    assert len(set(jobs.threads.values())) == 4  # never more than workers + max_stragglers


def test_no_job_is_slow_no_thread_is_added():
    jobs = Jobs()
    for i in range(50):
        jobs.add(f"http://127.0.0.1/{i}", held=False)
    jobs.queue.put(DONE)
    group = crew(jobs, workers=3, max_stragglers=8)
    group.start()
    group.join()
    assert len(jobs.threads) == 50 and jobs.ends == 1
    assert group.stats.count == 0
    assert len(set(jobs.threads.values())) <= 3


def test_an_error_in_a_job_is_raised_by_join_and_the_others_go_on():
    jobs = Jobs()
    jobs.add("a", held=False)
    jobs.add("boom", held=False)
    jobs.add("c", held=False)
    jobs.queue.put(DONE)

    def work(job: Job) -> None:
        if job.url == "boom":
            raise RuntimeError("a bug")
        jobs.work(job)

    group = Crew(jobs.queue, work, jobs.on_end, workers=1, max_stragglers=0, straggler_after=9)
    group.start()
    try:
        group.join()
    except RuntimeError as exc:
        assert str(exc) == "a bug"
    else:
        raise AssertionError("join() did not raise")
    assert jobs.ends == 1
