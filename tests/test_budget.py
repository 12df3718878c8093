"""The byte budget: takes wait for room, releases give it back, nothing deadlocks; and a lane
run against slow servers sending large bodies holds no more than its budget and one body."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
from PIL import Image

from pipeline.bench.faults import FaultServer
from pipeline.budget import ByteBudget
from pipeline.errors import FetchError
from pipeline.sink import read_manifest

GUARD = 10.0  # seconds before a test calls a wait a hang


class Thread:
    """A download thread the test drives a step at a time; each step's end is an event."""

    def __init__(self) -> None:
        self._steps: queue.SimpleQueue[tuple[Callable[[], object], threading.Event] | None] = (
            queue.SimpleQueue()
        )
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def do(self, step: Callable[[], object]) -> threading.Event:
        done = threading.Event()
        self._steps.put((step, done))
        return done

    def _run(self) -> None:
        while (item := self._steps.get()) is not None:
            step, done = item
            try:
                step()
            except BaseException as exc:
                self.errors.append(exc)
            done.set()

    def close(self) -> None:
        self._steps.put(None)
        self._thread.join(GUARD)


@pytest.fixture
def threads():
    made: list[Thread] = []
    yield lambda: made.append(Thread()) or made[-1]
    for thread in made:
        thread.close()


def test_a_take_waits_until_the_pool_gives_bytes_back(threads):
    budget = ByteBudget(100)
    a, b = threads(), threads()
    assert a.do(lambda: budget.take(60)).wait(GUARD)
    assert a.do(lambda: budget.hand_over(60)).wait(GUARD)  # in the pool now
    took = b.do(lambda: budget.take(50))
    assert not took.wait(0.2), "60 + 50 bytes went past a budget of 100"
    budget.release(60)  # the pool is done with that body
    assert took.wait(GUARD)
    assert (budget.used, budget.peak) == (50, 60)


def test_a_failed_download_gives_back_what_it_took(threads):
    budget = ByteBudget(100)
    a, b = threads(), threads()
    assert a.do(lambda: budget.take(40)).wait(GUARD)
    assert a.do(lambda: budget.take(40)).wait(GUARD)
    took = b.do(lambda: budget.take(30))
    assert not took.wait(0.2)
    assert a.do(budget.drop).wait(GUARD)  # its 80 bytes are given back, not b's
    assert took.wait(GUARD)
    assert budget.used == 30


def test_partial_bodies_that_fill_the_budget_do_not_deadlock(threads):
    budget = ByteBudget(100)
    a, b = threads(), threads()
    assert a.do(lambda: budget.take(50)).wait(GUARD)
    assert b.do(lambda: budget.take(50)).wait(GUARD)
    a_more = a.do(lambda: budget.take(50))
    assert not a_more.wait(0.2)  # b may still finish its body: a waits
    b_more = b.do(lambda: budget.take(50))  # now both wait, nothing in the pool: one goes on
    assert b_more.wait(GUARD) or a_more.wait(GUARD)
    first, second = (b, a_more) if b_more.is_set() else (a, b_more)
    assert budget.used == 150  # the budget and one body at most
    assert first.do(lambda: budget.hand_over(100)).wait(GUARD)
    assert not second.wait(0.2)  # the body is in the pool: the other waits for it
    budget.release(100)
    assert second.wait(GUARD)
    assert (budget.used, budget.peak) == (100, 150)
    assert not a.errors and not b.errors


def test_a_body_larger_than_the_budget_still_goes_through(threads):
    budget = ByteBudget(100)
    a = threads()
    assert a.do(lambda: budget.take(150)).wait(GUARD)  # alone: nothing could ever free room
    assert a.do(lambda: budget.hand_over(150)).wait(GUARD)
    budget.release(150)
    assert budget.used == 0


def test_cancel_ends_every_wait(threads):
    budget = ByteBudget(100)
    a, b = threads(), threads()
    assert a.do(lambda: budget.take(100)).wait(GUARD)
    assert a.do(lambda: budget.hand_over(100)).wait(GUARD)
    took = b.do(lambda: budget.take(10))
    assert not took.wait(0.2)
    budget.cancel()
    assert took.wait(GUARD)
    assert len(b.errors) == 1 and isinstance(b.errors[0], FetchError)


# --- through the real command: slow servers sending large bodies -------------------------------

CONFIG = """
[download]
workers = 6
max_bytes = 1100000
max_buffered_bytes = {budget}
chunk_size = 65536
retries = 0
[transform]
workers = 1
[[transform.ops]]
op = "thumbnail"
width = 32
height = 32
"""


def test_a_lane_holds_at_most_its_budget_and_one_body(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    for i in range(6):  # noise: a PNG of ~1 MB each
        Image.frombytes("RGB", (580, 580), os.urandom(580 * 580 * 3)).save(big / f"{i}.png")
    largest = max(p.stat().st_size for p in big.iterdir())
    assert 900_000 < largest < 1_100_000
    with FaultServer(big) as server:
        urls = [server.fault(f"slow-body/0.5/{i}.png") for i in range(6)]
        (tmp_path / "urls.txt").write_text("".join(f"{url}\n" for url in urls))
        (tmp_path / "config.toml").write_text(CONFIG.format(budget=1_100_000))
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", "run", "urls.txt", "--out", "out", "-q"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = list(read_manifest(tmp_path / "out"))
    assert sorted(row["url"] for row in rows) == sorted(urls)
    assert {row["status"] for row in rows} == {"ok"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    bodies = next(q for q in report["queues"] if q["name"] == "bodies_kb")
    # six bodies read at once would be ~6000 KB; the budget allows 1100 KB and one body more
    assert largest // 1000 <= bodies["peak"] <= (1_100_000 + largest) // 1000 + 1
    assert bodies["bound"] == 1100, bodies
