"""Bucket adapters behind one protocol.

A listing is split into *shards* (a prefix listed recursively, or one folder level listed with a
delimiter) so several can be listed at once. Each shard's pages come in key order and carry an
opaque ``checkpoint`` string from which the listing resumes after a crash (S3 ``StartAfter``, GCS
``startOffset``, Azure continuation marker): the caller stores it, never interprets it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

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
