"""Run metrics, collected cheaply while the stages work.

Each thread that does a stage's work writes to its own ``Meter`` (one per thread, found through a
``threading.local``), so the hot path takes no lock and shares no counter: a download thread, the
pool's result thread and the main thread each count what they did. Readers (the progress bars,
the report) sum the meters; a reading taken mid-run may be one item behind, never wrong at the end.

``Sampler`` is the one periodic thread: it samples the depth of each queue (mean and peak against
its bound) and calls a tick (the progress bars) a few times a second. ``RunStats`` counts outcomes
as the sink writes them; the main thread owns it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlsplit

from .records import Outcome, Row

_STEPS = 16  # histogram buckets per doubling: a percentile is within ~2% of the true value
_FLOOR_MS = 0.001


class Histogram:
    """Latencies in log-spaced buckets: constant memory, O(1) to add, mergeable."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0

    def add(self, ms: float, count: int = 1) -> None:
        bucket = int(math.log2(ms / _FLOOR_MS) * _STEPS) if ms > _FLOOR_MS else 0
        self.counts[bucket] += count
        self.total += count

    def merge(self, other: Histogram) -> None:
        self.counts.update(other.counts)
        self.total += other.total

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) in milliseconds, 0.0 when empty."""
        if not self.total:
            return 0.0
        rank = max(1, math.ceil(self.total * q / 100))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return _FLOOR_MS * 2 ** ((bucket + 0.5) / _STEPS) if bucket else 0.0
        raise AssertionError("unreachable: the counts add up to total")


@dataclass(slots=True)
class Meter:
    """What one thread did for one stage. Only its own thread writes it."""

    items: int = 0
    failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    busy_s: float = 0.0
    cpu_s: float = 0.0  # CPU time reported by the work itself (the pool's, for transforms)
    first: float = math.inf  # perf_counter() when the first item started
    last: float = 0.0  # ... and when the last one ended
    latency: Histogram = field(default_factory=Histogram)

    def record(
        self,
        seconds: float,
        *,
        ok: bool = True,
        bytes_in: int = 0,
        bytes_out: int = 0,
        cpu_s: float = 0.0,
        end: float | None = None,
        items: int = 1,
    ) -> None:
        """``items`` done (one, or a batch), which took ``seconds`` in all and finished at
        ``end`` (default: now)."""
        end = time.perf_counter() if end is None else end
        self.items += items
        self.failed += not ok
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.busy_s += seconds
        self.cpu_s += cpu_s
        self.first = min(self.first, end - seconds)
        self.last = max(self.last, end)
        if items:
            self.latency.add(seconds * 1000 / items, items)

    def merge(self, other: Meter) -> None:
        """Add ``other``'s counts to this meter (``first``/``last`` compare on one machine only)."""
        self.items += other.items
        self.failed += other.failed
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.busy_s += other.busy_s
        self.cpu_s += other.cpu_s
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.latency.merge(other.latency)


class Stage:
    """The meters of one stage's threads; ``meter()`` is the calling thread's own."""

    def __init__(self, name: str, workers: int) -> None:
        self.name = name
        self.workers = workers
        self._meters: list[Meter] = []
        self._local = threading.local()
        self._lock = threading.Lock()  # taken once per thread, when its meter is made

    def meter(self) -> Meter:
        try:
            return self._local.meter  # type: ignore[no-any-return]
        except AttributeError:
            meter = self._local.meter = Meter()
            with self._lock:
                self._meters.append(meter)
            return meter

    @property
    def items(self) -> int:
        """Items done so far (read without a lock: may trail by an item while the run goes)."""
        return sum(m.items for m in self._meters[:])

    @property
    def failed(self) -> int:
        return sum(m.failed for m in self._meters[:])

    def total(self) -> Meter:
        """Every thread's meter merged into one (call once the stage has finished)."""
        merged = Meter()
        for m in self._meters[:]:
            merged.merge(m)
        return merged


class Counts(Protocol):
    """Anything that counts a stage's items: a Stage, or what the lanes last reported."""

    @property
    def items(self) -> int: ...

    @property
    def failed(self) -> int: ...


class Gauge(Protocol):
    """Anything with a bounded depth: a queue, the pool's task slots."""

    name: str
    bound: int
    peak: int

    def depth(self) -> int: ...


@dataclass(slots=True)
class Occupancy:
    """Sampled depths of one gauge."""

    samples: int = 0
    total: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.samples if self.samples else 0.0


class Sampler:
    """A thread that samples gauge depths every ``interval`` s and calls ``tick`` every few."""

    def __init__(
        self, gauges: Sequence[Gauge], *, interval: float = 0.05, tick_every: int = 4
    ) -> None:
        self.gauges = gauges
        self.occupancy = {g.name: Occupancy() for g in gauges}
        self.tick: Callable[[], None] | None = None  # set before the thread starts
        self._interval = interval
        self._tick_every = tick_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler")

    def _loop(self) -> None:
        rounds = 0
        while not self._stop.wait(self._interval):
            self.sample()
            rounds += 1
            if self.tick is not None and rounds % self._tick_every == 0:
                self.tick()

    def sample(self) -> None:
        for gauge in self.gauges:
            occupancy = self.occupancy[gauge.name]
            occupancy.samples += 1
            occupancy.total += gauge.depth()

    def __enter__(self) -> Sampler:
        self.sample()  # at least one sample, however short the run
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


_MAX_HOSTS = 10_000
TOP_HOSTS = 5


@dataclass(slots=True)
class RunStats:
    """Counts outcomes as they are written (by the thread that owns the sink: no lock)."""

    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0  # lines whose URL an earlier line had (input.dedupe)
    filtered: Counter[str] = field(default_factory=Counter)  # left out by a filter, by kind
    bytes_in: int = 0
    bytes_out: int = 0
    hosts: Counter[str] = field(default_factory=Counter)  # failures per host, pruned

    @property
    def urls(self) -> int:
        return self.ok + self.failed.total() + self.duplicates + self.filtered.total()

    def add(self, outcome: Outcome | Row) -> None:
        self.add_row(
            outcome.status, outcome.error_kind, outcome.url, outcome.bytes_in, outcome.bytes_out
        )

    def add_row(
        self, status: str, kind: str | None, url: str, bytes_in: int, bytes_out: int
    ) -> None:
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        if status == "ok":
            self.ok += 1
        elif status == "duplicate":
            self.duplicates += 1
        elif status == "filtered":  # the image is fine, its host too: no failing host
            self.filtered[kind or "unknown"] += 1
        else:
            self.failed[kind or "unknown"] += 1
            self._count_host(url)

    def _count_host(self, url: str) -> None:
        try:
            host = urlsplit(url).hostname or "(no host)"
        except ValueError:
            host = "(invalid URL)"
        self.hosts[host] += 1
        if len(self.hosts) > _MAX_HOSTS:  # millions of dead hosts must not cost memory:
            self.hosts = Counter(dict(self.hosts.most_common(_MAX_HOSTS // 2)))  # keep the top
