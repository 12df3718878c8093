"""The report: stage figures, the bottleneck verdict, report.json, and reading a run back."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from pipeline.errors import PipelineError
from pipeline.metrics import Stage
from pipeline.records import Outcome
from pipeline.report import (
    QueueStat,
    Report,
    StageStat,
    count_manifest,
    diagnose,
    format_folder,
    format_report,
    load_report,
)
from pipeline.sink import Sink

CORES = os.cpu_count() or 1


def stage(name: str, utilization: float, workers: int = 4, items: int = 100) -> StageStat:
    return StageStat(name, workers, items, 0, 0, 0, 1.0, 1.0, utilization, 1.0, 2.0, 3.0)


def report(download: float, transform: float, *, fetched_mean: float = 0.0,
           workers: int = 1, parent_cpu: float = 0.1) -> Report:  # fmt: skip
    return Report(
        urls=100, ok=100, failed={}, wall_s=1.0, bytes_in=0, bytes_out=0,
        stages=(stage("download", download, 16), stage("transform", transform, workers),
                stage("write", 1.0, 1)),
        queues=(QueueStat("fetched", 32, 32, fetched_mean),), parent_cpu_s=parent_cpu,
    )  # fmt: skip


def test_stage_figures_from_a_meter_stay_within_bounds():
    s = Stage("transform", workers=2)
    meter = s.meter()
    for i in range(10):  # 10 items of 0.5 s: 2.5 s of work for each of the 2 workers
        meter.record(0.5, end=1.0 + i * 0.2)
    figures = StageStat.of(s, ended=5.5)  # 5 s from the first item's start
    assert figures.items == 10 and figures.active_s == pytest.approx(2.3)
    assert figures.utilization == pytest.approx(50)
    assert figures.rate == pytest.approx(10 / 2.3)
    assert figures.p50_ms == pytest.approx(500, rel=0.03)
    assert StageStat.of(s, ended=2.5).utilization == 100  # timing noise never passes 100%
    idle = StageStat.of(Stage("write", workers=1), ended=1.0)
    assert (idle.items, idle.utilization, idle.rate) == (0, 0.0, 0.0)


def test_busy_transforms_and_a_full_queue_name_transform():
    verdict = diagnose(report(download=20, transform=95, fetched_mean=30))
    assert verdict.stage == "transform" and "transform" in verdict.advice
    assert diagnose(report(download=30, transform=60, fetched_mean=31)).stage == "transform"


def test_the_advice_for_transform_depends_on_the_cores_left():
    spare = diagnose(report(download=20, transform=95, workers=max(1, CORES - 1)))
    full = diagnose(report(download=20, transform=95, workers=CORES))
    if CORES > 1:
        assert "add transform workers" in spare.advice
    assert "cheaper ops" in full.advice and "add transform workers" not in full.advice


def test_busy_downloads_and_an_empty_queue_name_download():
    verdict = diagnose(report(download=97, transform=15, fetched_mean=0.1))
    assert verdict.stage == "download" and "download.workers" in verdict.advice


def test_a_saturated_coordinator_or_lane_is_named():
    assert diagnose(report(download=60, transform=50, parent_cpu=0.97)).stage == "coordinator"
    lanes = replace(report(download=60, transform=50), lanes=3, lane_cpu_s=2.0, lane_cpu_max_s=0.9)
    verdict = diagnose(lanes)
    assert verdict.stage == "lane" and "executor.lanes, now 3" in verdict.advice
    calm = replace(lanes, lane_cpu_max_s=0.5)
    assert diagnose(calm).stage == "none"


def test_no_verdict_without_a_saturated_stage_or_enough_urls():
    assert diagnose(report(download=30, transform=40, fetched_mean=5)).stage == "none"
    assert diagnose(replace(report(download=99, transform=1), urls=3)).stage == "none"


def test_report_json_round_trips(tmp_path):
    (tmp_path / "manifest").mkdir()
    original = replace(report(download=97, transform=15), failed={"http_4xx": 2},
                       failing_hosts=(("a.test", 2),), interrupted="SIGINT",
                       filtered={"too_small": 3})  # fmt: skip
    original = replace(original, verdict=diagnose(original))
    original.save(tmp_path)
    assert load_report(tmp_path) == original
    text = format_report(original)
    for needle in ("download", "transform", "write", "fetched", "http_4xx", "a.test", "SIGINT"):
        assert needle in text


def outcome(index: int, status: str = "ok", kind: str | None = None) -> Outcome:
    host = "bad.test" if status == "failed" else "good.test"
    return Outcome(f"00000-{index:09d}", "00000-000000001", "a.txt", index,
                   f"http://{host}/{index}", status,  # type: ignore[arg-type]
                   error_kind=kind, bytes_in=10)  # fmt: skip


def test_the_manifest_is_counted_whole_and_bad_folders_are_refused(tmp_path):
    with Sink(tmp_path) as sink:
        for i in range(5):
            sink.add(outcome(i))
        sink.add(outcome(5, "failed", "not_image"))
        sink.add(outcome(6, "failed", "not_image"))
        sink.add(outcome(7, "filtered", "aspect_ratio"))
    stats = count_manifest(tmp_path)
    assert (stats.urls, stats.ok, dict(stats.failed), stats.bytes_in) == (
        8,
        5,
        {"not_image": 2},
        80,
    )
    text = format_folder(stats)
    assert "8 URLs recorded: 5 ok, 2 failed, 1 filtered" in text and "bad.test" in text
    assert "filtered    1 left out by the filters: aspect_ratio 1" in text and "not_image" in text
    assert load_report(tmp_path) is None  # no run finished here
    (tmp_path / "report.json").write_text("{broken")
    with pytest.raises(PipelineError, match=r"report\.json"):
        load_report(tmp_path)
    with pytest.raises(PipelineError, match="not an output folder"):
        load_report(tmp_path / "elsewhere")
    assert json.loads(json.dumps(report(1, 1).to_json()))["images_per_s"] == 100.0


def test_the_report_fits_80_columns_with_every_line_it_can_have():
    big = StageStat("transform", 512, 9_999_999, 999_999, 10**12, 10**12, 99999.9, 100.0,
                    100.0, 99999.9, 99999.9, 99999.9)  # fmt: skip
    full = replace(
        report(95.0, 99.0, fetched_mean=30.0, workers=2),
        stages=(big, stage("download", 50.0, 1024), stage("write", 1.0, 1)),
        resume="1000000 URLs done by earlier runs (100 shards sealed); to do: 3 in "
        "a-file-with-a-rather-long-name.csv from line 1000001, another-long-name.jsonl (new)",
        interrupted="SIGTERM",
        failing_hosts=(("a-very-long-host-name.images.example-cdn.test", 10),),
        failed={"decompression_bomb": 10},
        filtered={"too_small": 10**6, "aspect_ratio": 10**6},
        stragglers={"count": 1000, "after_s": 2.0, "median_s": 10.2, "longest_s": 60.0,
                    "peak": 128, "capped": 77,
                    "hosts": [["slow-host-number-one.test", 500], ["two.test", 3]]},
        lanes=5, lane_cpu_s=1234.5, pool_restarts=3, lane_restarts=2,
    )  # fmt: skip
    full = replace(full, verdict=diagnose(full))
    text = format_report(full)
    assert full.verdict is not None and len(full.verdict.advice) > 79  # it had to wrap
    assert "stragglers  1000 downloads over 2 s" in text
    assert "filtered    2000000 left out by the filters: too_small 1000000, aspect_ratio" in text
    for line in text.splitlines():
        assert len(line) <= 79, line


def test_hosts_and_names_from_the_input_are_printed_escaped():
    hostile = replace(
        report(10.0, 10.0),
        failing_hosts=(("evil\x1b[2J.test", 3),),
        resume="1 URLs done by earlier runs; to do: 1 in a\rb.txt from line 2",
        failed={"dns": 3},
        stragglers={"count": 1, "after_s": 2.0, "median_s": 3.0, "longest_s": 3.0, "peak": 1,
                    "hosts": [["slow\x07.test", 1]]},
    )  # fmt: skip
    text = format_report(hostile)
    assert "evil\\x1b[2J.test" in text and "slow\\x07.test" in text and "a\\rb.txt" in text
    assert not any(c in text for c in "\x1b\x07\r")
