"""Resume you can trust: a rerun does exactly the work still missing, whatever the input became.

Every case runs the whole pipeline against a loopback server, and ``assert_rows_match_input``
checks, to the line, that the manifest holds one row per input line and nothing else.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import gated_handler
from test_cli import ROOT, assert_one_line_error

from pipeline.bench.server import StaticServer
from pipeline.config import (
    Config,
    DownloadConfig,
    InputConfig,
    OutputConfig,
    Thumbnail,
    TransformConfig,
)
from pipeline.records import make_key
from pipeline.resume import forget
from pipeline.runner import run
from pipeline.sink import read_manifest


def make_config(out: Path, shard_size: int = 3, **inputs: Any) -> Config:
    return Config(
        input=InputConfig(shard_size=shard_size, **inputs),
        output=OutputConfig(dir=str(out), folder_size=10),
        download=DownloadConfig(workers=3),
        transform=TransformConfig(workers=1, ops=(Thumbnail(32, 32),)),
    )


def input_lines(root: Path, url_column: str = "url") -> dict[tuple[str, int], str]:
    """Every line of every input file under ``root`` that should get a row, with its URL.

    Parsed here on its own, not with the pipeline's reader, so that the two can disagree.
    """
    lines: dict[tuple[str, int], str] = {}
    for path in sorted(root.rglob("*")):
        name = path.relative_to(root).as_posix()
        text = path.read_text() if path.is_file() else ""
        if path.suffix == ".txt":
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip() and not line.strip().startswith("#"):
                    lines[name, number] = line.strip()
        elif path.suffix in (".csv", ".tsv"):
            rows = list(
                csv.reader(text.splitlines(), delimiter="," if path.suffix == ".csv" else "\t")
            )
            at = rows[0].index(url_column)
            for number, row in enumerate(rows[1:], 2):  # no cell spans lines in these tests
                if any(row):
                    lines[name, number] = row[at].strip()
        elif path.suffix == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        value = json.loads(line)
                    except ValueError:
                        value = None
                    url = value.get(url_column, "") if isinstance(value, dict) else line.strip()
                    lines[name, number] = url
    return lines


def assert_rows_match_input(out: Path, root: Path, url_column: str = "url") -> list[dict[str, Any]]:
    """One sealed row per input line, to the line, with its URL: no line missing, none twice."""
    rows = list(read_manifest(out))
    assert not list((out / "manifest").glob("*.part")), "every shard should be sealed"
    seen = Counter((row["source"], row["line"]) for row in rows)
    twice = [where for where, n in seen.items() if n > 1]
    assert not twice, f"lines with more than one row: {twice}"
    expected = input_lines(root, url_column)
    assert {
        where: row["url"] for row in rows for where in [(row["source"], row["line"])]
    } == expected
    return rows


@pytest.fixture
def served(server: StaticServer, image_dir: Path) -> list[str]:
    """The URLs of the test images."""
    return [server.url(p.name) for p in sorted(image_dir.iterdir())]


def lines_of(urls: list[str]) -> str:
    return "".join(f"{url}\n" for url in urls)


def test_lines_appended_after_a_run_are_all_that_a_rerun_does(tmp_path, served):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    listing = root / "list.txt"
    listing.write_text(lines_of(served[:5]))  # shards at lines 1-3 and 4-5 (shard_size 3)
    first = run([root], make_config(out))
    assert (first.urls, first.ok, first.resume) == (5, 5, None)

    with listing.open("a") as f:
        f.write(lines_of(served[5:7]))
    again = run([root], make_config(out))

    assert again.urls == 2 and again.ok == 2 and again.skipped == 5
    assert (
        again.resume
        == "5 URLs done by earlier runs (2 shards sealed); to do: 2 in list.txt from line 6"
    )
    rows = assert_rows_match_input(out, root)
    # the sealed shard 4-5 stays as it was; the appended lines make a shard of their own
    assert sorted(p.name for p in (out / "manifest").glob("*.jsonl")) == [
        "00000-000000001.jsonl", "00000-000000004.jsonl", "00000-000000006.jsonl"]  # fmt: skip
    assert {row["key"] for row in rows} == {make_key(0, line) for line in range(1, 8)}

    nothing = run([root], make_config(out))
    assert nothing.urls == 0 and nothing.skipped == 7
    assert nothing.resume is not None and nothing.resume.endswith("nothing left to do")


def test_a_new_file_that_sorts_first_moves_no_other_file(tmp_path, served):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    (root / "b.txt").write_text(lines_of(served[:4]))
    (root / "c.csv").write_text(
        "url,caption\n" + "".join(f"{u},pic {i}\n" for i, u in enumerate(served[4:7]))
    )
    run([root], make_config(out))
    before = {row["key"]: row for row in read_manifest(out)}

    (root / "a.txt").write_text(lines_of(served[7:10]))
    again = run([root], make_config(out))

    assert again.urls == 3 and again.skipped == 7
    assert again.resume is not None and "a.txt (new)" in again.resume
    rows = assert_rows_match_input(out, root)
    after = {row["key"]: row for row in rows}
    assert all(after[key] == row for key, row in before.items())  # not one earlier row redone
    files = json.loads((out / "run.json").read_text())["files"]
    assert [(f["id"], f["path"]) for f in files] == [(0, "b.txt"), (1, "c.csv"), (2, "a.txt")]
    assert {row["key"][:5] for row in rows if row["source"] == "a.txt"} == {"00002"}
    assert set(again.sources) == {"a.txt", "b.txt", "c.csv"}


def pipeline_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def write_config(path: Path, shard_size: int = 3, extra: str = "") -> Path:
    path.write_text(
        f"[input]\nshard_size = {shard_size}\n{extra}\n[output]\nfolder_size = 10\n"
        "[download]\nworkers = 3\n"
        '[transform]\nworkers = 1\n[[transform.ops]]\nop = "thumbnail"\nwidth = 32\nheight = 32\n'
    )
    return path


def test_a_changed_line_is_refused_by_name_and_redone_under_restart(tmp_path, served):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    listing = root / "list.txt"
    listing.write_text("# photos\n" + lines_of(served[:5]))
    config = write_config(tmp_path / "config.toml")
    args = ["run", str(root), "--out", str(out), "--config", str(config), "-q"]
    assert pipeline_cli(*args, cwd=tmp_path).returncode == 0
    manifest = {p.name: p.read_bytes() for p in (out / "manifest").iterdir()}

    lines = listing.read_text().splitlines()
    lines[4] = served[9]  # line 5: another URL
    listing.write_text("\n".join(lines) + "\n")
    refused = pipeline_cli(*args, cwd=tmp_path)
    assert_one_line_error(refused, "list.txt: line 5 changed", "--restart")
    assert {p.name: p.read_bytes() for p in (out / "manifest").iterdir()} == manifest

    listing.write_text("\n".join(lines[:3]) + "\n")  # cut short: lines 4 to 6 are gone
    cut = pipeline_cli(*args, cwd=tmp_path)
    assert_one_line_error(cut, "list.txt: line 4 was removed")

    listing.write_text("\n".join(lines) + "\n")
    redone = pipeline_cli(*args, "--restart", cwd=tmp_path)
    assert redone.returncode == 0, redone.stderr
    rows = assert_rows_match_input(out, root)
    assert {row["url"] for row in rows if row["line"] == 5} == {served[9]}


def test_lines_without_a_usable_url_get_a_failed_row(tmp_path, served):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    (root / "a.csv").write_text(f"id,url\n1,{served[0]}\n2,\n3, \n4,{served[1]}\n")
    (root / "b.jsonl").write_text(
        json.dumps({"url": served[2]}) + "\n" + '{"caption": "no url"}\n' + "not json at all\n"
        + "[1, 2]\n" + json.dumps({"url": ""}) + "\n"
    )  # fmt: skip
    report = run([root], make_config(out))
    rows = assert_rows_match_input(out, root)
    bad = {(r["source"], r["line"]): r for r in rows if r["status"] == "failed"}
    assert sorted(bad) == [("a.csv", 3), ("a.csv", 4), ("b.jsonl", 2), ("b.jsonl", 3),
                           ("b.jsonl", 4), ("b.jsonl", 5)]  # fmt: skip
    assert {r["error_kind"] for r in bad.values()} == {"invalid_url"}
    assert "empty 'url' cell" in bad["a.csv", 3]["error"]
    assert "no 'url' field" in bad["b.jsonl", 2]["error"]
    assert bad["b.jsonl", 2]["columns"] == {"caption": "no url"}
    assert "not a JSON object" in bad["b.jsonl", 3]["error"]
    assert report.ok == 3 and report.failed == {"invalid_url": 6}


def test_every_format_carries_its_other_columns_into_the_rows(tmp_path, served):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    (root / "a.csv").write_text(
        "id,url,caption,licence\n" + f'7,{served[0]},"a cat, sitting",cc-by\n8,{served[1]},dog,\n'
    )
    (root / "b.tsv").write_text(f"link\tcaption\n{served[2]}\ttab, separated\n")
    (root / "c.jsonl").write_text(
        json.dumps({"link": served[3], "caption": "json", "score": 0.5, "tags": ["a", "b"]}) + "\n"
    )
    expected = {
        ("a.csv", 2): {"id": "7", "caption": "a cat, sitting", "licence": "cc-by"},
        ("a.csv", 3): {"id": "8", "caption": "dog", "licence": ""},
        ("b.tsv", 2): {"caption": "tab, separated"},
        ("c.jsonl", 1): {"caption": "json", "score": 0.5, "tags": ["a", "b"]},
    }
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.table({"link": served[4:7], "caption": ["p0", "p1", "p2"], "n": [1, 2, 3]})
    pq.write_table(table, root / "d.parquet", row_group_size=2)
    expected.update({("d.parquet", i + 1): {"caption": f"p{i}", "n": i + 1} for i in range(3)})
    (root / "a.csv").write_text((root / "a.csv").read_text().replace("id,url,", "id,link,"))

    report = run([root], make_config(out, url_column="link"))

    rows = list(read_manifest(out))
    assert report.ok == len(rows) == 7
    assert {(r["source"], r["line"]): r["columns"] for r in rows} == expected
    assert all(r["status"] == "ok" and r["path"] for r in rows)


def test_duplicate_urls_are_rows_of_their_own_or_pointers_to_the_first(tmp_path, served):
    root = tmp_path / "urls"
    root.mkdir()
    (root / "a.txt").write_text(lines_of([served[0], served[1], served[0]]))
    (root / "b.txt").write_text(lines_of([served[1], served[2]]))

    plain = run([root], make_config(tmp_path / "plain"))
    rows = assert_rows_match_input(tmp_path / "plain", root)
    assert plain.ok == 5 and {r["status"] for r in rows} == {"ok"}  # each line, as asked

    out = tmp_path / "deduped"
    deduped = run([root], make_config(out, dedupe=True))
    rows = assert_rows_match_input(out, root)
    by_line = {(r["source"], r["line"]): r for r in rows}
    assert (deduped.ok, deduped.duplicates) == (3, 2)
    assert by_line["a.txt", 3]["status"] == "duplicate"
    assert by_line["a.txt", 3]["duplicate_of"] == make_key(0, 1)
    assert by_line["b.txt", 1]["duplicate_of"] == make_key(0, 2)
    assert by_line["b.txt", 1]["path"] is None
    assert len(list((out / "images").rglob("*.jpg"))) == 3  # fetched and written once each

    with (root / "b.txt").open("a") as f:  # an appended line repeating a URL done long ago
        f.write(lines_of([served[0]]))
    again = run([root], make_config(out, dedupe=True))
    assert (again.urls, again.duplicates) == (1, 1)
    rows = assert_rows_match_input(out, root)
    assert {r["duplicate_of"] for r in rows if (r["source"], r["line"]) == ("b.txt", 3)} == {
        make_key(0, 1)
    }
    assert not (out / ".dedupe.sqlite").exists()


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, image_dir):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    gated = gated_handler()
    with StaticServer(image_dir, handler=gated) as server:
        names = sorted(p.name for p in image_dir.iterdir())[:4]
        (root / "list.txt").write_text(lines_of([server.url(n) for n in names]))
        result: dict[str, Any] = {}
        first = threading.Thread(target=lambda: result.update(report=run([root], make_config(out))))
        first.start()
        try:
            assert gated.arrived.acquire(timeout=60), "the first run never reached the server"
            config = write_config(tmp_path / "config.toml")
            second = pipeline_cli("run", str(root), "--out", str(out), "--config", str(config),
                                  "-q", cwd=ROOT)  # fmt: skip
        finally:
            gated.gate.set()
            first.join()
    assert_one_line_error(second, str(out), "another pipeline run", f"pid {os.getpid()}")
    assert result["report"].ok == 4
    assert_rows_match_input(out, root)
    again = pipeline_cli(
        "run", str(root), "--out", str(out), "--config", str(config), "-q", cwd=ROOT
    )
    assert again.returncode == 0, again.stderr  # the lock went with the first run


# --- one plan of the input: each file is read as few times as the run needs ---------------------


@pytest.fixture
def parses(monkeypatch) -> Counter[str]:
    """How many times each input file is parsed (opened by the record readers), by name."""
    import pipeline.sources as sources

    opened: Counter[str] = Counter()
    real = sources.open_lines

    def counting(path: Path, *args: Any, **kwargs: Any) -> Any:
        opened[Path(path).name] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sources, "open_lines", counting)
    return opened


def test_a_rerun_reads_a_file_done_whole_once_with_the_bars_on(tmp_path, served, parses):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    (root / "done.txt").write_text(lines_of(served[:5]))
    (root / "more.txt").write_text(lines_of(served[5:7]))
    first = run([root], make_config(out), progress=True)
    assert first.urls == 7
    assert parses == {"done.txt": 2, "more.txt": 2}  # new files: the bars' count, the run

    parses.clear()
    with (root / "more.txt").open("a") as f:
        f.write(lines_of(served[7:8]))
    again = run([root], make_config(out), progress=True)
    # done.txt: the check only (its counts make the bars' total; nothing in it is left to do);
    # more.txt: the check, then the run for its appended line; neither is counted a third time
    assert parses == {"done.txt": 1, "more.txt": 2}
    assert (again.urls, again.skipped) == (1, 7)
    assert_rows_match_input(out, root)


def test_a_dry_run_reads_each_file_once(tmp_path, served, parses):
    from pipeline.preview import dry_run

    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    (root / "old.txt").write_text(lines_of(served[:4]) + "#\n")
    run([root], make_config(out))
    (root / "new.txt").write_text(lines_of(served[4:6]))
    parses.clear()
    lines = dry_run([root], make_config(out), restart=False)
    assert parses == {"old.txt": 1, "new.txt": 1}  # the check's counts serve for old.txt
    assert any("old.txt (txt): 4 lines, 2 shards" in line for line in lines), lines
    assert any("new.txt (txt): 2 lines, 1 shard" in line for line in lines), lines
    assert any("6 URLs in 2 files, 3 shards" in line for line in lines), lines


def test_with_dedupe_a_file_done_whole_is_read_again_for_its_urls(tmp_path, served, parses):
    root, out = tmp_path / "urls", tmp_path / "out"
    root.mkdir()
    (root / "a.txt").write_text(lines_of(served[:3]))
    run([root], make_config(out, dedupe=True))
    (root / "b.txt").write_text(lines_of(served[:1]))  # an earlier file's URL
    parses.clear()
    again = run([root], make_config(out, dedupe=True))
    assert parses["a.txt"] == 2  # the check, then the run: its URLs mark b.txt's duplicate
    rows = [row for row in read_manifest(out) if row["source"] == "b.txt"]
    assert [(row["status"], row["duplicate_of"]) for row in rows] == [("duplicate", make_key(0, 1))]
    assert again.skipped == 3


def test_restart_removes_what_earlier_runs_wrote_captions_and_staged_files_too(tmp_path):
    """A line redone without a caption, or one that now fails, keeps no earlier run's file."""
    for name in ("images/00000/00000/000000001-ab.jpg", "images/00000/00000/000000001-ab.txt",
                 ".staging/00000/00000/000000002-cd.jpg", "manifest/00000-000000001.jsonl",
                 "shards/00000.tar", "run.json"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("earlier")
    (tmp_path / "notes.txt").write_text("the user's")
    forget(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
