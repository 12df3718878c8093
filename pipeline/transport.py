"""The HTTP transport under each download thread's Session: pooled connections that the deadline
watchdog can cut, and urllib3 retries that respect the deadline.

    requests.Session (one per thread, trust_env=False, Accept-Encoding: identity)
      +-- WatchedAdapter (an HTTPAdapter)      max_retries = DeadlineRetry
            +-- PoolManager -> Watched{HTTP,HTTPS}ConnectionPool -> Watched*Connection
                  _new_conn(): the connected address is checked by the AddressGuard
                  connect()/request(): register the socket with this thread's deadline Ticket

Retries are urllib3's: dropped or reset connections and 429/500/502/503/504, with exponential
backoff and jitter (not a refused or silent connect, a read timeout or a malformed answer).
``Retry-After`` is honoured up to ``download.retry_after_max``, and no backoff sleeps past the
download's deadline. http.client's responses read at most MAX_INTERIM ``100 Continue`` answers.
The adapter sends through ``download.proxy`` (proxies.py), except to NO_PROXY and loopback hosts.

``get(session, url)`` is ``session.get(url, stream=True)`` without the Session's per-request work
(settings merged, hooks, the cookie jar, a request built and prepared field by field): the URL is
prepared as requests prepares it, and the request goes straight to the mounted adapter's ``send``;
a redirect is followed by the Session's own ``resolve_redirects`` (its limits, its errors). Through
a proxy, the whole Session does it (its Proxy-Authorization, its proxy choice per URL).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import re
import socket
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.cookies import RequestsCookieJar
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ProtocolError, ReadTimeoutError
from urllib3.response import BaseHTTPResponse
from urllib3.util.retry import Retry

from . import deadline
from .config import DownloadConfig
from .errors import FetchError
from .headers import parse_headers, read_lines
from .proxies import Proxies

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class DeadlineRetry(Retry):
    """urllib3's Retry, with Retry-After capped and every sleep bounded by the deadline."""

    retry_after_cap: float = 15.0

    def new(self, **kw: Any) -> DeadlineRetry:
        retry = super().new(**kw)
        retry.retry_after_cap = self.retry_after_cap  # Retry.new() rebuilds from __init__ args
        return retry

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> DeadlineRetry:
        """As Retry's, but a read timeout is never retried: a server that did not answer within
        read_timeout rarely answers the next time, and each try would hold a thread as long again.
        Nor is a connection refused or not answered (ConnectTimeoutError covers both): the host
        said no, or is silent, and each backoff would hold a thread; a rerun tries again. Nor is a
        malformed answer, which the same server sends again. A dropped or reset connection is
        retried (a kept-alive socket closed by the server, usually)."""
        if isinstance(error, ReadTimeoutError | ConnectTimeoutError) or _malformed(error):
            raise MaxRetryError(_pool, url or "", error) from error
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        assert isinstance(retry, DeadlineRetry)
        return retry

    def parse_retry_after(self, retry_after: str) -> float:
        return min(super().parse_retry_after(retry_after), self.retry_after_cap)

    def sleep(self, response: BaseHTTPResponse | None = None) -> None:
        wait = None
        if self.respect_retry_after_header and response is not None:
            wait = self.get_retry_after(response)
        deadline.sleep(self.get_backoff_time() if wait is None else wait)


class AddressGuard:
    """Which addresses a download may connect to: checked on the address a socket is actually
    connected to, so a name that resolves to an internal address, and a redirect to one, are
    caught as surely as a URL that names it; no request byte (nor a TLS hello) is sent first."""

    def __init__(self, deny: tuple[str, ...], allow_private: bool) -> None:
        self.deny = tuple(_plain(ipaddress.ip_network(network, strict=False)) for network in deny)
        self.allow_private = allow_private

    def check(self, address: str) -> None:
        """Raise FetchError(blocked_address) when ``address`` may not be connected to."""
        ip = ipaddress.ip_address(address.partition("%")[0])  # fe80::1%eth0: no zone
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:169.254.169.254 is 169.254.169.254
        for network in self.deny:
            if ip in network:
                raise FetchError("blocked_address", f"{ip} is in download.deny_networks {network}")
        if not self.allow_private and not ip.is_global:
            raise FetchError(
                "blocked_address",
                f"{ip} is a private, loopback or reserved address (download.allow_private)",
            )


def _plain(network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    """``::ffff:10.0.0.0/104`` is ``10.0.0.0/8``: addresses are compared in their IPv4 form."""
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(mapped):
        first = network.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{first}/{max(0, network.prefixlen - 96)}")
    return network


MAX_INTERIM = 16  # 1xx answers before the real one, at most (http.client reads any number)


class InterimFlood(http.client.HTTPException):
    """A server sent more than MAX_INTERIM ``100 Continue`` answers: a malformed answer."""


class BoundedResponse(http.client.HTTPResponse):
    """http.client's response, reading at most MAX_INTERIM ``100 Continue`` before the status
    that counts (http.client loops over them without limit), none past the deadline, and its
    headers without the email parser where they are plain (headers.py)."""

    def begin(self) -> None:
        """http.client's ``begin``, with those three changes."""
        if self.headers is not None:
            return
        for _ in range(MAX_INTERIM + 1):
            deadline.check()
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            read_lines(self.fp)  # its headers: skipped
        else:
            raise InterimFlood(f"more than {MAX_INTERIM} interim (1xx) answers")
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11  # HTTP/1.x, x >= 1
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = parse_headers(self.fp)
        self._framing(status)

    def _framing(self, status: int) -> None:
        """Chunked or not, the body's length, and whether the connection closes after it: as
        http.client's ``begin`` decides them."""
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding and encoding.lower() == "chunked")
        if self.chunked:
            self.chunk_left = None
        self.will_close = self._check_close()  # type: ignore[attr-defined]
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            with contextlib.suppress(ValueError):
                self.length = int(length)
            if self.length is not None and self.length < 0:  # nonsensical: ignored
                self.length = None
        bodiless = status in (204, 304) or 100 <= status < 200
        if bodiless or self._method == "HEAD":  # type: ignore[attr-defined]
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True  # no length, not chunked: the body ends when the server closes


def _malformed(error: Exception | None) -> bool:
    """A ProtocolError wrapping a broken answer (not a connection closed early)."""
    if not isinstance(error, ProtocolError):
        return False
    inner = next((a for a in error.args if isinstance(a, BaseException)), None)
    cut_short = (http.client.IncompleteRead, http.client.RemoteDisconnected)
    return isinstance(inner, http.client.HTTPException) and not isinstance(inner, cut_short)


class _Watched:
    """Mixed into urllib3's connections: tell the deadline watchdog which socket is in use, and
    check the address each new socket is connected to."""

    sock: Any
    _dns_host: str
    guard: AddressGuard | None = None  # set on the classes an adapter makes
    response_class: type[http.client.HTTPResponse] = BoundedResponse

    def _new_conn(self) -> socket.socket:
        # a connection to download.proxy is not checked (the adapter checked the URL, in send)
        guard = None if getattr(self, "proxy", None) else self.guard
        if guard is not None:  # an address in the URL: refused before connecting (on
            with contextlib.suppress(ValueError):  # Linux, 0.0.0.0 reaches 127.0.0.1 itself)
                guard.check(str(ipaddress.ip_address(self._dns_host.strip("[]"))))
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        if guard is not None:
            try:
                guard.check(sock.getpeername()[0])
            except BaseException:
                sock.close()
                raise
        return sock

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


_POOL_ATTRIBUTES = 1024  # origins whose pool attributes an adapter keeps (then it starts again)


class WatchedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools make watched connections, checked by ``guard``; with a proxy,
    the hosts of ``proxies.no_proxy`` go direct."""

    def __init__(
        self, guard: AddressGuard | None = None, proxies: Proxies | None = None, **kwargs: Any
    ) -> None:
        self.guard = guard  # before super().__init__, which calls init_poolmanager
        self.proxies = proxies or Proxies({})
        # a pool's attributes by URL origin (and verify, cert): parsed once, not per request
        self._pools: dict[tuple[str, Any, Any], tuple[Any, Any]] = {}
        super().__init__(**kwargs)

    def send(  # type: ignore[override]
        self, request: requests.PreparedRequest, proxies: Any = None, **kwargs: Any
    ) -> requests.Response:
        if proxies:  # (without one, the URL need not be parsed here)
            host = urlsplit(request.url or "").hostname or ""
            if self.proxies.bypass(host):
                proxies = None
            elif self.guard is not None:  # the proxy resolves names: only an address in the
                with contextlib.suppress(ValueError):  # URL can be checked here
                    self.guard.check(str(ipaddress.ip_address(host)))
        return super().send(request, proxies=proxies, **kwargs)

    # Without a proxy, the choices HTTPAdapter.send makes per request are known: no proxy to
    # look up in the URL (select_proxy parses it, twice), no cookie jar to fill.

    def get_connection_with_tls_context(
        self, request: requests.PreparedRequest, verify: Any, proxies: Any = None, cert: Any = None
    ) -> Any:
        if proxies:
            return super().get_connection_with_tls_context(request, verify, proxies, cert)
        url = request.url or ""
        origin = url[: url.find("/", url.find("//") + 2)]  # scheme://host:port (a prepared URL
        key = (origin, verify, cert)  # has a path): what the pool's attributes depend on
        attributes: tuple[Any, Any] | None = self._pools.get(key)
        if attributes is None:
            try:
                attributes = self.build_connection_pool_key_attributes(request, verify, cert)
            except ValueError as exc:
                raise requests.exceptions.InvalidURL(exc, request=request) from exc
            if len(self._pools) >= _POOL_ATTRIBUTES:
                self._pools.clear()
            self._pools[key] = attributes
        host, pool_kwargs = attributes
        return self.poolmanager.connection_from_host(**host, pool_kwargs=pool_kwargs)

    def request_url(self, request: requests.PreparedRequest, proxies: Any) -> str:
        return request.path_url if not proxies else super().request_url(request, proxies)

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        """As HTTPAdapter's, without the response's cookie jar (the Session fills its own where
        it follows a redirect) or its text encoding (bodies are bytes)."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = requests.structures.CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url or ""
        response.request = req
        response.connection = self
        if response.is_redirect and not _small(resp):
            _skip_body(response)
        return response

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self._pool_classes()

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = self._pool_classes()  # watched through a proxy too
        return manager

    def _pool_classes(self) -> dict[str, type[HTTPConnectionPool]]:
        guard = {"guard": self.guard}
        http = type("GuardedHTTPConnection", (WatchedHTTPConnection,), guard)
        https = type("GuardedHTTPSConnection", (WatchedHTTPSConnection,), guard)
        return {
            "http": type("GuardedHTTPPool", (WatchedHTTPConnectionPool,), {"ConnectionCls": http}),
            "https": type(
                "GuardedHTTPSPool", (WatchedHTTPSConnectionPool,), {"ConnectionCls": https}
            ),
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


# A URL that requests' prepare_url leaves as it is: scheme and host in lower case, a port without
# leading zeros, a path, nothing to quote, unquote or normalise (no %, no dot segment, no fragment)
_PLAIN_URL = re.compile(
    r"https?://[a-z0-9][a-z0-9.-]*(?::[1-9][0-9]{0,4})?/[A-Za-z0-9_~!$&'()*+,;=:@/?.-]*"
)


def prepared_url(url: str) -> str:
    """``url`` as requests prepares it (IDNA, quoting, dot segments, an empty path made ``/``)."""
    if _PLAIN_URL.fullmatch(url) and "/." not in url and not url.endswith("?"):
        return url  # nothing to change: no need to parse it twice
    request = requests.PreparedRequest()
    request.prepare_url(url, None)
    return request.url or url


_DRAINED = 64 << 10  # a redirect's body up to this is read, so its connection is kept alive


def _small(resp: Any) -> bool:
    """Whether a response's body is declared, not chunked, and small enough to drain."""
    try:
        length = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return False
    return not getattr(resp, "chunked", False) and 0 <= length <= _DRAINED


def _skip_body(response: requests.Response) -> None:
    """A redirect's body is never used, but requests reads it whole to free the connection: a
    server could send gigabytes, or never end it. Its connection is closed instead."""
    response.raw.close()
    response._content = b""  # what requests then reads as the body
    response._content_consumed = True  # type: ignore[attr-defined]


def get(session: requests.Session, url: str, timeout: tuple[float, float]) -> requests.Response:
    """``session.get(url, stream=True, timeout=timeout)``, for a fraction of its CPU (see above)."""
    if session.proxies:
        return session.get(url, stream=True, timeout=timeout)
    request = requests.PreparedRequest()
    request.method = "GET"
    request.url = prepared_url(url)
    request.headers = session.headers.copy()  # type: ignore[attr-defined]  # new_session checked
    request.hooks = {"response": []}
    options: dict[str, Any] = {"stream": True, "timeout": timeout, "verify": True, "cert": None}
    adapter = session.get_adapter(request.url or url)
    response: requests.Response = adapter.send(request, proxies={}, **options)
    if not response.is_redirect:
        return response
    request._cookies = RequestsCookieJar()  # type: ignore[attr-defined]  # resolve_redirects' own
    history = [response, *session.resolve_redirects(response, request, proxies={}, **options)]
    final: requests.Response = history.pop()
    final.history = history
    return final


def new_session(config: DownloadConfig) -> requests.Session:
    """A Session for one thread: pooled keep-alive connections, download.proxy, no netrc."""
    session = requests.Session()
    session.trust_env = False  # no proxy/netrc look-ups per request: download.proxy, once
    session.max_redirects = config.max_redirects
    guard = AddressGuard(config.deny_networks, config.allow_private)
    proxies = Proxies.resolve(config.proxy)
    session.proxies = dict(proxies.proxies)
    adapter = WatchedAdapter(
        guard, proxies, pool_connections=32, pool_maxsize=2, max_retries=make_retry(config)
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers.update(
        {
            "User-Agent": config.full_user_agent,
            "Accept": "image/*,*/*;q=0.5",
            "Accept-Encoding": "identity",  # a compressed body could expand past max_bytes
        }
    )
    requests.PreparedRequest().prepare_headers(session.headers)  # raises InvalidHeader: get()
    return session  # sends them unchecked
