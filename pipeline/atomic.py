"""Files the run writes: whole or not at all, and never anywhere but inside the output folder.

``write_atomic`` writes to a temporary file with a random name, created with ``O_EXCL`` in the
target's folder, then ``os.replace`` renames it over the target, which POSIX makes atomic: a
reader, or a rerun after a kill, sees a whole file or none. Nothing the run creates follows a
symbolic link: each folder below the output folder is opened with ``O_NOFOLLOW`` relative to the
one above it (``openat``), so a link planted at a temporary name, at a target, or as a folder of
the tree cannot aim a write outside it; the rename replaces a link at the target, never what it
points to. A path taken by a link or a file where a folder must be stops the run (OutputError),
as does any other OS error on the output folder (a full disk, no permission): none of them is the
fault of one URL. Used by pool workers for images and by the coordinator for everything else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path, PurePath

from .errors import OutputError

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def output_error(path: Path | str, exc: OSError) -> OutputError:
    """One line naming the path and the cause."""
    if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link
        return OutputError(f"{path}: a symbolic link; the run never writes through one")
    return OutputError(f"{path}: {exc.strerror or exc}")


def open_dir(root: Path, rel: PurePath, *, create: bool = True) -> int:
    """A descriptor of the folder ``root/rel``, made if missing (unless not ``create``: then
    FileNotFoundError), reached through no link.

    Raises OutputError naming the first part of the path that is a link or a file, or OSError.
    """
    try:
        try:
            fd = os.open(root, _ROOT_FLAGS)  # the output folder itself may be a link: the user's
        except FileNotFoundError:
            if not create:
                raise
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root, _ROOT_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise OutputError(f"{root}: {exc.strerror or exc}") from None
    try:
        for depth, name in enumerate(rel.parts, 1):
            try:
                inner = _open_or_make(fd, name) if create else os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                path = root.joinpath(*rel.parts[:depth])
                what = "a symbolic link" if path.is_symlink() else "not a folder"
                raise OutputError(
                    f"{path}: {what}; the run writes only into real folders of its output folder"
                ) from None
            os.close(fd)
            fd = inner
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_or_make(fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=fd)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):  # another worker made it meanwhile
            os.mkdir(name, 0o777, dir_fd=fd)
        return os.open(name, _DIR_FLAGS, dir_fd=fd)


def write_atomic(path: Path, data: bytes, *, root: Path) -> None:
    """Write ``data`` to ``path`` (inside ``root``) atomically; raises OutputError."""
    rel = path.relative_to(root)
    try:
        folder = open_dir(root, rel.parent)
    except OSError as exc:
        raise output_error(path.parent, exc) from None
    tmp = f".{rel.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, _NEW_FLAGS, 0o644, dir_fd=folder)
        try:
            with open(fd, "wb", closefd=True) as f:
                f.write(data)
            os.replace(tmp, rel.name, src_dir_fd=folder, dst_dir_fd=folder)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder)
            raise
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        os.close(folder)


def open_append(path: Path, *, root: Path) -> int:
    """A descriptor appending to ``path`` (inside ``root``), created if missing, not a link."""
    rel = path.relative_to(root)
    try:
        folder = open_dir(root, rel.parent)
    except OSError as exc:
        raise output_error(path.parent, exc) from None
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(rel.name, flags, 0o644, dir_fd=folder)
    except OSError as exc:
        raise output_error(path, exc) from None
    finally:
        os.close(folder)


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_inside(path: Path, *, root: Path) -> bytes:
    """The bytes of ``path`` (inside ``root``), read through no link. Raises OutputError."""
    rel = path.relative_to(root)
    try:
        folder = open_dir(root, rel.parent, create=False)
        try:
            fd = os.open(rel.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        finally:
            os.close(folder)
        with open(fd, "rb") as f:
            return f.read()
    except OSError as exc:
        raise output_error(path, exc) from None


def remove_inside(paths: list[Path], *, root: Path) -> None:
    """Delete ``paths`` (inside ``root``; missing ones are fine), through no linked folder."""
    by_folder: dict[PurePath, list[str]] = {}
    for path in paths:
        rel = path.relative_to(root)
        by_folder.setdefault(rel.parent, []).append(rel.name)
    for parent, names in by_folder.items():
        try:
            folder = open_dir(root, parent, create=False)
        except FileNotFoundError:
            continue
        try:
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=folder)
        finally:
            os.close(folder)


def remove_entry(path: Path) -> None:
    """Delete ``path`` whatever it is: a folder with all it holds, or a file or a link (never
    what a link points to); missing is fine. Raises OSError."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_temporaries(root: Path, rel: PurePath) -> None:
    """Delete the temporary files (``.*.tmp``) that writers killed mid-write left below
    ``root/rel``, descending into no linked folder."""
    try:
        folder = open_dir(root, rel, create=False)
    except FileNotFoundError:
        return
    try:
        for _, _, names, dir_fd in os.fwalk(dir_fd=folder):  # fwalk follows no link
            for name in names:
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(folder)
