"""Shared test helpers: image factories, a gated server handler, a look at our children."""

from __future__ import annotations

import contextlib
import io
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from pipeline.bench.server import QuietHandler

if TYPE_CHECKING:
    from pipeline.objects import ObjectStore

LAUNCHER = str(Path(__file__).resolve().parent / "run_with_testops.py")


def command(*args: str) -> list[str]:
    """The command line of ``pipeline *args`` with the test-only ops (``testops``) registered."""
    return [sys.executable, LAUNCHER, *args]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A small photo-like RGB image: a gradient with a few shapes, different for each seed."""
    rng = random.Random(seed)
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = rng.randrange(width), rng.randrange(height)
        r = rng.randrange(5, max(6, min(width, height) // 3))
        color = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color)
    return image


def encode(image: Image.Image, fmt: str = "JPEG", **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """``count`` images of mixed sizes: mostly JPEGs, every fifth a PNG with alpha."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        width, height = rng.randrange(120, 900), rng.randrange(120, 900)
        image = photo(width, height, seed=seed * 1000 + i)
        if i % 5 == 4:
            image.putalpha(Image.linear_gradient("L").resize((width, height)))
            path = folder / f"img-{i:03d}.png"
            path.write_bytes(encode(image, "PNG"))
        else:
            path = folder / f"img-{i:03d}.jpg"
            path.write_bytes(encode(image, "JPEG", quality=85))
        paths.append(path)
    return paths


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def descendants(root: int | None = None) -> dict[int, int]:
    """Every live descendant of ``root`` (default: this process), as {pid: parent pid}."""
    root = os.getpid() if root is None else root
    parents = {
        int(p.name): _parent_of(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()
    }
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found[child] = pid
                frontier.append(child)
    return {pid: parent for pid, parent in found.items() if _is_alive(pid)}


def _is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def leftover_workers() -> list[str]:
    """Child processes of this process that are not multiprocessing's long-lived helpers.

    The forkserver and the resource tracker are started once per process and serve every run;
    a pool worker is a child of the forkserver (forkserver method) or of us (spawn).
    """
    left = []
    helpers = {
        pid
        for pid, parent in descendants().items()
        if parent == os.getpid() and _is_helper(_cmdline(pid))
    }
    for pid, parent in descendants().items():
        if pid in helpers:
            continue
        left.append(f"{pid} (parent {parent}): {_cmdline(pid)[:120]}")
    return left


def _is_helper(cmdline: str) -> bool:
    return "forkserver" in cmdline or "resource_tracker" in cmdline


def gated_handler() -> type[QuietHandler]:
    """A handler class that holds every answer until the test opens ``gate``, releasing
    ``arrived`` once per request waiting: a test knows a run is mid-download, without sleeps."""

    class Gated(QuietHandler):
        arrived = threading.Semaphore(0)
        gate = threading.Event()

        def do_GET(self) -> None:
            type(self).arrived.release()
            type(self).gate.wait(60)
            super().do_GET()

    return Gated


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the run") -> None:
    """Poll an observable condition (files on disk, live processes, log lines) until it holds."""
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def bucket(name: str, prefix: str = "run") -> ObjectStore:
    """An output ``s3://name/prefix`` (an ObjectStore) in the S3 server of ``s3_environment``,
    its bucket made if it is not there yet."""
    from pipeline.objects import ObjectStore
    from pipeline.storage import Location

    store = ObjectStore.check(Location(f"s3://{name}/{prefix}"))
    with contextlib.suppress(FileExistsError):
        store.fs.mkdir(name)
    return store


@contextlib.contextmanager
def s3_environment() -> Iterator[dict[str, str]]:
    """``s3_server`` with its environment set in this process too (for the store's own chain),
    and s3fs's cache of filesystems cleared before and after (one made for another server is
    no use)."""
    import pytest
    import s3fs

    with s3_server() as env, pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        yield env
    s3fs.S3FileSystem.clear_instance_cache()


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's server mode) on 127.0.0.1, a free port; yields the
    environment a client needs to reach it (``AWS_ENDPOINT_URL``, test credentials)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        yield {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
    finally:
        server.stop()
