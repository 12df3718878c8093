"""The response header parser: what http.client's parse_headers gives, block for block."""

from __future__ import annotations

import email.parser
import http.client
import io
import socket
import threading

import pytest

from pipeline import headers
from pipeline.config import DownloadConfig
from pipeline.download import Downloader
from pipeline.errors import FetchError
from pipeline.records import Job

PLAIN = [
    b"Content-Type: image/jpeg\r\nContent-Length: 5\r\n\r\n",
    b"X-Robots-Tag: noai\r\nX-Robots-Tag: mybot: noimageai\r\nx-robots-tag: none\r\n\r\n",
    b"A:\r\nB:   spaced  \t\r\nC:\tx\r\n\r\n",  # empty value; leading blanks dropped, trailing kept
    b"Server: caf\xe9 \xff\x80\r\nX-Odd: \x00\x7f\r\n\r\n",  # non-ASCII bytes: ISO-8859-1
    b"A: 1\nB: 2\n\n",  # bare LF line ends
    b"From: someone\r\nWeird!#$%&'*+-.^_`|~Name: v\r\n\r\n",  # every token character
    b"A: 1\r\n",  # the connection closed before the blank line
    b"\r\n",  # no header at all
    b"",
]
ODD = [
    b"A: 1\r\n folded\r\n\tagain\r\nB: 2\r\n\r\n",  # obs-fold continuation lines
    b" leading: continuation\r\nA: 1\r\n\r\n",  # the first line a continuation
    b"A: 1\r\nno colon here\r\nB: 2\r\n\r\n",  # the rest is no header
    b"A: 1\r\nName With Space: x\r\nB: 2\r\n\r\n",
    b"A: 1\r\n: empty name\r\nB: 2\r\n\r\n",
    b"A: 1\r\nB : space before colon\r\n\r\n",
    b"A: x\ry\r\nB: 2\r\n\r\n",  # a bare CR ends a line for the email parser
    b"A: x\r\r\nB: 2\r\n\r\n",
    b"From someone\r\nA: 1\r\n\r\n",  # an mbox envelope line
    b"A: 1\r\nFrom someone\r\nB: 2\r\n\r\n",
    b"Caf\xe9: x\r\nB: 2\r\n\r\n",  # a non-ASCII byte in a name
    b"A: 1\r\nB: 2",  # cut in the middle of a line
]


def view(message: http.client.HTTPMessage) -> tuple[object, ...]:
    return (
        message.items(),
        message.get_all("x-robots-tag"),
        [type(defect) for defect in message.defects],
        message.get_payload(),
        message.get_unixfrom(),
        message.is_multipart(),
        message.get_content_type(),
    )


def both(block: bytes) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """What each parser makes of ``block``, and of the bytes after it (a body, left unread)."""
    ends = block.endswith((b"\n\n", b"\r\n\r\n")) or block == b"\r\n"
    ours_fp, theirs_fp = (io.BytesIO(block + (b"BODY" if ends else b"")) for _ in range(2))
    ours = headers.parse_headers(ours_fp)
    theirs = http.client.parse_headers(theirs_fp)
    assert isinstance(ours, http.client.HTTPMessage)
    return (*view(ours), ours_fp.read()), (*view(theirs), theirs_fp.read())


@pytest.mark.parametrize("block", PLAIN)
def test_plain_blocks_parse_as_http_client_parses_them_with_no_email_parser(block, monkeypatch):
    ours, theirs = both(block)
    assert ours == theirs
    # the point of it: no email parser for these (ours was computed before this patch)
    monkeypatch.setattr(email.parser, "Parser", None)
    assert view(headers.parse_headers(io.BytesIO(block))) == theirs[:-1]


def test_repeated_headers_stay_apart():
    message = headers.parse_headers(io.BytesIO(PLAIN[1]))
    assert message.get_all("X-Robots-Tag") == ["noai", "mybot: noimageai", "none"]


@pytest.mark.parametrize("block", ODD)
def test_other_blocks_parse_as_http_client_parses_them(block):
    ours, theirs = both(block)
    assert ours == theirs


@pytest.mark.parametrize("count", [http.client._MAXHEADERS - 1, http.client._MAXHEADERS, 101])
def test_the_header_count_limit_is_http_clients(count):
    block = b"".join(b"H%d: v\r\n" % n for n in range(count)) + b"\r\n"
    outcomes = []
    for parse in (headers.parse_headers, http.client.parse_headers):
        try:
            outcomes.append(len(parse(io.BytesIO(block))))
        except http.client.HTTPException as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert outcomes[0] == (
        count if count < http.client._MAXHEADERS else "got more than 100 headers"
    )


@pytest.mark.parametrize("size", [http.client._MAXLINE - 1, http.client._MAXLINE + 1])
def test_the_line_length_limit_is_http_clients(size):
    block = b"A: " + b"x" * (size - 5) + b"\r\n\r\n"  # a line of ``size`` bytes
    for parse in (headers.parse_headers, http.client.parse_headers):
        if size > http.client._MAXLINE:
            with pytest.raises(http.client.LineTooLong):
                parse(io.BytesIO(block))
        else:
            assert len(parse(io.BytesIO(block))["A"]) == size - 5


def serve_once(answer: bytes) -> tuple[str, threading.Thread, socket.socket]:
    """A one-shot server on 127.0.0.1 that sends ``answer`` to the first request."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            connection.sendall(answer)

    thread = threading.Thread(target=serve)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/a.jpg", thread, listener


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"Content-Type: image/jpeg\r\nContent-Length: 4\r\n", None),
        (b"Content-Type: image/jpeg\r\nno colon\r\nContent-Length: 4\r\n", None),
        (b"Content-Type: image/jpeg\r\nContent-Length: 4\r\nX-Robots-Tag: noai\r\n", "opted_out"),
        (b"".join(b"H%d: v\r\n" % n for n in range(101)), "protocol"),
        (b"X-Long: " + b"x" * 70_000 + b"\r\n", "protocol"),
    ],
    ids=["plain", "no-colon", "robots", "too-many", "too-long"],
)
def test_a_downloads_headers_through_a_real_socket(head, kind):
    url, thread, listener = serve_once(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nBODY")
    config = DownloadConfig(retries=0, allow_private=True, content_types=())
    try:
        with Downloader(config) as downloader:
            if kind is None:
                assert downloader.fetch(Job(0, 1, url, "s")).body == b"BODY"
            else:
                with pytest.raises(FetchError) as caught:
                    downloader.fetch(Job(0, 1, url, "s"))
                assert caught.value.kind == kind
    finally:
        thread.join()
        listener.close()


def test_interim_answers_before_the_real_one_are_skipped_with_their_headers():
    interim = b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n" * 16  # the most that is read
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 4\r\n\r\nBODY"
    url, thread, listener = serve_once(interim + head)
    try:
        with Downloader(DownloadConfig(retries=0, allow_private=True)) as downloader:
            fetched = downloader.fetch(Job(0, 1, url, "s"))
        assert (fetched.body, fetched.content_type) == (b"BODY", "image/jpeg")
    finally:
        thread.join()
        listener.close()
