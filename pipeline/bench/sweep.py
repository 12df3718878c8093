"""``pipeline bench``: measure the pipeline on a generated workload, tune it, compare it.

A ``Workload`` of photo-like JPEGs is served on loopback by a ``WorkloadServer`` (its own process,
with an optional latency per answer and bandwidth cap). Every measured run is a child process of
its own (``pipeline run ... -qq``, or ``python -m pipeline.bench.baselines``), started cold like a
user's run, while a sampler thread here adds up the resident memory of its whole process tree (the
run, its forkserver and its pool workers) from ``/proc``. A run's figures come from its
``report.json``.

The sweep runs every ``download.workers`` x ``transform.workers`` (x ``queues.fetched``) setting
and names the fastest; ``--write-config`` writes it into the config file with tomlkit, which keeps
the file's comments and layout. ``--compare`` runs the same workload through the textbook
strategies (``baselines``) and the staged pipeline, with each one's ratio to sequential.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import tomlkit

from ..atomic import write_atomic
from ..config import load_config
from ..errors import PipelineError, require
from ..report import REPORT_FILE, load_report
from ..shape import available_cores, lane_count
from .baselines import STRATEGIES
from .workload import Workload, WorkloadServer

OnRow = Callable[["Row"], None] | None
RUN_TIMEOUT = 3600.0  # seconds: one measured run that takes longer is stopped as broken


# --- memory of a process tree ---------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    """Every process's children, from /proc/*/stat."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        ppid = int(stat.rsplit(b")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (shared pages counted in each)."""
    tree, total, todo = _children(), 0, [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        current = todo.pop()
        todo.extend(tree.get(current, ()))
        try:
            with open(f"/proc/{current}/statm", "rb") as f:
                total += int(f.read().split()[1]) * page
        except OSError:
            continue
    return total


class PeakMemory:
    """Samples ``tree_rss(pid)`` every ``interval`` seconds in a thread; ``peak`` is the maximum."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True, slots=True)
class Measured:
    wall_s: float
    peak_bytes: int
    stdout: str


def measure(argv: Sequence[str]) -> Measured:
    """Run ``argv`` as a child process; its wall time and its tree's peak memory."""
    started = time.perf_counter()
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env()
    ) as child:
        with PeakMemory(child.pid) as memory:
            try:
                out, err = child.communicate(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
                raise PipelineError(f"a benchmark run took over {RUN_TIMEOUT:.0f} s") from None
        wall = time.perf_counter() - started
    if child.returncode != 0:
        last = (err.strip().splitlines() or ["(no message)"])[-1]
        raise PipelineError(f"benchmark run failed (exit {child.returncode}): {last}")
    return Measured(wall, memory.peak, out)


def _child_env() -> dict[str, str]:
    """The environment of a measured run: this package importable, whatever the working folder."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


# --- settings, rows ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    download_workers: int  # per lane
    transform_workers: int  # in all, shared out among the lanes
    queue: int | None = None  # queues.fetched; None keeps the config's
    lanes: int | None = None  # executor.lanes; None keeps the config's

    def label(self) -> str:
        text = f"{self.download_workers} x {self.transform_workers}"
        text = text if self.lanes is None else f"{self.lanes}L {text}"
        return text if self.queue is None else f"{text} q{self.queue}"


@dataclass(frozen=True, slots=True)
class Row:
    """One measured run."""

    name: str  # the strategy, or the setting's label
    images: int  # URLs in the workload
    ok: int
    wall_s: float
    peak_mb: float  # resident memory of the whole process tree, shared pages counted per process
    mb_in: float
    parent_cpu_s: float | None = None  # the staged pipeline reports its own CPU split
    pool_cpu_s: float | None = None
    lane_cpu_s: float | None = None
    lanes: int | None = None
    download_util: float | None = None
    transform_util: float | None = None
    setting: Setting | None = None
    run_s: float | None = None  # the run's own wall time, without the interpreter's start-up
    phases: dict[str, float] = field(default_factory=dict)  # two-phase: each phase's time
    rates: tuple[float, ...] = ()  # a sweep's median row: the images/s of each of its runs

    @property
    def images_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.mb_in / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(images_per_s=round(self.images_per_s, 1), mb_per_s=round(self.mb_per_s, 2))
        return data


# --- the bench ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BenchOptions:
    config_path: Path | None
    images: int = 2000
    latency: float = 0.0  # seconds before each answer
    bandwidth: float = 0.0  # bytes/s per connection, 0 = no cap
    cache: Path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeline"
    min_px: int = 1024
    max_px: int = 1600
    server_cores: int = 0  # cores set apart for the workload server, one process each; 0: none


class Bench:
    """A served workload and a scratch folder; ``staged`` and ``baseline`` measure one run each."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.config = load_config(options.config_path)  # a bad config fails here, in one line
        self.text = options.config_path.read_text("utf-8") if options.config_path else ""
        self.workload = Workload(
            options.cache / "workload", min_px=options.min_px, max_px=options.max_px
        )
        self._stack = contextlib.ExitStack()
        self._runs = itertools.count()

    def __enter__(self) -> Bench:
        files = self.workload.make()
        cores, apart = split_cores(self.options.server_cores)
        server = WorkloadServer(
            files,
            latency=self.options.latency,
            bandwidth=self.options.bandwidth,
            processes=max(1, len(apart)),
            cores=apart,
        )
        self._stack.enter_context(server)
        if apart:  # the measured runs (our children) get the other cores only
            before = os.sched_getaffinity(0)
            os.sched_setaffinity(0, cores)
            self._stack.callback(os.sched_setaffinity, 0, before)
        self.scratch = Path(self._stack.enter_context(tempfile.TemporaryDirectory("-bench")))
        self.urls = self.scratch / "urls.txt"
        self.workload.write_urls(self.urls, server.url, self.options.images)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _folder(self) -> Path:
        """A fresh output folder for the next run; the previous run's is removed."""
        run = next(self._runs)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.scratch / f"out-{run - 1}")
        return self.scratch / f"out-{run}"

    def _config_file(self, out: Path, setting: Setting | None) -> Path:
        doc = tomlkit.parse(self.text)
        put(doc, "output", "dir", str(out))
        if setting is not None:
            apply(doc, setting)
        path = out.with_suffix(".toml")
        path.write_text(tomlkit.dumps(doc), "utf-8")
        return path

    def staged(self, setting: Setting | None = None, name: str | None = None) -> Row:
        out = self._folder()
        config = self._config_file(out, setting)
        argv = [sys.executable, "-m", "pipeline", "run", str(self.urls), "--config", str(config)]
        measured = measure([*argv, "-qq"])
        report = load_report(out)
        if report is None:
            raise PipelineError(f"benchmark run left no {REPORT_FILE} in {out}")
        download, transform = report.stage("download"), report.stage("transform")
        return Row(
            name=name or (setting.label() if setting else "staged"),
            images=report.urls,
            ok=report.ok,
            wall_s=round(measured.wall_s, 3),
            peak_mb=round(measured.peak_bytes / 1e6, 1),
            mb_in=round(report.bytes_in / 1e6, 2),
            parent_cpu_s=report.parent_cpu_s,
            pool_cpu_s=report.pool_cpu_s,
            lane_cpu_s=report.lane_cpu_s,
            lanes=report.lanes,
            download_util=download.utilization if download else None,
            transform_util=transform.utilization if transform else None,
            setting=setting,
            run_s=report.wall_s,
        )

    def baseline(self, strategy: str, setting: Setting | None = None) -> Row:
        out = self._folder()
        config = self._config_file(out, setting)
        argv = [sys.executable, "-m", "pipeline.bench.baselines", strategy, str(self.urls)]
        measured = measure([*argv, "--config", str(config), "--out", str(out)])
        result = json.loads(measured.stdout.strip().splitlines()[-1])
        phases = {k: result[k] for k in ("download_s", "transform_s") if k in result}
        return Row(
            name=strategy,
            images=self.options.images,
            ok=result["ok"],
            wall_s=round(measured.wall_s, 3),
            peak_mb=round(measured.peak_bytes / 1e6, 1),
            mb_in=round(self.options.images * self.workload.mean_bytes() / 1e6, 2),
            phases=phases,
        )


def split_cores(apart: int) -> tuple[frozenset[int], frozenset[int]]:
    """The cores left for the measured runs, and ``apart`` cores set apart for the server."""
    cores = sorted(os.sched_getaffinity(0))
    if not apart:
        return frozenset(cores), frozenset()
    if apart >= len(cores):
        raise PipelineError(
            f"--server-cores {apart}: this process may use only {len(cores)} cores; "
            "leave at least one for the run"
        )
    return frozenset(cores[:-apart]), frozenset(cores[-apart:])


def put(doc: Any, section: str, key: str, value: Any) -> None:
    """Set ``section.key`` in a tomlkit document, keeping the comments around it."""
    if section not in doc:
        doc[section] = tomlkit.table()
    doc[section][key] = value


def apply(doc: Any, setting: Setting) -> None:
    """Put ``setting``'s worker counts (and queue size, if any) into a tomlkit document."""
    put(doc, "download", "workers", setting.download_workers)
    put(doc, "transform", "workers", setting.transform_workers)
    if setting.queue is not None:
        put(doc, "queues", "fetched", setting.queue)
    if setting.lanes is not None:
        put(doc, "executor", "lanes", setting.lanes)


def median(runs: Sequence[Row]) -> Row:
    """The middle run by images/s: steadier than one run on a noisy machine, fairer than a best."""
    return sorted(runs, key=lambda r: r.images_per_s)[(len(runs) - 1) // 2]


def sweep(
    bench: Bench, settings: Sequence[Setting], repeat: int = 1, on_row: OnRow = None
) -> list[Row]:
    """Each setting ``repeat`` times; its median run."""
    rows = []
    for setting in settings:
        runs = [bench.staged(setting) for _ in range(repeat)]
        row = replace(median(runs), rates=tuple(round(r.images_per_s, 2) for r in runs))
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def compare(
    bench: Bench, setting: Setting | None = None, repeat: int = 1, on_row: OnRow = None
) -> list[Row]:
    """Every strategy on the same workload and workers, ``repeat`` times each; sequential first."""
    rows = []
    for strategy in (*STRATEGIES, "staged"):
        runs = [
            bench.staged(setting, name="staged")
            if strategy == "staged"
            else bench.baseline(strategy, setting)
            for _ in range(repeat)
        ]
        rows.append(median(runs))
        if on_row is not None:
            on_row(rows[-1])
    return rows


@dataclass(frozen=True, slots=True)
class Overlap:
    """How well the staged run overlapped its stages: its time against the slower stage's alone."""

    staged_s: float
    stage: str  # the slower stage: "download" or "transform"
    alone_s: float  # that stage run alone (two-phase's phase)
    shared_s: float = 0.0  # coordinator + lanes' CPU, spread on the cores the transforms also use

    @property
    def ratio(self) -> float:
        return self.staged_s / self.alone_s if self.alone_s > 0 else 0.0

    @property
    def floor_s(self) -> float:
        """The shortest the staged run can be when the transforms already fill every core."""
        return self.alone_s + (self.shared_s if self.stage == "transform" else 0.0)

    @property
    def floor_ratio(self) -> float:
        return self.staged_s / self.floor_s if self.floor_s > 0 else 0.0


def overlap(rows: Sequence[Row]) -> Overlap | None:
    """From a ``compare``: the two-phase run timed each stage alone, the staged run both at once."""
    phased = next((r for r in rows if r.phases), None)
    staged = next((r for r in rows if r.run_s is not None), None)
    if phased is None or staged is None or staged.run_s is None:
        return None
    stage = max(("download", "transform"), key=lambda name: phased.phases[f"{name}_s"])
    hand_off = (staged.parent_cpu_s or 0.0) + (staged.lane_cpu_s or 0.0)
    shared = hand_off / available_cores()
    return Overlap(staged.run_s, stage, phased.phases[f"{stage}_s"], round(shared, 3))


def best(rows: Sequence[Row]) -> Row:
    """The fastest run; among runs within 3% of it, the one with the fewest workers."""
    top = max(r.images_per_s for r in rows)
    close = [r for r in rows if r.images_per_s >= 0.97 * top and r.setting is not None]
    if not close:
        return max(rows, key=lambda r: r.images_per_s)
    return min(
        close,
        key=lambda r: (
            (r.setting.lanes or 1) * r.setting.download_workers + r.setting.transform_workers
            if r.setting
            else 0,
            -r.images_per_s,
        ),
    )


@dataclass(frozen=True, slots=True)
class Choice:
    """What ``--write-config`` writes: a setting (0 where auto is as good), or None and why."""

    setting: Setting | None
    reason: str


def choose(rows: Sequence[Row], cores: int) -> Choice:
    """The best setting, if it won beyond the noise: its slowest run faster than the fastest run
    of every other setting (so ``--repeat`` >= 2). ``transform.workers`` (and the lanes) stay 0,
    auto, when auto's value for ``cores`` won."""
    swept = [r for r in rows if r.setting is not None]
    if len(swept) < 2:
        return Choice(None, "one setting measured, nothing to beat")
    if any(len(r.rates) < 2 for r in swept):
        return Choice(None, "one run per setting cannot tell a winner from the noise (--repeat 3)")
    top = best(swept)
    rival = max((r for r in swept if r is not top), key=lambda r: max(r.rates))
    if min(top.rates) <= max(rival.rates):
        return Choice(
            None,
            f"{top.name} ({_spread(top)}) and {rival.name} ({_spread(rival)} images/s) are "
            "within the noise of each other",
        )
    setting = top.setting
    assert setting is not None
    workers = setting.transform_workers
    if workers == cores:  # what auto (0) gives on this machine: keep it auto, for any machine
        setting = replace(setting, transform_workers=0)
    if setting.lanes is not None and setting.lanes == lane_count(0, workers, cores):
        setting = replace(setting, lanes=0)
    return Choice(setting, f"{top.name}: every run faster than any run of another setting")


def _spread(row: Row) -> str:
    return f"{min(row.rates):.1f}-{max(row.rates):.1f}"


def write_config(path: Path, setting: Setting) -> None:
    """Write ``setting`` into the config file at ``path``, keeping its comments and layout."""
    doc = tomlkit.parse(path.read_text("utf-8"))
    apply(doc, setting)
    write_atomic(path, tomlkit.dumps(doc).encode("utf-8"), root=path.parent)


# --- output ----------------------------------------------------------------------------------


def header(sweep_table: bool) -> str:
    first = "setting" if sweep_table else "strategy"
    text = f"{first:<16}{'images/s':>9}{'wall s':>8}{'MB/s':>7}{'peak MB':>9}"
    if sweep_table:
        text += f"{'lanes':>6}{'coord ms':>9}{'lane ms':>8}{'pool ms':>8}{'tf busy':>8}"
    return text + ("" if sweep_table else f"{'vs sequential':>15}")


def format_row(row: Row, sweep_table: bool, sequential: Row | None = None) -> str:
    text = (
        f"{row.name:<16}{row.images_per_s:>9.1f}{row.wall_s:>8.2f}{row.mb_per_s:>7.1f}"
        f"{row.peak_mb:>9.0f}"
    )
    if sweep_table:  # CPU per image: what says whether a process multiplies with the cores
        per = 1000 / row.ok if row.ok else 0.0
        text += (
            f"{row.lanes or '-':>6}{_ms(row.parent_cpu_s, per):>9}{_ms(row.lane_cpu_s, per):>8}"
            f"{_ms(row.pool_cpu_s, per):>8}{_opt(row.transform_util, '%'):>8}"
        )
    elif sequential is not None and sequential.images_per_s > 0:
        text += f"{row.images_per_s / sequential.images_per_s:>14.2f}x"
    if row.ok < row.images:
        text += f"  ({row.images - row.ok} failed)"
    return text


def _ms(seconds: float | None, per: float) -> str:
    return "-" if seconds is None else f"{seconds * per:.2f}"


def _opt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}%" if unit == "%" else f"{value:.1f}s"


def plot(rows: Sequence[Row], path: Path) -> None:
    """Images/s against download workers, one line per transform worker count."""
    require("matplotlib", "plot", "--plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    by_transform: dict[tuple[int, int | None, int | None], list[Row]] = {}
    for row in rows:
        if row.setting is not None:
            key = (row.setting.transform_workers, row.setting.queue, row.setting.lanes)
            by_transform.setdefault(key, []).append(row)
    for (transform, queue, lanes), group in sorted(by_transform.items(), key=lambda kv: str(kv[0])):
        group.sort(key=lambda r: r.setting.download_workers if r.setting else 0)
        label = (
            f"transform.workers = {transform}"
            + (f", queues.fetched = {queue}" if queue else "")
            + (f", lanes = {lanes}" if lanes else "")
        )
        xs = [r.setting.download_workers for r in group if r.setting]
        axes.plot(xs, [r.images_per_s for r in group], marker="o", label=label)
    axes.set_xscale("log", base=2)
    ticks = sorted({r.setting.download_workers for r in rows if r.setting})
    axes.set_xticks(ticks, [str(t) for t in ticks])
    axes.minorticks_off()
    axes.set_xlabel("download workers (threads per lane)")
    axes.set_ylabel("images/s")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend()
    axes.set_title("pipeline bench: throughput by worker counts")
    figure.tight_layout()
    try:
        figure.savefig(path, dpi=100)
    except OSError as exc:
        raise PipelineError(f"{path}: cannot write the plot: {exc.strerror}") from None
    finally:
        plt.close(figure)


def default_transform_workers() -> list[int]:
    cores = available_cores()
    return sorted({max(1, cores // 2), cores})


def settings_of(
    download: Sequence[int],
    transform: Sequence[int],
    queues: Sequence[int] | None,
    lanes: Sequence[int] | None = None,
) -> list[Setting]:
    return [
        Setting(d, t, q, n)
        for n in (lanes or [None])  # type: ignore[list-item]
        for t in transform
        for d in download
        for q in (queues or [None])  # type: ignore[list-item]
    ]
