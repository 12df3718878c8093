"""Observability end to end: the report against the manifest, the bottleneck verdict of slow
stages, `pipeline report`, logging from threads and worker processes, and the progress bars."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import write_images
from test_cli import ROOT, pipeline
from testops import Sleep

from pipeline.bench.server import StaticServer
from pipeline.config import (
    Config,
    DownloadConfig,
    OutputConfig,
    QueuesConfig,
    Thumbnail,
    TransformConfig,
)
from pipeline.report import REPORT_FILE, load_report
from pipeline.runner import run
from pipeline.sink import read_manifest


def config(out: Path, downloads: int, transforms: int, *ops: object) -> Config:
    return Config(
        output=OutputConfig(dir=str(out)),
        download=DownloadConfig(workers=downloads),
        transform=TransformConfig(workers=transforms, ops=(*ops, Thumbnail(64, 64))),  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A served folder with 12 images and one file that is not an image."""
    folder = tmp_path_factory.mktemp("mixed")
    write_images(folder, 12, seed=7)
    (folder / "garbage.jpg").write_bytes(b"this is not a JPEG" * 50)
    return folder


def url_file(path: Path, server: StaticServer, folder: Path) -> list[str]:
    urls = [server.url(p.name) for p in sorted(folder.iterdir())] + [server.url("missing.png")]
    path.write_text("\n".join(urls) + "\n")
    return urls


def test_the_report_agrees_with_the_manifest(tmp_path, mixed):
    with StaticServer(mixed) as server:
        urls = url_file(tmp_path / "urls.txt", server, mixed)
        report = run([tmp_path / "urls.txt"], config(tmp_path / "out", 4, 2))
    rows = list(read_manifest(tmp_path / "out"))
    kinds = Counter(r["error_kind"] for r in rows if r["status"] == "failed")
    assert report.urls == len(rows) == len(urls) and report.ok == len(urls) - 2
    assert report.failed == dict(kinds) == {"http_4xx": 1, "not_image": 1}
    assert report.bytes_in == sum(r["bytes_in"] for r in rows)
    download, transform, write = (report.stage(n) for n in ("download", "transform", "write"))
    assert download.items == len(urls) and download.failed == 1
    assert transform.items == len(urls) - 1 and transform.failed == 1
    assert write.items == len(urls)
    for stage in report.stages:
        assert 0 <= stage.utilization <= 100
        assert stage.p50_ms <= stage.p95_ms <= stage.p99_ms
    for queue in report.queues:
        assert 0 <= queue.mean <= queue.peak <= queue.bound
    assert report.pool_cpu_s > 0 and report.parent_cpu_s > 0
    assert load_report(tmp_path / "out") == report  # report.json holds the same figures


def test_slow_transforms_are_named_the_bottleneck(tmp_path, mixed):
    # one worker that sleeps 0.25 s an image: slower than anything else by far whatever the
    # machine's load, and always at work (a CPU-bound op would share the cores with others)
    nap = 0.25
    with StaticServer(mixed) as server:
        url_file(tmp_path / "urls.txt", server, mixed)
        slow = replace(config(tmp_path / "out", 4, 1, Sleep(nap)), queues=QueuesConfig(fetched=2))
        report = run([tmp_path / "urls.txt"], slow)
    transform = report.stage("transform")
    assert transform.items == 12 + 1 and transform.busy_s >= 12 * nap  # every image slept
    assert transform.p50_ms >= 1000 * nap
    assert report.verdict is not None and report.verdict.stage == "transform", (
        report.verdict,
        transform,
    )


def test_slow_downloads_are_named_the_bottleneck(tmp_path, mixed):
    with StaticServer(mixed, latency=0.15) as server:
        url_file(tmp_path / "urls.txt", server, mixed)
        report = run([tmp_path / "urls.txt"], config(tmp_path / "out", 2, 2))
    assert report.verdict is not None and report.verdict.stage == "download", report.verdict
    assert "download.workers" in report.verdict.advice
    assert report.stage("download").utilization > report.stage("transform").utilization


def test_pipeline_report_reprints_a_run_and_totals_a_resumed_folder(tmp_path, mixed):
    source, out = tmp_path / "urls", tmp_path / "out"
    source.mkdir()
    with StaticServer(mixed) as server:
        first = url_file(source / "a.txt", server, mixed)
        pipeline("run", str(source), "--out", str(out), "-q", cwd=tmp_path)
        saved = (out / REPORT_FILE).read_text()
        again = pipeline("report", str(out), cwd=tmp_path)
        assert again.returncode == 0, again.stderr
        assert f"{len(first)}: {len(first) - 2} ok, 2 failed" in again.stdout
        assert "http_4xx" in again.stdout and "not_image" in again.stdout
        assert "top failing hosts" in again.stdout and "127.0.0.1" in again.stdout
        assert "bottleneck" in again.stdout
        assert f"{len(first)} URLs recorded: {len(first) - 2} ok, 2 failed" in again.stdout
        assert len(runs_listed(again.stdout)) == 1

        (source / "b.txt").write_text(server.url("gone.jpg") + "\n")  # a second run adds one
        pipeline("run", str(source), "--out", str(out), "-q", cwd=tmp_path)
    assert (out / REPORT_FILE).read_text() != saved
    both = pipeline("report", str(out), cwd=tmp_path)
    assert "1: 0 ok, 1 failed" in both.stdout  # the last run
    assert f"{len(first) + 1} URLs recorded: {len(first) - 2} ok, 3 failed" in both.stdout
    runs = runs_listed(both.stdout)  # each run's own report is kept: the first is not lost
    assert [line.split()[2:5] for line in runs] == [
        [str(len(first)), str(len(first) - 2), "2"],
        ["1", "0", "1"],
    ]
    assert len(list((out / "reports").glob("*.json"))) == 2
    missing = pipeline("report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and "not an output folder" in missing.stderr
    assert "Traceback" not in missing.stderr


def runs_listed(text: str) -> list[str]:
    """The lines of ``pipeline report``'s table of runs, one per run."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("runs "))
    return [line for line in lines[start + 1 :] if re.match(r"\s+\d{4}-\d\d-\d\d ", line)]


def test_log_lines_name_their_process_and_thread(tmp_path, mixed):
    with StaticServer(mixed) as server:
        url_file(tmp_path / "urls.txt", server, mixed)
        result = pipeline(
            "run", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "out"), "-vv",
            "--log-file", str(tmp_path / "logs" / "run.log"), cwd=tmp_path,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "logs" / "run.log").read_text()
    # a download thread of a lane process, and a transform worker process
    assert re.search(r"DEBUG lane-\d+/download-\d+ pipeline\.lane: .* http_4xx", log), log
    worker = r"DEBUG transform-[\d:]+/MainThread pipeline\.transform: .* not_image"
    assert re.search(worker, log), log
    assert "lane-0/download-" in result.stderr  # and the terminal gets them too


def run_in_pty(*args: str, cwd: Path, timeout: float = 120) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin, stdout and stderr; return status and output."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env={**os.environ, "TERM": "xterm"},
    )  # fmt: skip
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], deadline - time.monotonic())
            if not ready:
                break
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child has closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.kill() if proc.poll() is None else None
    return proc.wait(), b"".join(chunks).decode("utf-8", "replace")


def test_progress_bars_render_in_a_terminal_and_not_with_quiet(tmp_path):
    status, shown = run_in_pty("demo", "--out", str(tmp_path / "demo"), cwd=ROOT)
    assert status == 0, shown
    total = 44  # the 42 sample images and the demo's two deliberate failures
    assert re.search(rf"downloaded +100% {total}/{total} failed=2 .*\|", shown)
    assert re.search(rf"written +100% {total}/{total} failed=2 .*\| .* jobs=0/", shown)
    assert re.search(r"transformed 100% 42/42 failed=0 .* pool=0/", shown)  # both fail as downloads
    assert f"urls        {total}: 42 ok, 2 failed" in shown  # the report follows the bars

    status, quiet = run_in_pty("demo", "--out", str(tmp_path / "quiet"), "-q", cwd=ROOT)
    assert status == 0, quiet
    assert "downloaded" not in quiet and "url/s" not in quiet
    assert f"urls        {total}: 42 ok, 2 failed" in quiet
