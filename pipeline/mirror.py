"""An output in an object store, as the coordinator keeps it: the state a run needs brought into
local staging before it plans, and each small record put whole once it is finished.

A run into ``s3://bucket/prefix`` writes exactly as into a local output folder, but into
staging (``output.staging``, or a temporary folder removed when the run ends); the store holds
the truth, and staging only what this run has not put yet:

    staging(output)               the local folder the run writes in, made (or a temporary one)
    pull_state(store, folder)     before planning: the folder's output files cleared, then
                                  run.json, every manifest/<S>.seal.json and <S>.stats.json,
                                  and shards/index.json copied from the store: what resume
                                  needs. Rows are not copied: a shard whose seal is in the store
                                  is sealed (resume.py); a shard without one is redone whole (no
                                  ``.part`` is ever taken from a store)
    put_record(store, folder, name)   one small file of the folder put whole (run.json, reports)
    publish_shard(store, folder, shard)   a sealed shard's rows, its stats, and its
                                  seal last: a shard is done in the store only once its seal is
    sealed_rows(store, shard)     a sealed shard's rows, read back (resume's changed-line check)
    check_restart / forget        --restart in a store: the same refusal as a local folder's
                                  (no run.json, yet output objects), then the objects deleted

Image bodies never pass through here: a lane puts each image (upload.py), and the coordinator
only ever handles records. These functions, ``ObjectStore`` (objects.py) and the coordinator's
``store`` argument are the seam for lanes that share no disk with the coordinator (a Dask
cluster): each writes to its own staging and puts its outputs; the coordinator pulls the state,
plans, seals and publishes as here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .atomic import remove_entry, write_atomic
from .config import OutputConfig
from .errors import OutputError, PipelineError
from .layout import (
    DEDUPE,
    IMAGES,
    INDEX,
    MANIFEST,
    OUTPUT_NAMES,
    REPORT,
    REPORTS,
    RUN,
    SHARDS,
    STAGED,
    STAGING,
    manifest_file,
    parse_manifest,
)
from .objects import ObjectStore

PULLED = ("seal", "stats")  # the manifest files a rerun needs from the store
REMOVED = (MANIFEST, RUN, SHARDS, IMAGES, STAGING)  # what --restart removes, here and in a folder


@contextlib.contextmanager
def staging(output: OutputConfig) -> Iterator[Path]:
    """The local folder a run into a store writes in: ``output.staging`` (made), or a new
    temporary folder, removed with what is left in it when the run ends."""
    if output.staging:
        folder = Path(output.staging)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(
                f"output.staging {folder}: cannot create it: {exc.strerror}"
            ) from None
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="pipeline-staging-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def pull_state(store: ObjectStore, folder: Path) -> None:
    """Staging made to hold what the store holds of the run's state, and nothing else (see the
    module). Raises OutputError (one line)."""
    _clear(folder, store)
    wanted = [RUN, INDEX] + [
        name
        for name in store.names(MANIFEST)
        if (parsed := parse_manifest(name)) is not None and parsed[1] in PULLED
    ]
    for name, data in store.get_many(wanted).items():
        write_atomic(folder / name, data, root=folder)  # OutputError


def _clear(folder: Path, store: ObjectStore) -> None:
    """What a run wrote into staging before (an earlier run's, killed): the store decides. A
    folder holding output files but never staging is refused: they may be someone's."""
    names = (*OUTPUT_NAMES, RUN, REPORT, DEDUPE)
    if not (folder / STAGED).is_file() and any(os.path.lexists(folder / n) for n in names):
        raise PipelineError(
            f"output.staging {folder}: holds an output of its own (not a staging folder); "
            "give an empty folder, or another one"
        )
    write_atomic(folder / STAGED, f"{store.location}\n".encode(), root=folder)
    for name in names:
        path = folder / name
        try:
            remove_entry(path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot clear it from staging: {exc.strerror}") from None


def put_record(store: ObjectStore, folder: Path, name: str) -> None:
    """Put one small local file of ``folder`` (``name`` relative to it) whole; missing: nothing.
    Raises OutputError."""
    path = folder / name
    if path.is_file():
        store.put_file(path, name)


def publish_shard(store: ObjectStore, folder: Path, shard: str) -> None:
    """A sealed shard into the store: its rows, its stats, then its seal, last (its tars and
    parquet are put by the packer, before: formats.py). Raises OutputError: the shard is then
    not sealed in the store, and is redone."""
    for kind in ("rows", "stats", "seal"):
        put_record(store, folder, manifest_file(shard, kind))


def put_reports(store: ObjectStore, folder: Path) -> None:
    """This run's reports (report.json, reports/<stamp>.json): staging holds only its own."""
    reports = folder / REPORTS
    for path in sorted(reports.glob("*.json")) if reports.is_dir() else []:
        put_record(store, folder, f"{REPORTS}/{path.name}")
    put_record(store, folder, REPORT)


def sealed_rows(store: ObjectStore, shard: str) -> list[dict[str, Any]]:
    """The rows of a shard sealed in the store. Raises OutputError."""
    name = manifest_file(shard, "rows")
    data = store.get_bytes(name)
    if data is None:
        raise OutputError(f"{store.url(name)}: missing, though its shard is sealed")
    rows = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or "line" not in row:
            raise OutputError(f"{store.url(name)}: line {number} is damaged (not a manifest row)")
        rows.append(row)
    return rows


def pull_reports(store: ObjectStore, folder: Path) -> None:
    """What ``pipeline report`` reads, from the store into ``folder``: the reports and the
    sealed shards' rows. Raises OutputError; PipelineError when the store holds no output."""
    names = store.names()
    rows = [n for n in names if (p := parse_manifest(n)) is not None and p[1] == "rows"]
    if not any(n.startswith(f"{MANIFEST}/") for n in names):
        raise PipelineError(f"{store.location}: not an output of pipeline run (no manifest/)")
    (folder / MANIFEST).mkdir(exist_ok=True)
    wanted = [REPORT, *(n for n in names if n.startswith(f"{REPORTS}/")), *rows]
    for name, data in store.get_many(wanted).items():
        write_atomic(folder / name, data, root=folder)


def check_restart(store: ObjectStore) -> list[str]:
    """--restart removes only what a run of pipeline wrote: an output without run.json that
    holds output objects is refused (one line), as a local folder is. The names to remove."""
    names = [name for name in store.names() if name.split("/", 1)[0] in REMOVED]
    if RUN in names:
        return names
    held = sorted({name.split("/", 1)[0] for name in names})
    if held:
        raise PipelineError(
            f"{store.location}: not an output of pipeline (no {RUN}), and --restart would "
            f"remove its {' and '.join(held)}; move them away, or choose another --out"
        )
    return names


def forget(store: ObjectStore, names: list[str]) -> None:
    """--restart: every object earlier runs wrote (``check_restart``'s names) deleted, run.json
    last, so that a kill meanwhile leaves an output --restart still takes for its own."""
    store.delete([name for name in names if name != RUN])
    store.delete([RUN])
