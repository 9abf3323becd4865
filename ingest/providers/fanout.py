"""Split a prefix into shards and list them concurrently into one bounded queue.

Shards: the objects directly under the prefix (listed with a '/' delimiter) plus one recursive
shard per sub-prefix, ``depth`` levels down. Every key under the prefix lies in exactly one
shard, and a folder's keys never span two shards, so each shard's stream can be planned alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

from ingest.providers import Page, Shard, Source


@dataclass(frozen=True, slots=True)
class ShardPage:
    shard: Shard
    page: Page
    last: bool  # the shard has no further pages


async def _sub_prefixes(source: Source, prefix: str) -> list[str]:
    out: list[str] = []
    async for page in source.list_pages(Shard(prefix, recursive=False)):
        out.extend(page.prefixes)
    return out


async def discover_shards(source: Source, prefix: str, depth: int = 1) -> list[Shard]:
    """Delimiter discovery ``depth`` levels below ``prefix`` (0 = one recursive shard)."""
    if depth <= 0:
        return [Shard(prefix, recursive=True)]
    shards = [Shard(prefix, recursive=False)]
    for sub in await _sub_prefixes(source, prefix):
        if sub == prefix:  # a key like "a//b" yields prefix "a/" again: list it recursively
            shards.append(Shard(sub, recursive=True))
            continue
        shards.extend(await discover_shards(source, sub, depth - 1))
    return shards


async def _list_one(
    source: Source, shard: Shard, checkpoint: str, out: asyncio.Queue[ShardPage | None]
) -> None:
    held: Page | None = None
    async for page in source.list_pages(shard, checkpoint):
        if not shard.recursive:
            page = Page(page.objects, [], page.checkpoint)
        if held is not None:
            await out.put(ShardPage(shard, held, last=False))
        held = page
    await out.put(ShardPage(shard, held or Page([], [], checkpoint), last=True))


async def list_shards(
    source: Source,
    shards: list[Shard],
    checkpoints: dict[str, str],
    done: set[str],
    concurrency: int,
    out: asyncio.Queue[ShardPage | None],
) -> None:
    """List every shard not in ``done`` (resuming after its checkpoint), at most
    ``concurrency`` at once, into ``out``; put ``None`` when all are listed. ``out`` is bounded,
    so a slow consumer slows the listers. The first error cancels the other listers."""
    todo = [s for s in shards if s.id not in done]
    sem = asyncio.Semaphore(max(1, concurrency))

    async def one(shard: Shard) -> None:
        async with sem:
            await _list_one(source, shard, checkpoints.get(shard.id, ""), out)

    async with asyncio.TaskGroup() as tg:
        for shard in todo:
            tg.create_task(one(shard))
    await out.put(None)


async def iter_shard_pages(
    source: Source,
    shards: list[Shard],
    checkpoints: dict[str, str],
    done: set[str],
    concurrency: int,
    queue_pages: int = 8,
) -> AsyncGenerator[ShardPage, None]:
    """The pages of ``list_shards`` as an async iterator; a listing error is raised here.

    Use with ``contextlib.aclosing`` so that leaving the loop early stops the listers."""
    q: asyncio.Queue[ShardPage | None] = asyncio.Queue(queue_pages)
    lister = asyncio.create_task(list_shards(source, shards, checkpoints, done, concurrency, q))
    try:
        while not lister.done():
            get = asyncio.ensure_future(q.get())
            finished, _ = await asyncio.wait({get, lister}, return_when=asyncio.FIRST_COMPLETED)
            if get not in finished:
                get.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await get
                if get.cancelled():
                    break
            sp = get.result()
            if sp is None:
                return
            yield sp
        lister.result()  # re-raise a listing error
        while (sp := await q.get()) is not None:
            yield sp
    finally:
        if not lister.done():
            lister.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lister


def shard_of(shard_id: str) -> Shard:
    """The shard a ``Shard.id`` names ("R:prefix" recursive, "L:prefix" one level)."""
    kind, _, prefix = shard_id.partition(":")
    return Shard(prefix, recursive=kind != "L")


async def iter_claimed_pages(
    source: Source,
    claim: Callable[[], Awaitable[tuple[str, str] | None]],
    lost: set[str],
    concurrency: int,
    queue_pages: int = 8,
) -> AsyncGenerator[tuple[ShardPage, str], None]:
    """Several processes, one listing: ``concurrency`` listers each ``claim`` a shard (id,
    continuation) from the ledger, list it from there to its end, and claim the next; none
    left to claim, they stop. Yields (page, the continuation the shard was claimed at). A shard
    whose id the consumer puts in ``lost`` (another process took it over) is dropped at its
    next page. Use with ``contextlib.aclosing``."""
    q: asyncio.Queue[tuple[ShardPage, str] | None] = asyncio.Queue(queue_pages)

    async def one() -> None:
        while (got := await claim()) is not None:
            shard_id, continuation = got
            lost.discard(shard_id)  # ours again (taken back from a process that died)
            shard = shard_of(shard_id)
            held: Page | None = None
            async for page in source.list_pages(shard, continuation):
                if shard_id in lost:
                    break
                if not shard.recursive:
                    page = Page(page.objects, [], page.checkpoint)
                if held is not None:
                    await q.put((ShardPage(shard, held, last=False), continuation))
                held = page
            else:
                last = held or Page([], [], continuation)
                await q.put((ShardPage(shard, last, last=True), continuation))

    async def listers() -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, concurrency)):
                tg.create_task(one())
        await q.put(None)

    task = asyncio.create_task(listers())
    try:
        while True:
            get = asyncio.ensure_future(q.get())
            finished, _ = await asyncio.wait({get, task}, return_when=asyncio.FIRST_COMPLETED)
            if get not in finished:
                get.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await get
                task.result()  # a listing error is raised here
                while (item := await q.get()) is not None:
                    yield item
                return
            item = get.result()
            if item is None:
                return
            yield item
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
