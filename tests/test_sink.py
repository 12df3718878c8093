"""The manifest: per-shard parts sealed when complete, seal files, the output folder's lock,
resume's filtering of a rerun's jobs, and atomic writes."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

import pipeline.sink
from pipeline.config import Config, InputConfig, OutputConfig
from pipeline.errors import FetchError, OutputError, PipelineError, SourceError
from pipeline.layout import output_file
from pipeline.records import Job, Outcome, ShardEnd, make_key
from pipeline.resume import Plan, Resume, plan_run
from pipeline.sink import (
    Sink,
    lock,
    part_path,
    read_manifest,
    read_rows,
    read_seal,
    seal_path,
    shard_path,
)
from pipeline.sources import iter_jobs

FIELDS = [
    "key", "shard", "source", "line", "url", "status", "error_kind", "error", "http_status",
    "bytes_in", "bytes_out", "width_in", "height_in", "width_out", "height_out", "path",
    "sha256", "original_sha256", "download_ms", "transform_ms", "cpu_ms", "duplicate_of", "columns",
]  # fmt: skip


def job(file: int, line: int, first: int = 1, columns: dict[str, object] | None = None) -> Job:
    """Line ``line`` of file ``file``, in the shard whose first line is ``first``."""
    url = f"http://x/{file}/{line}.jpg"
    return Job(file, line, url, make_key(file, first), source=f"f{file}.txt", columns=columns)


def ok(file: int, line: int, first: int = 1) -> Outcome:
    j = job(file, line, first)
    return Outcome.of(j, "ok", bytes_in=10, path=output_file(file, line, j.url, "jpg", 1000))


def failed(file: int, line: int, kind: str, status: int | None = None, first: int = 1) -> Outcome:
    return Outcome.failed(job(file, line, first), FetchError(kind, "it failed", status))


def end(file: int, count: int, first: int = 1) -> ShardEnd:
    return ShardEnd(make_key(file, first), count, file, first, first + count - 1, f"digest{file}")


def keys(path: os.PathLike[str]) -> list[str]:
    return [row["key"] for row in read_rows(path)]


# --- writing: how often, and a write that fails -----------------------------------------------


def test_rows_are_written_every_flush_rows_and_when_due(tmp_path):
    with Sink(tmp_path, OutputConfig(flush_rows=3, flush_seconds=0.5)) as sink:
        part = part_path(tmp_path / "manifest", make_key(0, 1))
        assert sink.flush_due() is None  # nothing waits
        sink.add(ok(0, 1))
        sink.add(ok(0, 2))
        assert part.read_bytes() == b""  # two rows wait in memory ...
        assert 0 < sink.flush_due() <= 0.5  # ... and are due within flush_seconds
        sink.add(ok(0, 3))
        assert keys(part) == [make_key(0, 1), make_key(0, 2), make_key(0, 3)]  # the third: all
        assert sink.flush_due() is None
        sink.add(ok(0, 4))
        sink.flush()  # what the coordinator does once flush_due() is 0
        assert len(keys(part)) == 4 and sink.written == 4


def test_a_failed_write_keeps_whole_rows_only_and_names_the_file(tmp_path, monkeypatch):
    capacity = {"bytes": 0}
    real = pipeline.sink.write_all

    def disk(fd: int, data: bytes) -> None:  # a disk that holds `capacity` bytes of this file
        room = capacity["bytes"] - os.fstat(fd).st_size
        if len(data) > room:
            os.write(fd, data[:room])  # what fits goes in, then ENOSPC, as the OS does
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(pipeline.sink, "write_all", disk)
    sink = Sink(tmp_path, OutputConfig(flush_rows=10))
    part = part_path(tmp_path / "manifest", make_key(0, 1))
    rows = [ok(0, line).encode() for line in range(1, 11)]
    capacity["bytes"] = sum(len(row.line.encode()) for row in rows[:3]) + 5  # 3 rows and a bit
    with pytest.raises(OutputError, match=rf"^{part}: No space left on device$"):
        for row in rows:
            sink.write(row)
    assert keys(part) == [make_key(0, line) for line in (1, 2, 3)]  # as many whole rows as fit
    assert part.read_bytes().endswith(b"\n")  # and no half of the fourth
    assert sink.written == 3
    sink.close()  # the failed rows are dropped, not retried: they are the rerun's
    assert len(keys(part)) == 3


# --- sealing -------------------------------------------------------------------------------------


def test_a_shard_is_sealed_once_all_its_rows_are_in(tmp_path):
    folder = tmp_path / "manifest"
    s0, s1 = make_key(0, 1), make_key(1, 1)
    with Sink(tmp_path) as sink:
        sink.add(ok(0, 1))
        sink.end_shard(end(0, 2))  # the count may come before the last row...
        assert part_path(folder, s0).exists() and not shard_path(folder, s0).exists()
        assert not seal_path(folder, s0).exists() and sink.open_shards == [s0]
        sink.add(ok(0, 2))
        assert shard_path(folder, s0).exists() and not part_path(folder, s0).exists()
        sink.add(ok(1, 1))
        sink.add(ok(1, 2))
        assert not shard_path(folder, s1).exists()  # all rows in, but not said to be all yet
        sink.end_shard(end(1, 2))  # ...or after it
        assert shard_path(folder, s1).exists() and sink.open_shards == [] and sink.sealed == 2
    assert keys(shard_path(folder, s0)) == [make_key(0, 1), make_key(0, 2)]
    for file, shard in ((0, s0), (1, s1)):
        seal = json.loads(seal_path(folder, shard).read_text())
        assert seal == dataclasses.asdict(end(file, 2))
        assert seal == {"shard": shard, "count": 2, "file": file, "first": 1, "last": 2,
                        "digest": f"digest{file}"}  # fmt: skip
        assert read_seal(seal_path(folder, shard)) == end(file, 2)
    assert sorted(p.name for p in folder.iterdir()) == [
        f"{s0}.jsonl", f"{s0}.seal.json", f"{s0}.stats.json",
        f"{s1}.jsonl", f"{s1}.seal.json", f"{s1}.stats.json"]  # fmt: skip


def test_a_sealed_shard_has_its_stats_counted_from_its_rows_resumed_ones_too(tmp_path):
    folder = tmp_path / "manifest"
    shard = make_key(0, 1)
    with Sink(tmp_path) as sink:  # a first run records two rows, then stops
        sink.add(ok(0, 1))
        sink.add(failed(0, 2, "http_4xx", 404))
    with Sink(tmp_path) as sink:  # the rerun adds the rest to the part, and seals it
        sink.add(failed(0, 3, "not_image"))
        sink.add(failed(0, 4, "http_4xx", 410))
        sink.add(Outcome.duplicate(dataclasses.replace(job(0, 5), duplicate_of=make_key(0, 1))))
        sink.end_shard(end(0, 5))
    stats = json.loads((folder / f"{shard}.stats.json").read_text())
    rows = list(read_rows(shard_path(folder, shard)))
    assert stats["status"] == {"duplicate": 1, "failed": 3, "ok": 1}
    assert stats["error_kinds"] == {"http_4xx": 2, "not_image": 1}
    assert stats["bytes_in"] == sum(row["bytes_in"] for row in rows) == 10
    assert (stats["shard"], stats["first_line"], stats["last_line"], stats["lines"]) == (
        shard, 1, 5, 5)  # fmt: skip
    assert stats["seconds"] >= 0 and stats["started"] <= stats["sealed"]


def test_a_missing_or_damaged_seal_reads_as_none(tmp_path):
    assert read_seal(tmp_path / "none.seal.json") is None
    for text in ('{"shard": "00000-000000001", "count"', '{"shard": "x", "bogus": 1}', "[1]"):
        (tmp_path / "bad.seal.json").write_text(text)
        assert read_seal(tmp_path / "bad.seal.json") is None


def test_interleaved_shards_go_to_their_own_files_and_an_open_one_stays_a_part(tmp_path):
    folder = tmp_path / "manifest"
    with Sink(tmp_path) as sink:
        for line in (1, 2, 3):
            sink.add(ok(0, line))
            sink.add(ok(1, line))
        sink.add(ok(1, 4, first=4))
        sink.end_shard(end(0, 3))
        assert sink.open_shards == [make_key(1, 1), make_key(1, 4)]
    assert keys(shard_path(folder, make_key(0, 1))) == [make_key(0, i) for i in (1, 2, 3)]
    assert keys(part_path(folder, make_key(1, 1))) == [make_key(1, i) for i in (1, 2, 3)]
    assert keys(part_path(folder, make_key(1, 4))) == [make_key(1, 4)]
    assert not shard_path(folder, make_key(1, 1)).exists()
    assert not seal_path(folder, make_key(1, 1)).exists()
    assert len(list(read_manifest(tmp_path))) == 7
    assert len(list(read_manifest(tmp_path, include_parts=False))) == 3


def test_rows_have_every_field_in_order_and_round_trip(tmp_path):
    outcome = failed(0, 1, "http_4xx", 404)
    assert list(outcome.to_row()) == FIELDS
    assert Outcome(**outcome.to_row()) == outcome
    assert (outcome.error_kind, outcome.http_status, outcome.status) == ("http_4xx", 404, "failed")
    strange = Outcome.of(Job(0, 1, "http://x/\udcff", make_key(0, 1)), "ok")
    columns = {"caption": "a \u00e9 \U0001f600", "n": 3, "score": 0.5, "tags": ["a"], "no": None}
    with_columns = Outcome.of(job(0, 2, columns=columns), "ok", width_out=10)
    with Sink(tmp_path) as sink:
        for row in (strange, with_columns, outcome):
            sink.add(row)
        sink.end_shard(end(0, 3))
    text = shard_path(tmp_path / "manifest", make_key(0, 1)).read_text(encoding="utf-8")
    assert [list(json.loads(line)) for line in text.splitlines()] == [FIELDS] * 3
    rows = list(read_manifest(tmp_path))
    assert rows[0]["url"] == "http://x/\udcff"
    assert rows[1]["columns"] == columns
    assert [Outcome(**row) for row in rows] == [strange, with_columns, outcome]


def test_read_manifest_skips_a_half_written_line(tmp_path):
    (tmp_path / "manifest").mkdir()
    good = json.dumps(ok(0, 1).to_row())
    (tmp_path / "manifest" / "00000-000000001.jsonl.part").write_text(good + "\n" + good[:20])
    assert list(read_manifest(tmp_path)) == [ok(0, 1).to_row()]
    assert list(read_manifest(tmp_path, include_parts=False)) == []


# --- the lock ------------------------------------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from pipeline.sink import lock
    with lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
""")


def test_a_second_run_is_refused_with_the_holders_pid_until_it_ends(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline() == "held\n"
        refused = rf"another pipeline run .*\(pid {holder.pid}, started "
        with pytest.raises(PipelineError, match=refused), lock(tmp_path):
            pytest.fail("the lock was taken twice")
        assert (tmp_path / ".lock").read_text().startswith(f"pid {holder.pid}, started ")
        holder.stdin.close()
        assert holder.wait(timeout=30) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with lock(tmp_path):  # released: free again
        assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()}, ")


def test_the_lock_is_refused_within_one_process_too_and_released_on_error(tmp_path):
    mine = rf"\(pid {os.getpid()}, started "
    with lock(tmp_path), pytest.raises(PipelineError, match=mine), lock(tmp_path):
        pytest.fail("the lock was taken twice")
    with pytest.raises(RuntimeError, match="boom"), lock(tmp_path):
        raise RuntimeError("boom")
    with lock(tmp_path):
        pass


# --- resume --------------------------------------------------------------------------------------


def test_resume_skips_sealed_shards_and_keeps_only_final_rows_of_a_part(tmp_path):
    folder = tmp_path / "manifest"
    sealed, partial = make_key(0, 1), make_key(1, 1)
    with Sink(tmp_path) as sink:
        for line in (1, 2):
            sink.add(ok(0, line))
        sink.end_shard(end(0, 2))
        sink.add(ok(1, 1))
        sink.add(failed(1, 2, "http_4xx", 404))  # final
        sink.add(failed(1, 3, "timeout"))  # transient: to redo
        sink.add(failed(1, 4, "http_4xx", 429))  # throttled: to redo
        sink.add(ok(1, 1))  # a duplicate must never survive
        sink.add(Outcome.duplicate(dataclasses.replace(job(1, 6), duplicate_of=make_key(1, 1))))
        sink.add(failed(1, 7, "timeout"))
        sink.add(failed(1, 7, "http_5xx", 503))
    part = part_path(folder, partial)
    part.write_text(part.read_text() + '{"key": "00001-0000')  # a kill mid-line
    temp = tmp_path / "images" / "00001" / "00000" / ".000000003-ab.jpg.123.tmp"
    temp.parent.mkdir(parents=True)
    temp.write_bytes(b"half")
    image = temp.with_name("000000001-cd.jpg")
    image.write_bytes(b"whole")

    resume = Resume(Plan(tmp_path, [], sealed=frozenset({sealed}), partial=frozenset({partial})))
    items = [job(0, 1), job(0, 2), end(0, 2)]
    items += [job(1, line) for line in range(1, 8)] + [end(1, 7)]
    pending = list(resume.pending(items))

    assert [j.key for j in pending if isinstance(j, Job)] == [
        make_key(1, 3), make_key(1, 4), make_key(1, 5), make_key(1, 7)]  # fmt: skip
    assert pending[-1] == end(1, 7) and resume.skipped == 5
    assert keys(part) == [make_key(1, 1), make_key(1, 2), make_key(1, 6)]
    assert part.read_text().endswith("\n")
    assert not temp.exists() and image.read_bytes() == b"whole"
    with Sink(tmp_path) as sink:  # the rerun's rows join the kept ones and seal the shard
        for line in (3, 4, 5):
            sink.add(ok(1, line))
        assert sink.open_shards == [partial]
        sink.add(failed(1, 7, "http_4xx", 404))
        sink.end_shard(end(1, 7))
        assert sink.open_shards == []
    assert shard_path(folder, partial).exists() and not part.exists()
    assert read_seal(seal_path(folder, partial)) == end(1, 7)
    assert sorted(keys(shard_path(folder, partial))) == [make_key(1, i) for i in range(1, 8)]


def test_a_part_with_every_row_final_is_sealed_by_its_shard_end_alone(tmp_path):
    shard = make_key(2, 1)
    with Sink(tmp_path) as sink:
        sink.add(ok(2, 1))
        sink.add(failed(2, 2, "not_image"))
    resume = Resume(Plan(tmp_path, [], partial=frozenset({shard})))
    pending = list(resume.pending([job(2, 1), job(2, 2), end(2, 2)]))
    assert pending == [end(2, 2)] and resume.skipped == 2
    with Sink(tmp_path) as sink:
        sink.end_shard(end(2, 2))
    assert keys(shard_path(tmp_path / "manifest", shard)) == [make_key(2, 1), make_key(2, 2)]


def test_resume_without_earlier_shards_passes_everything_through(tmp_path):
    items = [job(0, 1), job(0, 2), end(0, 2)]
    resume = Resume(Plan(tmp_path, []))
    assert list(resume.pending(iter(items))) == items and resume.skipped == 0
    assert not (tmp_path / "manifest").exists()


def test_a_line_removed_from_a_shard_left_open_is_refused(tmp_path):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    path = inputs / "a.txt"
    path.write_text("".join(f"http://x/{i}\n" for i in range(1, 6)))
    config = Config(input=InputConfig(shard_size=3))
    plan = plan_run([inputs], config, out, restart=False)
    with Sink(out) as sink:  # an interrupted run: shard 1 sealed, lines 4 and 5 done
        for item in iter_jobs(plan.sources, 3, "url", plan.known):
            if isinstance(item, Job):
                sink.add(Outcome.of(item, "ok"))
            elif item.first == 1:
                sink.end_shard(item)
    assert part_path(out / "manifest", make_key(0, 4)).exists()
    path.write_text("".join(f"http://x/{i}\n" for i in range(1, 5)))  # line 5 is gone
    with pytest.raises(SourceError, match="line 5 was removed"):
        plan_run([inputs], config, out, restart=False)
