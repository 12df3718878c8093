"""Time from Ctrl-C (SIGINT) to exit of a real run, with downloads and transforms in flight.

    python -m pipeline.bench.interrupt [--urls 2000] [--after 200] [--repeat 5] [--config FILE]

Serves the sample images from a FaultServer on loopback; one URL in a hundred stalls for ten
minutes, so downloads are in flight and must be cut. Runs ``pipeline run`` in a subprocess (the
given config, or the defaults), sends SIGINT once ``--after`` images are written, and times the
exit; each run's exit status should be 130. ``--json`` prints the times as JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .demo import SAMPLES, sample_images
from .faults import FaultServer


def images_written(out: Path) -> int:
    folder = out / "images"
    return sum(1 for _ in folder.rglob("*.jpg")) if folder.exists() else 0


def one_run(urls: Path, out: Path, after: int, config: Path | None) -> tuple[float, int]:
    """SIGINT once ``after`` images are written: seconds from the signal to the exit, and the
    exit status."""
    command = [sys.executable, "-m", "pipeline", "run", str(urls), "--out", str(out), "-q"]
    command += ["--config", str(config)] if config else []
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while images_written(out) < after and proc.poll() is None:
        time.sleep(0.02)  # watching the folder; the run is unaffected, and the clock not started
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    code = proc.wait()
    return time.perf_counter() - sent, code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.interrupt", description=__doc__)
    parser.add_argument("--urls", type=int, default=2000)
    parser.add_argument("--after", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--config", type=Path, default=None, help="default: the built-in defaults")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    images = [p.name for p in sample_images(SAMPLES)]
    runs = []
    server = FaultServer(SAMPLES)  # (entered below: its __enter__ is typed as a StaticServer's)
    with server, tempfile.TemporaryDirectory(prefix="interrupt-") as tmp:
        lines = [
            server.fault(f"stall/600?n={i}")
            if i % 100 == 50
            else f"{server.url(images[i % len(images)])}?n={i}"
            for i in range(args.urls)
        ]
        urls = Path(tmp) / "urls.txt"
        urls.write_text("\n".join(lines) + "\n")
        config = args.config.resolve() if args.config else None
        for i in range(args.repeat):
            took, code = one_run(urls, Path(tmp) / f"out{i}", args.after, config)
            runs.append({"exit_ms": round(took * 1000), "status": code})
            if not args.json:
                sys.stdout.write(
                    f"run {i + 1}: SIGINT -> exit {took * 1000:6.0f} ms, status {code}\n"
                )
    times = [run["exit_ms"] for run in runs]
    if args.json:
        sys.stdout.write(json.dumps({"runs": runs, "max_ms": max(times)}, indent=1) + "\n")
    else:
        sys.stdout.write(f"max {max(times)} ms, mean {sum(times) / len(times):.0f} ms\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
