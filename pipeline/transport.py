"""The HTTP transport under each download thread's Session: pooled connections that the deadline
watchdog can cut, and urllib3 retries that respect the deadline.

    requests.Session (one per thread, trust_env=False, Accept-Encoding: identity)
      +-- WatchedAdapter (an HTTPAdapter)      max_retries = DeadlineRetry
            +-- PoolManager -> Watched{HTTP,HTTPS}ConnectionPool -> Watched*Connection
                  connect()/request(): register the socket with this thread's deadline Ticket

Retries are urllib3's: connect and read errors, and 429/500/502/503/504, with exponential backoff
and jitter. ``Retry-After`` is honoured up to ``download.retry_after_max``, and no backoff sleeps
past the download's deadline.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from . import deadline
from .config import DownloadConfig

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class DeadlineRetry(Retry):
    """urllib3's Retry, with Retry-After capped and every sleep bounded by the deadline."""

    retry_after_cap: float = 15.0

    def new(self, **kw: Any) -> DeadlineRetry:
        retry = super().new(**kw)
        retry.retry_after_cap = self.retry_after_cap  # Retry.new() rebuilds from __init__ args
        return retry

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.retry_after_cap)

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        wait = None
        if self.respect_retry_after_header and response is not None:
            wait = self.get_retry_after(response)
        deadline.sleep(self.get_backoff_time() if wait is None else wait)


class _Watched:
    """Mixed into urllib3's connections: tell the deadline watchdog which socket is in use."""

    sock: Any

    def connect(self) -> None:
        deadline.check()
        super().connect()  # type: ignore[misc]
        deadline.attach(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline.check()
        deadline.attach(self.sock)  # a kept-alive connection: its socket is already open
        super().request(*args, **kwargs)  # type: ignore[misc]


class WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class WatchedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = WatchedHTTPConnection


class WatchedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = WatchedHTTPSConnection


class WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools make watched connections."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": WatchedHTTPConnectionPool,
            "https": WatchedHTTPSConnectionPool,
        }


def make_retry(config: DownloadConfig) -> DeadlineRetry:
    retry = DeadlineRetry(
        total=config.retries,
        connect=config.retries,
        read=config.retries,
        status=config.retries,
        other=0,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=config.backoff,
        backoff_max=config.backoff_max,
        backoff_jitter=config.backoff_jitter,
        raise_on_status=False,  # the last 5xx/429 comes back as a response: an http_* record
        respect_retry_after_header=True,
    )
    retry.retry_after_cap = config.retry_after_max
    return retry


def new_session(config: DownloadConfig) -> requests.Session:
    """A Session for one thread: pooled keep-alive connections, no environment proxies/netrc."""
    session = requests.Session()
    session.trust_env = False  # no proxy/netrc look-ups per request; loopback stays loopback
    session.max_redirects = config.max_redirects
    adapter = WatchedAdapter(pool_connections=32, pool_maxsize=2, max_retries=make_retry(config))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(
        {
            "User-Agent": config.user_agent,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",  # a compressed body could expand past max_bytes
        }
    )
    return session
