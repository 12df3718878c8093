"""The run's shape: how many lanes, and each lane's threads, workers and bounds -- computed once.

    config.toml + the cores this process may use
        executor.lanes        -> lanes: that many, or (0) one per CORES_PER_LANE cores; never
                                 more lanes than transform workers, so that every lane has a pool
        transform.workers     -> workers in all (0: one per core), shared out among the lanes:
                                 the first ones get one more each when they do not divide evenly
        transform.max_in_flight -> images a lane's pool holds at once (0: two tasks of CHUNK
                                 images per worker of that lane)
        download.workers + download.max_stragglers + queues.fetched + in flight + BATCH
                              -> a lane's credit: the jobs the coordinator lets it hold
        download.max_buffered_bytes -> bytes of bodies a lane holds at most

Every figure that sizes a run is derived here and nowhere else: the coordinator, its lanes, the
dry run and the benchmarks read the RunShape (a lane its own LaneShape) instead of working it out
from the config again. A shape is computed where the run runs: on a Dask worker, from that
worker's cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from .config import Config

# A lane's download threads and hand-off cost ~1.8 ms of CPU an image, its workers' transforms
# ~5.2 ms (pipeline bench's workload): one lane per 3 cores keeps each lane under ~3/4 of its core
CORES_PER_LANE = 3
# Images per pool task at most, when that many bodies are waiting: the executor's hand-off
# (its feeder and manager threads, a pickle and a future) is paid per task, in the lane.
CHUNK = 4
# Jobs, or rows, per message between the coordinator and a lane at most.
BATCH = 64


def available_cores() -> int:
    """The cores this process may run on (its affinity), which may be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def lane_count(lanes: int, workers: int, cores: int) -> int:
    """``lanes`` (executor.lanes), or one per CORES_PER_LANE cores when it is 0; never more lanes
    than ``workers`` (transform workers in all), so that every lane has a pool."""
    return max(1, min(lanes or -(-cores // CORES_PER_LANE), workers))


@dataclass(frozen=True, slots=True)
class LaneShape:
    """One lane's part of the run: what its process starts, and what it may hold."""

    index: int
    threads: int  # download threads (download.workers)
    stragglers: int  # downloads past straggler_after that no longer count (max_stragglers)
    workers: int  # the processes of its transform pool: its share of transform.workers
    in_flight: int  # images its pool holds at once (submitted, not yet collected)
    fetched: int  # bodies waiting for its pool (queues.fetched)
    results: int  # rows waiting to be sent to the coordinator (queues.results)
    buffered_bytes: int  # bytes of bodies held at most (download.max_buffered_bytes)

    @property
    def credit(self) -> int:
        """Jobs the lane may hold at once: enough to keep every thread (stragglers too), its
        queue and its pool busy, and one batch more on its way."""
        return self.threads + self.stragglers + self.fetched + self.in_flight + BATCH


@dataclass(frozen=True, slots=True)
class RunShape:
    """Every lane of a run, and the cores they were sized for."""

    cores: int
    lanes: tuple[LaneShape, ...]

    @property
    def threads(self) -> int:
        """Download threads in all (stragglers not counted)."""
        return sum(lane.threads for lane in self.lanes)

    @property
    def workers(self) -> int:
        """Transform workers in all."""
        return sum(lane.workers for lane in self.lanes)

    def describe(self) -> tuple[str, str]:
        """Two lines: the lanes, each one's threads and workers; what a lane holds at most (its
        credit of jobs, the images in its pool, the bytes of bodies)."""
        lanes, n = self.lanes, len(self.lanes)
        return (
            f"{n} lane{'s' * (n != 1)} x {_each(s.threads for s in lanes)} download threads and "
            f"{_each(s.workers for s in lanes)} transform workers",
            f"a lane's credit {_each(s.credit for s in lanes)} jobs, its pool "
            f"{_each(s.in_flight for s in lanes)} images, its bodies "
            f"{_each(round(s.buffered_bytes / 1e6, 1) for s in lanes)} MB",
        )


def _each(values: Iterable[float]) -> str:
    """A figure of every lane: one number when they all have it, else the larger or the smaller
    (the workers are shared out: some lanes may have one more)."""
    return " or ".join(f"{v:.12g}" for v in sorted(set(values), reverse=True))


def shape_of(config: Config, cores: int | None = None) -> RunShape:
    """The run's shape, from ``config`` and ``cores`` (default: those this process may use)."""
    cores = available_cores() if cores is None else cores
    workers = config.transform.workers or cores
    count = lane_count(config.executor.lanes, workers, cores)
    download, queues = config.download, config.queues
    lanes = []
    for index in range(count):
        share = workers // count + (index < workers % count)
        lanes.append(
            LaneShape(
                index=index,
                threads=download.workers,
                stragglers=download.max_stragglers,
                workers=share,
                in_flight=config.transform.max_in_flight or 2 * share * CHUNK,
                fetched=queues.fetched,
                results=queues.results,
                buffered_bytes=download.max_buffered_bytes,
            )
        )
    return RunShape(cores, tuple(lanes))
