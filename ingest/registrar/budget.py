"""The seam between the senders and the rate budget they draw from.

The registrar and the id lookups take every send slot from a ``SendBudget`` and tell it how
each request was answered. Two implement it: ``rate.Limiter`` (the default: one process, an
in-process adaptive controller) and ``shared_rate.SharedLimiter`` (every process of a job
draws from one PostgreSQL row per V7 key). The seam sits at the limiter's boundary, not
inside it, because the local controller books slots synchronously while a shared budget needs
a database round trip per grant: the two meet only in what the senders see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol


class RateView(Protocol):
    """What the engine reports about the budget (stats, progress line)."""

    @property
    def rate(self) -> float:
        """The rate allowed now (requests per second)."""
        ...

    @property
    def paused_until(self) -> float:
        """No slot is granted before this time (local monotonic clock; ``-inf``: no pause)."""
        ...

    @property
    def cuts(self) -> int:
        """How many times the rate was cut (one per congestion episode)."""
        ...


class SendBudget(Protocol):
    """Where every request to V7 takes its send slot from (``rate.Limiter`` satisfies it)."""

    max_in_flight: int

    @property
    def controller(self) -> RateView: ...

    @property
    def rate(self) -> float: ...

    def now(self) -> float:
        """The clock send times are on (monotonic seconds)."""
        ...

    def slot(
        self,
        stop: asyncio.Event | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> AbstractAsyncContextManager[float]:
        """Wait for a send slot (``before_send`` runs once it is granted); yield the send time."""
        ...

    def answered(self, sent_at: float | None, error: BaseException | None = None) -> None:
        """A request's answer: success or a refused payload proves the rate, a 429 pauses and
        slows every sender, anything else says nothing about the rate."""
        ...

    async def sleep(self, delay_s: float, stop: asyncio.Event | None = None) -> None:
        """A retry backoff; raises ``Interrupted`` when ``stop`` is set first."""
        ...
