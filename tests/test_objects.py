"""An output in an object store (``pipeline.objects``), against a real S3-compatible server
(moto's, on 127.0.0.1): objects put whole, read, listed, copied and deleted; puts bounded in
number; the lock of one writer per output."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import bucket, s3_environment, wait_for

from pipeline.errors import OutputError, PipelineError
from pipeline.objects import ObjectStore, StoreLock, Uploads, store_lock
from pipeline.storage import Location


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with s3_environment() as env:
        yield env


def test_objects_are_put_read_listed_copied_and_deleted_by_their_names(s3, tmp_path):
    store = bucket("objects", "out")
    local = tmp_path / "a.jpg"
    local.write_bytes(b"\xff\xd8 image \xff\xd9")
    store.put_file(local, "images/00000/00000/000000001-ab.jpg")
    store.put_bytes("manifest/00000-000000001.seal.json", b'{"count": 1}\n')
    assert store.get_bytes("images/00000/00000/000000001-ab.jpg") == local.read_bytes()
    assert store.get_bytes("manifest/none.json") is None
    assert store.names("manifest") == ["manifest/00000-000000001.seal.json"]
    store.copy("images/00000/00000/000000001-ab.jpg", "shards/00000.tar")
    assert store.names() == [
        "images/00000/00000/000000001-ab.jpg",
        "manifest/00000-000000001.seal.json",
        "shards/00000.tar",
    ]
    store.delete(["shards/00000.tar", "shards/missing.tar"])
    assert "shards/00000.tar" not in store.names()
    assert store.names("nothing/") == []
    assert store.url("x/y") == "s3://objects/out/x/y"


def test_a_store_a_run_cannot_share_between_processes_is_one_line():
    with pytest.raises(PipelineError, match="memory:// lives in one process"):
        ObjectStore.check(Location("memory://out"))


def test_a_failed_put_is_an_output_error_naming_the_object(s3, tmp_path):
    store = ObjectStore.check(Location("s3://no-such-bucket/out"))
    with pytest.raises(OutputError, match=r"^s3://no-such-bucket/out/manifest/x\.json: "):
        store.put_bytes("manifest/x.json", b"{}")
    local = tmp_path / "a.jpg"
    local.write_bytes(b"x")
    future = Uploads(store, 2).put(local, "images/a.jpg")
    with pytest.raises(OutputError, match=r"s3://no-such-bucket/out/images/a\.jpg"):
        future.result(timeout=30)


def test_uploads_run_at_most_their_limit_at_once_and_all_finish(s3, tmp_path):
    store = bucket("uploads", "out")
    uploads = Uploads(store, 2)
    release = threading.Event()
    running, peak = 0, 0
    real = store.fs._put_file

    async def gated(local: str, key: str, **kwargs: Any) -> None:  # holds every put until told
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        while not release.is_set():
            await asyncio.sleep(0.01)
        running -= 1
        await real(local, key, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store.fs, "_put_file", gated)
        files = []
        for number in range(6):
            files.append(tmp_path / f"{number}.jpg")
            files[-1].write_bytes(bytes([number]) * 100)
        futures = [uploads.put(path, f"images/{path.name}") for path in files]
        wait_for(lambda: peak == 2, what="two puts running")
        assert uploads.running == 6 and peak == 2  # four wait for a slot, not a thread
        release.set()
        for future in futures:
            future.result(timeout=30)
    assert peak == 2 and uploads.running == 0
    assert store.names("images") == [f"images/{number}.jpg" for number in range(6)]
    assert store.get_bytes("images/3.jpg") == bytes([3]) * 100


def test_one_run_holds_a_store_output_a_second_is_refused_a_dead_owner_is_taken_over(s3):
    """The lock object is created only where none is; renewed within its lease; a second run is
    refused in one line; once the owner stops renewing and its lease is over, a run takes it
    over, and the old owner learns it lost the lock and leaves the new owner's object alone."""
    store = bucket("locks", "out")
    fs, key = store.fs, "locks/out/.lock"
    first = StoreLock(store, lease_s=30, renew_s=0.05)  # a lease no load outlasts
    first.acquire()
    try:
        etag = fs.info(key, refresh=True)["ETag"]
        assert f"pid {os.getpid()} on" in json.loads(fs.cat_file(key))["owner"]
        wait_for(lambda: fs.info(key, refresh=True)["ETag"] != etag, what="a renewal")
        with pytest.raises(PipelineError) as info:
            StoreLock(store).acquire()
        assert "another pipeline run is writing into this output (pid" in str(info.value)
        assert "\n" not in str(info.value)
        later = StoreLock(store, clock=lambda: time.time() + 60)  # first's lease is over

        def take_over() -> bool:  # first renews meanwhile: If-Match fails, then try again
            try:
                later.acquire()
            except PipelineError as exc:
                assert "took over its expired lock" in str(exc)
                return False
            return True

        wait_for(take_over, what="the lock taken over")
        wait_for(first.lost.is_set, what="the first owner to see it lost the lock")
    finally:
        first.release()
    assert fs.exists(key)  # the first owner did not delete the new owner's lock
    later.release()
    assert not fs.exists(key)
    with store_lock(store):  # free again
        assert fs.exists(key)
    assert not fs.exists(key)


def test_only_s3_outputs_can_be_locked(tmp_path: Path):
    with pytest.raises(PipelineError, match="cannot be locked yet"):
        StoreLock(ObjectStore(Location("memory://out")))


def test_a_store_that_refuses_connections_is_one_line_naming_it(tmp_path: Path):
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        options = {"endpoint_url": endpoint, "key": "k", "secret": "s"}
        options["config_kwargs"] = {"retries": {"max_attempts": 1}}
        store = ObjectStore.check(Location("s3://refused/out", options))
        with pytest.raises(PipelineError, match=r"^s3://refused/out: cannot lock: Could not co"):
            store_lock(store).__enter__()
        with pytest.raises(OutputError, match=r"^s3://refused/out/run\.json: Could not conn"):
            store.put_bytes("run.json", b"{}")
        with pytest.raises(OutputError, match=r"^s3://refused/out/manifest: Could not conn"):
            store.names("manifest")


def test_a_listing_in_a_missing_bucket_is_an_error_not_an_empty_output(s3):
    assert bucket("listed", "out").names("manifest") == []  # a prefix without objects: none
    store = ObjectStore.check(Location("s3://no-such-bucket/out"))
    with pytest.raises(OutputError, match=r"^s3://no-such-bucket/out/manifest: .*does not exist"):
        store.names("manifest")  # a dry run would have said "a first run" into it


@pytest.mark.parametrize(
    ("url", "tidy"),
    [("s3://b//x", "s3://b/x"), ("s3://b/x/./y/", "s3://b/x/y"), ("s3://b/x/../y", "s3://b/y")],
)
def test_an_output_path_with_an_empty_dot_or_dotdot_part_is_refused_naming_the_tidy_one(url, tidy):
    with pytest.raises(
        PipelineError, match=f"^output.dir {re.escape(url)}: an empty, . or .. part.*write {tidy}$"
    ):
        ObjectStore.check(Location(url))
    assert ObjectStore.check(Location("s3://b/x/")).key("run.json") == "b/x/run.json"
