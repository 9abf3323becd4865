"""A live progress line on a terminal; periodic structured log lines otherwise."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TextIO

from ingest.stats import Stats

log = logging.getLogger("ingest.progress")


def progress_line(stats: Stats) -> str:
    return (
        f"listed {stats.listed:,}  registered {stats.registered:,}  blocked {stats.blocked:,}  "
        f"failed {stats.failed:,}  skipped {stats.skipped:,}  "
        f"{stats.items_per_s():,.0f} items/s  rate {stats.current_rate_per_s:.1f} req/s  "
        f"429s {stats.rate_limited:,}  in flight {stats.in_flight}"
        + (f"  processing {stats.processing}" if stats.processing else "")
    )


async def run_progress(
    stats: Stats, *, interval_s: float = 0.5, tty: bool | None = None, out: TextIO | None = None
) -> None:
    """Redraw the line every ``interval_s`` on a terminal, or log every 10 s otherwise.

    Runs until cancelled; on cancellation it ends the terminal line cleanly.
    """
    stream = out or sys.stderr
    is_tty = stream.isatty() if tty is None else tty
    period = interval_s if is_tty else 10.0
    try:
        while True:
            await asyncio.sleep(period)
            if is_tty:
                stream.write("\r\x1b[K" + progress_line(stats))
                stream.flush()
            else:
                log.info(
                    "progress",
                    extra={
                        "listed": stats.listed,
                        "registered": stats.registered,
                        "blocked": stats.blocked,
                        "failed": stats.failed,
                        "skipped": stats.skipped,
                        "items_per_s": round(stats.items_per_s(), 1),
                        "rate_per_s": round(stats.current_rate_per_s, 2),
                        "rate_limited": stats.rate_limited,
                        "processing": stats.processing,
                    },
                )
    finally:
        if is_tty:
            stream.write("\r\x1b[K" + progress_line(stats) + "\n")
            stream.flush()
