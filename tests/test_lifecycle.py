"""Lifecycle: Ctrl-C and SIGTERM mid-run, a worker that dies, and resume after kill -9.

The signal tests run the CLI in a subprocess, as a user would, and watch the output folder to
know the run is under way (they wait for files to appear, never for a fixed time).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from helpers import command, descendants, leftover_workers, wait_for
from PIL import Image
from testops import Crash

from pipeline.bench.faults import FaultServer
from pipeline.config import Config, OutputConfig, Thumbnail, TransformConfig
from pipeline.errors import PipelineError
from pipeline.runner import run
from pipeline.sink import read_manifest

ROOT = Path(__file__).resolve().parent.parent

SLOW_CONFIG = """
[download]
workers = 6
read_timeout = {read_timeout}
retries = 0
deadline = 60.0
[transform]
workers = 2
[[transform.ops]]
op = "_sleep"
seconds = {sleep}
[[transform.ops]]
op = "thumbnail"
width = 64
height = 64
"""


def images_written(out: Path) -> int:
    folder = out / "images"
    return sum(1 for p in folder.rglob("*.jpg")) if folder.exists() else 0


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command(*args),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def check_manifest(out: Path) -> list[dict[str, object]]:
    """Whole lines only, no key twice, every ok row's file whole; returns the rows."""
    rows = list(read_manifest(out))
    for path in (out / "manifest").glob("*"):
        assert path.read_bytes().endswith(b"\n") or path.stat().st_size == 0, path
    keys = Counter(row["key"] for row in rows)
    assert not [key for key, n in keys.items() if n > 1], "a URL recorded twice"
    for row in rows:
        if row["status"] == "ok":
            with Image.open(out / str(row["path"])) as image:
                image.load()  # a partial file would fail here
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    return rows


@pytest.fixture(scope="module")
def fault_server(image_dir: Path):
    with FaultServer(image_dir) as server:
        yield server


def slow_run_files(tmp_path: Path, server: FaultServer, image_dir: Path, sleep: float) -> list[str]:
    images = sorted(p.name for p in image_dir.iterdir())
    urls = [f"{server.url(images[i % len(images)])}?n={i}" for i in range(120)]
    urls[3:3] = [server.fault(f"stall/60?n={i}") for i in range(4)]  # downloads that never end
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    (tmp_path / "config.toml").write_text(SLOW_CONFIG.format(sleep=sleep, read_timeout=30.0))
    return urls


@pytest.mark.parametrize(
    ("sig", "code", "lanes"),
    [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 2)],
)
def test_a_signal_stops_the_run_quickly_and_cleanly(
    tmp_path, fault_server, image_dir, sig, code, lanes
):
    urls = slow_run_files(tmp_path, fault_server, image_dir, sleep=0.05)
    out = tmp_path / "out"
    proc = start(["run", "urls.txt", "--out", "out", "-q", "--lanes", str(lanes)], cwd=tmp_path)
    wait_for(lambda: images_written(out) >= 6)
    children = set(descendants(proc.pid))
    assert children, "the run should have worker processes"

    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    took = time.monotonic() - sent

    assert proc.returncode == code, stderr
    assert took < 3.0, f"took {took:.1f} s to exit"
    assert "Traceback" not in stderr
    assert f"interrupted by {sig.name}" in stdout
    assert json.loads((out / "report.json").read_text())["lanes"] == lanes
    # the forkserver and resource tracker see the parent's pipe close and exit on their own
    wait_for(lambda: alive(children) == set(), timeout=2, what="every child process to exit")
    rows = check_manifest(out)
    assert 0 < len(rows) < len(urls)
    assert json.loads((out / "report.json").read_text())["interrupted"] == sig.name

    # the same command again resumes: only what is missing is done, each URL once in the end
    fast = tmp_path / "fast.toml"  # the same ops; the stalled URLs now time out quickly
    fast.write_text(SLOW_CONFIG.format(sleep=0.05, read_timeout=0.5))
    again = start(["run", "urls.txt", "--out", "out", "-q", "--config", "fast.toml"], cwd=tmp_path)
    stdout, stderr = again.communicate(timeout=60)
    assert again.returncode == 0, stderr
    assert f"resumed     {len(rows)} URLs" in stdout
    final = check_manifest(out)
    assert sorted(row["url"] for row in final) == sorted(urls)
    assert not list((out / "manifest").glob("*.part"))


def test_a_second_ctrl_c_aborts_at_once(tmp_path, fault_server, image_dir):
    slow_run_files(tmp_path, fault_server, image_dir, sleep=1.0)  # each image holds a worker 1 s
    out = tmp_path / "out"
    proc = start(["run", "urls.txt", "--out", "out", "-q"], cwd=tmp_path)
    wait_for(lambda: images_written(out) >= 2)
    children = set(descendants(proc.pid))
    proc.send_signal(signal.SIGINT)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # the first signal was handled: a second is not coalesced
    assert "finishing the images in flight" in first
    proc.send_signal(signal.SIGINT)
    sent = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert time.monotonic() - sent < 1.5  # no grace period waited for
    assert "Traceback" not in stderr
    wait_for(lambda: alive(children) == set(), timeout=5, what="every child process to exit")
    check_manifest_lines_whole(out)


def check_manifest_lines_whole(out: Path) -> None:
    rows = list(read_manifest(out))
    assert len({row["key"] for row in rows}) == len(rows)


def test_a_dead_worker_is_replaced_and_its_image_recorded(tmp_path, server, image_dir):
    images = sorted(image_dir.iterdir())
    victim = images[7]
    with Image.open(victim) as image:
        size = image.size
    sizes = Counter(Image.open(p).size for p in images)
    assert sizes[size] == 1, "the victim must be the only image of its size"
    (tmp_path / "urls.txt").write_text("".join(server.url(p.name) + "\n" for p in images))
    config = Config(
        output=OutputConfig(dir=str(tmp_path / "out")),
        transform=TransformConfig(workers=2, ops=(Crash(*size), Thumbnail(64, 64))),
    )

    report = run([tmp_path / "urls.txt"], config)

    rows = {row["url"]: row for row in read_manifest(tmp_path / "out")}
    assert len(rows) == len(images)
    assert rows[server.url(victim.name)]["error_kind"] == "worker_crash"
    assert all(r["status"] == "ok" for u, r in rows.items() if u != server.url(victim.name))
    assert report.pool_restarts >= 1  # a fresh pool took over from the one the victim broke
    assert leftover_workers() == []


def test_kill_9_at_any_point_then_rerun_gives_the_uninterrupted_result(tmp_path, fault_server,
                                                                       image_dir):  # fmt: skip
    images = sorted(p.name for p in image_dir.iterdir())
    urls = [f"{fault_server.url(images[i % len(images)])}?n={i}" for i in range(60)]
    urls.append(fault_server.fault("status/404"))
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    (tmp_path / "config.toml").write_text(
        SLOW_CONFIG.format(sleep=0.03, read_timeout=30.0) + "[input]\nshard_size = 25\n"
    )
    reference = tmp_path / "reference"
    done = start(["run", "urls.txt", "--out", "reference", "-q"], cwd=tmp_path)
    assert done.wait(timeout=120) == 0
    expected = outputs(reference)
    assert len(expected) == 60

    for kill_after in (3, 40):  # in the first shard, and past a sealed one
        out = tmp_path / f"killed-{kill_after}"
        proc = start(["run", "urls.txt", "--out", out.name, "-q"], cwd=tmp_path)
        wait_for(lambda out=out, k=kill_after: images_written(out) >= k)
        children = set(descendants(proc.pid))
        proc.kill()
        proc.wait(timeout=10)
        # workers and the forkserver of a SIGKILLed run must not linger, orphaned
        gone = lambda children=children: alive(children) == set()  # noqa: E731
        wait_for(gone, timeout=5, what="the killed run's processes to exit")
        again = start(["run", "urls.txt", "--out", out.name, "-q"], cwd=tmp_path)
        assert again.wait(timeout=120) == 0
        rows = check_manifest(out)
        assert sorted(row["url"] for row in rows) == sorted(urls), f"killed after {kill_after}"
        assert outputs(out) == expected, f"outputs differ after a kill at {kill_after}"
        assert not list((out / "manifest").glob("*.part"))


def outputs(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in (out / "images").rglob("*.jpg")}


def test_restart_starts_over(tmp_path, server, image_dir):
    names = sorted(p.name for p in image_dir.iterdir())[:5]
    (tmp_path / "urls.txt").write_text("".join(server.url(n) + "\n" for n in names))
    config = Config(output=OutputConfig(dir=str(tmp_path / "out")),
                    transform=TransformConfig(workers=1, ops=(Thumbnail(32, 32),)))  # fmt: skip
    assert run([tmp_path / "urls.txt"], config).ok == 5
    again = run([tmp_path / "urls.txt"], config)
    assert (again.ok, again.skipped) == (0, 5)
    fresh = run([tmp_path / "urls.txt"], config, restart=True)
    assert (fresh.ok, fresh.skipped) == (5, 0)
    assert len(list(read_manifest(tmp_path / "out"))) == 5


def test_a_rerun_with_other_transform_settings_is_refused(tmp_path, server, image_dir):
    (tmp_path / "urls.txt").write_text(server.url(sorted(p.name for p in image_dir.iterdir())[0]))
    config = Config(output=OutputConfig(dir=str(tmp_path / "out")),
                    transform=TransformConfig(workers=1, ops=(Thumbnail(32, 32),)))  # fmt: skip
    run([tmp_path / "urls.txt"], config)
    other = Config(output=config.output, transform=TransformConfig(workers=1, format="png"))
    with pytest.raises(PipelineError) as refused:
        run([tmp_path / "urls.txt"], other)
    assert 'other settings (transform.format was "jpeg", now "png"; transform.ops was [' + (
        "thumbnail(width=32, height=32)], now [exif_transpose, thumbnail(width=256, height=256)])"
    ) in str(refused.value)
