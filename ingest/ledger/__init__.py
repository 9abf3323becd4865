"""The engine's ledger: its memory across runs and crashes.

Callers use the port (``LedgerPort`` and its types) and open a backend with ``open_ledger``::

    async with open_ledger(cfg.ledger, job) as ledger:
        ...

``open_ledger`` takes a file path (SQLite, the default) or a ``postgresql://`` URL (the
PostgreSQL backend, ``postgres.py``: several processes share one job); ``open_configured``
does the same from the ``[ledger]`` config section; ``memory(job)`` (or ":memory:") is a
scratch ledger, e.g. for ``ingest plan``.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from ingest.config import LedgerConfig

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
    "is_url",
    "memory",
    "open_configured",
    "open_ledger",
    "prefix_end",
]

MEMORY = ":memory:"
URL_SCHEMES = ("postgresql://", "postgres://")


def is_url(target: str) -> bool:
    """A PostgreSQL URL (else a file path)."""
    return target.startswith(URL_SCHEMES)


class _Opening:
    """``await open_ledger(...)`` gives the ledger; ``async with open_ledger(...)`` also closes
    it at the end of the block."""

    def __init__(self, target: str, job: str, options: dict[str, Any]) -> None:
        self._target = target
        self._job = job
        self._options = options
        self._ledger: LedgerPort | None = None

    async def _open(self) -> LedgerPort:
        t = self._target
        if is_url(t):
            from ingest.ledger.postgres import PostgresLedger

            return await PostgresLedger.open(t, self._job, **self._options)
        if "://" in t:
            scheme = t.split("://", 1)[0]
            raise LedgerError(
                f"ledger: '{scheme}://' is not a ledger backend: use a file path (SQLite) or "
                "a postgresql:// URL"
            )
        return await SqliteLedger.open(t, self._job)

    def __await__(self) -> Generator[Any, None, LedgerPort]:
        return self._open().__await__()

    async def __aenter__(self) -> LedgerPort:
        self._ledger = await self._open()
        return self._ledger

    async def __aexit__(self, *exc: object) -> None:
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None


def open_ledger(url_or_path: str | os.PathLike[str], job: str, **options: Any) -> _Opening:
    """The ledger of ``job`` at a file path (SQLite; its directory is created if missing),
    ":memory:" (a scratch ledger), or a ``postgresql://`` URL (``options``: those of
    ``PostgresLedger.open``, e.g. ``pool_max_size``)."""
    return _Opening(os.fspath(url_or_path), job, options)


def open_configured(cfg: LedgerConfig, job: str, *, migrate: bool = True) -> _Opening:
    """The ledger the ``[ledger]`` section names: ``url`` (PostgreSQL) when set, else
    ``path`` (SQLite)."""
    target = cfg.url or cfg.path
    options: dict[str, Any] = {}
    if is_url(target):
        options = {
            "pool_max_size": cfg.pool_max_size,
            "statement_cache_size": cfg.statement_cache_size,
            "connect_timeout_s": cfg.connect_timeout_s,
            "migrate": migrate,
            "idle_in_transaction_timeout_s": cfg.idle_in_transaction_timeout_s,
        }
    return _Opening(target, job, options)


def memory(job: str) -> _Opening:
    """A scratch ledger in memory (nothing is kept): the dry-run ``ingest plan``."""
    return _Opening(MEMORY, job, {})
