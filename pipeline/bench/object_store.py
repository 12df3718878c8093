"""W1 into a local S3-compatible server against W1 into a local folder; what output.uploads does.

    python -m pipeline.bench.object_store [--images 2000] [--uploads 4 16] [--transform-workers 2]
                                          [--format files|webdataset]

Serves the bench workload (pipeline.bench.workload) on loopback and starts moto's S3 server on
127.0.0.1 in this process (its CPU competes with the run's: on a small machine the store run
pays for the server too). Runs ``pipeline run`` once into a local folder, then once into
``s3://bench/run-N`` per ``output.uploads`` value, and prints, for each: images/s (ok images
over the command's wall time), the process tree's peak RSS, and the coordinator's CPU per image
(the report's parent_cpu_s: the sink, and with a store its seals' puts and the lock's renewals;
the images are put by the lanes, whose CPU per image is printed beside it), and the S3
server's CPU per image (this process's, which is mostly the server's). ``--format webdataset``
puts a tar per ``output.shard_size`` samples (from the packer) instead of an object per image.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from pipeline.bench.sweep import measure
from pipeline.bench.workload import Workload, WorkloadServer
from pipeline.report import Report, load_report

CACHE = Path.home() / ".cache" / "pipeline" / "workload"


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--uploads", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--transform-workers", type=int, default=2)
    parser.add_argument("--format", choices=("files", "webdataset"), default="files")
    args = parser.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request costs this CPU
    store = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    store.start()
    _, port = store.get_host_and_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")  # fmt: skip
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    workload = Workload(CACHE)
    try:
        with WorkloadServer(workload.make()) as server, tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch)
            urls = folder / "urls.txt"
            workload.write_urls(urls, server.url, args.images)
            targets = [("local folder", str(folder / "out"), 0)] + [
                (f"s3, uploads = {n}", f"s3://bench/run-{n}", n) for n in args.uploads
            ]
            say(f"{'target':<20}{'images/s':>10}{'peak RSS MB':>13}{'coord. ms/img':>15}"
                f"{'lanes ms/img':>14}{'server ms/img':>15}")  # fmt: skip
            for label, out, uploads in targets:
                config = folder / f"{uploads}.toml"
                extra = f"uploads = {uploads}\n" if uploads else ""
                config.write_text(f'[output]\ndir = "{out}"\nformat = "{args.format}"\n{extra}')
                run = [sys.executable, "-m", "pipeline", "run", str(urls), "--config", str(config),
                       "--transform-workers", str(args.transform_workers), "-qq"]  # fmt: skip
                cpu = time.process_time()  # this process's: the S3 server's threads, mostly
                measured = measure(run)
                cpu = time.process_time() - cpu
                if uploads:
                    data = fs.cat_file(f"{out.removeprefix('s3://')}/report.json")
                    report = Report.from_json(json.loads(data))
                else:
                    found = load_report(Path(out))
                    assert found is not None
                    report = found
                ok = max(1, report.ok)
                rate = report.ok / measured.wall_s
                coordinator = 1000 * (report.parent_cpu_s or 0) / ok
                lanes = 1000 * (report.lane_cpu_s or 0) / ok
                peak = measured.peak_bytes / 1e6
                served = 1000 * cpu / ok if uploads else 0.0
                say(f"{label:<20}{rate:>10.1f}{peak:>13.0f}{coordinator:>15.2f}{lanes:>14.2f}"
                    f"{served:>15.2f}")  # fmt: skip
    finally:
        store.stop()


if __name__ == "__main__":
    main()
