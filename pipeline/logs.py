"""Logging: one format everywhere, every line written by the process that draws the bars.

    lane / transform worker:  logger -> QueueHandler --datagram--+
                                                                 v
    coordinator:              logger --------------------> QueueListener thread -> handlers:
                                                             terminal (above the bars), --log-file

Each line names the process and the thread it comes from::

    12:00:01.234 WARNING lane-0/download-3 pipeline.lane: ...
    12:00:01.240 DEBUG transform-2/MainThread pipeline.transform: ...

Only the coordinator writes: on the terminal through ``tqdm.write``, so lines never tear the
progress bars, and into the ``--log-file``. Lanes and pool workers hand their records to a
``logging.handlers.QueueHandler``; its queue is a Unix datagram socket (``RecordPipe``) that one
``QueueListener`` in the coordinator reads. Not a ``multiprocessing.Queue``: that queue's writers
share a lock, and a worker killed holding it (the grace period's end, the OOM killer) would hang
every other writer; a datagram is sent whole or not at all, and nothing is shared but the
address. Should the coordinator fall behind, a child drops a record rather than wait.

``-v`` and ``-vv`` raise the project's own loggers (``pipeline.*``); the libraries' stay at
WARNING unless ``--debug-libs`` asks for them too. urllib3's warnings (a retry, a full pool) reach
the terminal only at ``-vv`` or with ``--debug-libs``; the log file has them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import logging.handlers
import multiprocessing
import os
import pickle
import re
import secrets
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

FORMAT = (
    "%(asctime)s.%(msecs)03d %(levelname)s %(processName)s/%(threadName)s %(name)s: %(message)s"
)
DATE_FORMAT = "%H:%M:%S"
PROJECT = "pipeline"  # the loggers -v raises
_LARGEST = 1 << 16  # bytes of a record at most (a long traceback is cut)
_END = b"end"
# C0 and C1 control characters, DEL, and the bidirectional overrides: a URL or a server's message
# holding them could move the cursor, recolour or rewrite the terminal, or forge a log line
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile(_CONTROL.pattern.replace("\x00-\x1f", "\x00-\x09\x0b-\x1f"))


def printable(text: str, *, newlines: bool = False) -> str:
    """``text`` safe for a terminal: control characters escaped as Python writes them (``\\x1b``);
    line breaks kept with ``newlines`` (a traceback)."""
    pattern = _CONTROL_BUT_NEWLINE if newlines else _CONTROL
    return pattern.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class PrintableFormatter(logging.Formatter):
    """The one format, with what came from the network or an input escaped: a log line is one
    line, whatever a URL or a server's message holds."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # a child's record comes escaped already, with its traceback's line breaks
        escaped = getattr(record, "escaped", False)
        return printable(super().formatMessage(record), newlines=escaped)

    def formatException(self, ei: Any) -> str:
        return printable(super().formatException(ei), newlines=True)


class _ChildFormatter(PrintableFormatter):
    """A child's records as the relay sends them: the message escaped, then any traceback."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        record.escaped = True  # for the coordinator's formatter (the relay sends a copy)
        return text


class AboveBars(io.TextIOBase):
    """A stream for log handlers: writes to stderr above the progress bars, never through them."""

    def write(self, text: str) -> int:
        tqdm.write(text, file=sys.stderr, end="")  # clears the bars, writes, redraws them
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass(frozen=True, slots=True)
class LogSetup:
    """How a child process logs: at which levels, and to which coordinator's address."""

    level: int  # the project's loggers
    library_level: int = logging.WARNING  # every other logger
    address: bytes | None = None  # the coordinator's RecordPipe; None: log in this process

    @classmethod
    def current(cls) -> LogSetup:
        """This process's levels, and the address of the relay it runs, if any."""
        project = logging.getLogger(PROJECT).getEffectiveLevel()
        return cls(project, logging.getLogger().level, _relay_address)


class RecordPipe:
    """The queue of QueueHandler and QueueListener across processes: a datagram socket.

    The coordinator's end is bound to an abstract address (no file); a child's end only sends.
    """

    def __init__(self, address: bytes | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if address is None:  # the reading end
            address = b"\0pipeline-log-%d-%s" % (os.getpid(), secrets.token_hex(6).encode())
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            self.sock.bind(address)
        else:
            self.sock.setblocking(False)
        self.address = address

    def put_nowait(self, record: logging.LogRecord | None) -> None:
        """Send one record (QueueHandler's call), or the end (QueueListener's stop)."""
        data = _END if record is None else _pickled(record)[:_LARGEST]
        with contextlib.suppress(OSError):  # full, or the coordinator is gone: drop it
            self.sock.sendto(data, self.address)

    def get(self, block: bool = True) -> logging.LogRecord | None:
        data = self.sock.recv(_LARGEST + 1024)
        if data == _END:
            return None
        try:
            return logging.makeLogRecord(pickle.loads(data))
        except Exception:  # cut short (a record over _LARGEST): say so instead
            return logging.makeLogRecord({"msg": "(a log record too long to pass on)"})

    def close(self) -> None:
        self.sock.close()


def _pickled(record: logging.LogRecord) -> bytes:
    try:
        return pickle.dumps(record.__dict__)
    except Exception:  # an extra= value that cannot be pickled: its text goes instead
        return pickle.dumps({key: _picklable(value) for key, value in record.__dict__.items()})


def _picklable(value: object) -> object:
    try:
        pickle.dumps(value)
    except Exception:
        return str(value)
    return value


_relay_address: bytes | None = None


@contextlib.contextmanager
def relay() -> Iterator[None]:
    """While it is open, child processes started here send their records to this process,
    which writes them with its own handlers (terminal above the bars, log file)."""
    global _relay_address
    if _relay_address is not None:  # nested (a Dask shard in a local run): the outer one serves
        yield
        return
    pipe = RecordPipe()
    handlers = logging.getLogger().handlers
    listener = logging.handlers.QueueListener(pipe, *handlers, respect_handler_level=True)
    listener.start()
    _relay_address = pipe.address
    try:
        yield
    finally:
        _relay_address = None
        listener.stop()  # sends the end, then writes every record before it
        pipe.close()


def configure(
    level: int,
    file: str | None = None,
    *,
    file_level: int | None = None,
    debug_libraries: bool = False,
) -> None:
    """Set up the coordinator's logging: ``level`` on the terminal (above the bars), and at least
    INFO into ``file``. ``level`` applies to the project's loggers; the libraries' stay at
    WARNING unless ``debug_libraries``."""
    formatter = PrintableFormatter(FORMAT, DATE_FORMAT)
    root = logging.getLogger()
    _reset(root)
    terminal = logging.StreamHandler(AboveBars())
    terminal.setLevel(level)
    if level > logging.DEBUG and not debug_libraries:
        terminal.addFilter(quiet_http_library)
    handlers: list[logging.Handler] = [terminal]
    if file is not None:
        to_file = logging.FileHandler(file, encoding="utf-8", delay=True)
        to_file.setLevel(min(level, logging.INFO) if file_level is None else file_level)
        handlers.append(to_file)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    lowest = min(h.level for h in handlers)
    logging.getLogger(PROJECT).setLevel(lowest)
    root.setLevel(lowest if debug_libraries else max(lowest, logging.WARNING))
    logging.captureWarnings(True)  # Pillow's and urllib3's warnings become log lines too


def quiet_http_library(record: logging.LogRecord) -> bool:
    """False for urllib3's warnings (``Retrying (Retry(total=1, ...)) after connection broken
    by ...``, a full connection pool): routine on the open web, each URL's outcome is its row.
    The terminal shows them at -vv or with --debug-libs; the --log-file keeps them."""
    return not (record.name.startswith("urllib3") and record.levelno < logging.ERROR)


def configure_child(setup: LogSetup, name: str | None = None) -> None:
    """In a lane or a pool worker: records go to the coordinator's relay, at its levels."""
    global _relay_address
    if name is not None:
        multiprocessing.current_process().name = name
    _relay_address = setup.address  # what this process's own children are told (LogSetup)
    root = logging.getLogger()
    _reset(root)
    if setup.address is not None:
        relayed = logging.handlers.QueueHandler(RecordPipe(setup.address))
        relayed.setFormatter(_ChildFormatter())
        root.addHandler(relayed)
    else:  # no relay (a Dask worker's own process): the terminal, as the coordinator would
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PrintableFormatter(FORMAT, DATE_FORMAT))
        root.addHandler(handler)
    logging.getLogger(PROJECT).setLevel(setup.level)
    root.setLevel(setup.library_level)
    logging.captureWarnings(True)


def configure_worker(setup: LogSetup) -> None:
    """In a pool process: log through the relay, under a name such as ``transform-2``."""
    process = multiprocessing.current_process()
    configure_child(setup, "transform-" + process.name.rpartition("-")[2])


def _reset(root: logging.Logger) -> None:
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
