"""The download client: a pooled ``requests.Session`` per thread, bodies streamed under a byte cap.

``Downloader.fetch(job)`` returns a Fetched or raises a FetchError whose kind is one of
``errors.ERROR_KINDS``; every exception of requests and urllib3 is translated here, at the boundary.
A Session is not promised to be thread-safe, so each download thread gets its own, created on first
use and closed with the Downloader.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter

from .config import DownloadConfig
from .errors import FetchError
from .records import Fetched, Job

SCHEMES = ("http", "https")


class Downloader:
    """Fetches URLs from any number of threads, each with its own Session."""

    def __init__(self, config: DownloadConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def fetch(self, job: Job) -> Fetched:
        check_url(job.url)
        started = time.perf_counter()
        try:
            with self._session().get(job.url, stream=True, timeout=self._timeout) as response:
                _check_status(response)
                body = _read_body(response, self.config)
        except requests.RequestException as exc:
            raise translate(exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:  # raised by a raw read, unwrapped
            raise translate(exc) from exc
        return Fetched(
            job=job,
            body=body,
            http_status=response.status_code,
            content_type=response.headers.get("Content-Type", ""),
            download_ms=(time.perf_counter() - started) * 1000,
        )

    @property
    def _timeout(self) -> tuple[float, float]:
        return (self.config.connect_timeout, self.config.read_timeout)

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = new_session(self.config)
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        """Close every thread's Session (and so its pooled connections)."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> Downloader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def new_session(config: DownloadConfig) -> requests.Session:
    """A Session for one thread: pooled keep-alive connections, no environment proxies/netrc."""
    session = requests.Session()
    session.trust_env = False  # no proxy/netrc look-ups per request; loopback stays loopback
    adapter = HTTPAdapter(pool_connections=32, pool_maxsize=2, max_retries=0)
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


def check_url(url: str) -> None:
    """Reject a URL that is malformed or not http/https before any network call."""
    try:
        url.encode("utf-8")
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except (UnicodeError, ValueError) as exc:
        raise FetchError("invalid_url", f"malformed URL: {exc}") from None
    if parts.scheme.lower() not in SCHEMES:
        raise FetchError("invalid_url", f"scheme {parts.scheme or '(none)'!r} is not http or https")
    if not parts.hostname:
        raise FetchError("invalid_url", "the URL has no host")


def _check_status(response: requests.Response) -> None:
    code = response.status_code
    if 200 <= code < 300:
        return
    message = f"HTTP {code} {response.reason or ''}".strip()
    if code >= 500:
        raise FetchError("http_5xx", message, code)
    if code >= 400:
        raise FetchError("http_4xx", message, code)
    raise FetchError("network", f"unexpected {message}", code)


def _read_body(response: requests.Response, config: DownloadConfig) -> bytes:
    length = _content_length(response)
    if length is not None and length > config.max_bytes:
        raise FetchError(
            "too_large", f"Content-Length {length} > download.max_bytes {config.max_bytes}"
        )
    # one read when the length is known and small: fewer, larger chunks cost the GIL less
    chunk_size = min(config.chunk_size, length + 1) if length else config.chunk_size
    body = bytearray()
    for chunk in response.iter_content(chunk_size):
        body += chunk
        if len(body) > config.max_bytes:
            raise FetchError("too_large", f"body exceeds download.max_bytes {config.max_bytes}")
    return bytes(body)


def _content_length(response: requests.Response) -> int | None:
    try:
        value = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def translate(exc: BaseException) -> FetchError:
    """Map an exception of requests, urllib3 or the socket layer to a FetchError kind."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return FetchError("too_many_redirects", text)
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.InvalidSchema):
        return FetchError("invalid_url", text)
    if isinstance(exc, requests.exceptions.MissingSchema | urllib3.exceptions.LocationParseError):
        return FetchError("invalid_url", text)
    if _caused_by(exc, urllib3.exceptions.NameResolutionError):
        return FetchError("dns", text)
    if isinstance(exc, requests.exceptions.Timeout) or _caused_by(exc, TimeoutError):
        return FetchError("timeout", text)
    if _caused_by(
        exc, urllib3.exceptions.ReadTimeoutError | urllib3.exceptions.ConnectTimeoutError
    ):
        return FetchError("timeout", text)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | urllib3.exceptions.ProtocolError):
        return FetchError("truncated", text)
    if isinstance(exc, requests.exceptions.ConnectionError | OSError):
        return FetchError("connect", text)
    return FetchError("network", text)


def _caused_by(
    exc: BaseException, kinds: type[BaseException] | tuple[type[BaseException], ...] | object
) -> bool:
    """True if ``exc`` or anything it wraps (args, reason, cause, context) is one of ``kinds``."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        item = todo.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, kinds):  # type: ignore[arg-type]
            return True
        todo.extend([*item.args, getattr(item, "reason", None), item.__cause__, item.__context__])
    return False
