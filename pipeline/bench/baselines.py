"""The textbook ways to do the same job, for ``pipeline bench --compare`` to set beside ours.

Each strategy downloads every URL with the pipeline's own ``Downloader`` and transforms it with the
same ``transform_bytes`` and writes the same files, so that only the way the work is scheduled
differs:

    sequential   one thread: download, transform, write, next URL
    threads      download.workers threads, each doing all three steps (transforms share one GIL)
    processes    one process per core, each doing all three steps (downloads block a core's worth)
    two-phase    download everything with threads into memory, then ``Pool.map`` the transforms:
                 no overlap between the phases, and every body held in memory at once

Run as ``python -m pipeline.bench.baselines STRATEGY URLS --config FILE --out DIR``, in a
process of its own so that its peak memory is its own; prints one JSON line: the counts, the wall
time, and for two-phase the time of each phase (each stage run alone, for the overlap figure).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..config import Config, load_config
from ..download import Downloader
from ..errors import ItemError
from ..layout import output_file
from ..records import Fetched, Job
from ..shape import shape_of
from ..sources import Source, iter_jobs
from ..transform import EXTENSIONS, transform_bytes

STRATEGIES = ("sequential", "threads", "processes", "two-phase")

_config: Config | None = None
_out: Path | None = None
_downloader: Downloader | None = None


def _init(config: Config, out: Path) -> None:
    global _config, _out, _downloader
    _config, _out, _downloader = config, out, Downloader(config.download)


def _jobs(urls: Path, config: Config) -> Iterator[Job]:
    for item in iter_jobs(
        [Source(urls, urls.name)], config.input.shard_size, config.input.url_column
    ):
        if isinstance(item, Job):
            yield item


def _download(job: Job) -> Fetched | None:
    assert _downloader is not None
    try:
        return _downloader.fetch(job)
    except ItemError:
        return None


def _transform(fetched: Fetched | None) -> bool:
    assert _config is not None and _out is not None
    if fetched is None:
        return False
    try:
        encoded = transform_bytes(fetched.body, _config.transform)
    except ItemError:
        return False
    ext = EXTENSIONS[_config.transform.format]
    job = fetched.job
    path = _out / output_file(job.file, job.line, job.url, ext, _config.output.folder_size)
    write_atomic(path, encoded.data, root=_out)
    return True


def _both(job: Job) -> bool:
    return _transform(_download(job))


def _pool(config: Config, out: Path, workers: int) -> Any:
    context = multiprocessing.get_context(config.transform.start_method)
    return context.Pool(workers, initializer=_init, initargs=(config, out))


def sequential(urls: Path, config: Config, out: Path) -> dict[str, Any]:
    _init(config, out)
    return {"ok": sum(map(_both, _jobs(urls, config)))}


def threads(urls: Path, config: Config, out: Path) -> dict[str, Any]:
    _init(config, out)
    with ThreadPoolExecutor(config.download.workers) as pool:
        return {"ok": sum(pool.map(_both, _jobs(urls, config)))}


def processes(urls: Path, config: Config, out: Path) -> dict[str, Any]:
    with _pool(config, out, shape_of(config).workers) as pool:
        return {"ok": sum(pool.imap_unordered(_both, _jobs(urls, config), chunksize=4))}


def two_phase(urls: Path, config: Config, out: Path) -> dict[str, Any]:
    _init(config, out)
    started = time.perf_counter()
    with ThreadPoolExecutor(config.download.workers) as threads:
        bodies = list(threads.map(_download, _jobs(urls, config)))
    downloaded = time.perf_counter()
    with _pool(config, out, shape_of(config).workers) as pool:
        ok = sum(pool.map(_transform, bodies, chunksize=8))
    return {
        "ok": ok,
        "download_s": round(downloaded - started, 3),
        "transform_s": round(time.perf_counter() - downloaded, 3),
    }


RUNNERS: dict[str, Callable[[Path, Config, Path], dict[str, Any]]] = {
    "sequential": sequential,
    "threads": threads,
    "processes": processes,
    "two-phase": two_phase,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.baselines")
    parser.add_argument("strategy", choices=STRATEGIES)
    parser.add_argument("urls", type=Path)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    config = load_config(args.config)
    started = time.perf_counter()
    result = RUNNERS[args.strategy](args.urls, config, args.out)
    result["wall_s"] = round(time.perf_counter() - started, 3)
    print(json.dumps(result))  # noqa: T201 - the result, for the benchmark that started us
    return 0


if __name__ == "__main__":
    sys.exit(main())
