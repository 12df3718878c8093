"""The manifest: per-shard parts sealed when complete, resume's adoption, atomic writes."""

from __future__ import annotations

import json
import os

import pytest

from pipeline.atomic import write_atomic
from pipeline.errors import FetchError
from pipeline.records import Job, Outcome, ShardEnd
from pipeline.sink import Resume, Sink, read_manifest

FIELDS = [
    "key", "url", "status", "error_kind", "error", "http_status", "bytes_in", "bytes_out",
    "width_in", "height_in", "width_out", "height_out", "path", "download_ms", "transform_ms",
    "cpu_ms",
]  # fmt: skip


def ok(shard: int, index: int) -> Outcome:
    job = Job(shard, index, f"http://x/{shard}/{index}.jpg")
    return Outcome(key=job.key, url=job.url, status="ok", path=job.output_path("jpg", 1000))


def failed(shard: int, index: int, kind: str, status: int | None = None) -> Outcome:
    job = Job(shard, index, f"http://x/{shard}/{index}.jpg")
    return Outcome.failed(job, FetchError(kind, "it failed", status))


def test_a_shard_is_sealed_once_all_its_rows_are_in(tmp_path):
    with Sink(tmp_path) as sink:
        sink.add(ok(0, 0))
        sink.end_shard(ShardEnd(0, 2))  # the count may come before the last row...
        assert sink.part_path(0).exists() and not sink.shard_path(0).exists()
        sink.add(ok(0, 1))
        assert sink.shard_path(0).exists() and not sink.part_path(0).exists()
        sink.add(ok(1, 0))
        sink.add(ok(1, 1))
        sink.end_shard(ShardEnd(1, 2))  # ...or after it
        assert sink.shard_path(1).exists() and sink.open_shards == []


def test_interleaved_shards_go_to_their_own_files_and_an_open_one_stays_a_part(tmp_path):
    with Sink(tmp_path) as sink:
        for index in range(3):
            sink.add(ok(0, index))
            sink.add(ok(1, index))
        sink.end_shard(ShardEnd(0, 3))
        assert sink.open_shards == [1]
    shard0 = [json.loads(line)["key"] for line in sink.shard_path(0).read_text().splitlines()]
    assert shard0 == ["000000-000000", "000000-000001", "000000-000002"]
    assert sink.part_path(1).read_text().count("\n") == 3


def test_rows_have_every_field_and_round_trip(tmp_path):
    outcome = failed(0, 0, "http_4xx", 404)
    assert list(outcome.to_row()) == FIELDS
    assert Outcome.from_row(outcome.to_row()) == outcome
    strange = Outcome(key="000000-000000", url="http://x/\udcff", status="ok")
    with Sink(tmp_path) as sink:
        sink.add(strange)
        sink.end_shard(ShardEnd(0, 1))
    assert [row["url"] for row in read_manifest(tmp_path)] == ["http://x/\udcff"]


def test_read_manifest_skips_a_half_written_line(tmp_path):
    (tmp_path / "manifest").mkdir()
    good = json.dumps(ok(0, 0).to_row())
    (tmp_path / "manifest" / "000000.jsonl.part").write_text(good + "\n" + good[:20])
    assert len(list(read_manifest(tmp_path))) == 1
    assert list(read_manifest(tmp_path, include_parts=False)) == []


def test_resume_skips_sealed_shards_and_keeps_only_final_rows_of_a_part(tmp_path):
    with Sink(tmp_path) as sink:
        for index in range(2):
            sink.add(ok(0, index))
        sink.end_shard(ShardEnd(0, 2))  # sealed
        sink.add(ok(1, 0))
        sink.add(failed(1, 1, "http_4xx", 404))  # final
        sink.add(failed(1, 2, "timeout"))  # transient: to redo
        sink.add(failed(1, 3, "http_4xx", 429))  # throttled: to redo
        sink.add(ok(1, 0))  # a duplicate must never survive
    part = sink.part_path(1)
    part.write_text(part.read_text() + '{"key": "000001-0000')  # a kill mid-line
    temp = tmp_path / "images" / "000001" / "0000" / ".x.jpg.123.tmp"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"half")

    resume = Resume(tmp_path)
    jobs = [Job(0, 0, "a"), Job(0, 1, "b"), ShardEnd(0, 2)]
    jobs += [Job(1, i, f"http://x/1/{i}.jpg") for i in range(5)] + [ShardEnd(1, 5)]
    pending = list(resume.pending(jobs))

    assert [j.key for j in pending if isinstance(j, Job)] == [
        "000001-000002", "000001-000003", "000001-000004"]  # fmt: skip
    assert pending[-1] == ShardEnd(1, 5) and resume.skipped == 4
    assert [json.loads(line)["key"] for line in part.read_text().splitlines()] == [
        "000001-000000", "000001-000001"]  # fmt: skip
    assert not temp.exists()
    with Sink(tmp_path) as sink:  # the rerun's rows join the kept ones and seal the shard
        for index in (2, 3, 4):
            sink.add(ok(1, index))
        sink.end_shard(ShardEnd(1, 5))
    assert sink.shard_path(1).exists()
    assert sorted(r["key"] for r in read_manifest(tmp_path) if r["key"].startswith("000001")) == [
        f"000001-00000{i}" for i in range(5)]  # fmt: skip


def test_write_atomic_makes_folders_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["file.bin"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    write_atomic(target, b"old")

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
