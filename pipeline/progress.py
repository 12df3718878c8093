"""Progress bars: one per stage, stacked, redrawn a few times a second by the sampler thread.

    downloaded   61% 1220/2000 failed=51 196.12 url/s |████    | 00:06<00:04
    transformed  60% 1201/1949 failed=0 193.40 url/s |████    | 00:06<00:04 fetched=32/32 pool=4/4
    written      60% 1199/2000 failed=51 193.01 url/s |████    | 00:06<00:04 jobs=180/240

The figures come before the bar and the queue depths last: a narrow terminal (tqdm cuts a line
at its width) shortens the bar and loses the depths, never a count.

The stages never touch the bars: they count into their meters, and ``Bars.refresh`` (called from
the sampler thread, and once at the end) copies the counts over, so drawing costs the hot path
nothing. The total is what the resume check counted as it read the URL files; a file it did not
read (new to the output folder) is counted by a thread (the same parser as the run, so it is
exact); until that is done the bars show counts and rates only.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Mapping, Sequence

from tqdm import tqdm

from .errors import PipelineError
from .lane import LaneHandle
from .metrics import Counts, Gauge
from .sources import Source, read_records

_CHECK_EVERY = 65536  # URLs counted between looks at the stop flag
# tqdm's fields in double braces; what matters most first, as a narrow terminal cuts the end
_FORMAT = (
    "{{desc}} {{percentage:3.0f}}% {{n_fmt}}/{{total_fmt}} failed={failed} {{rate_fmt}} "
    "|{{bar:12}}| {{elapsed}}<{{remaining}} {depths}"
)
_UNTOLD = "{{desc}} {{n_fmt}} failed={failed} {{rate_fmt}} {{elapsed}} {depths}"  # no total yet


class Bar(tqdm):  # type: ignore[misc]
    monitor_interval = 0  # no tqdm monitor thread: nothing but our stages may outlive a run


def terminal() -> bool:
    """Bars are drawn only when both stdout and stderr (where they go) are terminals."""
    return sys.stdout.isatty() and sys.stderr.isatty()


class Bars:
    """The stacked bars of a run; all three or none."""

    def __init__(
        self,
        download: Counts,
        transform: Counts,
        write: Counts,
        gauges: Sequence[Gauge],
        *,
        total: Callable[[], int | None],
    ) -> None:
        self._stages = (download, transform, write)
        self._gauges = {g.name: g for g in gauges}
        self._total = total
        self._lock = threading.Lock()  # the sampler thread and the main thread both refresh
        names = ("downloaded", "transformed", "written")
        width = max(map(len, names))
        self._bars = [
            Bar(
                desc=f"{name:<{width}}",
                unit=" url",
                position=i,
                leave=True,
                dynamic_ncols=True,
                mininterval=0,
                file=sys.stderr,
                bar_format=_UNTOLD.format(failed=0, depths=""),
            )
            for i, name in enumerate(names)
        ]

    def refresh(self) -> None:
        with self._lock:
            total = self._total()
            download, transform, write = self._stages
            failed_downloads = download.failed
            counts = (download.items, transform.items, write.items)
            totals = (total, None if total is None else total - failed_downloads, total)
            failed = (failed_downloads, transform.failed, failed_downloads + transform.failed)
            depths = ("", f"{self._depth('fetched')} {self._depth('pool')}", self._depth("jobs"))
            for bar, count, bar_total, fails, depth in zip(
                self._bars, counts, totals, failed, depths, strict=True
            ):
                bar.total = bar_total
                layout = _UNTOLD if bar_total is None else _FORMAT
                bar.bar_format = layout.format(failed=fails, depths=depth).rstrip()
                bar.update(count - bar.n)  # keeps tqdm's smoothed rate right

    def _depth(self, name: str) -> str:
        gauge = self._gauges[name]
        return f"{name}={gauge.depth()}/{gauge.bound}"

    def close(self) -> None:
        self.refresh()
        for bar in self._bars:
            bar.close()


class UrlCount:
    """Counts the URLs of the sources in a thread, so the bars can show a total and an ETA; a
    file whose records are ``counted`` already (by file id: the resume check read it) is not
    read again, and when every file is, no thread is started."""

    def __init__(
        self, sources: Sequence[Source], url_column: str, counted: Mapping[int, int] | None = None
    ) -> None:
        counted = counted or {}
        self._known = sum(counted[s.id] for s in sources if s.id in counted)
        self._sources = [source for source in sources if source.id not in counted]
        self.total: int | None = None if self._sources else self._known  # once every file is read
        self._column = url_column
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, name="url-counter")

    def _count(self) -> None:
        count = self._known
        try:
            for source in self._sources:
                for _ in read_records(source, self._column):
                    count += 1
                    if count % _CHECK_EVERY == 0 and self._stop.is_set():
                        return  # the run ended first
        except PipelineError:  # an unreadable file: the run itself reports it
            return
        self.total = count

    def __enter__(self) -> UrlCount:
        if self._sources:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.ident is not None:  # started
            self._thread.join()


class LaneCounts:
    """A stage as the lanes last reported it, for the bars: ``items`` and ``failed``."""

    def __init__(self, lanes: list[LaneHandle], items: str, failed: str) -> None:
        self._lanes, self._items, self._failed = lanes, items, failed

    @property
    def items(self) -> int:
        return sum(getattr(h.progress, self._items) for h in self._lanes[:])

    @property
    def failed(self) -> int:
        return sum(getattr(h.progress, self._failed) for h in self._lanes[:])


class LaneGauge:
    """A depth summed over the lanes (bodies queued, images in pools, jobs held)."""

    def __init__(self, name: str, bound: int, depth: Callable[[LaneHandle], int]) -> None:
        self.name, self.bound, self.peak = name, bound, 0
        self._depth = depth
        self.lanes: list[LaneHandle] = []

    def depth(self) -> int:
        value = sum(self._depth(h) for h in self.lanes[:])
        self.peak = max(self.peak, value)
        return value
