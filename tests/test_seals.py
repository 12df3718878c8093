"""Seals and tar names: a kill between a shard's naming record and its renames, or before the
record, is finished by the next run; numbers never skip or repeat."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.records import ShardEnd
from pipeline.seals import TarNames, seal_json, seal_path, shard_path


def sealed(out: Path, shard: str, samples: list[int], first: int | None = None, *,
           packed: int | None = None, whole: bool = True) -> None:  # fmt: skip
    """A shard sealed (or not: ``whole`` false) with ``samples`` per tar, named from ``first``
    (None: unnamed); its tars from ``packed`` on are still under shards/.packed."""
    folder = out / "manifest"
    folder.mkdir(parents=True, exist_ok=True)
    more = {"tar_samples": samples} | ({} if first is None else {"tar_first": first})
    seal_path(folder, shard).write_bytes(seal_json(ShardEnd(shard, 4), **more))
    (shard_path(folder, shard) if whole else folder / f"{shard}.jsonl.part").write_text("")
    (out / "shards" / ".packed").mkdir(parents=True, exist_ok=True)
    for index in range(len(samples)):
        if first is None or (packed is not None and index >= packed):
            (out / "shards" / ".packed" / f"{shard}-{index:05d}.tar").write_text(f"{shard}/{index}")
        else:
            (out / "shards" / f"{first + index:05d}.tar").write_text(f"{shard}/{index}")


def test_a_kill_between_the_record_and_the_renames_is_finished_then_the_rest_named(tmp_path):
    sealed(tmp_path, "00000-000000001", [3, 1], 0)  # named and renamed
    sealed(tmp_path, "00000-000000005", [3, 3, 2], 2, packed=1)  # recorded, one tar renamed
    sealed(tmp_path, "00001-000000001", [2])  # sealed, never named
    sealed(tmp_path, "00000-000000009", [1], whole=False)  # not sealed: packed again later
    names = TarNames(tmp_path)
    names.load()
    assert names.unnamed == ["00001-000000001"] and names.next == 5
    names.name("00001-000000001")
    names.name("00001-000000001")  # named once only
    tars = sorted(p.name for p in (tmp_path / "shards").glob("*.tar"))
    assert tars == [f"{n:05d}.tar" for n in range(6)]
    held = [(tmp_path / "shards" / name).read_text() for name in tars]
    assert held == ["00000-000000001/0", "00000-000000001/1", "00000-000000005/0",
                    "00000-000000005/1", "00000-000000005/2", "00001-000000001/0"]  # fmt: skip
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert [(e["name"], e["samples"], e["shard"]) for e in index["tars"]][-2:] == [
        ("00004.tar", 2, "00000-000000005"), ("00005.tar", 2, "00001-000000001")]  # fmt: skip
    assert index["samples"] == 3 + 1 + 3 + 3 + 2 + 2
    record = json.loads(seal_path(tmp_path / "manifest", "00001-000000001").read_text())
    assert record["tar_first"] == 5
    assert [p.name for p in (tmp_path / "shards" / ".packed").iterdir()] == [
        "00000-000000009-00000.tar"]  # fmt: skip
