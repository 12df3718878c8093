"""The transform's options through the real command: filters, cover, keeping the original bytes.

Each case runs ``python -m pipeline run`` against a StaticServer on 127.0.0.1 and checks the rows,
the files and the report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import command, encode, photo
from PIL import Image

from pipeline.bench.server import StaticServer
from pipeline.sink import read_manifest

FIT_128 = '[[transform.ops]]\nop = "resize"\nwidth = 128\nheight = 128\nenlarge = false\n'
RECIPE = """
[transform]
min_width = 64
min_height = 64
max_aspect_ratio = 10
[[transform.ops]]
op = "exif_transpose"
[[transform.ops]]
op = "resize"
width = 128
height = 128
mode = "cover"
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StaticServer, Path]]:
    folder = tmp_path_factory.mktemp("served")
    for name, size in {"tiny.png": (16, 16), "strip.jpg": (2000, 20), "wide.jpg": (300, 200),
                       "tall.jpg": (150, 400), "small.jpg": (100, 80)}.items():  # fmt: skip
        (folder / name).write_bytes(encode(photo(*size), "PNG" if name.endswith("png") else "JPEG"))
    with StaticServer(folder) as server:
        yield server, folder


def run(folder: Path, urls: str, config: str) -> tuple[str, dict[str, dict[str, Any]]]:
    (folder / "config.toml").write_text(config)
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", urls, "--out", "out", "--config", "config.toml"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, {row["url"].rsplit("/", 1)[1]: row for row in read_manifest(folder / "out")}


def test_a_recipe_filters_small_and_elongated_images_and_covers_the_rest(tmp_path, served):
    server, _ = served
    names = ["tiny.png", "strip.jpg", "wide.jpg", "tall.jpg"]
    (tmp_path / "urls.txt").write_text("".join(f"{server.url(n)}\n" for n in names))
    stdout, rows = run(tmp_path, "urls.txt", RECIPE)
    status = {name: (row["status"], row["error_kind"]) for name, row in rows.items()}
    assert status == {
        "tiny.png": ("filtered", "too_small"),
        "strip.jpg": ("filtered", "aspect_ratio"),
        "wide.jpg": ("ok", None),
        "tall.jpg": ("ok", None),
    }
    assert rows["tiny.png"]["path"] is None and rows["strip.jpg"]["path"] is None
    sizes = {
        n: Image.open(tmp_path / "out" / rows[n]["path"]).size for n in ("wide.jpg", "tall.jpg")
    }
    assert sizes == {"wide.jpg": (192, 128), "tall.jpg": (128, 341)}  # the shortest side is 128
    assert len(list((tmp_path / "out" / "images").rglob("*.jpg"))) == 2
    assert "4: 2 ok, 0 failed, 2 filtered" in stdout
    assert "filtered    2 left out by the filters: " in stdout
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["filtered"] == {"too_small": 1, "aspect_ratio": 1} and report["ok"] == 2

    stdout, again = run(tmp_path, "urls.txt", RECIPE)  # final: a rerun leaves them as they are
    assert again == rows
    assert json.loads((tmp_path / "out" / "report.json").read_text())["urls"] == 0


def test_kept_bytes_re_encoded_ones_and_a_hash_mismatch(tmp_path, served):
    server, folder = served
    digest = {
        n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in ("small.jpg", "wide.jpg")
    }
    with (tmp_path / "urls.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "sha256"])
        writer.writerow([server.url("small.jpg"), digest["small.jpg"]])
        writer.writerow([server.url("wide.jpg"), digest["wide.jpg"]])
        writer.writerow([server.url("tall.jpg"), digest["wide.jpg"]])  # not its hash
    config = '[input]\nhash_column = "sha256"\n[transform]\nreencode = false\n' + FIT_128
    _, rows = run(tmp_path, "urls.csv", config)
    small, wide, tall = rows["small.jpg"], rows["wide.jpg"], rows["tall.jpg"]
    assert (tmp_path / "out" / small["path"]).read_bytes() == (folder / "small.jpg").read_bytes()
    assert small["sha256"] == small["original_sha256"] == digest["small.jpg"]
    assert (
        wide["status"] == "ok" and wide["original_sha256"] == digest["wide.jpg"] != wide["sha256"]
    )
    assert Image.open(tmp_path / "out" / wide["path"]).size == (128, 85)  # fitted: re-encoded
    assert (tall["status"], tall["error_kind"], tall["path"]) == ("failed", "hash_mismatch", None)


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_registered_op_runs_in_the_transform_processes(tmp_path, served, start_method):
    # _crash is known only where testops was imported: the launcher registers it, and each lane
    # and transform process imports testops when it unpickles the op (no start method forks us)
    server, _ = served
    (tmp_path / "urls.txt").write_text(f"{server.url('wide.jpg')}\n{server.url('small.jpg')}\n")
    (tmp_path / "config.toml").write_text(
        f'[transform]\nstart_method = "{start_method}"\nworkers = 1\n'
        '[[transform.ops]]\nop = "_crash"\nwidth = 100\nheight = 80\n'  # small.jpg's size
    )
    done = subprocess.run(
        command("run", "urls.txt", "--out", "out", "--config", "config.toml", "-q"),
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {row["url"].rsplit("/", 1)[1]: row for row in read_manifest(tmp_path / "out")}
    assert {name: row["error_kind"] for name, row in rows.items()} == {
        "wide.jpg": None,
        "small.jpg": "worker_crash",
    }
