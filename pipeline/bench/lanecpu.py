"""Where a run's CPU goes, per process and per lane thread: ``python -m pipeline.bench.lanecpu``.

Runs the bench's workload (``pipeline bench``'s served JPEGs, loopback) through ``pipeline run``
in a child process, and samples ``/proc/<pid>/task/<tid>/stat`` of its whole process tree every
``--interval`` seconds, keeping each thread's last utime+stime (a thread or a process that ends
keeps its last sample: at most one interval of its CPU is missed). Threads are told apart by
name: a ``sitecustomize`` put first on the run's path gives every Python thread its name in
``/proc/.../comm`` (Python 3.11 leaves them all ``python``). Printed, per image: each lane thread
group's CPU (``download-*`` threads together), the lane's, the coordinator's, the transform
workers', the forkservers' and the whole tree's; and the lane's thread count at its peak.

``--downloads-only`` measures the download client alone, as a lane's threads use it but without
the lane or its pool: ``--download-workers`` threads fetch the workload with one Downloader, and
their CPU per download is printed; ``--profile`` adds where it goes (cProfile, timed by each
thread's own CPU clock, so a wait on the network counts nothing).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..budget import ByteBudget
from ..config import load_config
from ..download import Downloader
from ..records import Job
from ..report import load_report
from .sweep import Bench, BenchOptions, Setting, _child_env
from .workload import Workload, WorkloadServer

TICK = os.sysconf("SC_CLK_TCK")
# every Python thread's name in /proc/<pid>/task/<tid>/comm (PR_SET_NAME = 15, 15 bytes at most)
NAMING = """\
import ctypes, threading
_prctl = ctypes.CDLL(None).prctl
_set_native_id = threading.Thread._set_native_id
def _named(self):
    _set_native_id(self)
    _prctl(15, self.name.encode("utf-8", "replace")[:15], 0, 0, 0)
threading.Thread._set_native_id = _named
"""


@dataclass
class Sample:
    """The last utime+stime (seconds) seen of every thread of the tree, by (pid, tid)."""

    threads: dict[tuple[int, int], tuple[str, float, float]] = field(default_factory=dict)
    kinds: dict[int, str] = field(default_factory=dict)  # pid: coordinator, lane, ...
    lane_threads: dict[int, int] = field(default_factory=dict)  # lane pid: most threads seen


def descendants(root: int) -> dict[int, int]:
    """``root`` and every process below it, each with its parent, from /proc/*/stat."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_bytes()
            except OSError:
                continue
            children[int(stat.rsplit(b")", 1)[1].split()[1])].append(int(entry.name))
    found, todo = {root: 0}, [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, ()):
            found[child] = pid
            todo.append(child)
    return found


def thread_cpu(pid: int) -> dict[int, tuple[str, float, float]]:
    """Every thread of ``pid``: its name, utime and stime in seconds."""
    threads: dict[int, tuple[str, float, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return threads
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_bytes()
        except OSError:
            continue
        name = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode("utf-8", "replace")
        fields = stat.rsplit(b")", 1)[1].split()
        threads[int(tid)] = (name, int(fields[11]) / TICK, int(fields[12]) / TICK)
    return threads


def kind(pid: int, parent: int, root: int, names: set[str]) -> str:
    """What a process of the tree is; a forkserver's children (lanes, workers) share its
    command line, so a server is one whose parent is no forkserver."""
    if pid == root:
        return "coordinator"
    if "owner" in names:  # the lane's owner thread (owner.py)
        return "lane"
    if _served(pid) and not _served(parent):
        return "forkservers, tracker"
    return "transform workers"


def _served(pid: int) -> bool:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"forkserver" in command or b"resource_tracker" in command


def sample(root: int, into: Sample) -> None:
    for pid, parent in descendants(root).items():
        threads = thread_cpu(pid)
        if not threads:
            continue
        names = {name for name, _, _ in threads.values()}
        if into.kinds.get(pid) != "lane":  # a lane is one for good (its threads come and go)
            into.kinds[pid] = kind(pid, parent, root, names)
        if into.kinds[pid] == "lane":
            into.lane_threads[pid] = max(into.lane_threads.get(pid, 0), len(threads))
        for tid, (name, user, system) in threads.items():
            label = "main (sender)" if tid == pid else name
            into.threads[(pid, tid)] = (label, user, system)


def group(name: str) -> str:
    """``download-12`` and ``download-3`` are one group."""
    return re.sub(r"-\d+$", "-*", name)


def run(options: argparse.Namespace) -> tuple[Sample, int, float]:
    """One measured run; what was sampled, the images that came out ok, the wall time."""
    bench_options = BenchOptions(config_path=options.config, images=options.images)
    with Bench(bench_options) as bench, tempfile.TemporaryDirectory("-naming") as naming:
        Path(naming, "sitecustomize.py").write_text(NAMING, "utf-8")
        out = bench._folder()
        setting = Setting(options.download_workers, options.transform_workers)
        config = bench._config_file(out, setting)
        env = _child_env()
        env["PYTHONPATH"] = os.pathsep.join((naming, env["PYTHONPATH"]))
        argv = [sys.executable, "-m", "pipeline", "run", str(bench.urls), "--config", str(config)]
        sampled = Sample()
        started = time.perf_counter()
        child = subprocess.Popen([*argv, "-qq"], env=env)
        done = threading.Event()
        sampler = threading.Thread(target=_sampling, args=(child.pid, sampled, done, options))
        sampler.start()
        code = child.wait()
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        if code != 0:
            raise SystemExit(f"the measured run failed (exit {code})")
        report = load_report(out)
        return sampled, report.ok if report else 0, wall


def _sampling(root: int, into: Sample, done: threading.Event, options: argparse.Namespace) -> None:
    while not done.is_set():
        sample(root, into)
        done.wait(options.interval)


def table(sampled: Sample, images: int, wall: float) -> str:
    per = 1000 / max(images, 1)
    by_kind: dict[str, float] = defaultdict(float)
    lane_groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (pid, _), (name, user, system) in sampled.threads.items():
        by_kind[sampled.kinds[pid]] += user + system
        if sampled.kinds[pid] == "lane":
            lane_groups[group(name)].append((user, system))
    lines = [f"{images} images ok in {wall:.2f} s: {images / wall:.1f} images/s"]
    lines.append(f"lane threads, most at once: {sum(sampled.lane_threads.values())}")
    lines.append("lane CPU per image, by thread:            user+sys     user      sys")
    for name, cpus in sorted(lane_groups.items(), key=lambda kv: -sum(map(sum, kv[1]))):
        user, system = (sum(c[i] for c in cpus) * per for i in (0, 1))
        text = f"{user + system:8.3f} {user:8.3f} {system:8.3f} ms"
        lines.append(f"  {name:<20} x{len(cpus):<4} {text}")
    lines.append("CPU per image, by process:")
    for name, cpu in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {name:<26} {cpu * per:8.3f} ms")
    lines.append(f"  {'whole tree':<26} {sum(by_kind.values()) * per:8.3f} ms")
    return "\n".join(lines)


def downloads(options: argparse.Namespace, workload: Workload | None = None) -> str:
    """The download client alone: thread CPU per download (and its profile, with --profile)."""
    workload = workload or Workload(BenchOptions(config_path=None).cache / "workload")
    files = workload.make()
    config = load_config(options.config).download
    budget = ByteBudget(config.max_buffered_bytes)
    jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
    cpu: list[float] = []
    profiles = [cProfile.Profile(time.thread_time) for _ in range(options.download_workers)]

    def fetch_all(profile: cProfile.Profile) -> None:
        started = time.thread_time()
        if options.profile:
            profile.enable()
        while (job := jobs.get()) is not None:
            size = len(downloader.fetch(job).body)
            budget.hand_over(size)
            budget.release(size)  # as the pool gives a body back
        profile.disable()
        cpu.append(time.thread_time() - started)

    with WorkloadServer(files) as server, Downloader(config, budget) as downloader:
        for n in range(options.images):
            jobs.put(Job(0, n + 1, f"{server.url}{n}.jpg", "lanecpu"))
        threads = [threading.Thread(target=fetch_all, args=(p,)) for p in profiles]
        started = time.perf_counter()
        for thread in threads:
            jobs.put(None)
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    text = (
        f"{options.images} downloads, {len(threads)} threads, {options.images / wall:.0f}/s: "
        f"{sum(cpu) * 1000 / options.images:.3f} ms of thread CPU per download"
        + (" (profiled: slower)" if options.profile else "")
    )
    if not options.profile:
        return text
    out = io.StringIO()
    stats = pstats.Stats(profiles[0], stream=out)
    for profile in profiles[1:]:
        stats.add(profile)
    stats.sort_stats("cumulative").print_stats(40)
    stats.sort_stats("tottime").print_stats(20)
    return text + "\n" + out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.lanecpu", description=__doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--download-workers", type=int, default=16)
    parser.add_argument("--transform-workers", type=int, default=2)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between samples")
    parser.add_argument("--downloads-only", action="store_true", help="the download client alone")
    parser.add_argument("--profile", action="store_true", help="with --downloads-only: cProfile")
    options = parser.parse_args(argv)
    if options.downloads_only:
        sys.stdout.write(downloads(options) + "\n")
        return
    sampled, images, wall = run(options)
    sys.stdout.write(table(sampled, images, wall) + "\n")


if __name__ == "__main__":
    main()
