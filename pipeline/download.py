"""The download client: a pooled ``requests.Session`` per thread, bodies streamed under a byte cap.

``Downloader.fetch(job)`` returns a Fetched or raises a FetchError whose kind is one of
``errors.ERROR_KINDS``; every exception of requests and urllib3 is translated here, at the boundary.
A Session is not promised to be thread-safe, so each download thread gets its own, created on first
use and closed with the Downloader. Checks, in order: the URL (before any network call), the
per-host limit, then under the total deadline: retries (in the transport), the status, the
Content-Type allow-list, the Content-Length, and the byte cap while streaming.
"""

from __future__ import annotations

import contextlib
import fnmatch
import http.client
import threading
import time
from collections import Counter
from collections.abc import Iterator
from types import TracebackType
from urllib.parse import SplitResult, urlsplit

import requests
import urllib3.exceptions

from .budget import ByteBudget
from .config import DownloadConfig
from .deadline import DeadlineExceeded, Watchdog
from .errors import ConfigError, FetchError
from .hosts import DeadHosts
from .optout import refusal
from .records import Fetched, Job
from .transport import get, new_session

SCHEMES = ("http", "https")


class Downloader:
    """Fetches URLs from any number of threads, each with its own Session.

    Use it as a context manager: that starts the deadline watchdog and closes every Session after.
    """

    def __init__(self, config: DownloadConfig, budget: ByteBudget | None = None) -> None:
        self.config = config
        self.budget = budget  # a lane's: each chunk read waits for room in it
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._watchdog = Watchdog()
        self._hosts: Counter[str] = Counter()  # downloads running per host (per_host)
        self._slots = threading.Condition()
        self._cancelled = False
        self._dead = DeadHosts(config.host_failures)

    def fetch(self, job: Job) -> Fetched:
        """Download ``job.url`` whole, within the deadline, or raise a FetchError."""
        if job.problem is not None:
            raise FetchError("invalid_url", job.problem)
        host = self._dead.check(check_url(job.url))
        started = time.perf_counter()
        slot = self._host_slot(job.url) if self.config.per_host else contextlib.nullcontext()
        with slot, self._watchdog.deadline(self.config.deadline) as ticket:
            try:
                response, body = self._get(job.url)
            except (FetchError, DeadlineExceeded, *_TRANSPORT_ERRORS) as exc:
                self._dead.failed(host, exc)
                if _ours(exc):  # a header we send that the HTTP library refuses: no URL's fault
                    raise ConfigError("download.user_agent", f"is refused: {exc}") from None
                if ticket.fired or isinstance(exc, DeadlineExceeded):
                    raise self._past_deadline() from None
                raise exc if isinstance(exc, FetchError) else translate(exc) from exc
            self._dead.connected(host)
            if ticket.fired:  # a cut socket can look like a clean end: trust nothing read
                raise self._past_deadline()
        return Fetched(
            job=job,
            body=body,
            http_status=response.status_code,
            content_type=response.headers.get("Content-Type", ""),
            download_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _get(self, url: str) -> tuple[requests.Response, bytes]:
        with get(self._session(), url, self._timeout) as response:
            _check_response(response, self.config)
            return response, _read_body(response, self.config, self.budget)

    def _past_deadline(self) -> FetchError:
        limit = self.config.deadline
        return FetchError(
            "deadline", f"no complete response within download.deadline ({limit:g} s)"
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

    @contextlib.contextmanager
    def _host_slot(self, url: str) -> Iterator[None]:
        """At most ``per_host`` downloads from one host at a time (politeness, when set). A
        download waiting for its slot is cancelled with the others (``cancel``)."""
        host = (urlsplit(url).hostname or "").lower()
        with self._slots:
            self._slots.wait_for(
                lambda: self._cancelled or self._hosts[host] < self.config.per_host
            )
            if self._cancelled:
                raise FetchError("deadline", "cancelled while waiting for its host (per_host)")
            self._hosts[host] += 1
        try:
            yield
        finally:
            with self._slots:
                self._hosts[host] -= 1
                if not self._hosts[host]:
                    del self._hosts[host]
                self._slots.notify_all()  # a waiter for this host; the others wait on

    def cancel(self) -> None:
        """End every download now: those in progress fail as ``deadline`` at once, and those
        waiting for their host's slot never start."""
        with self._slots:
            self._cancelled = True
            self._slots.notify_all()
        self._watchdog.cut_all()

    def close(self) -> None:
        """Stop the watchdog and close every thread's Session (and its pooled connections)."""
        self._watchdog.close()
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> Downloader:
        self._watchdog.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_url(url: str) -> SplitResult:
    """Reject a URL that is malformed or not http/https before any network call; its parts."""
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
    return parts


def _check_response(response: requests.Response, config: DownloadConfig) -> None:
    """Reject an error status, a publisher's opt-out (X-Robots-Tag), or a Content-Type outside
    ``download.content_types``: all before a byte of the body is read."""
    code = response.status_code
    if 200 <= code < 300:
        _check_opt_out(response, config, code)
        _check_content_type(response.headers.get("Content-Type", ""), config.content_types, code)
        return
    message = f"HTTP {code} {response.reason or ''}".strip()
    if code >= 500:
        raise FetchError("http_5xx", message, code)
    if code >= 400:
        raise FetchError("http_4xx", message, code)
    raise FetchError("network", f"unexpected {message}", code)


def _check_opt_out(response: requests.Response, config: DownloadConfig, code: int) -> None:
    raw_headers = getattr(response.raw, "headers", None)
    if isinstance(raw_headers, urllib3.HTTPHeaderDict):  # each header on its own, not merged
        values = raw_headers.getlist("X-Robots-Tag")
    else:
        values = [response.headers.get("X-Robots-Tag", "")]
    directive = refusal(values, config.user_agent_token, config.disallowed_header_directives)
    if directive is not None:
        message = f"X-Robots-Tag {directive} (download.disallowed_header_directives)"
        raise FetchError("opted_out", message, code)


def _check_content_type(header: str, allowed: tuple[str, ...], code: int) -> None:
    media_type = header.partition(";")[0].strip().lower()
    if not allowed or not media_type:  # no list, or no header: let the decoder judge the bytes
        return
    if not any(fnmatch.fnmatchcase(media_type, pattern) for pattern in allowed):
        message = f"Content-Type {media_type} is not in download.content_types"
        raise FetchError("not_image", message, code)


def _read_body(
    response: requests.Response, config: DownloadConfig, budget: ByteBudget | None = None
) -> bytes:
    length = _content_length(response)
    if length is not None and length > config.max_bytes:
        raise FetchError(
            "too_large", f"Content-Length {length} > download.max_bytes {config.max_bytes}"
        )
    # a declared length that binds the read: not encoded (a decoded body can outgrow it), and
    # not chunked (then the length is ignored, and the server decides how much comes)
    if length is not None and not response.headers.get("Content-Encoding") and _bound(response):
        if budget is not None and length:  # room for the whole body, before it is read
            budget.take(length)
        body = _read_all(response)  # the declared length, no more: one read, no chunk loop
        if len(body) > length:  # http.client stops at the length: a guard, never expected
            raise FetchError("protocol", f"{len(body)} bytes sent for Content-Length {length}")
        return body
    # unknown length, or encoded (a decoded body can outgrow its Content-Length): read in chunks,
    # each counted; one read when the length is known and small (fewer chunks cost the GIL less)
    chunk_size = min(config.chunk_size, length + 1) if length else config.chunk_size
    chunks, size = [], 0
    for chunk in response.iter_content(chunk_size):
        chunks.append(chunk)
        size += len(chunk)
        if budget is not None:
            budget.take(len(chunk))
        if size > config.max_bytes:
            raise FetchError("too_large", f"body exceeds download.max_bytes {config.max_bytes}")
    # usually one chunk: returned as it is, not copied twice through a growing buffer
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _bound(response: requests.Response) -> bool:
    """True when the body's length is the declared one: not sent in chunks."""
    return not getattr(response.raw, "chunked", False)


def _read_all(response: requests.Response) -> bytes:
    """The whole body in one read of the urllib3 response, its errors wrapped as requests'
    ``iter_content`` wraps them (``translate`` reads the same exceptions either way)."""
    try:
        body: bytes = response.raw.read(decode_content=True)
    except urllib3.exceptions.ProtocolError as exc:
        raise requests.exceptions.ChunkedEncodingError(exc) from exc
    except urllib3.exceptions.DecodeError as exc:
        raise requests.exceptions.ContentDecodingError(exc) from exc
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise requests.exceptions.ConnectionError(exc) from exc
    except urllib3.exceptions.SSLError as exc:
        raise requests.exceptions.SSLError(exc) from exc
    return body


def _content_length(response: requests.Response) -> int | None:
    try:
        value = int(response.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return value if value >= 0 else None


def translate(exc: BaseException) -> FetchError:
    """Map an exception of requests, urllib3 or the socket layer to a FetchError kind.

    The message names the innermost cause (``[Errno 111] Connection refused``), not the wrappers.
    """
    chain = _chain(exc)
    cause = chain[-1]
    detail = str(cause) or type(cause).__name__
    if isinstance(exc, requests.exceptions.TooManyRedirects):
        return FetchError("too_many_redirects", str(exc))
    if isinstance(exc, requests.exceptions.InvalidSchema):  # the URL was checked: a redirect
        return FetchError("invalid_url", f"redirected to a URL that is not http/https: {exc}")
    if isinstance(exc, _BAD_URL) or _has(chain, urllib3.exceptions.LocationParseError):
        return FetchError("invalid_url", detail)
    if _has(chain, urllib3.exceptions.NameResolutionError):
        return FetchError("dns", f"cannot resolve the host: {detail}")
    if _has(chain, urllib3.exceptions.NewConnectionError):  # a ConnectTimeoutError subclass!
        return FetchError("connect", f"cannot connect: {detail}")
    if _has(chain, _TIMEOUTS):
        phase = "connect" if _has(chain, urllib3.exceptions.ConnectTimeoutError) else "read"
        return FetchError("timeout", f"no answer within the {phase} timeout")
    if _has(chain, _MALFORMED) and not _has(chain, _CUT_SHORT):
        return FetchError("protocol", f"a malformed answer: {detail}")
    if isinstance(exc, requests.exceptions.ChunkedEncodingError | urllib3.exceptions.ProtocolError):
        return FetchError("truncated", f"the body was cut short: {detail}")
    socket_error = isinstance(exc, OSError) and not isinstance(exc, requests.RequestException)
    if isinstance(exc, requests.exceptions.ConnectionError) or socket_error:  # (requests' errors
        return FetchError("connect", f"connection failed: {detail}")  # all subclass OSError)
    return FetchError("network", f"{type(exc).__name__}: {detail}")


# raised by requests, by urllib3 when a raw read escapes requests' wrapping, and by sockets
_TRANSPORT_ERRORS = (requests.RequestException, urllib3.exceptions.HTTPError, OSError)
# the server broke HTTP (a bad status line, too many headers, contradictory Content-Lengths,
# endless 1xx answers); but a connection closed early is no malformed answer
_MALFORMED = (http.client.HTTPException, urllib3.exceptions.InvalidHeader)
_CUT_SHORT = (http.client.IncompleteRead, http.client.RemoteDisconnected)
_BAD_URL = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema)
_TIMEOUTS = (
    requests.exceptions.Timeout,
    urllib3.exceptions.TimeoutError,
    TimeoutError,
)


def _ours(exc: BaseException) -> bool:
    """A header of our request refused by requests (the response's come wrapped from urllib3)."""
    return isinstance(exc, requests.exceptions.InvalidHeader) and not _has(
        _chain(exc), urllib3.exceptions.InvalidHeader
    )


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps, outermost first: via ``reason``, exception args, or cause."""
    chain: list[BaseException] = []
    item: BaseException | None = exc
    while item is not None and all(item is not seen for seen in chain):
        chain.append(item)
        inner = getattr(item, "reason", None)
        if not isinstance(inner, BaseException):
            inner = next((a for a in item.args if isinstance(a, BaseException)), None)
        item = inner or item.__cause__ or item.__context__
    return chain


def _has(
    chain: list[BaseException], kinds: type[BaseException] | tuple[type[BaseException], ...]
) -> bool:
    return any(isinstance(item, kinds) for item in chain)
