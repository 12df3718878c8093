"""URL sources: .txt .csv .tsv .jsonl .parquet records, folders, shards and their digests, keys,
streaming, and output paths."""

from __future__ import annotations

import tracemalloc
from itertools import islice
from pathlib import Path

import pytest

from pipeline.errors import SourceError, UnreadableSource
from pipeline.inputs import Findings, find_files, input_root
from pipeline.records import Job, ShardEnd, make_key
from pipeline.sources import (
    Known,
    Record,
    Source,
    check_source,
    iter_jobs,
    read_records,
    shard_records,
)


def source(path: Path, id_: int = 0) -> Source:
    return Source(path, path.name, id_)


def records(path: Path, url_column: str = "url") -> list[Record]:
    return list(read_records(source(path), url_column))


def shape(items: list[Job | ShardEnd]) -> list[tuple[object, ...]]:
    """Jobs as (shard, line), ShardEnds as ("end", shard, count, first, last)."""
    return [
        (i.shard, i.line) if isinstance(i, Job) else ("end", i.shard, i.count, i.first, i.last)
        for i in items
    ]


def ends(items: list[Job | ShardEnd]) -> dict[str, ShardEnd]:
    return {i.shard: i for i in items if isinstance(i, ShardEnd)}


def write_lines(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(f"{url}\n" for url in urls))
    return path


# --- .txt ----------------------------------------------------------------------------------------


def test_txt_skips_blank_lines_and_comments_strips_and_numbers_physical_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(
        b"# a comment\r\n  http://x/1.jpg  \r\n\r\n\thttp://x/2.jpg\n   # indented\nhttp://x/3.jpg\r"
    )
    assert records(path) == [
        Record(2, "http://x/1.jpg"),
        Record(4, "http://x/2.jpg"),
        Record(6, "http://x/3.jpg"),
    ]


def test_a_stray_byte_is_a_url_not_a_crash(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"http://x/\xff.jpg\nhttp://x/ok.jpg\n")
    assert records(path) == [Record(1, "http://x/\udcff.jpg"), Record(2, "http://x/ok.jpg")]
    assert Record(1, "http://x/\udcff.jpg").canonical()  # a fingerprint can be taken of it


def test_an_unreadable_file_names_its_path(tmp_path):
    with pytest.raises(SourceError, match=r"gone\.txt: cannot read"):
        records(tmp_path / "gone.txt")


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [("a.csv", "url,id\nhttp://x/1.jpg,1\n", 2),
     ("a.txt", "http://x/1.jpg\n", 1),
     ("a.jsonl", '{"url": "http://x/1.jpg", "id": "1"}\n', 1)],
)  # fmt: skip
def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, name, text, line):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    check_source(source(path), "url")
    [record] = records(path)
    assert (record.line, record.url, record.problem) == (line, "http://x/1.jpg", None)


# --- .csv and .tsv -------------------------------------------------------------------------------


def test_csv_reads_the_url_column_wherever_it_is_and_keeps_the_others(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(
        'id,caption,url\n1,"a, b",http://x/1.jpg\n\n3,"q ""x"""," http://x/3.jpg "\n'
        "4, spaced ,http://x/4.jpg\n"
    )
    assert records(path) == [
        Record(2, "http://x/1.jpg", {"id": "1", "caption": "a, b"}),
        Record(4, "http://x/3.jpg", {"id": "3", "caption": 'q "x"'}),
        Record(5, "http://x/4.jpg", {"id": "4", "caption": " spaced "}),  # cells as they are
    ]


def test_a_csv_record_is_numbered_by_the_line_it_starts_on(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(
        b'url,caption\r\nhttp://x/1.jpg,"two\r\nlines"\r\nhttp://x/2.jpg,one\r\n'
        b'http://x/3.jpg,"three\nmore\nlines"\nhttp://x/4.jpg,last\n'
    )
    assert [(r.line, r.url) for r in records(path)] == [
        (2, "http://x/1.jpg"), (4, "http://x/2.jpg"),
        (5, "http://x/3.jpg"), (8, "http://x/4.jpg")]  # fmt: skip
    assert records(path)[0].columns == {"caption": "two\r\nlines"}


def test_an_empty_url_cell_is_a_record_with_a_problem_not_skipped(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("id,url\n1,http://x/1.jpg\n2,\n3,  \n4\n5,http://x/5.jpg\n")
    got = records(path)
    assert [(r.line, r.url, r.columns) for r in got] == [
        (2, "http://x/1.jpg", {"id": "1"}), (3, "", {"id": "2"}), (4, "", {"id": "3"}),
        (5, "", {"id": "4"}), (6, "http://x/5.jpg", {"id": "5"})]  # fmt: skip
    assert [r.problem for r in got] == [None, *["empty 'url' cell"] * 3, None]


def test_csv_column_can_be_configured(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("link,url\nhttp://x/link.jpg,http://x/other.jpg\n")
    assert records(path, "link") == [Record(2, "http://x/link.jpg", {"url": "http://x/other.jpg"})]
    check_source(source(path), "link")


def test_a_csv_without_the_column_fails_naming_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("id,link\n1,http://x/1.jpg\n")
    with pytest.raises(SourceError, match=r"bad\.csv: .*no 'url' column \(found: id, link\)"):
        check_source(source(path), "url")
    with pytest.raises(SourceError, match=r"bad\.csv"):
        records(path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(SourceError, match=r"empty\.csv: .*found: nothing"):
        check_source(source(empty), "url")
    check_source(source(path), "link")  # the column that is there


def test_a_stray_quote_is_a_failed_record_naming_its_span_and_a_warning(tmp_path):
    path = tmp_path / "a.csv"
    body = "".join(f"http://x/{i}.jpg,cap {i}\n" for i in range(3, 8))
    path.write_text(f'url,caption\nhttp://x/1.jpg,"a\nb"\nhttp://x/2.jpg,"stray\n{body}')
    findings = Findings()
    found = list(read_records(source(path), "url", findings))
    assert [(r.line, r.problem is None) for r in found] == [(2, True), (4, False)]
    assert found[0].columns == {"caption": "a\nb"}  # a quoted caption over lines: fine
    assert "a quote opened on line 4 runs to line 9" in (found[1].problem or "")
    assert found[1].columns is None and found[1].url == "http://x/2.jpg"
    (warning,) = findings.warnings
    assert "a.csv: a quote opened on line 4 runs to line 9" in warning


def test_a_jsonl_without_the_url_field_in_its_first_lines_is_refused_naming_the_fields(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('\n[1]\n{"image": "http://x/1.jpg", "caption": "c"}\n')
    with pytest.raises(UnreadableSource, match=r"a.jsonl: no line has a 'url' field \(found: "
                       r"caption, image\); input.url_column"):  # fmt: skip
        check_source(source(path), "url")
    check_source(source(path), "image")
    path.write_text('{"image": "x"}\n{"url": ""}\n')  # the field is there, if empty
    check_source(source(path), "url")


def test_json_nested_too_deep_is_a_record_with_a_problem_not_a_crash(tmp_path):
    path = tmp_path / "a.jsonl"
    deep = "[" * 150 + "]" * 150
    deeper = "[" * 100_000 + "]" * 100_000  # past json's own recursion limit
    path.write_text(f'{{"url": "http://x/1.jpg", "x": {deep}}}\n{{"x": {deeper}}}\n'
                    '{"url": "http://x/3.jpg", "x": [[1]]}\n')  # fmt: skip
    found = records(path)
    assert [(r.url, r.columns) for r in found] == [
        ("http://x/1.jpg", None), ("", None), ("http://x/3.jpg", {"x": [[1]]})]  # fmt: skip
    assert [r.problem for r in found][:2] == ["JSON nested deeper than 100 levels"] * 2


def test_tsv_is_a_record_a_line_with_quotes_kept_as_text(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text(
        "caption\turl\tn\na, b\thttp://x/1.jpg\t1\n\n\t\t\n"
        'x\t\t3\n"an open quote\thttp://x/2.jpg\t4\n"quoted"\thttp://x/3.jpg\t5\n'
    )
    got = records(path)
    assert [(r.line, r.url, r.columns, r.problem) for r in got] == [
        (2, "http://x/1.jpg", {"caption": "a, b", "n": "1"}, None),
        (5, "", {"caption": "x", "n": "3"}, "empty 'url' cell"),
        (6, "http://x/2.jpg", {"caption": '"an open quote', "n": "4"}, None),  # swallows nothing
        (7, "http://x/3.jpg", {"caption": '"quoted"', "n": "5"}, None),
    ]
    bad = tmp_path / "bad.tsv"
    bad.write_text("url,id\nhttp://x/1.jpg,1\n")  # commas: one column named "url,id"
    with pytest.raises(SourceError, match=r"bad\.tsv: .*found: url,id"):
        check_source(source(bad), "url")


# --- .jsonl --------------------------------------------------------------------------------------


def test_jsonl_reads_the_url_field_and_keeps_the_others_with_their_types(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        '{"id": 1, "url": " http://x/1.jpg ", "score": 0.5, "tags": ["a", "b"]}\n'
        "\n"
        '{"url": "http://x/2.jpg", "meta": {"w": 3, "ok": true, "no": null}}\r\n'
        '{"link": "http://x/3.jpg", "url": "ignored"}\n'
    )
    assert records(path) == [
        Record(1, "http://x/1.jpg", {"id": 1, "score": 0.5, "tags": ["a", "b"]}),
        Record(3, "http://x/2.jpg", {"meta": {"w": 3, "ok": True, "no": None}}),
        Record(4, "ignored", {"link": "http://x/3.jpg"}),
    ]
    assert [r.url for r in records(path, "link")] == ["", "", "http://x/3.jpg"]


def test_a_jsonl_line_with_no_usable_url_is_a_record_with_a_problem(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        "not json\n"
        '["http://x/list.jpg"]\n'
        '"http://x/string.jpg"\n'
        '{"id": 4, "tags": [1]}\n'
        '{"url": 5}\n'
        '{"url": ""}\n'
        '{"url": "http://x/ok.jpg"}\n'
    )
    got = records(path)
    assert [(r.line, r.problem is not None) for r in got] == [
        (1, True), (2, True), (3, True), (4, True), (5, True), (6, True), (7, False)]  # fmt: skip
    assert [r.problem for r in got[:3]] == ["not a JSON object"] * 3
    assert got[0].url == "not json"
    assert got[3] == Record(4, "", {"id": 4, "tags": [1]}, "no 'url' field")  # the rest is kept
    assert got[4].problem == "no URL in 'url'" and got[4].columns == {}


# --- .parquet ------------------------------------------------------------------------------------


def test_parquet_rows_are_numbered_from_one_across_row_groups(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "id": [10, 11, 12, 13, 14],
        "url": ["http://x/0.jpg", " http://x/1.jpg ", None, "", "http://x/4.jpg"],
        "tags": [["a"], [], ["b", "c"], None, ["d"]],
    })  # fmt: skip
    path = tmp_path / "a.parquet"
    pq.write_table(table, path, row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    check_source(source(path), "url")
    got = records(path)
    assert [(r.line, r.url, r.columns) for r in got] == [
        (1, "http://x/0.jpg", {"id": 10, "tags": ["a"]}),
        (2, "http://x/1.jpg", {"id": 11, "tags": []}),
        (3, "", {"id": 12, "tags": ["b", "c"]}),
        (4, "", {"id": 13, "tags": None}),
        (5, "http://x/4.jpg", {"id": 14, "tags": ["d"]}),
    ]
    assert [r.problem is None for r in got] == [True, True, False, False, True]


def test_a_parquet_file_without_the_column_or_not_parquet_fails_naming_it(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [1], "link": ["http://x/1.jpg"]}), path)
    with pytest.raises(SourceError, match=r"bad\.parquet: .*no 'url' column \(found: id, link\)"):
        check_source(source(path), "url")
    check_source(source(path), "link")
    fake = tmp_path / "fake.parquet"
    fake.write_text("http://x/1.jpg\n")
    with pytest.raises(SourceError, match=r"fake\.parquet: not a readable parquet file"):
        check_source(source(fake), "url")


# --- finding files -------------------------------------------------------------------------------


def test_folders_are_searched_recursively_sorted_and_filtered(tmp_path):
    names = ("b.txt", "a.csv", "sub/c.TSV", "sub/deeper/d.jsonl", "e.parquet",
             "notes.md", "img.jpg", "sub/x.json", "dir.txt/inner.txt")  # fmt: skip
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    found = find_files([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a.csv", "b.txt", "dir.txt/inner.txt", "e.parquet",
        "sub/c.TSV", "sub/deeper/d.jsonl"]  # fmt: skip
    assert [source(p).format for p in found] == ["csv", "txt", "txt", "parquet", "tsv", "jsonl"]


def test_a_file_given_by_name_is_taken_whatever_its_suffix(tmp_path):
    single = tmp_path / "notes.md"
    single.write_text("http://x/1.jpg\n")
    other = tmp_path / "z.csv"
    other.write_text("url\n")
    assert find_files([other, single]) == [other, single]  # in the order given
    assert source(single).format == "txt"
    assert records(single) == [Record(1, "http://x/1.jpg")]


def test_missing_and_empty_sources_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="nope: no such file or folder"):
        find_files([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("")
    with pytest.raises(SourceError, match=r"empty: no \.txt, \.csv, \.tsv, \.jsonl, \.parquet"):
        find_files([tmp_path / "empty"])


def test_compressed_names_are_inputs_and_unread_compressions_are_skipped_saying_so(tmp_path):
    names = ("a.txt.gz", "b.CSV.zst", "c.jsonl.gz", "d.tsv.gz", "e.txt.bz2", "f.parquet.gz",
             "g.gz", "h.csv.xz")  # fmt: skip
    for name in names:
        (tmp_path / name).write_text("")
    findings = Findings()
    found = find_files([tmp_path], findings=findings)
    assert [p.name for p in found] == ["a.txt.gz", "b.CSV.zst", "c.jsonl.gz", "d.tsv.gz"]
    assert [(source(p).format, source(p).compression) for p in found] == [
        ("txt", "gzip"), ("csv", "zstd"), ("jsonl", "gzip"), ("tsv", "gzip")]  # fmt: skip
    (warning,) = findings.warnings
    assert "skipped 3 files" in warning and "e.txt.bz2" in warning and "f.parquet.gz" in warning
    for name in ("e.txt.bz2", "f.parquet.gz"):  # named on their own: refused, naming them
        with pytest.raises(UnreadableSource, match=rf"{name}: cannot read a \."):
            check_source(source(tmp_path / name), "url")


def test_output_folders_inside_an_input_folder_are_never_input(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "a.txt").write_text("")
    for out in ("out", "old"):  # --out, and an older run's output folder
        (tmp_path / out / "manifest").mkdir(parents=True)
        (tmp_path / out / "manifest" / "00000-000000001.jsonl").write_text("")
        (tmp_path / out / "run.json").write_text("{}")
    findings = Findings()
    found = find_files([tmp_path], tmp_path / "out", findings)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["lists/a.txt"]
    assert len(findings.warnings) == 2
    (tmp_path / "urls.txt").write_text("")  # --out the input folder itself: its own parts go
    for part in ("manifest/00000-000000001.jsonl", "images/00000/000000001.txt"):
        (tmp_path / part).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / part).write_text("")
    found = find_files([tmp_path / "lists", tmp_path], tmp_path, Findings())
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "lists/a.txt", "lists/a.txt", "urls.txt"]  # fmt: skip


def test_input_root_is_the_common_folder_of_the_inputs(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "c").mkdir()
    file = tmp_path / "a" / "b" / "x.txt"
    file.write_text("")
    root = tmp_path.resolve()
    assert input_root([file]) == str(root / "a" / "b")  # a str: a path, or a URL (a store's)
    assert input_root([tmp_path / "a"]) == str(root / "a")
    assert input_root([file, tmp_path / "a"]) == str(root / "a")
    assert input_root([file, tmp_path / "c"]) == str(root)


# --- shards --------------------------------------------------------------------------------------


def test_shards_never_span_files_and_are_named_by_their_first_key(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("http://a/1\n# comment\n" + "".join(f"http://a/{i}\n" for i in range(3, 9)))
    b = write_lines(tmp_path / "b.txt", ["http://b/1", "http://b/2"])
    items = list(iter_jobs([Source(a, "a.txt", 0), Source(b, "b.txt", 1)], shard_size=3))
    a1, a5, a8, b1 = (make_key(0, 1), make_key(0, 5), make_key(0, 8), make_key(1, 1))
    assert a1 == "00000-000000001"
    assert shape(items) == [
        (a1, 1), (a1, 3), (a1, 4), ("end", a1, 3, 1, 4),  # records are counted, not lines
        (a5, 5), (a5, 6), (a5, 7), ("end", a5, 3, 5, 7),
        (a8, 8), ("end", a8, 1, 8, 8),
        (b1, 1), (b1, 2), ("end", b1, 2, 1, 2),
    ]  # fmt: skip
    jobs = [i for i in items if isinstance(i, Job)]
    assert all(j.key == make_key(j.file, j.line) for j in jobs)
    assert [(j.file, j.source, j.url) for j in jobs[-2:]] == [
        (1, "b.txt", "http://b/1"), (1, "b.txt", "http://b/2")]  # fmt: skip
    assert {e.file for e in ends(items).values()} == {0, 1}
    again = list(iter_jobs([Source(a, "a.txt", 0), Source(b, "b.txt", 1)], shard_size=3))
    assert again == items


def test_jobs_carry_the_columns_and_the_problem_of_their_record(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("url,id\nhttp://x/1.jpg,1\n,2\n")
    items = list(iter_jobs([Source(path, "in/a.csv", 7)], shard_size=10))
    assert items[:2] == [
        Job(7, 2, "http://x/1.jpg", "00007-000000002", "in/a.csv", {"id": "1"}),
        Job(7, 3, "", "00007-000000002", "in/a.csv", {"id": "2"}, "empty 'url' cell"),
    ]
    assert items[1].key == "00007-000000003"
    assert shape(items[2:]) == [("end", "00007-000000002", 2, 2, 3)]


def test_a_shard_digest_is_equal_for_equal_input_and_changes_with_any_line(tmp_path):
    path = tmp_path / "a.csv"

    def digests(rows: list[str]) -> list[str]:
        path.write_text("url,caption\n" + "".join(f"{row}\n" for row in rows))
        return [e.digest for e in ends(list(iter_jobs([source(path)], shard_size=2))).values()]

    rows = ["http://x/1,a", "http://x/2,b", "http://x/3,c", "http://x/4,d"]
    first = digests(rows)
    assert len(first) == 2 and first[0] != first[1] and all(len(d) == 32 for d in first)
    assert digests(rows) == first
    changed_url = digests(["http://x/1,a", "http://x/9,b", *rows[2:]])
    changed_column = digests(["http://x/1,a", "http://x/2,B", *rows[2:]])
    assert changed_url[0] != first[0] and changed_url[1] == first[1]
    assert changed_column[0] != first[0] and changed_column[1] == first[1]
    assert changed_url[0] != changed_column[0]
    path.write_text("url,caption\n\n" + "".join(f"{row}\n" for row in rows))
    moved = [e for e in iter_jobs([source(path)], 2) if isinstance(e, ShardEnd)]
    assert moved[0].digest != first[0]  # the same URLs one line further down


def test_a_known_sealed_shard_keeps_its_lines_and_appended_lines_start_a_new_one(tmp_path):
    path = write_lines(tmp_path / "a.txt", [f"http://x/{i}" for i in (1, 2, 3)])
    [before] = ends(list(iter_jobs([source(path)], shard_size=10))).values()
    assert (before.count, before.first, before.last) == (3, 1, 3)
    write_lines(path, [f"http://x/{i}" for i in (1, 2, 3, 4, 5)])
    known = {0: [Known(before.first, before.last, before.count, before.digest)]}
    items = list(iter_jobs([source(path)], shard_size=10, known=known))
    s1, s4 = make_key(0, 1), make_key(0, 4)
    assert shape(items) == [
        (s1, 1), (s1, 2), (s1, 3), ("end", s1, 3, 1, 3),
        (s4, 4), (s4, 5), ("end", s4, 2, 4, 5),
    ]  # fmt: skip
    assert ends(items)[s1] == before  # unchanged lines: the same fingerprint
    without = list(iter_jobs([source(path)], shard_size=10))
    assert shape(without)[-1] == ("end", s1, 5, 1, 5)  # what shard_size alone would do
    other_file = list(iter_jobs([source(path, 1)], shard_size=10, known=known))
    assert shape(other_file)[-1] == ("end", make_key(1, 1), 5, 1, 5)  # known is per file id


def test_known_shards_are_cut_again_at_the_same_lines(tmp_path):
    path = write_lines(tmp_path / "a.txt", [f"http://x/{i}" for i in range(1, 8)])
    known = [Known(1, 2, 2, "d"), Known(3)]  # a sealed shard of 2 lines, then an open one
    items = list(shard_records(source(path), 3, "url", known))
    cut = [(i.shard, i.first, i.last) for i in items if isinstance(i, ShardEnd)]
    assert cut == [(make_key(0, 1), 1, 2), (make_key(0, 3), 3, 5), (make_key(0, 6), 6, 7)]
    plain = [i for i in shard_records(source(path), 3, "url") if isinstance(i, ShardEnd)]
    assert [(e.first, e.last) for e in plain] == [(1, 3), (4, 6), (7, 7)]
    records_and_names = [i for i in items if not isinstance(i, ShardEnd)]
    assert records_and_names[2] == (Record(3, "http://x/3"), make_key(0, 3))
    # an open shard ends before the next known one starts, however much room shard_size leaves
    known = [Known(1), Known(3, 4, 2, "d")]
    items = list(shard_records(source(path), 10, "url", known))
    cut = [(i.shard, i.count, i.first, i.last) for i in items if isinstance(i, ShardEnd)]
    assert cut == [(make_key(0, 1), 2, 1, 2), (make_key(0, 3), 2, 3, 4), (make_key(0, 5), 3, 5, 7)]


def test_reading_streams_instead_of_loading_the_file(tmp_path):
    path = tmp_path / "big.txt"
    line = "http://example.invalid/images/some/long/path/to/an/image-{:09d}.jpg\n"
    with path.open("w") as f:
        f.writelines(line.format(i) for i in range(120_000))
    size = path.stat().st_size
    assert size > 8_000_000
    tracemalloc.start()
    try:
        items = iter_jobs([source(path)], shard_size=10_000)
        consumed = sum(1 for _ in islice(items, 100_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert consumed == 100_000
    assert peak < size / 20, f"peak {peak} bytes for a {size} byte file: it is not streamed"
