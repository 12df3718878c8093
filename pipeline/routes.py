"""Jobs routed to lanes by host, so that ``download.per_host`` holds for the whole run.

A lane counts its own downloads per host; with several lanes, one host's URLs spread over them
would have ``lanes x per_host`` downloads at once. So when ``per_host`` is set and there are
several lanes, the coordinator deals every URL of a host to the same lane (by a hash of the host
name: a replacement lane keeps its index, and so its hosts). Jobs read from the input for a lane
with no room wait here, in input order, at most ``bound`` for any lane: past that the coordinator
reads no further until that lane takes some (memory stays flat; a run of one host's URLs goes at
that host's pace, as per_host asks).
"""

from __future__ import annotations

import zlib
from collections import deque
from urllib.parse import urlsplit

from .records import Job


class Routes:
    """The jobs read but not dealt yet, one queue per lane index."""

    def __init__(self, lanes: int, bound: int) -> None:
        self.queues: list[deque[Job]] = [deque() for _ in range(lanes)]
        self.bound = bound

    def lane_of(self, job: Job) -> int:
        host = (urlsplit(job.url).hostname or "").lower()
        return zlib.crc32(host.encode("utf-8", "surrogatepass")) % len(self.queues)

    def add(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.queues[self.lane_of(job)].append(job)

    def full(self) -> bool:
        """Some lane has ``bound`` jobs waiting: read no more input for now."""
        return any(len(queue) >= self.bound for queue in self.queues)

    def waiting(self, lane: int) -> int:
        return len(self.queues[lane])

    def take(self, lane: int, count: int) -> list[Job]:
        queue = self.queues[lane]
        return [queue.popleft() for _ in range(min(count, len(queue)))]
