"""Every path of an output folder, built and parsed here: strings relative to the output root.

    images/<file>/<block>/<line>-<hash>.<ext>   an ok line's output (output.format = "files"),
    images/<file>/<block>/<line>-<hash>.txt     and its caption beside it (output.caption_column)
    .staging/<file>/<block>/<line>-<hash>.<ext> the same, staged until packed ("webdataset")
    manifest/<S>.jsonl.part                     shard S's rows while it is open
    manifest/<S>.stats.json                     its figures, then
    manifest/<S>.seal.json                      its seal, then
    manifest/<S>.jsonl                          its rows, the shard sealed
    manifest/<S>.parquet                        its rows again (output.parquet)
    shards/.packed/<S>-00000.tar                a sealed shard's tars until they are named,
    shards/00000.tar                            then numbered across the folder
    shards/index.json                           each tar, its samples and its shard
    run.json  report.json  reports/<stamp>.json  .lock  .dedupe.sqlite
    .store                                      (staging of an output in a store) the store

A name comes from a key (``<file id>-<line>``) and a hash of the URL, never from the URL itself,
so nothing an input holds can choose where a file goes. Whether the run writes files or
webdataset tars is decided once, by ``OutputLayout``: the other modules ask it, and never
compare ``output.format`` themselves.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from .config import OutputConfig

IMAGES = "images"
STAGING = ".staging"  # webdataset: workers write each output here; the packer reads it back
MANIFEST = "manifest"
SHARDS = "shards"
PACKED = f"{SHARDS}/.packed"
INDEX = f"{SHARDS}/index.json"
RUN = "run.json"
REPORT = "report.json"
REPORTS = "reports"
LOCK = ".lock"
DEDUPE = ".dedupe.sqlite"
STAGED = ".store"  # in the staging folder of an output in a store: which store (mirror.py)
# what an output folder holds: never read as its input, and what --restart may remove
OUTPUT_NAMES = (MANIFEST, IMAGES, SHARDS, REPORTS, STAGING)

# the kinds of file a shard has in manifest/, by suffix (the longest first: ".jsonl.part")
MANIFEST_KINDS = {
    ".jsonl.part": "part",
    ".seal.json": "seal",
    ".stats.json": "stats",
    ".jsonl": "rows",
    ".parquet": "parquet",
}
_SUFFIXES = {kind: suffix for suffix, kind in MANIFEST_KINDS.items()}


# --- keys -----------------------------------------------------------------------------------


def parse_key(key: str) -> tuple[int, int] | None:
    """``(file id, line)`` of a key or a shard's name; None for any other name."""
    file, dash, line = key.partition("-")
    if not (dash and file.isdigit() and line.isdigit()):
        return None
    return int(file), int(line)


# --- outputs --------------------------------------------------------------------------------


def output_file(file: int, line: int, url: str, extension: str, folder_size: int,
                folder: str = IMAGES) -> str:  # fmt: skip
    """An output's name: ``<folder>/<file id>/<block>/<line>-<hash>.<ext>``, at most
    ``folder_size`` files a folder; the hash is of the URL, which never names anything."""
    digest = hashlib.blake2b(url.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
    return f"{folder}/{file:05d}/{line // folder_size:05d}/{line:09d}-{digest}.{extension}"


def parse_output(path: str) -> tuple[int, int] | None:
    """``(file id, line)`` of an output (images/ or .staging/); None for any other path."""
    parts = PurePosixPath(path).parts
    if len(parts) != 4 or parts[0] not in (IMAGES, STAGING):
        return None
    file, block, name = parts[1:]
    line = name.split("-", 1)[0]
    if not (file.isdigit() and block.isdigit() and line.isdigit() and "-" in name):
        return None
    return int(file), int(line)


def caption_file(stored: str) -> str:
    """The caption written beside an output: the same name, ``.txt``."""
    return f"{stored.rsplit('.', 1)[0]}.txt"


def member(key: str, extension: str) -> str:
    """A sample's member in a webdataset tar: ``<key>.<ext>``."""
    return f"{key}.{extension}"


# --- the manifest ---------------------------------------------------------------------------


def manifest_file(shard: str, kind: str = "rows") -> str:
    """``manifest/<shard><suffix>`` for a kind of MANIFEST_KINDS ("rows", "part", "seal", ...)."""
    return f"{MANIFEST}/{shard}{_SUFFIXES[kind]}"


def parse_manifest(name: str) -> tuple[str, str] | None:
    """``(shard, kind)`` of a file of manifest/ (its name, or its path); None for another."""
    base = PurePosixPath(name).name
    for suffix, kind in MANIFEST_KINDS.items():
        if base.endswith(suffix) and parse_key(base.removesuffix(suffix)) is not None:
            return base.removesuffix(suffix), kind
    return None


# --- tars -----------------------------------------------------------------------------------


def packed_tar(shard: str, index: int) -> str:
    return f"{PACKED}/{shard}-{index:05d}.tar"


def tar_file(number: int) -> str:
    return f"{SHARDS}/{number:05d}.tar"


def parse_tar(name: str) -> int | None:
    """The number of a named tar (``shards/00041.tar``, or its name); None for another."""
    base = PurePosixPath(name).name
    number = base.removesuffix(".tar")
    return int(number) if base.endswith(".tar") and number.isdigit() else None


def history_file(stamp: str) -> str:
    """A run's own report, kept: ``reports/<stamp>.json``."""
    return f"{REPORTS}/{stamp}.json"


@dataclass(frozen=True, slots=True)
class OutputLayout:
    """What ``output.format`` decides about paths, decided once: where a worker writes an
    output, what the row's ``path`` names, whether a shard is packed before its seal."""

    webdataset: bool = False
    folder_size: int = 1000
    parquet: bool = False

    @classmethod
    def of(cls, config: OutputConfig) -> OutputLayout:
        return cls(config.format == "webdataset", config.folder_size, config.parquet)

    @property
    def packs(self) -> bool:
        """A sealed shard waits for the packer (its tars, its parquet)."""
        return self.webdataset or self.parquet

    @property
    def outputs(self) -> str:
        """The folder the outputs end in."""
        return SHARDS if self.webdataset else IMAGES

    @property
    def captions_beside(self) -> bool:
        """Captions are ``.txt`` files beside the outputs (webdataset packs them instead)."""
        return not self.webdataset

    def stored(self, file: int, line: int, url: str, extension: str) -> str:
        """Where a worker writes an ok line's output."""
        folder = STAGING if self.webdataset else IMAGES
        return output_file(file, line, url, extension, self.folder_size, folder)

    def row_path(self, key: str, stored: str) -> str:
        """The row's ``path``: the output file, or (webdataset) the sample's member."""
        return member(key, stored.rsplit(".", 1)[1]) if self.webdataset else stored

    def staged(self, row: dict[str, Any]) -> str:
        """Where an ok row's output was written (staged, with webdataset), from its key, URL and
        path: the same name the worker chose."""
        parsed = parse_key(str(row["key"]))
        if parsed is None:
            raise ValueError(f"not a manifest key: {row['key']!r}")
        extension = str(row["path"]).rsplit(".", 1)[1]
        return self.stored(parsed[0], parsed[1], str(row["url"]), extension)
