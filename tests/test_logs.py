"""Logs: every process's lines are written by the coordinator, above the bars; -v is ours only."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import multiprocessing
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import command

from pipeline.logs import LogSetup, configure, configure_child, relay

# slow enough for the bars to be drawn while lines come from the lane (a 404) and the workers
SLOW = """
[download]
content_types = []
workers = 4
[transform]
workers = 2
[[transform.ops]]
op = "_sleep"
seconds = 0.05
[[transform.ops]]
op = "thumbnail"
width = 64
height = 64
"""
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d\.\d{3} (?:DEBUG|INFO|WARNING|ERROR) \S+/\S+ \S+: ")


@contextlib.contextmanager
def configured(level: int, log_file: Path) -> Iterator[None]:
    """``configure(level, log_file)`` for the block; this process's logging as it was after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("pipeline").level
    try:
        configure(level, str(log_file))
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]
        logging.getLogger("pipeline").setLevel(saved[2])


def _child(setup: LogSetup) -> None:
    configure_child(setup, "child-1")
    logging.getLogger("pipeline.test").info("from the child, %s", "formatted")
    logging.getLogger("pipeline.test").debug("below the level: never sent")
    logging.getLogger("urllib3.test").info("a library's line: not sent at -v")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("pipeline.test").exception("with a traceback")


def test_a_child_process_logs_through_the_coordinators_handlers(tmp_path):
    log_file = tmp_path / "run.log"
    with configured(logging.INFO, log_file):
        with relay():
            setup = LogSetup.current()
            assert setup.address is not None and setup.level == logging.INFO
            child = multiprocessing.get_context("spawn").Process(target=_child, args=(setup,))
            child.start()
            child.join(30)
            assert child.exitcode == 0
        text = log_file.read_text()  # the relay wrote every record before it closed
    lines = [line for line in text.splitlines() if LOG_LINE.match(line)]
    assert [line.split(" ", 2)[2] for line in lines] == [
        "child-1/MainThread pipeline.test: from the child, formatted",
        "child-1/MainThread pipeline.test: with a traceback",
    ]
    assert "ValueError: boom" in text  # the traceback came along, as text
    assert "never sent" not in text and "library" not in text


def run_in_a_pty(tmp_path: Path, server, *args: str) -> str:
    """`pipeline run` with stdout and stderr on an 80-column terminal (so the bars are drawn);
    everything it wrote there."""
    urls = [server.url(f"img-{i:03d}.jpg") for i in range(30)]
    urls += [server.url("missing.jpg"), server.url("")]  # a lane's line; a worker's (not_image)
    (tmp_path / "urls.txt").write_text("\n".join(urls) + "\n")
    (tmp_path / "config.toml").write_text(SLOW)
    main, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(
        command("run", "urls.txt", "--out", "out", *args),
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
        env={**os.environ, "TERM": "xterm"},
    )  # fmt: skip
    os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(main, 65536)  # blocks until the child writes, or has exited (EIO)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(main)
    assert proc.returncode == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_log_lines_never_land_inside_a_bar_line(tmp_path, server):
    text = run_in_a_pty(tmp_path, server, "-vv")
    assert "url/s" in text, "no bars were drawn"  # a terminal: bars on
    # 80 columns: every count is whole (the figures come first, the queue depths are cut)
    failed = re.search(r"urls +32: \d+ ok, (\d+) failed", text)
    assert failed is not None, text
    assert re.search(rf"\rwritten +100% 32/32 failed={failed[1]} [\d.]+ url/s \|", text), text
    assert re.search(r"\rdownloaded +100% 32/32 failed=\d+ [\d.]+ url/s \|", text), text
    assert re.search(r"\rtransformed 100% (\d+)/\1 failed=1 [\d.]+ url/s \|", text), text
    matches = list(LOG_LINE.finditer(text))
    names = {m.group(0).split(" ")[2].split("/")[0] for m in matches}
    assert any(n.startswith("lane-") for n in names) and any(
        n.startswith("transform") for n in names
    )
    for match in matches:
        before = text[: match.start()]
        # the bars were cleared first: the line starts a terminal line (after \r or \n, and any
        # escape sequence tqdm uses to clear), and it ends before any bar is drawn again
        tail = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", before[-40:])
        assert tail == "" or tail[-1] in "\r\n" or tail.rstrip(" ")[-1:] in ("\r", "\n", ""), repr(
            before[-80:]
        )
        rest = text[match.end() :].split("\n", 1)[0]
        assert "url/s" not in rest, repr(rest)


@pytest.mark.parametrize(
    ("flags", "libraries"), [(("-vv",), False), (("-vv", "--debug-libs"), True)]
)
def test_verbose_raises_our_loggers_and_debug_libs_the_rest(tmp_path, server, flags, libraries):
    (tmp_path / "urls.txt").write_text(server.url("missing.jpg") + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "out", "-q", *flags],
        cwd=tmp_path, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "pipeline.lane: 00000-000000001" in done.stderr  # ours, from the lane, at DEBUG
    assert ("urllib3.connectionpool" in done.stderr) is libraries


def test_control_characters_in_a_logged_message_are_escaped(tmp_path):
    from pipeline.logs import printable

    assert printable("a\x1b[31mb\x07\r\n\x9b\u202ec é") == "a\\x1b[31mb\\x07\\r\\n\\x9b\\u202ec é"
    assert printable("one\ntwo\x1b", newlines=True) == "one\ntwo\\x1b"
    with configured(logging.CRITICAL, tmp_path / "run.log"):
        logging.getLogger("pipeline.test").warning("fetched %s", "http://h/\x1b]0;owned\x07\nfake")
    text = (tmp_path / "run.log").read_text()
    assert "fetched http://h/\\x1b]0;owned\\x07\\nfake\n" in text and "\x1b" not in text


def _hostile_child(setup: LogSetup) -> None:
    configure_child(setup, "child-2")
    try:
        raise ValueError("bad \x1b[2J")
    except ValueError:
        logging.getLogger("pipeline.test").exception("at http://h/\x1b[31m\nforged")


def test_a_childs_message_is_escaped_and_its_traceback_kept(tmp_path):
    with configured(logging.CRITICAL, tmp_path / "run.log"), relay():
        child = multiprocessing.get_context("spawn").Process(
            target=_hostile_child, args=(LogSetup.current(),)
        )
        child.start()
        child.join(30)
    text = (tmp_path / "run.log").read_text()
    assert "pipeline.test: at http://h/\\x1b[31m\\nforged\nTraceback" in text, text
    assert "ValueError: bad \\x1b[2J" in text and "\x1b" not in text
