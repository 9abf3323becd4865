"""Aggregated fault log lines: what the run rode out, for an operator reading the logs.

Retries, 429 pauses and rate cuts happen by the hundred in a long run; one line each would
drown the log, none at all hides them. ``report_faults`` logs one WARNING every
``interval_s`` seconds (5 by default) with the counts by cause since the previous line, and
only when something happened::

    faults in the last 5 s: 42 x HTTP 502, 3 connection resets, 7 x HTTP 429 (paused 2.1 s),
    rate cut 20.0 -> 14.0 req/s; 52 retries, 12 items confirmed through ALREADY_EXISTS

The same numbers go into the record's ``extra`` fields (JSON logs carry them as keys):
``interval_s``, ``http_errors`` ({status: count}, every answer >= 400 but 429),
``rate_limited``, ``paused_s``, ``resets``, ``timeouts``, ``connect_errors``, ``rate_cuts``,
``rate_from``, ``rate_to``, ``retries``, ``confirmed_existing``.

``FaultCounters.of(stats)`` takes a snapshot; ``fault_line(previous, now, elapsed_s)`` is the
pure decision (line and fields, or None). Counters come from ``ingest.stats.Stats``:
``http_statuses`` and ``transport_by_kind`` from ``V7Client`` (every endpoint); when a client
was not given the stats, the registrar's coarse ``server_errors`` / ``transport_errors`` /
``rate_limited`` counts stand in for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ingest.stats import Stats

log = logging.getLogger("ingest.faults")

DEFAULT_INTERVAL_S = 5.0

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class FaultCounters:
    """The fault counters of ``Stats`` at one moment (copies: later increments don't show)."""

    http_statuses: Counter[int] = field(default_factory=Counter)
    transport_by_kind: Counter[str] = field(default_factory=Counter)
    rate_limited: int = 0
    server_errors: int = 0
    transport_errors: int = 0
    retries: int = 0
    paused_s: float = 0.0
    rate_cuts: int = 0
    rate_per_s: float = 0.0
    confirmed_existing: int = 0

    @classmethod
    def of(cls, stats: Stats) -> FaultCounters:
        return cls(
            http_statuses=Counter(stats.http_statuses),
            transport_by_kind=Counter(stats.transport_by_kind),
            rate_limited=stats.rate_limited,
            server_errors=stats.server_errors,
            transport_errors=stats.transport_errors,
            retries=stats.retries,
            paused_s=stats.rate_limit_paused_s,
            rate_cuts=stats.rate_cuts,
            rate_per_s=stats.current_rate_per_s,
            confirmed_existing=stats.already_exists_ours,
        )


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s".replace(".0 s", " s")


def fault_line(
    prev: FaultCounters, now: FaultCounters, elapsed_s: float
) -> tuple[str, dict[str, Any]] | None:
    """The log line for what happened between two snapshots, with its structured fields;
    None when nothing did (a rate that only climbed back is not a fault)."""
    statuses = now.http_statuses - prev.http_statuses  # drops zero / negative counts
    errors = {s: n for s, n in sorted(statuses.items()) if s >= 400 and s != 429}
    rate_limited = statuses.get(429, 0)
    kinds = now.transport_by_kind - prev.transport_by_kind
    resets, timeouts, connects = kinds["reset"], kinds["timeout"], kinds["connect"]
    # No per-status / per-kind counts (a client without stats): the registrar's coarse ones.
    coarse_5xx = 0
    if not errors:
        coarse_5xx = max(now.server_errors - prev.server_errors, 0)
    coarse_transport = 0
    if not (resets or timeouts or connects):
        coarse_transport = max(now.transport_errors - prev.transport_errors, 0)
    if not rate_limited:
        rate_limited = max(now.rate_limited - prev.rate_limited, 0)
    paused = max(now.paused_s - prev.paused_s, 0.0)
    cuts = max(now.rate_cuts - prev.rate_cuts, 0)
    retries = max(now.retries - prev.retries, 0)
    confirmed = max(now.confirmed_existing - prev.confirmed_existing, 0)

    parts: list[str] = [f"{n} x HTTP {s}" for s, n in errors.items()]
    if coarse_5xx:
        parts.append(_plural(coarse_5xx, "server error", "server errors"))
    if resets:
        parts.append(_plural(resets, "connection reset", "connection resets"))
    if timeouts:
        parts.append(_plural(timeouts, "timeout", "timeouts"))
    if connects:
        parts.append(_plural(connects, "failed connection", "failed connections"))
    if coarse_transport:
        parts.append(_plural(coarse_transport, "connection error", "connection errors"))
    if rate_limited:
        text = f"{rate_limited} x HTTP 429"
        if paused > 0:
            text += f" (paused {paused:.1f} s)"
        parts.append(text)
    elif paused > 0:  # a pause from a 429 counted in the previous interval
        parts.append(f"paused {paused:.1f} s for HTTP 429")
    if cuts:
        text = f"rate cut {prev.rate_per_s:.1f} -> {now.rate_per_s:.1f} req/s"
        if cuts > 1:
            text += f" ({cuts} cuts)"
        parts.append(text)
    tail: list[str] = []
    if retries:
        tail.append(_plural(retries, "retry", "retries"))
    if confirmed:
        tail.append(_plural(confirmed, "item", "items") + " confirmed through ALREADY_EXISTS")
    if not parts and not tail:
        return None
    line = f"faults in the last {_seconds(max(elapsed_s, 0.0))}: " + ", ".join(parts)
    if tail:
        line += ("; " if parts else "") + ", ".join(tail)
    fields: dict[str, Any] = {
        "interval_s": round(max(elapsed_s, 0.0), 3),
        "http_errors": {str(s): n for s, n in errors.items()},
        "server_errors": sum(n for s, n in errors.items() if s >= 500) or coarse_5xx,
        "rate_limited": rate_limited,
        "paused_s": round(paused, 3),
        "resets": resets,
        "timeouts": timeouts,
        "connect_errors": connects,
        "transport_errors": (resets + timeouts + connects) or coarse_transport,
        "rate_cuts": cuts,
        "rate_from": round(prev.rate_per_s, 3),
        "rate_to": round(now.rate_per_s, 3),
        "retries": retries,
        "confirmed_existing": confirmed,
    }
    return line, fields


async def report_faults(
    stats: Stats,
    interval_s: float = DEFAULT_INTERVAL_S,
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    logger: logging.Logger = log,
) -> None:
    """Log ``fault_line`` every ``interval_s`` until cancelled; on cancellation, the partial
    interval since the last line is logged too (nothing is lost at the end of a run)."""
    if interval_s <= 0:
        raise ValueError("report_faults: interval_s must be > 0")
    prev = FaultCounters.of(stats)
    last_at = clock()

    def emit() -> None:
        nonlocal prev, last_at
        now_at = clock()
        cur = FaultCounters.of(stats)
        out = fault_line(prev, cur, now_at - last_at)
        prev, last_at = cur, now_at
        if out is not None:
            line, fields = out
            logger.warning(line, extra=fields)

    try:
        while True:
            await sleep(interval_s)
            emit()
    finally:
        emit()


class FaultLog:
    """``report_faults`` as a pass's background task: ``run`` until ``close`` (in any order:
    a ``close`` before ``run`` started makes ``run`` return at once)."""

    def __init__(self, stats: Stats, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        self._stats = stats
        self._interval_s = interval_s
        self._closed = asyncio.Event()

    async def run(self) -> None:
        if self._closed.is_set():
            return
        reporter = asyncio.ensure_future(report_faults(self._stats, self._interval_s))
        try:
            await self._closed.wait()
        finally:
            reporter.cancel()  # logs the partial last interval
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

    async def close(self) -> None:
        self._closed.set()
