"""The live progress display on a terminal (rich); periodic structured log lines otherwise.

Every figure is *this run's*: the ledger's totals over every run are `ingest status`'s job
(mixing the two is how a resumed run once read "listed 2,000  registered 2,610"). "Settled"
counts items registered, blocked or failed plus objects skipped by the filters; the total is
what this run has to settle: items planned now, items recovered from the ledger (left by an
interrupted run, or re-queued by `retry`) and skipped objects. While the listing runs the total
still grows ("listing…", no percentage or ETA); once it ends the total is final.

Lines are cut to the terminal's width, never wrapped, so each redraw overwrites the last one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from ingest.log import log_stream
from ingest.stats import Stats

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

log = logging.getLogger("ingest.progress")

RATE_WINDOW_S = 20.0  # rates are measured over the last this many seconds
BAR_COLUMNS = 24
LOG_INTERVAL_S = 10.0  # a progress log line this often when not on a terminal


class RateWindow:
    """Rates of a few growing counters over the last ``window_s`` seconds (samples taken by the
    caller with its clock); before a full window, over what there is."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, tuple[int, ...]]] = collections.deque()

    def add(self, now: float, values: tuple[int, ...]) -> None:
        self._samples.append((now, values))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def rates(self) -> tuple[float, ...]:
        if len(self._samples) < 2:
            return ()
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        dt = t1 - t0
        if dt <= 0:
            return ()
        return tuple(max(b - a, 0) / dt for a, b in zip(v0, v1, strict=True))


@dataclass(frozen=True, slots=True)
class View:
    """What one frame shows (pure data: built by ``view``, drawn by ``lines``)."""

    settled: int
    total: int
    listing: bool
    registered: int
    registered_objects: int
    blocked: int
    failed: int
    skipped: int
    elapsed_s: float
    settled_per_s: float | None  # None: not measured yet
    requests_per_s: float | None
    allowed_per_s: float
    rate_limited: int
    in_flight: int
    processing: int

    @property
    def fraction(self) -> float | None:
        if self.listing:
            return None
        return 1.0 if self.total <= 0 else min(self.settled / self.total, 1.0)

    @property
    def eta_s(self) -> float | None:
        """Seconds left at the recent rate; None while listing or before a rate is known."""
        if self.listing or self.settled_per_s is None:
            return None
        left = max(self.total - self.settled, 0)
        if left == 0:
            return 0.0
        return left / self.settled_per_s if self.settled_per_s > 0 else math.inf


def view(stats: Stats, window: RateWindow, now: float) -> View:
    """A frame's figures from the live counters; samples ``window`` at ``now`` (monotonic)."""
    window.add(now, (stats.settled, stats.requests))
    rates = window.rates()
    return View(
        settled=stats.settled,
        total=max(stats.to_settle, stats.settled),
        listing=stats.listing,
        registered=stats.registered,
        registered_objects=stats.registered_objects,
        blocked=stats.blocked,
        failed=stats.failed,
        skipped=stats.skipped,
        elapsed_s=max(now - stats.started_at, 0.0),
        settled_per_s=rates[0] if rates else None,
        requests_per_s=rates[1] if rates else None,
        allowed_per_s=stats.current_rate_per_s,
        rate_limited=stats.rate_limited,
        in_flight=stats.in_flight,
        processing=stats.processing,
    )


def clock_text(seconds: float | None) -> str:
    """H:MM:SS, or "-:--:--" when unknown or unbounded."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _rate(r: float | None) -> str:
    return "…" if r is None else f"{r:,.1f}"


def lines(v: View) -> list[str]:
    """The text lines of a frame (the first one follows the bar), each under 80 columns with
    the bar for counts below 10 million."""
    if v.fraction is None:
        head = f"listing…  {v.settled:,} / {v.total:,}+ settled (this run)"
    else:
        head = f"{v.fraction * 100:5.1f}%  {v.settled:,} / {v.total:,} settled (this run)"
    timing = f"{_rate(v.settled_per_s)} settled/s  elapsed {clock_text(v.elapsed_s)}"
    timing += "  ETA …" if v.fraction is None else f"  ETA {clock_text(v.eta_s)}"
    counts = (
        f"registered {v.registered:,}  blocked {v.blocked:,}  failed {v.failed:,}  "
        f"skipped {v.skipped:,}"
    )
    v7 = (
        f"V7 {_rate(v.requests_per_s)} req/s (limit {v.allowed_per_s:.1f})  "
        f"429s {v.rate_limited:,}  in flight {v.in_flight}"
    )
    if v.processing:
        v7 += f"  media {v.processing}"
    return [head, timing, counts, v7]


def renderable(v: View) -> RenderableType:
    """The rich renderable of a frame: a bar (pulsing while listing) beside the first line,
    then the others; each cut to the terminal's width (an ellipsis, never a wrap)."""
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    bar = ProgressBar(
        total=None if v.fraction is None else max(v.total, 1),
        completed=v.settled,
        width=BAR_COLUMNS,
        pulse=v.fraction is None,
    )
    head, *rest = (Text(line, no_wrap=True, overflow="ellipsis") for line in lines(v))
    top = Table.grid(padding=(0, 1))
    top.add_column(width=BAR_COLUMNS, no_wrap=True)
    top.add_column(no_wrap=True, overflow="ellipsis")
    top.add_row(bar, head)
    return Group(top, *rest)


def log_fields(v: View) -> dict[str, object]:
    return {
        "settled": v.settled,
        "total": v.total,
        "listing": v.listing,
        "percent": None if v.fraction is None else round(v.fraction * 100, 1),
        "eta_s": None if v.eta_s is None or not math.isfinite(v.eta_s) else round(v.eta_s),
        "registered": v.registered,
        "blocked": v.blocked,
        "failed": v.failed,
        "skipped": v.skipped,
        "settled_per_s": None if v.settled_per_s is None else round(v.settled_per_s, 1),
        "requests_per_s": None if v.requests_per_s is None else round(v.requests_per_s, 2),
        "rate_limited": v.rate_limited,
        "processing": v.processing,
    }


async def run_progress(
    stats: Stats,
    *,
    interval_s: float = 0.5,
    tty: bool | None = None,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Redraw the display every ``interval_s`` on a terminal, or log every 10 s otherwise.
    Runs until cancelled; the last frame stays on screen."""
    stream = out or sys.stderr
    is_tty = stream.isatty() if tty is None else tty
    window = RateWindow()
    if not is_tty:
        while True:
            await asyncio.sleep(LOG_INTERVAL_S)
            log.info("progress", extra=log_fields(view(stats, window, clock())))
    with _live(stream) as update:
        try:
            while True:
                update(view(stats, window, clock()))
                await asyncio.sleep(interval_s)
        finally:
            update(view(stats, window, clock()))


@contextlib.contextmanager
def _live(stream: TextIO) -> Iterator[Callable[[View], None]]:
    """rich's live display on ``stream``; log lines written meanwhile appear above it."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=stream, highlight=False)
    live = Live(console=console, auto_refresh=False, transient=False, redirect_stderr=False)

    def update(v: View) -> None:
        live.update(renderable(v), refresh=True)

    with live, log_stream(_Above(console)):
        yield update


class _Above:
    """A file-like for the log handler: each record is printed above the live display."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        if "\n" in self._buffer:
            done, self._buffer = self._buffer.rsplit("\n", 1)
            self._console.print(done, markup=False, highlight=False, soft_wrap=True)
        return len(text)

    def flush(self) -> None:
        pass
