"""The exceptions of the pipeline, and the fixed set of error kinds a failed URL is recorded with.

    PipelineError            a problem with the run itself: the CLI prints it as one line, exits 2
     +-- ConfigError         a bad config key or value (names the key)
     +-- SourceError         an unreadable URL file or folder (names the file)
     |    +-- UnreadableSource   one input file cannot be read (corrupt, truncated, no URL
     |                           column): the other files are read; the run ends with it
     +-- OutputError         the output folder cannot be written: a full disk, a symlink in the
                             way, no permission (names the path); the run stops cleanly
    ItemError                one URL failed: becomes a manifest row, never stops the run
     +-- FetchError          while downloading (raised in a download thread)
     +-- TransformError      while decoding, transforming or encoding (raised in a pool worker)
     +-- Filtered            refused by a filter (transform.min_width, ...): a "filtered" row

Every exception from requests, urllib3, Pillow or the OS is translated into one of these where it
crosses into our code; anything else that escapes is a bug and stops the run.
"""

from __future__ import annotations

import errno
import importlib
import resource
from typing import Any, Final

#: The error kinds a manifest row may carry, and what each means. Fixed: users rely on them.
#: ``TRANSIENT`` ones may succeed another time: a rerun retries them; the others are final.
ERROR_KINDS: Final[dict[str, str]] = {
    "invalid_url": "the URL is malformed or not http/https",
    "dns": "the host name could not be resolved",
    "connect": "the connection was refused, reset or failed",
    "timeout": "the server did not answer within the connect/read timeout",
    "deadline": "the whole download took longer than its deadline",
    "http_4xx": "the server answered with a 4xx status",
    "http_5xx": "the server answered with a 5xx status",
    "too_many_redirects": "the redirect limit was exceeded",
    "too_large": "the body is larger than download.max_bytes",
    "not_image": "the body is not a recognised image",
    "truncated": "the body ended before it was complete",
    "decode_error": "the image is recognised but could not be decoded",
    "decompression_bomb": "the image has more pixels than transform.max_pixels",
    "transform_error": "an op of the transform chain failed",
    "write_error": "(older manifests) the output file could not be written; now the run stops",
    "worker_crash": "the transform process died while handling this image",
    "transform_timeout": "the transform took longer than transform.timeout (its process killed)",
    "network": "another network error",
    "blocked_address": "the host's address is denied (download.deny_networks, allow_private)",
    "hash_mismatch": "the downloaded bytes are not those whose sha256 input.hash_column gives",
    "internal_error": "the transform raised an unexpected exception (a bug): a rerun retries it",
    "too_small": "(filtered) narrower than transform.min_width or lower than min_height",
    "aspect_ratio": "(filtered) more elongated than transform.max_aspect_ratio",
    "opted_out": "the server's X-Robots-Tag opts out (download.disallowed_header_directives)",
    "protocol": "the server's answer breaks HTTP: a malformed or contradictory header, endless 1xx",
    "upload": "the output could not be put into the object store (output.dir s3://...)",
}
#: The kinds of a row with status "filtered": the image is fine, the config leaves it out.
FILTER_KINDS: Final[frozenset[str]] = frozenset({"too_small", "aspect_ratio"})

TRANSIENT_KINDS: Final[frozenset[str]] = frozenset(
    {"dns", "connect", "timeout", "deadline", "http_5xx", "truncated", "network", "write_error",
     "worker_crash", "internal_error", "upload"}
)  # fmt: skip
TRANSIENT_HTTP_STATUSES: Final[frozenset[int]] = frozenset({408, 425, 429})


def is_final(kind: str | None, http_status: int | None = None) -> bool:
    """True if a row with this error kind (None: ok) needs no retry on a rerun."""
    if kind is None:
        return True
    return kind not in TRANSIENT_KINDS and http_status not in TRANSIENT_HTTP_STATUSES


class PipelineError(Exception):
    """A problem that stops the whole run; its message is one line for the user.

    ``report`` is the run's report when the problem was found after the run had done its work
    (an input file that could not be read, a full disk): the CLI shows it before the line.
    """

    report: Any = None


class ConfigError(PipelineError):
    """A config key or value is wrong. ``key`` is the dotted key, e.g. ``download.workers``."""

    def __init__(self, key: str, message: str, source: str = "") -> None:
        super().__init__(key, message, source)
        self.key = key
        self.message = message
        self.source = source

    def __str__(self) -> str:
        text = f"{self.key} {self.message}" if self.key else self.message
        return f"{self.source}: {text}" if self.source else text


class SourceError(PipelineError):
    """A URL source (file or folder) cannot be read."""


class UnreadableSource(SourceError):
    """One input file cannot be read; it never blocks the others (the run names it at its end)."""


class OutputError(PipelineError):
    """Something under the output folder cannot be written; the run stops, keeping what it has."""


class ItemError(Exception):
    """One URL failed; ``kind`` is one of ERROR_KINDS. Picklable, so it can cross the pool."""

    def __init__(self, kind: str, message: str, http_status: int | None = None) -> None:
        super().__init__(kind, message, http_status)
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        self.kind = kind
        self.message = message
        self.http_status = http_status

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class FetchError(ItemError):
    """A download failed."""


class TransformError(ItemError):
    """Decoding, transforming or encoding an image failed."""


class Filtered(ItemError):
    """The image is refused by a filter of the config (kind ``too_small`` or ``aspect_ratio``):
    its row has status ``filtered``, not ``failed``, and no output."""

    def __init__(self, kind: str, message: str) -> None:
        if kind not in FILTER_KINDS:
            raise ValueError(f"not a filter kind {kind!r}")
        super().__init__(kind, message)

    def __reduce__(self) -> tuple[object, ...]:  # two arguments, not ItemError's three
        return (Filtered, (self.kind, self.message))


def limit_hint(exc: OSError) -> str:
    """What to do about an OSError caused by a resource limit, or "": for one-line errors."""
    if exc.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return f" (open files are limited to {soft} here: raise ulimit -n)"
    if exc.errno in (errno.EAGAIN, errno.ENOMEM):
        return " (no more processes or memory: lower transform.workers or executor.lanes)"
    return ""


#: The distribution's name (pyproject.toml): the import package and the command are "pipeline",
#: but "pipeline" on a package index is another project.
DISTRIBUTION: Final = "imagelist-pipeline"


def install_hint(module: str, extra: str, feature: str) -> str:
    """What to say when an optional feature's library is missing: the command that installs it
    for this project, installed or in a checkout (never a same-named project elsewhere)."""
    return (
        f"{feature} needs {module.partition('.')[0]}, which is not installed: "
        f'pip install "{DISTRIBUTION}[{extra}]" (or pip install -e ".[{extra}]" in a checkout)'
    )


def require(module: str, extra: str, feature: str) -> None:
    """Before any work: an optional feature whose library is missing is one line (install_hint)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise PipelineError(install_hint(module, extra, feature)) from None
