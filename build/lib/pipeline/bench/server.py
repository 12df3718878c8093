"""A static HTTP/1.1 file server on loopback, for the demo, the tests and ``pipeline serve``.

It binds 127.0.0.1 only. Connections are kept alive (so clients can pool them), handler threads
are not daemons, and closing the server shuts every open connection down and joins its thread,
so nothing outlives the ``with`` block.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, cast

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves files with keep-alive; logs requests at debug level instead of to stderr."""

    protocol_version = "HTTP/1.1"
    # headers and body go out in separate writes: with Nagle on, each answer would then wait for
    # the client's delayed ACK, 40 ms a request on a kept-alive connection
    disable_nagle_algorithm = True
    timeout = 30  # an idle keep-alive connection is closed after this many seconds

    @property
    def httpd(self) -> LoopbackHTTPServer:
        return cast(LoopbackHTTPServer, self.server)

    def setup(self) -> None:
        super().setup()
        self.httpd.track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.httpd.track(self.connection, add=False)

    def do_GET(self) -> None:
        if self.httpd.latency:  # a far-away server: each answer starts this much later
            self.httpd.stopping.wait(self.httpd.latency)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


class LoopbackHTTPServer(ThreadingHTTPServer):
    """Tracks its open connections so that closing it ends them; counts requests per token."""

    daemon_threads = False
    block_on_close = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any, latency: float = 0.0) -> None:
        super().__init__(address, handler)
        self.latency = latency
        self.stopping = threading.Event()  # set when closing: slow handlers stop waiting
        self._connections: set[socket.socket] = set()
        self._hits: Counter[str] = Counter()
        self._lock = threading.Lock()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client hanging up mid-response is routine here (a cap, a deadline): no traceback
        log.debug("connection from %s ended with an error", client_address, exc_info=True)

    def hit(self, token: str) -> int:
        """Count one more request for ``token``; returns how many there have been."""
        with self._lock:
            self._hits[token] += 1
            return self._hits[token]

    def track(self, connection: socket.socket, *, add: bool) -> None:
        with self._lock:
            (self._connections.add if add else self._connections.discard)(connection)

    def close_connections(self) -> None:
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):  # already closed by the client
                connection.shutdown(socket.SHUT_RDWR)


class StaticServer:
    """``with StaticServer(folder) as server: server.url("a.jpg")``, served from a thread.

    ``latency`` delays every answer by that many seconds, as a distant server would.
    """

    def __init__(
        self,
        root: Path,
        port: int = 0,
        handler: type[QuietHandler] = QuietHandler,
        *,
        latency: float = 0.0,
        host: str = HOST,
    ) -> None:
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError(f"{host} is not a loopback address: test servers serve loopback only")
        self.root = root
        self.host = host
        self._httpd = LoopbackHTTPServer(
            (host, port), partial(handler, directory=str(root)), latency
        )
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http-server")

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def url(self, path: str = "") -> str:
        return f"http://{self.host}:{self.port}/{path}"

    def start(self) -> StaticServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._httpd.stopping.set()
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.close_connections()
        self._httpd.server_close()  # joins the handler threads

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
