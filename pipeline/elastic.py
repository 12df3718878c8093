"""A lane's download threads, elastic: a download that waits long stops holding a worker's place.

    jobs queue --> thread x download.workers, at work ------------------+--> work(job)
                     | a download past download.straggler_after          |
                     v   (the watch thread sees it)                      |
                   a straggler: it no longer counts; a thread is started |
                   in its place, up to download.max_stragglers at once --+

A slow server (headers after 30 s, a body dripped over a minute) holds its thread until its
deadline; with a fixed number of threads, a few such URLs hold them all and the run waits for them
while fast URLs queue. Here at most ``workers`` downloads count at any time: one that has waited
``straggler_after`` seconds becomes a straggler, and a new thread takes its place, so fast URLs
keep ``workers`` threads. When a straggler ends, its thread leaves if there are more threads than
``workers`` + stragglers. Memory stays bounded: at most ``workers + max_stragglers`` threads (and
bodies); past that, stragglers count again, as before.

One lock guards the counts. The watch thread sleeps until the oldest running download reaches the
threshold (with one threshold for all, the oldest started is the first to reach it: an ordered
dict, no heap). End of input: one DONE in the jobs queue, which each thread puts back for the next
before it leaves; the last thread to leave calls ``on_end`` (it posts the end to the owner).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .metrics import Histogram
from .records import Job
from .stages import DONE, _Done, label_thread

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Stragglers:
    """Downloads that waited past the threshold: how many, how long, from which hosts."""

    count: int = 0
    longest_s: float = 0.0
    durations: Histogram = field(default_factory=Histogram)  # each one's whole duration
    hosts: Counter[str] = field(default_factory=Counter)
    peak: int = 0  # stragglers at once, at most
    capped: int = 0  # times one was not replaced: max_stragglers were running

    def ended(self, seconds: float) -> None:
        self.durations.add(seconds * 1000)
        self.longest_s = max(self.longest_s, seconds)

    def slow_host(self, url: str) -> None:
        self.hosts[(urlsplit(url).hostname or "?").lower()] += 1
        if len(self.hosts) > 2 * _HOSTS_KEPT:  # a week-long crawl meets many: memory stays flat
            self.hosts = Counter(dict(self.hosts.most_common(_HOSTS_KEPT)))

    def summary(self, after_s: float) -> dict[str, object]:
        """For the report (report.Report.stragglers)."""
        return {
            "count": self.count,
            "after_s": after_s,
            # the histogram's buckets are ~4% wide: never above the longest, which is exact
            "median_s": round(min(self.durations.percentile(50) / 1000, self.longest_s), 2),
            "longest_s": round(self.longest_s, 2),
            "peak": self.peak,
            "capped": self.capped,
            "hosts": [list(item) for item in self.hosts.most_common(3)],
        }

    def merge(self, other: Stragglers) -> None:
        self.count += other.count
        self.longest_s = max(self.longest_s, other.longest_s)
        self.durations.merge(other.durations)
        self.hosts.update(other.hosts)
        self.peak = max(self.peak, other.peak)
        self.capped += other.capped


_HOSTS_KEPT = 500


class Crew:
    """The download threads of one lane; ``work(job)`` is called for each job, in one of them."""

    def __init__(
        self,
        jobs: queue.SimpleQueue[Job | _Done],
        work: Callable[[Job], None],
        on_end: Callable[[], None],
        *,
        workers: int,
        max_stragglers: int,
        straggler_after: float,
    ) -> None:
        self.jobs = jobs
        self.work = work
        self.on_end = on_end
        self.workers = workers
        self.max_stragglers = max_stragglers
        self.after = straggler_after
        self.stats = Stragglers()
        self._lock = threading.Condition()
        self._running: OrderedDict[int, tuple[float, str]] = OrderedDict()  # not stragglers yet
        self._straggling: set[int] = set()
        self._threads = 0  # alive
        self._names = itertools.count()
        self._tokens = itertools.count()
        self._closed = False
        self._error: BaseException | None = None
        self._watch = threading.Thread(target=self._watch_loop, name="straggler-watch")

    def start(self) -> None:
        self._watch.start()
        with self._lock:
            for _ in range(self.workers):
                self._spawn()

    def join(self) -> None:
        """Wait until every thread has left; re-raise the first error one of them had."""
        with self._lock:
            self._lock.wait_for(lambda: self._threads == 0)
            self._closed = True
            self._lock.notify_all()
        self._watch.join()
        if self._error is not None:
            raise self._error

    @property
    def threads(self) -> int:
        return self._threads

    # --- the download threads -------------------------------------------------------------------

    def _spawn(self) -> None:  # with the lock held
        self._threads += 1
        name = f"download-{next(self._names)}"
        try:
            threading.Thread(target=self._loop, name=name).start()
        except BaseException:
            self._threads -= 1
            raise

    def _loop(self) -> None:
        label_thread()
        counted_out = False
        try:
            while (job := self.jobs.get()) is not DONE:
                assert isinstance(job, Job)
                if self._run(job):
                    counted_out = True
                    return  # surplus once its straggler ended: the others go on
            self.jobs.put(DONE)  # for the next thread
        except BaseException as exc:  # the lane's work() makes rows of errors: this is a bug
            with self._lock:
                self._error = self._error or exc
        finally:
            self._leave(counted_out)

    def _run(self, job: Job) -> bool:
        """Do ``job``; True when this thread must leave (it ran a straggler, and there are more
        threads than workers + stragglers now): it is counted out here, under the lock."""
        token = next(self._tokens)
        started = time.monotonic()
        with self._lock:
            if not self._running:
                self._lock.notify_all()  # the watch thread was idle
            self._running[token] = (started, job.url)
        try:
            self.work(job)
        finally:
            leave = self._ended(token, started)
        return leave

    def _ended(self, token: int, started: float) -> bool:
        with self._lock:
            if self._running.pop(token, None) is not None:
                return False  # not a straggler
            self._straggling.discard(token)
            self.stats.ended(time.monotonic() - started)
            if self._threads <= self.workers + len(self._straggling):
                return False
            self._threads -= 1
            return True

    def _leave(self, counted_out: bool) -> None:
        with self._lock:
            if not counted_out:
                self._threads -= 1
            last = self._threads == 0
            self._lock.notify_all()
        if last:
            self.on_end()

    # --- the watch thread -----------------------------------------------------------------------

    def _watch_loop(self) -> None:
        label_thread()
        with self._lock:
            while not self._closed:
                if not self._running:
                    self._lock.wait()
                    continue
                token, (started, url) = next(iter(self._running.items()))
                delay = started + self.after - time.monotonic()
                if delay > 0:
                    self._lock.wait(delay)
                    continue
                del self._running[token]
                self._straggler(token, url)

    def _straggler(self, token: int, url: str) -> None:  # with the lock held
        self._straggling.add(token)
        self.stats.count += 1
        self.stats.slow_host(url)
        self.stats.peak = max(self.stats.peak, len(self._straggling))
        if len(self._straggling) > self.max_stragglers:
            self.stats.capped += 1
            return
        log.debug("straggler after %.1f s: %s", self.after, url)
        try:
            self._spawn()
        except RuntimeError as exc:  # no thread can be started now: it simply is not replaced
            log.warning("cannot start a download thread: %s", exc)
            self.stats.capped += 1
