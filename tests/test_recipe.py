"""A dataset recipe end to end, as an image-text dataset team runs one, through the real command.

A gzipped CSV of ``url,caption,id`` against a loopback server that opts some images out with
``X-Robots-Tag``; webdataset out, ``resize`` cover 128x128, at least 64x64, aspect ratio at most
10. The tars load as ``jpg;png`` + ``txt`` pairs with the webdataset package, the opted-out and
filtered rows are right, a rebuild into another folder is byte-identical, and tar names stay
contiguous after lines are appended to the input.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webdataset as wds
from helpers import encode, photo

from pipeline.bench.server import QuietHandler, StaticServer

CONFIG = """
[input]
shard_size = 6
[output]
format = "webdataset"
shard_size = 4
caption_column = "caption"
[transform]
min_width = 64
min_height = 64
max_aspect_ratio = 10
[[transform.ops]]
op = "resize"
width = 128
height = 128
mode = "cover"
"""

SIZES = {  # name: (width, height, what the recipe must make of it)
    "wide.jpg": (400, 200, "ok"),
    "tall.jpg": (150, 300, "ok"),
    "small.jpg": (40, 40, "too_small"),
    "strip.jpg": (1300, 100, "aspect_ratio"),
    "square.png": (200, 200, "ok"),
    "noai.jpg": (300, 300, "opted_out"),
    "botnoai.jpg": (300, 300, "opted_out"),
    "otherbot.jpg": (300, 300, "ok"),
}
HEADERS = {
    "noai.jpg": ["noindex, NoAI"],
    "botnoai.jpg": ["googlebot: nofollow", "noimageai"],
    "otherbot.jpg": ["otherbot: noai"],  # addressed to another crawler: not to us
}


class OptingOut(QuietHandler):
    def end_headers(self) -> None:
        for value in HEADERS.get(self.path.rsplit("/", 1)[-1], []):
            self.send_header("X-Robots-Tag", value)
        super().end_headers()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticServer]:
    root = tmp_path_factory.mktemp("recipe")
    for i, (name, (width, height, _)) in enumerate(SIZES.items()):
        fmt = "PNG" if name.endswith(".png") else "JPEG"
        (root / name).write_bytes(encode(photo(width, height, seed=i), fmt))
    with StaticServer(root, handler=OptingOut) as srv:
        yield srv


def csv_gz_member(server: StaticServer, names: list[str], header: bool) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text)
    if header:
        writer.writerow(["url", "caption", "id"])
    for name in names:
        writer.writerow([server.url(name), f"a photo called {name}, ünïcode", name])
    return gzip.compress(text.getvalue().encode())


def run(folder: Path, out: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline", "run", "urls.csv.gz", "--out", out, "-q"]
    proc = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def rows(out: Path) -> dict[str, dict[str, Any]]:
    found = [
        json.loads(line)
        for path in sorted((out / "manifest").glob("*.jsonl"))
        for line in path.read_text().splitlines()
    ]
    by_id = {row["columns"]["id"]: row for row in found}
    assert len(by_id) == len(found), "a line has two rows"
    return by_id


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_a_recipe_end_to_end(tmp_path, server):
    names = list(SIZES)
    (tmp_path / "config.toml").write_text(CONFIG)
    (tmp_path / "urls.csv.gz").write_bytes(csv_gz_member(server, names, header=True))
    run(tmp_path, "out")

    got = rows(tmp_path / "out")
    assert set(got) == set(names)
    for name, (_, _, expected) in SIZES.items():
        row = got[name]
        if expected == "ok":
            assert row["status"] == "ok", row
            assert min(row["width_out"], row["height_out"]) == 128, row  # cover: shortest side
        elif expected == "opted_out":
            assert (row["status"], row["error_kind"]) == ("failed", "opted_out"), row
        else:
            assert (row["status"], row["error_kind"]) == ("filtered", expected), row

    # a rebuild of the same input into another folder: byte for byte the same tars
    run(tmp_path, "again")
    assert tars(tmp_path / "out") == tars(tmp_path / "again")

    # lines appended (a second gzip member), and a rerun: contiguous names, every sample once
    more = [f"{name}?again" for name in ("wide.jpg", "tall.jpg", "square.png")]
    with (tmp_path / "urls.csv.gz").open("ab") as f:
        f.write(csv_gz_member(server, more, header=False))
    run(tmp_path, "out")
    shards = tars(tmp_path / "out")
    assert list(shards) == [f"{i:05d}.tar" for i in range(len(shards))]
    index = json.loads((tmp_path / "out" / "shards" / "index.json").read_text())
    assert [entry["name"] for entry in index["tars"]] == list(shards)
    samples = sum(1 for *_, expected in SIZES.values() if expected == "ok") + len(more)
    assert sum(entry["samples"] for entry in index["tars"]) == index["samples"] == samples

    pattern = str(tmp_path / "out" / "shards" / f"{{00000..{len(shards) - 1:05d}}}.tar")
    dataset = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg;png", "txt")
    pairs = list(dataset)
    assert len(pairs) == samples
    captions = sorted(text for _, text in pairs)
    assert all(text.startswith("a photo called ") and "ünïcode" in text for text in captions)
    assert all(min(image.size) == 128 for image, _ in pairs)
