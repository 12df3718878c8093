"""Locations as URLs (``pipeline.storage``): plain paths stay local folders, unknown schemes and
missing packages are one line before any work, secrets are never shown; input files read from
an object store (a real S3-compatible server, moto's, on 127.0.0.1) through the real command."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from helpers import s3_server

from pipeline.config import parse_config
from pipeline.errors import ConfigError, PipelineError, SourceError
from pipeline.inputs import Findings, find_files, input_root, open_lines, relative_name
from pipeline.sink import read_manifest
from pipeline.storage import (
    Location,
    StoredFile,
    list_stored,
    parse_location,
    redact,
    redact_options,
)

SECRET = "s3cr3t-n3ver-sh0wn"


# --- parsing a location ---------------------------------------------------------------------------


def test_a_plain_path_stays_a_local_path_and_a_file_url_is_one():
    assert parse_location("out/run") == Path("out/run")
    assert parse_location("/data/laion") == Path("/data/laion")
    assert parse_location("file:///data/laion") == Path("/data/laion")
    assert parse_location("weird:name/out") == Path("weird:name/out")  # no "//": a path
    where = parse_location("s3://bucket/laion/", {"anon": True})
    assert where == Location("s3://bucket/laion/", {"anon": True})
    assert isinstance(where, Location) and where.path == "bucket/laion"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ftp://host/out", "unknown storage scheme 'ftp'"),
        ("s3://", "names no bucket"),
        ("file://otherhost/x", "names no host"),
    ],
)
def test_a_location_that_cannot_be_used_is_one_line(text, expected):
    with pytest.raises(PipelineError) as info:
        parse_location(text)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_a_missing_filesystem_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # importing it raises ImportError
    with pytest.raises(PipelineError, match=r"needs gcsfs.*imagelist-pipeline\[gcs\]"):
        parse_location("gs://bucket/out")


def test_credentials_in_a_url_are_refused_and_never_echoed():
    with pytest.raises(PipelineError) as info:
        parse_location(f"s3://AKIDEXAMPLE:{SECRET}@bucket/out")
    assert SECRET not in str(info.value) and "never in the URL" in str(info.value)


def test_redaction_hides_passwords_and_secret_looking_options():
    assert redact(f"az://user:{SECRET}@box/c?sig={SECRET}&v=1") == "az://user:***@box/c?sig=***&v=1"
    assert redact("out/plain") == "out/plain"
    assert redact("s3:///x") == "s3:///x" and redact("s3://b/x") == "s3://b/x"  # as written
    assert redact("memory://") == "memory://"
    shown = redact_options(
        {
            "secret": SECRET,
            "anon": False,
            "client_kwargs": {"aws_session_token": SECRET, "endpoint_url": "http://127.0.0.1:9000"},
        }
    )
    assert SECRET not in json.dumps(shown)
    assert shown["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert shown["anon"] is False


def test_storage_options_are_tables_of_the_config():
    config = parse_config({"input": {"storage_options": {"anon": True}}})
    assert config.input.storage_options == {"anon": True}
    with pytest.raises(ConfigError, match=r"input\.storage_options must be a table"):
        parse_config({"input": {"storage_options": "anon"}})


# --- input files in a store (fsspec's in-process memory:// store) --------------------------------


@pytest.fixture
def memory_inputs() -> Iterator[Location]:
    import fsspec

    fs = fsspec.filesystem("memory")
    lines = "".join(f"http://127.0.0.1:9/{n}.jpg\n" for n in range(3))
    fs.pipe("/lists/a.txt", lines.encode())
    fs.pipe("/lists/b.txt.gz", gzip.compress(lines.encode()) + gzip.compress(b"http://x/9\n"))
    fs.pipe("/lists/c.txt.zst", zstandard.ZstdCompressor().compress(lines.encode()))
    fs.pipe("/lists/d.txt.bz2", b"BZh9")
    fs.pipe("/lists/old/run.json", b"{}")  # an output folder of a run: not input
    fs.pipe("/lists/old/manifest/00000.jsonl", b"")
    yield Location("memory://lists")
    fs.rm("/lists", recursive=True)


def test_stored_inputs_are_listed_and_streamed_like_local_ones(memory_inputs):
    findings = Findings()
    files = find_files([memory_inputs], None, findings)
    assert [f.name for f in files] == ["a.txt", "b.txt.gz", "c.txt.zst"]
    assert all(isinstance(f, StoredFile) for f in files)
    assert any("old: skipped" in w for w in findings.warnings)
    assert any("compression not read" in w for w in findings.warnings)
    counts = []
    for file in files:
        compression = {".gz": "gzip", ".zst": "zstd"}.get(file.suffix)
        with open_lines(file, compression) as lines:
            counts.append(len(list(lines)))
    assert counts == [3, 4, 3]  # the second gzip member read on: appended lines
    root = input_root([memory_inputs])
    assert root == "memory://lists"
    assert relative_name(files[1], root) == "b.txt.gz"


def test_inputs_are_all_local_or_all_in_one_store(tmp_path):
    with pytest.raises(SourceError, match="all local, or all in one object store"):
        input_root([tmp_path, Location("memory://lists")])


# --- through the real command ---------------------------------------------------------------------


def _run(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", *args, "-q"],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_an_output_url_no_run_can_write_is_refused_before_any_work_and_makes_no_folder(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    for out, expected in [
        ("memory://laion", "output.dir memory://laion: memory:// lives in one process"),
        ("nope://my-bucket/laion", "unknown storage scheme 'nope'"),
    ]:  # fmt: skip
        for dry in ([], ["--dry-run"]):
            proc = _run(tmp_path, {}, "urls.txt", "--out", out, *dry)
            assert proc.returncode == 2
            assert proc.stderr.strip() == f"pipeline: error: {expected}" or expected in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["urls.txt"]  # no "memory:", no "nope:"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with s3_server() as env:
        yield env


def _s3fs(env: dict[str, str]):  # type: ignore[no-untyped-def]
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )


def test_inputs_read_from_s3_through_the_real_command(tmp_path, s3, server, image_dir):
    """Lists in a bucket (plain, .gz, .jsonl) read as streams, an earlier run's folder in the
    bucket skipped; every line once; a rerun resumes from the seals; the secret of
    input.storage_options is in no output file and no line printed."""
    names = sorted(p.name for p in image_dir.glob("*.jpg"))[:6]
    fs = _s3fs(s3)
    fs.mkdir("lists")
    fs.pipe("lists/urls/a.txt", "".join(f"{server.url(n)}\n" for n in names[:3]).encode())
    gz = gzip.compress("".join(f"{server.url(n)}\n" for n in names[3:5]).encode())
    fs.pipe("lists/urls/more/b.txt.gz", gz)
    fs.pipe("lists/urls/c.jsonl", json.dumps({"url": server.url(names[5])}).encode() + b"\n")
    fs.pipe("lists/urls/old/run.json", b"{}")
    (tmp_path / "config.toml").write_text(
        f'[input.storage_options]\nkey = "testing"\nsecret = "{SECRET}"\n'
    )
    args = ("s3://lists/urls/", "--out", "out", "--download-workers", "2", "--transform-workers",
            "1", "-v")  # fmt: skip
    first = _run(tmp_path, s3, *args)
    assert first.returncode == 0, first.stderr
    rows = list(read_manifest(tmp_path / "out"))
    assert sorted((r["source"], r["line"]) for r in rows) == [
        ("a.txt", 1), ("a.txt", 2), ("a.txt", 3), ("c.jsonl", 1),
        ("more/b.txt.gz", 1), ("more/b.txt.gz", 2),
    ]  # fmt: skip
    assert all(r["status"] == "ok" for r in rows)
    state = json.loads((tmp_path / "out" / "run.json").read_text())
    assert state["root"] == "s3://lists/urls"
    again = _run(tmp_path, s3, *args, "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "nothing left to do" in " ".join(again.stdout.split())
    written = [p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    for text in (first.stdout, first.stderr, again.stdout, again.stderr):
        assert SECRET not in text
    assert not any(SECRET.encode() in data for data in written)


def test_a_missing_bucket_is_one_line(tmp_path, s3):
    proc = _run(tmp_path, s3, "s3://no-such-bucket/urls/", "--out", "out")
    assert proc.returncode == 2
    assert "s3://no-such-bucket/urls" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not (tmp_path / "out" / "manifest").exists()


def test_a_store_of_inputs_that_refuses_connections_is_one_line_naming_it():
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        options = {"endpoint_url": f"http://127.0.0.1:{closed.getsockname()[1]}", "key": "k"}
        options |= {"secret": SECRET, "config_kwargs": {"retries": {"max_attempts": 1}}}
        with pytest.raises(SourceError, match=r"^s3://refused/urls/: cannot list: Could not co"):
            list_stored(Location("s3://refused/urls/", options))
