"""Atomic file writes: a reader, or a rerun after a crash, sees a whole file or none.

Data goes to a temporary file in the same folder, then ``os.replace`` renames it over the target,
which POSIX makes atomic. Used by pool workers for images and by the sink for manifest parts.
"""

from __future__ import annotations

import os
from pathlib import Path


def temp_path(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, unique to this process."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, making its folder if needed. Raises OSError."""
    tmp = temp_path(path)
    try:
        try:
            f = open(tmp, "wb")  # noqa: SIM115 - closed below
        except FileNotFoundError:  # first file of its folder: make it only then, no stat per file
            path.parent.mkdir(parents=True, exist_ok=True)
            f = open(tmp, "wb")  # noqa: SIM115
        with f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
