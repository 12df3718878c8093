"""End to end: real loopback server -> download threads -> process pool -> files + manifest."""

from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import leftover_workers
from PIL import Image

from pipeline.bench.server import StaticServer
from pipeline.config import (
    Config,
    DownloadConfig,
    InputConfig,
    OutputConfig,
    QueuesConfig,
    Thumbnail,
    TransformConfig,
)
from pipeline.runner import run
from pipeline.shape import CHUNK
from pipeline.sink import read_manifest

BOX = (64, 48)


def pipeline_threads() -> set[threading.Thread]:
    """Live threads, less the test server's handlers (they end when they see a client's close)."""
    return {t for t in threading.enumerate() if "process_request_thread" not in t.name}


def make_config(out: Path, start_method: str = "forkserver", **queues: int) -> Config:
    return Config(
        output=OutputConfig(dir=str(out), folder_size=20),
        download=DownloadConfig(workers=4),
        transform=TransformConfig(workers=2, start_method=start_method, ops=(Thumbnail(*BOX),)),
        queues=QueuesConfig(**queues),
    )


def url_list(tmp_path: Path, server: StaticServer, image_dir: Path) -> tuple[Path, list[str]]:
    good = [server.url(p.name) for p in sorted(image_dir.iterdir())]
    bad = [server.url("missing.jpg"), server.url(""), "ftp://127.0.0.1/x.jpg"]
    source = tmp_path / "urls"
    source.mkdir()
    (source / "a.txt").write_text("# images\n" + "\n".join(good[:30]) + "\n\n" + bad[0] + "\n")
    (source / "b.csv").write_text(
        "id,url\n" + "".join(f"{i},{u}\n" for i, u in enumerate(good[30:] + bad[1:]))
    )
    return source, good


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_every_url_is_processed_once(tmp_path, server, image_dir, start_method):
    threads_before = pipeline_threads()
    source, good = url_list(tmp_path, server, image_dir)
    out = tmp_path / "out"

    report = run([source], make_config(out, start_method, fetched=3, results=5))

    rows = list(read_manifest(out, include_parts=True))
    assert sorted(r["url"] for r in rows) == sorted(
        [*good, server.url("missing.jpg"), server.url(""), "ftp://127.0.0.1/x.jpg"]
    )
    assert len({r["key"] for r in rows}) == len(rows)
    assert not list((out / "manifest").glob("*.part")), "every shard must be sealed"
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["url"] for r in ok) == sorted(good)
    for row in ok:
        with Image.open(out / row["path"]) as image:
            assert image.format == "JPEG"
            assert image.size == (row["width_out"], row["height_out"])
            assert image.width <= BOX[0] and image.height <= BOX[1]
            assert max(image.width / BOX[0], image.height / BOX[1]) > 0.97  # it was shrunk to fit
    kinds = {r["url"]: r["error_kind"] for r in rows if r["status"] == "failed"}
    assert kinds == {
        server.url("missing.jpg"): "http_4xx",
        server.url(""): "not_image",
        "ftp://127.0.0.1/x.jpg": "invalid_url",
    }
    assert report.ok == len(ok) and report.failed == dict(Counter(kinds.values()))
    assert not list(out.rglob("*.tmp")), "no temporary file may be left behind"
    assert leftover_workers() == []
    assert pipeline_threads() == threads_before


def test_queues_never_exceed_their_bounds(tmp_path, server, image_dir):
    source, good = url_list(tmp_path, server, image_dir)
    report = run([source], make_config(tmp_path / "out", fetched=2, results=3))
    peaks = {q.name: (q.peak, q.bound) for q in report.queues}
    assert peaks["fetched"][1] == 2 and peaks["pool"][1] == 2 * 2 * CHUNK  # chunks, per worker
    for name, (peak, bound) in peaks.items():
        assert 1 <= peak <= bound, name
    assert report.ok == len(good)


def test_output_folders_hold_at_most_folder_size_files(tmp_path, server, image_dir):
    source, good = url_list(tmp_path, server, image_dir)
    out = tmp_path / "out"
    run([source], make_config(out))  # folder_size=20, 50 images over 2 shards
    folders = Counter(p.parent for p in (out / "images").rglob("*.jpg"))
    assert sum(folders.values()) == len(good)
    assert max(folders.values()) <= 20


def test_shards_split_the_input_and_each_gets_a_sealed_manifest(tmp_path, server, image_dir):
    source, good = url_list(tmp_path, server, image_dir)
    out = tmp_path / "out"
    report = run([source], replace(make_config(out), input=InputConfig(shard_size=7)))
    parts = sorted((out / "manifest").glob("*.jsonl"))
    # a.txt has 31 URLs and b.csv 22; a shard never spans two files
    assert len(parts) == math.ceil(31 / 7) + math.ceil(22 / 7)
    sizes = [sum(1 for _ in p.open()) for p in parts]
    assert sum(sizes) == report.urls == len(good) + 3
    assert max(sizes) == 7
