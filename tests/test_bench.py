"""``pipeline bench``: the workload server, the memory sampler, the sweep, --compare, the config."""

from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from test_cli import ROOT, pipeline

from pipeline.bench import interrupt, transform_modes
from pipeline.bench.faults import FaultServer
from pipeline.bench.hostile import FAULTS, urls
from pipeline.bench.lanecpu import NAMING, Sample, downloads, group, table
from pipeline.bench.sweep import (
    Overlap,
    Row,
    Setting,
    best,
    choose,
    format_row,
    header,
    median,
    tree_rss,
    write_config,
)
from pipeline.bench.workload import Workload, WorkloadServer
from pipeline.config import load_config, with_overrides

SMALL = "200-300"  # px: a workload that is quick to draw and to transform


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def workload(cache: Path) -> Workload:
    work = Workload(cache / "workload", distinct=6, min_px=200, max_px=300)
    work.make()
    return work


def test_workload_server_serves_each_image_by_number_on_one_connection(workload):
    bodies = [p.read_bytes() for p in workload.files]
    with WorkloadServer(workload.files) as server, requests.Session() as session:
        for n in (0, 1, 5, 6, 13):
            answer = session.get(f"{server.url}{n}.jpg", timeout=5)
            assert answer.status_code == 200
            assert answer.headers["Content-Type"] == "image/jpeg"
            assert answer.content == bodies[n % len(bodies)]
        assert session.get(f"{server.url}nope.jpg", timeout=5).status_code == 404
        pool = session.get_adapter(server.url).poolmanager
        assert sum(p.num_connections for p in pool.pools._container.values()) == 1


def test_workload_server_caps_bandwidth_per_connection(workload):
    body = workload.files[0].read_bytes()
    rate = 4 * len(body)  # bytes/s: one body should take about 1/4 s
    with WorkloadServer(workload.files[:1], bandwidth=rate) as server:
        started = time.perf_counter()
        answer = requests.get(f"{server.url}0.jpg", timeout=5)
        elapsed = time.perf_counter() - started
    assert answer.content == body
    assert elapsed >= 0.8 * len(body) / rate  # a cap can only make it slower, never faster


def test_workload_servers_share_a_port_on_the_cores_set_apart(workload):
    last = max(os.sched_getaffinity(0))
    with WorkloadServer(workload.files[:3], processes=2, cores=frozenset({last})) as server:
        pids = [p.pid for p in server._processes]
        assert all(os.sched_getaffinity(pid) == {last} for pid in pids)
        for n in range(12):  # a new connection each time: the kernel spreads them
            with requests.Session() as session:
                answer = session.get(f"{server.url}{n}.jpg", timeout=5)
            assert answer.content == workload.files[n % 3].read_bytes()
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


OWNER = """
import sys
from collections import Counter
from pathlib import Path
from pipeline.bench.workload import WorkloadServer
if __name__ == "__main__":
    with WorkloadServer([Path(p) for p in sys.argv[1:]]) as server:
        print(server._processes[0].pid, flush=True)
        sys.stdin.read()
"""


def test_workload_server_ends_when_its_owner_is_killed(workload, tmp_path):
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    files = [str(p) for p in workload.files]
    with subprocess.Popen(
        [sys.executable, str(script), *files],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as owner:
        assert owner.stdout is not None
        server = os.pidfd_open(int(owner.stdout.readline()))
        owner.kill()  # no __exit__ runs: only the server's own watch can end it
    try:
        ended, _, _ = select.select([server], [], [], 10)
    finally:
        os.close(server)
    assert ended, "the workload server outlived the process that started it"


def test_workload_urls_name_distinct_urls(workload, tmp_path):
    workload.write_urls(tmp_path / "urls.txt", "http://127.0.0.1:1/", 25)
    lines = (tmp_path / "urls.txt").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 25
    assert lines[7] == "http://127.0.0.1:1/7.jpg"


def test_tree_rss_counts_the_memory_of_children():
    script = "import sys; b = b'x' * 80_000_000; print('ready', flush=True); sys.stdin.read()"
    before = tree_rss(os.getpid())
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        during = tree_rss(os.getpid())
        child_alone = tree_rss(child.pid)
        child.communicate("")
    assert child_alone >= 80_000_000
    assert during - before >= 70_000_000


def _row(name: str, rate: float, setting: Setting | None) -> Row:
    return Row(name, 100, 100, round(100 / rate, 4), 100.0, 1.0, setting=setting)


def test_best_prefers_fewer_workers_among_runs_within_three_percent():
    rows = [
        _row("a", 200.0, Setting(32, 2)),
        _row("b", 198.0, Setting(8, 2)),
        _row("c", 150.0, Setting(4, 1)),
    ]
    assert best(rows).name == "b"
    assert best([*rows, _row("d", 260.0, Setting(64, 3))]).name == "d"


def _runs(name: str, rates: tuple[float, ...], setting: Setting) -> Row:
    return replace(_row(name, sorted(rates)[(len(rates) - 1) // 2], setting), rates=rates)


def test_write_config_takes_only_a_winner_beyond_the_noise_and_keeps_auto():
    clear = [_runs("a", (210.0, 220.0), Setting(32, 1)), _runs("b", (150.0, 205.0), Setting(8, 1))]
    assert choose(clear, cores=2).setting == Setting(32, 1)  # its worst run beats b's best

    noisy = [_runs("a", (200.0, 220.0), Setting(32, 1)), _runs("b", (150.0, 205.0), Setting(8, 1))]
    decided = choose(noisy, cores=2)
    assert decided.setting is None and "within the noise" in decided.reason
    assert "200.0-220.0" in decided.reason and "150.0-205.0" in decided.reason

    once = [_runs("a", (300.0,), Setting(32, 1)), _runs("b", (100.0,), Setting(8, 1))]
    assert choose(once, cores=2).setting is None  # one run each: no spread measured
    assert choose(clear[:1], cores=2).setting is None  # nothing to beat

    auto = [_runs("a", (250.0, 260.0), Setting(16, 2, lanes=1)), *clear]
    assert choose(auto, cores=2).setting == Setting(16, 0, lanes=0)  # what 0 gives here: 0
    assert choose(auto, cores=4).setting == Setting(16, 2, lanes=1)  # fewer than auto: kept
    near_auto = [_runs("a", (250.0, 260.0), Setting(16, 1)), _runs("b", (240, 255), Setting(16, 2))]
    assert choose(near_auto, cores=2).setting is None  # auto within the noise: left as it is


def test_overlap_floor_adds_the_main_processs_cpu_only_when_transforms_fill_the_cores():
    cpu_bound = Overlap(staged_s=9.0, stage="transform", alone_s=6.0, shared_s=1.5)
    assert cpu_bound.ratio == 1.5 and cpu_bound.floor_s == 7.5 and cpu_bound.floor_ratio == 1.2
    network_bound = Overlap(staged_s=9.0, stage="download", alone_s=6.0, shared_s=1.5)
    assert network_bound.floor_s == 6.0


def test_median_is_the_middle_run_by_rate():
    runs = [_row("a", 100.0, None), _row("b", 300.0, None), _row("c", 200.0, None)]
    assert median(runs).name == "c"
    assert median(runs[:2]).name == "a"  # of two, the slower: never flattering


def test_write_config_changes_the_workers_and_keeps_every_comment(tmp_path):
    path = tmp_path / "config.toml"
    shutil.copy(ROOT / "config.toml", path)
    original = path.read_text()
    write_config(path, Setting(7, 3, 64))
    text = path.read_text()
    comments = [line for line in original.splitlines() if line.lstrip().startswith("#")]
    assert all(line in text.splitlines() for line in comments)
    assert len(text.splitlines()) == len(original.splitlines())
    written, before = load_config(path), load_config(ROOT / "config.toml")
    expected = with_overrides(before, "download", workers=7)
    expected = with_overrides(expected, "transform", workers=3)
    expected = with_overrides(expected, "queues", fetched=64)
    assert written == expected


def test_bench_sweep_measures_each_setting_writes_the_best_and_plots(cache, tmp_path):
    config = tmp_path / "config.toml"
    shutil.copy(ROOT / "config.toml", config)
    plot = tmp_path / "sweep.png"
    result = pipeline(
        "bench", "--images", "30", "--size", SMALL, "--cache", str(cache),
        "--download-workers", "2,4", "--transform-workers", "1",
        "--config", str(config), "--write-config", "--plot", str(plot), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    rows = data["sweep"]
    assert [
        (r["setting"]["download_workers"], r["setting"]["transform_workers"]) for r in rows
    ] == [
        (2, 1),
        (4, 1),
    ]
    for row in rows:
        assert row["images"] == row["ok"] == 30
        assert row["images_per_s"] > 0 and row["wall_s"] > 0
        assert row["peak_mb"] > 20  # at least the run's interpreter and its pool worker
        assert row["parent_cpu_s"] > 0 and row["pool_cpu_s"] > 0
        assert 0 <= row["transform_util"] <= 100
    assert all(len(row["rates"]) == 1 for row in rows)
    # one run per setting measures no noise: nothing is written (choose() decides, tested above)
    assert data["written"] is None and "--repeat" in data["decision"]
    assert config.read_text() == (ROOT / "config.toml").read_text()
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_compare_rows_show_the_ratio_to_sequential():
    sequential, staged = _row("sequential", 50.0, None), _row("staged", 200.0, None)
    assert format_row(sequential, False, sequential).endswith("1.00x")
    line = format_row(staged, False, sequential)
    assert line.startswith("staged") and line.endswith("4.00x")
    assert len(header(sweep_table=False)) == len(line)
    failed = Row("threads", 100, 90, 1.0, 10.0, 1.0)
    assert format_row(failed, False, sequential).endswith("(10 failed)")


def test_bench_compare_json_holds_phases_and_counts(cache, tmp_path):
    result = pipeline(
        "bench", "--compare", "--images", "12", "--repeat", "2", "--size", SMALL,
        "--cache", str(cache), "--config", str(ROOT / "config.toml"), "--json",
        "--download-workers", "3",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    names = [r["name"] for r in data["compare"]]
    assert names == ["sequential", "threads", "processes", "two-phase", "staged"]
    assert all(r["ok"] == 12 for r in data["compare"])
    phased = data["compare"][3]["phases"]
    assert phased["download_s"] > 0 and phased["transform_s"] > 0
    assert data["overlap"]["stage"] in ("download", "transform")
    assert data["overlap"]["floor_s"] >= data["overlap"]["alone_s"] > 0
    assert data["compare"][4]["setting"]["download_workers"] == 3  # every strategy's workers


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--download-workers", "0"], "--download-workers"),
        (["--latency", "-5"], "--latency"),
        (["--size", "300-200"], "--size"),
        (["--compare", "--download-workers", "2,4"], "--compare"),
    ],
)
def test_bench_rejects_bad_options_in_one_line(args, needle):
    result = pipeline("bench", *args)
    assert result.returncode == 2
    assert needle in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


def test_bench_write_config_needs_a_config_file(tmp_path):
    result = pipeline("bench", "--write-config", "--images", "1", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "pipeline: error: --write-config needs a config file (--config, or ./config.toml)"
    )


def test_the_hostile_benchmark_spreads_every_fault_evenly(image_dir):
    server = FaultServer(image_dir)  # never started: only its URLs are used
    try:
        lines = urls(server, ["a.jpg", "b.jpg"], 100, 0.3)
    finally:
        server.close()
    assert len(lines) == len(set(lines)) == 100
    faulty = [line for line in lines if "/_fault/" in line]
    assert len(faulty) == 30
    kinds = Counter(
        line.split("/_fault/")[1]
        .split("?")[0]
        .replace("a.jpg", "{image}")
        .replace("b.jpg", "{image}")
        for line in faulty
    )
    assert kinds == dict.fromkeys(FAULTS, 3)  # each of the ten, as often as the others
    positions = [i for i, line in enumerate(lines) if "/_fault/" in line]
    assert max(b - a for a, b in itertools.pairwise(positions)) <= 4  # spread, not bunched


def test_the_interrupt_benchmark_times_a_run_stopped_by_ctrl_c(capsys):
    # 120 URLs, one stalling: the run cannot end before the SIGINT sent after 3 images
    assert interrupt.main(["--urls", "120", "--after", "3", "--repeat", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [run["status"] for run in result["runs"]] == [130]
    assert 0 < result["max_ms"] < 10_000


def test_the_transform_modes_benchmark_keeps_only_unchanged_images_as_they_came(capsys):
    assert transform_modes.main(["--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == list(transform_modes.CONFIGS)
    kept = [int(line.split(", ")[-1].split()[0]) for line in lines]
    assert kept[0] == kept[2] == kept[3] == 0 and kept[1] > 0  # reencode = false keeps some


def test_readback_evicts_its_own_files_only_and_never_the_whole_page_cache(tmp_path, monkeypatch):
    from pipeline.bench import readback

    out = tmp_path / "out"
    (out / "images" / "00000").mkdir(parents=True)
    for name in ("images/00000/a.jpg", "images/00000/b.jpg", "manifest.jsonl"):
        (out / name).write_bytes(b"x" * 10_000)
    advised, opened = [], []
    real_fadvise, real_open = os.posix_fadvise, os.open

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), advice))
        real_fadvise(fd, offset, length, advice)

    def spy_open(path, *args, **kwargs):  # every open of the module, by os.open or by Path
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    real_io_open = io.open

    def spy_io_open(file, *args, **kwargs):  # open(), Path.open, Path.write_text
        opened.append(str(file))
        return real_io_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_io_open)
    monkeypatch.setattr("builtins.open", spy_io_open)
    count, _ = readback.timed(lambda folder: len(list(folder.rglob("*.jpg"))), out, cold=True)
    assert count == 2
    files = sorted(str(p) for p in out.rglob("*") if p.is_file())
    assert sorted(advised) == [(path, os.POSIX_FADV_DONTNEED) for path in files]
    assert not [path for path in opened if path.startswith("/proc/sys")]
    assert not hasattr(readback, "drop_caches")


def test_readback_without_webdataset_is_one_line_before_any_work(tmp_path):
    script = (
        "import sys; sys.modules['webdataset'] = None\n"  # an import of it fails
        "from pipeline.bench.readback import main\n"
        f"raise SystemExit(main(['--samples', '2', '--cache', {str(tmp_path)!r}]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'pip install "imagelist-pipeline[webdataset]"' in lines[0], lines
    assert not (tmp_path / "workload").exists()  # no image was drawn


# --- lanecpu: CPU per image by process and by lane thread ----------------------------------------


def test_lanecpu_names_every_thread_in_proc_and_reads_its_cpu():
    script = NAMING + "\n".join([
        "import os, threading",
        "from pipeline.bench.lanecpu import thread_cpu",
        "done = threading.Event()",
        "worker = threading.Thread(target=done.wait, name='download-7')",
        "worker.start()",
        "print(sorted(name for name, _, _ in thread_cpu(os.getpid()).values()))",
        "done.set()",
        "worker.join()",
    ])  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert "'download-7'" in out.stdout


def test_lanecpu_sums_thread_groups_and_processes_per_image():
    sampled = Sample(kinds={10: "coordinator", 20: "lane", 30: "transform workers"})
    sampled.threads = {
        (10, 10): ("main (sender)", 0.2, 0.0),
        (20, 21): ("download-0", 0.3, 0.1),
        (20, 22): ("download-1", 0.5, 0.1),
        (20, 23): ("dispatch", 0.1, 0.0),
        (30, 30): ("main (sender)", 4.0, 1.0),
    }
    text = table(sampled, images=1000, wall=2.0)
    assert group("download-12") == "download-*"
    assert re.search(r"download-\*\s+x2\s+1\.000\s+0\.800\s+0\.200 ms", text)
    assert re.search(r"lane\s+1\.100 ms", text) and re.search(r"whole tree\s+6\.300 ms", text)


def test_lanecpu_measures_the_download_client_alone_and_profiles_it(workload):
    options = argparse.Namespace(images=12, download_workers=2, config=None, profile=True)
    text = downloads(options, workload)
    assert re.match(r"12 downloads, 2 threads, \d+/s: \d+\.\d{3} ms of thread CPU", text)
    assert "pipeline/download.py" in text and "(fetch)" in text  # where the CPU went
