"""Cloud providers behind two protocols: buckets (``Source``) and object-event queues
(``EventSource``).

Layout: one package per cloud, each with its SDK adapters and the one place its clients are
built (``aws/client.py`` for S3 and SQS, ``azure/auth.py`` for blob and queue); ``gcp/gcs.py``;
``local.py``; ``events.py`` the pure parsing of queue messages into ``ObjectEvent``s;
``factory.py`` opens the configured adapters, importing only the SDK a run needs.

A listing is split into *shards* (a prefix listed recursively, or one folder level listed with a
delimiter) so several can be listed at once. Each shard's pages come in key order and carry an
opaque ``checkpoint`` string from which the listing resumes after a crash (S3 ``StartAfter``, GCS
``startOffset``, Azure continuation marker): the caller stores it, never interprets it.

The worker long-polls an ``EventSource`` for ``Delivery`` objects (one per queue message, each
with the object events it carried, possibly none), records the objects in the ledger, and only
then acks the deliveries: at-least-once (``events.py`` says more).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

from ingest.model import ObjectInfo


@dataclass(frozen=True, slots=True)
class Shard:
    """A piece of the keyspace. ``recursive=False`` lists only the objects directly under prefix."""

    prefix: str
    recursive: bool = True

    @property
    def id(self) -> str:
        return ("R:" if self.recursive else "L:") + self.prefix


@dataclass(slots=True)
class Page:
    objects: list[ObjectInfo]
    # Sub-prefixes found when listing with a delimiter (recursive=False listings only).
    prefixes: list[str] = field(default_factory=list)
    # Resume the shard *after* this page from here. Opaque to callers.
    checkpoint: str = ""


@runtime_checkable
class Source(Protocol):
    """What the engine needs from a bucket. Adapters: s3, gcs, azure, local."""

    provider: str  # "aws" | "gcp" | "azure" | "local"
    bucket: str

    def storage_key(self, key: str) -> str:
        """The V7 `storage_key` for a listed key (Azure prepends the container)."""
        ...

    async def check_access(self) -> None:
        """Raise BucketNotFound / AccessDenied with a clear message, or return."""
        ...

    def list_pages(self, shard: Shard, checkpoint: str = "") -> AsyncIterator[Page]:
        """Pages of one shard in key order, resuming after ``checkpoint`` when given."""
        ...

    def checkpoint_key(self, checkpoint: str) -> str:
        """The last key a checkpoint covers: a resumed listing starts strictly after it."""
        ...

    async def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of an object."""
        ...

    async def download(self, key: str, dest: Path) -> None: ...

    async def upload(
        self,
        key: str,
        data: bytes | Path,
        content_type: str,
        content_encoding: str | None = None,
    ) -> None: ...

    async def close(self) -> None: ...


# --- object events --------------------------------------------------------------------------------

ObjectEventKind = Literal["created", "deleted"]


@dataclass(frozen=True, slots=True)
class ObjectEvent:
    kind: ObjectEventKind
    obj: ObjectInfo  # key as the source lists it; etag without quotes; size 0 on deletes


@dataclass
class Delivery:
    events: list[ObjectEvent]  # may be empty: a test event, another bucket, a poison message
    receipt: object  # opaque, passed back to ack()


class EventSource(Protocol):
    async def receive(self, max_messages: int, wait_s: float) -> list[Delivery]:
        """At most ``max_messages`` deliveries; waits up to ``wait_s`` for the first; [] then."""
        ...

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Delete the messages (only after the ledger recorded their objects)."""
        ...

    async def close(self) -> None: ...


CHUNK_BYTES = 1024 * 1024  # one read of a download stream


async def read_chunks(read: Callable[[int], Awaitable[bytes]]) -> AsyncIterator[bytes]:
    """A download stream's ``read(n)`` as chunks of ``CHUNK_BYTES`` until it returns b""."""
    while chunk := await read(CHUNK_BYTES):
        yield chunk


async def write_chunks(chunks: AsyncIterable[bytes], dest: Path) -> None:
    """A download into ``dest``, rewritten from the start (a retry downloads it all again);
    the file I/O runs off the event loop. Every provider's ``download`` ends here."""
    f = await asyncio.to_thread(dest.open, "wb")
    try:
        async for chunk in chunks:
            await asyncio.to_thread(f.write, chunk)
    finally:
        await asyncio.to_thread(f.close)
