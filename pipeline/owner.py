"""A lane's owner: the one thread that takes every decision about the lane's jobs and workers.

    coordinator --jobs pipe--+                 +--> [jobs queue] --> download threads
                             v                 |                        | post: a body, the
    download threads --post--> Mailbox + a byte on its wake pipe        | crew's end, a failure
                             v                 |                        v
               owner: one epoll (a selector kept for the lane's life) over the jobs pipe, the
                      wake pipe, each worker's outcomes pipe and sentinel; timeout: the grace,
                      the nearest transform.timeout, the next look for stopped workers)
                             | a task of up to CHUNK bodies    ^ its Outcomes, one message
                             v                                 |
                      Worker x its share of transform.workers (workers.py)
                             | Outcome
                             v
                      [results queue] --> the lane's sender

Only the owner submits, and knows what each worker holds, in order: a worker that dies is blamed
for exactly the image it was on, which is tried again alone (``crash_retries`` times) before it
is recorded as ``worker_crash``; what else it held is sent again, unblamed. One whose image takes
longer than ``transform.timeout`` (wall time, as the owner sees it; a pause of the whole lane,
Ctrl-Z, is not counted) is killed: that image is ``transform_timeout``. The owner alone decides
to stop (a STOP, the coordinator gone, a failure posted): it cuts the downloads, drops the bodies,
lets the workers' images finish within ``transform.shutdown_grace`` (the wait's timeout), then
kills them. What is killed or dropped then is not recorded: the next run does it.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing import connection
from multiprocessing.connection import Connection
from typing import Protocol

from .budget import ByteBudget
from .errors import TransformError, limit_hint
from .mailbox import Mailbox
from .metrics import Stage
from .records import Fetched, Job, Outcome
from .shape import CHUNK, LaneShape
from .stages import DONE, _Done, label_thread
from .transform import WorkerSetup
from .workers import Lost, Worker, context_of, state

log = logging.getLogger(__name__)

END = "end"  # no more jobs: finish those you have, send the last rows and LaneDone
STOP = "stop"  # interrupted: take no more jobs, give the workers their grace, send what is done
_PAUSE = 1.0  # a wait this much longer than its timeout: the lane was paused (Ctrl-Z), not slow


def pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when process ``pid`` ends (Linux >= 5.3), or None;
    if it has ended already, this process exits."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd: the coordinator's end is seen by its pipes
        return None


class Results(Protocol):
    """Where the owner puts rows, then DONE (a lane's queue, which takes other items too)."""

    def put(self, item: Outcome | _Done, /) -> None: ...


class Owner:
    """The owner thread of one lane, its mailbox and its workers."""

    def __init__(
        self,
        setup: WorkerSetup,
        jobs: queue.SimpleQueue[Job | _Done],
        results: Results,
        stage: Stage,
        *,
        shape: LaneShape,
        heartbeat: float,
        budget: ByteBudget,
        on_stop: Callable[[], None],
        failed: Callable[[str], None],
        watch: int | None = None,
    ) -> None:
        self.transform = setup.config  # its workers' section: timeouts, retries, start method
        self.heartbeat = heartbeat  # executor.heartbeat: how long a stopped worker is let be
        self.jobs = jobs  # the download threads': jobs from the coordinator, then DONE
        self.results = results
        self.stage = stage
        self.budget = budget  # the lane's: each body is given back once its image has ended
        self.on_stop = on_stop  # cut the downloads
        self.failed = failed  # tell the coordinator: one line, the run stops
        self.count = shape.workers  # its share of transform.workers
        self.watch = watch  # a pidfd of the coordinator: readable once it has ended
        self.bound = shape.in_flight
        self.mailbox = Mailbox(shape.fetched)
        self.stop = threading.Event()  # set by the owner only; read by the download threads
        self.workers: list[Worker] = []
        self.again: deque[tuple[Fetched, int, bool]] = deque()  # (body, attempt, alone)
        self.name, self.peak, self.in_flight = "pool", 0, 0  # images taken from the mailbox
        self.restarts = 0  # workers that died and were replaced
        self.error: BaseException | None = None
        self._context = context_of(self.transform.start_method)
        self._setup = setup  # sent to each worker as it starts
        self._conn: Connection | None = None
        # registered once each (a worker as it starts, until it has died), not every wait: a
        # selector built for each wait was a third of the owner's CPU
        self._selector = selectors.DefaultSelector()
        self._ended = self._jobs_done = self._failed = False
        self._grace_end: float | None = None
        self._checked = 0.0
        self._stopped: dict[int, float] = {}  # worker pid: since when it is seen stopped
        self._thread = threading.Thread(target=self._run, name="owner")

    def depth(self) -> int:
        return self.in_flight

    def start(self, jobs: Connection) -> None:
        self._conn = jobs
        self._thread.start()

    def join(self) -> None:
        """Wait for the owner; re-raise its error, if any."""
        self._thread.join()
        self._selector.close()
        self.mailbox.dispose()
        if self.error is not None:
            raise self.error

    # --- the owner thread ------------------------------------------------------------------------

    def _run(self) -> None:
        label_thread()
        try:
            self._selector.register(self.mailbox.fileno, selectors.EVENT_READ, self._mail)
            if self._conn is not None:
                self._selector.register(self._conn, selectors.EVENT_READ, self._message)
            if self.watch is not None:
                self._selector.register(self.watch, selectors.EVENT_READ, self._orphaned)
            while len(self.workers) < self.count and not self.stop.is_set():
                self._start()  # at once: a lane that cannot start them stops before it downloads
            while not (self._ended and not self.in_flight and not self.mailbox.depth()):
                self._step()
        except BaseException as exc:
            self.error = exc
            self._stop()
        finally:
            try:
                self._close()  # here: the lane still beats while its workers exit
            finally:
                self.mailbox.close()
                self.results.put(DONE)

    def _step(self) -> None:
        timeout = self._timeout()
        before = time.monotonic()
        ready = self._selector.select(timeout)
        if timeout is not None and time.monotonic() - before > timeout + _PAUSE:
            for worker in self.workers:  # the lane was paused whole: not the images' time
                worker.paused(time.monotonic() - before - timeout)
        for key, _ in ready:
            if self._selector.get_map().get(key.fd) is key:  # not unregistered by an earlier one
                key.data()
        self._watch()
        self._dispatch()

    def _orphaned(self) -> None:
        """The coordinator is gone, killed maybe: nobody will read our rows."""
        log.debug("the coordinator has ended: this lane ends too")
        os._exit(1)  # the workers read the end of their pipes and exit too

    def _timeout(self) -> float | None:
        now, heartbeat = time.monotonic(), self.heartbeat
        ends = [self._grace_end] if self._grace_end is not None else []
        if self.workers:
            ends.append(self._checked + heartbeat / 3)
        if limit := self.transform.timeout:
            for worker in self.workers:  # exact once its image has begun; until then, the
                since = worker.busy_since()  # earliest it may begin: wake then, and look again
                if since is None and worker.held and worker.since + limit > now:
                    since = worker.since
                if since is not None and not worker.killed_for:
                    ends.append(since + limit)
        return max(0.0, min(ends) - now) if ends else None

    def _message(self) -> None:
        assert self._conn is not None
        try:
            message = self._conn.recv()
        except (EOFError, OSError):  # closed: the coordinator is gone
            message = None
        if isinstance(message, list):
            for job in message:
                self.jobs.put(job)
            return
        if message is None:  # the coordinator closes it only once it has our LaneDone: gone
            self._selector.unregister(self._conn)
            self._conn = None
        if message != END:  # STOP, or the coordinator is gone
            self._stop()
        self._end_jobs()

    def _end_jobs(self) -> None:
        if not self._jobs_done:
            self._jobs_done = True
            self.jobs.put(DONE)  # each download thread passes it on as it leaves

    def _mail(self) -> None:
        ended, failures = self.mailbox.drain()
        self._ended = self._ended or ended
        for message in failures:
            self._fail(message)

    def _fail(self, message: str) -> None:
        """Stop the run: what is done is sent, the rest is left to the next run."""
        if self._failed:  # the later ones are the same, mostly
            log.debug("%s", message)
            return
        self._failed = True
        self._stop()
        self.failed(message)

    def _stop(self) -> None:
        """Take no more jobs, cut the downloads, give the workers their grace."""
        if self.stop.is_set():
            return
        self.stop.set()
        self.on_stop()
        self._grace_end = time.monotonic() + self.transform.shutdown_grace
        self._end_jobs()
        self._drop([item for item, _, _ in self.again])
        self.again.clear()

    def _drop(self, items: list[Fetched]) -> None:
        """Not done now, not recorded: the next run does them."""
        self.in_flight -= len(items)
        self._release(items)

    def _release(self, items: list[Fetched]) -> None:
        self.budget.release(sum(len(item.body) for item in items))

    # --- workers ---------------------------------------------------------------------------------

    def _serve(self, worker: Worker) -> None:
        """One message of its answers (the selector tells of the next one); at its end (the
        worker is ending) its pipe is not watched any more: its sentinel tells of its death."""
        try:
            answers = worker.outcomes.recv()
        except (EOFError, OSError):
            self._selector.unregister(worker.outcomes)
            return
        for answer in answers:
            self._answer(worker, answer)

    def _exited(self, worker: Worker) -> None:
        """Its sentinel: the answers it sent before it died, then its death."""
        try:
            while worker.outcomes.poll():
                for answer in worker.outcomes.recv():
                    self._answer(worker, answer)
        except (EOFError, OSError):
            pass
        self._died(worker)

    def _answer(self, worker: Worker, answer: Outcome | Lost) -> None:
        item, _ = worker.answer()
        self.in_flight -= 1
        self._release([item])
        limit = self.transform.max_tasks_per_child
        if limit and worker.images >= limit and not worker.held:
            worker.retire()
        if isinstance(answer, Lost):
            self._fail(answer.message)
            return
        self.stage.meter().record(
            answer.transform_ms / 1000,
            ok=answer.status != "failed",  # a filtered image is no failure
            bytes_in=answer.bytes_in,
            bytes_out=answer.bytes_out,
            cpu_s=answer.cpu_ms / 1000,
        )
        self.results.put(answer)

    def _died(self, worker: Worker) -> None:
        self.workers.remove(worker)
        self._forget(worker)
        worker.close()
        held = list(worker.held)
        if worker.retiring and not held:
            return  # recycled (max_tasks_per_child), or told to exit
        if self.stop.is_set():
            self._drop([item for item, _ in held])
            return
        self.restarts += 1
        on, rest = worker.split()
        self.again.extend((item, tries, False) for item, tries in rest)  # bystanders
        if on is None:
            return
        culprit, attempt = on
        if worker.killed_for == "timeout":
            limit = self.transform.timeout
            self._failed_row(culprit, "transform_timeout", f"took longer than {limit:g} s")
        elif attempt < self.transform.crash_retries:
            self.again.appendleft((culprit, attempt + 1, True))  # alone, on another worker
        else:
            self._failed_row(culprit, "worker_crash", "the transform process died on this image")

    def _failed_row(self, item: Fetched, kind: str, message: str) -> None:
        self.in_flight -= 1
        self._release([item])
        self.stage.meter().record(0.0, ok=False, bytes_in=len(item.body))
        outcome = Outcome.failed(
            item.job, TransformError(kind, message), download_ms=item.download_ms,
            bytes_in=len(item.body),
        )  # fmt: skip
        self.results.put(outcome)

    def _watch(self) -> None:
        """The grace, each image's timeout, stopped workers: kill what must be."""
        now = time.monotonic()
        if self._grace_end is not None and now >= self._grace_end:
            self._grace_end = None
            for worker in self.workers:
                if worker.held:
                    log.debug("transform process %s still busy after the grace", worker.pid)
                    worker.kill("grace")
        limit = self.transform.timeout
        for worker in self.workers:
            since = worker.busy_since()
            if limit and since is not None and not worker.killed_for and now - since >= limit:
                log.warning("transform process %s on one image for %g s: killed", worker.pid, limit)
                worker.kill("timeout")
        if now >= self._checked + self.heartbeat / 3:
            self._checked = now
            self._kill_stopped(now, self.heartbeat)

    def _kill_stopped(self, now: float, after: float) -> None:
        """A worker seen stopped (SIGSTOP) for ``after`` seconds would hold its images, and the
        lane, forever: killed, as after a crash. Reads /proc (Linux), else does nothing."""
        seen, self._stopped = self._stopped, {}
        for worker in self.workers:
            if state(worker.pid) not in ("T", "t"):
                continue
            since = self._stopped[worker.pid] = seen.get(worker.pid, now)
            if now - since >= after and not worker.killed_for:
                log.warning("transform process %s stopped for %g s: killed", worker.pid, after)
                worker.kill("stopped")

    def _dispatch(self) -> None:
        if self.stop.is_set():  # once stopping, downloaded bodies are dropped
            self._release(self.mailbox.take(self.mailbox.bound))  # never counted in flight
            return
        full = False  # no worker can take more now: an answer will wake the owner, not a body
        while self.again or self.mailbox.depth():
            worker = self._worker() if self.again or self.in_flight < self.bound else None
            task = self._task(worker) if worker is not None else []
            if worker is None or not task:
                full = True
                break
            try:
                worker.send(task)
            except OSError:  # it has just died: its sentinel says so; these go again, unblamed
                self.again.extendleft((item, tries, False) for item, tries in reversed(task))
                worker.kill("broken")
                break
        self.mailbox.want(not full)

    def _task(self, worker: Worker) -> list[tuple[Fetched, int]]:
        """What to send ``worker`` now: a suspect alone (to an idle worker), or a chunk."""
        room = worker.room()
        if self.again:
            if self.again[0][2]:  # a suspect
                if worker.held:
                    return []
                item, attempt, _ = self.again.popleft()
                return [(item, attempt)]
            task: list[tuple[Fetched, int]] = []
            while self.again and not self.again[0][2] and len(task) < CHUNK:
                room -= len(self.again[0][0].body)
                if room < 0:  # a busy worker's pipe would make the owner's write wait
                    break
                item, attempt, _ = self.again.popleft()
                task.append((item, attempt))
            return task
        most = min(CHUNK, self.bound - self.in_flight)
        bodies = self.mailbox.take(most, room)
        self.in_flight += len(bodies)
        self.peak = max(self.peak, self.in_flight)
        return [(body, 0) for body in bodies]

    def _worker(self) -> Worker | None:
        """An idle worker, a new one while there are fewer than our share, else the least busy
        with room in its pipe; None when all are full (or none can be started)."""
        limit = self.transform.max_tasks_per_child
        usable = [
            w for w in self.workers
            if not (w.retiring or w.killed_for or (limit and w.images >= limit))
        ]  # fmt: skip
        idle = next((w for w in usable if not w.held), None)
        if idle is not None:
            return idle
        if len(self.workers) < self.count:
            return self._start()
        busy = [w for w in usable if len(w.held) <= CHUNK and w.room() > 0]
        return min(busy, key=lambda w: len(w.held), default=None)

    def _start(self) -> Worker | None:
        try:
            worker = Worker(self._context, self._setup)
        except Exception as exc:  # no process can be started (EMFILE, ...): not the images'
            text, hint = str(exc), ""
            if isinstance(exc, OSError):  # not the name of a file it was opening: the cause
                text, hint = f"[Errno {exc.errno}] {exc.strerror}", limit_hint(exc)
            self._fail(f"cannot start a transform process: {text}{hint}")
            return None
        self.workers.append(worker)
        self._selector.register(worker.outcomes, selectors.EVENT_READ, lambda: self._serve(worker))
        self._selector.register(worker.sentinel, selectors.EVENT_READ, lambda: self._exited(worker))
        return worker

    def _forget(self, worker: Worker) -> None:
        """Its pipes out of the selector, before they are closed."""
        for handle in (worker.outcomes, worker.sentinel):
            if handle in self._selector.get_map():
                self._selector.unregister(handle)

    def _close(self) -> None:
        """Every worker told to exit; one still alive after the grace (stopped, hung) is
        killed, so this never hangs."""
        for worker in self.workers:
            worker.retire()
        deadline = time.monotonic() + self.transform.shutdown_grace
        waiting = {worker.sentinel: worker for worker in self.workers}
        while waiting and (left := deadline - time.monotonic()) > 0:
            for sentinel in connection.wait(list(waiting), left):
                del waiting[sentinel]  # type: ignore[arg-type]
        for worker in waiting.values():
            log.warning("transform process %s did not exit within the grace: killed", worker.pid)
            worker.kill("grace")
        for worker in self.workers:
            self._drop([item for item, _ in worker.held])
            worker.held.clear()
            self._forget(worker)
            worker.close()
        self.workers.clear()
