"""Wall time of 1,000 URLs with ~30% faults against 1,000 clean URLs, on loopback.

    .venv/bin/python benchmarks/faults.py [--urls 1000] [--deadline 5] [--workers 16]

Serves ``data/images`` with the fault server (every URL distinct by a query string), runs the
pipeline with ``config.toml``'s settings (deadline and workers as given), and prints both runs.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.bench.faults import FaultServer
from pipeline.config import load_config, with_overrides
from pipeline.runner import run

ROOT = Path(__file__).resolve().parent.parent
FAULTS = [
    "status/404", "status/503", "garbage", "html-as-jpeg", "truncated/{image}", "reset/{image}",
    "redirect-loop/0", "bomb.png", "huge", "gzip-bomb", "retry-after/1", "drip/0.1",
]  # fmt: skip


def url_lists(server: FaultServer, images: list[str], count: int) -> tuple[list[str], list[str]]:
    clean, faulty = [], []
    for i in range(count):
        image = images[i % len(images)]
        clean.append(f"{server.url(image)}?n={i}")
        if i % 10 < 3:
            route = FAULTS[(i // 10) % len(FAULTS)].format(image=image)
            faulty.append(f"{server.fault(route)}?n={i}")
        else:
            faulty.append(clean[-1])
    return clean, faulty


def timed_run(urls: list[str], folder: Path, args: argparse.Namespace) -> tuple[float, str]:
    (folder / "urls.txt").write_text("\n".join(urls) + "\n")
    config = load_config(ROOT / "config.toml")
    config = with_overrides(config, "output", dir=str(folder / "out"))
    config = with_overrides(config, "download", workers=args.workers, deadline=args.deadline,
                            retry_after_max=min(1.0, args.deadline / 2), backoff=0.1)  # fmt: skip
    started = time.perf_counter()
    report = run([folder / "urls.txt"], config)
    failed = ", ".join(f"{kind} {n}" for kind, n in report.failed.items())
    return (
        time.perf_counter() - started,
        f"ok {report.ok}, failed {sum(report.failed.values())} ({failed})",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=1000)
    parser.add_argument("--deadline", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    images = sorted(p.name for p in (ROOT / "data" / "images").iterdir())
    with FaultServer(ROOT / "data" / "images") as server, tempfile.TemporaryDirectory() as tmp:
        clean, faulty = url_lists(server, images, args.urls)
        for name, urls in (("clean", clean), ("faulty", faulty)):
            folder = Path(tmp) / name
            folder.mkdir()
            wall, summary = timed_run(urls, folder, args)
            print(f"{name:7} {len(urls)} URLs  {wall:6.2f} s  {summary}")


if __name__ == "__main__":
    main()
