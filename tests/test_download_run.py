"""The download side through the real command: publishers' opt-outs, servers that break HTTP,
dead hosts, the libraries' warnings, proxies, and per_host across lanes.

Each test runs ``python -m pipeline run`` (``test_hostile.Run``) against loopback servers: a
``StaticServer`` with a handler of the test's, or a raw socket server for answers no HTTP server
library would send.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from test_hostile import Run

from pipeline.bench.server import QuietHandler, StaticServer


@pytest.fixture(scope="module")
def images(image_dir: Path) -> list[str]:
    return sorted(p.name for p in image_dir.glob("*.jpg"))


class RawServer:
    """A loopback TCP server: each connection's request is read, then ``answer(conn)`` writes
    whatever bytes it likes; the connection is closed after."""

    def __init__(self, answer: Callable[[socket.socket], None]) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepter = threading.Thread(target=self._accept)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,))
            self.threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(10)
            request = b""
            while b"\r\n\r\n" not in request:
                data = conn.recv(4096)
                if not data:
                    return
                request += data
            self.answer(conn)

    def __enter__(self) -> RawServer:
        self.accepter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.accepter.join()
        for thread in self.threads:
            thread.join()


def report(run: Run) -> dict[str, object]:
    return dict(json.loads((run.out / "report.json").read_text()))


# --- opt-outs: X-Robots-Tag ----------------------------------------------------------------------


class Tagged(QuietHandler):
    """``?tag=...`` (repeatable): one X-Robots-Tag header each. With ``&hold=1`` the body is
    sent only when the test opens ``gate``: a client that read it would wait."""

    gate = threading.Event()
    agents: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).agents.append(self.headers.get("User-Agent", ""))
        query = parse_qs(urlsplit(self.path).query)
        if "tag" not in query:
            super().do_GET()
            return
        body = (Path(self.directory) / urlsplit(self.path).path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        for tag in query["tag"]:
            self.send_header("X-Robots-Tag", tag)
        self.end_headers()
        self.wfile.flush()
        if "hold" in query:
            type(self).gate.wait(60)
        with contextlib.suppress(OSError):
            self.wfile.write(body)


def test_opted_out_responses_are_failed_rows_unread_and_counted(tmp_path, image_dir, images):
    with StaticServer(image_dir, handler=Tagged) as server:
        opted = [
            server.url(f"{images[1]}?tag=noai&hold=1"),
            server.url(f"{images[2]}?tag=nofollow&tag=NoImageIndex&hold=1"),  # the second of two
            server.url(f"{images[3]}?tag=mytoken:+noimageai,+nofollow&hold=1"),  # to us
        ]
        allowed = [
            server.url(images[0]),
            server.url(f"{images[4]}?tag=otherbot:+noai"),  # to another robot
            server.url(f"{images[5]}?tag=nofollow"),
        ]
        config = '[download]\nuser_agent_token = "mytoken"\nread_timeout = 30\n'
        run = Run(tmp_path, allowed + opted, config)
        try:
            code, stdout, stderr = run()
        finally:
            Tagged.gate.set()
    assert code == 0, stderr
    rows = run.complete()
    for url in opted:  # refused without waiting for the body the server held back
        assert (rows[url]["status"], rows[url]["error_kind"]) == ("failed", "opted_out")
        assert rows[url]["http_status"] == 200 and rows[url]["bytes_in"] in (0, None)
    assert "X-Robots-Tag mytoken: noimageai" in rows[opted[2]]["error"]
    assert all(rows[url]["status"] == "ok" for url in allowed)
    assert report(run)["failed"] == {"opted_out": 3}
    assert any(line.split() == ["opted_out", "3"] for line in stdout.splitlines())
    assert set(Tagged.agents) == {"pipeline/0.1 (compatible; mytoken)"}


# --- answers that break HTTP: that URL's row, never the run's stop --------------------------------


def test_a_contradictory_content_length_is_a_row_not_a_stop(tmp_path, server, images):
    def answer(conn: socket.socket) -> None:
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 5, 6\r\n"
            b"Content-Length: 7\r\n\r\nhello"
        )

    with RawServer(answer) as raw:
        bad = raw.url("a.jpg")
        good = [server.url(name) for name in images[:3]]
        run = Run(tmp_path, [*good, bad])
        code, _, stderr = run()
        assert code == 0, stderr
        rows = run.complete()
        assert (rows[bad]["status"], rows[bad]["error_kind"]) == ("failed", "protocol")
        assert "Content-Length" in rows[bad]["error"]
        assert all(rows[url]["status"] == "ok" for url in good)


def test_an_endless_100_continue_fails_within_seconds(tmp_path, server, images):
    sent = []

    def answer(conn: socket.socket) -> None:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" * 100
        end = time.monotonic() + 20  # bounded: a client that never gives up costs the test 20 s
        count = 0
        with contextlib.suppress(OSError):
            while time.monotonic() < end:
                conn.sendall(interim)
                count += 100
        sent.append(count)

    with RawServer(answer) as raw:
        endless = raw.url("a.jpg")
        good = server.url(images[0])
        run = Run(tmp_path, [good, endless], "[download]\ndeadline = 30.0\n")
        code, _, stderr = run()
    assert code == 0, stderr
    rows = run.complete()
    assert (rows[endless]["status"], rows[endless]["error_kind"]) == ("failed", "protocol")
    assert "interim (1xx)" in rows[endless]["error"]
    assert rows[endless]["download_ms"] < 5000 and rows[good]["status"] == "ok"
    assert float(str(report(run)["lane_cpu_s"])) < 5


# --- dead hosts ----------------------------------------------------------------------------------


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so no one else takes it), not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def test_a_dead_hosts_later_urls_are_failed_untried(tmp_path, server, images, refused_port):
    dead = [f"http://127.0.0.1:{refused_port}/{i}.jpg" for i in range(40)]
    good = [f"{server.url(images[i % len(images)])}?n={i}" for i in range(10)]
    urls = [url for pair in zip(dead[:10], good, strict=True) for url in pair] + dead[10:]
    run = Run(tmp_path, urls, "[download]\nworkers = 4\nhost_failures = 3\n")
    code, _, stderr = run()
    assert code == 0, stderr
    rows = run.complete()
    assert all(rows[url]["status"] == "ok" for url in good)
    assert all(rows[url]["error_kind"] == "connect" for url in dead)
    untried = [url for url in dead if rows[url]["error"].endswith("; not tried")]
    assert len(untried) >= len(dead) - (3 + 4 - 1)  # tried: 3, and those already under way
    message = f"host 127.0.0.1:{refused_port} failed to connect 3 times in a row; not tried"
    assert rows[untried[0]]["error"] == message


# --- the HTTP library's retry warnings stay off the terminal -------------------------------------


def test_retry_warnings_reach_the_terminal_only_at_vv(tmp_path):
    def hang_up(conn: socket.socket) -> None:
        pass  # closed without an answer: urllib3 retries, and warns each time

    with RawServer(hang_up) as raw:
        urls = [raw.url(f"{i}.jpg") for i in range(3)]
        config = "[download]\nbackoff = 0.01\nbackoff_jitter = 0.0\nhost_failures = 0\n"
        run = Run(tmp_path, urls, config)
        code, stdout, stderr = run()
        assert code == 0, stderr
        assert "Retrying" not in stderr and "urls        3: 0 ok, 3 failed" in stdout
        rows = run.complete()
        assert {row["error_kind"] for row in rows.values()} == {"connect"}
        code, _, stderr = Run(tmp_path / "vv", urls, config)("-vv")
        assert code == 0 and stderr.count("Retrying (") == 6  # 2 retries per URL


# --- proxies from the environment -----------------------------------------------------------------


class Proxy(QuietHandler):
    """A forward proxy for the test: answers absolute-URI GETs from its own folder."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        if self.path.startswith("http://"):
            type(self).seen.append(self.path)
            parts = urlsplit(self.path)
            self.path = parts.path + (f"?{parts.query}" if parts.query else "")
        super().do_GET()


def test_the_environments_proxy_is_used_and_no_proxy_honoured(
    tmp_path, image_dir, images, monkeypatch
):
    with (
        StaticServer(image_dir, handler=Proxy) as proxy,
        StaticServer(image_dir, host="127.0.0.2") as direct,
    ):
        monkeypatch.setenv("HTTP_PROXY", proxy.url().rstrip("/"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        proxied = [f"http://images.invalid/{name}" for name in images[:3]]  # no DNS: the proxy's
        loopback = [direct.url(name) for name in images[3:5]]  # always direct
        run = Run(tmp_path, proxied + loopback)
        code, _, stderr = run()
        assert code == 0, stderr
        assert all(row["status"] == "ok" for row in run.complete().values())
        assert sorted(Proxy.seen) == sorted(proxied)

        monkeypatch.setenv("NO_PROXY", "other.test, .invalid")
        bypassed = Run(tmp_path / "no_proxy", proxied[:1])
        code, _, stderr = bypassed()
        assert code == 0, stderr
        assert bypassed.complete()[proxied[0]]["error_kind"] == "dns"  # direct: no such name
        assert len(Proxy.seen) == len(proxied)


# --- per_host holds across lanes ------------------------------------------------------------------


class Concurrency(QuietHandler):
    """Counts requests at once; the first is held until a second overlaps it or ``gate`` opens."""

    lock = threading.Lock()
    active = peak = 0
    first = threading.Event()
    overlap = threading.Event()
    gate = threading.Event()

    def do_GET(self) -> None:
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
            if cls.active > 1:
                cls.overlap.set()
        cls.first.set()
        cls.gate.wait(30)
        try:
            super().do_GET()
        finally:
            with cls.lock:
                cls.active -= 1


def test_per_host_holds_across_lanes(tmp_path, image_dir, images):
    with StaticServer(image_dir, handler=Concurrency) as server:
        # a lane holds at most 1 + 1 + 1 + 64 jobs here: 150 URLs reach both lanes
        urls = [f"{server.url(images[i % len(images)])}?n={i}" for i in range(150)]
        config = "[download]\nper_host = 1\nworkers = 1\nmax_stragglers = 0\n"
        config += "[queues]\nfetched = 1\n"
        config += "[transform]\nmax_in_flight = 1\n"
        run = Run(tmp_path, urls, config)
        proc = run.start("--lanes", "2", "--transform-workers", "2")
        try:
            assert Concurrency.first.wait(30), "no request arrived"
            overlapped = Concurrency.overlap.wait(1.0)  # the other lane's, were it let through
        finally:
            Concurrency.gate.set()
        proc.communicate(timeout=120)
    assert proc.returncode == 0, run.stderr.read_text()
    assert not overlapped and Concurrency.peak == 1
    assert all(row["status"] == "ok" for row in run.complete().values())
    assert json.loads((run.out / "report.json").read_text())["lanes"] == 2
