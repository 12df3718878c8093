"""What each thread of a lane costs: a W1-like run (one lane, loopback), its lane's threads read
from /proc at the end.

    python -m pipeline.bench.lanethreads [--images 2000] [--download-workers 16]
                                         [--transform-workers 2]

Runs ``pipeline run`` on the bench's workload (the same images and server as ``pipeline bench``)
with one lane, samples ``/proc/<lane>/task/*/stat`` (utime + stime) every 0.1 s, and prints, from
the last sample before the lane exits, each thread's CPU per image by its name
(``/proc/.../comm``: the lane names its threads, stages.label_thread), the lane's most threads
at once, and the run's coordinator / lane / pool CPU per image from its report. The lane is the
descendant of the run with the most threads. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections import Counter

from ..report import load_report
from .sweep import Bench, BenchOptions, Setting, _child_env

_TICK = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as file:
                kids += [int(p) for p in file.read().split()]
    except OSError:
        pass
    return kids


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        kids = _children(todo.pop())
        found += kids
        todo += kids
    return found


def threads_of(pid: int) -> dict[int, tuple[str, float]]:
    """Each thread of ``pid``: its name and its CPU seconds so far."""
    seen: dict[int, tuple[str, float]] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return seen
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as file:
                name, rest = file.read().split(" (", 1)[1].rsplit(")", 1)
        except (OSError, IndexError, ValueError):
            continue
        fields = rest.split()
        seen[int(task)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
    return seen


class Sampler:
    """Samples the run's processes until it ends: each thread's CPU at its last sample (a thread
    that has left keeps its last figure), per process; the lane is the one with the most threads."""

    def __init__(self, run_pid: int) -> None:
        self.run_pid = run_pid
        self.seen: dict[int, dict[int, tuple[str, float]]] = {}  # pid: tid: (name, cpu)
        self.most: dict[int, int] = {}  # pid: its most threads at once
        self.done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler")

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self.done.wait(0.1):
            for pid in _descendants(self.run_pid):
                sample = threads_of(pid)
                self.seen.setdefault(pid, {}).update(sample)
                self.most[pid] = max(self.most.get(pid, 0), len(sample))

    def lane(self) -> tuple[int, dict[int, tuple[str, float]]]:
        """The lane's most threads at once, and its threads."""
        pid = max(self.most, key=lambda p: self.most[p], default=0)
        return self.most.get(pid, 0), self.seen.get(pid, {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.lanethreads")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--download-workers", type=int, default=16)
    parser.add_argument("--transform-workers", type=int, default=2)
    args = parser.parse_args(argv)
    setting = Setting(args.download_workers, args.transform_workers, lanes=1)
    with Bench(BenchOptions(config_path=None, images=args.images)) as bench:
        out = bench._folder()
        config = bench._config_file(out, setting)
        argv_run = [sys.executable, "-m", "pipeline", "run", str(bench.urls), "-qq"]
        child = subprocess.Popen([*argv_run, "--config", str(config)], env=_child_env())
        with child, Sampler(child.pid) as sampler:
            child.wait()
        report = load_report(out)
    if report is None or child.returncode != 0:
        sys.stderr.write(f"the run failed (exit {child.returncode})\n")
        return 1
    per = 1000 / max(1, report.urls)
    cpu_of: dict[str, float] = {}
    count: Counter[str] = Counter()
    most, threads = sampler.lane()
    for name, cpu in threads.values():
        name = name.rstrip("0123456789") + "N" if name.startswith("download-") else name
        cpu_of[name] = cpu_of.get(name, 0.0) + cpu
        count[name] += 1
    say = sys.stdout.write
    say(f"{report.urls} images, {report.ok} ok, {report.wall_s:.1f} s\n")
    say(f"coordinator {report.parent_cpu_s * per:.3f}  lane {report.lane_cpu_s * per:.3f}  "
        f"pool {report.pool_cpu_s * per:.3f}  ms CPU/image\n")  # fmt: skip
    say(f"lane threads: {most} at most at once, {len(threads)} in all\n")
    for name, cpu in sorted(cpu_of.items(), key=lambda item: -item[1]):
        say(f"  {name:<16} x{count[name]:<3} {cpu * per:8.3f} ms CPU/image\n")
    say(f"  {'(all)':<16} x{len(threads):<3} {sum(cpu_of.values()) * per:8.3f} ms CPU/image\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
