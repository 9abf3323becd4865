"""TEMP (replaced by the ledger branch)."""
from typing import Any

from ingest.ledger.port import *  # noqa: F403
from ingest.ledger.port import Known, LedgerPort  # noqa: F401


def open_ledger(path: str, job: str) -> Any: ...
def prefix_end(prefix: str) -> str | None: ...
