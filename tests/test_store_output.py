"""An output in an object store (``--out s3://...``), against a real S3-compatible server (moto's,
on 127.0.0.1) with images served on loopback: through the real command, every guarantee of a
local folder (each line once, resume after kill -9, one writer, failures as one line or rows,
--restart, secrets never shown); and the mirror and resume from seals, as units."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import gated_handler, s3_server, wait_for

from pipeline.bench.server import StaticServer
from pipeline.objects import ObjectStore
from pipeline.storage import Location

SECRET = "0utput-s3cr3t-n3ver-sh0wn"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    import s3fs

    with s3_server() as env, pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # one made for another server is no use
        yield env
    s3fs.S3FileSystem.clear_instance_cache()


def _bucket(name: str) -> ObjectStore:
    store = ObjectStore.check(Location(f"s3://{name}/run"))
    store.fs.mkdir(name)
    return store


def _objects(store: ObjectStore) -> dict[str, bytes]:
    return {name: store.get_bytes(name) or b"" for name in store.names()}


def _rows(store: ObjectStore) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for name in store.names("manifest")
        if name.endswith(".jsonl")
        for line in (store.get_bytes(name) or b"").splitlines()
    ]


def _command(cwd: Path, env: dict[str, str], *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", *args, "-q"]


def _env(tmp_path: Path, s3: dict[str, str]) -> dict[str, str]:
    temporary = tmp_path / "tmp"  # where the staging folder is made: empty again at the end
    temporary.mkdir(exist_ok=True)
    return {**os.environ, **s3, "TMPDIR": str(temporary)}


def _run(cwd: Path, s3: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        _command(cwd, s3, *args), cwd=cwd, env=_env(cwd, s3), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _config(tmp_path: Path, shard_size: int = 3, **output: str) -> None:
    extra = "".join(f"{key} = {value}\n" for key, value in output.items())
    (tmp_path / "config.toml").write_text(
        f"[input]\nshard_size = {shard_size}\n"
        f'[output]\n{extra}[output.storage_options]\nkey = "testing"\nsecret = "{SECRET}"\n'
        "[download]\nworkers = 2\n[transform]\nworkers = 1\n"
    )


def test_files_into_s3_every_line_once_each_image_its_object_no_secret_anywhere(
    tmp_path, s3, server, image_dir
):
    names = sorted(p.name for p in image_dir.glob("*.jpg"))[:7]
    urls = [server.url(n) for n in names] + [server.url("missing.jpg")]
    (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
    _config(tmp_path)
    store = _bucket("files")
    local = _run(tmp_path, s3, "urls.txt", "--out", "local")
    assert local.returncode == 0, local.stderr
    first = _run(tmp_path, s3, "urls.txt", "--out", "s3://files/run")
    assert first.returncode == 0, first.stderr
    rows = _rows(store)
    assert sorted(row["line"] for row in rows) == list(range(1, 9))  # each line exactly once
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 7 and [r["error_kind"] for r in rows if r not in ok] == ["http_4xx"]
    objects = _objects(store)
    for row in ok:  # the bytes a local run of the same input wrote
        assert objects[row["path"]] == (tmp_path / "local" / row["path"]).read_bytes()
    seals = [name for name in objects if name.endswith(".seal.json")]
    assert len(seals) == 3 and "run.json" in objects and "report.json" in objects
    assert any(name.startswith("reports/") for name in objects)
    assert not any(name.endswith(".part") for name in objects)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "local", "tmp", "urls.txt"]
    assert list((tmp_path / "tmp").iterdir()) == []  # the staging folder is gone
    again = _run(tmp_path, s3, "urls.txt", "--out", "s3://files/run", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "nothing left to do" in " ".join(again.stdout.split())
    assert "s3://files/run" in again.stdout
    report = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", "s3://files/run"], env=_env(tmp_path, s3),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "8 URLs recorded: 7 ok, 1 failed" in report.stdout
    for text in (first.stdout, first.stderr, again.stdout, again.stderr, report.stdout):
        assert SECRET not in text
    assert not any(SECRET.encode() in data for data in _objects(store).values())


def _start(cwd: Path, s3: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _command(cwd, s3, *args), cwd=cwd, env=_env(cwd, s3), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_kill_9_mid_run_then_rerun_every_line_once_sealed_shards_kept_one_writer(
    tmp_path, s3, server, image_dir
):
    """Shards 1 and 2 sealed, shard 3 waiting on a gated server: a second run is refused in one
    line; the first is killed -9; once its lease is over a rerun does shards 3 and 4 only."""
    names = sorted(p.name for p in image_dir.glob("*.jpg"))[:8]
    gated = gated_handler()
    with StaticServer(image_dir, handler=gated) as slow:
        urls = [server.url(n) for n in names[:4]] + [slow.url(n) for n in names[4:]]
        (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
        _config(tmp_path, shard_size=2, lease="2")
        store = _bucket("killed")
        args = ("urls.txt", "--out", "s3://killed/run")
        proc = _start(tmp_path, s3, *args)
        try:
            seals = lambda: [n for n in store.names("manifest") if n.endswith(".seal.json")]  # noqa: E731
            wait_for(lambda: len(seals()) == 2, what="two shards sealed in the store")
            assert gated.arrived.acquire(timeout=30)  # shard 3 is downloading
            stats = {n: store.get_bytes(n) for n in store.names("manifest") if "stats" in n}
            second = _run(tmp_path, s3, *args)
            assert second.returncode == 2
            assert "another pipeline run is writing into this folder (pid" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
        finally:
            proc.kill()
            proc.wait(timeout=30)
        gated.gate.set()
        assert not any(n.endswith(".jsonl") and "000000005" in n for n in store.names())
        lock = store.key(".lock")
        ended = lambda: store.fs.info(lock, refresh=True)["LastModified"].timestamp() + 2.5  # noqa: E731
        wait_for(lambda: ended() < __import__("time").time(), what="the killed run's lease")
        again = _run(tmp_path, s3, *args)
        assert again.returncode == 0, again.stderr
    rows = _rows(store)
    assert sorted(row["line"] for row in rows) == list(range(1, 9))
    assert all(row["status"] == "ok" for row in rows)
    assert [row["path"] for row in rows if not store.get_bytes(row["path"])] == []
    assert {n: store.get_bytes(n) for n in stats} == stats  # the sealed shards were not redone
    report = json.loads(store.get_bytes("report.json") or b"{}")
    assert (report["skipped"], report["ok"]) == (4, 4)
