"""What slow servers sending large bodies cost a run in memory: the peak RSS of its process tree.

    python -m pipeline.bench.buffered --urls 200 --mb 19 --seconds 15 [--budget BYTES]

Serves one body of ``--mb`` MB (random bytes: the transform refuses it at once, so the figure is
the downloads' and the hand-off's) from a loopback FaultServer, each URL spread over
``--seconds``, runs ``python -m pipeline run`` on them with the default config (plus
``download.max_buffered_bytes`` when ``--budget`` is given), samples the RSS of the run and
every process under it 10 times a second, and prints the peak of the sum. ``--code DIR`` runs
the pipeline found in DIR (another checkout) instead of this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .faults import FaultServer


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and every process under it, now."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        tree.update(children)
        frontier.extend(children)
    return sum(_rss(pid) for pid in tree)


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(folder: Path, args: argparse.Namespace) -> dict[str, object]:
    (folder / "www").mkdir()
    (folder / "www" / "body.bin").write_bytes(os.urandom(int(args.mb * 1_000_000)))
    config = f"[download]\nmax_buffered_bytes = {args.budget}\n" if args.budget else ""
    (folder / "config.toml").write_text(config)
    env = dict(os.environ, PYTHONPATH=args.code) if args.code else None
    server = FaultServer(folder / "www")
    with server:
        urls = [server.fault(f"slow-body/{args.seconds}/body.bin?n={i}") for i in range(args.urls)]
        (folder / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
        started, peak = time.monotonic(), 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "out", "-q"],
            cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.1)  # a sampling interval, not a synchronisation
        wall = time.monotonic() - started
    report = json.loads((folder / "out" / "report.json").read_text())
    bodies = [q["peak"] for q in report.get("queues", ()) if q["name"] == "bodies_kb"]
    return {
        "exit": proc.returncode,
        "peak_tree_rss_mb": round(peak / 1e6),
        "wall_s": round(wall, 1),
        "rows": report["urls"],
        "bodies_peak_mb": round(bodies[0] / 1000) if bodies else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.buffered")
    parser.add_argument("--urls", type=int, default=200)
    parser.add_argument("--mb", type=float, default=19.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--budget", type=int, default=0, help="download.max_buffered_bytes")
    parser.add_argument("--code", help="run the pipeline of this checkout")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        sys.stdout.write(json.dumps(measure(Path(folder), args)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
