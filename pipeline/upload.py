"""A lane's outputs put into the store before their rows go on (an output in a store).

    worker: image (and caption) -> staging ---> Outcome ---> owner thread
                                                              | put(outcome)
                                                              v
    Uploader: each ok outcome's files put (objects.Uploads: coroutines on fsspec's loop, at
              most output.uploads at once), then deleted from staging; the outcome goes on
              only then, to the lane's results queue: ok with its object in the store, or a
              failed ``upload`` row (transient: a rerun retries it) when a put failed
                                                              |
                                                              v
                                                   [results queue] -> the lane's sender

Other items (failed rows, DONE) go on at once, but DONE only once every put has ended, so no
row is lost behind it. At most ``bound`` outcomes wait on their puts: the owner's ``put``
blocks beyond that, as it does on a full results queue, so staging holds a bounded number of
images. The coordinator never sees an image body: only the row, once its object exists.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .layout import caption_file
from .objects import ObjectStore, Uploads
from .records import Outcome
from .stages import DONE, _Done

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class UploadSetup:
    """What a lane needs to put its outputs into a store (a field of its LaneSetup)."""

    store: ObjectStore
    uploads: int  # output.uploads: puts at once


class Queue(Protocol):
    def put(self, item: Outcome | _Done, /) -> None: ...


class Uploader:
    """Puts each ok outcome's files into ``store`` before it goes on to ``results``."""

    def __init__(
        self, store: ObjectStore, out_dir: Path, results: Queue, *, limit: int, bound: int
    ) -> None:
        self.uploads = Uploads(store, limit)
        self.out_dir = out_dir
        self.results = results
        self._room = threading.Semaphore(bound)
        self._lock = threading.Lock()
        self._waiting = 0  # outcomes whose puts have not all ended
        self._done = False  # DONE came while some were waiting: it goes on after the last

    @classmethod
    def of(cls, setup: UploadSetup, out_dir: Path, results: Queue) -> Uploader:
        """A lane's: at most ``output.uploads`` puts at once, twice that many rows waiting."""
        return cls(setup.store, out_dir, results, limit=setup.uploads, bound=2 * setup.uploads)

    def put(self, item: Outcome | _Done) -> None:
        if item is DONE:
            with self._lock:
                self._done = self._waiting > 0
            if not self._done:
                self.results.put(DONE)
            return
        assert isinstance(item, Outcome)
        if item.status != "ok" or item.path is None:
            self.results.put(item)
            return
        names = [item.path]
        if (self.out_dir / caption_file(item.path)).is_file():
            names.append(caption_file(item.path))
        self._room.acquire()  # the owner waits here while ``bound`` outcomes wait on puts
        with self._lock:
            self._waiting += 1
        left = [len(names)]
        errors: list[str] = []

        def ended(future: concurrent.futures.Future[None]) -> None:  # on fsspec's loop thread
            error = "cancelled" if future.cancelled() else future.exception()
            with self._lock:
                if error is not None:
                    errors.append(str(error))
                left[0] -= 1
                if left[0]:
                    return
            self._finish(item, names, errors)

        for name in names:
            self.uploads.put(self.out_dir / name, name).add_done_callback(ended)

    def _finish(self, outcome: Outcome, names: list[str], errors: list[str]) -> None:
        for name in names:  # put, or failed: staging keeps nothing either way
            with contextlib.suppress(OSError):
                (self.out_dir / name).unlink()
        if errors:
            log.debug("%s: %s", outcome.key, errors[0])
            outcome = dataclasses.replace(
                outcome, status="failed", error_kind="upload", error=errors[0], path=None,
                sha256=None, bytes_out=0, width_out=None, height_out=None,
            )  # fmt: skip
        self.results.put(outcome)
        with self._lock:
            self._waiting -= 1
            last = self._done and not self._waiting
        self._room.release()
        if last:
            self.results.put(DONE)
