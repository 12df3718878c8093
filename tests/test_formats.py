"""Output formats read back: webdataset tars (with the webdataset package and with tarfile), the
parquet manifest, and the sha256 of every ok row; a kill -9 mid-run leaves no sample twice."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import descendants, gated_handler, wait_for

from pipeline.bench.server import StaticServer
from pipeline.formats import read_shards
from pipeline.sink import read_manifest

CONFIG = """
[input]
shard_size = 7
[output]
format = "{layout}"
shard_size = 3
parquet = true
"""


def run(folder: Path, layout: str, *args: str) -> subprocess.CompletedProcess[str]:
    (folder / f"{layout}.toml").write_text(CONFIG.format(layout=layout))
    command = [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", layout, "-q"]
    command += ["--config", f"{layout}.toml", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=False)


def urls(server: StaticServer, image_dir: Path) -> list[str]:
    names = sorted(p.name for p in image_dir.iterdir())[:20]
    return [server.url(name) for name in names] + [server.url("missing.jpg")]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def samples_by_tarfile(out: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every tar: key -> {extension: bytes}; a key met twice fails."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in read_shards(out):
        with tarfile.open(path) as tar:
            seen: set[str] = set()
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                file = tar.extractfile(member)
                assert file is not None
                if key not in seen:
                    assert key not in samples, f"{key} is in two tars"
                    seen.add(key)
                samples.setdefault(key, {})[extension] = file.read()
    return samples


@pytest.fixture(scope="module")
def both(tmp_path_factory, server, image_dir):
    folder = tmp_path_factory.mktemp("formats")
    (folder / "urls.txt").write_text("\n".join(urls(server, image_dir)) + "\n")
    for layout in ("files", "webdataset"):
        done = run(folder, layout)
        assert done.returncode == 0, done.stderr
    return folder


def test_webdataset_holds_every_ok_row_once_with_the_bytes_files_mode_writes(both):
    files = {row["key"]: row for row in read_manifest(both / "files")}
    rows = {row["key"]: row for row in read_manifest(both / "webdataset")}
    ok = {key for key, row in files.items() if row["status"] == "ok"}
    assert len(ok) == 20 and set(rows) == set(files)  # and the failed line has its row
    samples = samples_by_tarfile(both / "webdataset")
    assert set(samples) == ok
    for key, sample in samples.items():
        image = (both / "files" / files[key]["path"]).read_bytes()
        assert sample["jpg"] == image  # the same bytes as the files layout
        left_out = {"download_ms", "transform_ms", "cpu_ms", "error_kind", "error", "duplicate_of"}
        want = {name: value for name, value in rows[key].items() if name not in left_out}
        assert json.loads(sample["json"]) == want  # the manifest row less its timings
        assert rows[key]["path"] == f"{key}.jpg"
        assert rows[key]["sha256"] == files[key]["sha256"] == hashlib.sha256(image).hexdigest()
    tars = sorted(p.name for p in read_shards(both / "webdataset"))
    # shards of 7 lines; at most 3 samples a tar: 7 -> 3+3+1, 7 -> 3+3+1, 7 -> 3+3 (+ the 404)
    assert tars == [f"{n:05d}.tar" for n in range(8)]
    assert not list((both / "webdataset").rglob("*.part"))
    assert not list((both / "webdataset" / "shards" / ".packed").iterdir())
    assert not [p for p in (both / "webdataset" / ".staging").rglob("*") if p.is_file()]


def test_the_webdataset_package_reads_the_shards(both):
    paths = [str(p) for p in read_shards(both / "webdataset")]
    dataset = wds.WebDataset(paths, shardshuffle=False).decode("pil")
    keys = Counter()
    for sample in dataset:
        keys[sample["__key__"]] += 1
        assert sample["json"]["key"] == sample["__key__"]
        assert sample["jpg"].mode == "RGB" and max(sample["jpg"].size) <= 256
    assert len(keys) == 20 and set(keys.values()) == {1}


def test_the_parquet_manifest_has_the_jsonl_rows(both):
    for layout in ("files", "webdataset"):
        out = both / layout
        for jsonl in sorted((out / "manifest").glob("*.jsonl")):
            rows = sorted(
                (json.loads(line) for line in jsonl.read_text().splitlines()),
                key=lambda row: row["line"],
            )
            table = pq.read_table(jsonl.with_suffix(".parquet")).to_pylist()
            assert [row["key"] for row in table] == [row["key"] for row in rows]
            for got, want in zip(table, rows, strict=True):
                assert {**got, "columns": None} == {**want, "columns": None}


def test_kill_9_mid_run_then_rerun_gives_each_sample_once(tmp_path, server, image_dir):
    gated = gated_handler()
    with StaticServer(image_dir, handler=gated) as held:
        lines = urls(server, image_dir)
        lines[9:9] = [held.url(name) for name in sorted(p.name for p in image_dir.iterdir())[:2]]
        (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
        (tmp_path / "webdataset.toml").write_text(CONFIG.format(layout="webdataset"))
        command = [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "webdataset"]
        command += ["-q", "--config", "webdataset.toml"]
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL)
        out = tmp_path / "webdataset"
        try:  # the first shard is packed; the second waits for the held URLs
            wait_for(lambda: len(list(read_shards(out))) >= 3, what="the first shard's tars")
            children = set(descendants(proc.pid))  # lanes, workers, the packer, the helpers
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            gated.gate.set()
        wait_for(lambda: not [pid for pid in children if alive(pid)], what="no process left")
        done = run(tmp_path, "webdataset")
    assert done.returncode == 0, done.stderr
    rows = {row["key"]: row for row in read_manifest(out)}
    assert len(rows) == len(lines)
    ok = {key for key, row in rows.items() if row["status"] == "ok"}
    assert set(samples_by_tarfile(out)) == ok  # each once: samples_by_tarfile checks
    assert not list(out.rglob("*.part"))
    assert not [p for p in (out / ".staging").rglob("*") if p.is_file()]


def test_restart_removes_the_old_tar_shards(both, tmp_path):
    out = tmp_path / "webdataset"
    shutil.copytree(both / "webdataset", out)
    (tmp_path / "urls.txt").write_text((both / "urls.txt").read_text().splitlines()[0] + "\n")
    done = run(tmp_path, "webdataset", "--restart")
    assert done.returncode == 0, done.stderr
    assert [p.name for p in read_shards(out)] == ["00000.tar"]
    assert list(samples_by_tarfile(out)) == ["00000-000000001"]
