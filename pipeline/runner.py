"""One run of the pipeline: the stages wired together, owned by the main thread.

    URL files (streamed) -> Resume.pending (skips what an earlier run finished) -> SharedIterator
        |
        v
    download threads x download.workers          one requests.Session each
        |  Fetched                      \\  failed URLs (Outcome) and ShardEnd markers
        v                                \\
    [fetched: BoundedQueue, queues.fetched] \\
        |                                    \\
        v                                     \\
    dispatcher thread --submit, at most transform.in_flight-->  process pool x transform.workers
                                                               (decode, ops, encode, write file)
        |                                                       |  Outcome, via the future
        v                                                       v
    [results: BoundedQueue, queues.results]  <------------------+
        |
        v
    main thread: manifest (Sink), stats, progress bar  ->  Report

Threads download because a download spends its time waiting on sockets, which releases the GIL;
processes transform because decoding and resizing hold the GIL. Each queue is bounded and the pool
gets at most ``in_flight`` tasks, so memory stays flat whatever the number of URLs.

Lifecycle. The first SIGINT/SIGTERM stops reading URLs and cuts every download in progress; the
images already in the pool get ``transform.shutdown_grace`` seconds to finish, then their workers
are killed; everything drains through the queues as usual, the manifest is flushed, and the run
returns marked interrupted. What was not recorded is done by the next run (resume). A second
signal aborts at once. A worker that dies mid-run breaks its pool: a fresh pool takes over and each
lost image is tried again ``transform.crash_retries`` times before it is a ``worker_crash`` row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import FrameType

from .config import Config
from .dedupe import Dedupe
from .download import Downloader
from .errors import FetchError, PipelineError, TransformError
from .logs import LogSetup
from .metrics import RunStats, Sampler, Stage
from .progress import Bars, UrlCount
from .records import Fetched, Job, Outcome, ShardEnd
from .report import QueueStat, Report, StageStat, build_report
from .resume import Plan, Resume, plan_run
from .sink import Sink, lock
from .sources import Source, iter_jobs
from .stages import DONE, BoundedQueue, RestartingPool, SharedIterator, Slots
from .transform import WorkerSetup, init_worker, process

log = logging.getLogger(__name__)

Result = Outcome | ShardEnd | Future[Outcome]


def run(
    sources: Sequence[Path],
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
        pipeline = Run(config, plan.out_dir)
        with _signals(pipeline) if handle_signals else contextlib.nullcontext():
            report = pipeline.execute(plan, progress=progress)
        report.save(plan.out_dir)
    return report


@contextlib.contextmanager
def open_run(sources: Sequence[Path], config: Config, *, restart: bool) -> Iterator[Plan]:
    """The output folder made, locked for this run, and checked against ``sources``: the plan."""
    out_dir = Path(config.output.dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{out_dir}: cannot create the output folder: {exc.strerror}") from None
    with lock(out_dir):
        yield plan_run(sources, config, out_dir, restart=restart)


def now_utc() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="microseconds")


def make_pool(config: Config, out_dir: Path, workers: int | None = None) -> ProcessPoolExecutor:
    """The transform pool, started with the configured method (never plain fork)."""
    method = config.transform.start_method
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # workers fork from a server that has already imported Pillow
        context.set_forkserver_preload(["pipeline.transform"])
    setup = WorkerSetup(
        config.transform, str(out_dir), config.output.folder_size, os.getpid(), LogSetup.current()
    )
    pool = ProcessPoolExecutor(
        max_workers=workers or config.transform.pool_workers,
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


def make_pools(config: Config, out_dir: Path) -> tuple[RestartingPool, RestartingPool]:
    """A run's transform pool, and its one-process quarantine pool."""
    return (
        RestartingPool(functools.partial(make_pool, config, out_dir)),
        RestartingPool(functools.partial(make_pool, config, out_dir, 1)),
    )


class Run:
    """The queues, the stop flag and the stage loops of one run."""

    def __init__(
        self,
        config: Config,
        out_dir: Path,
        pools: tuple[RestartingPool, RestartingPool] | None = None,
    ) -> None:
        self.config = config
        self.out_dir = out_dir
        self.stop = threading.Event()
        self.interrupted: int | None = None  # the signal that stopped the run
        self.fetched: BoundedQueue[Fetched] = BoundedQueue("fetched", config.queues.fetched)
        self.results: BoundedQueue[Result] = BoundedQueue("results", config.queues.results)
        self.slots = Slots("pool", config.transform.in_flight)  # tasks in the pool
        self.gauges = (self.fetched, self.slots, self.results)
        self.download = Stage("download", config.download.workers)
        self.transform = Stage("transform", config.transform.pool_workers)
        self.write = Stage("write", 1)
        self.sampler = Sampler(self.gauges)  # queue occupancy, and the bars' redraws
        self.downloader = Downloader(config.download)
        # the main pool, and a one-process pool where images that were in a pool when a worker
        # died are retried one at a time, so that a second crash names its culprit; given
        # (a Dask worker's, kept for its next shard) or made and shut down by this run
        self._own_pools = pools is None
        self.pool, self.quarantine = pools or make_pools(config, out_dir)
        self._suspects: deque[tuple[Fetched, int]] = deque()
        self._suspect_running = False
        self._suspect_lock = threading.Lock()
        self.sink = Sink(out_dir)
        self._grace: threading.Timer | None = None

    def execute(self, plan: Plan, *, progress: bool) -> Report:
        """Every line of the plan's sources that an earlier run did not finish."""
        cfg = self.config.input
        resume = Resume(plan)
        items = iter_jobs(plan.sources, cfg.shard_size, cfg.url_column, plan.known)
        with Dedupe(plan.out_dir) if cfg.dedupe else contextlib.nullcontext() as dedupe:
            if dedupe is not None:
                items = dedupe.mark(items)
            report = self.process(
                resume.pending(items), resume, progress=progress, sources=plan.sources
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
    ) -> Report:
        """Run ``items`` (already filtered by ``resume``) through the stages; the report.

        ``sources`` are counted for the progress bars' totals.
        """
        cfg = self.config
        jobs = SharedIterator(items, self.stop)
        stats = RunStats()
        started_at = now_utc()
        started, cpu_started = time.perf_counter(), time.process_time()
        with (
            self.sink,
            self.downloader,
            self.pool if self._own_pools else contextlib.nullcontext(),
            self.quarantine if self._own_pools else contextlib.nullcontext(),
            ThreadPoolExecutor(cfg.download.workers, "download") as downloads,
            ThreadPoolExecutor(1, "dispatch") as dispatch,
            self._monitor(sources, resume, progress),
        ):
            loops = [
                downloads.submit(self._download_loop, jobs) for _ in range(cfg.download.workers)
            ]
            loops.append(dispatch.submit(self._dispatch_loop))
            try:
                self._collect(stats)
            finally:
                self._end_grace()
            for loop in loops:  # a stage's bug surfaces here, after everything has drained
                loop.result()
        if self.sink.open_shards and self.interrupted is None:
            log.warning("shards left incomplete: %s", self.sink.open_shards)
        ended, cpu = time.perf_counter(), time.process_time() - cpu_started
        report = self._report(stats, started, ended, cpu, skipped=resume.skipped)
        return dataclasses.replace(report, started=started_at)

    @contextlib.contextmanager
    def _monitor(self, sources: Sequence[Source], resume: Resume, progress: bool) -> Iterator[None]:
        """The sampler thread, and the progress bars it redraws when they are on."""
        if not progress:
            with self.sampler:
                yield
            return
        with UrlCount(sources, self.config.input.url_column) as count:
            total = lambda: None if count.total is None else count.total - resume.skipped  # noqa: E731
            bars = Bars(self.download, self.transform, self.write, self.gauges, total=total)
            self.sampler.tick = bars.refresh
            try:
                with self.sampler:
                    yield
            finally:
                bars.close()

    def _report(
        self, stats: RunStats, started: float, ended: float, cpu_s: float, skipped: int
    ) -> Report:
        occupancy = self.sampler.occupancy
        return build_report(
            stats,
            ended - started,
            stages=tuple(
                StageStat.of(s, ended) for s in (self.download, self.transform, self.write)
            ),
            queues=tuple(
                QueueStat(g.name, g.bound, g.peak, round(occupancy[g.name].mean, 2))
                for g in self.gauges
            ),
            parent_cpu_s=round(cpu_s, 3),
            pool_cpu_s=round(self.transform.total().cpu_s, 3),
            skipped=skipped,
            interrupted=signal.Signals(self.interrupted).name if self.interrupted else None,
            pool_restarts=self.pool.restarts + self.quarantine.restarts,
        )

    # --- lifecycle: called from the signal handler, in the main thread ---------------------------

    def interrupt(self, signum: int) -> None:
        """Stop gracefully: read no more URLs, end downloads now, give the pool a grace period."""
        self.interrupted = signum
        self.stop.set()
        self.downloader.cancel()
        self._grace = threading.Timer(self.config.transform.shutdown_grace, self._kill_workers)
        self._grace.name = "shutdown-grace"
        self._grace.start()
        log.warning(
            "%s: finishing the images in flight (again to abort)", signal.Signals(signum).name
        )

    def abort(self, signum: int) -> None:
        """Stop now: kill the workers, flush the manifest, exit; a rerun redoes what is missing."""
        self._kill_workers()
        self.sink.close()
        os._exit(128 + signum)

    def _kill_workers(self) -> None:
        for worker in [*self.pool.processes(), *self.quarantine.processes()]:
            with contextlib.suppress(OSError, ValueError):  # already gone
                worker.kill()

    def _end_grace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace.join()

    # --- download threads -----------------------------------------------------------------

    def _download_loop(self, jobs: SharedIterator[Job | ShardEnd]) -> None:
        meter = self.download.meter()
        try:
            while (job := jobs.next()) is not None:
                if isinstance(job, ShardEnd):
                    self.results.put(job)
                    continue
                if job.duplicate_of is not None:  # its URL is fetched for an earlier line
                    self.results.put(Outcome.duplicate(job))
                    continue
                started = time.perf_counter()
                try:
                    fetched = self.downloader.fetch(job)
                except FetchError as err:
                    if self.stop.is_set():  # cut short by an interrupt: not a real failure
                        continue
                    log.debug("%s %s: %s: %s", job.key, job.url, err.kind, err.message)
                    elapsed = time.perf_counter() - started
                    meter.record(elapsed, ok=False)
                    self.results.put(Outcome.failed(job, err, download_ms=round(elapsed * 1000, 2)))
                    continue
                size = len(fetched.body)
                meter.record(time.perf_counter() - started, bytes_in=size, bytes_out=size)
                self.fetched.put(fetched)
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.fetched.put(DONE)

    # --- dispatcher thread: feeds the pool, at most in_flight tasks at a time -----------------

    def _dispatch_loop(self) -> None:
        producers = self.config.download.workers
        try:
            while producers:
                item = self.fetched.get()
                if item is DONE:
                    producers -= 1
                elif not self.stop.is_set():  # once stopping, downloaded bodies are dropped
                    assert isinstance(item, Fetched)
                    self.slots.acquire()
                    self._submit(item, attempt=0)
        except BaseException:
            self.stop.set()
            while producers:  # keep the download threads from blocking on a full queue
                producers -= self.fetched.get() is DONE
            raise
        finally:
            self.slots.drain()  # every task has come back
            self.results.put(DONE)

    def _submit(self, item: Fetched, attempt: int) -> None:
        future = self.pool.submit(process, item)
        future.add_done_callback(functools.partial(self._on_done, item, attempt))

    def _on_done(self, item: Fetched, attempt: int, future: Future[Outcome]) -> None:
        """Runs in the pool's thread: pass the result on, or deal with a dead worker."""
        crashed = not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)
        if crashed and not self.stop.is_set() and attempt < self.config.transform.crash_retries:
            self._suspect(item, attempt + 1)  # the slot stays taken until it is settled
            return
        self._settle(item, future, crashed)

    def _settle(self, item: Fetched, future: Future[Outcome], crashed: bool) -> None:
        meter = self.transform.meter()  # this runs in a pool's result thread
        if crashed and not self.stop.is_set():
            error = TransformError("worker_crash", "the transform process died on this image")
            meter.record(0.0, ok=False, bytes_in=len(item.body))
            self.results.put(Outcome.failed(item.job, error, download_ms=item.download_ms,
                                            bytes_in=len(item.body)))  # fmt: skip
        elif not (crashed or future.cancelled()):  # killed or cancelled at shutdown: redone later
            if future.exception() is None:
                done = future.result()
                meter.record(
                    done.transform_ms / 1000,
                    ok=done.status == "ok",
                    bytes_in=done.bytes_in,
                    bytes_out=done.bytes_out,
                    cpu_s=done.cpu_ms / 1000,
                )
            self.results.put(future)
        self.slots.release()

    def _suspect(self, item: Fetched, attempt: int) -> None:
        with self._suspect_lock:
            self._suspects.append((item, attempt))
            if self._suspect_running:
                return
            self._suspect_running = True
        self._next_suspect()

    def _next_suspect(self) -> None:
        with self._suspect_lock:
            if not self._suspects:
                self._suspect_running = False
                return
            item, attempt = self._suspects.popleft()
        future = self.quarantine.submit(process, item)
        future.add_done_callback(functools.partial(self._on_suspect_done, item, attempt))

    def _on_suspect_done(self, item: Fetched, attempt: int, future: Future[Outcome]) -> None:
        crashed = not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)
        if crashed and not self.stop.is_set() and attempt < self.config.transform.crash_retries:
            self._suspect(item, attempt + 1)
        else:
            self._settle(item, future, crashed)
        self._next_suspect()

    # --- main thread: the sink -----------------------------------------------------------

    def _collect(self, stats: RunStats) -> None:
        meter = self.write.meter()
        try:
            while (item := self.results.get()) is not DONE:
                if isinstance(item, ShardEnd):
                    self.sink.end_shard(item)
                    continue
                outcome = item.result() if isinstance(item, Future) else item
                assert isinstance(outcome, Outcome)
                started = time.perf_counter()
                self.sink.add(outcome)
                stats.add(outcome)
                meter.record(time.perf_counter() - started)
        except BaseException:
            self.stop.set()  # a bug: stop reading URLs, let what is in flight finish, re-raise
            self.downloader.cancel()
            while self.results.get() is not DONE:
                pass
            raise


@contextlib.contextmanager
def _signals(pipeline: Run) -> Iterator[None]:
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
