"""Atomic writes that stay inside the output folder: no temporary name, link or linked folder can
aim a write anywhere else."""

from __future__ import annotations

import os
from pathlib import PurePath

import pytest

from pipeline.atomic import (
    open_append,
    read_inside,
    remove_inside,
    remove_temporaries,
    write_atomic,
)
from pipeline.errors import OutputError


def test_write_atomic_makes_folders_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "file.bin"
    write_atomic(target, b"one", root=tmp_path)
    write_atomic(target, b"two", root=tmp_path)
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["file.bin"]


def test_write_atomic_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    write_atomic(target, b"old", root=tmp_path)

    def broken_replace(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OutputError, match=rf"^{tmp_path}/file.bin: No space left on device$"):
        write_atomic(target, b"new", root=tmp_path)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_a_link_at_the_target_is_replaced_not_followed(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (out / "images").mkdir(parents=True)
    (out / "images" / "a.jpg").symlink_to(victim)
    write_atomic(out / "images" / "a.jpg", b"image", root=out)
    assert victim.read_bytes() == b"precious"
    assert not (out / "images" / "a.jpg").is_symlink()
    assert (out / "images" / "a.jpg").read_bytes() == b"image"


def test_temporary_names_are_random_and_never_follow_a_planted_link(tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    out.mkdir()
    # every name the old scheme (.<name>.<pid>.tmp) could have used, planted as links
    for pid in range(os.getpid() - 5, os.getpid() + 5):
        (out / f".a.jpg.{pid}.tmp").symlink_to(victim)
    write_atomic(out / "a.jpg", b"image", root=out)
    assert victim.read_bytes() == b"precious"
    assert (out / "a.jpg").read_bytes() == b"image"


@pytest.mark.parametrize("depth", [1, 2])
def test_a_linked_folder_inside_the_tree_is_refused(tmp_path, depth):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = out / "images" / "00000" if depth == 2 else out / "images"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match=rf"^{folder}: a symbolic link; "):
        write_atomic(out / "images" / "00000" / "0000" / "a.jpg", b"image", root=out)
    with pytest.raises(OutputError, match=rf"^{folder}: a symbolic link; "):
        open_append(out / "images" / "00000" / "x.part", root=out)
    assert list(elsewhere.iterdir()) == []


def test_a_file_where_a_folder_must_be_is_refused(tmp_path):
    (tmp_path / "images").write_bytes(b"")
    with pytest.raises(OutputError, match=rf"^{tmp_path}/images: not a folder; "):
        write_atomic(tmp_path / "images" / "a.jpg", b"image", root=tmp_path)


def test_the_output_folder_itself_may_be_a_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "out").symlink_to(real, target_is_directory=True)
    write_atomic(tmp_path / "out" / "images" / "a.jpg", b"image", root=tmp_path / "out")
    assert (real / "images" / "a.jpg").read_bytes() == b"image"


def test_open_append_refuses_a_link_at_the_file(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.part").symlink_to(victim)
    with pytest.raises(
        OutputError, match=r"x\.part: a symbolic link; the run never writes through one"
    ):
        open_append(tmp_path / "out" / "x.part", root=tmp_path / "out")
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("link", ["images", "images/00000"])
def test_sweeping_temporaries_follows_no_linked_folder(tmp_path, link):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    bait = [elsewhere / ".db.tmp", elsewhere / "sub" / ".x.tmp"]
    for path in bait:
        path.write_bytes(b"precious")
    (out / link).parent.mkdir(parents=True, exist_ok=True)
    (out / link).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match="a symbolic link"):
        remove_temporaries(out, PurePath("images", "00000"))
    assert all(path.read_bytes() == b"precious" for path in bait)


def test_sweeping_temporaries_removes_only_them_and_not_through_links(tmp_path):
    folder = tmp_path / "images" / "00000" / "00000"
    folder.mkdir(parents=True)
    (folder / ".a.jpg.1234.tmp").write_bytes(b"half")
    (folder / "a.jpg").write_bytes(b"whole")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / ".b.tmp").write_bytes(b"precious")
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    remove_temporaries(tmp_path, PurePath("images", "00000"))
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg", "linked"]
    assert (tmp_path / "elsewhere" / ".b.tmp").read_bytes() == b"precious"
    remove_temporaries(tmp_path, PurePath("images", "00009"))  # missing: nothing to do


def test_reading_and_removing_inside_refuse_links(tmp_path):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "a.jpg").write_bytes(b"secret")
    (out / ".staging" / "00000").mkdir(parents=True)
    (out / ".staging" / "00000" / "a.jpg").symlink_to(elsewhere / "a.jpg")
    (out / ".staging" / "00001").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(OutputError, match=r"a\.jpg: a symbolic link"):
        read_inside(out / ".staging" / "00000" / "a.jpg", root=out)
    with pytest.raises(OutputError, match="00001: a symbolic link"):
        read_inside(out / ".staging" / "00001" / "a.jpg", root=out)
    with pytest.raises(OutputError, match="00001: a symbolic link"):
        remove_inside([out / ".staging" / "00001" / "a.jpg"], root=out)
    remove_inside([out / ".staging" / "00000" / "a.jpg", out / "gone" / "b.jpg"], root=out)
    assert (elsewhere / "a.jpg").read_bytes() == b"secret"  # the link went, not its target
    assert not (out / ".staging" / "00000" / "a.jpg").is_symlink()
