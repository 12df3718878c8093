"""Atomic writes that stay inside the output folder: no temporary name, link or linked folder can
aim a write anywhere else."""

from __future__ import annotations

import os

import pytest

from pipeline.atomic import open_append, write_atomic
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
