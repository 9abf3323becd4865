"""V7 ids for items whose registration was confirmed without one (ALREADY_EXISTS).

When a register request fails after V7 committed it (a 5xx or a reset after the commit), its
retry finds the items in ``blocked_items`` with ALREADY_EXISTS: they are ours, but V7's answer
carries no id (v7-contract.md). ``IdResolver`` collects those ``(path, name)`` idents and looks
their ids up in the background through the items listing (``V7Client.find_item_ids``:
``item_names[]`` filters, paginated), then hands ``((path, name), id)`` pairs to ``record``
(the engine writes them to the ledger).

Decisions, and where they are made:

- When to send a lookup: ``FlushPolicy.due_in`` (pure, takes the clock's ``now``): a full
  batch (``batch_size`` idents, 100 by default, what darwin-py's importer puts in one GET) goes
  at once; a partial one when its oldest ident has waited ``max_wait_s`` (2 s), or at drain.
- Pacing: every HTTP request goes out inside ``acquire_slot()``; the engine passes its shared
  limiter's slot (``limiter_slot``), so lookups count against the same V7 rate limit as
  registrations (every endpoint is rate limited since 2025) and a 429 slows everyone down.
- Memory: at most ``max_pending`` idents wait. ``add`` never blocks (it is called from the
  registration path, which must not stall for a cosmetic field): when full, the oldest waiting
  ident is dropped and counted in ``dropped`` (its id stays unknown: ``ingest report`` shows it
  empty, as before). Idents already waiting are not added twice.
- Retries: transient errors (``Retry``: 429, 5xx, resets, timeouts) are retried up to
  ``max_attempts`` times with the project's full-jitter ``RetryPolicy`` (honours Retry-After;
  ``sleep`` and ``rand`` injectable). The ``backoff`` package was not used: its async decorator
  sleeps with ``asyncio.sleep`` directly and ignores Retry-After. A batch refused as too large
  (HTTP 413/414: URL too long) is halved. Other errors (auth, not found, a refused query) end
  that batch: its ids stay unknown, the run goes on (registration reports those errors itself).
- A graceful stop (``Interrupted`` from the slot, the engine's stop event): the batch and
  whatever waits are given up, ``run`` returns.
- At the end (``close``): one log line with how many ids were found and how many stayed unknown
  (not found in V7, dropped, or given up after errors).

Usage::

    resolver = IdResolver(client_finder(client, team, dataset_id), record=save_ids,
                          acquire_slot=limiter_slot(limiter, stop))
    task = asyncio.create_task(resolver.run())
    resolver.add([("/", "car_1.png")])
    ...
    await resolver.close()  # drains what is waiting, then run() returns
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ingest.errors import Interrupted, RejectedError, Retry, V7Error
from ingest.registrar.budget import SendBudget
from ingest.registrar.client import SlotFactory
from ingest.registrar.retry import RetryPolicy
from ingest.registrar.wire import Ident, norm_path

log = logging.getLogger("ingest.registrar.lookup")

Pair = tuple[Ident, str]
Record = Callable[[list[Pair]], Awaitable[None]]
Missed = Callable[[list[Ident]], Awaitable[None]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

DEFAULT_BATCH = 100
DEFAULT_MAX_WAIT_S = 2.0
DEFAULT_MAX_PENDING = 100_000
DEFAULT_RETRY = RetryPolicy(base_s=0.5, cap_s=10.0, max_total_s=60.0)


class FindIds(Protocol):
    """Looks up ids of (path, name) idents; sends every HTTP request inside ``slot()``."""

    async def __call__(self, idents: Sequence[Ident], slot: SlotFactory) -> dict[Ident, str]: ...


def client_finder(client: _Finder, team: str, dataset_id: int, *, page_size: int = 500) -> FindIds:
    """``FindIds`` over ``V7Client.find_item_ids`` for one team and dataset."""

    async def find(idents: Sequence[Ident], slot: SlotFactory) -> dict[Ident, str]:
        return await client.find_item_ids(
            team, dataset_id, idents, max_names=len(idents), page_size=page_size, slot=slot
        )

    return find


class _Finder(Protocol):
    async def find_item_ids(
        self,
        team: str,
        dataset_id: int,
        idents: Iterable[Ident],
        *,
        max_names: int = ...,
        page_size: int = ...,
        filter_paths: bool = ...,
        slot: SlotFactory | None = ...,
    ) -> dict[Ident, str]: ...


def limiter_slot(limiter: SendBudget, stop: asyncio.Event | None = None) -> SlotFactory:
    """An ``acquire_slot`` over the engine's shared limiter: waits for a send slot, and tells
    the limiter how the request went (a 429 pauses and slows every sender, as for
    registrations). ``stop`` set: the wait ends with ``Interrupted``."""

    @contextlib.asynccontextmanager
    async def slot() -> AsyncIterator[object]:
        async with limiter.slot(stop) as sent_at:
            try:
                yield sent_at
            except Exception as e:
                limiter.answered(sent_at, e)
                raise
            limiter.answered(sent_at)

    return slot


@contextlib.asynccontextmanager
async def _no_slot() -> AsyncIterator[object]:
    yield None


@dataclass(frozen=True)
class FlushPolicy:
    """When to send a lookup batch. Pure: give it the clock's ``now``."""

    batch_size: int = DEFAULT_BATCH
    max_wait_s: float = DEFAULT_MAX_WAIT_S

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_wait_s < 0:
            raise ValueError("FlushPolicy: batch_size >= 1 and max_wait_s >= 0")

    def due_in(
        self, pending: int, oldest_at: float | None, now: float, *, draining: bool = False
    ) -> float | None:
        """How long until the next batch should go: ``0.0`` now, ``> 0`` that many seconds
        from ``now`` (unless more idents fill the batch first), ``None`` nothing to send
        (wait for ``add``). ``oldest_at``: when the oldest waiting ident was added."""
        if pending <= 0:
            return None
        if draining or pending >= self.batch_size or oldest_at is None:
            return 0.0
        return max(0.0, oldest_at + self.max_wait_s - now)


@dataclass
class ResolverCounts:
    added: int = 0  # idents accepted by add (not counting ones already waiting)
    found: int = 0  # ids found and recorded
    not_found: int = 0  # looked up, not in V7's listing
    dropped: int = 0  # dropped from a full queue, never looked up
    failed: int = 0  # lookups given up after errors
    requests: int = 0  # lookup batches sent (attempts; each may span several GETs)

    @property
    def unknown(self) -> int:
        """Ids that stay unknown."""
        return self.not_found + self.dropped + self.failed


class IdResolver:
    """Background lookup of V7 ids for (path, name) idents: ``add``, ``run``, ``close``."""

    def __init__(
        self,
        find: FindIds,
        record: Record,
        *,
        acquire_slot: SlotFactory | None = None,
        missed: Missed | None = None,
        policy: FlushPolicy | None = None,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_attempts: int = 4,
        retry_policy: RetryPolicy = DEFAULT_RETRY,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if max_pending < 1 or max_attempts < 1:
            raise ValueError("IdResolver: max_pending and max_attempts must be >= 1")
        self._find = find
        self._record = record
        self._slot: SlotFactory = acquire_slot or _no_slot
        self._missed = missed  # told the idents the listing did not show (not retried forever)
        self.policy = policy or FlushPolicy()
        self.max_pending = max_pending
        self.max_attempts = max_attempts
        self._retry = retry_policy
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._pending: dict[Ident, float] = {}  # ident -> when added (insertion order)
        self._wake = asyncio.Event()
        self._closing = False
        self._stopped = False
        self._running = False
        self._done = asyncio.Event()
        self.counts = ResolverCounts()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, idents: Iterable[Ident]) -> None:
        """Queue idents whose id is unknown. Never blocks; when ``max_pending`` are waiting,
        the oldest is dropped (counted in ``counts.dropped``). Ignored after ``close``."""
        if self._closing:
            return
        now = self._clock()
        added = False
        for path, name in idents:
            key = (norm_path(path), str(name))
            if key in self._pending:
                continue
            if len(self._pending) >= self.max_pending:
                del self._pending[next(iter(self._pending))]
                self.counts.dropped += 1
            self._pending[key] = now
            self.counts.added += 1
            added = True
        if added:
            self._wake.set()

    async def run(self) -> None:
        """Send batches as ``policy`` decides until ``close`` was called and nothing waits.
        Called while another ``run`` (or ``close``'s drain) is under way: waits for it."""
        if self._running:
            await self._done.wait()
            return
        self._running = True
        try:
            while not self._stopped:
                oldest = next(iter(self._pending.values()), None)
                due = self.policy.due_in(
                    len(self._pending), oldest, self._clock(), draining=self._closing
                )
                if due is None:
                    if self._closing:
                        break
                    self._wake.clear()
                    await self._wake.wait()
                elif due > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), due)
                else:
                    await self._flush(self._take(self.policy.batch_size))
        finally:
            self._done.set()
            c = self.counts
            if c.added or c.requests:  # say nothing when nothing was asked for
                level = logging.WARNING if c.unknown else logging.INFO
                log.log(
                    level,
                    "V7 ids looked up: %d found, %d still unknown",
                    c.found,
                    c.unknown + len(self._pending),
                    extra={
                        "ids_found": c.found,
                        "ids_not_found": c.not_found,
                        "ids_dropped": c.dropped,
                        "ids_failed": c.failed,
                        "ids_left": len(self._pending),
                        "lookup_requests": c.requests,
                    },
                )

    async def close(self) -> None:
        """Stop accepting idents, look up what waits, then stop ``run``. If ``run`` was never
        started, the drain runs here."""
        self._closing = True
        self._wake.set()
        if self._running:
            await self._done.wait()
        else:
            await self.run()

    # --- internals -------------------------------------------------------------------------

    def _take(self, n: int) -> list[Ident]:
        batch: list[Ident] = []
        for key in self._pending:
            batch.append(key)
            if len(batch) >= n:
                break
        for key in batch:
            del self._pending[key]
        return batch

    async def _flush(self, batch: list[Ident]) -> None:
        try:
            found = await self._lookup(batch)
        except Interrupted:
            # A graceful stop while waiting for a send slot: give up what is left.
            self.counts.failed += len(batch)
            self._stopped = True
            return
        except _TooLarge:
            half = len(batch) // 2
            await self._flush(batch[:half])
            await self._flush(batch[half:])
            return
        if found is None:
            self.counts.failed += len(batch)
            return
        pairs = [(k, found[k]) for k in batch if k in found]
        self.counts.not_found += len(batch) - len(pairs)
        if pairs:
            await self._record(pairs)
            self.counts.found += len(pairs)
        if self._missed is not None and len(pairs) < len(batch):
            await self._missed([k for k in batch if k not in found])

    async def _lookup(self, batch: list[Ident]) -> dict[Ident, str] | None:
        """Ids found for the batch; None when the lookup was given up; ``_TooLarge`` when the
        server refused the request as too large and the batch can be split."""
        started = self._clock()
        attempt = 0
        while True:
            self.counts.requests += 1
            try:
                return await self._find(batch, self._slot)
            except RejectedError as e:
                if e.status in (413, 414) and len(batch) > 1:
                    raise _TooLarge from None
                log.warning("id lookup refused: %s", e, extra={"idents": len(batch)})
                return None
            except Retry as e:
                attempt += 1
                delay = self._retry.next_delay(
                    attempt - 1, self._clock() - started, self._rand(), e.delay_s
                )
                if attempt >= self.max_attempts or delay is None:
                    log.warning(
                        "id lookup given up after %d attempts: %s",
                        attempt,
                        e,
                        extra={"idents": len(batch)},
                    )
                    return None
                log.debug("retrying id lookup in %.2f s: %s", delay, e)
                await self._sleep(delay)
            except V7Error as e:  # auth, not found, quota, redirect: not worth retrying here
                log.warning("id lookup failed: %s", e, extra={"idents": len(batch)})
                return None


class _TooLarge(Exception):
    """The lookup request was refused as too large (HTTP 413/414): split the batch."""
