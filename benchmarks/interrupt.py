"""Time from Ctrl-C (SIGINT) to exit of a real run, and what the rerun then does.

    .venv/bin/python benchmarks/interrupt.py [--urls 2000] [--after 200] [--repeat 5]

Serves ``data/images`` on loopback with the fault server; one URL in a hundred stalls forever (so
downloads are in flight and must be cut). Runs ``pipeline run`` with ``config.toml`` in a
subprocess, sends SIGINT once ``--after`` images are written, and times the exit.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.bench.faults import FaultServer

ROOT = Path(__file__).resolve().parent.parent


def images_written(out: Path) -> int:
    folder = out / "images"
    return sum(1 for _ in folder.rglob("*.jpg")) if folder.exists() else 0


def one_run(urls: Path, out: Path, after: int) -> tuple[float, int]:
    command = [sys.executable, "-m", "pipeline", "run", str(urls), "--out", str(out), "-q",
               "--config", str(ROOT / "config.toml")]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while images_written(out) < after:
        time.sleep(0.005)  # watching the folder; the run is unaffected
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    code = proc.wait()
    return time.perf_counter() - sent, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--after", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    images = sorted(p.name for p in (ROOT / "data" / "images").iterdir())
    with FaultServer(ROOT / "data" / "images") as server, tempfile.TemporaryDirectory() as tmp:
        lines = [
            server.fault(f"stall/600?n={i}")
            if i % 100 == 50
            else f"{server.url(images[i % len(images)])}?n={i}"
            for i in range(args.urls)
        ]
        urls = Path(tmp) / "urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        times = []
        for i in range(args.repeat):
            took, code = one_run(urls, Path(tmp) / f"out{i}", args.after)
            times.append(took)
            print(f"run {i + 1}: SIGINT -> exit {took * 1000:6.0f} ms, exit status {code}")
        print(f"max {max(times) * 1000:.0f} ms, mean {sum(times) / len(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
