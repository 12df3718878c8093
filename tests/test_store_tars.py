"""Webdataset tars in an object store (a real S3-compatible server, moto's, on 127.0.0.1): the
packer puts each tar and the parquet whole, and the tars are named in the store (seals.py): the
record in the seal, then each packed tar copied to ``shards/NNNNN.tar`` and deleted, then the
index; what a kill left between them is finished by the next run."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import bucket, s3_environment

from pipeline.mirror import pull_state
from pipeline.objects import ObjectStore
from pipeline.seals import InOrder

pytest.importorskip("s3fs")


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with s3_environment() as env:
        yield env


def _rows(store: ObjectStore) -> dict[int, dict[str, Any]]:
    rows = [
        json.loads(line)
        for name in store.names("manifest")
        if name.endswith(".jsonl")
        for line in (store.get_bytes(name) or b"").splitlines()
    ]
    lines = Counter(row["line"] for row in rows)
    assert max(lines.values()) == 1, "a line recorded twice"
    return {row["line"]: row for row in rows}


def test_webdataset_into_s3_every_line_once_tars_numbered_without_gap_readable(
    tmp_path, s3, server, image_dir
):
    names = sorted(p.name for p in image_dir.glob("*.jpg"))
    urls = [server.url(f"{names[n % len(names)]}?n={n}") for n in range(17)]
    urls[5:5] = [server.url("missing.jpg")]  # 18 lines: shards of 7, 7, 4
    (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
    (tmp_path / "config.toml").write_text(
        '[input]\nshard_size = 7\n[output]\nformat = "webdataset"\nshard_size = 3\n'
        "parquet = true\n[download]\nworkers = 2\n[transform]\nworkers = 1\n"
    )
    store = bucket("tars")
    # where the run's staging is made: a short path, as multiprocessing's sockets need
    with tempfile.TemporaryDirectory(prefix="wds-") as folder:
        temporary = Path(folder)
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "s3://tars/run", "-q"],
            cwd=tmp_path, env={**os.environ, **s3, "TMPDIR": folder},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert not list(temporary.iterdir())  # staging went with the run
    rows = _rows(store)
    assert sorted(rows) == list(range(1, 19))
    assert Counter(row["status"] for row in rows.values()) == {"ok": 17, "failed": 1}
    objects = store.names()
    # 6 ok, 7 ok, 4 ok in the three shards: 2 + 3 + 2 tars of at most 3 samples, in line order
    tars = [name for name in objects if name.startswith("shards/") and name.endswith(".tar")]
    assert tars == [f"shards/{n:05d}.tar" for n in range(7)]
    assert not store.names("shards/.packed") and not store.names("images")
    index = json.loads(store.get_bytes("shards/index.json") or b"{}")
    assert [(t["name"], t["samples"]) for t in index["tars"]] == [
        (f"{n:05d}.tar", count) for n, count in enumerate([3, 3, 3, 3, 1, 3, 1])
    ]
    assert len([name for name in objects if name.endswith(".parquet")]) == 3
    local = tmp_path / "read"
    store.fs.get(store.key("shards") + "/", str(local), recursive=True)
    import webdataset as wds

    dataset = wds.WebDataset(str(local / "{00000..00006}.tar"), shardshuffle=False)
    samples = list(dataset.decode("pil").to_tuple("__key__", "jpg", "json"))
    keys = [key for key, _, _ in samples]
    ok = sorted(row["key"] for row in rows.values() if row["status"] == "ok")
    assert keys == ok  # every ok line once, in line order across the tars
    assert all(sample["key"] == key for key, _, sample in samples)


def _packed_tar(name: str) -> bytes:
    import tarfile

    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo(f"{name}.txt")
        info.size = len(name)
        tar.addfile(info, io.BytesIO(name.encode()))
    return data.getvalue()


def _seal(store: ObjectStore, shard: str, samples: list[int], first: int | None = None) -> None:
    seal: dict[str, Any] = {"shard": shard, "count": sum(samples), "tar_samples": samples}
    if first is not None:
        seal["tar_first"] = first
    store.put_bytes(f"manifest/{shard}.seal.json", json.dumps(seal).encode())


def test_a_kill_between_the_record_and_the_copies_is_finished_by_the_next_run(s3, tmp_path):
    """Shard A's record is in its seal (tars 0 and 1): its first tar was copied and deleted,
    its second copied but not deleted; shard B is sealed, unnamed; shard C has tars packed but
    no seal (not sealed: packed again by its rerun). The next run's start finishes A, names B
    after it, leaves C alone, and writes the index."""
    store = bucket("named")
    a, b, c = "00000-000000001", "00000-000000011", "00001-000000001"
    _seal(store, a, [2, 1], first=0)
    store.put_bytes("shards/00000.tar", _packed_tar("a0"))
    store.put_bytes("shards/00001.tar", _packed_tar("a1"))
    store.put_bytes(f"shards/.packed/{a}-00001.tar", _packed_tar("a1"))
    _seal(store, b, [4])
    store.put_bytes(f"shards/.packed/{b}-00000.tar", _packed_tar("b0"))
    store.put_bytes(f"shards/.packed/{c}-00000.tar", _packed_tar("c0"))
    pull_state(store, tmp_path)  # as a run does before it plans: the seals come with it
    names = InOrder.start(tmp_path, store)
    assert store.names("shards") == [
        f"shards/.packed/{c}-00000.tar",
        "shards/00000.tar",
        "shards/00001.tar",
        "shards/00002.tar",
        "shards/index.json",
    ]
    assert store.get_bytes("shards/00002.tar") == _packed_tar("b0")
    assert json.loads(store.get_bytes(f"manifest/{b}.seal.json") or b"{}")["tar_first"] == 2
    index = json.loads(store.get_bytes("shards/index.json") or b"{}")
    assert [(t["name"], t["shard"]) for t in index["tars"]] == [
        ("00000.tar", a), ("00001.tar", a), ("00002.tar", b)
    ]  # fmt: skip
    assert index["samples"] == 7
    # C sealed now, in the store only (by a Dask task): the next number, its packed tar copied,
    # then deleted
    _seal(store, c, [1])
    names.met(c)
    names.sealed(c)
    assert store.get_bytes("shards/00003.tar") == _packed_tar("c0")
    assert not store.names("shards/.packed")
    assert json.loads(store.get_bytes(f"manifest/{c}.seal.json") or b"{}")["tar_first"] == 3
    assert not list(tmp_path.glob("shards/*"))  # no tar passed through the local folder
