"""What a sealed shard becomes besides its JSONL manifest: webdataset tars, a parquet manifest.

    workers: .staging/<file>/<block>/<line>-<hash>.jpg   (output.format = "webdataset")
                      |  the shard's last row is in
                      v
    packer process: shards/.packed/<shard>-00000.tar.part -> .tar   <key>.jpg + <key>.json
                    (+ <key>.txt, output.caption_column) per ok row, in line order, at most
                    output.shard_size samples a tar; then the seal, the manifest, and only then
                    the staged files go (a kill in between: the rerun packs the same tars again
                    from the same files); the coordinator then names them shards/NNNNN.tar
                    (seals.py)
                    manifest/<shard>.parquet                 (output.parquet) the same rows

A sample's ``.json`` is its manifest row less what differs from one build to the next (the
timings), with the input columns ``output.sample_columns`` chooses. Tars are plain POSIX tars
with fixed owners and times, so packing the same rows twice gives the same bytes, and both
``tarfile`` and the ``webdataset`` package read them (a sample is the members that share a key).
The packing runs in one process of its own (the sink's), once per shard: a copy of the shard's
output bytes, off the coordinator's GIL; the coordinator seals the shard when it is done.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .atomic import open_dir, output_error, read_inside, remove_inside, write_atomic
from .config import OutputConfig
from .errors import OutputError, require
from .layout import PACKED, SHARDS, OutputLayout, member, packed_tar, parse_manifest, parse_tar
from .objects import ObjectStore, Uploads
from .records import caption

# the fields of a sample's .json: the manifest row less its timings, which differ between two
# builds of the same input (they stay in the manifest)
SAMPLE_FIELDS = ("key", "shard", "source", "line", "url", "status", "http_status", "bytes_in",
                 "bytes_out", "width_in", "height_in", "width_out", "height_out", "path",
                 "sha256", "original_sha256", "columns")  # fmt: skip
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)  # as the manifest's rows


@dataclass(frozen=True, slots=True)
class Packed:
    """What packing a shard made: its tars' sample counts, and the staged files they hold."""

    samples: tuple[int, ...] = ()
    staged: tuple[Path, ...] = ()


def sample_json(row: Mapping[str, Any], sample_columns: tuple[str, ...]) -> bytes:
    """A sample's ``.json``: the same for the same input line, whichever build made it."""
    sample = {name: row.get(name) for name in SAMPLE_FIELDS}
    columns = sample["columns"]
    if isinstance(columns, dict) and sample_columns != ("*",):
        sample["columns"] = {name: columns[name] for name in sample_columns if name in columns}
    return (_ENCODER.encode(sample) + "\n").encode("utf-8")


def make_formats(
    out_dir: Path,
    part: Path,
    parquet: Path,
    config: OutputConfig,
    store: ObjectStore | None = None,
) -> Packed:
    """The tars and the ``parquet`` manifest of a shard whose rows are all in its ``part`` (in
    the packing process); the staged outputs, to remove once the shard is sealed. With a
    ``store`` (``out_dir`` is its staging), they are put there too, whole, at the same names."""
    rows = list(_rows_with_text(part))
    made = []
    if config.parquet:
        write_parquet(out_dir, parquet, rows)
        made.append(parquet.relative_to(out_dir).as_posix())
    packed = Packed()
    if OutputLayout.of(config).webdataset:
        packed = pack_shard(out_dir, rows, config)
        named = parse_manifest(part.name)
        if named is None:
            raise ValueError(f"not a shard's part: {part}")
        made += [packed_tar(named[0], index) for index in range(len(packed.samples))]
    if store is not None:
        put_all(store, out_dir, made, config.uploads)
    return packed


def put_all(store: ObjectStore, out_dir: Path, names: list[str], limit: int) -> None:
    """Put files of ``out_dir`` whole, at most ``limit`` at once; each tar's local copy goes
    once it is in the store (its name there is given in the store: seals.py). Raises the first
    OutputError, once every put has ended."""
    uploads = Uploads(store, limit)
    futures = [(name, uploads.put(out_dir / name, name)) for name in names]
    failed: OutputError | None = None
    for name, future in futures:
        try:
            future.result()
        except OutputError as exc:
            failed = failed or exc
        else:
            if name.endswith(".tar"):
                remove_inside([out_dir / name], root=out_dir)
    if failed is not None:
        raise failed


def _rows_with_text(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield line, json.loads(line)


def pack_shard(
    out_dir: Path, rows: list[tuple[str, dict[str, Any]]], config: OutputConfig
) -> Packed:
    """Write the tars of one shard from its rows (text, parsed) under ``shards/.packed/``."""
    samples = sorted((row["line"], row) for _, row in rows if row["status"] == "ok")
    layout = OutputLayout.of(config)
    staged: list[Path] = []
    counts = []
    for index, start in enumerate(range(0, len(samples), config.shard_size)):
        chunk = [row for _, row in samples[start : start + config.shard_size]]
        paths = [out_dir / layout.staged(row) for row in chunk]
        _write_tar(out_dir, packed_tar(str(chunk[0]["shard"]), index), chunk, paths, config)
        staged += paths
        counts.append(len(chunk))
    return Packed(tuple(counts), tuple(staged))


def _write_tar(
    out_dir: Path,
    name: str,
    chunk: list[dict[str, Any]],
    paths: list[Path],
    config: OutputConfig,
) -> None:
    target = out_dir / name
    part = target.with_name(target.name + ".part")
    folder = _folder(out_dir, PACKED)
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(part.name, flags, 0o644, dir_fd=folder)
        with (
            open(fd, "wb") as f,
            tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for row, path in zip(chunk, paths, strict=True):
                key, extension = str(row["key"]), str(row["path"]).rsplit(".", 1)[1]
                _add(tar, member(key, extension), _read(out_dir, path))
                text = caption(row.get("columns"), config.caption_column)
                if text is not None:
                    _add(tar, member(key, "txt"), text)
                _add(tar, member(key, "json"), sample_json(row, config.sample_columns))
        os.replace(part.name, target.name, src_dir_fd=folder, dst_dir_fd=folder)
    except OSError as exc:
        raise output_error(part, exc) from None
    finally:
        os.close(folder)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # the same rows, the same bytes
    tar.addfile(info, io.BytesIO(data))


def _read(out_dir: Path, path: Path) -> bytes:
    try:
        return read_inside(path, root=out_dir)  # through no link: nothing from outside --out
    except OutputError as exc:  # a staged output removed by hand, or a link planted
        raise OutputError(
            f"{exc}: the shard cannot be packed; a rerun does its URL again"
        ) from None


def _folder(out_dir: Path, name: str) -> int:
    try:
        return open_dir(out_dir, Path(name))
    except OSError as exc:
        raise output_error(out_dir / name, exc) from None


def remove_staged(out_dir: Path, paths: tuple[Path, ...]) -> None:
    """After the seal: the packed outputs go (their folders stay, to be reused or left empty)."""
    remove_inside(list(paths), root=out_dir)


def write_parquet(out_dir: Path, path: Path, rows: list[tuple[str, dict[str, Any]]]) -> None:
    """The shard's rows as a parquet file, in line order; ``columns`` as JSON text."""
    import pyarrow as pa  # checked at start (require_parquet): an optional extra
    import pyarrow.parquet as pq

    ordered = [row for _, row in sorted(rows, key=lambda item: item[1]["line"])]
    table = pa.Table.from_pylist([_flat(row) for row in ordered])
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_atomic(path, sink.getvalue().to_pybytes(), root=out_dir)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    columns = row.get("columns")
    return {**row, "columns": None if columns is None else json.dumps(columns, default=str)}


def require_parquet() -> None:
    """Before any work: output.parquet without pyarrow is one line, with the install command."""
    require("pyarrow.parquet", "parquet", "output.parquet")


def read_shards(out_dir: Path) -> Iterator[Path]:
    """The webdataset tars of an output folder, in order (those named: sealed shards')."""
    folder = out_dir / SHARDS
    if not folder.is_dir():
        return iter([])
    return iter(sorted(path for path in folder.iterdir() if parse_tar(path.name) is not None))
