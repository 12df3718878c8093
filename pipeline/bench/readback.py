"""How fast a training job reads the output back: the files layout against webdataset shards.

    python -m pipeline.bench.readback [--samples 10000] [--config FILE]

Runs ``pipeline run`` twice on the same ``--samples`` URLs of the benchmark workload (served on
loopback): once with ``output.format = "files"``, once with ``"webdataset"``, otherwise the given
config (the defaults when none). Then reads every sample back, image bytes and its row, as a
training loader would: the files layout through its manifest (a row, then its file), the shards
with the ``webdataset`` package and with ``tarfile``. Each read is timed cold, after the outputs'
own pages are evicted from the page cache (as on a fresh machine or a dataset larger than
memory; the rest of the machine's cache is left alone, and no root is needed), and again warm.
Also prints each run's coordinator CPU per URL: the webdataset run packs the tars in the
coordinator, and that must stay small.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PipelineError, require
from ..formats import read_shards
from ..sink import read_manifest
from .workload import Workload, WorkloadServer


def run(folder: Path, layout: str, config: Path | None) -> dict[str, Any]:
    text = config.read_text() if config else ""
    toml = folder / f"{layout}.toml"
    toml.write_text(text + ("\n" if text else "") + f'[output]\nformat = "{layout}"\n')
    if "[output]" in text:  # one [output] table only: the layout is given on the command line
        raise SystemExit("--config must not have an [output] table (the layout is set here)")
    command = [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", layout, "-q"]
    done = subprocess.run(
        [*command, "--config", str(toml)], cwd=folder, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"the {layout} run failed: {done.stderr.strip()}")
    report: dict[str, Any] = json.loads((folder / layout / "report.json").read_text())
    return report


def read_files(out: Path) -> int:
    count = 0
    for row in read_manifest(out):
        if row["status"] == "ok":
            count += len((out / row["path"]).read_bytes()) > 0
    return count


def read_webdataset(out: Path) -> int:
    import webdataset as wds  # a test dependency, and what training jobs use

    dataset = wds.WebDataset([str(p) for p in read_shards(out)], shardshuffle=False)
    return sum(1 for sample in dataset if sample["jpg"] and json.loads(sample["json"]))


def read_tarfile(out: Path) -> int:
    count = 0
    for path in read_shards(out):
        with tarfile.open(path) as tar:
            for member in tar:
                file = tar.extractfile(member)
                count += member.name.endswith(".json") and file is not None and bool(file.read())
    return count


def evict(out: Path) -> int:
    """Drop the pages of every file under ``out`` from the page cache, written to disk first
    (what is read next comes from the disk); no other file's pages. Returns the files evicted."""
    count = 0
    for path in out.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        count += 1
    return count


def timed(read: Callable[[Path], int], out: Path, cold: bool) -> tuple[int, float]:
    if cold:
        evict(out)
    started = time.perf_counter()
    count = read(out)
    return count, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench.readback", description=__doc__)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--config", type=Path, default=None)
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pipeline"
    parser.add_argument("--cache", type=Path, default=cache)
    args = parser.parse_args(argv)
    try:  # before any work: the webdataset reader needs the package
        require("webdataset", "webdataset", "reading the shards back")
    except PipelineError as err:
        sys.stderr.write(f"readback: error: {err}\n")
        return 2
    workload = Workload(args.cache / "workload")
    say = sys.stdout.write
    with (
        tempfile.TemporaryDirectory(prefix="readback-") as tmp,
        WorkloadServer(workload.make()) as srv,
    ):
        folder = Path(tmp)
        workload.write_urls(folder / "urls.txt", srv.url, args.samples)
        for layout in ("files", "webdataset"):
            report = run(folder, layout, args.config)
            per_url = 1000 * report["parent_cpu_s"] / max(1, report["urls"])
            say(f"{layout:<11} written: {report['ok']} samples in {report['wall_s']:.1f} s, "
                f"coordinator {per_url:.3f} ms CPU per URL\n")  # fmt: skip
        readers = (
            ("files", read_files, folder / "files"),
            ("webdataset", read_webdataset, folder / "webdataset"),
            ("tarfile", read_tarfile, folder / "webdataset"),
        )
        for cold in (True, False):
            for name, read, out in readers:
                count, seconds = timed(read, out, cold)
                state = "cold" if cold else "warm"
                say(f"{name:<11} {state}: {count} samples in {seconds:.2f} s, "
                    f"{count / seconds:,.0f} samples/s\n")  # fmt: skip
        with contextlib.suppress(OSError):
            files = sum(1 for p in (folder / "files" / "images").rglob("*") if p.is_file())
            tars = len(list(read_shards(folder / "webdataset")))
            say(f"on disk     files: {files} image files; webdataset: {tars} tar shards\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
