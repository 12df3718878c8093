"""Lanes: several download processes, each with its own pool, dealt jobs by the coordinator.

Through the whole pipeline against a loopback server: every line is recorded once whatever
the number of lanes, a lane killed mid-run loses nothing and duplicates nothing, and no lane
or worker process outlives the run. A lane is sent its sections of the config, never the whole.
"""

from __future__ import annotations

import io
import os
import pickle
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from helpers import gated_handler, leftover_workers

import pipeline.budget
import pipeline.download
import pipeline.elastic
import pipeline.lane
import pipeline.mailbox
import pipeline.owner
import pipeline.transform
import pipeline.workers
from pipeline.bench.server import StaticServer
from pipeline.config import (
    Config,
    DownloadConfig,
    ExecutorConfig,
    InputConfig,
    Op,
    OutputConfig,
    Thumbnail,
    TransformConfig,
)
from pipeline.lanes import Lanes
from pipeline.logs import LogSetup
from pipeline.runner import Coordinator, open_run, run
from pipeline.shape import shape_of
from pipeline.sink import read_manifest


def make_config(out: Path, lanes: int, workers: int = 2, downloads: int = 3) -> Config:
    return Config(
        input=InputConfig(shard_size=40),
        output=OutputConfig(dir=str(out), folder_size=50),
        download=DownloadConfig(workers=downloads),
        transform=TransformConfig(workers=workers, ops=(Thumbnail(32, 32),)),
        executor=ExecutorConfig(lanes=lanes),
    )


def url_list(path: Path, server: StaticServer, image_dir: Path, copies: int) -> list[str]:
    names = sorted(p.name for p in image_dir.iterdir())
    urls = [f"{server.url(name)}?copy={c}" for c in range(copies) for name in names]
    urls.insert(7, server.url("missing.jpg"))
    path.write_text("".join(f"{u}\n" for u in urls))
    return urls


def rows_by_line(out: Path) -> dict[int, dict[str, Any]]:
    rows = list(read_manifest(out))
    lines = Counter(row["line"] for row in rows)
    assert not [line for line, n in lines.items() if n > 1], "a line recorded twice"
    return {row["line"]: row for row in rows}


@pytest.mark.parametrize("lanes", [1, 3])
def test_every_line_is_recorded_once_whatever_the_lanes(tmp_path, server, image_dir, lanes):
    urls = url_list(tmp_path / "urls.txt", server, image_dir, copies=3)
    report = run([tmp_path / "urls.txt"], make_config(tmp_path / "out", lanes, workers=3))
    rows = rows_by_line(tmp_path / "out")
    assert sorted(rows) == list(range(1, len(urls) + 1))
    assert [rows[i + 1]["url"] for i in range(len(urls))] == urls
    assert Counter(r["status"] for r in rows.values()) == {"ok": len(urls) - 1, "failed": 1}
    assert report.lanes == lanes and report.ok == len(urls) - 1
    assert report.lane_cpu_s > 0 and report.stage("download").workers == 3 * lanes
    assert report.stage("transform").workers == 3  # the pool is shared out, not multiplied
    assert leftover_workers() == []


def test_a_lane_killed_mid_run_loses_nothing_and_duplicates_nothing(tmp_path, image_dir):
    gated = gated_handler()
    out = tmp_path / "out"
    config = make_config(out, lanes=2, workers=2, downloads=3)
    with StaticServer(image_dir, handler=gated) as server:
        urls = url_list(tmp_path / "urls.txt", server, image_dir, copies=2)
        result: dict[str, Any] = {}
        with open_run([tmp_path / "urls.txt"], config, restart=False) as plan:
            coordinator = Coordinator(config, plan.out_dir)
            worker = threading.Thread(
                target=lambda: result.update(report=coordinator.execute(plan, progress=False))
            )
            worker.start()
            try:
                for _ in range(6):  # both lanes are downloading, each holding a credit of jobs
                    assert gated.arrived.acquire(timeout=60)
                victim = coordinator.lanes.running[0]
                held = len(victim.outstanding)
                os.kill(victim.process.pid, signal.SIGKILL)
            finally:
                gated.gate.set()
                worker.join(120)
    report = result["report"]
    assert held > 0 and report.lane_restarts == 1
    rows = rows_by_line(out)
    assert sorted(rows) == list(range(1, len(urls) + 1))  # nothing lost, nothing twice
    assert Counter(r["status"] for r in rows.values()) == {"ok": len(urls) - 1, "failed": 1}
    for row in rows.values():
        if row["status"] == "ok":
            assert (out / row["path"]).stat().st_size > 0
    assert not list(out.rglob("*.tmp")) and not list((out / "manifest").glob("*.part"))
    assert leftover_workers() == []


def test_a_resumed_run_with_other_lanes_does_only_what_is_missing(tmp_path, server, image_dir):
    urls = url_list(tmp_path / "urls.txt", server, image_dir, copies=2)
    out = tmp_path / "out"
    first = run([tmp_path / "urls.txt"], make_config(out, lanes=2))
    extra = [f"{server.url(p.name)}?extra=1" for p in sorted(image_dir.iterdir())[:5]]
    with (tmp_path / "urls.txt").open("a") as f:
        f.write("".join(f"{u}\n" for u in extra))
    again = run([tmp_path / "urls.txt"], make_config(out, lanes=1))
    assert (first.urls, again.urls, again.skipped) == (len(urls), len(extra), len(urls))
    rows = rows_by_line(out)
    assert sorted(rows) == list(range(1, len(urls) + len(extra) + 1))


def pickled_types(value: object) -> set[type]:
    """The type of every object that pickling ``value`` writes, however deeply it is nested."""
    seen: set[type] = set()

    class Recorder(pickle.Pickler):
        def persistent_id(self, obj: object) -> None:
            seen.add(type(obj))  # called for each object; None: pickle it as usual

    Recorder(io.BytesIO()).dump(value)
    return seen


def test_a_lane_is_sent_its_sections_of_the_config_not_the_whole(tmp_path):
    config = make_config(tmp_path / "out", lanes=2)
    lanes = Lanes(config, shape_of(config, cores=4), tmp_path / "out")
    try:
        setup = lanes.setup(1)
    finally:
        lanes.close()
    sent = {t for t in pickled_types(setup) if t.__module__ == "pipeline.config"}
    assert {t for t in sent if not issubclass(t, Op)} == {DownloadConfig, TransformConfig}
    assert Thumbnail in sent  # the recorder sees nested values: the op chain's, in the section
    worker = setup.worker  # what the lane was given is what the config says
    assert (setup.download, worker.config, setup.heartbeat) == (
        config.download,
        config.transform,
        config.executor.heartbeat,
    )
    assert (worker.out_dir, worker.layout.folder_size, setup.shape.index) == (
        str(tmp_path / "out"),
        50,
        1,
    )
    assert worker.log_setup == setup.log_setup == LogSetup.current()  # workers log as lanes do
    assert pickle.loads(pickle.dumps(setup)) == setup


@pytest.mark.parametrize(
    "module",
    [pipeline.lane, pipeline.owner, pipeline.workers, pipeline.transform, pipeline.download,
     pipeline.elastic, pipeline.mailbox, pipeline.budget],
)  # fmt: skip
def test_no_module_of_a_lane_knows_the_whole_config(module):
    assert "Config" not in vars(module)
