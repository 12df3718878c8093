"""Finding the input files, opening each as a stream of whole lines, and what reading found.

``find_files`` walks the folders given, taking the files whose names say an input format
(``.txt .csv .tsv .jsonl .parquet``, the text ones also ``.gz``/``.zst``), and skipping the
output folders in them: ``--out`` itself, and any folder holding a run's run.json and manifest/.
A folder given as a URL (``s3://bucket/urls/``) is listed through fsspec the same way, and its
files are read as streams, never copied first (storage.py).

    open_lines(path, compression) -> Lines: the file's lines, decompressed as they are read
        plain      the bytes as they are
        .gz        gzip; several members one after the other (``cat more.gz >> urls.txt.gz``) read
                   as one stream, so an appended member is appended lines
        .zst       zstd (needs ``zstandard``); several frames read as one stream, the same way
A last line without its line break is held back: a file still being written ends mid-line, and a
line recorded before it is whole would change under a rerun. Reading errors (a corrupt or
truncated stream, a disk error) become one ``UnreadableSource`` naming the file and the line
reached. ``Findings`` collects, for the user, what reading found on the way: warnings, and the
files that could not be read (the others are read all the same).
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from .errors import PipelineError, SourceError, UnreadableSource
from .layout import MANIFEST, OUTPUT_NAMES, RUN
from .storage import Location, StoredFile, list_stored, open_stored

#: an input file: a local one, or one in an object store (read through fsspec as a stream)
InputFile = Path | StoredFile

FORMATS = {".txt": "txt", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
#: compressions a file may be named with that are not read: such a file is refused, naming it
UNREAD_SUFFIXES = frozenset({".bz2", ".xz", ".lzma", ".zip", ".7z", ".lz4", ".br", ".tgz", ".tar"})
ZSTD_INSTALL = "reading .zst files needs zstandard, which is not installed: pip install zstandard"
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"PK\x03\x04": "zip",
}
_MAX_WARNINGS = 20  # more are counted, not listed


@dataclass(slots=True)
class Findings:
    """What reading the inputs found: warnings for the user, and files that could not be read."""

    warnings: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    more: int = 0  # warnings past the first _MAX_WARNINGS
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # records, usable, by file

    def warn(self, message: str) -> None:
        if message in self.warnings:
            return  # a file read twice (checked, then run) says it once
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)
        else:
            self.more += 1

    def failed(self, message: str) -> None:
        if message not in self.unreadable:
            self.unreadable.append(message)

    def counted(self, path: InputFile, records: int, usable: int) -> None:
        """A file read to its end had ``records``, ``usable`` of them with a URL."""
        self.counts[str(path)] = (records, usable)
        if records and not usable:
            self.warn(
                f"{path}: none of its {records} records has a usable URL (each is a failed "
                "invalid_url row); input.url_column names the URL column or field"
            )

    def no_url(self) -> list[str]:
        """The files read, when not one of their records has a usable URL; else nothing."""
        if any(usable for _, usable in self.counts.values()):
            return []
        return [path for path, (records, _) in self.counts.items() if records]

    def lines(self) -> list[str]:
        more = [f"and {self.more} more warnings like these"] if self.more else []
        return [*self.warnings, *more]


def input_kind(name: str) -> str | None:
    """ "input" for a name read as input in a folder, "unread" for an input in a compression
    that is not read (or a compressed parquet), None for any other file."""
    suffixes = [s.lower() for s in Path(name).suffixes[-2:]]
    if not suffixes:
        return None
    last, inner = suffixes[-1], suffixes[0] if len(suffixes) == 2 else ""
    if last in FORMATS:
        return "input"
    if inner in FORMATS and last in COMPRESSIONS:
        return "unread" if inner == ".parquet" else "input"
    return "unread" if inner in FORMATS and last in UNREAD_SUFFIXES else None


def find_files(
    paths: Sequence[Path | Location],
    out_dir: Path | None = None,
    findings: Findings | None = None,
) -> list[InputFile]:
    """The input files named by ``paths``: files as given, folders searched recursively, sorted.
    An output folder inside a folder (``out_dir``, or any holding a run's run.json) is skipped."""
    findings = Findings() if findings is None else findings
    found: list[InputFile] = []
    for path in paths:
        if isinstance(path, Location):
            found.extend(_stored(path, findings))
        elif path.is_dir():
            files = _walk(path, out_dir, findings)
            if not files:
                raise SourceError(
                    f"{path}: no {', '.join(FORMATS)} files in this folder (nor .gz, .zst of them)"
                )
            found.extend(files)
        elif path.is_file():
            found.append(path)
        else:
            raise SourceError(f"{path}: no such file or folder")
    return found


def _walk(folder: Path, out_dir: Path | None, findings: Findings) -> list[Path]:
    out = out_dir.resolve() if out_dir is not None else None
    files: list[Path] = []
    unread: list[Path] = []
    for top, dirs, names in os.walk(folder):
        here = Path(top)
        for name in list(dirs):
            if _is_output(here / name, here, out):
                dirs.remove(name)
                findings.warn(f"{here / name}: skipped: an output folder of a run, not input")
        for name in names:
            kind = input_kind(name)
            if kind is not None and (here / name).is_file():
                (files if kind == "input" else unread).append(here / name)
    if unread:
        findings.warn(
            f"skipped {len(unread)} file{'s' * (len(unread) != 1)} in a compression not read "
            f"(only .gz and .zst; parquet is compressed inside): "
            + ", ".join(str(p) for p in sorted(unread)[:4])
        )
    return sorted(files)


def _stored(location: Location, findings: Findings) -> list[StoredFile]:
    """The input files below a URL, as ``_walk`` takes them from a folder."""
    listed = list_stored(location)
    if listed is None:
        raise SourceError(f"{location}: no such file or folder")
    if len(listed) == 1 and listed[0].url == location.child(location.path):
        return listed  # a file named on its own: read whatever its name
    keys = {file.key for file in listed}
    runs = {posixpath.dirname(k) for k in keys if posixpath.basename(k) == RUN}
    files: list[StoredFile] = []
    unread: list[StoredFile] = []
    for file in listed:
        if any(file.key.startswith(f"{run}/") for run in runs) or file.name == RUN:
            continue  # an output folder of a run, not input
        kind = input_kind(file.name)
        if kind is not None:
            (files if kind == "input" else unread).append(file)
    for run in sorted(runs):
        findings.warn(f"{location.child(run)}: skipped: an output folder of a run, not input")
    if unread:
        findings.warn(f"skipped {len(unread)} file(s) in a compression not read: {unread[0]}")
    if not files:
        raise SourceError(
            f"{location}: no {', '.join(FORMATS)} files there (nor .gz, .zst of them)"
        )
    return files


def _is_output(folder: Path, parent: Path, out: Path | None) -> bool:
    resolved = folder.resolve()
    if out is not None and (
        resolved == out or (parent.resolve() == out and folder.name in OUTPUT_NAMES)
    ):
        return True
    return (folder / RUN).is_file() and (folder / MANIFEST).is_dir()


def input_root(paths: Sequence[Path | Location]) -> str:
    """The folder that source names are relative to: the deepest one holding every input (a
    local path, or a URL when the inputs are in a store)."""
    stores = {p.scheme for p in paths if isinstance(p, Location)}
    if not stores:
        local = [p for p in paths if isinstance(p, Path)]
        return os.path.commonpath([str(p.resolve() if p.is_dir() else p.resolve().parent)
                                   for p in local])  # fmt: skip
    if len(stores) > 1 or len(stores) < len({type(p) for p in paths}):
        raise SourceError("the inputs of one run are all local, or all in one object store")
    keys = [p.path for p in paths if isinstance(p, Location)]
    return f"{stores.pop()}://{posixpath.commonpath(keys)}"


def where(file: InputFile) -> str:
    """The input file's full name, as ``input_root`` names folders: a path or a URL."""
    return file.url if isinstance(file, StoredFile) else str(file.resolve())


def relative_name(file: InputFile, root: str) -> str | None:
    """The file's name relative to ``root`` (posix), or None when it is not below it."""
    full = where(file)
    if isinstance(file, StoredFile):
        prefix = root.rstrip("/") + "/"
        return full.removeprefix(prefix) if full.startswith(prefix) else None
    try:
        return Path(full).relative_to(root).as_posix()
    except ValueError:
        return None


# --- opening them ---------------------------------------------------------------------------------


def open_binary(path: InputFile) -> IO[bytes]:
    """The file's bytes as a stream: a local file, or a store's object fetched as it is read."""
    return open_stored(path) if isinstance(path, StoredFile) else path.open("rb")


def sniff(path: InputFile, compression: str | None) -> None:
    """Refuse now a file whose first bytes say it is not what its name says."""
    try:
        with open_binary(path) as f:
            head = f.read(6)
    except OSError as exc:
        raise UnreadableSource(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not head:
        return
    found = next((kind for magic, kind in _MAGIC.items() if head.startswith(magic)), None)
    if found == "bzip2" and head[3:4] not in b"123456789":  # "BZh" then its block size
        found = None
    if compression is not None and found != compression:
        raise UnreadableSource(f"{path}: not a {compression} file (its name ends in .gz/.zst)")
    if compression is None and found is not None:
        raise UnreadableSource(
            f"{path}: holds {found}-compressed data under a plain name; name it .gz or .zst "
            "(gzip, zstd), or decompress it"
        )


class Lines:
    """The whole lines of one input file (each with its line break), decompressed."""

    def __init__(self, path: InputFile, compression: str | None, findings: Findings) -> None:
        self.path = path
        self.findings = findings
        self.count = 0  # whole lines read so far
        self._file, self._errors = _open_text(path, compression)

    def __iter__(self) -> Iterator[str]:
        try:
            for text in self._file:  # (no generator of our own per line: this loop is hot)
                if text[-1] not in "\n\r":  # the last line, still being written
                    self._held(text)
                    return
                self.count += 1
                yield text
        except self._errors as exc:
            raise self._unreadable(exc) from None

    def _held(self, text: str) -> None:
        if text.strip():
            self.findings.warn(
                f"{self.path}: line {self.count + 1} has no line break yet: not read this time "
                "(a file still being written); a rerun reads it once it ends with one"
            )

    def _unreadable(self, exc: BaseException) -> UnreadableSource:
        detail = " ".join(str(exc).split())
        what = "truncated" if isinstance(exc, EOFError) else f"unreadable ({detail})"
        return UnreadableSource(f"{self.path}: {what} after line {self.count}")

    def __enter__(self) -> Lines:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._file.close()


def open_lines(path: InputFile, compression: str | None, findings: Findings | None = None) -> Lines:
    return Lines(path, compression, Findings() if findings is None else findings)


_ReadErrors = tuple[type[Exception], ...]
_READ_ERRORS: _ReadErrors = (OSError, EOFError, zlib.error)  # gzip's BadGzipFile is an OSError


def _open_text(path: InputFile, compression: str | None) -> tuple[IO[str], _ReadErrors]:
    """The file as text, and the errors that reading it raises when its bytes are bad."""
    # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first line;
    # surrogateescape: a stray non-UTF-8 byte makes an invalid URL (a failed row), not a crash
    text: dict[str, Any] = {"encoding": "utf-8-sig", "errors": "surrogateescape", "newline": ""}
    try:
        if compression is None and isinstance(path, Path):
            plain = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
            return plain, _READ_ERRORS
        if compression == "gzip" and isinstance(path, Path):
            raw: Any = gzip.GzipFile(path, "rb")
        else:
            raw = open_binary(path)
        if compression is None:  # a stored file: its stream of bytes, decoded as it is read
            return io.TextIOWrapper(raw, **text), _READ_ERRORS
        if compression == "gzip" and not isinstance(raw, gzip.GzipFile):
            raw = gzip.GzipFile(fileobj=raw, mode="rb")
            raw.myfileobj = raw.fileobj  # closed with it, as when GzipFile opens a name itself
    except OSError as exc:
        raise UnreadableSource(f"{path}: cannot read: {exc.strerror or exc}") from None
    if compression == "gzip":
        return io.TextIOWrapper(raw, **text), _READ_ERRORS
    reader, error = _zstd_reader(path, raw)
    return io.TextIOWrapper(reader, **text), (*_READ_ERRORS, error)


def _zstd_reader(path: InputFile, raw: IO[bytes]) -> tuple[Any, type[Exception]]:
    try:
        import zstandard
    except ImportError:
        raw.close()
        raise PipelineError(f"{path}: {ZSTD_INSTALL}") from None
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
    return io.BufferedReader(reader), zstandard.ZstdError
