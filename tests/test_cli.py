"""The command line, run as a user runs it: in a subprocess, reading its exit code and output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pipeline(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[download]\nworkers = 0\n", ["download.workers", "0"]),
        ("[download]\nworkers = 'many'\n", ["download.workers", "many"]),
        ("[transform]\nstart_method = 'fork'\n", ["transform.start_method", "fork"]),
        ("[[transform.ops]]\nop = 'sepia'\n", ["transform.ops[0].op", "sepia"]),
        # the tests' ops are registered by the tests, never offered to a config file
        ("[[transform.ops]]\nop = '_sleep'\nseconds = 1.0\n", ["must be one of", "'_sleep'"]),
        ("[queue]\nfetched = 1\n", ["queue"]),
        ("[download\n", ["invalid TOML"]),
    ],
)
def test_a_bad_config_is_a_one_line_error_naming_the_key(tmp_path, toml, needles):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = pipeline(
        "run", str(tmp_path / "urls.txt"), "--config", str(config), "--out", str(tmp_path / "out")
    )
    assert_one_line_error(result, "bad.toml", *needles)
    assert not (tmp_path / "out").exists(), "nothing may be written when the config is bad"


def test_a_missing_source_is_a_one_line_error(tmp_path):
    result = pipeline("run", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "nope", "no such file or folder")


def test_an_output_folder_that_cannot_be_made_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = pipeline("run", str(tmp_path / "urls.txt"), "--out", str(tmp_path / "file" / "out"))
    assert_one_line_error(result, "file/out", "output folder")


def test_a_bad_worker_count_is_rejected_by_the_parser(tmp_path):
    result = pipeline("run", str(tmp_path), "--download-workers", "0")
    assert result.returncode == 2
    assert "--download-workers" in result.stderr and "Traceback" not in result.stderr


def test_run_prints_a_report_and_saves_it(tmp_path, server, image_dir):
    names = sorted(p.name for p in image_dir.iterdir())[:6]
    (tmp_path / "urls.txt").write_text(
        "".join(server.url(n) + "\n" for n in names) + server.url("gone.jpg") + "\n"
    )
    out = tmp_path / "out"
    result = pipeline(
        "run",
        str(tmp_path / "urls.txt"),
        "--out",
        str(out),
        "--download-workers",
        "2",
        "--transform-workers",
        "1",
        "-q",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "7: 6 ok, 1 failed" in result.stdout and "http_4xx" in result.stdout
    saved = json.loads((out / "report.json").read_text())
    assert saved["ok"] == 6 and saved["failed"] == {"http_4xx": 1}
    assert result.stderr == "", "no progress bar or log noise with -q when stderr is not a TTY"


def test_version_and_help(tmp_path):
    assert pipeline("--version").stdout.startswith("pipeline ")
    helped = pipeline("run", "--help")
    assert helped.returncode == 0 and "--transform-workers" in helped.stdout


def test_a_run_does_not_import_the_bench_or_its_libraries(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    script = (
        "import sys\n"
        "from pipeline.cli import main\n"
        f"assert main(['run', {str(tmp_path / 'urls.txt')!r}, '--dry-run', '-q']) == 0\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tomlkit', 'matplotlib')"
        " or m.startswith('pipeline.bench')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_demo_processes_every_sample_image(tmp_path):
    samples = sorted(
        p for p in (ROOT / "data" / "images").iterdir() if p.suffix in (".jpg", ".png")
    )
    assert len(samples) >= 30
    result = pipeline("demo", "--out", str(tmp_path / "demo"), "-q")
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["ok"] == len(samples)
    assert saved["failed"] == {"http_4xx": 1, "not_image": 1}  # the two deliberate failures


@pytest.mark.parametrize(
    ("missing", "args", "config", "says"),
    [
        ("matplotlib", ("bench", "--plot", "x.png", "--images", "4"), "", '".[plot]"'),
        ("tomlkit", ("bench", "--write-config", "--images", "4"), "", '".[bench]"'),
        ("distributed", ("run", "urls.txt", "--dask", "local"), "", '".[dask]"'),
        ("pyarrow", ("run", "urls.txt"), "[output]\nparquet = true\n", '".[parquet]"'),
    ],
)
def test_an_optional_feature_without_its_library_fails_before_any_work(
    tmp_path, missing, args, config, says
):
    shadow = tmp_path / "shadow" / missing  # an import of it fails, as if it were not installed
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError('no {missing} here')\n")
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    (tmp_path / "config.toml").write_text(config)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(ROOT)])},
    )  # fmt: skip
    extra = says.strip('".[]')
    assert_one_line_error(
        result, f'pip install "imagelist-pipeline[{extra}]"', f"pip install -e {says} in a checkout"
    )
    assert not (tmp_path / "out").exists()  # nothing was read, fetched or written
    assert not (tmp_path / "x.png").exists() and "images/s" not in result.stdout


def test_init_writes_the_commented_defaults_and_keeps_an_existing_file(tmp_path):
    result = pipeline("init", str(tmp_path / "new"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = (tmp_path / "new" / "config.toml").read_text()
    assert written == (ROOT / "config.toml").read_text()
    (tmp_path / "new" / "config.toml").write_text("# mine\n")
    assert_one_line_error(pipeline("init", "new", cwd=tmp_path), "exists already; --force")
    assert (tmp_path / "new" / "config.toml").read_text() == "# mine\n"
    assert pipeline("init", "new", "--force", cwd=tmp_path).returncode == 0
    assert (tmp_path / "new" / "config.toml").read_text() == written


def test_a_dry_run_says_what_would_run_and_touches_nothing(tmp_path, server):
    urls = tmp_path / "urls"
    urls.mkdir()
    (urls / "a.txt").write_text("".join(f"{server.url(f'img-{i:03d}.jpg')}\n" for i in range(5)))
    (urls / "b.csv").write_text(f"url,caption\n{server.url('img-005.jpg')},five\n")
    (tmp_path / "config.toml").write_text("[input]\nshard_size = 2\n")
    dry = pipeline("run", "urls", "--out", "out", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert not (tmp_path / "out").exists()  # not even the folder
    assert "a.txt (txt): 5 lines, 3 shards" in dry.stdout
    assert "b.csv (csv): 1 line, 1 shard" in dry.stdout
    assert "6 URLs in 2 files, 4 shards" in dry.stdout
    assert "a first run into out" in dry.stdout

    assert pipeline("run", "urls", "--out", "out", "-q", cwd=tmp_path).returncode == 0
    with (urls / "a.txt").open("a") as f:
        f.write(server.url("img-006.jpg") + "\n")
    before = sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    dry = pipeline("run", "urls", "--out", "out", "--dry-run", cwd=tmp_path)
    assert "resume      6 URLs done by earlier runs (4 shards sealed); to do: 1 in a.txt" in (
        dry.stdout
    )
    assert sorted(str(p) for p in (tmp_path / "out").rglob("*")) == before
    real = pipeline("run", "urls", "--out", "out", "-q", cwd=tmp_path)
    assert "resumed     6 URLs done by earlier runs (4 shards sealed); to do: 1 in a.txt" in (
        real.stdout
    )

    (urls / "a.txt").write_text("http://127.0.0.1:9/changed.jpg\n")  # an edited line: refused
    assert_one_line_error(
        pipeline("run", "urls", "--out", "out", "--dry-run", cwd=tmp_path), "line 1 changed"
    )


QUICK = "[download]\nretries = 0\n[transform]\nworkers = 1\n"  # refused URLs: no retry, no wait


def test_a_changed_setting_is_named_with_both_values_older_folders_too(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    (tmp_path / "config.toml").write_text(QUICK)
    assert pipeline("run", "urls.txt", "-q", cwd=tmp_path).returncode == 0
    (tmp_path / "config.toml").write_text(QUICK + "quality = 95\n")
    assert_one_line_error(
        pipeline("run", "urls.txt", "-q", cwd=tmp_path), "transform.quality was 85, now 95"
    )

    state_file = tmp_path / "out" / "run.json"
    state = json.loads(state_file.read_text())
    state["settings"] = {  # as run.json held them before the settings were named
        "input": {"shard_size": 10000, "url_column": "url", "dedupe": False},
        "folder_size": 1000,
        "output": ["jpeg", 85, "#ffffff", "bicubic", 2.0, 89478485],
        "ops": [["ExifTranspose"], ["Thumbnail", 256, 256]],
    }
    state_file.write_text(json.dumps(state))
    assert_one_line_error(
        pipeline("run", "urls.txt", "-q", cwd=tmp_path), "transform.quality was 85, now 95"
    )
    (tmp_path / "config.toml").write_text(QUICK)
    resumed = pipeline("run", "urls.txt", "-q", cwd=tmp_path)  # the same settings: it resumes
    assert resumed.returncode == 0, resumed.stderr
    assert "1 URLs done by earlier runs (1 shard sealed); nothing left to do" in resumed.stdout
    assert "transform.quality" in state_file.read_text()  # rewritten in the named form

    state["settings"] = ["jpeg", 85]  # a form no version wrote: said so, in one line
    state_file.write_text(json.dumps(state))
    assert_one_line_error(
        pipeline("run", "urls.txt", "-q", cwd=tmp_path), "made by an older version", "--restart"
    )


def test_damaged_files_of_the_output_folder_are_named_in_one_line(tmp_path):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    (tmp_path / "config.toml").write_text(QUICK)
    assert pipeline("run", "urls.txt", "-q", cwd=tmp_path).returncode == 0
    out = tmp_path / "out"
    state, (manifest,) = (out / "run.json").read_text(), (out / "manifest").glob("*.jsonl")
    (seal,) = (out / "manifest").glob("*.seal.json")

    (out / "run.json").write_text(state[: len(state) // 2])  # cut short
    assert_one_line_error(pipeline("run", "urls.txt", "-q", cwd=tmp_path), "run.json")
    (out / "run.json").write_text(state)

    seal.write_text("{not json")  # a damaged seal is made again from the shard's rows
    again = pipeline("run", "urls.txt", "-q", cwd=tmp_path)
    assert again.returncode == 0 and "nothing left to do" in again.stdout, again.stderr

    (out / "report.json").write_text("[1]")
    assert_one_line_error(pipeline("report", "out", cwd=tmp_path), "report.json")
    (out / "report.json").unlink()
    rows = manifest.read_text()
    for damage in ('{"key": oops\n', '{"key": "00000-000000002"}\n'):  # not JSON; not a row
        manifest.write_text(rows + damage)
        assert_one_line_error(pipeline("report", "out", cwd=tmp_path), manifest.name, "line 2")
    seal.unlink()  # the run must read the rows to make the seal again
    assert_one_line_error(pipeline("run", "urls.txt", "-q", cwd=tmp_path), manifest.name)


def test_input_reaches_the_terminal_escaped_and_the_manifest_as_strict_json(tmp_path):
    rows = [
        {"url": "http://127.0.0.1:9/\x1b[31mred\x07.jpg", "score": float("nan"), "n": [1e999]},
        {"url": "http://127.0.0.1:9/\x1b]0;title\x07\r\x9b2J.jpg"},
    ]
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "config.toml").write_text(QUICK)
    done = pipeline("run", "urls.jsonl", "-vv", cwd=tmp_path)  # -vv: every failure logged
    assert done.returncode == 0, done.stderr
    for stream in (done.stdout, done.stderr):
        assert not any(c in stream for c in "\x1b\x07\r\x9b"), stream
    assert "\\x1b[31mred\\x07.jpg" in done.stderr  # the URL is there, escaped

    def strict(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    (manifest,) = (tmp_path / "out" / "manifest").glob("*.jsonl")
    lines = manifest.read_text().splitlines()
    parsed = [json.loads(line, parse_constant=strict) for line in lines]
    assert {row["line"]: row["columns"] for row in parsed}[1] == {"score": None, "n": [None]}
