"""Logging for the main process and the transform workers.

One format everywhere, naming the process and the thread a line comes from::

    12:00:01.234 WARNING MainProcess/download_3 pipeline.download: ...
    12:00:01.240 DEBUG transform-2/MainThread pipeline.transform: ...

On the terminal, lines go through ``tqdm.write`` so that they never tear the progress bars; with
``--log-file`` they also go to a file. The pool initializer calls ``configure_worker`` with the
main process's settings (``LogSetup.current()``), so workers log the same way; a worker appends to
the log file itself (short appends to one file from several processes do not interleave).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import sys
from dataclasses import dataclass

from tqdm import tqdm

FORMAT = (
    "%(asctime)s.%(msecs)03d %(levelname)s %(processName)s/%(threadName)s %(name)s: %(message)s"
)
DATE_FORMAT = "%H:%M:%S"


class AboveBars(io.TextIOBase):
    """A stream for log handlers: writes to stderr above the progress bars, never through them."""

    def write(self, text: str) -> int:
        tqdm.write(text, file=sys.stderr, end="")  # clears the bars, writes, redraws them
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


@dataclass(frozen=True, slots=True)
class LogSetup:
    """Enough to configure logging in another process the way it is configured here."""

    level: int
    file: str | None = None
    file_level: int = logging.INFO

    @classmethod
    def current(cls) -> LogSetup:
        root = logging.getLogger()
        files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        if not files:
            return cls(root.getEffectiveLevel())
        terminal = [h.level for h in root.handlers if not isinstance(h, logging.FileHandler)]
        return cls(min(terminal, default=logging.WARNING), files[0].baseFilename, files[0].level)


def configure(level: int, file: str | None = None, *, file_level: int | None = None) -> None:
    """Set up the root logger: ``level`` on the terminal, and at least INFO into ``file``."""
    formatter = logging.Formatter(FORMAT, DATE_FORMAT)
    root = logging.getLogger()
    for handler in root.handlers[:]:
        root.removeHandler(handler)
        handler.close()
    terminal = logging.StreamHandler(AboveBars())
    terminal.setLevel(level)
    handlers: list[logging.Handler] = [terminal]
    if file is not None:
        to_file = logging.FileHandler(file, encoding="utf-8", delay=True)
        to_file.setLevel(min(level, logging.INFO) if file_level is None else file_level)
        handlers.append(to_file)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(min(h.level for h in handlers))
    logging.captureWarnings(True)  # Pillow's and urllib3's warnings become log lines too


def configure_worker(setup: LogSetup) -> None:
    """In a pool process: log like the main process, under a name such as ``transform-2``."""
    process = multiprocessing.current_process()
    process.name = "transform-" + process.name.rpartition("-")[2]
    configure(setup.level, setup.file, file_level=setup.file_level)
