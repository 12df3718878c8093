"""The command line: ``pipeline run | init | demo | report | bench | serve``. The only module
that parses arguments. ``pipeline.bench`` (the demo, the servers, the sweep) is imported only by
the commands that use it, so a run's start-up does not pay for it.

Exit status: 0 when the run completed (failed URLs are records, not errors), 2 for a user error
(bad config, unreadable source) printed as one line, 130 on Ctrl-C (SIGINT), 143 on SIGTERM,
1 for an internal error. Rerunning an interrupted command resumes it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .config import Config, load_config, with_overrides
from .errors import PipelineError, limit_hint, require
from .layout import MANIFEST, REPORT, REPORTS, OutputLayout
from .logs import configure, printable
from .mirror import pull_reports
from .objects import ObjectStore, output_of
from .preview import dry_run, write_default_config
from .progress import terminal
from .report import (
    Report,
    count_manifest,
    fit,
    format_folder,
    format_history,
    format_report,
    load_history,
    load_report,
)
from .runner import run
from .shape import available_cores, shape_of
from .storage import parse_location

if TYPE_CHECKING:
    from .bench.sweep import Choice

log = logging.getLogger("pipeline")
DEFAULT_CONFIG = Path("config.toml")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _setup_logging(args)
        return int(args.command(args))
    except PipelineError as err:
        print(f"pipeline: error: {printable(str(err))}", file=sys.stderr)  # may quote an input
        return 2
    except KeyboardInterrupt:
        print("pipeline: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pipeline report out | head`: the reader has seen enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141
    except OSError as err:  # the machine's, not ours: a path we cannot use, a limit reached
        log.debug("OS error", exc_info=True)
        where = f"{printable(str(err.filename))}: " if err.filename else ""
        print(f"pipeline: error: {where}{err.strerror or err}{limit_hint(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # a bug: one line for the user, the traceback with -v
        log.debug("internal error", exc_info=True)
        print(
            f"pipeline: internal error: {type(err).__name__}: {printable(str(err))} "
            "(run with -v for details)",
            file=sys.stderr,
        )
        return 1


def _run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.dask is not None:
        config = with_overrides(config, "executor", kind="dask", address=args.dask)
    output_of(config.output)  # a URL: checked (scheme, package, store), one line
    options = config.input.storage_options
    sources = [parse_location(text, options, what="input") for text in args.sources]
    if args.dry_run:
        print(
            "\n".join(
                fit(printable(line)) for line in dry_run(sources, config, restart=args.restart)
            )
        )
        return 0
    if config.executor.kind == "dask":
        from .cluster import run_on_dask  # only then: it imports dask

        report = run_on_dask(sources, config, restart=args.restart, progress=_bars(args))
    else:
        try:
            report = run(
                sources,
                config,
                progress=_bars(args),
                restart=args.restart,
                handle_signals=True,
                say=_say if _bars(args) else None,  # above the bars; the report repeats it
            )
        except PipelineError as err:
            if err.report is not None:  # the run did its work: what it did, then the line
                _print_report(err.report, config, args)
            raise
    _print_report(report, config, args)
    return _exit_status(report)


def _init(args: argparse.Namespace) -> int:
    target = write_default_config(args.folder, force=args.force)
    print(f"wrote {target}: every setting, commented, with its default")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .bench.demo import SAMPLES, run_demo

    config = _config(args)
    report = run_demo(config, args.images or SAMPLES, progress=_bars(args))
    _print_report(report, config, args)
    return _exit_status(report)


def _report(args: argparse.Namespace) -> int:
    where = parse_location(args.folder, what="report")
    if isinstance(where, Path):
        _print_folder(where)
        return 0
    store = ObjectStore.check(where)  # its reports and rows, read into a temporary folder
    with tempfile.TemporaryDirectory(prefix="pipeline-report-") as folder:
        pull_reports(store, Path(folder))
        _print_folder(Path(folder))
    return 0


def _print_folder(folder: Path) -> None:
    report = load_report(folder)
    if report is not None:
        print(format_report(report) + "\n")
    print(format_folder(count_manifest(folder)))  # every run's rows, from the manifest
    history = load_history(folder)
    if history:
        print(format_history(history))


def _bench(args: argparse.Namespace) -> int:
    require("tomlkit", "bench", "pipeline bench")  # it writes each run's config file with it
    from .bench import sweep as bench

    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    if args.write_config and path is None:
        raise PipelineError("--write-config needs a config file (--config, or ./config.toml)")
    if args.plot:
        require("matplotlib", "plot", "--plot")  # before the sweep, not after it
    options = bench.BenchOptions(
        config_path=path,
        images=args.images,
        min_px=args.size[0],
        max_px=args.size[1],
        latency=args.latency / 1000,
        bandwidth=args.bandwidth * 1e6,
        server_cores=args.server_cores,
        **({"cache": args.cache} if args.cache else {}),
    )
    if args.compare and any(
        len(v or ()) > 1 for v in (args.download_workers, args.transform_workers, args.lanes)
    ):
        raise PipelineError(
            "--compare runs one setting: give one --download-workers, --transform-workers "
            "and --lanes value"
        )

    def show(line: str) -> None:  # rows as they come; --json prints once, at the end
        if not args.json:
            print(line, flush=True)

    with bench.Bench(options) as b:
        show(
            f"workload    {args.images} JPEGs of {options.min_px}-{options.max_px} px, "
            f"{b.workload.mean_bytes() / 1e3:.0f} KB on average, served on loopback"
            + (f" with {args.latency:g} ms latency" if args.latency else "")
            + (f" at {args.bandwidth:g} MB/s per connection" if args.bandwidth else "")
        )
        result: dict[str, object] = {
            "images": args.images,
            "latency_ms": args.latency,
            "repeat": args.repeat,
        }
        if args.compare:
            shape = shape_of(b.config)
            workers = bench.Setting(
                (args.download_workers or [b.config.download.workers])[0],
                (args.transform_workers or [shape.workers])[0],
                lanes=(args.lanes or [len(shape.lanes)])[0],
            )
            show(
                f"workers     {workers.lanes} lane(s) of {workers.download_workers} download "
                f"threads, {workers.transform_workers} transform processes in all (the "
                "baselines: the same threads and processes in one process)"
            )
            show("\n" + bench.header(sweep_table=False))
            seen: list[bench.Row] = []

            def shown(row: bench.Row) -> None:  # sequential runs first: the others' ratio
                seen.append(row)
                show(bench.format_row(row, False, seen[0]))

            rows = bench.compare(b, workers, args.repeat, shown)
            result["compare"] = [r.to_json() for r in rows]
            both = bench.overlap(rows)
            if both is not None:
                result["overlap"] = {
                    **asdict(both),
                    "ratio": round(both.ratio, 3),
                    "floor_s": round(both.floor_s, 3),
                    "floor_ratio": round(both.floor_ratio, 3),
                }
                show(
                    f"\noverlap     staged {both.staged_s:.2f} s against {both.stage} alone "
                    f"{both.alone_s:.2f} s (two-phase's {both.stage} phase): {both.ratio:.2f}x"
                )
                if both.stage == "transform":
                    show(
                        f"            with the coordinator's and lanes' CPU ({both.shared_s:.2f} s "
                        f"a core) taken from the same cores, the floor is {both.floor_s:.2f} s: "
                        f"{both.floor_ratio:.2f}x"
                    )
        else:
            settings = bench.settings_of(
                args.download_workers or [8, 16, 32],
                args.transform_workers or bench.default_transform_workers(),
                args.queues,
                args.lanes,
            )
            show("\n" + bench.header(sweep_table=True))
            rows = bench.sweep(
                b, settings, args.repeat, lambda row: show(bench.format_row(row, True))
            )
            top = bench.best(rows)
            assert top.setting is not None
            result.update(sweep=[r.to_json() for r in rows], best=top.to_json())
            show(
                f"\nbest        download.workers = {top.setting.download_workers}, "
                f"transform.workers = {top.setting.transform_workers}"
                + (f", queues.fetched = {top.setting.queue}" if top.setting.queue else "")
                + (f", executor.lanes = {top.setting.lanes}" if top.setting.lanes else "")
                + f": {top.images_per_s:.1f} images/s"
            )
            if args.write_config:
                assert path is not None
                _write_winner(bench.choose(rows, available_cores()), path, result, show)
            if args.plot:
                bench.plot(rows, args.plot)
                show(f"plot        {args.plot}")
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _write_winner(
    choice: Choice, path: Path, result: dict[str, object], show: Callable[[str], None]
) -> None:
    """--write-config: the sweep's winner, only when it won beyond the noise."""
    from .bench import sweep as bench

    result["written"] = None if choice.setting is None else asdict(choice.setting)
    result["decision"] = choice.reason
    if choice.setting is None:
        show(f"written     nothing: no clear winner ({choice.reason}); {path} unchanged")
        return
    bench.write_config(path, choice.setting)
    auto = " (0: auto, one per core)" if choice.setting.transform_workers == 0 else ""
    show(
        f"written     into {path}: download.workers = {choice.setting.download_workers}, "
        f"transform.workers = {choice.setting.transform_workers}{auto} ({choice.reason})"
    )


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _bars(args: argparse.Namespace) -> bool:
    return not args.quiet and terminal()


def _exit_status(report: Report) -> int:
    """0 when the run completed; 128 + the signal number when a signal stopped it."""
    return 128 + signal.Signals[report.interrupted] if report.interrupted else 0


def _serve(args: argparse.Namespace) -> int:
    if not args.folder.is_dir():
        raise PipelineError(f"{args.folder}: no such folder")
    from .bench.faults import FaultServer
    from .bench.server import StaticServer

    server_class = FaultServer if args.faults else StaticServer
    with server_class(args.folder, args.port) as server:
        print(f"serving {args.folder} at {server.url()} (Ctrl-C to stop)", flush=True)
        if args.faults:
            print(f"faults at {server.url('_fault/')}ROUTE, e.g. status/503, drip/1, gzip-bomb")
        threading.Event().wait()
    return 0


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    config = load_config(path)
    if args.out is not None:
        config = with_overrides(config, "output", dir=str(args.out))
    if args.download_workers is not None:
        config = with_overrides(config, "download", workers=args.download_workers)
    if args.transform_workers is not None:
        config = with_overrides(config, "transform", workers=args.transform_workers)
    if getattr(args, "lanes", None) is not None:
        config = with_overrides(config, "executor", lanes=args.lanes)
    return config


def _print_report(report: Report, config: Config, args: argparse.Namespace) -> None:
    if args.quiet < 2:
        print(format_report(report))
        outputs = OutputLayout.of(config.output).outputs
        print(f"output      {config.output.dir} ({MANIFEST}/, {outputs}/, {REPORT}, {REPORTS}/)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Download image-URL lists with threads, transform them in a process pool.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run_cmd = commands.add_parser("run", help="download and transform every URL of the sources")
    run_cmd.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder of URL lists (.txt .csv .tsv .jsonl .parquet), or a file; "
        "or a URL of one in object storage (s3://bucket/urls/)",
    )
    _add_run_options(run_cmd)
    run_cmd.add_argument(
        "--restart", action="store_true", help="forget what earlier runs of --out did; start over"
    )
    run_cmd.add_argument(
        "--dask",
        metavar="ADDRESS",
        help='run each shard as a task of a Dask cluster: a scheduler (tcp://host:8786) or "local"',
    )
    run_cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="read the inputs and the config, say what would run (and what a resume skips); "
        "fetch and write nothing",
    )
    run_cmd.set_defaults(command=_run)

    init = commands.add_parser("init", help="write the commented default config.toml")
    init.add_argument("folder", nargs="?", type=Path, default=Path("."), metavar="DIR")
    init.add_argument("--force", action="store_true", help="replace a config.toml there")
    _add_verbosity(init)
    init.set_defaults(command=_init)

    demo = commands.add_parser("demo", help="serve the sample images on loopback and run on them")
    demo.add_argument(
        "--images",
        type=Path,
        help="folder of images to serve (default: the samples)",
    )
    _add_run_options(demo, default_out=Path("out/demo"))
    demo.set_defaults(command=_demo)

    report = commands.add_parser(
        "report", help="print the last run's report, the folder's totals and every run into it"
    )
    report.add_argument(
        "folder", metavar="OUT_DIR", help="the run's output folder, or its store (s3://...)"
    )
    _add_verbosity(report)
    report.set_defaults(command=_report)

    bench_cmd = commands.add_parser(
        "bench", help="measure throughput on a generated workload served on loopback"
    )
    bench_cmd.add_argument("--config", type=Path, help="config file (default: ./config.toml)")
    bench_cmd.add_argument(
        "--images", type=_positive, default=2000, help="URLs in the workload (default 2000)"
    )
    bench_cmd.add_argument(
        "--size",
        type=_size_range,
        default=(1024, 1600),
        metavar="MIN-MAX",
        help="long side of the workload's photos, in px (default 1024-1600)",
    )
    bench_cmd.add_argument(
        "--latency", type=_non_negative, default=0.0, help="ms before each answer (default 0)"
    )
    bench_cmd.add_argument(
        "--bandwidth",
        type=_non_negative,
        default=0.0,
        help="MB/s per connection (default 0: no cap)",
    )
    bench_cmd.add_argument(
        "--download-workers",
        type=_int_list,
        metavar="N,N,...",
        help="download.workers to try (default 8,16,32; --compare: one, config's)",
    )
    bench_cmd.add_argument(
        "--transform-workers",
        type=_int_list,
        metavar="N,N,...",
        help="transform.workers to try (default: half the cores, all; --compare: one, config's)",
    )
    bench_cmd.add_argument(
        "--queues", type=_int_list, metavar="N,N,...", help="queues.fetched sizes to try too"
    )
    bench_cmd.add_argument(
        "--lanes", type=_int_list, metavar="N,N,...", help="executor.lanes to try too"
    )
    bench_cmd.add_argument(
        "--server-cores",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="run the workload server on N cores of its own (N processes), the runs on the rest",
    )
    bench_cmd.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        help="runs of each setting; the median is shown (default 1)",
    )
    bench_cmd.add_argument(
        "--compare",
        action="store_true",
        help="run sequential, threads, processes, two-phase and the staged pipeline instead",
    )
    bench_cmd.add_argument(
        "--write-config", action="store_true", help="write the best setting into the config file"
    )
    bench_cmd.add_argument("--plot", type=Path, metavar="FILE.png", help="draw images/s by workers")
    bench_cmd.add_argument("--json", action="store_true", help="print the results as JSON only")
    bench_cmd.add_argument(
        "--cache", type=Path, help="folder for the workload's images (default ~/.cache/pipeline)"
    )
    _add_verbosity(bench_cmd)
    bench_cmd.set_defaults(command=_bench)

    serve = commands.add_parser("serve", help="serve a folder over HTTP on 127.0.0.1")
    serve.add_argument("folder", type=Path, metavar="DIR")
    serve.add_argument(
        "--faults", action="store_true", help="also answer /_fault/... routes that misbehave"
    )
    serve.add_argument(
        "--port", type=_port, default=8000, help="port on 127.0.0.1 (default 8000, 0 = any free)"
    )
    _add_verbosity(serve)
    serve.set_defaults(command=_serve)
    return parser


def _add_run_options(cmd: argparse.ArgumentParser, default_out: Path | None = None) -> None:
    cmd.add_argument("--config", type=Path, help="config file (default: ./config.toml if present)")
    cmd.add_argument("--out", default=default_out, help="output folder (output.dir)")
    cmd.add_argument(
        "--download-workers", type=_positive, help="download threads (download.workers)"
    )
    cmd.add_argument(
        "--transform-workers", type=_positive, help="transform processes (transform.workers)"
    )
    cmd.add_argument(
        "--lanes",
        type=_positive,
        help="download processes, each with its threads and a share of the pool (executor.lanes)",
    )
    _add_verbosity(cmd)


def _add_verbosity(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "-v", "--verbose", action="count", default=0, help="more of pipeline's own log output"
    )
    cmd.add_argument(
        "--debug-libs",
        action="store_true",
        help="-v/-vv also for the libraries' loggers (urllib3, PIL, ...)",
    )
    cmd.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=0,
        help="no progress bars (-qq: no report, no warnings)",
    )
    cmd.add_argument(
        "--log-file", type=Path, help="also append log lines to this file (INFO, or DEBUG with -vv)"
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive(text)


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (got {text})")
    return value


def _size_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    sizes = (_positive(low), _positive(high)) if sep else (_positive(text),) * 2
    if not 16 <= sizes[0] <= sizes[1] <= 10000:
        raise argparse.ArgumentTypeError(
            f"must be MIN-MAX with 16 <= MIN <= MAX <= 10000 (got {text})"
        )
    return sizes


def _int_list(text: str) -> list[int]:
    return sorted({_positive(part.strip()) for part in text.split(",")})


def _port(text: str) -> int:
    value = _positive(text) if text != "0" else 0
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be <= 65535 (got {value})")
    return value


def _setup_logging(args: argparse.Namespace) -> None:
    """-v: INFO, -vv: DEBUG; -q hides the bars only, -qq warnings too."""
    level = args.verbose - max(0, args.quiet - 1)
    levels = {-1: logging.ERROR, 0: logging.WARNING, 1: logging.INFO}
    chosen = levels.get(level, logging.DEBUG if level > 1 else logging.ERROR)
    log_file = args.log_file
    if log_file is not None:
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_file.open("a").close()
        except OSError as exc:
            raise PipelineError(f"{log_file}: cannot write the log file: {exc.strerror}") from None
    configure(chosen, None if log_file is None else str(log_file), debug_libraries=args.debug_libs)
