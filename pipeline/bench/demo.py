"""The embedded demo: serve the sample images on loopback, list their URLs, run the pipeline.

The URL list also holds two URLs that fail on purpose (a missing file, and an HTML page where an
image was expected), so the report shows what failure records look like.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from ..config import Config
from ..errors import SourceError
from ..report import Report
from ..runner import run
from .server import StaticServer

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")
# shipped in the package (data/ in a checkout, pipeline/samples/ once installed)
SAMPLES = Path(str(importlib.resources.files("pipeline.samples") / "images"))


def sample_images(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted."""
    if not folder.is_dir():
        raise SourceError(f"{folder}: the demo's sample image folder does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise SourceError(f"{folder}: no sample images in this folder")
    return images


def write_url_list(path: Path, server: StaticServer, images: list[Path]) -> None:
    """One URL per sample image, plus the two deliberate failures."""
    lines = ["# sample images served on loopback by `pipeline demo`"]
    lines += [server.url(image.name) for image in images]
    lines += ["# these two fail on purpose: a missing file, and an HTML page (the folder listing)"]
    lines += [server.url("missing.jpg"), server.url("")]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_demo(config: Config, images_dir: Path, *, progress: bool) -> Report:
    """Serve ``images_dir``, write its URL list next to the output, and run the pipeline on it."""
    images = sample_images(images_dir)
    with StaticServer(images_dir) as server:
        url_list = Path(config.output.dir) / "urls" / "urls.txt"
        write_url_list(url_list, server, images)
        return run([url_list], config, progress=progress, restart=True, handle_signals=True)
