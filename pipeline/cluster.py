"""Scale out: the same pipeline on a Dask distributed cluster, one shard per task.

    driver (pipeline run --dask ...)                          Dask workers (non-daemon processes)
    URL files -> shards of input.shard_size URLs  --submit-->  run_shard: the local pipeline, a
      (streamed; a sealed shard is skipped whole)   <= K         coordinator and its lanes (each:
      <- ShardResult: the shard's report and meters             download threads -> its pool),
    merged report (report.json)                                  writes images and the manifest

The driver holds at most ``executor.shards_in_flight`` shards at a time (Dask bounds nothing
itself) and one shard's URLs while it reads the next. Each task runs ``Coordinator.process`` on
its shard and writes that shard's images and manifest part itself, atomically, into
``output.dir``, which every worker must see at the same path (a shared filesystem; a worker
that does not is one line, never a folder of its own). The manifest part is sealed (renamed to
``.jsonl``) when complete, so a rerun skips the shard whole, and a shard retried after its
worker was lost first keeps the final rows the lost attempt flushed, exactly as a local resume.

With ``output.dir`` in a store (``s3://bucket/prefix``) nothing is shared but the store: the
driver plans from the state ``open_run`` pulls from it (mirror.py); a task runs its shard in a
temporary folder of its own on its worker, as the store's staging (lanes put each image, the
shard's seal goes last), and the driver names the tars in the store (seals.py). A task lost
with its worker had put no seal: its shard is run again whole, its objects replaced.

Each shard starts its lanes and their pools as the run's shape (shape.py) says, computed on the
Dask worker from that worker's cores, not the driver's, so a node uses all its cores; that costs
~0.5 s a shard. Dask's worker processes are daemons by default, and a daemon process may not
start children: workers must run with ``distributed.worker.daemon`` off
(``DASK_DISTRIBUTED__WORKER__DAEMON=False dask worker ...``); a LocalCluster is started that way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import Config
from .dedupe import plan_jobs
from .errors import OutputError, PipelineError, require
from .layout import MANIFEST, RUN, OutputLayout
from .metrics import TOP_HOSTS, Meter
from .mirror import put_reports
from .objects import ObjectStore
from .records import Job, ShardEnd
from .report import QueueStat, Report, StageStat, count_rows, diagnose
from .resume import Plan, Resume
from .runner import Coordinator, now_utc, open_run, tell_findings
from .seals import InOrder, part_path, shard_path
from .shape import shape_of
from .sink import read_rows
from .sources import Source
from .storage import Location, parse_location

log = logging.getLogger(__name__)

DAEMON_HELP = (
    "this Dask worker is a daemon process, which may not start the transform pool: start "
    "workers with DASK_DISTRIBUTED__WORKER__DAEMON=False (config distributed.worker.daemon)"
)


@dataclass(frozen=True, slots=True)
class ShardResult:
    """What one shard task sends back: its report, and its stages' meters to merge exactly."""

    shard: str
    report: Report
    meters: dict[str, Meter]
    workers: dict[str, int]


# --- the worker side ------------------------------------------------------------------------------


def run_shard(items: list[Job | ShardEnd], config: Config, out: str) -> ShardResult:
    """A Dask task: run one shard through the local staged pipeline, on this worker, into
    ``out``: a folder every worker sees, or a store (through a staging folder of its own)."""
    if multiprocessing.current_process().daemon:
        raise PipelineError(DAEMON_HELP)
    output = parse_location(out, config.output.storage_options)
    if isinstance(output, Path):
        if not (output / RUN).is_file():  # never an output folder of this worker's own
            raise PipelineError(
                f"output.dir {out}: not found on Dask worker {socket.gethostname()}: with "
                "--dask the output is a folder every worker sees at the same path (a shared "
                "filesystem), or a store (--out s3://bucket/prefix)"
            )
        return _run_in(items, config, output)
    with _staging(config) as staging:  # the worker's own: gone with the task
        return _run_in(items, config, staging, ObjectStore(output))


@contextlib.contextmanager
def _staging(config: Config) -> Iterator[Path]:
    """A task's own local folder (in ``output.staging`` on this worker, or its temporary
    folder): a shard starts from nothing there, as a shard of a store output always does."""
    where = config.output.staging or None
    try:
        if where is not None:
            os.makedirs(where, exist_ok=True)
        folder = tempfile.TemporaryDirectory(prefix="pipeline-shard-", dir=where)
    except OSError as exc:
        raise PipelineError(
            f"output.staging {where}: cannot create it on Dask worker {socket.gethostname()}: "
            f"{exc.strerror or exc}"
        ) from None
    with folder as path:
        yield Path(path)


def _run_in(
    items: list[Job | ShardEnd], config: Config, folder: Path, store: ObjectStore | None = None
) -> ShardResult:
    """The shard through a coordinator writing into ``folder`` (the staging of ``store``, which
    it puts the shard into); what the task sends back."""
    shard = items[-1].shard
    # a shard an earlier run left open, or retried after its worker was lost, keeps its final
    # rows; in a store a shard is sealed or redone whole (mirror.py)
    opened = store is None and part_path(folder / MANIFEST, shard).exists()
    resume = Resume(Plan(folder, [], config.output, partial=frozenset({shard} if opened else ())))
    # the driver names the tars, in order; the shape is this worker's (its cores)
    run = Coordinator(config, folder, name_tars=False, shape=shape_of(config), store=store)
    report = run.process(resume.pending(iter(items)), resume)
    if run.failure is not None:  # a full disk, ...: the task fails; the driver says it in one line
        raise OutputError(run.failure)
    sealed = shard_path(folder / MANIFEST, shard)
    if store is not None and not sealed.exists():  # never a shard reported done, not in the store
        raise OutputError(f"{shard}: not sealed on Dask worker {socket.gethostname()}")
    if sealed.exists():  # count the whole shard: rows a lost attempt wrote belong to this run too
        stats = count_rows(read_rows(sealed))
        report = replace(
            report,
            urls=stats.urls,
            ok=stats.ok,
            failed=dict(stats.failed.most_common()),
            duplicates=stats.duplicates,
            filtered=dict(stats.filtered.most_common()),
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            failing_hosts=tuple(stats.hosts.most_common(TOP_HOSTS)),
            skipped=0,
        )
    return ShardResult(shard=shard, report=report, meters=run.meters, workers=run.workers)


# --- the driver ---------------------------------------------------------------------------------


def shards(items: Iterator[Job | ShardEnd]) -> Iterator[list[Job | ShardEnd]]:
    """The job stream cut into shards: each list is a shard's jobs and then its ShardEnd."""
    current: list[Job | ShardEnd] = []
    for item in items:
        current.append(item)
        if isinstance(item, ShardEnd):
            yield current
            current = []


@contextlib.contextmanager
def connect(config: Config) -> Iterator[Any]:
    """A Dask client for ``executor.address``; "local" starts a LocalCluster on 127.0.0.1."""
    require("distributed", "dask", "the dask executor")
    import dask
    from distributed import Client, LocalCluster

    executor = config.executor
    if executor.address != "local":
        limit = check_scheduler(executor.address)
        try:
            client = Client(executor.address, timeout=limit)
        except OSError as exc:
            raise PipelineError(f"executor.address {executor.address}: {exc}") from None
        with client:
            yield client
        return
    with (
        dask.config.set(
            {
                "distributed.worker.daemon": False,  # our workers start a process pool
                "distributed.scheduler.allowed-failures": executor.retries,  # lost workers
            }
        ),
        LocalCluster(
            n_workers=executor.local_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=None,
            memory_limit=0,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def check_scheduler(address: str) -> float:
    """One round trip to ``address`` within Dask's connect timeout, or a PipelineError: a port
    where something else listens answers garbage (Dask may then try to allocate exabytes), or
    nothing at all (its handshake waits forever). The timeout, in seconds."""
    import dask
    from dask.utils import parse_timedelta

    limit = float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s"))
    where = f"executor.address {address}"
    try:
        identity = asyncio.run(asyncio.wait_for(_identity(address, limit), limit))
    except TimeoutError:
        raise PipelineError(
            f"{where}: no Dask scheduler answered within {limit:g} s "
            "(distributed.comm.timeouts.connect)"
        ) from None
    except OSError as exc:  # refused, unreachable, closed: Dask's message says which
        raise PipelineError(f"{where}: {exc}") from None
    except (ValueError, TypeError, MemoryError, EOFError):  # bytes that are not Dask's protocol
        raise PipelineError(
            f"{where}: not a Dask scheduler (it answers another protocol)"
        ) from None
    kind = identity.get("type") if isinstance(identity, dict) else None
    if kind != "Scheduler":
        raise PipelineError(f"{where}: not a Dask scheduler (it says it is {kind or 'unknown'})")
    return limit


async def _identity(address: str, limit: float) -> object:
    from distributed.comm import connect as open_comm

    comm = await open_comm(address, timeout=limit)
    try:
        await comm.write({"op": "identity"})
        return await comm.read()
    finally:
        comm.abort()


def run_on_dask(
    sources: Sequence[Path | Location],
    config: Config,
    *,
    restart: bool = False,
    progress: bool = False,
    client: Any = None,
    on_shard: Callable[[ShardResult], None] | None = None,
) -> Report:
    """Process every URL of ``sources`` on a Dask cluster, a shard per task; the merged report.

    ``client`` is an existing Dask client (else one is made from ``executor``); ``on_shard`` is
    called in this thread as each shard's result comes back; ``progress`` draws a bar of URLs.
    """
    if client is None:
        require("distributed", "dask", "the dask executor")  # before the input is read
    with open_run(sources, config, restart=restart) as plan:
        with (
            contextlib.nullcontext(client) if client is not None else connect(config) as dask,
            _progress(plan.sources, config, on_shard)
            if progress
            else contextlib.nullcontext(on_shard) as tell,
        ):
            report = _drive(dask, plan, config, tell)
        report = replace(report, sources=tuple(s.name for s in plan.sources), resume=plan.summary())
        report.save(plan.out_dir)
        if plan.store is not None:
            put_reports(plan.store, plan.out_dir)
        tell_findings(plan, report.urls)
    return report


@contextlib.contextmanager
def _progress(
    sources: Sequence[Source], config: Config, then: Callable[[ShardResult], None] | None
) -> Iterator[Callable[[ShardResult], None]]:
    """A bar of URLs done, moved as each shard comes back (then calls ``then``)."""
    from .progress import Bar, UrlCount

    with UrlCount(sources, config.input.url_column) as count:
        bar = Bar(desc="urls", unit=" url", leave=True, dynamic_ncols=True, file=sys.stderr)
        shards = failed = 0

        def advance(result: ShardResult) -> None:
            nonlocal shards, failed
            shards += 1
            failed += sum(result.report.failed.values())
            bar.total = count.total
            bar.set_postfix_str(f"shards={shards}, failed={failed}", refresh=False)
            bar.update(result.report.urls)
            if then is not None:
                then(result)

        try:
            yield advance
        finally:
            bar.close()


def _drive(
    client: Any,
    plan: Plan,
    config: Config,
    on_shard: Callable[[ShardResult], None] | None,
) -> Report:
    from distributed import as_completed

    workers = max(1, len(client.scheduler_info().get("workers", {})))
    limit = config.executor.shards_in_flight or 2 * workers
    out_dir = plan.out_dir
    started_at, started = now_utc(), time.perf_counter()
    results: list[ShardResult] = []
    skipped = plan.unread_lines  # files done whole are not read again
    running = as_completed()
    in_flight = 0
    token = uuid.uuid4().hex[:12]  # this run's task keys: never a finished task of another run
    names = _tar_names(config, out_dir, plan.store)
    out = str(out_dir) if plan.store is None else config.output.dir  # what a task writes into

    def collect_one() -> None:
        nonlocal in_flight
        future = next(running)
        in_flight -= 1
        try:
            result = future.result()
        except Exception as exc:
            if type(exc).__name__ == "KilledWorker":  # lost a worker once more than retries
                raise PipelineError(
                    f"{future.key}: lost one worker after another (the scheduler's "
                    "distributed.scheduler.allowed-failures); the shards already done are "
                    "kept, rerun the same command to do the rest"
                ) from None
            raise
        results.append(result)
        if names is not None:  # the shard's tars: the next numbers, in the order of the input
            names.sealed(result.shard)
        log.info("shard %s: %d URLs, %d ok", result.shard, result.report.urls, result.report.ok)
        if on_shard is not None:
            on_shard(result)

    try:
        with plan_jobs(plan, config.input) as items:
            for shard in shards(items):
                end = shard[-1]
                if end.shard in plan.sealed:  # done by an earlier run, its lines unchanged
                    skipped += len(shard) - 1
                    continue
                if plan.lock_lost is not None and plan.lock_lost.is_set():
                    raise PipelineError(
                        f"{plan.where}: another run took over this output's lock; stopped "
                        "submitting shards (the shards done are kept)"
                    )
                future = client.submit(
                    run_shard,
                    shard,
                    config,
                    out,
                    key=f"pipeline-shard-{end.shard}-{token}",
                    retries=config.executor.retries,
                    pure=False,
                )
                running.add(future)
                in_flight += 1
                if names is not None:
                    names.met(end.shard)
                while in_flight >= limit:
                    collect_one()
            while in_flight:
                collect_one()
    except BaseException:
        if names is not None:  # the shards done are named, as a local run's are
            with contextlib.suppress(OutputError):
                names.finish()
        for future in running.futures:
            future.cancel()
        raise
    if names is not None:
        names.finish()
    report = merge(results, time.perf_counter() - started, skipped=skipped, cluster_workers=workers)
    return replace(report, started=started_at)


def _tar_names(config: Config, out_dir: Path, store: ObjectStore | None) -> InOrder | None:
    """webdataset: names for the shards' tars, given here, in the order of the input."""
    return InOrder.start(out_dir, store) if OutputLayout.of(config.output).webdataset else None


def merge(
    results: Sequence[ShardResult], wall_s: float, *, skipped: int, cluster_workers: int
) -> Report:
    """One report for the run from its shards' reports; latencies are merged exactly."""
    failed: Counter[str] = Counter()
    filtered: Counter[str] = Counter()
    hosts: Counter[str] = Counter()
    meters: dict[str, Meter] = {}
    workers: dict[str, int] = {}
    queues: dict[str, list[QueueStat]] = {}
    shapes = {result.report.shape for result in results}  # each worker's: the same on like nodes
    for result in results:
        failed.update(result.report.failed)
        filtered.update(result.report.filtered)
        hosts.update(dict(result.report.failing_hosts))
        for name, meter in result.meters.items():
            meters.setdefault(name, Meter()).merge(meter)
            workers[name] = result.workers[name] * cluster_workers
        for queue in result.report.queues:
            queues.setdefault(queue.name, []).append(queue)
    stages = tuple(
        StageStat.from_meter(name, workers[name], meter, span_s=wall_s, active_s=wall_s)
        for name, meter in meters.items()
    )
    report = Report(
        urls=sum(r.report.urls for r in results),
        ok=sum(r.report.ok for r in results),
        failed=dict(failed.most_common()),
        wall_s=round(wall_s, 3),
        bytes_in=sum(r.report.bytes_in for r in results),
        bytes_out=sum(r.report.bytes_out for r in results),
        stages=stages,
        queues=tuple(
            QueueStat(
                name,
                max(q.bound for q in group),
                max(q.peak for q in group),
                round(sum(q.mean for q in group) / len(group), 2),
            )
            for name, group in queues.items()
        ),
        parent_cpu_s=round(sum(r.report.parent_cpu_s for r in results), 3),
        pool_cpu_s=round(sum(r.report.pool_cpu_s for r in results), 3),
        lanes=max((r.report.lanes for r in results), default=0),
        lane_cpu_s=round(sum(r.report.lane_cpu_s for r in results), 3),
        lane_cpu_max_s=max((r.report.lane_cpu_max_s for r in results), default=0.0),
        lane_restarts=sum(r.report.lane_restarts for r in results),
        failing_hosts=tuple(hosts.most_common(TOP_HOSTS)),
        skipped=skipped + sum(r.report.skipped for r in results),
        pool_restarts=sum(r.report.pool_restarts for r in results),
        duplicates=sum(r.report.duplicates for r in results),
        filtered=dict(filtered.most_common()),
        shape=shapes.pop() if len(shapes) == 1 else (),
    )
    return replace(report, verdict=diagnose(report))
