"""Which decoders a downloaded body may reach, and Pillow's size check on every decoder path.

Through the real command: an EPS must never reach Ghostscript (a stand-in ``gs`` on PATH would
leave a mark), and an ICO whose directory says 16x16 but which holds a huge PNG fails as a
decompression bomb before the PNG's pixels are allocated.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import encode, photo
from PIL import Image

from pipeline.bench.server import QuietHandler, StaticServer
from pipeline.config import ConfigError, TransformConfig
from pipeline.errors import TransformError
from pipeline.transform import transform_bytes

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto showpage\n%%EOF\n"


def huge_png(width: int, height: int) -> bytes:
    """A 1-bit PNG of ``width`` x ``height`` zeros: a few hundred KB that decode to far more."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def ico_holding(png: bytes) -> bytes:
    """An ICO whose one directory entry says 16x16, holding ``png``."""
    entry = struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22)
    return struct.pack("<HHH", 0, 1, 1) + entry + png


class Typed(QuietHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        ".eps": "image/eps",
        ".ico": "image/x-icon",
        ".jpg": "image/jpeg",
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticServer]:
    root = tmp_path_factory.mktemp("decoders")
    (root / "evil.eps").write_bytes(EPS)
    (root / "bomb.ico").write_bytes(ico_holding(huge_png(30_000, 30_000)))
    (root / "fine.jpg").write_bytes(encode(photo(300, 200)))
    with StaticServer(root, handler=Typed) as server:
        yield server


def run(folder: Path, urls: list[str], config: str) -> tuple[int, dict[str, dict[str, str]]]:
    folder.mkdir()
    (folder / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
    (folder / "config.toml").write_text(config)
    bin_dir = folder / "bin"  # a Ghostscript stand-in that leaves a mark if anything runs it
    bin_dir.mkdir()
    gs = bin_dir / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {folder / 'gs-ran'}\n")
    gs.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "out", "-q"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not (folder / "gs-ran").exists(), "a downloaded file reached Ghostscript"
    rows = [
        json.loads(line)
        for part in sorted((folder / "out" / "manifest").glob("*.jsonl*"))
        for line in part.read_text().splitlines()
    ]
    return proc.returncode, {row["url"].rsplit("/", 1)[1]: row for row in rows}


def test_an_eps_never_reaches_ghostscript(tmp_path, served):
    code, rows = run(tmp_path / "eps", [served.url("evil.eps"), served.url("fine.jpg")], "")
    assert code == 0
    assert rows["fine.jpg"]["status"] == "ok"
    assert rows["evil.eps"]["error_kind"] == "not_image"
    assert "EPS is not in transform.input_formats" in rows["evil.eps"]["error"]


def test_an_ico_bomb_fails_before_its_pixels_are_allocated(tmp_path, served):
    config = '[transform]\ninput_formats = ["JPEG", "ICO"]\n'
    code, rows = run(tmp_path / "ico", [served.url("bomb.ico"), served.url("fine.jpg")], config)
    assert code == 0
    assert rows["fine.jpg"]["status"] == "ok"
    assert rows["bomb.ico"]["error_kind"] == "decompression_bomb"
    assert "900000000 pixels" in rows["bomb.ico"]["error"]


def test_the_bomb_check_holds_inside_containers_without_allocating(monkeypatch):
    """Here, in this process: the 30000x30000 PNG inside the ICO is refused from its header,
    whatever limit the process had before (workers once turned Pillow's check off)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    body = ico_holding(huge_png(30_000, 30_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TransformError) as caught:
        transform_bytes(body, TransformConfig(input_formats=("ICO",), max_pixels=1_000_000))
    assert caught.value.kind == "decompression_bomb"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"the decoder allocated {grown_mb:.0f} MB before refusing"


@pytest.mark.parametrize(
    ("formats", "message"),
    [
        (("JPEG", "EPS"), "must not name EPS: its decoder runs Ghostscript"),
        (("JPEG", "NOPE"), "names of Pillow decoders"),
        ((), "a non-empty list"),
    ],
)
def test_input_formats_are_checked_at_load(formats, message):
    with pytest.raises(ConfigError, match=message):
        TransformConfig(input_formats=formats)
