"""Group items into registration requests by count, by bytes and by age.

``BatchBuilder`` is pure (the caller passes ``now``); ``run_batcher`` is the thin async loop around
it that moves items from one bounded queue to another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from ingest.model import Item
from ingest.registrar.wire import approx_bytes

# The request envelope around the items ({"items": [...], "dataset_slug": ..., ...}) plus commas.
ENVELOPE_OVERHEAD_BYTES = 512


def item_bytes(item: Item) -> int:
    return approx_bytes(item)


@dataclass
class BatchBuilder:
    """Accumulates items; a batch is ready when full by count or bytes, or when its oldest item
    has waited ``max_wait_s`` (so a trickle of objects still registers promptly)."""

    max_items: int
    max_bytes: int
    max_wait_s: float
    _items: list[Item] = field(default_factory=list)
    _bytes: int = ENVELOPE_OVERHEAD_BYTES
    _opened_at: float | None = None

    def add(self, item: Item, now: float) -> list[list[Item]]:
        """Add one item; return the batches that became ready (0, 1 or 2)."""
        ready: list[list[Item]] = []
        size = item_bytes(item) + 1
        if self._items and self._bytes + size > self.max_bytes:
            ready.append(self._take())
        if not self._items:
            self._opened_at = now
        self._items.append(item)
        self._bytes += size
        if len(self._items) >= self.max_items or self._bytes >= self.max_bytes:
            ready.append(self._take())
        return ready

    def deadline(self) -> float | None:
        """When the pending partial batch must be flushed, or None if nothing is pending."""
        return None if self._opened_at is None else self._opened_at + self.max_wait_s

    def flush_due(self, now: float) -> list[Item] | None:
        d = self.deadline()
        if d is not None and now >= d:
            return self._take()
        return None

    def flush(self) -> list[Item] | None:
        return self._take() if self._items else None

    def __len__(self) -> int:
        return len(self._items)

    def _take(self) -> list[Item]:
        out, self._items = self._items, []
        self._bytes = ENVELOPE_OVERHEAD_BYTES
        self._opened_at = None
        return out


async def run_batcher(
    inbox: asyncio.Queue[Item | None],
    outbox: asyncio.Queue[list[Item] | None],
    builder: BatchBuilder,
    clock: Callable[[], float],
    *,
    split: Callable[[Item], bool] | None = None,
) -> None:
    """Move items from ``inbox`` into batches on ``outbox`` until a ``None`` arrives.

    Both queues are bounded, so a slow registrar slows the listing behind it. With ``split``,
    items for which it is true are batched apart (another builder with the same limits): used
    to keep the two register endpoints out of one request.
    """
    other = BatchBuilder(builder.max_items, builder.max_bytes, builder.max_wait_s)
    builders = (builder, other)
    while True:
        deadlines = [d for b in builders if (d := b.deadline()) is not None]
        try:
            if not deadlines:
                item = await inbox.get()
            else:
                # asyncio.timeout cancels the get() in place: an item is never lost to the timeout.
                async with asyncio.timeout(max(min(deadlines) - clock(), 0)):
                    item = await inbox.get()
        except TimeoutError:
            now = clock()
            for b in builders:
                batch = b.flush_due(now)
                if batch:
                    await outbox.put(batch)
            continue
        if item is None:
            for b in builders:
                rest = b.flush()
                if rest:
                    await outbox.put(rest)
            return
        target = other if split is not None and split(item) else builder
        for batch in target.add(item, clock()):
            await outbox.put(batch)
