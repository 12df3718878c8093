"""The download client, with `responses` standing in for the network."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import re
import socket
import threading
from typing import ClassVar

import pytest
import requests
import responses
import urllib3.exceptions
from helpers import encode, gated_handler, photo

from pipeline.bench.server import QuietHandler, StaticServer
from pipeline.budget import ByteBudget
from pipeline.config import DownloadConfig
from pipeline.download import Downloader, _ours, check_url, translate
from pipeline.errors import ConfigError, FetchError, is_final
from pipeline.optout import refusal
from pipeline.proxies import Proxies
from pipeline.records import Job
from pipeline.transport import AddressGuard, InterimFlood, new_session, prepared_url

URL = "http://images.test/a.jpg"


@pytest.fixture
def downloader():
    with Downloader(DownloadConfig(max_bytes=10_000, retries=0, user_agent="ua-test/1")) as d:
        yield d


def fetch_error(downloader: Downloader, url: str = URL) -> FetchError:
    with pytest.raises(FetchError) as caught:
        downloader.fetch(Job(0, 0, url, "s"))
    return caught.value


@responses.activate
def test_a_body_comes_back_whole_with_its_headers(downloader):
    responses.get(URL, body=b"\xff\xd8" + bytes(5000), content_type="image/jpeg")
    fetched = downloader.fetch(Job(0, 1, URL, "s"))
    assert fetched.body == b"\xff\xd8" + bytes(5000)
    assert (fetched.http_status, fetched.content_type) == (200, "image/jpeg")
    assert fetched.job.line == 1 and fetched.download_ms >= 0


@responses.activate
@pytest.mark.parametrize(("status", "kind"), [(404, "http_4xx"), (410, "http_4xx"),
                                              (500, "http_5xx"), (503, "http_5xx")])  # fmt: skip
def test_error_statuses(downloader, status, kind):
    responses.get(URL, status=status)
    error = fetch_error(downloader)
    assert (error.kind, error.http_status) == (kind, status)


@responses.activate
def test_a_declared_length_over_the_cap_is_refused_unread(downloader):
    responses.get(URL, body=b"x" * 20_000, content_type="image/jpeg",
                  auto_calculate_content_length=True)  # fmt: skip
    error = fetch_error(downloader)
    assert error.kind == "too_large" and "Content-Length 20000" in error.message


@responses.activate
def test_an_undeclared_body_over_the_cap_is_cut_while_streaming(downloader):
    responses.get(URL, body=b"x" * 40_000, content_type="image/jpeg")  # no Content-Length
    error = fetch_error(downloader)
    assert error.kind == "too_large" and "body exceeds" in error.message


@responses.activate
def test_an_encoded_body_is_measured_decoded_against_the_cap(downloader):
    # a server may compress though asked not to: its Content-Length (the gzip's) is under
    # max_bytes, the decoded body is over it, and is cut while streaming, not read whole
    packed = gzip.compress(b"x" * 40_000)
    responses.get(URL, body=packed, content_type="image/jpeg", auto_calculate_content_length=True,
                  headers={"Content-Encoding": "gzip"})  # fmt: skip
    assert len(packed) < downloader.config.max_bytes
    error = fetch_error(downloader)
    assert error.kind == "too_large" and "body exceeds" in error.message


def test_no_cookie_goes_back_to_a_server(image_dir):
    # each download stands alone: a cookie one answer sets is not sent with the next request
    class Cookies(QuietHandler):
        sent: ClassVar[list[str | None]] = []

        def end_headers(self) -> None:
            self.send_header("Set-Cookie", "visit=1; Path=/")
            super().end_headers()

        def do_GET(self) -> None:
            type(self).sent.append(self.headers.get("Cookie"))
            super().do_GET()

    with StaticServer(image_dir, handler=Cookies) as server, Downloader(DownloadConfig()) as d:
        for line in range(2):
            assert d.fetch(Job(0, line, server.url("img-001.jpg"), "s")).body
    assert Cookies.sent == [None, None]


@responses.activate
def test_a_content_type_outside_the_allow_list_is_not_an_image(downloader):
    responses.get(URL, body=b"<html></html>", content_type="text/html; charset=utf-8")
    error = fetch_error(downloader)
    assert error.kind == "not_image" and "text/html" in error.message
    assert error.http_status == 200  # the row says what the server answered


@responses.activate
def test_an_empty_allow_list_accepts_anything():
    responses.get(URL, body=b"data", content_type="application/octet-stream")
    with Downloader(DownloadConfig(content_types=())) as d:
        assert d.fetch(Job(0, 0, URL, "s")).body == b"data"


@pytest.mark.parametrize(
    "url",
    ["ftp://x/a.jpg", "file:///etc/passwd", "not a url", "http://", "http://x:99999/a", "",
     "javascript:alert(1)", "http://x/\udcff.jpg"],
)  # fmt: skip
@responses.activate
def test_malformed_urls_fail_before_any_request(downloader, url):
    assert fetch_error(downloader, url).kind == "invalid_url"
    assert len(responses.calls) == 0
    with pytest.raises(FetchError):
        check_url(url)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (requests.exceptions.ConnectionError("refused"), "connect"),
        (requests.exceptions.ConnectTimeout("slow"), "timeout"),
        (requests.exceptions.ReadTimeout("slow"), "timeout"),
        (requests.exceptions.TooManyRedirects("loop"), "too_many_redirects"),
        (requests.exceptions.ChunkedEncodingError("cut"), "truncated"),
        (requests.exceptions.InvalidSchema("ftp"), "invalid_url"),
        (requests.exceptions.ConnectionError(
            urllib3.exceptions.MaxRetryError(None, URL, urllib3.exceptions.NameResolutionError(
                "images.test", None, OSError("Name or service not known")))), "dns"),
        (requests.exceptions.ConnectionError(
            urllib3.exceptions.MaxRetryError(None, URL, urllib3.exceptions.NewConnectionError(
                None, "Failed to establish a new connection"))), "connect"),
        (requests.exceptions.ContentDecodingError("bad gzip"), "network"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else v,
)  # fmt: skip
@responses.activate
def test_exceptions_map_to_kinds(downloader, exc, kind):
    responses.get(URL, body=exc)
    assert fetch_error(downloader).kind == kind
    assert translate(exc).kind == kind


@responses.activate
def test_each_thread_gets_its_own_session_with_the_right_settings(downloader):
    responses.get(URL, body=b"x", content_type="image/png")
    sessions = {}

    def grab(name: str) -> None:
        downloader.fetch(Job(0, 0, URL, "s"))
        sessions[name] = downloader._session()

    threads = [threading.Thread(target=grab, args=(str(i),)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    grab("main")
    grab("main again")
    assert sessions["0"] is not sessions["1"] and sessions["main"] is sessions["main again"]
    assert all(not s.trust_env for s in sessions.values())
    headers = responses.calls[0].request.headers
    assert headers["Accept-Encoding"] == "identity" and headers["User-Agent"] == "ua-test/1"


def test_close_closes_every_session():
    closed = []
    with Downloader(DownloadConfig()) as d:
        for _ in range(2):
            session = d._session()
            session.close = lambda s=session: closed.append(s)  # type: ignore[method-assign]
            d._local.session = None  # as if another thread asked
    assert len(closed) == 2 and d._sessions == []


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080/a/b-1.jpg?w=2&h=3", "https://img.example.com/p/1.jpg;v=2", "http://h/a?",
     "HTTP://Img.Example.com/a.jpg", "http://h:080/a", "http://h", "http://h/a b.jpg",
     "http://h/%7e/x%2f.jpg", "http://h/a/../b/./c.jpg", "http://h/a.jpg#top", "http://h/é.jpg",
     "http://bücher.example/a.jpg", "http://[::1]:80/a", "http://h/.well-known/x", "http://h/a/..",
     "http://.h/a.jpg"],
)  # fmt: skip
def test_a_url_goes_out_as_requests_prepares_it(url):
    request = requests.PreparedRequest()
    try:
        request.prepare_url(url, None)
    except requests.exceptions.InvalidURL:  # (a label that starts with a dot)
        with pytest.raises(requests.exceptions.InvalidURL):
            prepared_url(url)
        return
    assert prepared_url(url) == request.url


def test_each_origin_gets_its_own_pool_and_keeps_it():
    adapter = new_session(DownloadConfig()).get_adapter("http://")

    def pool(url: str) -> urllib3.HTTPConnectionPool:
        request = requests.PreparedRequest()
        request.prepare(method="GET", url=url)
        return adapter.get_connection_with_tls_context(request, True)

    urls = ["http://a.test/1.jpg", "http://a.test:8080/1.jpg", "https://a.test/1.jpg",
            "http://b.test/1.jpg", "http://[::1]:81/1.jpg", "http://u:p@a.test/1.jpg"]  # fmt: skip
    for url in urls:
        first = pool(url)
        parts = urllib3.util.parse_url(url)
        port = parts.port or {"http": 80, "https": 443}[parts.scheme or ""]
        host = (parts.host or "").strip("[]")  # the pool's is bare
        assert (first.scheme, first.host, first.port) == (parts.scheme, host, port)
        assert pool(url.replace("/1.jpg", "/2/3.jpg?x=1")) is first
    assert len({id(pool(url)) for url in urls}) == len(urls) - 1  # (the user is no pool's)


def test_a_header_the_http_library_refuses_is_the_configs_fault_not_a_row():
    # validation at load refuses such a value; were one to pass, no URL would be blamed for it
    config = DownloadConfig(retries=0)
    object.__setattr__(config, "user_agent", "ua\r\nX-Evil: 1")
    with Downloader(config) as downloader, pytest.raises(ConfigError, match="user_agent"):
        downloader.fetch(Job(0, 0, URL, "s"))


@pytest.mark.parametrize(
    ("address", "deny", "allow_private", "blocked"),
    [  # loopback addresses only, denied by config, as the guard sees them after a connect
        ("127.0.0.2", ("127.0.0.2/32",), True, "127.0.0.2 is in download.deny_networks"),
        ("::ffff:127.0.0.2", ("127.0.0.2/32",), True, "127.0.0.2 is in"),  # IPv4-mapped
        ("::1%lo", ("::1/128",), True, "::1 is in download.deny_networks ::1/128"),  # a zone
        ("127.0.0.1", ("127.0.0.2/32",), True, None),
        ("127.0.0.1", DownloadConfig().deny_networks, True, None),  # loopback stays allowed
        ("127.0.0.1", (), False, "127.0.0.1 is a private, loopback or reserved address"),
        ("::1", (), False, "private, loopback or reserved"),
        ("127.0.0.2", ("::ffff:127.0.0.2/128",), True, "127.0.0.2 is in"),  # a mapped entry
        ("0.0.0.0", DownloadConfig().deny_networks, True, "0.0.0.0 is in"),  # (compared only)
    ],
)
def test_the_address_guard(address, deny, allow_private, blocked):
    guard = AddressGuard(deny, allow_private)
    if blocked is None:
        guard.check(address)
        return
    with pytest.raises(FetchError, match=blocked) as caught:
        guard.check(address)
    assert caught.value.kind == "blocked_address"


def test_cancel_ends_downloads_waiting_for_their_hosts_slot(image_dir):
    # per_host = 1: one download holds the host (its server answers only when let), two wait;
    # cancel() fails all three at once, and the waiting ones never reach the server
    gated = gated_handler()
    with StaticServer(image_dir, handler=gated) as server:
        config = DownloadConfig(per_host=1, retries=0, read_timeout=30, deadline=60)
        errors: list[FetchError] = []

        def fetch(line: int) -> None:
            try:
                downloader.fetch(Job(0, line, server.url(f"img-00{line}.jpg?n={line}"), "s"))
            except FetchError as exc:
                errors.append(exc)

        with Downloader(config) as downloader:
            threads = [threading.Thread(target=fetch, args=(n,)) for n in range(3)]
            for thread in threads:
                thread.start()
            assert gated.arrived.acquire(timeout=30)  # one request reached the server
            downloader.cancel()
            for thread in threads:
                thread.join(10)
            assert not any(thread.is_alive() for thread in threads)
            gated.gate.set()
        assert sorted(e.kind for e in errors) == ["deadline"] * 3
        assert sum("per_host" in e.message for e in errors) == 2
        assert not gated.arrived.acquire(timeout=0)  # the two waiting never sent a request


# --- publishers' opt-outs: X-Robots-Tag ---------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "token", "refused"),
    [
        (["noai"], "", "noai"),
        (["NoImageAI"], "", "noimageai"),  # any case
        (["nofollow, noindex"], "", "noindex"),  # several in one header
        (["nofollow", "noarchive", "noimageindex"], "", "noimageindex"),  # several headers
        (["otherbot: noai"], "mybot", None),  # addressed to another robot
        (["otherbot: noai"], "", None),
        (["MyBot: noai"], "mybot", "mybot: noai"),  # addressed to us
        (["mybot: nofollow, noai"], "mybot", "mybot: noai"),  # the prefix covers the header
        (["otherbot: nofollow, noai"], "mybot", None),
        (["otherbot: nofollow", "noai"], "mybot", "noai"),  # a new header: every robot again
        (["otherbot: nofollow, mybot: noai"], "mybot", "mybot: noai"),  # merged headers
        (["unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], "", "noai"),  # not a robot
        (["max-image-preview: none"], "", None),
        (["all", ""], "", None),
        ([], "", None),
    ],
)
def test_x_robots_tag_parsing(headers, token, refused):
    assert refusal(headers, token, DownloadConfig().disallowed_header_directives) == refused


def test_an_empty_directive_list_ignores_opt_outs():
    assert refusal(["noai"], "", ()) is None


@responses.activate
def test_an_opted_out_response_is_refused_before_its_body_is_read():
    headers = urllib3.HTTPHeaderDict({"X-Robots-Tag": "otherbot: noai"})
    headers.add("X-Robots-Tag", "mybot: NOIMAGEAI")  # two headers
    responses.get(URL, body=b"\xff\xd8" + bytes(100), content_type="image/jpeg", headers=headers)
    config = DownloadConfig(retries=0, user_agent_token="mybot")
    with Downloader(config) as downloader:
        error = fetch_error(downloader)
        assert (error.kind, error.http_status) == ("opted_out", 200)
        assert error.message == (
            "X-Robots-Tag mybot: noimageai (download.disallowed_header_directives)"
        )
        assert not is_final("connect") and is_final("opted_out")
        user_agent = responses.calls[0].request.headers["User-Agent"]
        assert user_agent == "pipeline/0.1 (compatible; mybot)"
    # the same answer to another robot, or with the check off, is an image
    for config in (DownloadConfig(retries=0, user_agent_token="robot2"),
                   DownloadConfig(retries=0, user_agent_token="mybot",
                                  disallowed_header_directives=())):  # fmt: skip
        with Downloader(config) as downloader:
            assert downloader.fetch(Job(0, 0, URL, "s")).body.startswith(b"\xff\xd8")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("user_agent_token", "my bot", "user_agent_token must be a name of letters"),
        ("user_agent_token", "bot:x", "user_agent_token must be a name"),
        ("disallowed_header_directives", ("noai", "no ai"), "disallowed_header_directives"),
        ("host_failures", -1, "host_failures must be in [0, 1000]"),
        ("proxy", "ftp://x:1", "proxy must be"),
        ("proxy", "http://x:1/a/b", "proxy must be"),
    ],
)
def test_download_settings_are_validated(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        DownloadConfig(**{key: value})


# --- a server's answer is its URL's row, never the run's stop ------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        urllib3.exceptions.InvalidHeader("Content-Length contained multiple unmatching values"),
        urllib3.exceptions.ProtocolError("Connection aborted.", http.client.LineTooLong("header")),
        urllib3.exceptions.ProtocolError(
            "Connection aborted.", InterimFlood("more than 16 interim (1xx) answers")
        ),
    ],
    ids=["content-length", "line-too-long", "interim"],
)
def test_a_malformed_answer_is_a_protocol_row(exc):
    header = isinstance(exc, urllib3.exceptions.InvalidHeader)
    wrapped = (
        requests.exceptions.InvalidHeader if header else requests.exceptions.ConnectionError
    )(exc)
    assert translate(wrapped).kind == "protocol"
    assert not _ours(wrapped)
    cut = urllib3.exceptions.ProtocolError("aborted", http.client.RemoteDisconnected("closed"))
    assert translate(requests.exceptions.ConnectionError(cut)).kind == "connect"


# --- dead hosts ----------------------------------------------------------------------------------


def refused(host: str = "images.test") -> requests.exceptions.ConnectionError:
    pool = urllib3.HTTPConnectionPool(host, 80)
    reason = urllib3.exceptions.NewConnectionError(None, "[Errno 111] Connection refused")
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(pool, "/", reason))


@responses.activate
def test_a_host_that_failed_to_connect_n_times_is_not_tried_again():
    other = "http://other.test/a.jpg"
    responses.get(URL, body=refused())
    responses.get(other, body=refused("other.test"))
    with Downloader(DownloadConfig(retries=0, host_failures=3)) as downloader:
        assert [fetch_error(downloader).kind for _ in range(3)] == ["connect"] * 3
        assert len(responses.calls) == 3
        error = fetch_error(downloader)
        assert error.kind == "connect" and len(responses.calls) == 3  # not tried
        assert error.message == "host images.test failed to connect 3 times in a row; not tried"
        fetch_error(downloader, other)  # another host has its own count
        assert len(responses.calls) == 4


@responses.activate
def test_a_success_resets_a_hosts_count_and_zero_turns_it_off():
    for body in (refused(), refused(), b"x", refused(), refused()):
        responses.get(URL, body=body, content_type="image/png")
    with Downloader(DownloadConfig(retries=0, host_failures=3)) as downloader:
        fetch_error(downloader)
        fetch_error(downloader)  # two in a row, then the image: the count starts again
        assert downloader.fetch(Job(0, 0, URL, "s")).body == b"x"
        fetch_error(downloader)
        fetch_error(downloader)
        assert "not tried" not in fetch_error(downloader).message  # the third in a row
        assert "not tried" in fetch_error(downloader).message
    with Downloader(DownloadConfig(retries=0, host_failures=0)) as downloader:
        for _ in range(5):
            assert "not tried" not in fetch_error(downloader).message


@responses.activate
def test_an_answer_of_any_status_resets_a_hosts_count():
    for body, status in ((refused(), 200), (refused(), 200), (b"", 404), (refused(), 200)):
        responses.get(URL, body=body, status=status)
    with Downloader(DownloadConfig(retries=0, host_failures=3)) as downloader:
        kinds = [fetch_error(downloader).kind for _ in range(5)]
    assert kinds == ["connect", "connect", "http_4xx", "connect", "connect"]
    assert len(responses.calls) == 5  # the host answered: every URL was tried


# --- proxies ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "bypass"),
    [
        ("example.com", "example.com", True),
        ("example.com", "img.example.com", True),  # its subdomains
        (".example.com", "img.example.com", True),
        ("example.com", "badexample.com", False),
        ("example.com:8080", "example.com", True),  # a port is ignored
        ("10.0.0.0/8, 192.168.1.2", "10.1.2.3", True),  # CIDR, spaces
        ("10.0.0.0/8,192.168.1.2", "192.168.1.2", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("[fd00::1]:8080", "[fd00::1]", True),
        ("", "127.0.0.2", True),  # loopback: always direct
        ("", "[::1]", True),
        ("", "localhost", True),
        ("*", "anything.test", True),
        ("", "example.com", False),
    ],
)
def test_no_proxy_entries(monkeypatch, no_proxy, host, bypass):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    proxies = Proxies.resolve("env")
    assert proxies.proxies["https"] == "http://127.0.0.1:3128"
    assert proxies.bypass(host) is bypass


def test_a_proxy_setting_is_read_once_per_session(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:3128")
    assert new_session(DownloadConfig()).proxies == {"http": "http://127.0.0.1:3128"}
    assert new_session(DownloadConfig(proxy="none")).proxies == {}
    named = new_session(DownloadConfig(proxy="http://127.0.0.1:8080"))
    assert named.proxies == {"http": "http://127.0.0.1:8080", "https": "http://127.0.0.1:8080"}
    assert not named.trust_env  # requests never looks at the environment per request


def test_a_chunked_body_is_held_to_max_bytes_whatever_its_content_length_says():
    """``Transfer-Encoding: chunked`` makes a Content-Length meaningless: the body is read
    chunk by chunk against max_bytes and the lane's byte budget, never in one unbounded read."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            head = "Content-Type: image/jpeg\r\nContent-Length: 10\r\nTransfer-Encoding: chunked"
            conn.sendall(f"HTTP/1.1 200 OK\r\n{head}\r\nConnection: close\r\n\r\n".encode())
            chunk = b"x" * 100_000
            with contextlib.suppress(OSError):  # the client stops reading past max_bytes
                for _ in range(30):
                    conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                conn.sendall(b"0\r\n\r\n")

    server = threading.Thread(target=serve)
    server.start()
    budget = ByteBudget(1_000_000)
    config = DownloadConfig(max_bytes=1_000_000, max_buffered_bytes=1_000_000, proxy="none")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/a.jpg"
    try:
        with Downloader(config, budget) as downloader, pytest.raises(FetchError) as caught:
            downloader.fetch(Job(1, 1, url, "s"))
    finally:
        server.join(timeout=30)
        listener.close()
    assert caught.value.kind == "too_large"


def test_a_redirects_body_is_never_read():
    """A 302 whose body never ends: requests would read it whole before following the
    redirect (until the read timeout, or gigabytes); its connection is closed instead."""
    image = encode(photo(40, 30))
    listener = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            request = conn.recv(65536)
            if request.startswith(b"GET /start"):  # a huge body that never comes
                conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /image.jpg\r\n"
                             b"Content-Length: 100000000\r\n\r\nxxxx")  # fmt: skip
                done.wait(30)
                return
            head = f"Content-Type: image/jpeg\r\nContent-Length: {len(image)}\r\n"
            conn.sendall(f"HTTP/1.1 200 OK\r\n{head}Connection: close\r\n\r\n".encode() + image)

    def serve() -> None:
        answers = []
        for _ in range(2):
            conn, _ = listener.accept()
            answers.append(threading.Thread(target=answer, args=(conn,)))
            answers[-1].start()
        for thread in answers:
            thread.join()

    server = threading.Thread(target=serve)
    server.start()
    config = DownloadConfig(read_timeout=5.0, proxy="none")
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/start"
    try:
        with Downloader(config) as downloader:
            fetched = downloader.fetch(Job(1, 1, url, "s"))
    finally:
        done.set()
        server.join(timeout=30)
        listener.close()
    assert fetched.body == image
    assert fetched.download_ms < 4000  # not a read timeout's 5 s spent on the 302's body
