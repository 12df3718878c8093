"""The Dask executor: a LocalCluster on loopback runs a shard per task, like the local executor."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.bench.server import StaticServer
from pipeline.config import (
    Config,
    DownloadConfig,
    ExecutorConfig,
    InputConfig,
    OutputConfig,
    Thumbnail,
    TransformConfig,
    parse_config,
)
from pipeline.errors import ConfigError, PipelineError, install_hint
from pipeline.runner import run
from pipeline.sink import read_manifest

pytest.importorskip("distributed")

from pipeline.cluster import (
    DAEMON_HELP,
    ShardResult,
    connect,
    merge,
    run_on_dask,
    run_shard,
)
from pipeline.records import ShardEnd
from pipeline.report import Report

SHARD = 25


def make_config(out: Path) -> Config:
    return Config(
        input=InputConfig(shard_size=SHARD),
        output=OutputConfig(dir=str(out), folder_size=20),
        download=DownloadConfig(workers=3),
        transform=TransformConfig(workers=1, ops=(Thumbnail(64, 48),)),
        executor=ExecutorConfig(kind="dask", local_workers=2, retries=2),
    )


@pytest.fixture(scope="module")
def client():
    with connect(make_config(Path("unused"))) as dask:
        yield dask


def url_file(folder: Path, server: StaticServer, image_dir: Path, copies: int = 4) -> Path:
    """Every test image ``copies`` times (distinct URLs), and two that fail."""
    names = sorted(p.name for p in image_dir.iterdir())
    urls = [server.url(f"{name}?copy={c}") for c in range(copies) for name in names]
    urls[17:17] = [server.url("missing.jpg"), server.url("")]
    path = folder / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    return path


def manifest(out: Path) -> dict[str, dict]:
    rows = list(read_manifest(out, include_parts=False))
    counts = Counter(row["key"] for row in rows)
    assert max(counts.values()) == 1, "a URL recorded twice"
    return {row["key"]: row for row in rows}


def test_dask_run_equals_the_local_run(client, tmp_path, server, image_dir):
    source = url_file(tmp_path, server, image_dir)
    total = len(source.read_text().splitlines())
    local_config = make_config(tmp_path / "local")
    local_config = replace(local_config, executor=ExecutorConfig())
    run([source], local_config)
    seen = []
    report = run_on_dask(
        [source], make_config(tmp_path / "dask"), client=client, on_shard=seen.append
    )

    local, dask = manifest(tmp_path / "local"), manifest(tmp_path / "dask")
    assert len(dask) == total and dask.keys() == local.keys()
    assert len(seen) == -(-total // SHARD)  # one task per shard
    for key, row in dask.items():
        other = local[key]
        assert (row["url"], row["status"], row["error_kind"]) == (
            other["url"],
            other["status"],
            other["error_kind"],
        )
        if row["status"] == "ok":
            assert row["path"] == other["path"]
            dask_bytes = (tmp_path / "dask" / row["path"]).read_bytes()
            assert dask_bytes == (tmp_path / "local" / other["path"]).read_bytes()
    assert report.urls == total and report.ok == total - 2
    assert report.failed == {"http_4xx": 1, "not_image": 1}
    transform = report.stage("transform")
    assert transform is not None and transform.items == total - 2
    assert transform.workers == 2  # one per shard task, on each of the 2 workers
    assert (tmp_path / "dask" / "report.json").exists()


def test_dask_webdataset_tars_are_the_local_runs_byte_for_byte(client, tmp_path, server, image_dir):
    source = url_file(tmp_path, server, image_dir, copies=1)
    tars = {}
    for name in ("local", "dask"):
        config = make_config(tmp_path / name)
        output = replace(config.output, format="webdataset", shard_size=10)
        config = replace(config, output=output)
        if name == "local":
            run([source], replace(config, executor=ExecutorConfig()))
        else:
            run_on_dask([source], config, client=client)
        shards = tmp_path / name / "shards"
        tars[name] = {p.name: p.read_bytes() for p in shards.glob("*.tar")}
        assert (shards / "index.json").read_text().count('"name"') == len(tars[name])
    # 3 shards of 25, 25, 2 lines (the 2 failures in the first): 3 + 3 + 1 tars, named in order
    assert sorted(tars["dask"]) == [f"{n:05d}.tar" for n in range(7)]
    assert tars["dask"] == tars["local"]


def test_a_rerun_skips_the_finished_shards(client, tmp_path, server, image_dir):
    source = url_file(tmp_path, server, image_dir, copies=1)
    config = make_config(tmp_path / "out")
    first = run_on_dask([source], config, client=client)
    shards = sorted((tmp_path / "out" / "manifest").glob("*.jsonl"))
    assert first.urls == 52 and len(shards) == 3
    # a shard's sealed file gone: only that shard is done again
    shards[1].unlink()
    seen = []
    second = run_on_dask([source], config, client=client, on_shard=seen.append)
    assert [r.shard for r in seen] == [shards[1].name.removesuffix(".jsonl")]
    assert second.urls == SHARD and second.skipped == 52 - SHARD
    assert len(manifest(tmp_path / "out")) == 52


def test_losing_a_worker_mid_run_loses_nothing(client, tmp_path, image_dir):
    killed = []

    def kill_a_busy_worker(result) -> None:
        busy = [w for w, keys in client.processing().items() if keys]
        if killed or not busy:  # the first time a shard is running (just submitted, typically)
            return
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    with StaticServer(image_dir, latency=0.02) as slow:
        source = url_file(tmp_path, slow, image_dir, copies=4)
        total = len(source.read_text().splitlines())
        config = make_config(tmp_path / "out")
        config = replace(config, executor=replace(config.executor, shards_in_flight=2))
        report = run_on_dask([source], config, client=client, on_shard=kill_a_busy_worker)
    assert killed
    rows = manifest(tmp_path / "out")
    assert len(rows) == total == report.urls and report.skipped == 0
    assert Counter(r["status"] for r in rows.values()) == {"ok": total - 2, "failed": 2}
    for row in rows.values():
        if row["status"] == "ok":
            assert (tmp_path / "out" / row["path"]).stat().st_size > 0


def test_a_daemonic_worker_is_told_how_to_start_workers(tmp_path):
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_try_pools, args=(str(tmp_path), answers), daemon=True)
    child.start()
    message = answers.get(timeout=30)
    child.join(30)
    assert message == DAEMON_HELP


def _try_pools(out: str, answers) -> None:
    try:
        shard = [ShardEnd("00000-000000001", 0)]
        run_shard(shard, make_config(Path(out)), out)
        answers.put("no error")
    except PipelineError as err:
        answers.put(str(err))


def test_without_dask_the_message_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(PipelineError) as err, connect(make_config(Path("x"))):
        pass
    assert str(err.value) == install_hint("distributed", "dask", "the dask executor")


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"kind": "spark"}, "executor.kind"),
        ({"address": "http://127.0.0.1:8786"}, "executor.address"),
        ({"shards_in_flight": -1}, "executor.shards_in_flight"),
        ({"retries": 99}, "executor.retries"),
    ],
)
def test_executor_settings_are_validated(table, key):
    with pytest.raises(ConfigError) as err:
        parse_config({"executor": table})
    assert str(err.value).startswith(key)


def test_a_bad_dask_address_is_a_one_line_error(tmp_path):
    from test_cli import assert_one_line_error, pipeline

    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    result = pipeline("run", str(tmp_path / "urls.txt"), "--dask", "http://127.0.0.1:8786")
    assert_one_line_error(result, "executor.address", "http://127.0.0.1:8786")


def test_the_shards_filtered_counts_are_merged():
    def shard(name: str, filtered: dict[str, int]) -> ShardResult:
        report = Report(urls=3, ok=1, failed={"dns": 1}, wall_s=1.0, bytes_in=0, bytes_out=0,
                        filtered=filtered)  # fmt: skip
        return ShardResult(name, report, {}, {})

    results = [shard("a", {"too_small": 1}), shard("b", {"too_small": 1, "aspect_ratio": 1})]
    merged = merge(results, 1.0, skipped=0, cluster_workers=1)
    assert merged.filtered == {"too_small": 2, "aspect_ratio": 1} and merged.urls == 6


@pytest.mark.parametrize("answer", ["garbage", "nothing"])
def test_a_port_that_is_not_a_scheduler_is_one_line_within_the_timeout(tmp_path, answer, server):
    """An HTTP server answers bytes Dask reads as a frame of exabytes; a listener that never
    accepts leaves Dask's handshake waiting forever: either way, one line within the timeout."""
    from test_cli import assert_one_line_error

    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts, nobody reads
        port = server.port if answer == "garbage" else silent.getsockname()[1]
        address = f"tcp://127.0.0.1:{port}"
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "urls.txt", "--dask", address],
            cwd=tmp_path, capture_output=True, text=True, timeout=60,
            env={**os.environ, "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "1s"},
        )  # fmt: skip
        took = time.monotonic() - started
    assert_one_line_error(result, "executor.address", address)
    assert took < 15, f"{took:.1f} s"
    assert not (tmp_path / "out" / "report.json").exists()
