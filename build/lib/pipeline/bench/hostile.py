"""A run against hostile servers, timed against the same run with none: what slow servers cost.

    python -m pipeline.bench.hostile [--urls 1000] [--faults 0.3] [--config FILE]

Serves the benchmark workload (photo-like JPEGs) from a FaultServer on loopback, and runs
``pipeline run`` twice on ``--urls`` URLs: clean, then with ``--faults`` of them (spread through
the list) replaced by the bad servers of the open web, in equal parts:

    404, 500 and 503 answers; a body cut short, and a connection reset mid-body; HTML sent as
    image/jpeg; headers after 30 s; headers a byte every 30 s; a body a byte every 40 s; and a
    whole image whose body takes 40 s (a slow server that succeeds)

Each run uses the given config (the defaults when none). The target: the faulty run takes at
most the clean run + ``download.deadline`` + 15 s, because no slow server holds a worker's place
for longer than ``download.straggler_after``. Prints both wall times, the failed kinds and the
faulty run's stragglers line; ``--json`` prints them as JSON.
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
from typing import Any

from ..config import load_config
from .faults import FaultServer
from .workload import Workload

SLOW = ("stall/30", "slow-headers/30", "drip/40", "slow-body/40/{image}")
FAULTS = (
    "status/404", "status/500", "status/503", "truncated/{image}", "reset/{image}",
    "html-as-jpeg", *SLOW,
)  # fmt: skip


def urls(server: FaultServer, images: list[str], count: int, share: float) -> list[str]:
    """``count`` image URLs, each distinct; with ``share`` of them faults, evenly spread."""
    faulty = round(count * share)
    every = count / faulty if faulty else 0.0
    chosen = {round(i * every) for i in range(faulty)}
    out = []
    for i in range(count):
        image = images[i % len(images)]
        if i in chosen:
            route = FAULTS[len([c for c in chosen if c < i]) % len(FAULTS)]
            out.append(f"{server.fault(route.format(image=image))}?n={i}")
        else:
            out.append(f"{server.url(image)}?n={i}")
    return out


def run(folder: Path, name: str, lines: list[str], config: Path | None) -> dict[str, Any]:
    """``pipeline run`` on ``lines``; its report, and the wall time seen from outside."""
    (folder / f"{name}.txt").write_text("".join(f"{line}\n" for line in lines))
    command = [sys.executable, "-m", "pipeline", "run", f"{name}.txt", "--out", f"out-{name}"]
    command += ["-q"] + (["--config", str(config)] if config else [])
    started = time.monotonic()
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{name} run failed (exit {done.returncode}): {done.stderr.strip()}")
    report = json.loads((folder / f"out-{name}" / "report.json").read_text())
    lines_out = done.stdout.splitlines()
    first = next((i for i, line in enumerate(lines_out) if line.startswith("stragglers")), None)
    stragglers = [] if first is None else lines_out[first : first + 1]
    if first is not None:
        for line in lines_out[first + 1 :]:
            if not line.startswith(" "):
                break
            stragglers.append(line)
    return {"wall_s": round(wall, 2), "report": report, "stragglers_lines": stragglers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.hostile", description=__doc__)
    parser.add_argument("--urls", type=int, default=1000)
    parser.add_argument("--faults", type=float, default=0.3)
    parser.add_argument("--config", type=Path, default=None, help="default: the built-in defaults")
    parser.add_argument("--json", action="store_true")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeline"
    parser.add_argument("--cache", type=Path, default=cache)
    args = parser.parse_args(argv)
    deadline = load_config(args.config).download.deadline
    workload = Workload(args.cache / "workload")
    images = [p.name for p in workload.make()]
    srv = FaultServer(workload.folder)
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp, srv:
        folder = Path(tmp)
        config = args.config.resolve() if args.config else None
        clean = run(folder, "clean", urls(srv, images, args.urls, 0.0), config)
        faulty = run(folder, "faulty", urls(srv, images, args.urls, args.faults), config)
    bound = clean["wall_s"] + deadline + 15
    result = {
        "urls": args.urls,
        "faults": args.faults,
        "clean_s": clean["wall_s"],
        "faulty_s": faulty["wall_s"],
        "bound_s": round(bound, 2),
        "within": faulty["wall_s"] <= bound,
        "failed": faulty["report"]["failed"],
        "ok": faulty["report"]["ok"],
        "stragglers": faulty["report"].get("stragglers"),
    }
    say = sys.stdout.write
    if args.json:
        say(json.dumps(result, indent=1) + "\n")
        return 0
    verdict = "within" if result["within"] else "OVER"
    say(
        f"clean       {args.urls} URLs in {clean['wall_s']:.1f} s\n"
        f"faulty      {args.urls} URLs, {args.faults:.0%} faults, in {faulty['wall_s']:.1f} s "
        f"({result['ok']} ok)\n"
        f"target      clean + download.deadline + 15 s = {bound:.1f} s: {verdict}\n"
        "failed      " + ", ".join(f"{k} {n}" for k, n in result["failed"].items()) + "\n"
    )
    for line in faulty["stragglers_lines"]:
        say(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
