"""layout.py: every path of the output folder, built and parsed in one place."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path, PurePosixPath

import pytest

import pipeline
from pipeline import layout
from pipeline.config import OutputConfig
from pipeline.layout import OutputLayout
from pipeline.records import make_key

EVIL = "http://x/../../etc/passwd/evil.jpg"


def test_output_paths_come_from_the_key_and_a_hash_never_the_url():
    path = layout.output_file(3, 1234, EVIL, "jpg", 1000)
    assert path.startswith("images/00003/00001/000001234-") and path.endswith(".jpg")
    assert "evil" not in path and ".." not in path and "passwd" not in path
    assert len(path.rsplit("-", 1)[1]) == len("0123456789abcdef.jpg")

    def at(line: int, url: str = "u", ext: str = "jpg", size: int = 1000) -> str:
        return layout.output_file(0, line, url, ext, size)

    assert at(999).split("/")[2] == "00000" and at(1000).split("/")[2] == "00001"
    assert at(5, "http://a", "png", 10) == at(5, "http://a", "png", 10)
    assert at(5, "http://a", "png", 10) != at(5, "http://b", "png", 10)
    assert at(5, "http://a") != at(6, "http://a")
    assert at(5, "http://\udcff") != at(5, "http://a")  # a surrogate-escaped URL hashes too
    blocks = Counter(at(line, size=10).rsplit("/", 1)[0] for line in range(1, 36))
    assert max(blocks.values()) <= 10 and len(blocks) == 4


@pytest.mark.parametrize("folder", [layout.IMAGES, layout.STAGING])
@pytest.mark.parametrize(("file", "line"), [(0, 1), (3, 999), (3, 1000), (99999, 123456789)])
def test_an_output_parses_back_to_its_file_and_line(folder, file, line):
    path = layout.output_file(file, line, EVIL, "webp", 1000, folder)
    assert layout.parse_output(path) == (file, line)
    assert layout.caption_file(path) == path.removesuffix(".webp") + ".txt"


@pytest.mark.parametrize(
    "path", ["manifest/00000-000000001.jsonl", "images/a/00000/000000001-ff.jpg", "images/x.jpg"]
)
def test_other_paths_are_no_output(path):
    assert layout.parse_output(path) is None


@pytest.mark.parametrize("kind", list(layout.MANIFEST_KINDS.values()))
def test_a_shards_manifest_files_parse_back_to_shard_and_kind(kind):
    shard = make_key(7, 10001)
    path = layout.manifest_file(shard, kind)
    assert path.startswith("manifest/") and layout.parse_manifest(path) == (shard, kind)
    assert layout.parse_key(shard) == (7, 10001)


@pytest.mark.parametrize("name", ["notes.txt", "x.jsonl", "00000-1a.jsonl.part", ".jsonl"])
def test_other_files_of_the_manifest_folder_are_no_shard(name):
    assert layout.parse_manifest(name) is None


def test_tars_are_numbered_and_parse_back():
    assert layout.tar_file(41) == "shards/00041.tar"
    assert layout.parse_tar(layout.tar_file(41)) == 41
    assert layout.packed_tar(make_key(0, 1), 2) == "shards/.packed/00000-000000001-00002.tar"
    assert layout.parse_tar("index.json") is None and layout.parse_tar("a.tar") is None


def test_the_layout_is_decided_once_from_the_config():
    files = OutputLayout.of(OutputConfig(folder_size=10))
    wds = OutputLayout.of(OutputConfig(format="webdataset", folder_size=10))
    parquet = OutputLayout.of(OutputConfig(parquet=True))
    assert not files.webdataset and not files.packs and files.captions_beside
    assert wds.webdataset and wds.packs and not wds.captions_beside and parquet.packs
    assert files.outputs == "images" and wds.outputs == "shards"
    stored = files.stored(2, 15, EVIL, "jpg")
    assert stored == layout.output_file(2, 15, EVIL, "jpg", 10)
    assert files.row_path(make_key(2, 15), stored) == stored
    staged = wds.stored(2, 15, EVIL, "jpg")
    assert staged.startswith(".staging/00002/00001/000000015-")
    path = wds.row_path(make_key(2, 15), staged)
    assert path == "00002-000000015.jpg"
    # the packer finds the staged file from the row alone: its key, its URL and its path
    row = {"key": make_key(2, 15), "url": EVIL, "path": path, "line": 15}
    assert wds.staged(row) == staged


def test_every_path_is_relative_and_stays_under_the_output_root():
    shard = make_key(1, 1)
    paths = [
        layout.output_file(1, 5, EVIL, "jpg", 1000),
        OutputLayout(webdataset=True).stored(1, 5, EVIL, "png"),
        *(layout.manifest_file(shard, kind) for kind in layout.MANIFEST_KINDS.values()),
        layout.packed_tar(shard, 0),
        layout.tar_file(0),
        layout.history_file("20261126T031823.512345Z"),
        layout.INDEX,
        layout.RUN,
        layout.REPORT,
        layout.LOCK,
        layout.DEDUPE,
    ]
    root = Path("/out")
    for path in paths:
        pure = PurePosixPath(path)
        assert not pure.is_absolute() and ".." not in pure.parts, path
        assert (root / path).resolve().is_relative_to(root), path


_NAMES = {"manifest", "shards", ".staging", "run.json", "report.json", "index.json", ".lock"}
_ENDS = (".seal.json", ".stats.json", ".jsonl.part", ".packed")
_STARTS = ("images/0", ".staging/", "shards/", "manifest/", "reports/")


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_no_other_module_spells_a_path_of_the_output_folder():
    """The names live in layout.py, and output.format is read there: a literal of them in
    another module of the package (bench/ measures it, and is not part of it) is a second owner."""
    package = Path(pipeline.__file__).parent
    found = []
    for path in sorted(package.glob("*.py")):
        if path.name in ("layout.py", "config.py"):  # config.py: the format's allowed values
            continue
        for lineno, text in _literals(path):
            if text in _NAMES or text.endswith(_ENDS) or text.startswith(_STARTS):
                found.append(f"{path.name}:{lineno}: {text!r}")
            if text == "webdataset":
                found.append(f"{path.name}:{lineno}: compares output.format")
    assert found == []
