"""Training samples through the real command: captions as .txt, the same tar bytes from two builds,
tars named 00000.. across appends and kills with shards/index.json, per-shard stats, a staged
file lost before a rerun, and --restart on a folder pipeline never wrote."""

from __future__ import annotations

import csv
import io
import json
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import webdataset as wds
from helpers import gated_handler, wait_for

from pipeline.bench.server import StaticServer
from pipeline.layout import OutputLayout
from pipeline.sink import read_manifest

CONFIG = """
[input]
shard_size = 4
[output]
format = "{layout}"
shard_size = 3
caption_column = "caption"
sample_columns = ["id"]
flush_rows = 1
"""


def write_csv(path: Path, rows: list[list[str]], *, header: bool = True) -> None:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    if header:
        writer.writerow(["url", "caption", "id"])
    writer.writerows(rows)
    with path.open("a", encoding="utf-8") as f:
        f.write(out.getvalue())


def lines(server: StaticServer, image_dir: Path, start: int, count: int) -> list[list[str]]:
    names = sorted(p.name for p in image_dir.iterdir())[start : start + count]
    return [[server.url(name), f"photo {start + i}, café ☕", str(start + i)]
            for i, name in enumerate(names)]  # fmt: skip


def run(
    folder: Path, out: str, *args: str, layout: str = "webdataset"
) -> subprocess.CompletedProcess[str]:
    (folder / f"{out}.toml").write_text(CONFIG.format(layout=layout))
    command = [sys.executable, "-m", "pipeline", "run", "urls", "--out", out, "-q"]
    command += ["--config", f"{out}.toml", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)


def tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def members(path: Path) -> dict[str, bytes]:
    held = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member)
            assert data is not None
            held[member.name] = data.read()
    return held


def check_names_and_index(out: Path) -> dict[str, dict[str, bytes]]:
    """Tars 00000.. with no gap, each listed in index.json with its samples and manifest shard,
    every ok row a sample once; the samples by key."""
    tars = tar_bytes(out)
    assert list(tars) == [f"{n:05d}.tar" for n in range(len(tars))]
    index = json.loads((out / "shards" / "index.json").read_text())
    assert [entry["name"] for entry in index["tars"]] == list(tars)
    samples: dict[str, dict[str, bytes]] = {}
    for entry in index["tars"]:
        held = members(out / "shards" / entry["name"])
        keys = {name.split(".", 1)[0] for name in held}
        assert len(keys) == entry["samples"] and {k[:5] for k in keys} == {entry["shard"][:5]}
        for name, data in held.items():
            key, extension = name.split(".", 1)
            samples.setdefault(key, {})[extension] = data
    assert index["samples"] == len(samples)
    rows = list(read_manifest(out))
    assert sorted(samples) == sorted(row["key"] for row in rows if row["status"] == "ok")
    assert not list((out / "shards" / ".packed").iterdir())
    return samples


@pytest.fixture(scope="module")
def built(tmp_path_factory, server, image_dir):
    """The same CSV built twice into two folders."""
    folder = tmp_path_factory.mktemp("samples")
    (folder / "urls").mkdir()
    rows = [*lines(server, image_dir, 0, 9), [server.url("missing.jpg"), "", "404"]]
    write_csv(folder / "urls" / "a.csv", rows)
    for out in ("a", "b"):
        done = run(folder, out)
        assert done.returncode == 0, done.stderr
    return folder


def test_a_sample_is_jpg_txt_json_and_the_json_is_the_same_in_two_builds(built):
    a, b = tar_bytes(built / "a"), tar_bytes(built / "b")
    assert len(a) == 5 and a == b  # shards of 4 lines, 3 samples a tar: 3+1, 3+1, 1 (+ a 404)
    samples = check_names_and_index(built / "a")
    rows = {row["key"]: row for row in read_manifest(built / "a")}
    assert len(samples) == 9
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "txt", "json"}
        line = rows[key]["line"] - 2  # the header is line 1
        assert sample["txt"].decode("utf-8") == f"photo {line}, café ☕"
        got = json.loads(sample["json"])
        assert got["columns"] == {"id": str(line)} and got["sha256"] == rows[key]["sha256"]
        assert not {"download_ms", "transform_ms", "cpu_ms"} & set(got)
        assert rows[key]["columns"]["caption"]  # the manifest keeps every column, and timings
        assert "download_ms" in rows[key]


def test_each_sealed_shard_has_stats_that_agree_with_its_manifest(built):
    manifest = built / "a" / "manifest"
    for jsonl in sorted(manifest.glob("*.jsonl")):
        rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
        stats = json.loads(jsonl.with_suffix(".stats.json").read_text())
        assert stats["status"] == dict(Counter(row["status"] for row in rows))
        kinds = Counter(row["error_kind"] for row in rows if row["error_kind"])
        assert stats["error_kinds"] == dict(kinds)
        assert stats["bytes_in"] == sum(row["bytes_in"] for row in rows)
        assert stats["bytes_out"] == sum(row["bytes_out"] for row in rows)
        lines_ = [row["line"] for row in rows]
        assert (stats["first_line"], stats["last_line"]) == (min(lines_), max(lines_))
        assert stats["lines"] == len(rows) and stats["seconds"] >= 0
    assert json.loads((manifest / "00000-000000010.stats.json").read_text())["error_kinds"] == {
        "http_4xx": 1
    }


def test_appends_and_a_new_file_continue_the_numbers_and_webdataset_reads_a_brace_range(
    built, server, image_dir
):
    folder = built
    write_csv(folder / "urls" / "a.csv", lines(server, image_dir, 10, 2), header=False)
    write_csv(folder / "urls" / "b.csv", lines(server, image_dir, 12, 4))
    done = run(folder, "a")
    assert done.returncode == 0, done.stderr
    samples = check_names_and_index(folder / "a")
    assert len(samples) == 9 + 2 + 4
    last = len(tar_bytes(folder / "a")) - 1
    assert last == 7  # 5 tars, then a.csv's 2 appended lines (one shard), b.csv's 4: 3+1
    pattern = str(folder / "a" / "shards" / f"{{00000..{last:05d}}}.tar")
    dataset = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("jpg;png", "txt")
    got = [(image.size, text) for image, text in dataset]
    assert len(got) == 15 and all(max(size) <= 256 for size, _ in got)
    assert sorted(text for _, text in got) == sorted(s["txt"].decode() for s in samples.values())


def test_files_layout_writes_each_caption_beside_its_image(tmp_path, server, image_dir):
    (tmp_path / "urls").mkdir()
    rows = lines(server, image_dir, 0, 3)
    rows[1] = rows[1][:1]  # a short row: no caption cell
    write_csv(tmp_path / "urls" / "a.csv", rows)
    done = run(tmp_path, "files", layout="files")
    assert done.returncode == 0, done.stderr
    found = {}
    for row in read_manifest(tmp_path / "files"):
        caption = (tmp_path / "files" / row["path"]).with_suffix(".txt")
        found[row["line"]] = caption.read_text(encoding="utf-8") if caption.exists() else None
    assert found == {2: "photo 0, café ☕", 3: None, 4: "photo 2, café ☕"}


def test_a_staged_file_lost_after_a_kill_is_done_again(tmp_path, server, image_dir):
    (tmp_path / "urls").mkdir()
    gated = gated_handler()
    with StaticServer(image_dir, handler=gated) as held:
        rows = lines(server, image_dir, 0, 3)
        rows.append([held.url(sorted(p.name for p in image_dir.iterdir())[3]), "held", "3"])
        write_csv(tmp_path / "urls" / "a.csv", rows)  # shard 1: lines 1-4 (the header, 3 URLs)
        write_csv(tmp_path / "urls" / "a.csv", lines(server, image_dir, 4, 2), header=False)
        (tmp_path / "wds.toml").write_text(CONFIG.format(layout="webdataset"))
        command = [sys.executable, "-m", "pipeline", "run", "urls", "--out", "wds", "-q"]
        proc = subprocess.Popen([*command, "--config", "wds.toml"], cwd=tmp_path)
        out = tmp_path / "wds"
        part = out / "manifest" / "00000-000000002.jsonl.part"
        try:  # lines 2 and 3 done and recorded; line 5 held: the shard stays open
            wait_for(lambda: part.exists() and part.read_text().count("\n") >= 3, what="rows")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            gated.gate.set()
        row = next(json.loads(t) for t in part.read_text().splitlines() if '"line":3,' in t)
        staged = out / OutputLayout(webdataset=True, folder_size=1000).staged(row)
        staged.unlink()
        done = run(tmp_path, "wds")
    assert done.returncode == 0, done.stderr
    assert f"{row['key']}: done again: its staged output" in done.stderr
    rows_ = list(read_manifest(out))
    assert sorted(r["line"] for r in rows_) == list(range(2, 8))  # every line once
    samples = check_names_and_index(out)
    assert row["key"] in samples and len(samples) == 6


def test_restart_refuses_a_folder_pipeline_did_not_write(tmp_path, server, image_dir):
    (tmp_path / "urls").mkdir()
    write_csv(tmp_path / "urls" / "a.csv", lines(server, image_dir, 0, 1))
    mine = tmp_path / "data" / "manifest" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("keep me")
    done = run(tmp_path, "data", "--restart")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "data: not an output folder of pipeline" in done.stderr
    assert mine.read_text() == "keep me" and not (tmp_path / "data" / "run.json").exists()
    photo = tmp_path / "photos" / "images" / "cat.jpg"  # --restart removes images/ too
    photo.parent.mkdir(parents=True)
    photo.write_text("keep me")
    done = run(tmp_path, "photos", "--restart")
    assert done.returncode == 2 and "would remove its images" in done.stderr
    assert photo.read_text() == "keep me"
    done = run(tmp_path, "fresh", "--restart")  # a folder with nothing to remove is fine
    assert done.returncode == 0, done.stderr
    assert [p.name for p in (tmp_path / "fresh" / "shards").glob("*.tar")] == ["00000.tar"]
