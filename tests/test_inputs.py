"""Input files as the real command reads them (``python -m pipeline run``, loopback server):
compressed lists, an output folder inside the input, a last line still being written, stray
quotes, deep JSON, a damaged file among good ones; and the line streams of ``pipeline.inputs``."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zstandard

from pipeline.errors import UnreadableSource
from pipeline.inputs import Findings, open_lines, sniff
from pipeline.sink import read_manifest


@pytest.fixture(scope="module")
def images(image_dir: Path) -> list[str]:
    return sorted(p.name for p in image_dir.glob("*.jpg"))


SMALL = ("--download-workers", "2", "--transform-workers", "1")  # a few images: quicker to start


def run(folder: Path, *args: str) -> tuple[int, str, str]:
    """``pipeline run`` in ``folder``, quietly; its exit status, stdout and stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *args, "-q", *SMALL],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def rows(out: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """Rows by (source, line): each input line at most once."""
    found = list(read_manifest(out))
    keys = Counter((row["source"], row["line"]) for row in found)
    assert [key for key, n in keys.items() if n > 1] == [], "a line recorded twice"
    return {(row["source"], row["line"]): row for row in found}


def said(stdout: str) -> str:
    """A dry run's text with its wrapping undone (lines are fitted to the terminal)."""
    return " ".join(stdout.split())


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pipeline: error: ")]


def zst(text: str) -> bytes:
    return zstandard.ZstdCompressor().compress(text.encode())


# --- through the real command --------------------------------------------------------------------


def test_compressed_lists_are_read_and_an_appended_gzip_member_is_appended_lines(
    tmp_path, server, images
):
    """A .csv.gz with captions and a .txt.zst; the output folder inside the input folder is
    never read as input; a gzip member appended to the .gz is done by the rerun, nothing else."""
    folder = tmp_path / "in"
    folder.mkdir()
    csv_text = "url,caption\n" + "".join(f"{server.url(n)},cap {n}\n" for n in images[:4])
    (folder / "a.csv.gz").write_bytes(gzip.compress(csv_text.encode()))
    (folder / "b.txt.zst").write_bytes(zst("".join(f"{server.url(n)}\n" for n in images[4:7])))
    code, _, stderr = run(tmp_path, "in", "--out", "in/out")
    assert code == 0, stderr
    first = rows(folder / "out")
    assert {key for key in first} == {("a.csv.gz", n) for n in (2, 3, 4, 5)} | {
        ("b.txt.zst", n) for n in (1, 2, 3)
    }
    assert all(row["status"] == "ok" for row in first.values())
    assert first[("a.csv.gz", 2)]["columns"] == {"caption": f"cap {images[0]}"}

    more = "".join(f"{server.url(n)},more {n}\n" for n in images[7:9])
    with (folder / "a.csv.gz").open("ab") as f:  # cat more.gz >> a.csv.gz
        f.write(gzip.compress(more.encode()))
    code, stdout, stderr = run(tmp_path, "in", "--out", "in/out", "--dry-run")
    assert code == 0, stderr
    stdout = said(stdout)
    assert "a.csv.gz (csv, gzip): 6 lines" in stdout
    assert "b.txt.zst (txt, zstd): 3 lines" in stdout
    assert "2 in a.csv.gz from line 6" in stdout
    code, _, stderr = run(tmp_path, "in", "--out", "in/out")
    assert code == 0, stderr
    assert "in/out: skipped: an output folder of a run" in stderr  # said, once
    second = rows(folder / "out")
    assert len(second) == 9  # the manifest of the first run was not read as input
    assert {k: v for k, v in second.items() if k in first} == first  # old rows kept as they were
    assert second[("a.csv.gz", 7)]["status"] == "ok"


def test_the_output_folder_as_the_input_folder_is_never_read_again(tmp_path, server, images):
    """(An output folder inside the input folder: the test above.)"""
    (tmp_path / "urls.txt").write_text("".join(f"{server.url(n)}\n" for n in images[:5]))
    for _ in range(2):  # --out the input folder itself: its manifest, images, ... are not input
        code, _, stderr = run(tmp_path, ".", "--out", ".")
        assert code == 0, stderr
        assert sorted(rows(tmp_path)) == [("urls.txt", n) for n in range(1, 6)]


def test_a_last_line_without_its_line_break_waits_for_the_rerun(tmp_path, server, images):
    listing = tmp_path / "urls.txt"
    whole = "".join(f"{server.url(n)}\n" for n in images[:3])
    half = server.url(images[3])
    listing.write_text(whole + half[:-4])  # a writer is halfway through line 4
    code, stdout, stderr = run(tmp_path, "urls.txt", "--out", "out", "--dry-run")
    stdout = said(stdout)
    assert "urls.txt (txt): 3 lines" in stdout
    assert "line 4 has no line break yet" in stdout
    code, _, stderr = run(tmp_path, "urls.txt", "--out", "out")
    assert code == 0, stderr
    assert "line 4 has no line break yet" in stderr
    assert sorted(rows(tmp_path / "out")) == [("urls.txt", n) for n in (1, 2, 3)]
    listing.write_text(whole + half + "\n")  # the writer finished the line
    code, _, stderr = run(tmp_path, "urls.txt", "--out", "out")
    assert code == 0, stderr  # no "line 4 changed"
    done = rows(tmp_path / "out")
    assert sorted(done) == [("urls.txt", n) for n in (1, 2, 3, 4)]
    assert done[("urls.txt", 4)]["status"] == "ok"


def test_a_file_with_no_url_field_is_refused_and_does_not_block_the_others(
    tmp_path, server, images
):
    (tmp_path / "in").mkdir()
    other = tmp_path / "in" / "other.jsonl"
    other.write_text("".join(json.dumps({"image": server.url(n)}) + "\n" for n in images[:3]))
    code, stdout, stderr = run(tmp_path, "in/other.jsonl", "--out", "out")
    assert code == 2
    (line,) = errors(stderr)
    assert "other.jsonl" in line and "'url' field" in line and "input.url_column" in line
    assert not (tmp_path / "out" / "manifest").exists()  # no row of invalid_url, nothing

    (tmp_path / "in" / "good.txt").write_text(f"{server.url(images[0])}\n")
    code, stdout, _ = run(tmp_path, "in", "--out", "out", "--dry-run")
    stdout = said(stdout)
    assert "unreadable" in stdout and "other.jsonl: no line has a 'url' field" in stdout
    code, _, stderr = run(tmp_path, "in", "--out", "out")
    assert code == 2
    (line,) = errors(stderr)
    assert "other.jsonl" in line and "1 rows recorded" in line
    assert rows(tmp_path / "out")[("good.txt", 1)]["status"] == "ok"


def test_damaged_and_hostile_files_are_named_and_the_others_are_done(tmp_path, server, images):
    """A corrupt .gz, a parquet whose second row group is damaged, a 495-deep JSON line and a
    stray quote in a CSV: the good lines are done and recorded, the run ends with one line."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "in"
    folder.mkdir()
    urls = [server.url(n) for n in images[:8]]
    (folder / "good.txt").write_text(f"{urls[0]}\n")
    (folder / "broken.txt.gz").write_bytes(gzip.compress(b"x\n" * 1000)[:-40] + b"\0" * 40)
    deep = json.dumps({"url": urls[1], "x": "X"}).replace('"X"', "[" * 495 + "]" * 495) + "\n"
    (folder / "deep.jsonl").write_text(deep + json.dumps({"url": urls[2]}) + "\n")
    stray = "".join(f"{u},caption {i}\n" for i, u in enumerate(urls[4:7]))
    (folder / "stray.csv").write_text(f'url,caption\n{urls[7]},fine\n{urls[3]},"a stray\n{stray}')
    table = pa.table({"url": urls[:6], "n": list(range(6))})
    pq.write_table(table, folder / "table.parquet", row_group_size=3, compression="none")
    offset = pq.ParquetFile(folder / "table.parquet").metadata.row_group(1).column(0)
    data = bytearray((folder / "table.parquet").read_bytes())
    data[offset.data_page_offset : offset.data_page_offset + 8] = b"\xff" * 8
    (folder / "table.parquet").write_bytes(bytes(data))

    code, stdout, _ = run(tmp_path, "in", "--out", "out", "--dry-run")
    stdout = said(stdout)
    assert "stray.csv: a quote opened on line 3 runs to line 6" in stdout
    code, stdout, stderr = run(tmp_path, "in", "--out", "out")
    assert code == 2
    (line,) = errors(stderr)
    assert "broken.txt.gz" in line and "table.parquet: row group 2 (from line 4)" in line
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert f"{report['ok']} ok" in stdout  # the work done is reported before the line
    assert "a quote opened on line 3" in stderr  # the warning
    done = rows(tmp_path / "out")
    assert done[("good.txt", 1)]["status"] == "ok"
    assert done[("deep.jsonl", 1)]["error_kind"] == "invalid_url"
    assert "nested deeper than" in done[("deep.jsonl", 1)]["error"]
    assert done[("deep.jsonl", 2)]["status"] == "ok"
    assert done[("stray.csv", 2)]["status"] == "ok"
    assert done[("stray.csv", 3)]["error_kind"] == "invalid_url"
    assert "runs to line 6" in done[("stray.csv", 3)]["error"]
    assert [done[("table.parquet", n)]["status"] for n in (1, 2, 3)] == ["ok"] * 3
    assert ("table.parquet", 4) not in done


# --- the line streams and the checks, unit by unit -----------------------------------------------


def lines_of(path: Path, compression: str | None, findings: Findings | None = None) -> list[str]:
    with open_lines(path, compression, findings) as lines:
        return list(lines)


def test_gzip_members_and_zstd_frames_read_as_one_stream(tmp_path):
    gz, zs = tmp_path / "a.txt.gz", tmp_path / "a.txt.zst"
    gz.write_bytes(gzip.compress(b"one\r\ntwo\n") + gzip.compress(b"three\n"))
    zs.write_bytes(zst("one\n") + zst("two\nthree\n"))
    assert lines_of(gz, "gzip") == ["one\r\n", "two\n", "three\n"]
    assert lines_of(zs, "zstd") == ["one\n", "two\n", "three\n"]


def test_a_last_line_without_a_break_is_held_back_and_said_once(tmp_path):
    path = tmp_path / "a.txt.gz"
    path.write_bytes(gzip.compress(b"one\ntwo\nthr"))
    findings = Findings()
    for _ in range(2):  # a file read twice (checked, then run) says it once
        assert lines_of(path, "gzip", findings) == ["one\n", "two\n"]
    assert len(findings.warnings) == 1 and "line 3 has no line break yet" in findings.warnings[0]
    path.write_bytes(gzip.compress(b"one\n  "))  # blanks only: nothing worth saying
    assert lines_of(path, "gzip", findings) == ["one\n"] and len(findings.warnings) == 1


def test_a_corrupt_or_cut_stream_names_the_file_and_the_line_reached(tmp_path):
    whole = gzip.compress(b"".join(b"http://x/%d.jpg\n" % i for i in range(5000)))
    cut, bad = tmp_path / "cut.txt.gz", tmp_path / "bad.txt.zst"
    cut.write_bytes(whole[: len(whole) // 2])
    bad.write_bytes(zst("http://x/1.jpg\n" * 5000)[:-20] + b"\xff" * 20)
    with pytest.raises(UnreadableSource, match=r"cut\.txt\.gz: truncated after line \d+$"):
        lines_of(cut, "gzip")
    with pytest.raises(UnreadableSource, match=r"bad\.txt\.zst: unreadable \(.*\) after line"):
        lines_of(bad, "zstd")


@pytest.mark.parametrize(
    ("name", "data", "compression", "message"),
    [
        ("a.txt.gz", b"http://x/1.jpg\n", "gzip", "not a gzip file"),
        ("a.txt", gzip.compress(b"x\n", mtime=0), None, "gzip-compressed data under a plain name"),
        ("a.csv", b"PK\x03\x04zip", None, "zip-compressed data"),
    ],
)
def test_a_file_that_is_not_what_its_name_says_is_refused(
    tmp_path, name, data, compression, message
):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(UnreadableSource, match=message):
        sniff(path, compression)
    (tmp_path / "bzh.txt").write_bytes(b"BZhello.jpg\n")  # text that starts like bzip2
    sniff(tmp_path / "bzh.txt", None)
    (tmp_path / "empty.gz").write_bytes(b"")
    sniff(tmp_path / "empty.gz", "gzip")


def test_a_run_in_which_no_line_has_a_usable_url_exits_non_zero_naming_the_column(tmp_path):
    (tmp_path / "a.csv").write_text("url,caption\n,one\n  ,two\n")  # the column, but empty
    code, stdout, _ = run(tmp_path, "a.csv", "--out", "out", "--dry-run")
    assert code == 0 and "a.csv: none of its 2 records has a usable URL" in said(stdout)
    code, _, stderr = run(tmp_path, "a.csv", "--out", "out")
    assert code == 2
    (line,) = errors(stderr)
    assert "not one line of a.csv has a usable URL" in line and "input.url_column" in line
    assert {row["error_kind"] for row in rows(tmp_path / "out").values()} == {"invalid_url"}
