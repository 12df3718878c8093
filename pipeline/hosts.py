"""Dead hosts: a host that failed to connect ``download.host_failures`` times in a row is not
tried again by this lane, so a list full of one dead host's URLs costs no download capacity.

    fetch(url) --> DeadHosts.check(url): dead? --> FetchError(connect, "... not tried")
                     | no
                     v
                   download --> connected(host): its count is reset
                            \\-> failed(host, exc): a refused or timed-out connect, or no address,
                                 counts one more; an answer (a 404) resets it too

Memory is per lane and bounded (``KEPT`` hosts with failures, the oldest forgotten first). Skipped
URLs are failed as ``connect``, a transient kind: a rerun tries them again.
"""

from __future__ import annotations

import threading
from urllib.parse import SplitResult, urlsplit

import urllib3.exceptions

from .errors import FetchError, ItemError

KEPT = 100_000  # hosts remembered with failures, per lane (a host's key is a few dozen bytes)
# a connection that was never made: refused, unreachable, silent, or no address for the name
_NOT_CONNECTED = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                  urllib3.exceptions.NameResolutionError)  # fmt: skip


class DeadHosts:
    """Connect failures in a row, per ``host:port``; shared by a lane's download threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit  # 0: never give up on a host
        self._failures: dict[str, int] = {}
        self._lock = threading.Lock()

    def check(self, url: str | SplitResult) -> str:
        """The URL's host key; raise FetchError(connect) without a try if that host is dead.
        (A URL split already need not be split again.)"""
        parts = urlsplit(url) if isinstance(url, str) else url
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        host = f"{(parts.hostname or '').lower()}:{port}"
        if self.limit and self._failures.get(host, 0) >= self.limit:
            raise FetchError(
                "connect",
                f"host {parts.netloc} failed to connect {self.limit} times in a row; not tried",
            )
        return host

    def connected(self, host: str) -> None:
        if host in self._failures:  # (a plain read: most hosts never failed)
            with self._lock:
                self._failures.pop(host, None)

    def failed(self, host: str, exc: BaseException) -> None:
        """Count ``exc`` against ``host`` if it is a connection that was never made to it (and
        not to a host a redirect led to, which fails on its own account)."""
        if not self.limit:
            return
        if not _never_connected(exc, host):
            if isinstance(exc, ItemError) and exc.http_status is not None:  # it answered: alive
                self.connected(host)
            return  # (connected, then no answer: neither alive nor dead)
        with self._lock:
            self._failures[host] = self._failures.pop(host, 0) + 1  # now the newest
            if len(self._failures) > KEPT:
                for old in list(self._failures)[: KEPT // 2]:
                    del self._failures[old]


def _never_connected(exc: BaseException, host: str) -> bool:
    item: BaseException | None = exc
    seen: list[BaseException] = []
    pool = None
    while item is not None and all(item is not s for s in seen):
        seen.append(item)
        if isinstance(item, urllib3.exceptions.MaxRetryError):
            pool = item.pool or pool  # where it tried last
        if isinstance(item, _NOT_CONNECTED):
            where = None if pool is None else f"{str(pool.host).lower()}:{pool.port}"
            return where is None or where == host
        inner = getattr(item, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in item.args if isinstance(a, BaseException)), None)
        item = inner or item.__cause__ or item.__context__
    return False
