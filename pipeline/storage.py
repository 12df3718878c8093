"""Where a run reads and writes: a local folder, or an object store named by an fsspec URL.

    parse_location(text, options, what) -> Path | Location
        a plain path          a local folder or file, exactly as it always was (``Path(text)``)
        file:///abs/path      the same local path
        s3:// gs:// az:// memory://   a Location: the URL, its scheme, and its storage options
        any other ``x://``    one line (PipelineError), never a local folder named ``x:``
A scheme whose filesystem package is not installed is one line naming the extra that installs it
(``s3``: s3fs, ``gcs``: gcsfs, ``azure``: adlfs), said before any work. Credentials come from
each store's own chain (for S3 the ``AWS_*`` variables, ``AWS_ENDPOINT_URL``, profiles, instance
roles) or from ``input.storage_options``; ``redact`` and
``redact_options`` are what a URL or options look like wherever they are shown or recorded: a
password in a URL and any option that looks like a secret are never printed, logged or written.

Input files in a store are ``StoredFile``s: listed with ``list_stored`` and opened as a stream of
bytes (``open_stored``), read as they arrive, never copied whole first.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from .errors import PipelineError, SourceError, require

#: scheme -> (the module its filesystem needs, the extra of this project that installs it, a name)
SCHEMES: dict[str, tuple[str, str, str]] = {
    "s3": ("s3fs", "s3", "S3"),
    "s3a": ("s3fs", "s3", "S3"),
    "gs": ("gcsfs", "gcs", "Google Cloud Storage"),
    "gcs": ("gcsfs", "gcs", "Google Cloud Storage"),
    "az": ("adlfs", "azure", "Azure Blob Storage"),
    "abfs": ("adlfs", "azure", "Azure Blob Storage"),
    "abfss": ("adlfs", "azure", "Azure Blob Storage"),
    "memory": ("fsspec", "", "memory"),  # fsspec's own, in one process: for trying things out
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SECRET = re.compile(r"secret|passw|token|credential|signature|^sig$|^sas|^key|key$|_key", re.I)
HIDDEN = "***"


def scheme_of(text: str) -> str | None:
    """The scheme of ``text`` when it is a URL (``s3://...``), lower-case; None for a plain path."""
    match = _URL.match(text)
    return match.group(1).lower() if match else None


@dataclass(frozen=True, slots=True)
class Location:
    """A folder (or file) in an object store: ``url`` as given, with its storage options."""

    url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return scheme_of(self.url) or ""

    @property
    def path(self) -> str:
        """The URL without its scheme, no trailing slash: ``bucket/prefix``."""
        return self.url.split("://", 1)[1].rstrip("/")

    def __str__(self) -> str:
        return redact(self.url)

    def __repr__(self) -> str:  # a Location in a log line or a traceback shows no secret either
        return f"Location({redact(self.url)!r}, {redact_options(self.options)!r})"

    def filesystem(self) -> Any:
        """The fsspec filesystem of this location (made once per options, cached by fsspec)."""
        import fsspec

        return fsspec.filesystem(self.scheme, **dict(self.options))

    def child(self, key: str) -> str:
        """The full URL of ``key``, a path inside the store as fsspec lists it (``bucket/k``)."""
        return f"{self.scheme}://{key.lstrip('/')}"


def parse_location(
    text: str, options: Mapping[str, Any] | None = None, *, what: str = "output.dir"
) -> Path | Location:
    """A plain path as the local Path it always was; a URL as a Location whose filesystem package
    is installed. Raises PipelineError (one line, naming ``what``) for an unknown scheme or a
    missing package."""
    scheme = scheme_of(text)
    if scheme is None:
        return Path(text)
    if scheme == "file":
        local = urlsplit(text)
        if local.netloc not in ("", "localhost"):
            raise PipelineError(f"{what} {redact(text)}: a file:// URL names no host (file:///abs)")
        return Path(local.path or "/")
    if scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in ("s3", "gs", "az", "file", "memory"))
        raise PipelineError(
            f"{what} {redact(text)}: unknown storage scheme {scheme!r} (known: {known}; a plain "
            "path is a local folder)"
        )
    module, extra, name = SCHEMES[scheme]
    if extra:
        require(module, extra, f"{what} {redact(text)} ({name})")
    if not text.split("://", 1)[1].strip("/"):
        raise PipelineError(f"{what} {redact(text)}: names no bucket or container")
    if "@" in urlsplit(text).netloc:
        raise PipelineError(
            f"{what} {redact(text)}: credentials go in the store's own settings (for S3 the "
            "AWS_* variables or a profile) or in storage_options, never in the URL"
        )
    return Location(text, dict(options or {}))


def redact(url: str) -> str:
    """``url`` as it may be shown: a password in it and secret-looking query values hidden."""
    if scheme_of(url) is None:
        return url
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{HIDDEN}@{host}" if ":" in user else f"{HIDDEN}@{host}"
    query = "&".join(
        f"{k}={HIDDEN}" if _SECRET.search(k) else f"{k}={v}" if sep else k
        for k, sep, v in (pair.partition("=") for pair in parts.query.split("&") if pair)
    )
    shown = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    if not netloc:  # urlunsplit drops the // of an empty host: s3:///x would show as s3:/x
        shown = f"{parts.scheme}://{shown.split(':', 1)[1].removeprefix('//')}"
    return shown


def redact_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Storage options as they may be shown or recorded: secret-looking values hidden, nested
    tables (``client_kwargs``) too."""
    shown: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, Mapping):
            shown[key] = redact_options(value)
        elif _SECRET.search(str(key)) and not isinstance(value, bool):
            shown[key] = HIDDEN
        else:
            shown[key] = value
    return shown


# --- input files in a store -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One input file in an object store: ``key`` is its path there (``bucket/urls/a.txt``)."""

    location: Location
    key: str

    @property
    def url(self) -> str:
        return self.location.child(self.key)

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    def __str__(self) -> str:
        return redact(self.url)


def failures() -> tuple[type[Exception], ...]:
    """What a store's client raises when a request fails: OSError (s3fs translates S3's errors)
    and ValueError, and botocore's own errors, which s3fs passes on as they are (a refused
    connection: EndpointConnectionError). botocore is looked up only where a client loaded it."""
    botocore = sys.modules.get("botocore.exceptions")
    return (
        (OSError, ValueError) if botocore is None else (OSError, ValueError, botocore.BotoCoreError)
    )


def list_stored(location: Location) -> list[StoredFile] | None:
    """The files below ``location`` (itself, when it is a file), sorted; None when nothing is
    there. Raises SourceError (one line) when the store cannot be listed."""
    fs = location.filesystem()
    base = fs._strip_protocol(location.url).rstrip("/")  # the store's own form of the path
    try:
        if fs.isfile(base):
            return [StoredFile(location, base)]
        keys = sorted(fs.find(base))
    except failures() as exc:  # s3fs: PermissionError, FileNotFoundError, ...
        raise SourceError(f"{location}: cannot list: {_why(exc)}") from None
    return [StoredFile(location, key) for key in keys] or None


def open_stored(file: StoredFile) -> IO[bytes]:
    """A stream of the file's bytes, fetched in blocks as they are read. Raises OSError."""
    fs = file.location.filesystem()
    stream: IO[bytes] = fs.open(file.key, "rb")
    return stream


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
