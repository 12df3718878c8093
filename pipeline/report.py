"""The end-of-run report: what happened, how fast each stage went, and which one held the run back.

``Report`` is frozen and plain: printed as a table at the end of a run (``format_report``), saved as
``report.json`` beside the manifest, and read back by ``pipeline report OUT_DIR`` (``load_report``),
with the outcomes of every run recounted from the manifest (``count_manifest``) when a folder was
filled by more than one run.

The bottleneck is named from the stages' utilization (the share of their workers' time spent on
items) and the occupancy of the queue between them: a full ``fetched`` queue with busy transform
workers means transforms are the limit; an empty one with busy download threads means downloads
are.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .atomic import write_atomic
from .errors import PipelineError
from .layout import MANIFEST, REPORT, REPORTS, history_file
from .logs import printable
from .metrics import TOP_HOSTS, Meter, RunStats, Stage
from .shape import available_cores
from .sink import read_manifest

REPORT_FILE = REPORT
WIDTH = 79  # the report fits an 80-column terminal, with room for its cursor


@dataclass(frozen=True, slots=True)
class StageStat:
    """One stage over the run."""

    name: str
    workers: int
    items: int
    failed: int
    bytes_in: int
    bytes_out: int
    busy_s: float  # time its workers spent on items, summed
    active_s: float  # from its first item's start to its last item's end
    utilization: float  # busy_s over workers x (first item .. end of run), in percent: 0 .. 100
    p50_ms: float
    p95_ms: float
    p99_ms: float
    # the share of its workers' time spent on items (wall time, in the worker): for a stage
    # whose utilization is CPU, this says whether workers had work while others took the CPU
    occupied: float | None = None

    @property
    def rate(self) -> float:
        """Items per second while the stage was active: what it can do when fed."""
        return self.items / self.active_s if self.active_s > 0 else 0.0

    @classmethod
    def of(cls, stage: Stage, ended: float) -> StageStat:
        """The figures of ``stage`` in a run that ended at ``ended`` (a perf_counter() time).

        Utilization counts from the stage's first item to the end of the run, so that a pool
        still starting, or downloads waiting on nothing yet, do not count as idle.
        """
        meter = stage.total()
        span = ended - meter.first if meter.items else 0.0
        active = max(0.0, meter.last - meter.first) if meter.items else 0.0
        return cls.from_meter(stage.name, stage.workers, meter, span_s=span, active_s=active)

    @classmethod
    def from_meter(
        cls, name: str, workers: int, meter: Meter, *, span_s: float, active_s: float
    ) -> StageStat:
        """``meter``'s figures for ``workers`` workers that could work for ``span_s`` seconds."""
        capacity = workers * span_s
        busy = min(meter.busy_s, capacity)
        return cls(
            name=name,
            workers=workers,
            items=meter.items,
            failed=meter.failed,
            bytes_in=meter.bytes_in,
            bytes_out=meter.bytes_out,
            busy_s=round(meter.busy_s, 3),
            active_s=round(active_s, 3),
            utilization=round(100 * busy / capacity, 1) if capacity > 0 else 0.0,
            p50_ms=round(meter.latency.percentile(50), 2),
            p95_ms=round(meter.latency.percentile(95), 2),
            p99_ms=round(meter.latency.percentile(99), 2),
        )


@dataclass(frozen=True, slots=True)
class QueueStat:
    """A bounded buffer between stages: its bound, its peak depth and its sampled mean depth."""

    name: str
    bound: int
    peak: int
    mean: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    """Which stage limited the run ("download", "transform", "write", "main", or "none")."""

    stage: str
    advice: str


@dataclass(frozen=True, slots=True)
class Report:
    urls: int
    ok: int
    failed: dict[str, int]
    wall_s: float
    bytes_in: int
    bytes_out: int
    stages: tuple[StageStat, ...] = ()
    queues: tuple[QueueStat, ...] = ()
    parent_cpu_s: float = 0.0  # CPU time of the coordinator process, all its threads
    pool_cpu_s: float = 0.0  # CPU time the transform workers spent on images
    lanes: int = 0  # lane processes that ran
    lane_cpu_s: float = 0.0  # CPU time of the lane processes (downloads, hand-off), summed
    lane_cpu_max_s: float = 0.0  # ... of the busiest lane
    lane_restarts: int = 0  # lanes started in place of one that died
    verdict: Verdict | None = None
    failing_hosts: tuple[tuple[str, int], ...] = ()
    skipped: int = 0  # URLs an earlier run of this output folder had already done
    interrupted: str | None = None  # the signal that stopped the run early
    pool_restarts: int = 0  # transform pools replaced after a worker died
    duplicates: int = 0  # lines whose URL an earlier line had (input.dedupe)
    filtered: dict[str, int] = field(default_factory=dict)  # left out by a filter, by kind
    started: str = ""  # when the run started, UTC, ISO 8601
    sources: tuple[str, ...] = ()  # the input files the run was given, relative to the root
    resume: str | None = None  # on a rerun: what earlier runs had done, and what was left
    # downloads that waited past download.straggler_after: count, after_s, median_s, longest_s,
    # peak (at once), capped (not replaced: max_stragglers were waiting), hosts [[host, n], ...]
    stragglers: dict[str, Any] | None = None
    # the run's shape (shape.py), in words: its lanes, threads and workers; what a lane holds
    shape: tuple[str, ...] = ()

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mb_per_s_in(self) -> float:
        return self.bytes_in / 1e6 / self.wall_s if self.wall_s > 0 else 0.0

    def stage(self, name: str) -> StageStat | None:
        return next((s for s in self.stages if s.name == name), None)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            images_per_s=round(self.images_per_s, 2), mb_per_s_in=round(self.mb_per_s_in, 3)
        )
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["stages"] = tuple(StageStat(**s) for s in values.get("stages", ()))
        values["queues"] = tuple(QueueStat(**q) for q in values.get("queues", ()))
        values["failing_hosts"] = tuple(tuple(h) for h in values.get("failing_hosts", ()))
        values["sources"] = tuple(values.get("sources", ()))
        values["shape"] = tuple(values.get("shape", ()))
        if values.get("verdict") is not None:
            values["verdict"] = Verdict(**values["verdict"])
        return cls(**values)

    def save(self, out_dir: Path) -> None:
        """Into ``reports/<started>.json``, this run's own, and ``report.json``, the latest."""
        data = (json.dumps(self.to_json(), indent=2) + "\n").encode("utf-8")
        stamp = self.started.replace("-", "").replace(":", "").replace("+0000", "Z") or "unknown"
        write_atomic(out_dir / history_file(stamp), data, root=out_dir)
        write_atomic(out_dir / REPORT, data, root=out_dir)


def build_report(stats: RunStats, wall_s: float, **extra: Any) -> Report:
    """The report of a run from its outcome counts; ``extra`` holds the other fields."""
    report = Report(
        urls=stats.urls,
        ok=stats.ok,
        failed=dict(stats.failed.most_common()),
        wall_s=round(wall_s, 3),
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
        failing_hosts=tuple(stats.hosts.most_common(TOP_HOSTS)),
        duplicates=stats.duplicates,
        filtered=dict(stats.filtered.most_common()),
        **extra,
    )
    return replace(report, verdict=diagnose(report))


def meter_stage(name: str, workers: int, meter: Meter, ended: float) -> StageStat:
    """Utilization counts from the stage's first item (not while lanes and pools start)."""
    span = ended - meter.first if meter.items else 0.0
    active = max(0.0, meter.last - meter.first) if meter.items else 0.0
    return StageStat.from_meter(name, workers, meter, span_s=span, active_s=active)


def cpu_stage(name: str, workers: int, meter: Meter, ended: float) -> StageStat:
    """A stage of processes: busy while they use CPU, so utilization is the CPU they used."""
    stat = meter_stage(name, workers, meter, ended)
    capacity = workers * (ended - meter.first if meter.items else 0.0)
    used = round(min(100.0, 100 * meter.cpu_s / capacity), 1) if capacity > 0 else 0.0
    return replace(stat, utilization=used, occupied=stat.utilization)


# --- the bottleneck ------------------------------------------------------------------------------

_SATURATED = 80.0  # % utilization from which a stage is the limit
_OCCUPIED = 90.0  # % of the workers' time on items from which they are the limit, CPU or not
_ONE_CORE = 0.85  # CPU seconds per second from which one process (its GIL) is the limit
_FULL = 0.6  # mean occupancy of the fetched queue (of its bound) that says transforms lag
_MIN_ITEMS = 10


def diagnose(report: Report) -> Verdict:
    """Name the stage that limited the run, and what to change, in plain words.

    The coordinator and each lane are one process each, whose GIL is their ceiling: one that
    used ~a core for the whole run was the limit. Transform utilization is the CPU its workers
    used; download utilization the time its threads spent on downloads.
    """
    download, transform, write = (report.stage(n) for n in ("download", "transform", "write"))
    if download is None or transform is None or report.urls < _MIN_ITEMS:
        return Verdict("none", "too few URLs to tell which stage limits the run")
    wall = report.wall_s or 1.0
    if report.parent_cpu_s / wall >= _ONE_CORE:
        return Verdict(
            "coordinator",
            "the coordinator is saturated (one core: reading the input, writing a manifest row "
            "per URL): split the input over several runs or machines (--dask)",
        )
    if report.lanes and report.lane_cpu_max_s / wall >= _ONE_CORE:
        return Verdict(
            "lane",
            f"the lanes are saturated (each uses a whole core for its downloads and hand-off): "
            f"more lanes (executor.lanes, now {report.lanes}), fewer download threads per lane",
        )
    fetched = next((q for q in report.queues if q.name == "fetched"), None)
    backed_up = fetched is not None and fetched.mean >= _FULL * fetched.bound
    cores = available_cores()
    if transform.items and (
        transform.utilization >= _SATURATED
        or (transform.occupied or 0.0) >= _OCCUPIED  # always at work, on cores others share
        or (backed_up and transform.utilization >= download.utilization)
    ):
        if transform.workers < cores:
            return Verdict(
                "transform",
                f"transform is saturated: add transform workers "
                f"(transform.workers, now {transform.workers} on {cores} cores) "
                "or cheaper ops",
            )
        return Verdict(
            "transform",
            f"transform is saturated, on all {cores} cores: cheaper ops "
            "(a smaller transform.reducing_gap, fewer filters) or more machines",
        )
    if download.utilization >= _SATURATED:
        return Verdict(
            "download",
            f"downloads are the bottleneck and transforms are starved: "
            f"raise download.workers (now {download.workers}), or the server is slow",
        )
    if write is not None and write.utilization >= _SATURATED:
        return Verdict("write", "the writer is saturated: put output.dir on a faster disk")
    return Verdict("none", "no stage was saturated: the run was short, or the source ran dry")


# --- text ----------------------------------------------------------------------------------------


def format_report(report: Report) -> str:
    """The report as a compact table."""
    failed = sum(report.failed.values())
    lines = [f"interrupted by {report.interrupted}: rerun the same command to finish"]
    lines = lines if report.interrupted else []
    if report.resume:
        lines.append(f"resumed     {report.resume}")
    elif report.skipped:
        lines.append(f"resumed     {report.skipped} URLs were done by an earlier run")
    dupes = f", {report.duplicates} duplicate" if report.duplicates else ""
    dupes += f", {sum(report.filtered.values())} filtered" if report.filtered else ""
    lines += [
        f"urls        {report.urls}: {report.ok} ok, {failed} failed{dupes}, "
        f"in {report.wall_s:.2f} s",
        f"throughput  {report.images_per_s:.1f} images/s, {report.mb_per_s_in:.2f} MB/s in "
        f"({report.bytes_in / 1e6:.1f} MB in, {report.bytes_out / 1e6:.1f} MB out)",
    ]
    lines += [f"{'shape' if i == 0 else '':<12}{line}" for i, line in enumerate(report.shape)]
    lines += _stage_table(report) + _queue_table(report)
    if report.urls:
        per = 1000 / report.urls
        lanes = f"{report.lanes} lane{'s' * (report.lanes != 1)} {report.lane_cpu_s:.2f} s, "
        lines.append(
            f"cpu         coordinator {report.parent_cpu_s:.2f} s, "
            + (lanes if report.lanes else "")
            + f"transform pool {report.pool_cpu_s:.2f} s"
        )
        lines.append(
            f"            per URL: coordinator {per * report.parent_cpu_s:.2f} ms, "
            + (f"lanes {per * report.lane_cpu_s:.2f} ms, " if report.lanes else "")
            + f"pool {per * report.pool_cpu_s:.2f} ms"
        )
    if report.verdict is not None:
        lines.append(f"bottleneck  {report.verdict.advice}")
    lines += _filtered(report.filtered)
    lines += _failures(report.failed, report.failing_hosts)
    lines += _stragglers(report.stragglers)
    if report.pool_restarts:
        lines.append(f"restarts    the transform pool was restarted {report.pool_restarts} times")
    if report.lane_restarts:
        lines.append(f"restarts    a lane died and was replaced {report.lane_restarts} times")
    return "\n".join(fit(printable(line)) for line in lines)  # hosts, file names: escaped


def fit(line: str, width: int = WIDTH) -> str:
    """A line of the report in ``width`` columns: longer ones wrap under their label."""
    if len(line) <= width:
        return line
    return textwrap.fill(
        line, width, subsequent_indent=" " * 12, break_long_words=False, break_on_hyphens=False
    )


def _stragglers(slow: dict[str, Any] | None) -> list[str]:
    """How many downloads waited long, how long, and where: a slow server is visible here."""
    if not slow or not slow.get("count"):
        return []
    hosts = ", ".join(f"{printable(host)} {count}" for host, count in slow.get("hosts", ()))
    lines = [
        f"stragglers  {slow['count']} downloads over {slow['after_s']:g} s: median "
        f"{slow['median_s']:.1f} s, longest {slow['longest_s']:.1f} s, {slow['peak']} at once",
        f"            slowest hosts: {hosts}",
    ]
    if slow.get("capped"):
        lines.append(
            f"            {slow['capped']} kept a worker: download.max_stragglers were waiting"
        )
    return lines


def _filtered(filtered: dict[str, int]) -> list[str]:
    """One line: the images the filters left out (not failures: they are final and fine)."""
    if not filtered:
        return []
    kinds = ", ".join(f"{kind} {count}" for kind, count in filtered.items())
    return [f"filtered    {sum(filtered.values())} left out by the filters: {kinds}"]


def _failures(failed: dict[str, int], hosts: tuple[tuple[str, int], ...]) -> list[str]:
    lines = ["failed by kind"] if failed else []
    lines += [f"  {kind:<20}{count:>8}" for kind, count in failed.items()]
    lines += ["top failing hosts"] if hosts else []
    lines += [f"  {printable(host):<30}{count:>8}" for host, count in hosts]  # from URLs
    return lines


def _stage_table(report: Report) -> list[str]:
    if not report.stages:
        return []
    # 78 columns: MB out is in the throughput line (and report.json), not here
    rows = [
        f"{'stage':<11}{'workers':>7}{'items':>8}{'failed':>7}{'MB in':>7}"
        f"{'items/s':>8}{'busy':>6}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
    ]
    for s in report.stages:
        rows.append(
            f"{s.name:<11}{s.workers:>7}{s.items:>8}{s.failed:>7}{s.bytes_in / 1e6:>7.1f}"
            f"{s.rate:>8.1f}{s.utilization:>5.0f}%"
            f"{s.p50_ms:>8.1f}{s.p95_ms:>8.1f}{s.p99_ms:>8.1f}"
        )
    return rows


def _queue_table(report: Report) -> list[str]:
    if not report.queues:
        return []
    rows = [f"{'queue':<11}{'bound':>7}{'mean':>8}{'peak':>7}"]
    rows += [f"{q.name:<11}{q.bound:>7}{q.mean:>8.1f}{q.peak:>7}" for q in report.queues]
    return rows


# --- reading a finished run back -----------------------------------------------------------------


def load_report(out_dir: Path) -> Report | None:
    """The report its last run saved in ``out_dir`` (None when no run finished there)."""
    if not (out_dir / MANIFEST).is_dir():
        raise PipelineError(f"{out_dir}: not an output folder of pipeline run (no manifest/)")
    path = out_dir / REPORT
    return _read_report(path) if path.is_file() else None


def load_history(out_dir: Path) -> list[Report]:
    """The report of every run into ``out_dir`` that finished, oldest first."""
    return [_read_report(p) for p in sorted((out_dir / REPORTS).glob("*.json"))]


def _read_report(path: Path) -> Report:
    try:
        return Report.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise PipelineError(f"{path}: not a report of pipeline run ({exc})") from None


def count_manifest(out_dir: Path) -> RunStats:
    """The outcomes recorded in ``out_dir`` by every run, counted from its manifest."""
    return count_rows(read_manifest(out_dir))


def count_rows(rows: Iterable[dict[str, Any]]) -> RunStats:
    """The outcomes of some manifest rows."""
    stats = RunStats()
    for row in rows:
        stats.add_row(
            row["status"],
            row.get("error_kind"),
            row["url"],
            row.get("bytes_in") or 0,
            row.get("bytes_out") or 0,
        )
    return stats


def format_folder(stats: RunStats) -> str:
    """What a folder's manifest holds, over every run that wrote to it."""
    dupes = f", {stats.duplicates} duplicate" if stats.duplicates else ""
    dupes += f", {stats.filtered.total()} filtered" if stats.filtered else ""
    lines = [
        f"manifest    {stats.urls} URLs recorded: {stats.ok} ok, {stats.failed.total()} failed"
        + dupes
    ]
    return "\n".join(
        lines
        + _filtered(dict(stats.filtered.most_common()))
        + _failures(dict(stats.failed.most_common()), tuple(stats.hosts.most_common(TOP_HOSTS)))
    )


def format_history(reports: Sequence[Report]) -> str:
    """One line per run into a folder: when, how many URLs, how fast."""
    lines = [f"{'runs':<12}{'started (UTC)':<21}{'urls':>8}{'ok':>8}{'failed':>8}{'images/s':>10}"]
    for r in reports:
        when = printable(r.started[:19].replace("T", " ")) or "?"
        note = f"  {r.interrupted}" if r.interrupted else ""
        failed = sum(r.failed.values())
        lines.append(
            f"{'':<12}{when:<21}{r.urls:>8}{r.ok:>8}{failed:>8}{r.images_per_s:>10.1f}{note}"
        )
    return "\n".join(lines)
