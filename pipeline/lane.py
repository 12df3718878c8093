"""One lane: a process whose download threads feed its own transform workers; jobs in, rows out.

    coordinator --jobs pipe: batches of Jobs, then END (or STOP)--> owner thread (owner.py)
                                                                       | Job
                                                                       v
                                                    [jobs queue: bounded by the coordinator's
                                                     credit for this lane (shape.py)]
                                                                       |
                                   download threads x shape.threads, elastic (a Session each)
                                          | post: Fetched, failures \\ failed Outcome
                                          v                          \\
                                     owner thread: the lane's only      \\
                                     decisions -> its worker processes   v
                                          | Outcome ------------> [results queue]
                                                                       |
    coordinator <--results pipe: a batch of Outcomes at a time, ---- main thread (the sender)
                   the lane's progress with each; LaneDone last

A body goes from the download thread that fetched it to a worker of this lane (which writes
the output; with an output in a store, the lane puts it there before its row goes on: upload.py,
whose puts run on the one event-loop thread fsspec starts in the process), never through
the coordinator, which sees only jobs and outcomes, a batch at a time. One thread, the owner,
takes every decision: jobs in, what each worker does, a worker that died, stop and kill; the
download threads only post to it. A lane is started with the configured method (never plain
fork) and ignores Ctrl-C: the coordinator decides, and sends STOP. A lane whose coordinator dies
exits (its owner waits on its pidfd too), and its workers with it (their pipes end).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from .budget import ByteBudget
from .config import DownloadConfig
from .download import Downloader
from .elastic import Crew, Stragglers
from .errors import FetchError, PipelineError, limit_hint
from .logs import LogSetup, configure_child
from .metrics import Meter, Stage
from .owner import END, STOP, Owner, Results, pidfd
from .records import Job, Outcome, Row
from .shape import BATCH, LaneShape
from .stages import DONE, BoundedQueue, _Done, label_thread
from .transform import WorkerSetup
from .upload import Uploader, UploadSetup

log = logging.getLogger(__name__)

__all__ = ["BATCH", "END", "STOP", "Lane", "LaneDone", "LaneFailed", "LaneHandle", "LaneSetup"]
# How long the sender lets rows gather before it sends what it has: at 200 images/s a lane
# would otherwise send one row a message, and every message costs the coordinator a wake-up,
# two reads and an unpickling. A bounded linger, as Nagle's or a producer's linger.ms: the
# thread blocks on the queue until the first row comes, then at most this long for the rest,
# woken once for them (when a whole batch is there, else at the end), not at each row.
LINGER = 0.05


@dataclass(frozen=True, slots=True)
class LaneSetup:
    """What a lane process needs, sent once when it starts: the sections of the config it uses,
    never the whole of it (lanes.py builds it)."""

    index: int
    download: DownloadConfig  # its download threads'
    # what each of its transform processes gets (the transform section, the output folder and
    # layout); its owner keeps to that section's timeouts, retries and start method
    worker: WorkerSetup
    heartbeat: float  # executor.heartbeat: it beats every third of it; a worker stopped this long
    shape: LaneShape  # its threads, workers and bounds
    coordinator_pid: int
    log_setup: LogSetup | None = None
    upload: UploadSetup | None = None  # an output in a store: each ok image is put there


@dataclass(frozen=True, slots=True)
class Progress:
    """A lane's running counts, sent with each batch, for the coordinator's bars."""

    downloaded: int = 0
    download_failed: int = 0
    transformed: int = 0
    transform_failed: int = 0
    fetched: int = 0  # bodies waiting for the pool now
    pool: int = 0  # images held by the pool now
    buffered: int = 0  # bytes of bodies held now (download.max_buffered_bytes)


@dataclass(frozen=True, slots=True)
class Batch:
    rows: list[Row]
    progress: Progress

    def __reduce__(self) -> tuple[Any, ...]:
        return (Batch, (self.rows, self.progress))


@dataclass(frozen=True, slots=True)
class LaneFailed:
    """The run must stop, for a cause no URL is to blame for (the disk is full, no process can
    be started, a config value the network library refuses): one line for the user."""

    message: str


@dataclass(frozen=True, slots=True)
class LaneDone:
    """A lane's last message: its figures for the report."""

    download: Meter
    transform: Meter
    cpu_s: float  # this lane process's own CPU time, every thread
    pool_restarts: int
    fetched_peak: int
    pool_peak: int
    stragglers: Stragglers
    buffered_peak: int = 0  # bytes of bodies held at once, at most


def lane_main(setup: LaneSetup, jobs: Connection, results: Connection) -> None:
    """The body of a lane process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group
    label_thread(f"lane-{setup.index}")  # the main thread: the sender; ps shows the lane so
    if setup.log_setup is not None:
        configure_child(setup.log_setup)
    try:
        Lane(setup, watch=pidfd(setup.coordinator_pid)).run(jobs, results)
    except Exception as exc:  # cannot start a thread or a pipe, or a bug: one line, not a trace
        log.debug("lane %d failed", setup.index, exc_info=True)
        hint = limit_hint(exc) if isinstance(exc, OSError) else ""
        with contextlib.suppress(OSError):
            results.send(LaneFailed(f"lane {setup.index}: {type(exc).__name__}: {exc}{hint}"))
        raise SystemExit(1) from None


class Lane:
    """The threads of one lane process."""

    def __init__(self, setup: LaneSetup, watch: int | None = None) -> None:
        shape = setup.shape
        self.heartbeat = setup.heartbeat
        self.workers = shape.threads
        self.jobs: queue.SimpleQueue[Job | _Done] = queue.SimpleQueue()
        self.results: BoundedQueue[Outcome | LaneFailed] = BoundedQueue("results", shape.results)
        self.download = Stage("download", self.workers)
        self.transform = Stage("transform", shape.workers)
        self.budget = ByteBudget(shape.buffered_bytes)
        self.downloader = Downloader(setup.download, self.budget)
        outcomes: Results = self.results
        if setup.upload is not None:  # an image goes on as a row once its object is put
            outcomes = Uploader.of(setup.upload, Path(setup.worker.out_dir), self.results)
        self.owner = Owner(
            setup.worker, self.jobs, outcomes, self.transform,
            shape=shape, heartbeat=setup.heartbeat, budget=self.budget, on_stop=self._cut,
            failed=lambda message: self.results.put(LaneFailed(message)), watch=watch,
        )  # fmt: skip
        self.stop = self.owner.stop  # set by the owner alone
        self.crew = Crew(
            self.jobs, self._download, self.owner.mailbox.end,
            workers=self.workers, max_stragglers=shape.stragglers,
            straggler_after=setup.download.straggler_after,
        )  # fmt: skip
        self._meters = threading.local()  # each download thread's Meter

    def run(self, jobs: Connection, results: Connection) -> None:
        cpu = time.process_time()
        with self.downloader:
            self.owner.start(jobs)
            self.crew.start()
            self._send(results)
            self.crew.join()
            self.owner.join()
        results.send(
            LaneDone(
                self.download.total(),
                self.transform.total(),
                round(time.process_time() - cpu, 3),
                self.owner.restarts,
                self.owner.mailbox.peak,
                self.owner.peak,
                self.crew.stats,
                self.budget.peak,
            )
        )
        with contextlib.suppress(EOFError, OSError):  # the coordinator closes it once it has
            while True:  # LaneDone (a STOP may come meanwhile: the lane is done already)
                jobs.recv()

    def _cut(self) -> None:
        """The owner has decided to stop: cut the downloads, and any wait for room."""
        self.downloader.cancel()
        self.budget.cancel()

    def fail(self, message: str) -> None:
        """Ask the owner to stop the run: what is done is sent, the rest is left to the next."""
        self.owner.mailbox.fail(message)

    # --- download threads ------------------------------------------------------------------------

    def _download(self, job: Job) -> None:
        """One job, in one of the crew's threads (elastic.py): a body for the pool, or a row."""
        if self.stop.is_set():
            return
        meter: Meter | None = getattr(self._meters, "meter", None)
        if meter is None:
            meter = self._meters.meter = self.download.meter()
        started = time.perf_counter()
        try:
            fetched = self.downloader.fetch(job)
        except PipelineError as exc:  # the config's fault, not the URL's: no row for it
            self.budget.drop()
            self.fail(str(exc))
            return
        except Exception as exc:
            self.budget.drop()  # what was read of its body is gone
            if self.stop.is_set():  # cut short by an interrupt: not a real failure
                return
            err = exc if isinstance(exc, FetchError) else _unexpected(exc)
            log.debug("%s %s: %s: %s", job.key, job.url, err.kind, err.message)
            elapsed = time.perf_counter() - started
            meter.record(elapsed, ok=False)
            self.results.put(Outcome.failed(job, err, download_ms=round(elapsed * 1000, 2)))
            return
        size = len(fetched.body)
        self.budget.hand_over(size)  # the owner gives it back once its image has ended
        meter.record(time.perf_counter() - started, bytes_in=size, bytes_out=size)
        self.owner.mailbox.put(fetched)

    # --- main thread: outcomes back to the coordinator, in batches --------------------------------

    def _send(self, results: Connection) -> None:
        beat = self.heartbeat / 3
        sent = -beat  # an empty batch at once: the coordinator hears from a new lane
        ended = False
        while not ended:
            first = self.results.get_until(sent + beat)  # block for the first, or a heartbeat
            if first is None:  # nothing for a while: alive all the same
                sent = self._batch(results, [])
                continue
            items = [first]
            if isinstance(first, Outcome):
                items += self.results.gather(BATCH - 1, time.monotonic() + LINGER)
            batch: list[Row] = []
            for item in items:  # in order: rows, a failure, DONE (the last item of all)
                if isinstance(item, Outcome):
                    batch.append(item.encode())  # the manifest line is made here, not there
                    continue
                if batch:
                    sent, batch = self._batch(results, batch), []
                if item is DONE:
                    ended = True
                    break
                results.send(item)  # a LaneFailed
            if batch:
                sent = self._batch(results, batch)

    def _batch(self, results: Connection, rows: list[Row]) -> float:
        """``rows`` sent with the lane's progress; when."""
        results.send(Batch(rows, self._progress()))
        return time.monotonic()

    def _progress(self) -> Progress:
        return Progress(
            self.download.items,
            self.download.failed,
            self.transform.items,
            self.transform.failed,
            self.owner.mailbox.depth(),
            self.owner.in_flight,
            self.budget.used,
        )


def _unexpected(exc: Exception) -> FetchError:
    """An exception the download client did not translate: still only this URL's failure."""
    log.warning("unexpected %s while downloading: %s", type(exc).__name__, exc)
    return FetchError("network", f"{type(exc).__name__}: {exc}")


class LaneHandle:
    """The coordinator's side of one lane process: its pipes, and the jobs it holds now."""

    def __init__(self, setup: LaneSetup, context: Any) -> None:
        jobs_end, self.jobs = context.Pipe(duplex=False)
        self.results, results_end = context.Pipe(duplex=False)
        self.process = context.Process(
            target=lane_main,
            args=(setup, jobs_end, results_end),
            name=f"lane-{setup.index}",
            daemon=False,  # a lane starts its own pool
        )
        self.process.start()
        jobs_end.close()  # the lane holds the only other ends now: its death closes them
        results_end.close()
        self.index = setup.index
        self.credit = setup.shape.credit
        self.outstanding: dict[str, Job] = {}  # dealt, no outcome yet
        self.progress = Progress()
        self.told: str | None = None  # END or STOP, once sent
        self.heard = time.monotonic()  # its last message (a lane beats when it has no rows)

    @property
    def room(self) -> int:
        return self.credit - len(self.outstanding)

    def deal(self, batch: list[Job]) -> None:
        self.jobs.send(batch)
        for job in batch:
            self.outstanding[job.key] = job

    def tell(self, message: str) -> None:
        """END or STOP, once each at most (a STOP may follow an END)."""
        if self.told == message or self.told == STOP:
            return
        self.told = message
        with contextlib.suppress(OSError):  # the lane is gone already
            self.jobs.send(message)

    def close(self) -> None:
        self.jobs.close()
        self.results.close()
        self.process.join()
