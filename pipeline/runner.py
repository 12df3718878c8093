"""One run: the coordinator, which deals jobs to lanes and records what comes back.

    URL files (streamed) -> Resume.pending -> (Dedupe) ---+
                                                          v
    coordinator, main thread: deals batches of Jobs; a lane holds at most its credit
        |  jobs pipe                                      ^  results pipe: batches of Outcomes
        v                                                 |
    lane 0 .. lane N-1 (lane.py), a process each:         |
        download threads -> mailbox -> owner thread -> its own transform workers
        |
    coordinator, main thread: manifest (Sink), stats  ->  Report (screen, report.json)
    sampler thread: samples what the lanes report, redraws the progress bars

The coordinator reads the input and owns resume, the manifest and the report. It does nothing
per byte: image bodies go from a lane's download threads to that lane's transform workers, and
the coordinator handles small records, a batch at a time, so its cost per image is a share of
two batches' pickling and one manifest row, and the run multiplies with the lanes. ShardEnds,
lines without a usable URL and duplicates never leave it. The run's shape (shape.py: lanes,
each one's threads, workers and bounds) is computed once, here; each lane may hold its credit of
jobs (its download threads, its queue and its pool's slots, and a batch more); the coordinator
deals to the lane with the most room, so memory stays flat and a slow lane gets less.

Lifecycle. The first SIGINT/SIGTERM stops dealing and sends STOP to every lane: it cuts its
downloads at once, gives its pool ``transform.shutdown_grace`` seconds, then kills its workers,
sends what is done and exits; a lane still running half a second after that is killed (it may
be stopped: SIGKILL is the one signal it takes). The manifest is flushed and the run returns
marked interrupted. A second signal kills the lanes and exits at once. What was not recorded
is done by the next run (resume). A lane that dies mid-run (OOM killer, kill -9) loses
nothing: the jobs it held are dealt again, to a lane started in its place; a job whose lane
died twice is a ``worker_crash`` row. A lane that hangs (kill -STOP, a stuck process) is found
by its silence: a lane sends at least a heartbeat every third of ``executor.heartbeat``
seconds, and one not heard from for that long is killed, then treated as dead. A worker that
dies inside a lane is that lane's owner's business (owner.py).

An output in a store (``--out s3://...``, objects.py): ``open_run`` holds the store's lock
object, pulls the state resume needs into local staging and plans there (mirror.py);
``Coordinator(config, staging_dir, store=store)`` then runs exactly as into a folder, its lanes
putting each image before its row comes back (upload.py) and its sink putting each sealed shard,
seal last; the reports are put at the end. The coordinator never handles an image body. Lanes
that share no disk with the coordinator build on the same seam: each writes into its own
staging and puts what it writes, while the coordinator seals and publishes as here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType

from .config import Config
from .dedupe import plan_jobs
from .elastic import Stragglers
from .errors import FetchError, OutputError, PipelineError, SourceError, TransformError
from .formats import require_parquet
from .lane import END, STOP, Batch, LaneDone, LaneFailed, LaneHandle
from .lanes import Lanes, kilobytes
from .layout import RUN
from .logs import relay
from .metrics import Meter, RunStats, Sampler, Stage
from .mirror import check_restart, forget, pull_state, put_record, put_reports, staging
from .objects import ObjectStore, output_of, store_lock
from .progress import Bars, LaneCounts, UrlCount
from .records import Job, Outcome, Row, ShardEnd
from .report import QueueStat, Report, StageStat, build_report, cpu_stage, meter_stage
from .resume import Plan, Resume, plan_run, unreadable
from .routes import Routes
from .shape import BATCH, RunShape, shape_of
from .sink import Sink, lock
from .sources import Source
from .storage import Location

log = logging.getLogger(__name__)

ROUTED = 16 * BATCH  # jobs read ahead for one lane at most, when routing by host (routes.py)
LANE_DEATHS = 2  # a job whose lane died this many times is recorded as worker_crash
MARGIN = 0.5  # seconds a stopping lane gets past transform.shutdown_grace to send its last rows
AWAY = 1.0  # a loop this much longer than its wait: this process was stopped (Ctrl-Z)


def run(
    sources: Sequence[Path | Location],
    config: Config,
    *,
    progress: bool = False,
    restart: bool = False,
    handle_signals: bool = False,
    say: Callable[[str], None] | None = None,
) -> Report:
    """Process every input line of ``sources`` not done yet; returns the report (also saved).

    With ``handle_signals`` (the CLI), SIGINT and SIGTERM interrupt the run gracefully; ``say``
    is told, before the run starts, what an earlier run had done.
    """
    with open_run(sources, config, restart=restart) as plan:
        summary = plan.summary()
        if say is not None and summary:
            say(f"resumed     {summary}")
        pipeline = Coordinator(config, plan.out_dir, store=plan.store)
        with _signals(pipeline) if handle_signals else contextlib.nullcontext():
            report = pipeline.execute(plan, progress=progress)
        try:
            report.save(plan.out_dir)
            if plan.store is not None and pipeline.sink.store is not None:  # the lock held
                put_reports(plan.store, plan.out_dir)
        except OutputError:
            if pipeline.failure is None:
                raise
        try:
            if pipeline.failure is not None:  # what was done is recorded; a rerun does the rest
                written = pipeline.sink.written
                raise OutputError(
                    f"{pipeline.failure} (stopped: {written} rows recorded; rerun to do the rest)"
                )
            tell_findings(plan, pipeline.sink.written, fail=pipeline.interrupted is None)
        except PipelineError as exc:
            exc.report = report  # the CLI shows what was done, then the line
            raise
    return report


def tell_findings(plan: Plan, written: int, *, fail: bool = True) -> None:
    """What reading the input found, once the run is over: its warnings; a file that could not
    be read ends the run with an error (the others were read and recorded), unless not ``fail``
    (an interrupted run exits as interrupted: the rerun says it)."""
    for warning in plan.findings.lines():
        log.warning("input: %s", warning)
    if not fail:
        for message in plan.findings.unreadable:
            log.warning("input: %s", message)
    elif plan.findings.unreadable:
        raise SourceError(
            f"{unreadable(plan.findings)} (the other input files were read: {written} rows "
            "recorded; rerun once it is mended)"
        )
    elif files := plan.findings.no_url():
        listed = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
        raise SourceError(
            f"not one line of {listed} has a usable URL (each is a failed invalid_url row); "
            "input.url_column names the URL column or field"
        )


@contextlib.contextmanager
def open_run(
    sources: Sequence[Path | Location], config: Config, *, restart: bool
) -> Iterator[Plan]:
    """The output folder made, locked for this run, and checked against ``sources``: the plan.
    An output in a store: its lock object held, its state pulled into staging (mirror.py); the
    plan's ``out_dir`` is the staging folder, its ``store`` the store."""
    if config.output.parquet:
        require_parquet()  # before any work, not at the first shard's seal
    out_dir = output_of(config.output)
    if isinstance(out_dir, ObjectStore):
        with _open_store(sources, config, out_dir, restart=restart) as plan:
            yield plan
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{out_dir}: cannot create the output folder: {exc.strerror}") from None
    with lock(out_dir):
        yield plan_run(sources, config, out_dir, restart=restart)


@contextlib.contextmanager
def _open_store(
    sources: Sequence[Path | Location], config: Config, store: ObjectStore, *, restart: bool
) -> Iterator[Plan]:
    with (
        store_lock(store, lease_s=config.output.lease) as held,
        staging(config.output) as folder,
        lock(folder, what="output.staging" if config.output.staging else ""),
    ):
        if restart:
            forget(store, check_restart(store))
        pull_state(store, folder)
        plan = plan_run(sources, config, folder, restart=restart, store=store)
        put_record(store, folder, RUN)
        plan.lock_lost = held.lost
        yield plan


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


class Coordinator:
    """The lanes of one run, what they hold, and the sink."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        *,
        name_tars: bool = True,
        shape: RunShape | None = None,
        store: ObjectStore | None = None,
    ) -> None:
        self.config = config
        self.store = store  # the output's store; ``out_dir`` is then its local staging
        self.shape = shape_of(config) if shape is None else shape  # this machine's, by default
        self.out_dir = out_dir
        self.stopping = False
        self.interrupted: int | None = None  # the signal that stopped the run
        self.failure: str | None = None  # what stopped the run, when no URL is to blame
        self.lanes = Lanes(config, self.shape, out_dir, store)
        method = config.transform.start_method
        self.sink = Sink(out_dir, config.output, method, name_tars=name_tars, store=store)
        self.lock_lost: threading.Event | None = None  # set when another run took the lock
        self._writable = True  # False once a manifest write failed: rows after it are dropped
        self.write = Stage("write", 1)
        self.stats = RunStats()
        self.meters: dict[str, Meter] = {}  # each stage's, merged over the lanes, once it ends
        self.workers: dict[str, int] = {}
        self._deaths: Counter[str] = Counter()  # lane deaths per job key
        lanes = len(self.shape.lanes)
        self._restarts_left = 2 * lanes + 2
        self._redo: deque[Job] = deque()
        self._items: Iterator[Job | ShardEnd] = iter(())
        self._exhausted = False
        self._jobs_peak = 0
        # per_host across lanes: every URL of a host is dealt to one lane (routes.py)
        several = lanes > 1 and config.download.per_host > 0
        self._routes = Routes(lanes, ROUTED) if several else None
        self._stop_by: float | None = None  # once stopping: lanes still running then are killed
        self._watched = time.monotonic()  # when the main loop last looked for hung lanes
        self.sampler = Sampler(self.lanes.gauges)

    def execute(self, plan: Plan, *, progress: bool) -> Report:
        """Every line of the plan's sources that an earlier run did not finish."""
        resume = Resume(plan)
        self.lock_lost = plan.lock_lost
        with plan_jobs(plan, self.config.input) as items:
            report = self.process(
                resume.pending(items),
                resume,
                progress=progress,
                sources=plan.sources,
                counted=plan.lines,
            )
        return dataclasses.replace(
            report, sources=tuple(s.name for s in plan.sources), resume=plan.summary()
        )

    def process(
        self,
        items: Iterator[Job | ShardEnd],
        resume: Resume,
        *,
        progress: bool = False,
        sources: Sequence[Source] = (),
        counted: Mapping[int, int] | None = None,
    ) -> Report:
        """Deal ``items`` (already filtered by ``resume``) to the lanes; the report.

        ``sources`` are counted for the progress bars' totals, but for the records ``counted``
        already, by file id (the resume check's figures).
        """
        self._items = items
        started_at = now_utc()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            with relay(), self._monitor(sources, counted, resume, progress):
                for index in range(len(self.shape.lanes)):
                    self.lanes.start(index)
                self._loop()
        finally:
            self.lanes.close()  # kills only lanes still running: after a bug
            left = self.sink.open_shards
            self._guard(self.sink.close)  # its last write may fail too (a full disk)
        if left and self.interrupted is None and self.failure is None:
            log.warning("shards left incomplete: %s", left)
        ended, cpu = time.perf_counter(), time.process_time() - cpu_started
        report = self._report(started, ended, cpu, skipped=resume.skipped)
        return dataclasses.replace(report, started=started_at)

    # --- the main loop: deal, wait, record --------------------------------------------------

    def _loop(self) -> None:
        while self.lanes.running:
            self._deal()  # once stopping, it sends the STOPs
            timeout = self._timeout()
            for handle in list(self.lanes.wait(timeout)):
                self._receive(handle)
            self._watch(timeout)
            self._held()
            if self.sink.flush_due() == 0:
                self._guard(self.sink.flush)
            self._guard(self.sink.settle)  # seal the shards whose tars are written

    def _held(self) -> None:
        """The store's lock taken over by another run (this one's lease ran out): from now on
        nothing is written, here or there; the run stops with one line."""
        if self.lock_lost is None or not self.lock_lost.is_set() or self.sink.store is None:
            return
        self.sink.store, self._writable = None, False
        self._fail(f"{self.store}: another run took over this output's lock; stopped writing")

    def _timeout(self) -> float:
        """How long the main loop may wait: until rows are due on disk, a lane would be silent
        too long, or a stopping lane's grace is over."""
        due = [self.lanes.next_silence()]
        if (flush := self.sink.flush_due()) is not None:
            due.append(flush)
        if self._stop_by is not None:
            due.append(max(0.0, self._stop_by - time.monotonic()))
        return min(due)

    def _watch(self, timeout: float) -> None:
        """Kill the lanes that hang: silent past executor.heartbeat (their jobs are dealt again,
        to lanes started in their place), or still running past the grace once stopping (a
        stopped process cannot take a signal but SIGKILL; its jobs are the next run's)."""
        now = time.monotonic()
        if now - self._watched > timeout + AWAY:  # this loop was stopped (Ctrl-Z), not a lane
            self.lanes.excuse()
        self._watched = now
        if self._stop_by is not None and now >= self._stop_by:
            hung, why = list(self.lanes.running), "did not stop within transform.shutdown_grace"
        else:
            limit = self.config.executor.heartbeat
            hung, why = self.lanes.silent(now), f"sent nothing for {limit:g} s (executor.heartbeat)"
        for handle in hung:
            log.warning("lane %d %s: killed", handle.index, why)
        self.lanes.kill(hung)
        for handle in hung:
            self._lost(handle)

    def _deal(self) -> None:
        if self.stopping:
            if self._stop_by is None:  # a lane's grace, and a little for its last rows
                self._stop_by = time.monotonic() + self.config.transform.shutdown_grace + MARGIN
            for handle in self.lanes.running:
                handle.tell(STOP)
            return
        for handle in sorted(self.lanes.running, key=lambda h: -h.room):
            while handle.told is None and handle.room >= min(BATCH, handle.credit // 2):
                batch = self._next(handle.index, min(handle.room, BATCH))
                if batch:
                    handle.deal(batch)
                    self._jobs_peak = max(self._jobs_peak, len(handle.outstanding))
                if not batch or self._drained(handle.index):
                    break
        for handle in self.lanes.running:
            if self._drained(handle.index):
                handle.tell(END)

    def _drained(self, lane: int) -> bool:
        """Nothing is left to deal to ``lane``."""
        routed = self._routes is not None and self._routes.waiting(lane) > 0
        return self._exhausted and not self._redo and not routed

    def _next(self, lane: int, count: int) -> list[Job]:
        """Up to ``count`` jobs for ``lane``: any, or with routes, those of its hosts."""
        routes = self._routes
        if routes is None:
            return self._take(count)
        while routes.waiting(lane) < count and not routes.full():
            jobs = self._take(BATCH)
            if not jobs:
                break
            routes.add(jobs)
        return routes.take(lane, count)

    def _take(self, count: int) -> list[Job]:
        """Up to ``count`` jobs for a lane; what needs no lane is recorded on the way."""
        batch: list[Job] = []
        while len(batch) < count:
            if self._redo:
                batch.append(self._redo.popleft())
                continue
            item = next(self._items, None) if not self._exhausted else None
            if item is None:
                self._exhausted = True
                break
            if isinstance(item, ShardEnd):
                self._guard(self.sink.end_shard, item)
            elif item.problem is not None:
                self._record(Outcome.failed(item, FetchError("invalid_url", item.problem)))
            elif item.duplicate_of is not None:  # its URL is fetched for an earlier line
                self._record(Outcome.duplicate(item))
            else:
                batch.append(item)
        return batch

    def _receive(self, handle: LaneHandle) -> None:
        try:
            message = handle.results.recv()
        except (EOFError, OSError):
            self._lost(handle)
            return
        handle.heard = time.monotonic()
        if isinstance(message, Batch):  # rows, or none: a heartbeat
            handle.progress = message.progress
            started = time.perf_counter()
            outstanding = handle.outstanding
            for row in message.rows:
                del outstanding[row.key]
            if self._writable:  # one guard a batch, not a row: this loop is the hot one
                self._guard(self._file, message.rows)
            self.write.meter().record(time.perf_counter() - started, items=len(message.rows))
        elif isinstance(message, LaneFailed):
            self._fail(message.message)
        else:
            assert isinstance(message, LaneDone)
            self.lanes.ended(handle, message)

    def _record(self, outcome: Outcome) -> None:
        """A row the coordinator makes itself (no usable URL, a duplicate, a lost lane's job)."""
        started = time.perf_counter()
        row = outcome.encode()
        if self._writable:
            self._guard(self.sink.write, row)
            self.stats.add(row)
        self.write.meter().record(time.perf_counter() - started)

    def _file(self, rows: list[Row]) -> None:
        sink, stats = self.sink, self.stats
        for row in rows:
            sink.write(row)
            stats.add(row)

    def _guard(self, write: Callable[..., None], *args: object) -> None:
        """A manifest write; when it fails (a full disk), nothing more is written: stop."""
        try:
            write(*args)
        except OutputError as exc:
            self._writable = False
            self._fail(str(exc))

    def _fail(self, message: str) -> None:
        """Stop the run as an interrupt would, for a cause no URL is to blame for."""
        if self.failure is None:
            self.failure = message
            log.debug("stopping: %s", message)  # the CLI prints it, once
        self.stopping = True

    def _lost(self, handle: LaneHandle) -> None:
        """A lane died: deal its jobs again (or record them, the second time), replace it."""
        cause = self.lanes.lost(handle)
        log.log(
            logging.DEBUG if self.failure else logging.WARNING,  # it said why, if it could
            "lane %d died (%s) holding %d jobs",
            handle.index,
            cause,
            len(handle.outstanding),
        )
        if self.stopping:
            return  # its jobs are not recorded: the next run does them
        for job in handle.outstanding.values():
            self._deaths[job.key] += 1
            if self._deaths[job.key] < LANE_DEATHS:
                self._redo.append(job)
            else:
                error = TransformError("worker_crash", f"its lane process died twice ({cause})")
                self._record(Outcome.failed(job, error))
        if self._restarts_left <= 0:
            raise PipelineError(f"lane processes keep dying (the last: {cause}); see the log")
        self._restarts_left -= 1
        self.lanes.restarts += 1
        self.lanes.start(handle.index)

    @contextlib.contextmanager
    def _monitor(
        self,
        sources: Sequence[Source],
        counted: Mapping[int, int] | None,
        resume: Resume,
        progress: bool,
    ) -> Iterator[None]:
        """The sampler thread, and the progress bars it redraws when they are on."""
        if not progress:
            with self.sampler:
                yield
            return
        with UrlCount(sources, self.config.input.url_column, counted) as count:
            total = lambda: None if count.total is None else count.total - resume.skipped  # noqa: E731
            download = LaneCounts(self.lanes.every, "downloaded", "download_failed")
            transform = LaneCounts(self.lanes.every, "transformed", "transform_failed")
            bars = Bars(download, transform, self.write, self.lanes.gauges, total=total)
            self.sampler.tick = bars.refresh
            try:
                with self.sampler:
                    yield
            finally:
                bars.close()

    def _report(self, started: float, ended: float, cpu_s: float, skipped: int) -> Report:
        download, transform, stragglers = Meter(), Meter(), Stragglers()
        finished = self.lanes.finished
        for done in finished:
            download.merge(done.download)
            transform.merge(done.transform)
            stragglers.merge(done.stragglers)
        wall = ended - started
        threads, workers = self.shape.threads, self.shape.workers
        self.meters = {"download": download, "transform": transform, "write": self.write.total()}
        self.workers = {"download": threads, "transform": workers, "write": 1}
        return build_report(
            self.stats,
            wall,
            stages=(
                meter_stage("download", threads, download, ended),
                cpu_stage("transform", workers, transform, ended),
                StageStat.of(self.write, ended),
            ),
            queues=self._queues(),
            parent_cpu_s=round(cpu_s, 3),
            pool_cpu_s=round(transform.cpu_s, 3),
            lanes=len(finished),
            lane_cpu_s=round(sum(d.cpu_s for d in finished), 3),
            lane_cpu_max_s=round(max((d.cpu_s for d in finished), default=0.0), 3),
            skipped=skipped,
            interrupted=signal.Signals(self.interrupted).name if self.interrupted else None,
            pool_restarts=sum(d.pool_restarts for d in finished),
            lane_restarts=self.lanes.restarts,
            stragglers=stragglers.summary(self.config.download.straggler_after),
            shape=self.shape.describe(),
        )

    def _queues(self) -> tuple[QueueStat, ...]:
        """Each gauge per lane: its bound (the shape's; the larger where lanes differ), its mean
        over the run, its peak in any lane."""
        shapes, finished = self.shape.lanes, self.lanes.finished
        bounds = {
            "fetched": max(s.fetched for s in shapes),
            "pool": max(s.in_flight for s in shapes),
            "jobs": max(s.credit for s in shapes),
            "bodies_kb": kilobytes(max(s.buffered_bytes for s in shapes)),
        }
        peaks = {
            "fetched": max((d.fetched_peak for d in finished), default=0),
            "pool": max((d.pool_peak for d in finished), default=0),
            "jobs": self._jobs_peak,
            "bodies_kb": kilobytes(max((d.buffered_peak for d in finished), default=0)),
        }
        means = {name: gauge.mean / len(shapes) for name, gauge in self.sampler.occupancy.items()}
        return tuple(
            QueueStat(g.name, bounds[g.name], peaks[g.name], round(means[g.name], 2))
            for g in self.lanes.gauges
        )

    # --- lifecycle: called from the signal handler, in the main thread ------------------------

    def interrupt(self, signum: int) -> None:
        """Stop gracefully: deal no more; the main loop sends STOP to every lane."""
        self.interrupted = signum
        self.stopping = True
        self.lanes.wake()  # the main loop is waiting on the lanes
        log.warning(
            "%s: finishing the images in flight (again to abort)", signal.Signals(signum).name
        )

    def abort(self, signum: int) -> None:
        """Stop now: kill the lanes (their workers follow), flush the manifest, exit."""
        self.lanes.kill()
        with contextlib.suppress(OutputError):
            self.sink.close()
        os._exit(128 + signum)


@contextlib.contextmanager
def _signals(pipeline: Coordinator) -> Iterator[None]:
    """SIGINT/SIGTERM: the first interrupts ``pipeline`` gracefully, a second aborts it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        if pipeline.interrupted is None:
            pipeline.interrupt(signum)
        else:
            pipeline.abort(signum)

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
