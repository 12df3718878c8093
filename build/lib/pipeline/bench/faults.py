"""A fault-injecting loopback server: the bad servers of the real internet, on demand.

Files of the served folder come back as usual; paths under ``/_fault/`` misbehave:

    /_fault/status/<code>              answer <code> (404, 500, 503, ...) with a small HTML body
    /_fault/retry-after/<s>            429 Too Many Requests with ``Retry-After: <s>``
    /_fault/flaky/<token>/<n>/<file>   503 for the first <n> requests of <token>, then <file>
    /_fault/reset/<file>               half of <file>, then a TCP reset
    /_fault/truncated/<file>           half of <file>, then a clean close (body < Content-Length)
    /_fault/html-as-jpeg               an HTML page sent as image/jpeg
    /_fault/garbage                    random bytes sent as image/jpeg
    /_fault/stall/<s>                  nothing at all for <s> seconds, then a small image
    /_fault/slow-headers/<s>           the response headers, one byte every <s> seconds
    /_fault/drip/<s>                   headers at once, then the body one byte every <s> seconds
    /_fault/slow-body/<s>/<file>       <file>, its body spread over <s> seconds (slow, but whole)
    /_fault/redirect-loop/<n>          302 to /_fault/redirect-loop/<n+1>, forever
    /_fault/redirect-scheme            302 to an ftp:// URL
    /_fault/redirect-bad               302 to a malformed URL (``http://[::1``)
    /_fault/redirect-to/<url>          302 to <url> (percent-encoded)
    /_fault/huge                       Content-Length of 10 GB (sends only what is read)
    /_fault/endless                    a chunked body that never ends
    /_fault/gzip-bomb                  256 MiB of zeros gzip-compressed to ~250 KB, as image/jpeg
    /_fault/bomb.png                   a PNG of a few hundred bytes declaring 50000 x 50000 pixels

Used by the tests and by ``pipeline serve --faults``. Loopback only, like StaticServer.
"""

from __future__ import annotations

import functools
import gzip
import random
import socket
import struct
import urllib.parse
import zlib
from collections.abc import Callable
from pathlib import Path

from .server import QuietHandler, StaticServer

PREFIX = "/_fault/"
HTML = b"<!doctype html><html><head><title>Not here</title></head><body>Sorry.</body></html>\n"


class FaultHandler(QuietHandler):
    """QuietHandler plus the routes under ``/_fault/``."""

    def do_GET(self) -> None:
        if not self.path.startswith(PREFIX):
            super().do_GET()
            return
        path = self.path.partition("?")[0]  # a query string only makes URLs distinct
        name, _, arg = path[len(PREFIX) :].partition("/")
        route = ROUTES.get(name)
        if route is None:
            self.send_error(404, f"unknown fault {name!r}")
            return
        route(self, arg)

    # --- helpers -------------------------------------------------------------------------------

    def _send(
        self, code: int, body: bytes, content_type: str = "text/html", **headers: str
    ) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def _file(self, name: str) -> bytes:
        return (Path(self.directory) / Path(name).name).read_bytes()

    def _pause(self, seconds: float) -> bool:
        """Wait; False once the server is closing (so a slow fault never holds the close up)."""
        return not self.httpd.stopping.wait(seconds)

    # --- the faults ----------------------------------------------------------------------------

    def status(self, arg: str) -> None:
        self._send(int(arg or 500), HTML)

    def retry_after(self, arg: str) -> None:
        self._send(429, HTML, Retry_After=arg or "1")

    def flaky(self, arg: str) -> None:
        token, failures, name = arg.split("/", 2)
        if self.httpd.hit(token) <= int(failures):
            self._send(503, HTML, Retry_After="0")
        else:
            self._send(200, self._file(name), "image/jpeg")

    def reset(self, arg: str) -> None:
        self._half(self._file(arg), reset=True)

    def truncated(self, arg: str) -> None:
        self._half(self._file(arg), reset=False)

    def _half(self, body: bytes, *, reset: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if reset:  # SO_LINGER with a zero timeout turns close() into a TCP RST
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    def html_as_jpeg(self, arg: str) -> None:
        self._send(200, HTML, "image/jpeg")

    def garbage(self, arg: str) -> None:
        self._send(200, random.Random(arg).randbytes(20_000), "image/jpeg")

    def stall(self, arg: str) -> None:
        if self._pause(float(arg or 10)):
            self._send(200, bomb_png(1, 1), "image/png")

    def slow_headers(self, arg: str) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 10\r\n\r\n"
        for i in range(len(head)):
            self.wfile.write(head[i : i + 1])
            self.wfile.flush()
            if not self._pause(float(arg or 1)):
                break
        self.close_connection = True

    def drip(self, arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        for _ in range(100_000):
            self.wfile.write(b"\xff")
            self.wfile.flush()
            if not self._pause(float(arg or 1)):
                break
        self.close_connection = True

    def redirect_loop(self, arg: str) -> None:
        self.send_response(302)
        self.send_header("Location", f"{PREFIX}redirect-loop/{int(arg or 0) + 1}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def redirect_scheme(self, arg: str) -> None:
        self._redirect("ftp://127.0.0.1/image.jpg")

    def redirect_bad(self, arg: str) -> None:
        self._redirect("http://[::1")

    def redirect_to(self, arg: str) -> None:
        self._redirect(urllib.parse.unquote(arg))

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def slow_body(self, arg: str) -> None:
        seconds, _, name = arg.partition("/")
        body = self._file(name)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        steps = 20
        for i in range(steps):
            self.wfile.write(body[i * len(body) // steps : (i + 1) * len(body) // steps])
            self.wfile.flush()
            if i < steps - 1 and not self._pause(float(seconds) / (steps - 1)):
                break
        self.close_connection = True

    def huge(self, arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(10 * 10**9))
        self.end_headers()
        self._stream_zeros(chunked=False)

    def endless(self, arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._stream_zeros(chunked=True)

    def _stream_zeros(self, *, chunked: bool) -> None:
        block = bytes(1 << 16)
        frame = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
        self.close_connection = True
        for _ in range(1 << 16):  # 4 GiB at most: the client is expected to hang up long before
            try:
                self.wfile.write(frame)
            except OSError:
                return
            if self.httpd.stopping.is_set():
                return

    def gzip_bomb(self, arg: str) -> None:
        self._send(200, gzip_bomb(), "image/jpeg", Content_Encoding="gzip")

    def bomb_png(self, arg: str) -> None:
        self._send(200, bomb_png(50_000, 50_000), "image/png")


ROUTES: dict[str, Callable[[FaultHandler, str], None]] = {
    "status": FaultHandler.status,
    "retry-after": FaultHandler.retry_after,
    "flaky": FaultHandler.flaky,
    "reset": FaultHandler.reset,
    "truncated": FaultHandler.truncated,
    "html-as-jpeg": FaultHandler.html_as_jpeg,
    "garbage": FaultHandler.garbage,
    "stall": FaultHandler.stall,
    "slow-headers": FaultHandler.slow_headers,
    "drip": FaultHandler.drip,
    "redirect-loop": FaultHandler.redirect_loop,
    "redirect-scheme": FaultHandler.redirect_scheme,
    "redirect-bad": FaultHandler.redirect_bad,
    "redirect-to": FaultHandler.redirect_to,
    "slow-body": FaultHandler.slow_body,
    "huge": FaultHandler.huge,
    "endless": FaultHandler.endless,
    "gzip-bomb": FaultHandler.gzip_bomb,
    "bomb.png": FaultHandler.bomb_png,
}


@functools.cache
def gzip_bomb(size: int = 1 << 28) -> bytes:
    """``size`` zero bytes, gzip-compressed about 1000:1, made at once.

    A gzip stream may hold several members, decoded one after another: one compressed MiB of
    zeros, repeated, costs no CPU to build (a single 256 MiB compression holds the GIL ~1 s).
    """
    member = gzip.compress(bytes(1 << 20), compresslevel=9, mtime=0)
    return member * (size >> 20)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` grey pixels, with one row of data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


class FaultServer(StaticServer):
    """A StaticServer whose handler also answers the ``/_fault/`` routes."""

    def __init__(self, root: Path, port: int = 0) -> None:
        super().__init__(root, port, handler=FaultHandler)

    def fault(self, path: str) -> str:
        """The URL of a fault route, e.g. ``fault("status/404")``."""
        return self.url(f"{PREFIX[1:]}{path}")
