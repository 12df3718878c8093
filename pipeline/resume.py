"""Resume: what earlier runs into an output folder did, checked against the input as it is now.

    run.json                 the settings that decide keys and output bytes (a rerun must use the
                             same), the input root, and every input file seen, each with its id
    manifest/<S>.seal.json   a sealed shard: its file, the lines it covers, their fingerprint
    manifest/<S>.jsonl.part  a shard an interrupted run left open: its final rows are kept

``plan_run`` reads these and the input files, and decides what a run does:
  - a sealed shard whose lines are unchanged is skipped whole (its fingerprint is compared);
  - lines appended to a file, past its last shard, make new shards;
  - a new file gets a new id (the next free one), so no other file's keys or shards move;
  - a shard left open is adopted: its final rows are kept and only its other lines are done;
  - a file whose processed lines changed is refused, naming the file and the first changed line.
A file that earlier runs read but that is not given now keeps its rows; nothing is done for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

from .atomic import remove_entry, remove_inside, remove_temporaries, write_atomic
from .config import Config, OutputConfig
from .errors import PipelineError, SourceError, UnreadableSource, is_final
from .inputs import Findings, InputFile, find_files, input_root, relative_name, where
from .layout import IMAGES, MANIFEST, RUN, STAGING, OutputLayout, parse_key, parse_output
from .mirror import REMOVED, sealed_rows
from .objects import ObjectStore
from .records import Job, ShardEnd, make_key
from .seals import part_path, read_seal, seal_path, shard_path, shards_of
from .settings import OLDER, differences, pinned
from .sink import read_rows
from .sources import (
    Known,
    Record,
    Source,
    check_source,
    read_records,
    shard_records,
)
from .storage import Location

log = logging.getLogger(__name__)

_NOTES = 4  # files named in a resume summary


@dataclass(slots=True)
class Tally:
    """What checking one input file counted, as it read it: the run's bar total and the dry run
    use these figures instead of reading the file again."""

    lines: int = 0  # records
    shards: int = 0
    no_url: int = 0  # records with no usable URL: failed rows
    done: int = 0  # records earlier runs finished (sealed shards, final rows of open ones)

    @property
    def todo(self) -> int:
        return self.lines - self.done


@dataclass(slots=True)
class Plan:
    """What one run does in an output folder: its sources and the shards earlier runs made."""

    out_dir: Path
    sources: list[Source]
    output: OutputConfig = field(default_factory=OutputConfig)
    known: dict[int, list[Known]] = field(default_factory=dict)
    sealed: frozenset[str] = frozenset()
    partial: frozenset[str] = frozenset()
    done: int = 0  # lines of sealed shards: skipped
    notes: list[str] = field(default_factory=list)  # what is left to do, file by file
    findings: Findings = field(default_factory=Findings)  # warnings; files that cannot be read
    tallies: dict[int, Tally] = field(default_factory=dict)  # by file id: the files read whole
    unread: frozenset[int] = frozenset()  # files done whole: the run need not read them again
    store: ObjectStore | None = None  # the output's store: out_dir is its local staging
    lock_lost: threading.Event | None = None  # set when another run took the store's lock
    layout: OutputLayout = field(init=False)  # what output.format decides, decided once

    def __post_init__(self) -> None:
        self.layout = OutputLayout.of(self.output)

    @property
    def where(self) -> str:
        """The output as the user named it: the folder, or the store (redacted)."""
        return str(self.out_dir if self.store is None else self.store.location)

    @property
    def resumed(self) -> bool:
        return bool(self.sealed or self.partial)

    @property
    def reading(self) -> list[Source]:
        """The sources the run reads: all, less those earlier runs did whole."""
        return [source for source in self.sources if source.id not in self.unread]

    @property
    def unread_lines(self) -> int:
        """The lines of the files the run does not read: done, all of them."""
        return sum(self.tallies[file].lines for file in self.unread)

    @property
    def lines(self) -> dict[int, int]:
        """The records of each file the check read, by file id (not the files new to it)."""
        return {file: tally.lines for file, tally in self.tallies.items()}

    def summary(self) -> str | None:
        """One line for the user on a rerun: what is skipped and what is left."""
        if not self.resumed:
            return None
        shards = len(self.sealed)
        sealed = f" ({shards} shard{'s' * (shards != 1)} sealed)" if shards else ""
        text = f"{self.done} URLs done by earlier runs{sealed}"
        if not self.notes:
            return f"{text}; nothing left to do"
        more = len(self.notes) - _NOTES
        listed = "; ".join(self.notes[:_NOTES]) + (f"; and {more} more files" if more > 0 else "")
        return f"{text}; to do: {listed}"


def plan_run(
    paths: Sequence[Path | Location],
    config: Config,
    out_dir: Path,
    *,
    restart: bool,
    record: bool = True,
    store: ObjectStore | None = None,
) -> Plan:
    """Check ``paths`` against what earlier runs did in ``out_dir``; record the inputs (unless
    not ``record``: a dry run, which writes and removes nothing). With ``store``, ``out_dir`` is
    its staging, which holds the store's state (mirror.pull_state): a shard is sealed by its
    seal alone, its rows staying in the store."""
    if restart:
        _check_restart(out_dir)
    if restart and record:
        forget(out_dir)
    state = None if restart else _read_state(out_dir)
    settings = pinned(config)
    differ = None if state is None else differences(state.get("settings"), settings)
    where = out_dir if store is None else store.location
    if differ == OLDER:
        raise PipelineError(f"{where}: this output folder was {OLDER}")
    if differ is not None:
        raise PipelineError(
            f"{where}: this output folder was made with other settings ({differ}); rerun "
            "with the same ones, or with --restart to start over, or choose another --out"
        )
    root: str = state["root"] if state else input_root(paths)
    ids: dict[str, int] = {f["path"]: f["id"] for f in state["files"]} if state else {}
    findings = Findings()
    sources, new = _number(find_files(paths, out_dir, findings), root, ids, str(where))
    readable = _readable(sources, config.input.url_column, findings)
    plan = Plan(out_dir, readable, config.output, findings=findings, store=store)
    if state is not None:
        _load_known(plan)
        _verify(plan, config, new)
        if not config.input.dedupe:  # dedupe needs every URL of the input, done or not
            plan.unread = _done_whole(plan)
    if not plan.sources:  # one bad file never blocks the others; with no other, it is the error
        raise SourceError(unreadable(findings))
    if record:
        _write_state(out_dir, settings, root, ids, plan.sources)
    return plan


def _readable(sources: list[Source], url_column: str, findings: Findings) -> list[Source]:
    """The sources that can be read; the others are told to ``findings``."""
    readable = []
    for source in sources:
        try:
            check_source(source, url_column)
        except UnreadableSource as exc:
            findings.failed(str(exc))
        else:
            readable.append(source)
    return readable


def unreadable(findings: Findings) -> str:
    """The input files that could not be read, in one line."""
    listed = findings.unreadable
    if len(listed) == 1:
        return listed[0]
    return (
        f"{len(listed)} input files cannot be read: "
        + "; ".join(listed[:_NOTES])
        + (f"; and {len(listed) - _NOTES} more" if len(listed) > _NOTES else "")
    )


_REMOVED = REMOVED  # what --restart removes


def _check_restart(out_dir: Path) -> None:
    """--restart removes only what a run of pipeline wrote: a folder without run.json that holds
    a manifest/, shards/, images/ or .staging/ of its own is refused."""
    if (out_dir / RUN).is_file():
        return
    held = [name for name in _REMOVED if name != RUN and os.path.lexists(out_dir / name)]
    if held:
        raise PipelineError(
            f"{out_dir}: not an output folder of pipeline (no {RUN}), and --restart would "
            f"remove its {' and '.join(held)}; move them away, or choose another --out"
        )


def forget(out_dir: Path) -> None:
    """--restart: what earlier runs recorded goes, with all they wrote: tar shards (a training
    job reading shards/*.tar must not find an old one), images and their captions (an image
    redone without a caption, or a line that now fails, must not keep an earlier run's file
    beside it) and staged outputs."""
    for path in (out_dir / name for name in _REMOVED):
        try:
            remove_entry(path)
        except OSError as exc:
            raise PipelineError(f"{path}: --restart cannot remove it: {exc.strerror}") from None


def _read_state(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / RUN
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path}: unreadable ({exc}); rerun with --restart") from None
    if not isinstance(state, dict) or not {"settings", "root", "files"} <= state.keys():
        return {}  # an older layout: refused by the settings check
    files = state["files"]
    if not (
        isinstance(state["root"], str)
        and isinstance(files, list)
        and all(isinstance(f, dict) and {"path", "id"} <= f.keys() for f in files)
    ):
        raise PipelineError(f"{path}: damaged (its list of input files); rerun with --restart")
    return state


def _write_state(
    out_dir: Path, settings: dict[str, Any], root: str, ids: dict[str, int], given: list[Source]
) -> None:
    formats = {s.name: s.format for s in given}
    files = [
        {"id": id_, "path": name, "format": formats.get(name), "given": name in formats}
        for name, id_ in sorted(ids.items(), key=lambda item: item[1])
    ]
    state = {"settings": settings, "root": root, "files": files}
    write_atomic(out_dir / RUN, (json.dumps(state, indent=1) + "\n").encode("utf-8"), root=out_dir)


def _number(
    files: list[InputFile], root: str, ids: dict[str, int], out_dir: str
) -> tuple[list[Source], set[int]]:
    """Sources named relative to ``root``, each with its id: a known one, or the next free one."""
    sources, new, seen = [], set(), set()
    next_id = max(ids.values(), default=-1) + 1
    for path in files:
        resolved = where(path)
        if resolved in seen:
            continue  # named twice (a file inside a folder that is also given)
        seen.add(resolved)
        name = relative_name(path, root)
        if name is None:
            raise PipelineError(
                f"{path}: earlier runs into {out_dir} read their input under {root}, and this "
                "file is not there; give inputs under it, or choose another --out"
            )
        if name not in ids:
            ids[name], next_id = next_id, next_id + 1
            new.add(ids[name])
        sources.append(Source(path, name, ids[name]))
    return sources, new


def _load_known(plan: Plan) -> None:
    """The shards of the manifest folder: sealed ones with their seal, open ones by name."""
    folder = plan.out_dir / MANIFEST
    if not folder.is_dir():
        return
    sealed, partial = set(), set()
    for name in shards_of(folder, "rows" if plan.store is None else "seal"):
        end = read_seal(seal_path(folder, name))
        if end is None and plan.store is None:
            end = _reseal(shard_path(folder, name), name)
        if end is not None:
            plan.known.setdefault(end.file, []).append(
                Known(end.first, end.last, end.count, end.digest)
            )
            sealed.add(name)
    for name in shards_of(folder, "part"):
        file, first = _parse_name(name)
        if name not in sealed and file is not None:
            plan.known.setdefault(file, []).append(Known(first))
            partial.add(name)
    plan.sealed, plan.partial = frozenset(sealed), frozenset(partial)


def _parse_name(name: str) -> tuple[int | None, int]:
    parsed = parse_key(name)
    return (None, 0) if parsed is None else parsed


def _reseal(path: Path, name: str) -> ShardEnd | None:
    """A sealed shard whose seal is lost: made again from its rows, which hold their lines."""
    file, first = _parse_name(name)
    if file is None:
        return None
    records = sorted((_as_record(row) for row in read_rows(path)), key=lambda r: r.line)
    if not records:
        return None
    hasher = hashlib.blake2b(digest_size=16)
    for record in records:
        hasher.update(record.canonical())
    return ShardEnd(name, len(records), file, first, records[-1].line, hasher.hexdigest())


def _as_record(row: dict[str, Any]) -> Record:
    return Record(row["line"], row["url"], row.get("columns"))


def _verify(plan: Plan, config: Config, new: set[int]) -> None:
    """Read every input file that has shards; refuse one whose processed lines changed. A file
    that cannot be read to its end is left out of this run (told to the plan's findings)."""
    readable = []
    for source in plan.sources:
        if source.id in new:
            plan.notes.append(f"{source.name} (new)")
            readable.append(source)
            continue
        try:
            _verify_source(plan, config, source)
        except UnreadableSource as exc:
            plan.findings.failed(str(exc))
        else:
            readable.append(source)
    plan.sources = readable


def _verify_source(plan: Plan, config: Config, source: Source) -> None:
    size, column = config.input.shard_size, config.input.url_column
    known = {make_key(source.id, k.first): k for k in plan.known.get(source.id, ())}
    first_todo, tally = None, Tally()
    adopted: dict[int, bytes] = {}
    shards = shard_records(source, size, column, list(known.values()), plan.findings)
    for item in shards:
        if isinstance(item, ShardEnd):
            tally.shards += 1
            if adopted:  # rows of an open shard whose lines are gone
                _changed(plan, source, min(adopted), "was removed")
            shard = known.pop(item.shard, None)
            if shard is not None and shard.digest is not None and item.digest != shard.digest:
                _refuse(plan, source, shard, column)
            continue
        record, name = item
        tally.lines, tally.no_url = tally.lines + 1, tally.no_url + (record.problem is not None)
        if name in plan.partial and record.line == _first_line(name):
            adopted = _final_rows(part_path(plan.out_dir / MANIFEST, name), plan)
        if name in plan.sealed or record.line in adopted:
            if record.line in adopted and adopted.pop(record.line) != record.canonical():
                _changed(plan, source, record.line, "changed")
            tally.done += 1
            continue
        first_todo = first_todo or record.line
    if known:  # shards whose lines are gone: the file was cut short
        _changed(plan, source, min(k.first for k in known.values()), "was removed")
    plan.done += tally.done
    plan.tallies[source.id] = tally
    if tally.todo:
        plan.notes.append(f"{tally.todo} in {source.name} from line {first_todo}")


def _done_whole(plan: Plan) -> frozenset[int]:
    """The files whose every line is in a sealed shard: a run has nothing to read in them."""
    open_files = {_parse_name(name)[0] for name in plan.partial}
    return frozenset(
        file
        for file, tally in plan.tallies.items()
        if tally.lines and tally.todo == 0 and file not in open_files
    )


def _first_line(name: str) -> int:
    return _parse_name(name)[1]


def _final_rows(path: Path, plan: Plan) -> dict[int, bytes]:
    """The lines an open shard has final rows for, each with its record's canonical form."""
    rows: dict[int, bytes] = {}
    for _, row in _parse_rows(path):
        if _kept(row, plan) is None:
            rows[row["line"]] = _as_record(row).canonical()
    return rows


def _kept(row: dict[str, Any], plan: Plan) -> str | None:
    """None when an open shard's row is final and is kept; else why it is done again: a
    transient failure, or (webdataset) an ok row whose staged output is gone, which its shard
    could never be packed without (removed by hand, or lost with a crash)."""
    if not is_final(row.get("error_kind"), row.get("http_status")):
        return "transient"
    if not plan.layout.webdataset or row.get("status") != "ok":
        return None
    staged = plan.out_dir / plan.layout.staged(row)
    return None if staged.is_file() else f"its staged output {staged} is missing"


def _refuse(plan: Plan, source: Source, shard: Known, column: str) -> None:
    """A sealed shard's fingerprint differs: find its first changed line, and say it."""
    folder = plan.out_dir / MANIFEST
    name = make_key(source.id, shard.first)
    rows = (
        read_rows(shard_path(folder, name)) if plan.store is None else sealed_rows(plan.store, name)
    )
    then = {row["line"]: _as_record(row).canonical() for row in rows}
    last = shard.last or shard.first
    now = {}
    for record in read_records(source, column):
        if record.line > last:
            break
        if record.line >= shard.first:
            now[record.line] = record.canonical()
    differ = sorted(line for line in then.keys() | now.keys() if then.get(line) != now.get(line))
    line = differ[0] if differ else shard.first
    what = "was removed" if line not in now else "is new" if line not in then else "changed"
    _changed(plan, source, line, what)


def _changed(plan: Plan, source: Source, line: int, what: str) -> None:
    raise SourceError(
        f"{source.path}: line {line} {what} since an earlier run into {plan.where}; rerun "
        "with --restart to redo the whole folder, or choose another --out"
    )


class Resume:
    """Filters a run's job stream down to what is not done yet."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.folder = plan.out_dir / MANIFEST
        self.sealed = plan.sealed
        self.partial = plan.partial
        self.skipped = plan.unread_lines  # lines found done, for the report
        _sweep_staging(plan)

    def pending(self, items: Iterable[Job | ShardEnd]) -> Iterator[Job | ShardEnd]:
        """``items`` less the jobs already done (runs in whichever thread pulls from it)."""
        current, done = "", frozenset[str]()
        for item in items:
            if item.shard in self.sealed:
                self.skipped += isinstance(item, Job)
                continue
            if item.shard != current:
                current = item.shard
                done = self._adopt(item.shard) if item.shard in self.partial else frozenset()
            if isinstance(item, Job) and item.key in done:
                self.skipped += 1
                continue
            yield item

    def _adopt(self, shard: str) -> frozenset[str]:
        """Keep the final rows of a shard's part; return their keys."""
        path = part_path(self.folder, shard)
        kept, keys = [], set()
        for text, row in _parse_rows(path):
            if row["key"] in keys:
                continue
            why = _kept(row, self.plan)
            if why is None:
                kept.append(text)
                keys.add(row["key"])
            elif why != "transient":
                log.warning("%s: done again: %s", row["key"], why)
        write_atomic(path, "".join(kept).encode("utf-8"), root=self.folder.parent)
        file, _ = _parse_name(shard)
        out_dir = self.folder.parent
        for folder in (IMAGES, STAGING):  # left by workers killed mid-write
            remove_temporaries(out_dir, PurePath(folder, f"{file:05d}"))
        return frozenset(keys)


def _sweep_staging(plan: Plan) -> None:
    """Staged outputs of shards sealed already (a kill came between a seal and the removal of
    its staged files): they were packed, so they go."""
    staging = plan.out_dir / STAGING
    if not plan.sealed or not staging.is_dir() or staging.is_symlink():
        return
    ranges: dict[int, list[tuple[int, int]]] = {}
    for file_id, shards in plan.known.items():
        ranges[file_id] = [(k.first, k.last) for k in shards if k.last is not None]
    stale = []
    for path in staging.glob("*/*/*"):  # .staging/<file>/<block>/<line>-<hash>.<ext>
        file_id, line = parse_output(path.relative_to(plan.out_dir).as_posix()) or (-1, -1)
        if any(first <= line <= last for first, last in ranges.get(file_id, ())):
            stale.append(path)
    remove_inside(stale, root=plan.out_dir)


def _parse_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The whole rows of a part, with their text: a half line (cut by a kill) or a damaged one
    is skipped."""
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "key" in row and "line" in row:
                yield line, row
