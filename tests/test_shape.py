"""The run's shape: the lanes, each one's threads, workers and bounds, computed once."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from helpers import leftover_workers
from test_cli import ROOT, pipeline

from pipeline.config import (
    Config,
    DownloadConfig,
    ExecutorConfig,
    OutputConfig,
    QueuesConfig,
    Thumbnail,
    TransformConfig,
)
from pipeline.report import Report, format_report
from pipeline.runner import Coordinator, open_run
from pipeline.shape import BATCH, CHUNK, CORES_PER_LANE, available_cores, lane_count, shape_of


def config_of(workers: int = 0, lanes: int = 0, **transform: int) -> Config:
    return Config(
        transform=TransformConfig(workers=workers, **transform),
        executor=ExecutorConfig(lanes=lanes),
    )


@pytest.mark.parametrize(("cores", "lanes"), [(1, 1), (3, 1), (4, 2), (6, 2), (7, 3), (64, 22)])
def test_lanes_are_one_per_three_cores_when_auto(cores, lanes):
    assert CORES_PER_LANE == 3
    shape = shape_of(config_of(workers=64), cores=cores)
    assert len(shape.lanes) == lanes and shape.cores == cores
    assert [lane.index for lane in shape.lanes] == list(range(lanes))


def test_never_more_lanes_than_transform_workers():
    assert len(shape_of(config_of(workers=1), cores=12).lanes) == 1  # auto would give 4
    assert len(shape_of(config_of(workers=2, lanes=5), cores=1).lanes) == 2  # asked for 5
    assert all(lane.workers >= 1 for lane in shape_of(config_of(workers=3, lanes=8), 1).lanes)
    assert lane_count(0, 1, 12) == 1 and lane_count(0, 8, 12) == 4 and lane_count(3, 8, 1) == 3


def test_workers_are_shared_out_the_first_lanes_taking_the_remainder():
    shape = shape_of(config_of(workers=7, lanes=3), cores=1)
    assert [lane.workers for lane in shape.lanes] == [3, 2, 2]
    assert shape.workers == 7  # shared out, not multiplied
    even = shape_of(config_of(workers=8, lanes=4), cores=1)
    assert [lane.workers for lane in even.lanes] == [2, 2, 2, 2]


def test_auto_workers_are_one_per_core():
    shape = shape_of(config_of(workers=0), cores=5)
    assert shape.workers == 5 and len(shape.lanes) == 2
    assert shape_of(Config()).cores == available_cores()  # the machine's, by default
    assert shape_of(Config()).workers == available_cores()


def test_a_pool_holds_two_chunks_a_worker_by_default_as_the_docs_say():
    shape = shape_of(config_of(workers=5, lanes=2), cores=1)
    assert [lane.in_flight for lane in shape.lanes] == [2 * CHUNK * 3, 2 * CHUNK * 2]
    # config.toml and the README say what that comes to: 8 images per worker of a lane
    assert 2 * CHUNK == 8
    toml = " ".join((ROOT / "config.toml").read_text().split())
    assert "0 = 8 x the lane's workers" in toml
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "0 meaning 8 per worker of the lane" in readme


def test_the_credit_is_threads_stragglers_queue_pool_and_a_batch():
    config = Config(
        download=DownloadConfig(workers=10, max_stragglers=5),
        transform=TransformConfig(workers=2, max_in_flight=3),
        queues=QueuesConfig(fetched=7),
        executor=ExecutorConfig(lanes=1),
    )
    (lane,) = shape_of(config, cores=1).lanes
    assert lane.credit == 10 + 5 + 7 + 3 + BATCH


def test_explicit_values_are_honoured_in_every_lane():
    config = Config(
        download=DownloadConfig(workers=9, max_stragglers=0, max_buffered_bytes=30_000_000),
        transform=TransformConfig(workers=6, max_in_flight=5),
        queues=QueuesConfig(fetched=4, results=11),
        executor=ExecutorConfig(lanes=3),
    )
    shape = shape_of(config, cores=48)  # the cores change nothing set explicitly
    assert len(shape.lanes) == 3 and shape.threads == 27
    for lane in shape.lanes:
        assert (lane.threads, lane.stragglers, lane.workers, lane.in_flight) == (9, 0, 2, 5)
        assert (lane.fetched, lane.results, lane.buffered_bytes) == (4, 11, 30_000_000)


def test_the_shape_describes_itself_in_two_lines():
    config = Config(
        download=DownloadConfig(workers=7, max_buffered_bytes=300_000_000),
        transform=TransformConfig(workers=5),
        executor=ExecutorConfig(lanes=2),
    )
    processes, bounds = shape_of(config, cores=1).describe()
    assert processes == "2 lanes x 7 download threads and 3 or 2 transform workers"
    first, second = (7 + 128 + 32 + 2 * CHUNK * w + BATCH for w in (3, 2))
    assert bounds == (
        f"a lane's credit {first} or {second} jobs, its pool {2 * CHUNK * 3} or "
        f"{2 * CHUNK * 2} images, its bodies 300 MB"
    )
    one = dataclasses.replace(config, executor=ExecutorConfig(lanes=1))
    assert shape_of(one, cores=1).describe()[0] == (
        "1 lane x 7 download threads and 5 transform workers"
    )


def test_the_lanes_run_with_the_shape_they_are_given(tmp_path, server, image_dir):
    """The coordinator hands each lane its LaneShape: a lane whose pool may hold one image and
    whose queue one body never holds more, whatever the config would have given it."""
    names = sorted(p.name for p in image_dir.iterdir())[:12]
    (tmp_path / "urls.txt").write_text("".join(f"{server.url(n)}\n" for n in names))
    config = Config(
        output=OutputConfig(dir=str(tmp_path / "out")),
        download=DownloadConfig(workers=3),
        transform=TransformConfig(workers=1, ops=(Thumbnail(32, 32),)),
        executor=ExecutorConfig(lanes=1),
    )
    shape = shape_of(config, cores=1)
    assert shape.lanes[0].in_flight == 2 * CHUNK and shape.lanes[0].fetched == 32
    narrow = dataclasses.replace(shape.lanes[0], in_flight=1, fetched=1)
    shape = dataclasses.replace(shape, lanes=(narrow,))
    with open_run([tmp_path / "urls.txt"], config, restart=False) as plan:
        report = Coordinator(config, plan.out_dir, shape=shape).execute(plan, progress=False)
    assert report.ok == len(names)
    queues = {q.name: q for q in report.queues}
    assert (queues["pool"].bound, queues["fetched"].bound) == (1, 1)
    assert queues["pool"].peak == 1 and queues["fetched"].peak <= 1
    assert queues["jobs"].bound == narrow.credit
    assert report.shape == shape.describe()  # in report.json, and on the screen
    assert Report.from_json(json.loads(json.dumps(report.to_json()))).shape == report.shape
    shown = format_report(report)
    assert "shape       1 lane x 3 download threads and 1 transform workers" in shown
    assert f"a lane's credit {narrow.credit} jobs, its pool 1 images" in shown
    assert leftover_workers() == []


def test_a_dry_run_prints_the_shape(tmp_path, server):
    (tmp_path / "urls.txt").write_text(f"{server.url('img-000.jpg')}\n")
    (tmp_path / "config.toml").write_text(
        "[download]\nworkers = 7\nmax_buffered_bytes = 300000000\n"
        "[transform]\nworkers = 5\nmax_in_flight = 3\n[executor]\nlanes = 2\n"
    )
    dry = pipeline("run", "urls.txt", "--out", "out", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    said = re.sub(r"\s+", " ", dry.stdout)  # lines are fitted to 80 columns
    credit = 7 + 128 + 32 + 3 + BATCH  # max_in_flight holds per lane: every lane the same
    assert "settings 2 lanes x 7 download threads and 3 or 2 transform workers, files of jpeg" in (
        said
    )
    assert f"bounds a lane's credit {credit} jobs, its pool 3 images, its bodies 300 MB" in said
    assert not (tmp_path / "out").exists()
