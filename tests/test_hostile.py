"""Hostile servers, hostile files, full disks: nothing may crash, stall, hang or escape a run.

Each case runs the real command (``python -m pipeline run``) against loopback servers, and checks
the exit code and message, the row of every input line (exactly one each), and that nothing was
written outside ``--out``. A limit the machine sets (open files, file size) is set in the child
only, with ``preexec_fn``.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import command, descendants, gated_handler, wait_for

from pipeline.bench.faults import FaultServer
from pipeline.bench.server import QuietHandler, StaticServer
from pipeline.sink import MANIFEST_DIR, read_manifest


@pytest.fixture(scope="module")
def faults(image_dir: Path) -> Iterator[FaultServer]:
    with FaultServer(image_dir) as server:
        yield server


@pytest.fixture(scope="module")
def images(image_dir: Path) -> list[str]:
    return sorted(p.name for p in image_dir.glob("*.jpg"))


class Run:
    """A folder with ``urls.txt`` and ``config.toml``, and the command run in it."""

    def __init__(self, folder: Path, urls: list[str], config: str = "") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.urls = urls
        self.out = folder / "out"
        (folder / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
        (folder / "config.toml").write_text(config)
        self.outside = self._outside()

    def _outside(self) -> dict[str, bytes]:
        """Every file of the test's folder but --out, with its bytes: nothing may change them."""
        return {
            str(p): p.read_bytes()
            for p in self.folder.rglob("*")
            if p.is_file() and not p.is_symlink() and self.out not in p.parents
        }

    def start(self, *args: str, limit: Callable[[], None] | None = None) -> subprocess.Popen[str]:
        self.stderr = self.folder / "stderr.txt"
        return subprocess.Popen(
            command("run", "urls.txt", "--out", "out", "-q", *args),
            cwd=self.folder,
            stdout=subprocess.PIPE,
            stderr=self.stderr.open("w"),  # a file: -vv output never fills a pipe
            text=True,
            preexec_fn=limit,
        )

    def __call__(self, *args: str, limit: Callable[[], None] | None = None) -> tuple[int, str, str]:
        proc = self.start(*args, limit=limit)
        stdout, _ = proc.communicate(timeout=120)
        return proc.returncode, stdout, self.stderr.read_text()

    def rows(self) -> dict[str, dict[str, Any]]:
        """Rows by URL: every line at most once, every manifest line whole."""
        for path in (self.out / MANIFEST_DIR).glob("*.jsonl*"):
            text = path.read_bytes()
            assert not text or text.endswith(b"\n"), f"a half row in {path}"
        rows = list(read_manifest(self.out))
        keys = Counter(row["key"] for row in rows)
        assert not [key for key, n in keys.items() if n > 1], "a line recorded twice"
        return {row["url"]: row for row in rows}

    def complete(self) -> dict[str, dict[str, Any]]:
        """Every input line has exactly one row, and nothing outside --out changed."""
        rows = self.rows()
        assert sorted(rows) == sorted(self.urls)
        assert not list((self.out / MANIFEST_DIR).glob("*.part"))
        self.unchanged_outside()
        return rows

    def unchanged_outside(self) -> None:
        now = self._outside()
        for name in ("stderr.txt", "run.log"):  # what the test asked the run to write
            now.pop(str(self.folder / name), None)
            self.outside.pop(str(self.folder / name), None)
        assert now == self.outside, "a file outside --out was written"


def one_line(stderr: str) -> str:
    """The error line of a run that failed: one line, no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("pipeline: error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def manifest_rows(out: Path) -> int:
    folder = out / MANIFEST_DIR
    return sum(1 for _ in read_manifest(out)) if folder.exists() else 0


# --- 1: any exception in a download is that URL's row -------------------------------------------


def test_a_malformed_redirect_is_a_row_and_the_run_goes_on(tmp_path, faults, images):
    urls = [faults.url(name) for name in images[:4]]
    urls.insert(2, faults.fault("redirect-bad"))
    run = Run(tmp_path, urls)
    for _ in range(2):  # the rerun, too, ends well
        code, _, stderr = run()
        assert code == 0, stderr
        assert "internal error" not in stderr
    rows = run.complete()
    bad = rows[faults.fault("redirect-bad")]
    assert (bad["status"], bad["error_kind"]) == ("failed", "network")
    assert bad["error"] == "ValueError: Invalid IPv6 URL"
    assert all(rows[url]["status"] == "ok" for url in urls if "_fault" not in url)


# --- 2: no process, no file: one line, within seconds, never a hang -----------------------------


@pytest.mark.parametrize("files", [20, 24])  # the lane cannot start / the pool cannot start
def test_too_few_open_files_is_one_line_and_no_failed_row(tmp_path, faults, images, files):
    urls = [faults.url(name) for name in images[:6]]
    run = Run(tmp_path, urls)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    started = time.monotonic()
    code, _, stderr = run(limit=limit)
    assert time.monotonic() - started < 30
    assert code == 2
    line = one_line(stderr)
    assert f"Too many open files (open files are limited to {files} here: raise ulimit -n)" in line
    # not the images' fault: no row says they failed (one may have been done before the error)
    failed = [row for row in run.rows().values() if row["status"] != "ok"]
    assert not failed, failed
    code, _, stderr = run()  # with the limit lifted, the rerun does everything
    assert code == 0, stderr
    assert all(row["status"] == "ok" for row in run.complete().values())


# --- 3: nothing the run writes can be aimed outside --out ---------------------------------------


def test_a_linked_folder_inside_the_output_is_refused(tmp_path, faults, images):
    run = Run(tmp_path, [faults.url(name) for name in images[:3]])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run.out / "images").mkdir(parents=True)
    (run.out / "images" / "00000").symlink_to(elsewhere, target_is_directory=True)
    code, _, stderr = run()
    assert code == 2
    assert one_line(stderr).startswith("pipeline: error: out/images/00000: a symbolic link; ")
    assert list(elsewhere.iterdir()) == []
    assert run.rows() == {}
    run.unchanged_outside()


def test_planted_links_at_outputs_and_manifest_are_never_followed(tmp_path, faults, images):
    urls = [faults.url(name) for name in images[:3]]
    run = Run(tmp_path, urls)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run.outside = run._outside()
    (run.out / MANIFEST_DIR).mkdir(parents=True)
    part = run.out / MANIFEST_DIR / "00000-000000001.jsonl.part"
    part.symlink_to(victim)
    code, _, stderr = run()
    assert code == 2
    assert "00000-000000001.jsonl.part: a symbolic link" in one_line(stderr)
    part.unlink()
    assert run()[0] == 0
    rows = run.complete()
    image = run.out / rows[urls[0]]["path"]  # an output replaced by a link, then all redone
    image.unlink()
    image.symlink_to(victim)
    code, _, stderr = run("--restart")
    assert code == 0, stderr
    assert not image.is_symlink() and image.stat().st_size > 100
    assert victim.read_text() == "precious\n"
    run.complete()


# --- 4: Ctrl-C ends the run within the grace + 1 s, whatever the transforms cost -----------------


def test_ctrl_c_with_slow_transforms_exits_within_the_grace(tmp_path, faults, images):
    config = """
[transform]
workers = 2
shutdown_grace = 1.0
[[transform.ops]]
op = "_sleep"
seconds = 5
"""
    run = Run(tmp_path, [faults.url(name) for name in images[:8]], config)
    log = tmp_path / "run.log"
    proc = run.start("-vv", "--log-file", str(log))
    wait_for(lambda: log.exists() and log.read_text().count("_sleep: 5 s") >= 2, what="both busy")
    children = set(descendants(proc.pid))
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    took = time.monotonic() - sent
    assert proc.returncode == 130
    assert took < 1.0 + 1.0, f"{took:.2f} s from SIGINT to exit"
    wait_for(lambda: not [pid for pid in children if running(pid)], what="no process left")
    assert run.rows() == {}  # nothing was done: nothing is recorded, the rerun does it all
    run.unchanged_outside()


def test_a_runaway_transform_fails_as_timeout_and_the_run_goes_on(tmp_path, faults, images):
    config = """
[transform]
workers = 1
timeout = 0.5
[[transform.ops]]
op = "_sleep"
seconds = 30
"""
    run = Run(tmp_path, [faults.url(name) for name in images[:2]], config)
    started = time.monotonic()
    code, _, stderr = run()
    assert time.monotonic() - started < 20  # each image's worker killed after 0.5 s, not 30
    assert code == 0, stderr
    rows = run.rows()
    assert len(rows) == 2
    assert {row["error_kind"] for row in rows.values()} == {"transform_timeout"}
    assert "transform process" in stderr and "killed" in stderr


# --- 5: the config's faults are the config's: refused at load, never final rows -----------------


def test_a_user_agent_with_a_line_break_is_refused_at_load(tmp_path, faults, images):
    run = Run(tmp_path, [faults.url(images[0])], '[download]\nuser_agent = "a\\r\\nX-Evil: 1"\n')
    code, _, stderr = run()
    assert code == 2
    line = one_line(stderr)
    assert line.startswith("pipeline: error: config.toml: download.user_agent must be printable")
    assert not run.out.exists()
    run.unchanged_outside()


# --- 6: outputs are bounded like inputs ---------------------------------------------------------


def test_outputs_larger_than_max_pixels_are_refused(tmp_path, faults, images):
    huge = '[[transform.ops]]\nop = "resize"\nwidth = 65535\nheight = 65535\n'
    run = Run(tmp_path, [faults.url(images[0])], huge)
    code, _, stderr = run()
    assert code == 2
    assert "transform.ops[0] resizes to 65535 x 65535" in one_line(stderr)

    rotate = '[transform]\nmax_pixels = 500000\n[[transform.ops]]\nop = "rotate"\ndegrees = 45\n'
    urls = [faults.url(name) for name in images[:4]]
    run = Run(tmp_path / "rotate", urls, rotate)
    code, _, stderr = run()
    assert code == 0, stderr
    rows = run.complete()
    # each fits the limit as it comes (at most 460,544 pixels); rotated by 45 degrees, only
    # the second (550 x 161) still does
    status = [(rows[url]["status"], rows[url]["error_kind"]) for url in urls]
    assert status == [("failed", "decompression_bomb"), ("ok", None)] + [status[0]] * 2
    assert all("rotate would make" in rows[url]["error"] for url in urls if url != urls[1])
    assert rows[urls[1]]["width_out"] * rows[urls[1]]["height_out"] <= 500_000


# --- 7: OS errors: one line naming the path, exit 2; a full disk stops cleanly ------------------


def test_binary_bytes_as_config_is_one_line(tmp_path, faults, images):
    run = Run(tmp_path, [faults.url(images[0])])
    (tmp_path / "config.toml").write_bytes(b"\x00\xff\xfe\x00binary")
    code, _, stderr = run()
    assert code == 2
    assert one_line(stderr).startswith("pipeline: error: config.toml: not UTF-8 text")
    assert not run.out.exists()


@pytest.mark.parametrize(
    ("plant", "message"),
    [
        ("out-is-under-a-file", "out: cannot create the output folder: Not a directory"),
        ("manifest-is-a-file", "out/manifest: not a folder; "),
        ("images-is-a-file", "out/images: not a folder; "),
        ("run.json-is-a-folder", "out/run.json: unreadable"),
    ],
)
def test_a_broken_output_folder_is_one_line(tmp_path, faults, images, plant, message):
    run = Run(tmp_path, [faults.url(name) for name in images[:3]])
    if plant == "out-is-under-a-file":
        (tmp_path / "file").write_text("")
        run.out = tmp_path / "file" / "out"
        message = "file/out: cannot create the output folder: Not a directory"
        args: tuple[str, ...] = ("--out", "file/out")
    else:
        args = ()
        run.out.mkdir()
        name = plant.split("-is-")[0]
        if plant.endswith("a-file"):
            (run.out / name).write_text("")
        else:
            (run.out / name).mkdir()
    run.outside = run._outside()
    code, _, stderr = run(*args)
    assert code == 2
    assert message in one_line(stderr)
    run.unchanged_outside()


def test_a_full_disk_stops_the_run_cleanly_and_the_rerun_finishes(tmp_path, faults, images):
    urls = [f"{faults.url(images[i % len(images)])}?n={i}" for i in range(40)]
    small = "[output]\nflush_rows = 1000\n"
    small += '[[transform.ops]]\nop = "thumbnail"\nwidth = 48\nheight = 48\n'
    run = Run(tmp_path, urls, small)  # small images: the manifest is the file that grows

    def small_files() -> None:  # as a full disk does: writes past 8 KB fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    code, _, stderr = run(limit=small_files)
    assert code == 2
    line = one_line(stderr)
    assert line.startswith(
        "pipeline: error: out/manifest/00000-000000001.jsonl.part: File too large"
    )
    kept = run.rows()  # whole rows only, as many as fit
    assert 0 < len(kept) < len(urls)
    assert f"stopped: {len(kept)} rows recorded" in line
    code, stdout, stderr = run()
    assert code == 0, stderr
    assert f"resumed     {len(kept)} URLs done" in stdout
    assert all(row["status"] == "ok" for row in run.complete().values())


# --- 8: a kill -9 loses at most a second of rows -------------------------------------------------


def test_rows_reach_the_disk_within_a_second_so_kill_9_keeps_them(tmp_path, faults, images):
    gated = gated_handler()
    with StaticServer(faults.root, handler=gated) as held:
        fast = [faults.url(name) for name in images[:5]]
        slow = [held.url(name) for name in images[5:7]]
        run = Run(tmp_path, fast + slow)
        proc = run.start()
        try:
            # the five are done, and the two held: without a timed flush, their rows would
            # sit in a buffer until 100 had come
            wait_for(lambda: manifest_rows(run.out) == len(fast), what="rows on disk")
        finally:
            proc.kill()
            proc.communicate(timeout=30)
            gated.gate.set()
        code, stdout, stderr = run()
    assert code == 0, stderr
    assert f"resumed     {len(fast)} URLs done" in stdout
    assert all(row["status"] == "ok" for row in run.complete().values())


# --- 9: slow servers hold no fast URL up ---------------------------------------------------------


def test_slow_downloads_stop_holding_workers_and_are_reported(tmp_path, faults, images):
    gated = gated_handler()
    with StaticServer(faults.root, handler=gated) as held:
        slow = [f"{held.url(images[0])}?n={i}" for i in range(3)]
        fast = [f"{faults.url(images[i % len(images)])}?n={i}" for i in range(30)]
        config = "[download]\nworkers = 2\nstraggler_after = 0.2\nmax_stragglers = 4\n"
        run = Run(tmp_path, slow + fast, config)  # the slow ones first: they take both workers
        proc = run.start()
        try:
            # every fast URL is done while the three slow ones are still held by their server
            wait_for(lambda: manifest_rows(run.out) == len(fast), what="the fast URLs")
            assert all(row["url"] in fast for row in read_manifest(run.out))
        finally:
            gated.gate.set()
        stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, run.stderr.read_text()
    assert all(row["status"] == "ok" for row in run.complete().values())
    report = json.loads((run.out / "report.json").read_text())
    assert report["stragglers"]["count"] == 3
    assert report["stragglers"]["hosts"] == [["127.0.0.1", 3]]
    assert "stragglers  3 downloads over 0.2 s: median " in stdout


# --- 10: internal addresses, named or reached by a redirect or a name, are refused --------------


class Counting(QuietHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        super().do_GET()


def test_denied_networks_are_checked_on_the_address_connected_to(tmp_path, faults, images):
    with StaticServer(faults.root, handler=Counting, host="127.0.0.2") as internal:
        secret = internal.url(images[0])
        redirect = faults.fault("redirect-to/" + urllib.parse.quote(secret, safe=""))
        by_name = f"http://localhost:{faults.port}/{images[0]}"  # a name for a loopback address
        good = [faults.url(name) for name in images[:3]]
        config = '[download]\ndeny_networks = ["127.0.0.2/32"]\n'
        run = Run(tmp_path, [*good, secret, redirect], config)
        code, _, stderr = run()
        assert code == 0, stderr
        rows = run.complete()
        for url in (secret, redirect):
            assert (rows[url]["status"], rows[url]["error_kind"]) == ("failed", "blocked_address")
            assert "127.0.0.2 is in download.deny_networks 127.0.0.2/32" in rows[url]["error"]
        assert all(rows[url]["status"] == "ok" for url in good)
        assert Counting.hits == 0  # not one request reached it

        closed = Run(
            tmp_path / "private", [good[0], by_name], "[download]\nallow_private = false\n"
        )
        code, _, stderr = closed()
        assert code == 0, stderr
        rows = closed.complete()
        for url in (good[0], by_name):
            assert rows[url]["error_kind"] == "blocked_address"
            assert "(download.allow_private)" in rows[url]["error"]
