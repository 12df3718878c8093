"""The coordinator's side of its lanes: start them, wait on them all at once, replace a dead one.

    Lanes.start(i)      a lane process, with its LaneSetup: its sections of the config (the
                        workers' WorkerSetup built once, here), its LaneShape: its threads,
                        its share of the transform workers, its bounds (shape.py)
    Lanes.wait()        the lanes with a message ready (one epoll for every results pipe, and a
                        wake-up pipe that a signal handler writes to)
    Lanes.ended(h, d)   a lane said LaneDone: its figures are kept, its pipes closed
    Lanes.lost(h)       a lane's pipe closed without LaneDone: it died; the cause, in words
    Lanes.silent()      the lanes that sent nothing for executor.heartbeat seconds: hung (a
                        stopped process, a stuck one); the caller kills them and deals again
    Lanes.kill()        what is still running (after a bug, or a second Ctrl-C)

Only the coordinator's main thread calls it; the sampler thread only reads the lists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import selectors
import time
from collections.abc import Iterator
from pathlib import Path

from .config import Config
from .errors import PipelineError, limit_hint
from .lane import LaneDone, LaneHandle, LaneSetup
from .layout import OutputLayout
from .logs import LogSetup
from .objects import ObjectStore
from .progress import LaneGauge
from .shape import RunShape
from .transform import WorkerSetup
from .upload import UploadSetup


def worker_setup(config: Config, out_dir: Path) -> WorkerSetup:
    """What each transform process is sent: the transform section, where and how it writes (its
    logging is added as each lane starts: ``Lanes.setup``)."""
    return WorkerSetup(
        config.transform,
        str(out_dir),
        layout=OutputLayout.of(config.output),
        hash_column=config.input.hash_column,
        caption_column=config.output.caption_column,
    )


def kilobytes(size: int) -> int:
    return -(-size // 1000)  # rounded up: a byte held is not nothing


class Lanes:
    """Every lane of one run: those running, those that ended, and their figures."""

    def __init__(
        self, config: Config, shape: RunShape, out_dir: Path, store: ObjectStore | None = None
    ) -> None:
        self.config = config
        # each image put by its lane; webdataset: none, the packer puts each tar (formats.py)
        webdataset = OutputLayout.of(config.output).webdataset
        self.upload = (
            None if store is None or webdataset else UploadSetup(store, config.output.uploads)
        )
        self.shape = shape
        self.worker = worker_setup(config, out_dir)  # once: every lane gets the same
        self.running: list[LaneHandle] = []
        self.every: list[LaneHandle] = []  # ... and those that ended: the bars' counts
        self.finished: list[LaneDone] = []
        self.restarts = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()  # results pipes, and the wake pipe
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        lanes = shape.lanes
        self.gauges = (
            LaneGauge("fetched", sum(s.fetched for s in lanes), lambda h: h.progress.fetched),
            LaneGauge("pool", sum(s.in_flight for s in lanes), lambda h: h.progress.pool),
            LaneGauge("jobs", 0, lambda h: len(h.outstanding)),
            LaneGauge("bodies_kb", sum(s.buffered_bytes for s in lanes) // 1000,
                      lambda h: kilobytes(h.progress.buffered)),
        )  # fmt: skip

    def start(self, index: int) -> None:
        method = self.config.transform.start_method
        context = multiprocessing.get_context(method)
        if method == "forkserver":  # lanes fork from a server that has imported their code
            context.set_forkserver_preload(["pipeline.lane"])
        try:
            handle = LaneHandle(self.setup(index), context)
        except OSError as exc:  # no pipes, no process: EMFILE, EAGAIN, the interpreter is gone
            raise PipelineError(f"cannot start a lane process: {exc}{limit_hint(exc)}") from None
        self._selector.register(handle.results, selectors.EVENT_READ, handle)
        self.running.append(handle)
        self.every.append(handle)
        for gauge in self.gauges:
            gauge.lanes = self.running
        self.gauges[2].bound = sum(h.credit for h in self.running)

    def setup(self, index: int) -> LaneSetup:
        """What lane ``index`` is sent: the sections of the config it uses, not the whole."""
        log_setup = LogSetup.current()  # now: the relay runs once the run has begun
        worker = dataclasses.replace(self.worker, log_setup=log_setup)
        return LaneSetup(
            index, self.config.download, worker, self.config.executor.heartbeat,
            self.shape.lanes[index], os.getpid(), log_setup, self.upload,
        )  # fmt: skip

    def wait(self, timeout: float | None = None) -> Iterator[LaneHandle]:
        """Block until a lane has a message (or a signal woke us, or ``timeout`` seconds passed);
        the lanes that have one."""
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                os.read(self._wake_r, 64)  # a signal: the caller looks at its stop flag
            elif key.data in self.running:
                yield key.data

    def wake(self) -> None:
        """Called from a signal handler: make ``wait`` return."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"!")

    def silent(self, now: float) -> list[LaneHandle]:
        """The running lanes not heard from for ``executor.heartbeat`` seconds. A lane with a
        message waiting is not silent (the caller has not read it yet)."""
        limit = self.config.executor.heartbeat
        return [h for h in self.running if now - h.heard > limit and not h.results.poll()]

    def next_silence(self) -> float:
        """Seconds until the first running lane would be silent too long (for a wait's timeout)."""
        oldest = min((h.heard for h in self.running), default=time.monotonic())
        return max(0.0, oldest + self.config.executor.heartbeat - time.monotonic())

    def excuse(self) -> None:
        """The coordinator itself was not running (stopped with its lanes, e.g. Ctrl-Z): what it
        did not hear meanwhile says nothing about the lanes."""
        now = time.monotonic()
        for handle in self.running:
            handle.heard = max(handle.heard, now - self.config.executor.heartbeat / 2)

    def ended(self, handle: LaneHandle, done: LaneDone) -> None:
        self.finished.append(done)
        handle.progress = dataclasses.replace(
            handle.progress,
            downloaded=done.download.items,
            download_failed=done.download.failed,
            transformed=done.transform.items,
            transform_failed=done.transform.failed,
        )
        self._drop(handle)

    def lost(self, handle: LaneHandle) -> str:
        """A lane died; it is dropped (its ``outstanding`` jobs are the caller's). Why, in words."""
        self._drop(handle)
        code = handle.process.exitcode
        return f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"

    def _drop(self, handle: LaneHandle) -> None:
        self._selector.unregister(handle.results)
        self.running.remove(handle)
        handle.close()

    def kill(self, handles: list[LaneHandle] | None = None) -> None:
        """Kill ``handles`` (default: whatever lane still runs); SIGKILL ends a stopped process
        too. Their workers and forkservers follow them."""
        for handle in self.running if handles is None else handles:
            with contextlib.suppress(OSError, ValueError):
                handle.process.kill()

    def close(self) -> None:
        self.kill()
        for handle in list(self.running):
            self._drop(handle)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
