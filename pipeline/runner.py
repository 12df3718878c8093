"""One run of the pipeline: the stages wired together, owned by the main thread.

    URL files (streamed, SharedIterator)
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
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from .config import Config
from .download import Downloader
from .errors import FetchError, PipelineError
from .metrics import QueueStat, Report, RunStats
from .records import Fetched, Job, Outcome, ShardEnd
from .sink import Sink
from .sources import find_sources, iter_jobs
from .stages import DONE, BoundedQueue, SharedIterator
from .transform import WorkerSetup, init_worker, process

log = logging.getLogger(__name__)

Result = Outcome | ShardEnd | Future[Outcome]


def run(sources: Sequence[Path], config: Config, *, progress: bool = False) -> Report:
    """Process every URL of ``sources``; returns the report (also saved as report.json)."""
    files = find_sources(sources, config.input.csv_column)
    out_dir = Path(config.output.dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PipelineError(f"{out_dir}: cannot create the output folder: {exc.strerror}") from None
    report = Run(config, out_dir).execute(files, progress=progress)
    report.save(out_dir)
    return report


def make_pool(config: Config, out_dir: Path) -> ProcessPoolExecutor:
    """The transform pool, started with the configured method (never plain fork)."""
    method = config.transform.start_method
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # workers fork from a server that has already imported Pillow
        context.set_forkserver_preload(["pipeline.transform"])
    setup = WorkerSetup(config.transform, str(out_dir), config.output.folder_size)
    return ProcessPoolExecutor(
        max_workers=config.transform.pool_workers,
        mp_context=context,
        initializer=init_worker,
        initargs=(setup,),
    )


class Run:
    """The queues, the stop flag and the stage loops of one run."""

    def __init__(self, config: Config, out_dir: Path) -> None:
        self.config = config
        self.out_dir = out_dir
        self.stop = threading.Event()
        self.fetched: BoundedQueue[Fetched] = BoundedQueue("fetched", config.queues.fetched)
        self.results: BoundedQueue[Result] = BoundedQueue("results", config.queues.results)
        self.slots = threading.BoundedSemaphore(config.transform.in_flight)

    def execute(self, files: Sequence[Path], *, progress: bool) -> Report:
        cfg = self.config
        jobs = SharedIterator(
            iter_jobs(files, cfg.input.shard_size, cfg.input.csv_column), self.stop
        )
        stats = RunStats()
        with (
            Sink(self.out_dir) as sink,
            Downloader(cfg.download) as downloader,
            make_pool(cfg, self.out_dir) as pool,
            ThreadPoolExecutor(cfg.download.workers, "download") as downloads,
            ThreadPoolExecutor(1, "dispatch") as dispatch,
            _progress_bar(progress) as bar,
        ):
            loops = [
                downloads.submit(self._download_loop, jobs, downloader)
                for _ in range(cfg.download.workers)
            ]
            loops.append(dispatch.submit(self._dispatch_loop, pool))
            self._collect(sink, stats, bar)
            for loop in loops:  # a stage's bug surfaces here, after everything has drained
                loop.result()
        if sink.open_shards:
            log.warning("shards left incomplete: %s", sink.open_shards)
        return stats.report(
            tuple(QueueStat(q.name, q.bound, q.peak) for q in (self.fetched, self.results))
        )

    # --- download threads -----------------------------------------------------------------

    def _download_loop(self, jobs: SharedIterator[Job | ShardEnd], downloader: Downloader) -> None:
        try:
            while (job := jobs.next()) is not None:
                if isinstance(job, ShardEnd):
                    self.results.put(job)
                    continue
                started = time.perf_counter()
                try:
                    self.fetched.put(downloader.fetch(job))
                except FetchError as err:
                    elapsed = (time.perf_counter() - started) * 1000
                    self.results.put(Outcome.failed(job, err, download_ms=elapsed))
        except BaseException:
            self.stop.set()
            raise
        finally:
            self.fetched.put(DONE)

    # --- dispatcher thread: feeds the pool, at most in_flight tasks at a time -----------------

    def _dispatch_loop(self, pool: ProcessPoolExecutor) -> None:
        producers = self.config.download.workers
        try:
            while producers:
                item = self.fetched.get()
                if item is DONE:
                    producers -= 1
                elif not self.stop.is_set():
                    assert isinstance(item, Fetched)
                    self.slots.acquire()
                    pool.submit(process, item).add_done_callback(self._on_done)
        except BaseException:
            self.stop.set()
            while producers:  # keep the download threads from blocking on a full queue
                producers -= self.fetched.get() is DONE
            raise
        finally:
            for _ in range(self.config.transform.in_flight):  # every task has come back
                self.slots.acquire()
            self.results.put(DONE)

    def _on_done(self, future: Future[Outcome]) -> None:
        self.results.put(future)
        self.slots.release()

    # --- main thread: the sink -----------------------------------------------------------

    def _collect(self, sink: Sink, stats: RunStats, bar: tqdm) -> None:
        try:
            while (item := self.results.get()) is not DONE:
                if isinstance(item, ShardEnd):
                    sink.end_shard(item)
                    continue
                outcome = item.result() if isinstance(item, Future) else item
                assert isinstance(outcome, Outcome)
                sink.add(outcome)
                stats.add(outcome)
                bar.update()
                bar.set_postfix(ok=stats.ok, failed=stats.failed.total(), refresh=False)
        except BaseException:
            self.stop.set()  # stop reading URLs, let what is in flight finish, then re-raise
            while self.results.get() is not DONE:
                pass
            raise


class _Bar(tqdm):  # type: ignore[misc]
    monitor_interval = 0  # no tqdm monitor thread: nothing but our stages may outlive a run


def _progress_bar(enabled: bool) -> tqdm:
    return _Bar(
        desc="processed",
        unit=" url",
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        mininterval=0.2,
    )
