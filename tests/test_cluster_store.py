"""Dask without a shared disk: a scheduler and two workers whose processes cannot see the
client's folders (each in a mount namespace of its own, the test's temporary folders hidden
under an empty tmpfs), writing into a real S3-compatible server (moto's, on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import s3_environment, wait_for

from pipeline.bench.server import StaticServer
from pipeline.config import (
    Config,
    DownloadConfig,
    ExecutorConfig,
    InputConfig,
    OutputConfig,
    Thumbnail,
    TransformConfig,
)
from pipeline.errors import PipelineError
from pipeline.objects import ObjectStore
from pipeline.storage import Location

distributed = pytest.importorskip("distributed")
pytest.importorskip("s3fs")

from pipeline.cluster import run_on_dask  # noqa: E402

SHARD = 10
BUCKET = "out"
DASK = str(Path(sys.executable).with_name("dask"))


UNSHARE = ["unshare", "-m" if os.geteuid() == 0 else "-rm", "--propagation", "private"]


def _can_hide() -> bool:
    try:
        probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _can_hide(), reason="needs unshare -m (or user namespaces)")


def hidden(folder: Path, *command: str) -> list[str]:
    """``command`` in a mount namespace of its own where ``folder`` is an empty tmpfs."""
    script = 'mount -t tmpfs none "$0" && exec "$@"'
    return [*UNSHARE, "sh", "-c", script, str(folder), *command]


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with s3_environment() as env:
        ObjectStore(Location(f"s3://{BUCKET}")).fs.mkdir(BUCKET)
        yield env


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory) -> Iterator[tuple[str, Any, Path]]:
    """A scheduler, two workers that cannot see the client's temporary folders, a client."""
    secret = tmp_path_factory.getbasetemp()  # every test's folders, the images' too
    folder = tmp_path_factory.mktemp("scheduler")
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
    # a worker's temporary files (its tasks' staging) in its own tmpfs: gone with it
    hid = {**env, "TMPDIR": str(secret)}
    started: list[subprocess.Popen[bytes]] = []
    log = (folder / "cluster.log").open("wb")
    try:
        file = folder / "scheduler.json"
        started.append(subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(file)], env=env, stdout=log, stderr=log,
            start_new_session=True,
        ))  # fmt: skip
        wait_for(lambda: _address(file) is not None, what="the scheduler")
        address = str(_address(file))
        for _ in range(2):
            started.append(subprocess.Popen(
                hidden(secret, DASK, "worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                       "--no-dashboard", "--memory-limit", "0"), env=hid, stdout=log, stderr=log,
                start_new_session=True,
            ))  # fmt: skip
        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
            yield address, client, secret
    finally:  # each in a session of its own: its group is it, its worker and their children
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _address(file: Path) -> str | None:
    """The scheduler's address, once its file is written whole."""
    try:
        return str(json.loads(file.read_text())["address"])
    except (OSError, ValueError, KeyError):
        return None


def make_config(out: str, **output: Any) -> Config:
    return Config(
        input=InputConfig(shard_size=SHARD),
        output=OutputConfig(dir=out, folder_size=20, **output),
        download=DownloadConfig(workers=3),
        transform=TransformConfig(workers=1, ops=(Thumbnail(64, 48),)),
        executor=ExecutorConfig(kind="dask", lanes=1, retries=2, shards_in_flight=2),
    )


def url_file(folder: Path, server: StaticServer, image_dir: Path, count: int) -> Path:
    """``count`` image URLs (distinct), and one that fails, as line 4."""
    names = sorted(p.name for p in image_dir.iterdir())
    urls = [server.url(f"{names[n % len(names)]}?n={n}") for n in range(count)]
    urls[3:3] = [server.url("missing.jpg")]
    path = folder / "urls.txt"
    path.write_text("\n".join(urls) + "\n")
    return path


def store_of(prefix: str) -> ObjectStore:
    return ObjectStore(Location(f"s3://{BUCKET}/{prefix}"))


def stored_rows(store: ObjectStore) -> dict[int, dict[str, Any]]:
    """The store's manifest rows of its sealed shards, by line; each line at most once."""
    rows = []
    for name in store.names("manifest"):
        if name.endswith(".jsonl") and store.get_bytes(name.replace(".jsonl", ".seal.json")):
            rows += [json.loads(line) for line in (store.get_bytes(name) or b"").splitlines()]
    lines = Counter(row["line"] for row in rows)
    assert not lines or max(lines.values()) == 1, "a line recorded twice"
    return {row["line"]: row for row in rows}


def test_the_workers_cannot_see_the_clients_folders_and_a_local_out_is_one_line(
    cluster, tmp_path, server, image_dir
):
    """The proof the other tests rest on: no worker sees the input, the images, or an output
    folder of the client's; a run into such a folder fails in one line instead of writing into
    each worker's own invisible copy of it."""
    address, client, secret = cluster
    source = url_file(tmp_path, server, image_dir, 4)
    assert tmp_path.is_relative_to(secret) and image_dir.is_relative_to(secret)
    seen = client.run(os.path.exists, str(source))
    assert len(seen) == 2 and not any(seen.values())
    assert not any(client.run(os.path.exists, str(image_dir)).values())
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", str(source), "--dask", address, "-q",
         "--out", str(tmp_path / "local")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not found on Dask worker" in lines[0] and "a shared filesystem" in lines[0]
    assert (tmp_path / "local" / "run.json").exists()  # the driver's own folder, and only that
    assert not (tmp_path / "local" / "manifest").exists()


def test_a_dask_run_into_s3_puts_every_line_once_and_a_rerun_resumes_from_the_store(
    cluster, tmp_path, server, image_dir
):
    _, client, _ = cluster
    source = url_file(tmp_path, server, image_dir, 14)  # 15 lines: shards of 10 and 5
    config = make_config(f"s3://{BUCKET}/files")
    first = run_on_dask([source], config, client=client)
    assert first.urls == 15 and first.ok == 14
    store = store_of("files")
    rows = stored_rows(store)
    assert sorted(rows) == list(range(1, 16))
    assert Counter(row["status"] for row in rows.values()) == {"ok": 14, "failed": 1}
    names = set(store.names())
    for row in rows.values():
        if row["status"] == "ok":
            assert row["path"] in names and row["path"].startswith("images/")
    assert len([n for n in names if n.endswith(".seal.json")]) == 2
    assert {"run.json", "report.json"} <= names and not store.names(".staging")
    report = json.loads(store.get_bytes("report.json") or b"{}")
    assert report["urls"] == 15 and report["ok"] == 14
    # a shard's seal gone from the store: the driver's plan, read from the store, redoes it alone
    store.delete(["manifest/00000-000000011.seal.json"])
    seen: list[str] = []
    again = run_on_dask(
        [source], config, client=client, on_shard=lambda result: seen.append(result.shard)
    )
    assert seen == ["00000-000000011"] and again.urls == 5 and again.skipped == SHARD
    assert sorted(stored_rows(store)) == list(range(1, 16))


def test_webdataset_into_s3_on_dask_names_the_tars_in_order_and_webdataset_reads_them(
    cluster, tmp_path, server, image_dir
):
    _, client, _ = cluster
    source = url_file(tmp_path, server, image_dir, 14)
    config = make_config(f"s3://{BUCKET}/wds", format="webdataset", shard_size=4)
    report = run_on_dask([source], config, client=client)
    assert report.urls == 15 and report.ok == 14
    store = store_of("wds")
    rows = stored_rows(store)
    assert sorted(rows) == list(range(1, 16))
    tars = [name for name in store.names("shards") if name.endswith(".tar")]
    # shards of 10 lines (9 ok) and 5: 3 + 2 tars of at most 4 samples
    assert tars == [f"shards/{n:05d}.tar" for n in range(5)]
    assert not store.names("shards/.packed")
    index = json.loads(store.get_bytes("shards/index.json") or b"{}")
    assert [tar["name"] for tar in index["tars"]] == [f"{n:05d}.tar" for n in range(5)]
    assert index["samples"] == 14
    local = tmp_path / "read"
    store.fs.get(store.key("shards") + "/", str(local), recursive=True)
    keys = _read_webdataset(local, 5)
    assert sorted(keys) == sorted(row["key"] for row in rows.values() if row["status"] == "ok")


def _read_webdataset(folder: Path, count: int) -> list[str]:
    import webdataset as wds

    pattern = str(folder / f"{{00000..{count - 1:05d}}}.tar")
    dataset = wds.WebDataset(pattern, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg")
    samples = list(dataset)
    assert all(max(image.size) <= 64 for _, image in samples)
    return [key for key, _ in samples]


def test_a_worker_killed_mid_run_loses_nothing(cluster, tmp_path, image_dir):
    """kill -9 of a worker process while it runs a shard: Dask runs the shard again elsewhere
    (or on the worker its nanny starts again), and the store ends with every line once."""
    _, client, _ = cluster
    killed: list[int] = []

    def kill_a_busy_worker() -> bool:
        busy = [worker for worker, keys in client.processing().items() if keys]
        if not busy:
            return False
        pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return True

    with StaticServer(image_dir, latency=0.05) as slow:
        source = url_file(tmp_path, slow, image_dir, 19)  # 20 lines: 2 shards
        config = make_config(f"s3://{BUCKET}/killed")
        with _in_thread(run_on_dask, [source], config, client=client) as running:
            wait_for(kill_a_busy_worker, what="a worker running a shard")
            report = running()
    assert killed
    rows = stored_rows(store_of("killed"))
    assert sorted(rows) == list(range(1, 21)) and report.urls == 20
    assert Counter(row["status"] for row in rows.values()) == {"ok": 19, "failed": 1}


@contextlib.contextmanager
def _in_thread(function: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
    """``function`` running in a thread; yields a call that waits for its result."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(function, *args, **kwargs)
        yield lambda: future.result(timeout=120)


def test_a_store_a_run_cannot_lock_is_refused_before_any_work(tmp_path):
    config = make_config("memory://out")
    with pytest.raises(PipelineError, match="memory:// lives in one process"):
        run_on_dask([tmp_path / "urls.txt"], config, client=object())


def test_a_driver_whose_lock_was_taken_over_submits_nothing_more(
    cluster, tmp_path, server, image_dir, monkeypatch
):
    """Another run took the store's lock (this one's lease had ended): the driver stops before
    its next shard, in one line, and the shards it had not submitted are not in the store."""
    import pipeline.cluster as cluster_module

    _, client, _ = cluster
    opened = cluster_module.open_run

    @contextlib.contextmanager
    def taken_over(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with opened(*args, **kwargs) as plan:
            assert plan.lock_lost is not None
            plan.lock_lost.set()  # as StoreLock does when its renewal finds another owner
            yield plan

    monkeypatch.setattr(cluster_module, "open_run", taken_over)
    source = url_file(tmp_path, server, image_dir, 4)
    with pytest.raises(PipelineError, match="another run took over this output's lock"):
        run_on_dask([source], make_config(f"s3://{BUCKET}/lost"), client=client)
    assert not store_of("lost").names("manifest")
