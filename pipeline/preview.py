"""``pipeline run --dry-run`` and ``pipeline init``: what a run would do; a config to start from.

A dry run reads the config and every input file once, checks them against what earlier runs
recorded in the output folder (the same checks a run makes, so a changed line is refused here too;
what the check counts is what is printed for the files it read), and prints what would run: each
file with its lines and shards, what a resume would skip, and the run's shape on this machine
(shape.py: lanes, threads, workers, what a lane holds at most). It fetches nothing and writes
nothing, not even the output folder; an output in a store is only read (its state, into a
temporary folder), and named as the user gave it, redacted.
"""

from __future__ import annotations

import importlib.resources
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .config import Config
from .errors import PipelineError, UnreadableSource
from .inputs import Findings
from .mirror import check_restart, pull_state
from .objects import output_of
from .records import ShardEnd
from .resume import Plan, Tally, plan_run, unreadable
from .shape import shape_of
from .sources import Known, Source, shard_records
from .storage import Location


def dry_run(sources: Sequence[Path | Location], config: Config, *, restart: bool) -> list[str]:
    """The lines a dry run prints."""
    output = output_of(config.output)
    if isinstance(output, Path):
        return _lines(
            plan_run(sources, config, output, restart=restart, record=False), config, restart
        )
    if restart:
        check_restart(output)  # refused as a run would be; nothing is deleted
    with tempfile.TemporaryDirectory(prefix="pipeline-dry-run-") as folder:  # read, not written
        pull_state(output, Path(folder))
        plan = plan_run(sources, config, Path(folder), restart=restart, record=False, store=output)
        return _lines(plan, config, restart)


def _lines(plan: Plan, config: Config, restart: bool) -> list[str]:
    out_dir = plan.where
    lines = [f"dry run     nothing is fetched or written (output: {out_dir})"]
    total = shards = 0
    for source in plan.sources:
        count, ends, failed = _count(source, config, plan)
        total, shards = total + count, shards + ends
        label = "sources" if len(lines) == 1 else ""
        kind = f"{source.format}, {source.compression}" if source.compression else source.format
        lines.append(f"{label:<12}{source.name} ({kind}): {_n(count, 'line')}, "
                     f"{_n(ends, 'shard')}{failed}")  # fmt: skip
    files = len(plan.sources)
    lines.extend(f"{'warning':<12}{warning}" for warning in plan.findings.lines())
    if plan.findings.unreadable:
        lines.append(f"{'unreadable':<12}{unreadable(plan.findings)}: a run reads the others, "
                     "then exits with this error")  # fmt: skip
    lines.append(f"{'total':<12}{_n(total, 'URL')} in {_n(files, 'file')}, {_n(shards, 'shard')}")
    summary = plan.summary()
    if restart:
        lines.append(f"{'resume':<12}--restart: everything in {out_dir} would be redone")
    elif summary:
        lines.append(f"{'resume':<12}{summary}")
    else:
        lines.append(f"{'resume':<12}a first run into {out_dir}: every line is to do")
    processes, bounds = shape_of(config).describe()
    output = f"{config.output.format} of {config.transform.format}"
    lines.extend([f"{'settings':<12}{processes}, {output}", f"{'bounds':<12}{bounds}"])
    return lines


def _count(source: Source, config: Config, plan: Plan) -> tuple[int, int, str]:
    """A file's records and shards, and how many records have no usable URL (failed rows): as
    the resume check counted them, or (a file new to the output folder) read now."""
    tally = plan.tallies.get(source.id)
    if tally is None:
        tally = _tally(source, config, plan.known.get(source.id, ()), plan.findings)
    failed = tally.no_url
    return (
        tally.lines,
        tally.shards,
        f" ({failed} with no usable URL: failed rows)" if failed else "",
    )


def _tally(source: Source, config: Config, known: Sequence[Known], findings: Findings) -> Tally:
    tally = Tally()
    shards = shard_records(
        source, config.input.shard_size, config.input.url_column, known, findings
    )
    try:
        for item in shards:
            if isinstance(item, ShardEnd):
                tally.shards += 1
            else:
                tally.lines += 1
                tally.no_url += item[0].problem is not None
    except UnreadableSource as exc:
        findings.failed(str(exc))
    return tally


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' * (count != 1)}"


def write_default_config(folder: Path, *, force: bool) -> Path:
    """``folder/config.toml``: the commented defaults, as shipped. Refuses to overwrite one."""
    target = folder / "config.toml"
    if target.exists() and not force:
        raise PipelineError(f"{target}: exists already; --force replaces it")
    text = (importlib.resources.files("pipeline.samples") / "config.toml").read_text("utf-8")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"{target}: cannot write it: {exc.strerror}") from None
    return target
