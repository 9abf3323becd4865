"""The engine's ledger: its memory across runs and crashes.

Callers use the port (``LedgerPort`` and its types) and open a backend with ``open_ledger``::

    async with open_ledger(cfg.ledger, job) as ledger:
        ...

``open_ledger`` takes a file path (SQLite, the default) or a ``postgresql://`` URL (not
available yet); ``memory(job)`` (or ":memory:") is a scratch ledger, e.g. for ``ingest plan``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from ingest.errors import LedgerBusy, LedgerError
from ingest.ledger.port import (
    CollisionPolicy,
    Ident,
    Known,
    Lease,
    LedgerPort,
    ManifestItem,
    Pending,
    ReportRow,
    RunInfo,
    Status,
)
from ingest.ledger.sqlite import SCHEMA_VERSION, SqliteLedger, prefix_end

__all__ = [
    "SCHEMA_VERSION",
    "CollisionPolicy",
    "Ident",
    "Known",
    "Lease",
    "LedgerBusy",
    "LedgerError",
    "LedgerPort",
    "ManifestItem",
    "Pending",
    "ReportRow",
    "RunInfo",
    "SqliteLedger",
    "Status",
    "memory",
    "open_ledger",
    "prefix_end",
]

MEMORY = ":memory:"


class _Opening:
    """``await open_ledger(...)`` gives the ledger; ``async with open_ledger(...)`` also closes
    it at the end of the block."""

    def __init__(self, target: str, job: str) -> None:
        self._target = target
        self._job = job
        self._ledger: SqliteLedger | None = None

    async def _open(self) -> SqliteLedger:
        t = self._target
        if t.startswith(("postgresql://", "postgres://")):
            raise LedgerError(
                "PostgreSQL ledger not available yet: set the ledger to a file path (SQLite)"
            )
        return await SqliteLedger.open(t, self._job)

    def __await__(self) -> Generator[Any, None, SqliteLedger]:
        return self._open().__await__()

    async def __aenter__(self) -> SqliteLedger:
        self._ledger = await self._open()
        return self._ledger

    async def __aexit__(self, *exc: object) -> None:
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None


def open_ledger(url_or_path: str | os.PathLike[str], job: str) -> _Opening:
    """The ledger of ``job`` at a file path (SQLite; its directory is created if missing),
    ":memory:" (a scratch ledger), or a ``postgresql://`` URL (LedgerError: not yet)."""
    return _Opening(os.fspath(url_or_path), job)


def memory(job: str) -> _Opening:
    """A scratch ledger in memory (nothing is kept): the dry-run ``ingest plan``."""
    return _Opening(MEMORY, job)
