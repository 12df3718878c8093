"""An output in an object store (``--out s3://...``), against a real S3-compatible server (moto's,
on 127.0.0.1) with images served on loopback: through the real command, every guarantee of a
local folder (each line once, resume after kill -9, one writer, failures as one line or rows,
--restart, secrets never shown); and the mirror and resume from seals, as units."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import bucket, descendants, gated_handler, s3_environment, wait_for

from pipeline.bench.server import StaticServer
from pipeline.config import Config, InputConfig, OutputConfig
from pipeline.dedupe import plan_jobs
from pipeline.errors import FetchError, OutputError, PipelineError, SourceError
from pipeline.mirror import check_restart, forget, publish_shard, pull_state, put_record
from pipeline.objects import ObjectStore
from pipeline.records import Job, Outcome, ShardEnd
from pipeline.resume import Resume, plan_run
from pipeline.runner import Coordinator, open_run
from pipeline.sink import Sink, lock
from pipeline.stages import DONE
from pipeline.storage import Location
from pipeline.upload import Uploader

SECRET = "0utput-s3cr3t-n3ver-sh0wn"


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    with s3_environment() as env:
        yield env


def _objects(store: ObjectStore) -> dict[str, bytes]:
    return {name: store.get_bytes(name) or b"" for name in store.names()}


def _rows(store: ObjectStore) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for name in store.names("manifest")
        if name.endswith(".jsonl")
        for line in (store.get_bytes(name) or b"").splitlines()
    ]


def _command(cwd: Path, env: dict[str, str], *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", *args, "-q"]


def _temporary(tmp_path: Path) -> Path:
    """The run's TMPDIR, where its staging folder is made (empty again at the end): a short
    path, as a Unix socket's path (multiprocessing's) must be, whatever pytest's are."""
    digest = hashlib.blake2b(str(tmp_path).encode(), digest_size=6).hexdigest()
    temporary = Path(tempfile.gettempdir()) / f"st-{digest}"
    temporary.mkdir(exist_ok=True)
    return temporary


def _env(tmp_path: Path, s3: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **s3, "TMPDIR": str(_temporary(tmp_path))}


def _run(cwd: Path, s3: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        _command(cwd, s3, *args), cwd=cwd, env=_env(cwd, s3), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _config(tmp_path: Path, shard_size: int = 3, **output: str) -> None:
    extra = "".join(f"{key} = {value}\n" for key, value in output.items())
    (tmp_path / "config.toml").write_text(
        f"[input]\nshard_size = {shard_size}\n"
        f'[output]\n{extra}[output.storage_options]\nkey = "testing"\nsecret = "{SECRET}"\n'
        "[download]\nworkers = 2\n[transform]\nworkers = 1\n"
    )


def test_files_into_s3_every_line_once_each_image_its_object_no_secret_anywhere(
    tmp_path, s3, server, image_dir
):
    names = sorted(p.name for p in image_dir.glob("*.jpg"))[:7]
    urls = [server.url(n) for n in names] + [server.url("missing.jpg")]
    (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
    _config(tmp_path)
    store = bucket("files")
    local = _run(tmp_path, s3, "urls.txt", "--out", "local")
    assert local.returncode == 0, local.stderr
    first = _run(tmp_path, s3, "urls.txt", "--out", "s3://files/run", "-vv")
    assert first.returncode == 0, first.stderr
    rows = _rows(store)
    assert sorted(row["line"] for row in rows) == list(range(1, 9))  # each line exactly once
    ok = [row for row in rows if row["status"] == "ok"]
    assert len(ok) == 7 and [r["error_kind"] for r in rows if r not in ok] == ["http_4xx"]
    objects = _objects(store)
    for row in ok:  # the bytes a local run of the same input wrote
        assert objects[row["path"]] == (tmp_path / "local" / row["path"]).read_bytes()
    seals = [name for name in objects if name.endswith(".seal.json")]
    assert len(seals) == 3 and "run.json" in objects and "report.json" in objects
    assert any(name.startswith("reports/") for name in objects)
    assert not any(name.endswith(".part") for name in objects)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "local", "urls.txt"]
    assert list(_temporary(tmp_path).iterdir()) == []  # the staging folder is gone
    again = _run(tmp_path, s3, "urls.txt", "--out", "s3://files/run", "--dry-run")
    assert again.returncode == 0, again.stderr
    assert "nothing left to do" in " ".join(again.stdout.split())
    assert "s3://files/run" in again.stdout
    report = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", "s3://files/run"], env=_env(tmp_path, s3),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert "8 URLs recorded: 7 ok, 1 failed" in report.stdout
    (tmp_path / "urls.txt").write_text(f"{urls[1]}\n")
    fresh = _run(tmp_path, s3, "urls.txt", "--out", "s3://files/run", "--restart")
    assert fresh.returncode == 0, fresh.stderr
    assert [(row["line"], row["url"]) for row in _rows(store)] == [(1, urls[1])]
    kept = [name for name in store.names() if name.startswith("images/")]
    assert kept == [_rows(store)[0]["path"]]  # the earlier run's images are gone
    assert len(store.names("reports")) == 2  # reports are kept, as in a folder
    for text in (first.stdout, first.stderr, again.stdout, again.stderr, report.stdout):
        assert SECRET not in text
    assert not any(SECRET.encode() in data for data in _objects(store).values())


def _start(cwd: Path, s3: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _command(cwd, s3, *args), cwd=cwd, env=_env(cwd, s3), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_kill_9_mid_run_then_rerun_every_line_once_sealed_shards_kept_one_writer(
    tmp_path, s3, server, image_dir
):
    """Shards 1 and 2 sealed, shard 3 waiting on a gated server: a second run is refused in one
    line; the first is killed -9; once its lease is over a rerun does shards 3 and 4 only."""
    names = sorted(p.name for p in image_dir.glob("*.jpg"))[:8]
    gated = gated_handler()
    with StaticServer(image_dir, handler=gated) as slow:
        urls = [server.url(n) for n in names[:4]] + [slow.url(n) for n in names[4:]]
        (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
        _config(tmp_path, shard_size=2, lease="2")
        store = bucket("killed")
        args = ("urls.txt", "--out", "s3://killed/run")
        proc = _start(tmp_path, s3, *args)
        try:
            seals = lambda: [n for n in store.names("manifest") if n.endswith(".seal.json")]  # noqa: E731
            wait_for(lambda: len(seals()) == 2, what="two shards sealed in the store")
            assert gated.arrived.acquire(timeout=30)  # shard 3 is downloading
            stats = {n: store.get_bytes(n) for n in store.names("manifest") if "stats" in n}
            second = _run(tmp_path, s3, *args)
            assert second.returncode == 2
            assert "another pipeline run is writing into this output (pid" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
            children = set(descendants(proc.pid))
        finally:
            proc.kill()
            proc.wait(timeout=30)
        gone = lambda: not any(map(_alive, children))  # noqa: E731
        wait_for(gone, what="the killed run's lanes and workers to exit")
        gated.gate.set()
        assert not any(n.endswith(".jsonl") and "000000005" in n for n in store.names())
        lock = store.key(".lock")
        ended = lambda: store.fs.info(lock, refresh=True)["LastModified"].timestamp() + 2.5  # noqa: E731
        wait_for(lambda: ended() < __import__("time").time(), what="the killed run's lease")
        again = _run(tmp_path, s3, *args)
        assert again.returncode == 0, again.stderr
    rows = _rows(store)
    assert sorted(row["line"] for row in rows) == list(range(1, 9))
    assert all(row["status"] == "ok" for row in rows)
    assert [row["path"] for row in rows if not store.get_bytes(row["path"])] == []
    assert {n: store.get_bytes(n) for n in stats} == stats  # the sealed shards were not redone
    report = json.loads(store.get_bytes("report.json") or b"{}")
    assert (report["skipped"], report["ok"]) == (4, 4)


# --- units: the mirror, resume from seals, the uploader ---------------------------------------


def _record_run(urls: Path, staging: Path, store: ObjectStore) -> None:
    """What a run's coordinator does, without lanes: every line a failed row, each shard sealed
    and put into the store."""
    config = Config(input=InputConfig(shard_size=2), output=OutputConfig(dir=str(store)))
    pull_state(store, staging)
    plan = plan_run([urls], config, staging, restart=False, store=store)
    put_record(store, staging, "run.json")
    with Sink(staging, config.output, store=store) as sink, plan_jobs(plan, config.input) as jobs:
        for item in Resume(plan).pending(jobs):
            if isinstance(item, ShardEnd):
                sink.end_shard(item)
            else:
                sink.add(Outcome.failed(item, FetchError("dns", "no such host")))


def test_a_rerun_plans_from_the_seals_in_the_store_alone_and_reads_rows_only_to_say_a_change(
    tmp_path, s3
):
    store = bucket("units")
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"http://127.0.0.1:9/{n}.jpg\n" for n in range(5)))
    _record_run(urls, tmp_path / "first", store)
    assert len([n for n in store.names("manifest") if n.endswith(".seal.json")]) == 3
    staging = tmp_path / "staging"
    (staging / "images").mkdir(parents=True)
    with pytest.raises(PipelineError, match="holds an output of its own"):
        pull_state(store, staging)  # not made by a run into a store: maybe someone's
    (staging / ".store").write_text("s3://units/run\n")  # an earlier run's staging, killed
    (staging / "manifest").mkdir()
    (staging / "manifest" / "00000-000000001.jsonl.part").write_text("left by a killed run\n")
    pull_state(store, staging)
    pulled = sorted(
        p.relative_to(staging).as_posix()
        for p in staging.rglob("*")
        if p.is_file() and p.name != ".store"
    )
    assert pulled == ["manifest/" + n for n in (
        "00000-000000001.seal.json", "00000-000000001.stats.json",
        "00000-000000003.seal.json", "00000-000000003.stats.json",
        "00000-000000005.seal.json", "00000-000000005.stats.json",
    )] + ["run.json"]  # fmt: skip
    assert (staging / ".store").read_text() == "s3://units/run\n"
    config = Config(input=InputConfig(shard_size=2), output=OutputConfig(dir=str(store)))
    plan = plan_run([urls], config, staging, restart=False, record=False, store=store)
    assert sorted(plan.sealed) == ["00000-000000001", "00000-000000003", "00000-000000005"]
    assert (plan.done, plan.partial) == (5, frozenset())
    urls.write_text(urls.read_text().replace("/3.jpg", "/changed.jpg"))
    with pytest.raises(
        SourceError, match="line 4 changed since an earlier run into s3://units/run"
    ):
        plan_run([urls], config, staging, restart=False, record=False, store=store)


def test_a_shard_is_put_rows_first_and_seal_last_and_unsealed_when_a_put_fails(
    tmp_path, s3, monkeypatch
):
    store = bucket("order")
    for kind in ("jsonl", "stats.json", "seal.json"):
        (tmp_path / "manifest").mkdir(exist_ok=True)
        (tmp_path / "manifest" / f"00000-000000001.{kind}").write_text("{}\n")
    put: list[str] = []
    real = ObjectStore.put_file

    def failing(self: ObjectStore, local: Path, name: str) -> None:
        put.append(name)
        if name.endswith(".stats.json") and len(put) < 4:
            raise OutputError(f"{self.url(name)}: AccessDenied")
        real(self, local, name)

    monkeypatch.setattr(ObjectStore, "put_file", failing)
    with pytest.raises(OutputError, match="AccessDenied"):
        publish_shard(store, tmp_path, "00000-000000001")
    assert store.names() == ["manifest/00000-000000001.jsonl"]  # not sealed in the store
    publish_shard(store, tmp_path, "00000-000000001")
    assert put[2:] == [
        f"manifest/00000-000000001.{k}" for k in ("jsonl", "stats.json", "seal.json")
    ]


def test_restart_refuses_a_store_output_pipeline_did_not_make_then_deletes_its_own(tmp_path, s3):
    store = bucket("restart")
    store.put_bytes("images/00000/00000/000000001-ab.jpg", b"a user's")
    with pytest.raises(
        PipelineError, match=r"no run\.json\), and --restart would remove its images"
    ):
        check_restart(store)
    store.put_bytes("run.json", b"{}")
    store.put_bytes("manifest/00000-000000001.seal.json", b"{}")
    store.put_bytes("reports/x.json", b"{}")
    forget(store, check_restart(store))
    assert store.names() == ["reports/x.json"]


class _Results:
    def __init__(self) -> None:
        self.items: list[Any] = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def _ok(tmp_path: Path, line: int) -> Outcome:
    job = Job(0, line, f"http://127.0.0.1:9/{line}.jpg", "00000-000000001")
    path = f"images/00000/00000/{line:09d}-ab.jpg"
    (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / path).write_bytes(b"image %d" % line)
    return Outcome.of(job, "ok", path=path, bytes_out=7, sha256="00")


def test_the_uploader_lets_a_row_go_on_once_its_object_is_put_or_as_a_failed_upload_row(
    tmp_path, s3
):
    results = _Results()
    uploader = Uploader(bucket("lane"), tmp_path, results, limit=2, bound=4)
    outcomes = [_ok(tmp_path, line) for line in (1, 2, 3)]
    failed = Outcome.failed(Job(0, 4, "x", "00000-000000001"), FetchError("dns", "no"))
    for item in (*outcomes, failed, DONE):
        uploader.put(item)
    wait_for(lambda: DONE in results.items, what="the uploader's DONE")
    assert results.items[-1] is DONE and len(results.items) == 5  # DONE after every row
    assert sorted(o.key for o in results.items[:-1] if o.status == "ok") == [
        o.key for o in outcomes
    ]
    assert (
        ObjectStore.check(Location("s3://lane/run")).get_bytes(outcomes[0].path or "") == b"image 1"
    )
    assert not list((tmp_path / "images").rglob("*.jpg"))  # staging keeps nothing
    results = _Results()
    broken = Uploader(ObjectStore.check(Location("s3://no-bucket/run")), tmp_path, results,
                      limit=2, bound=4)  # fmt: skip
    broken.put(_ok(tmp_path, 5))
    broken.put(DONE)
    wait_for(lambda: DONE in results.items, what="the uploader's DONE")
    row = results.items[0]
    assert (row.status, row.error_kind, row.path) == ("failed", "upload", None)
    assert "s3://no-bucket/run/images/00000/00000/000000005-ab.jpg" in (row.error or "")
    assert not list((tmp_path / "images").rglob("*.jpg"))


def test_a_store_that_cannot_be_written_is_one_line_and_nothing_is_recorded(tmp_path, s3):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    _config(tmp_path)
    proc = _run(tmp_path, s3, "urls.txt", "--out", "s3://no-such-bucket/run")
    assert proc.returncode == 2
    assert proc.stderr.startswith("pipeline: error: s3://no-such-bucket/run: cannot lock: ")
    assert len(proc.stderr.strip().splitlines()) == 1 and SECRET not in proc.stderr
    store = bucket("notours")
    store.put_bytes("images/a.jpg", b"a user's")
    proc = _run(tmp_path, s3, "urls.txt", "--out", "s3://notours/run", "--restart")
    assert proc.returncode == 2 and "--restart would remove its images" in proc.stderr
    assert store.names() == ["images/a.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "urls.txt"]
    assert list(_temporary(tmp_path).iterdir()) == []


def test_a_run_whose_lock_was_taken_over_stops_writing_there_with_one_line(tmp_path, s3):
    store = bucket("lost")
    config = Config(output=OutputConfig(dir=str(store)))
    coordinator = Coordinator(config, tmp_path, store=store)
    try:
        coordinator.lock_lost = threading.Event()
        coordinator._held()
        assert coordinator.failure is None and coordinator.sink.store is store
        coordinator.lock_lost.set()
        coordinator._held()
        assert coordinator.failure == (
            "s3://lost/run: another run took over this output's lock; stopped writing"
        )
        assert coordinator.sink.store is None and coordinator.stopping  # nothing more put
    finally:
        coordinator.lanes.close()
        coordinator.sink.close()


def test_a_store_shown_anywhere_shows_no_secret():
    store = ObjectStore(Location("s3://b/run", {"key": "k", "secret": SECRET}))
    assert SECRET not in repr(store) and SECRET not in str(store)
    assert "s3://b/run" in repr(store)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_store_that_refuses_connections_is_one_line_naming_it(tmp_path, s3):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    _config(tmp_path)
    with socket.socket() as closed:  # bound, never listening: every connection is refused
        closed.bind(("127.0.0.1", 0))
        refused = {**s3, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed.getsockname()[1]}"}
        refused["AWS_MAX_ATTEMPTS"] = "1"  # botocore's own retries: seconds, not the point here
        proc = _run(tmp_path, refused, "urls.txt", "--out", "s3://refused/run")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("pipeline: error: s3://refused/run: cannot lock: Could not ")
    assert len(proc.stderr.strip().splitlines()) == 1 and SECRET not in proc.stderr


def test_a_staging_folder_another_run_holds_is_refused_naming_output_staging(tmp_path, s3):
    store = bucket("heldstaging")
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/a.jpg\n")
    config = Config(output=OutputConfig(dir=str(store), staging=str(tmp_path / "staging")))
    (tmp_path / "staging").mkdir()
    with (
        lock(tmp_path / "staging"),  # another run's
        pytest.raises(PipelineError) as refused,
        open_run([tmp_path / "urls.txt"], config, restart=False),
    ):
        pass
    assert str(refused.value).startswith(f"output.staging {tmp_path / 'staging'}: another ")
    assert str(refused.value).endswith("or choose another output.staging")
    assert store.names() == []  # the store's lock was released with the refusal
