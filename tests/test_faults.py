"""Every fault of the real internet, through the whole pipeline: each URL gets its documented kind.

One run (module fixture) downloads every fault route of a real loopback FaultServer; each test
then checks one row. The run's wall time is bounded by the configured deadline.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.bench.faults import FaultServer
from pipeline.config import Config, DownloadConfig, OutputConfig, Thumbnail, TransformConfig
from pipeline.report import format_report
from pipeline.runner import run
from pipeline.sink import read_manifest

DEADLINE = 2.0
DOWNLOAD = DownloadConfig(
    workers=12,
    connect_timeout=1.0,
    read_timeout=0.5,
    deadline=DEADLINE,
    retries=2,
    backoff=0.05,
    backoff_max=0.2,
    backoff_jitter=0.05,
    retry_after_max=0.3,
    max_redirects=3,
    max_bytes=5_000_000,
)

# fault route -> the error kind its row must carry (None: it must succeed)
FAULTS: dict[str, str | None] = {
    "status/404": "http_4xx",
    "status/500": "http_5xx",
    "status/503": "http_5xx",
    "retry-after/1": "http_4xx",  # 429 every time: retried (Retry-After capped), then recorded
    "flaky/t1/2/{image}": None,  # two 503s, then the image: the retries win
    "reset/{image}": "truncated",
    "truncated/{image}": "truncated",
    "html-as-jpeg": "not_image",
    "garbage": "not_image",
    "stall/30": "timeout",
    "slow-headers/0.1": "deadline",
    "drip/0.1": "deadline",
    "redirect-loop/0": "too_many_redirects",
    "redirect-scheme": "invalid_url",
    "huge": "too_large",
    "endless": "too_large",
    "gzip-bomb": "too_large",
    "bomb.png": "decompression_bomb",
}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def fault_server(image_dir: Path) -> Iterator[FaultServer]:
    with FaultServer(image_dir) as server:
        yield server


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory, fault_server, image_dir):
    image = sorted(p.name for p in image_dir.glob("*.jpg"))[0]
    urls = {fault_server.fault(route.format(image=image)): kind for route, kind in FAULTS.items()}
    urls[f"http://127.0.0.1:{closed_port()}/a.jpg"] = "connect"
    urls["http://:80/a.jpg"] = "invalid_url"
    urls[fault_server.url("")] = "not_image"  # an HTML listing: Content-Type text/html
    urls[fault_server.url(image)] = None
    tmp = tmp_path_factory.mktemp("faults")
    (tmp / "urls.txt").write_text("\n".join(urls) + "\n")
    config = Config(
        output=OutputConfig(dir=str(tmp / "out")),
        download=DOWNLOAD,
        transform=TransformConfig(workers=2, ops=(Thumbnail(64, 64),)),
    )
    started = time.monotonic()
    report = run([tmp / "urls.txt"], config)
    wall = time.monotonic() - started
    rows = {row["url"]: row for row in read_manifest(tmp / "out")}
    return urls, rows, report, wall


def test_the_run_ends_within_a_bound_derived_from_the_deadline(fault_run):
    urls, rows, report, wall = fault_run
    # every download is cut at DEADLINE; downloads run in parallel, so the run is not their sum
    assert wall < DEADLINE + 3.0
    assert len(rows) == len(urls) == report.urls


def test_every_url_has_exactly_one_row(fault_run):
    urls, rows, report, _ = fault_run
    assert set(rows) == set(urls)
    assert report.ok + sum(report.failed.values()) == len(urls)


@pytest.mark.parametrize("route", sorted(FAULTS))
def test_each_fault_is_recorded_with_its_kind(fault_run, fault_server, image_dir, route):
    urls, rows, _, _ = fault_run
    url = next(u for u in urls if u.startswith(fault_server.fault(route.split("{")[0])))
    row = rows[url]
    assert row["error_kind"] == FAULTS[route], row
    assert row["status"] == ("ok" if FAULTS[route] is None else "failed")
    if row["status"] == "failed":
        assert row["error"] and "\n" not in row["error"]
        assert row["path"] is None


@pytest.mark.parametrize("route", ["slow-headers/0.1", "drip/0.1"])
def test_the_deadline_fires_within_a_second_of_itself(fault_run, fault_server, route):
    _, rows, _, _ = fault_run
    row = rows[fault_server.fault(route)]
    assert DEADLINE * 1000 <= row["download_ms"] <= DEADLINE * 1000 + 1000


def test_a_refused_connection_and_a_bad_url_are_recorded(fault_run):
    urls, rows, _, _ = fault_run
    kinds = {rows[u]["error_kind"] for u in urls if urls[u] in ("connect", "invalid_url")}
    assert kinds == {"connect", "invalid_url"}


def rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.parametrize("route", ["gzip-bomb", "huge", "endless"])
def test_memory_stays_bounded_on_bombs_and_huge_bodies(tmp_path, fault_server, route):
    (tmp_path / "urls.txt").write_text(
        "".join(f"{fault_server.fault(route)}?{i}\n" for i in range(8))
    )
    config = Config(
        output=OutputConfig(dir=str(tmp_path / "out")),
        download=DownloadConfig(workers=8, max_bytes=5_000_000, retries=0),
        transform=TransformConfig(workers=1),
    )
    baseline, peak, done = rss(), [0], threading.Event()

    def sample() -> None:  # samples RSS while the run goes; not a synchronisation
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        report = run([tmp_path / "urls.txt"], config)
    finally:
        done.set()
        sampler.join()
    assert report.failed == {"too_large": 8}
    # 8 parallel downloads capped at 5 MB each; uncapped, each would be 256 MB to 10 GB
    assert peak[0] - baseline < 120 * 2**20


MIXED_FAULTS = [
    "status/404",
    "status/503",
    "garbage",
    "html-as-jpeg",
    "truncated/{image}",
    "reset/{image}",
    "redirect-loop/0",
    "bomb.png",
    "huge",
    "drip/0.1",
]


def test_a_mixed_run_of_1000_urls_loses_nothing(tmp_path, fault_server, image_dir):
    images = sorted(p.name for p in image_dir.iterdir())
    good, urls = [], []
    for i in range(1000):
        image = images[i % len(images)]
        if i % 10 < 3:  # 30% faults, of every kind in turn
            route = MIXED_FAULTS[(i // 10) % len(MIXED_FAULTS)].format(image=image)
            urls.append(f"{fault_server.fault(route)}?n={i}")
        elif i % 10 == 3:  # fails once, then succeeds on its retry: a good URL
            urls.append(fault_server.fault(f"flaky/mixed{i}/1/{image}"))
            good.append(urls[-1])
        else:
            urls.append(f"{fault_server.url(image)}?n={i}")
            good.append(urls[-1])
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    config = Config(
        output=OutputConfig(dir=str(tmp_path / "out")),
        download=replace(DOWNLOAD, workers=16, retries=1),
        transform=TransformConfig(workers=2, ops=(Thumbnail(64, 64),)),
    )

    report = run([tmp_path / "urls.txt"], config)

    rows = list(read_manifest(tmp_path / "out"))
    assert sorted(r["url"] for r in rows) == sorted(urls), "one row per input URL, no more"
    assert sorted(r["url"] for r in rows if r["status"] == "ok") == sorted(good)
    assert report.ok == len(good) and report.urls == 1000
    assert report.failing_hosts == (("127.0.0.1", 1000 - len(good)),)
    text = format_report(report)
    for kind in ("http_4xx", "http_5xx", "not_image", "truncated", "too_large", "deadline"):
        assert kind in report.failed and kind in text
    assert "127.0.0.1" in text
