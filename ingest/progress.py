"""The live progress display on a terminal (rich); periodic structured log lines otherwise.

Every figure is *this run's*: the ledger's totals over every run are `ingest status`'s job
(mixing the two is how a resumed run once read "listed 2,000  registered 2,610"). "Settled"
counts items registered, blocked or failed plus objects skipped by the filters; the total is
what this run has to settle: items planned now, items recovered from the ledger (left by an
interrupted run, or re-queued by `retry`) and skipped objects. While the listing runs the total
still grows ("listing…", no percentage or ETA); once it ends the total is final.

The rate and the ETA are in *items*: registered, blocked and failed per second over the last
20 s. Skipped objects settle at listing speed (thousands a second while the listing runs, none
after), so counting them would make the rate a listing figure and the ETA far too short.

Lines are cut to the terminal's width, never wrapped, so each redraw overwrites the last one;
on a terminal whose encoding is not UTF-8 they are plain ASCII ("..." for "…").

The display draws from a thread of its own (rich's Live, redrawn by us): a terminal that stops
reading (Ctrl-S, a slow ssh link) blocks that thread, never the event loop. Log lines meant for
the terminal are queued (bounded) and printed above the display by that thread. A write error
(EIO, EAGAIN) ends the display, not the run: progress goes on as log lines.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TextIO

from ingest.log import log_stream
from ingest.stats import Stats

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

log = logging.getLogger("ingest.progress")

RATE_WINDOW_S = 20.0  # rates are measured over the last this many seconds
BAR_COLUMNS = 24
LOG_INTERVAL_S = 10.0  # a progress log line this often when not on a terminal
LINES_QUEUED = 1000  # log lines waiting for the display thread; beyond, counted and dropped
STOP_WAIT_S = 5.0  # how long the end of a run waits for the display's last frame
ELLIPSIS = "…"


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
    items_per_s: float | None  # item outcomes (registered+blocked+failed); None: not measured
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
        """Seconds left at the recent item rate; None while listing or before a rate is
        known. Once the listing is over every skipped object is settled, so what is left are
        items: the unit of the rate."""
        if self.listing or self.items_per_s is None:
            return None
        left = max(self.total - self.settled, 0)
        if left == 0:
            return 0.0
        return left / self.items_per_s if self.items_per_s > 0 else math.inf


def view(stats: Stats, window: RateWindow, now: float) -> View:
    """A frame's figures from the live counters; samples ``window`` at ``now`` (monotonic)."""
    window.add(now, (stats.registered + stats.blocked + stats.failed, stats.requests))
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
        items_per_s=rates[0] if rates else None,
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


def _rate(r: float | None, unknown: str) -> str:
    return unknown if r is None else f"{r:,.1f}"


def lines(v: View, ellipsis: str = ELLIPSIS) -> list[str]:
    """The text lines of a frame (the first one follows the bar), each under 80 columns with
    the bar for counts below 10 million. ``ellipsis``: "..." where the terminal is not UTF-8."""
    if v.fraction is None:
        head = f"listing{ellipsis}  {v.settled:,} / {v.total:,}+ settled (this run)"
    else:
        head = f"{v.fraction * 100:5.1f}%  {v.settled:,} / {v.total:,} settled (this run)"
    timing = f"{_rate(v.items_per_s, ellipsis)} items/s  elapsed {clock_text(v.elapsed_s)}"
    timing += f"  ETA {ellipsis}" if v.fraction is None else f"  ETA {clock_text(v.eta_s)}"
    counts = (
        f"registered {v.registered:,}  blocked {v.blocked:,}  failed {v.failed:,}  "
        f"skipped {v.skipped:,}"
    )
    v7 = (
        f"V7 {_rate(v.requests_per_s, ellipsis)} req/s (limit {v.allowed_per_s:.1f})  "
        f"429s {v.rate_limited:,}  in flight {v.in_flight}"
    )
    if v.processing:
        v7 += f"  media {v.processing}"
    return [head, timing, counts, v7]


def renderable(v: View, *, ascii_only: bool = False) -> RenderableType:
    """The rich renderable of a frame: a bar (pulsing while listing) beside the first line,
    then the others; each cut to the terminal's width (an ellipsis, never a wrap). With
    ``ascii_only`` (a terminal that is not UTF-8) nothing outside ASCII is drawn: a "…" would
    reach it as "\\u2026", six columns, and wrap the line."""
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
    overflow: Literal["crop", "ellipsis"] = "crop" if ascii_only else "ellipsis"
    texts = lines(v, "..." if ascii_only else ELLIPSIS)
    head, *rest = (Text(line, no_wrap=True, overflow=overflow) for line in texts)
    top = Table.grid(padding=(0, 1))
    top.add_column(width=BAR_COLUMNS, no_wrap=True)
    top.add_column(no_wrap=True, overflow=overflow)
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
        "items_per_s": None if v.items_per_s is None else round(v.items_per_s, 1),
        "requests_per_s": None if v.requests_per_s is None else round(v.requests_per_s, 2),
        "rate_limited": v.rate_limited,
        "processing": v.processing,
    }


def make_console(stream: TextIO) -> Console:
    """The console of the display and of the log lines above it: text as it is (no emoji
    codes, markup or highlighting: a log line reading ":cat:" or "[bold]" stays so)."""
    from rich.console import Console

    return Console(file=stream, emoji=False, markup=False, highlight=False)


def can_draw(console: Console) -> bool:
    """A live display only where rich really draws one: a terminal that is interactive and not
    dumb (TERM=dumb or unknown: an editor's shell, a serial console). Elsewhere Live draws
    nothing until its end, so the periodic log lines are the better choice."""
    return console.is_terminal and console.is_interactive and not console.is_dumb_terminal


def ascii_only(console: Console) -> bool:
    return not console.encoding.lower().startswith("utf")


async def run_progress(
    stats: Stats,
    *,
    interval_s: float = 0.5,
    out: TextIO | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Redraw the display every ``interval_s`` where it can be drawn, else log every 10 s (and
    once at the end). Runs until cancelled; the last frame stays on screen."""
    window = RateWindow()
    console = make_console(out or sys.stderr)
    if can_draw(console):
        display = Display(console, lambda: view(stats, window, clock()), interval_s)
        with display.running():
            await display.failed.wait()
        log.warning(
            "progress display stopped: the terminal refused a write; progress goes to the log",
            extra={"error": str(display.error)},
        )
    try:
        while True:
            await asyncio.sleep(LOG_INTERVAL_S)
            log.info("progress", extra=log_fields(view(stats, window, clock())))
    finally:
        log.info("progress", extra=log_fields(view(stats, window, clock())))


class Display:
    """rich's Live, started, redrawn and stopped by a thread of its own, so no write to the
    terminal ever happens on the event loop (a paused terminal blocks this thread only).
    ``failed`` is set (on the loop) when drawing failed (the terminal refused a write: EIO,
    EAGAIN): the display is over, the run goes on."""

    def __init__(self, console: Console, frame: Callable[[], View], interval_s: float) -> None:
        from rich.live import Live

        self.console = console
        self._frame = frame
        self._interval_s = interval_s
        self._ascii = ascii_only(console)
        self._live = Live(
            console=console,
            auto_refresh=False,  # our thread redraws (and prints the queued log lines first)
            transient=False,
            redirect_stdout=False,  # stdout is the summary's, even on a terminal
            redirect_stderr=True,  # a stray write to stderr goes above the display
            get_renderable=lambda: renderable(self._frame(), ascii_only=self._ascii),
        )
        self._lines: collections.deque[str] = collections.deque()
        self._dropped = 0
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="ingest-progress", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed = asyncio.Event()
        self.error: Exception | None = None  # why the display ended early

    # --- the loop's side --------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """The display while the block runs; log records go above it meanwhile. Leaving waits
        (a few seconds at most) for the last frame and the cursor shown again."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        try:
            with log_stream(self):
                yield
        finally:
            self._stop.set()
            self._wake.set()
            self._thread.join(STOP_WAIT_S)

    def write(self, text: str) -> int:
        """The log handler's stream: lines queued for the display thread (never blocks)."""
        if self.error is not None:
            return len(text)
        with self._mutex:
            for line in text.splitlines():
                if len(self._lines) < LINES_QUEUED:
                    self._lines.append(line)
                else:
                    self._dropped += 1
        self._wake.set()
        return len(text)

    def flush(self) -> None:
        pass

    # --- the display thread -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._live.start(refresh=True)
            try:
                while not self._stop.is_set():
                    self._wake.wait(self._interval_s)
                    self._wake.clear()
                    self._print_lines()
                    self._live.refresh()
            finally:
                self._print_lines()
                self._live.stop()  # the last frame, the cursor shown, stderr given back
        except Exception as e:  # the display must never end the run
            self._failed(e)

    def _print_lines(self) -> None:
        with self._mutex:
            pending, self._lines = self._lines, collections.deque()
            dropped, self._dropped = self._dropped, 0
        for line in pending:
            self.console.print(line, soft_wrap=True)
        if dropped:
            self.console.print(
                f"({dropped:,} log lines dropped: the terminal was not reading)", soft_wrap=True
            )

    def _failed(self, error: Exception) -> None:
        self.error = error
        with contextlib.suppress(Exception):
            self._live.stop()  # gives stderr back; its writes may fail too
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(self.failed.set)
