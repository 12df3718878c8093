"""Duplicate URLs (``input.dedupe = true``): a line whose URL an earlier line had is not fetched.

Its row says ``status = "duplicate"`` and ``duplicate_of`` names the key of the first line with
that URL. "Earlier" is in input order (files by id, lines in order), so the same input always
marks the same lines, run after run. The URLs seen live in an SQLite table on disk in the output
folder (a 16-byte hash each, with SQLite's page cache as the only memory), rebuilt by each run
from the whole input, lines done by earlier runs included: nothing to keep in step across a kill.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

from .config import InputConfig
from .errors import PipelineError
from .layout import DEDUPE
from .records import Job, ShardEnd
from .resume import Plan
from .sources import iter_jobs

_CACHE_KB = 16 * 1024  # SQLite's page cache: the memory this costs, whatever the input's size
_COMMIT_EVERY = 50_000


class Dedupe:
    """Marks the jobs whose URL an earlier job had."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / DEDUPE
        self.path.unlink(missing_ok=True)
        try:
            # used from whichever thread pulls the job stream, one at a time
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise PipelineError(f"{self.path}: cannot create the dedupe table: {exc}") from None
        for pragma in ("journal_mode = OFF", "synchronous = OFF", f"cache_size = -{_CACHE_KB}"):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.execute("CREATE TABLE seen (url BLOB PRIMARY KEY, key TEXT) WITHOUT ROWID")
        self._db.execute("BEGIN")
        self._pending = 0
        self.duplicates = 0

    def mark(self, items: Iterable[Job | ShardEnd]) -> Iterator[Job | ShardEnd]:
        """``items``, each job whose URL came before given ``duplicate_of``."""
        insert = "INSERT OR IGNORE INTO seen VALUES (?, ?)"
        for item in items:
            if isinstance(item, Job) and item.problem is None:
                digest = hashlib.blake2b(item.url.encode("utf-8", "surrogatepass"), digest_size=16)
                url = digest.digest()
                if self._db.execute(insert, (url, item.key)).rowcount == 0:  # seen before
                    (first,) = self._db.execute(
                        "SELECT key FROM seen WHERE url = ?", (url,)
                    ).fetchone()
                    self.duplicates += 1
                    item = dataclasses.replace(item, duplicate_of=first)
                self._pending += 1
                if self._pending >= _COMMIT_EVERY:
                    self._db.execute("COMMIT")
                    self._db.execute("BEGIN")
                    self._pending = 0
            yield item

    def close(self) -> None:
        self._db.close()
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> Dedupe:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def plan_jobs(plan: Plan, config: InputConfig) -> Iterator[Iterator[Job | ShardEnd]]:
    """The job stream of ``plan``: every line of its sources, cut into the plan's shards, with
    duplicates marked when ``input.dedupe`` asks (the table lives as long as the stream)."""
    sources = plan.reading  # not the files done whole (with dedupe, every file is read)
    items = iter_jobs(sources, config.shard_size, config.url_column, plan.known, plan.findings)
    if not config.dedupe:
        yield items
        return
    with Dedupe(plan.out_dir) as dedupe:
        yield dedupe.mark(items)
