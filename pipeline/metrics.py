"""Run statistics and the end-of-run report.

``RunStats`` is fed one Outcome at a time by the thread that owns the sink, so it needs no lock.
``Report`` is the frozen summary: printed as text at the end of a run, and saved as ``report.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .records import Outcome

REPORT_FILE = "report.json"
TOP_HOSTS = 5
_MAX_HOSTS = 10_000


@dataclass(frozen=True, slots=True)
class QueueStat:
    name: str
    bound: int
    peak: int


@dataclass(frozen=True, slots=True)
class Report:
    urls: int
    ok: int
    failed: dict[str, int]
    wall_s: float
    bytes_in: int
    bytes_out: int
    queues: tuple[QueueStat, ...] = ()
    failing_hosts: tuple[tuple[str, int], ...] = ()
    skipped: int = 0  # URLs an earlier run of this output folder had already done
    interrupted: str | None = None  # the signal that stopped the run early
    pool_restarts: int = 0  # transform pools replaced after a worker died

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mb_per_s_in(self) -> float:
        return self.bytes_in / 1e6 / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            images_per_s=round(self.images_per_s, 2), mb_per_s_in=round(self.mb_per_s_in, 3)
        )
        return data

    def save(self, out_dir: Path) -> None:
        text = json.dumps(self.to_json(), indent=2) + "\n"
        (out_dir / REPORT_FILE).write_text(text, encoding="utf-8")


@dataclass(slots=True)
class RunStats:
    """Counts outcomes as they are written."""

    started: float = field(default_factory=time.perf_counter)
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    bytes_in: int = 0
    bytes_out: int = 0
    hosts: Counter[str] = field(default_factory=Counter)  # failures per host, pruned

    @property
    def urls(self) -> int:
        return self.ok + self.failed.total()

    def add(self, outcome: Outcome) -> None:
        self.bytes_in += outcome.bytes_in
        self.bytes_out += outcome.bytes_out
        if outcome.status == "ok":
            self.ok += 1
        else:
            self.failed[outcome.error_kind or "unknown"] += 1
            self._count_host(outcome.url)

    def _count_host(self, url: str) -> None:
        try:
            host = urlsplit(url).hostname or "(no host)"
        except ValueError:
            host = "(invalid URL)"
        self.hosts[host] += 1
        if len(self.hosts) > _MAX_HOSTS:  # millions of dead hosts must not cost memory:
            self.hosts = Counter(dict(self.hosts.most_common(_MAX_HOSTS // 2)))  # keep the top

    def report(self, queues: tuple[QueueStat, ...] = (), **extra: Any) -> Report:
        return Report(
            **extra,
            urls=self.urls,
            ok=self.ok,
            failed=dict(self.failed.most_common()),
            wall_s=round(time.perf_counter() - self.started, 3),
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            queues=queues,
            failing_hosts=tuple(self.hosts.most_common(TOP_HOSTS)),
        )


def format_report(report: Report) -> str:
    """The report as a few aligned lines of text."""
    failed = sum(report.failed.values())
    lines = [f"interrupted by {report.interrupted}: rerun the same command to finish"]
    lines = lines if report.interrupted else []
    if report.skipped:
        lines.append(f"resumed     {report.skipped} URLs were done by an earlier run")
    lines += [
        f"urls        {report.urls}",
        f"ok          {report.ok}",
        f"failed      {failed}",
    ]
    lines += [f"  {kind:<18}{count}" for kind, count in report.failed.items()]
    lines += [
        f"wall time   {report.wall_s:.2f} s",
        f"throughput  {report.images_per_s:.1f} images/s, {report.mb_per_s_in:.2f} MB/s in",
        f"data        {report.bytes_in / 1e6:.1f} MB in, {report.bytes_out / 1e6:.1f} MB out",
    ]
    if report.failing_hosts:
        lines.append("top failing hosts")
        lines += [f"  {host:<30}{count}" for host, count in report.failing_hosts]
    lines += [f"queue       {q.name}: peak {q.peak} of {q.bound}" for q in report.queues]
    if report.pool_restarts:
        lines.append(f"restarts    the transform pool was restarted {report.pool_restarts} times")
    return "\n".join(lines)
