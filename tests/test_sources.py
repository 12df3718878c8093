"""URL sources: .txt and .csv parsing, folders, shards, stable keys, and streaming."""

from __future__ import annotations

import tracemalloc
from itertools import islice

import pytest

from pipeline.errors import SourceError
from pipeline.records import Job, ShardEnd
from pipeline.sources import find_sources, iter_jobs, read_urls


def test_txt_skips_blank_lines_and_comments_and_strips(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(
        b"# a comment\r\n  http://x/1.jpg  \r\n\r\n\thttp://x/2.jpg\n   # indented\nhttp://x/3.jpg"
    )
    assert list(read_urls(path)) == ["http://x/1.jpg", "http://x/2.jpg", "http://x/3.jpg"]


def test_csv_reads_the_url_column_wherever_it_is(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(
        'id,caption,url\n1,"a, b",http://x/1.jpg\n2,empty,\n3,"q ""x""", http://x/3.jpg \n'
    )
    assert list(read_urls(path)) == ["http://x/1.jpg", "http://x/3.jpg"]


def test_csv_column_can_be_configured(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("link,url\nhttp://x/link.jpg,http://x/other.jpg\n")
    assert list(read_urls(path, "link")) == ["http://x/link.jpg"]


def test_a_csv_without_the_column_fails_before_any_job(tmp_path):
    (tmp_path / "ok.txt").write_text("http://x/1.jpg\n")
    (tmp_path / "bad.csv").write_text("id,link\n1,http://x/1.jpg\n")
    with pytest.raises(SourceError, match=r"bad\.csv.*'url' column.*id, link"):
        find_sources([tmp_path])


def test_folders_are_searched_recursively_sorted_and_filtered(tmp_path):
    for name in ("b.txt", "a.csv", "sub/c.txt", "sub/deeper/d.csv", "notes.md", "img.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("url\n" if name.endswith(".csv") else "")
    found = find_sources([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.csv", "b.txt", "sub/c.txt", "sub/deeper/d.csv"]  # fmt: skip
    single = tmp_path / "notes.md"
    assert find_sources([single]) == [single]


def test_missing_and_empty_sources_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="nope: no such file or folder"):
        find_sources([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty: no \.txt or \.csv files"):
        find_sources([tmp_path / "empty"])


def test_shards_never_span_files_and_are_numbered_across_them(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"http://a/{i}\n" for i in range(7)))
    (tmp_path / "b.txt").write_text("http://b/0\nhttp://b/1\n")
    items = list(iter_jobs(find_sources([tmp_path]), shard_size=3))
    shape = [(i.shard, i.index) if isinstance(i, Job) else ("end", i.shard, i.count) for i in items]
    assert shape == [
        (0, 0), (0, 1), (0, 2), ("end", 0, 3),
        (1, 0), (1, 1), (1, 2), ("end", 1, 3),
        (2, 0), ("end", 2, 1),
        (3, 0), (3, 1), ("end", 3, 2),
    ]  # fmt: skip
    assert [i.url for i in items if isinstance(i, Job)][-2:] == ["http://b/0", "http://b/1"]
    again = list(iter_jobs(find_sources([tmp_path]), shard_size=3))
    assert [i.key for i in items if isinstance(i, Job)] == [
        i.key for i in again if isinstance(i, Job)
    ]


def test_a_stray_byte_is_a_url_not_a_crash(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"http://x/\xff.jpg\nhttp://x/ok.jpg\n")
    urls = list(read_urls(path))
    assert len(urls) == 2 and urls[1] == "http://x/ok.jpg"


def test_reading_streams_instead_of_loading_the_file(tmp_path):
    path = tmp_path / "big.txt"
    line = "http://example.invalid/images/some/long/path/to/an/image-{:09d}.jpg\n"
    with path.open("w") as f:
        f.writelines(line.format(i) for i in range(300_000))
    size = path.stat().st_size
    assert size > 20_000_000
    tracemalloc.start()
    try:
        items = iter_jobs([path], shard_size=10_000)
        consumed = sum(1 for _ in islice(items, 250_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert consumed == 250_000
    assert peak < size / 20, f"peak {peak} bytes for a {size} byte file: it is not streamed"


def test_output_paths_come_from_the_key_and_a_hash_never_the_url():
    evil = Job(3, 1234, "http://x/../../etc/passwd/evil.jpg")
    path = evil.output_path("jpg", 1000)
    assert path.startswith("images/000003/0001/001234-") and path.endswith(".jpg")
    assert "evil" not in path and ".." not in path and "passwd" not in path
    assert Job(0, 999, "u").output_path("jpg", 1000).split("/")[2] == "0000"
    assert Job(0, 1000, "u").output_path("jpg", 1000).split("/")[2] == "0001"
    assert Job(0, 5, "http://a").output_path("png", 10) == Job(0, 5, "http://a").output_path(
        "png", 10
    )
    assert Job(0, 5, "http://a").output_path("png", 10) != Job(0, 5, "http://b").output_path(
        "png", 10
    )
    assert isinstance(ShardEnd(0, 1), ShardEnd)
