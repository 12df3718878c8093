"""Metrics: latency histograms, per-thread meters, queue sampling, outcome counts."""

from __future__ import annotations

import random
import threading

import pytest

from pipeline.metrics import Histogram, Meter, RunStats, Sampler, Stage
from pipeline.records import Outcome


@pytest.mark.parametrize("q", [50, 95, 99])
def test_histogram_percentiles_are_close_to_exact_ones(q):
    rng = random.Random(q)
    values = [rng.lognormvariate(2, 1) for _ in range(20_000)]
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    exact = sorted(values)[int(len(values) * q / 100) - 1]
    assert histogram.percentile(q) == pytest.approx(exact, rel=0.03)


def test_histogram_edge_cases_and_merge():
    empty = Histogram()
    assert empty.percentile(50) == 0.0
    a, b = Histogram(), Histogram()
    for _ in range(90):
        a.add(1.0)
    for _ in range(10):
        b.add(1000.0)
    b.add(0.0)  # below the floor: counted, reported as 0
    a.merge(b)
    assert a.total == 101
    assert a.percentile(50) == pytest.approx(1.0, rel=0.03)
    assert a.percentile(99) == pytest.approx(1000.0, rel=0.03)
    assert b.percentile(1) == 0.0


def test_a_meter_tracks_items_bytes_busy_time_and_span():
    meter = Meter()
    meter.record(0.5, bytes_in=10, bytes_out=4, cpu_s=0.2, end=10.0)
    meter.record(0.25, ok=False, end=11.0)
    assert (meter.items, meter.failed, meter.bytes_in, meter.bytes_out) == (2, 1, 10, 4)
    assert meter.busy_s == pytest.approx(0.75) and meter.cpu_s == pytest.approx(0.2)
    assert (meter.first, meter.last) == (9.5, 11.0)


def test_each_thread_counts_into_its_own_meter_and_nothing_is_lost():
    stage = Stage("download", workers=8)
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()  # all threads record at the same time
        meter = stage.meter()
        for _ in range(5000):
            meter.record(0.001, bytes_in=3)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = stage.total()
    assert stage.items == total.items == 40_000
    assert total.bytes_in == 120_000 and total.latency.total == 40_000
    assert stage.meter() is stage.meter()  # the calling thread keeps its one meter


class FakeGauge:
    def __init__(self, name: str, depths: list[int]) -> None:
        self.name, self.bound, self.peak = name, 10, max(depths)
        self._depths = iter(depths)

    def depth(self) -> int:
        return next(self._depths)


def test_the_sampler_averages_depths_and_calls_its_tick():
    gauge = FakeGauge("fetched", [2, 4, 6, 8] + [10] * 10_000)
    sampler = Sampler([gauge])
    for _ in range(4):
        sampler.sample()
    assert sampler.occupancy["fetched"].mean == 5.0
    ticked = threading.Event()
    sampler = Sampler([FakeGauge("fetched", [1] * 10_000)], interval=0.001, tick_every=1)
    sampler.tick = ticked.set
    with sampler:
        assert ticked.wait(10)
    assert not any(t.name == "sampler" for t in threading.enumerate())
    assert sampler.occupancy["fetched"].mean == 1.0


def test_run_stats_count_kinds_and_failing_hosts():
    stats = RunStats()
    stats.add(Outcome("0-1", "0-1", "a.txt", 1, "http://a.test/x", "ok", bytes_in=5, bytes_out=2))
    for i, url in enumerate(["http://b.test/1", "http://b.test/2", "http://c.test/3", "x:/"]):
        stats.add(
            Outcome(f"0-{i + 2}", "0-1", "a.txt", i + 2, url, "failed", error_kind="http_4xx")
        )
    stats.add(Outcome("0-9", "0-1", "a.txt", 9, "http://b.test/1", "duplicate", duplicate_of="0-2"))
    assert (stats.urls, stats.ok, stats.failed["http_4xx"], stats.duplicates) == (6, 1, 4, 1)
    stats.add(Outcome("0-8", "0-1", "a.txt", 8, "http://d.test/8", "filtered", "too_small"))
    assert (stats.urls, stats.failed.total(), dict(stats.filtered)) == (7, 4, {"too_small": 1})
    assert stats.hosts.most_common(1) == [("b.test", 2)] and "d.test" not in stats.hosts
    assert stats.bytes_in == 5 and stats.bytes_out == 2
