"""Benchmark workloads: photo-like JPEGs, and a lean loopback server that plays a distant one.

``photo`` draws a deterministic photo-like image (a sky-to-ground gradient, soft shapes, colour
variation and grain, so it compresses like a real photo); the demo's samples are made with it too.
``Workload`` keeps a few dozen distinct JPEGs in a cache folder and names any number of URLs over
them (URL ``n`` serves image ``n % distinct``): transforming them costs what distinct images cost,
and 100,000 URLs cost no disk.

``WorkloadServer`` serves them from a separate process (so that serving costs the measured process
nothing) with asyncio and a minimal HTTP/1.1 keep-alive loop, much cheaper per request than
``http.server``. It can add a latency before each answer and cap each connection's bandwidth.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import random
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFilter

from ..atomic import write_atomic
from ..parent import exit_with

HOST = "127.0.0.1"


# --- photo-like images ---------------------------------------------------------------------------


def noise(rng: random.Random, size: tuple[int, int], scale: int) -> Image.Image:
    """Smooth random variation: random bytes at 1/scale size, blown up with bicubic filtering."""
    small = (max(2, size[0] // scale), max(2, size[1] // scale))
    grain = Image.frombytes("L", small, rng.randbytes(small[0] * small[1]))
    smooth = grain.resize(size, Image.Resampling.BICUBIC)
    return smooth.filter(ImageFilter.GaussianBlur(scale / 2)) if scale > 1 else smooth


def sky_and_ground(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """A vertical gradient from a sky colour to a ground colour."""
    sky = tuple(rng.randrange(90, 220) for _ in range(3))
    ground = tuple(rng.randrange(20, 120) for _ in range(3))
    top = Image.new("RGB", size, sky)
    bottom = Image.new("RGB", size, ground)
    mask = Image.linear_gradient("L").resize(size)
    return Image.composite(bottom, top, mask)


def shapes(rng: random.Random, image: Image.Image) -> Image.Image:
    """Soft ellipses and polygons: trees, rocks, clouds, out of focus."""
    layer = image.copy()
    draw = ImageDraw.Draw(layer)
    w, h = image.size
    for _ in range(rng.randrange(6, 14)):
        x, y, r = rng.randrange(w), rng.randrange(h), rng.randrange(w // 20, w // 4)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r // 2, x + r, y + r // 2), fill=colour)
        else:
            points = [(x + rng.randrange(-r, r), y + rng.randrange(-r, r)) for _ in range(5)]
            draw.polygon(points, fill=colour)
    return Image.blend(image, layer.filter(ImageFilter.GaussianBlur(w / 150)), 0.85)


def photo(seed: int, long_side: tuple[int, int] = (480, 1600)) -> Image.Image:
    """A photo-like RGB image whose long side is in ``long_side`` (inclusive), from ``seed``."""
    rng = random.Random(seed)
    side, ratio = (
        rng.randrange(long_side[0], long_side[1] + 1),
        rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0]),
    )
    size = (side, round(side / ratio))
    if rng.random() < 0.3:
        size = size[::-1]  # portrait
    image = shapes(rng, sky_and_ground(rng, size))
    tint = Image.merge("RGB", [noise(rng, size, 64) for _ in range(3)])
    image = Image.blend(image, tint, 0.2)
    grain = noise(rng, size, 1).convert("RGB")
    return Image.blend(image, grain, 0.05)


# --- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Workload:
    """``distinct`` JPEGs of ``min_px``..``max_px`` on the long side, cached in ``folder``."""

    folder: Path
    distinct: int = 40
    min_px: int = 1024
    max_px: int = 1600
    quality: int = 88

    @property
    def files(self) -> list[Path]:
        tag = f"{self.min_px}-{self.max_px}-q{self.quality}"
        return [self.folder / f"photo-{tag}-{i:03d}.jpg" for i in range(self.distinct)]

    def make(self) -> list[Path]:
        """Draw the images not cached yet; returns every file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for i, path in enumerate(self.files):
            if not path.exists():  # atomic: benchmarks run side by side share the cache
                out = io.BytesIO()
                photo(7000 + i, (self.min_px, self.max_px)).save(out, "JPEG", quality=self.quality)
                write_atomic(path, out.getvalue(), root=self.folder)
        return self.files

    def mean_bytes(self) -> float:
        sizes = [p.stat().st_size for p in self.make()]
        return sum(sizes) / len(sizes)

    def write_urls(self, path: Path, base_url: str, count: int) -> None:
        """``count`` distinct URLs, one per line (URL n serves image n % distinct)."""
        with path.open("w", encoding="utf-8") as f:
            for n in range(count):
                f.write(f"{base_url}{n}.jpg\n")


# --- the server ----------------------------------------------------------------------------------


class WorkloadServer:
    """Serves ``/<n>.jpg`` (image ``n % len(files)``) on 127.0.0.1 from child processes.

    ``processes`` servers share one port (SO_REUSEPORT: the kernel spreads the connections), so
    serving keeps up with a many-core run; with ``cores`` they run only on those CPUs, set apart
    from the measured run. ``latency`` seconds pass before each answer; ``bandwidth`` (bytes/s,
    0 = no cap) limits each connection. ``with WorkloadServer(files) as server: server.url``.
    """

    def __init__(
        self,
        files: list[Path],
        *,
        latency: float = 0.0,
        bandwidth: float = 0.0,
        processes: int = 1,
        cores: frozenset[int] = frozenset(),
    ) -> None:
        self._sock = _reuseport_socket(0)  # holds the port until every server listens on it
        self.port = self._sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}/"
        context = multiprocessing.get_context("spawn")
        self._ready = [context.Pipe(duplex=False) for _ in range(processes)]
        args = ([str(p) for p in files], latency, bandwidth, os.getpid(), self.port, cores)
        self._processes = [
            context.Process(target=_serve, args=(*args, ready), name=f"workload-server-{i}")
            for i, (_, ready) in enumerate(self._ready)
        ]

    def __enter__(self) -> WorkloadServer:
        for process in self._processes:
            process.start()
        for receive, send in self._ready:
            send.close()
            if not receive.poll(60) or receive.recv() != "ready":
                self.__exit__()
                raise OSError("a workload server did not start")
            receive.close()
        self._sock.close()
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            process.join()


def _reuseport_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    return sock


def _serve(
    files: list[str],
    latency: float,
    bandwidth: float,
    owner: int,
    port: int,
    cores: frozenset[int],
    ready: Any,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the benchmark's to handle: it stops us
    exit_with(owner)  # and if it is killed outright, we end with it
    if cores:
        os.sched_setaffinity(0, cores)
    bodies = [Path(f).read_bytes() for f in files]
    sock = _reuseport_socket(port)
    sock.listen(1024)
    ready.send("ready")
    ready.close()
    asyncio.run(_main(sock, bodies, latency, bandwidth))


async def _main(sock: socket.socket, bodies: list[bytes], latency: float, bandwidth: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request := await reader.readuntil(b"\r\n\r\n"):
                target = request.split(b" ", 2)[1]
                name = target.rsplit(b"/", 1)[-1].split(b"?")[0].removesuffix(b".jpg")
                if latency:
                    await asyncio.sleep(latency)
                if not name.isdigit():
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                    continue
                body = bodies[int(name) % len(bodies)]
                head = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                    % len(body)
                )
                await _send(writer, head, body, bandwidth)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, sock=sock, limit=1 << 16)
    async with server:
        await server.serve_forever()


async def _send(writer: asyncio.StreamWriter, head: bytes, body: bytes, bandwidth: float) -> None:
    """Head and body in one stream of writes: a small head sent alone would wait for the client's
    delayed ACK (40 ms a request on Linux)."""
    if not bandwidth:
        writer.writelines((head, body))
        await writer.drain()
        return
    chunk = max(1024, int(bandwidth / 50))  # 50 slices a second
    view = memoryview(head + body)
    for start in range(0, len(view), chunk):
        writer.write(view[start : start + chunk])
        await writer.drain()
        await asyncio.sleep(chunk / bandwidth)
