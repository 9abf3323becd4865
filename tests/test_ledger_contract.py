"""The ledger contract (tests/ledger_contract.py) run against every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest.ledger import LedgerPort, open_ledger
from tests.ledger_contract import *  # noqa: F403
from tests.ledger_contract import Factory

BACKENDS = ["sqlite"]  # "postgresql" joins here


@pytest.fixture(params=BACKENDS)
async def ledger_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    opened: list[LedgerPort] = []
    store = str(tmp_path / "ledger.sqlite")

    async def make(job: str = "job-1") -> LedgerPort:
        assert request.param == "sqlite"
        lg = await open_ledger(store, job)
        opened.append(lg)
        return lg

    yield make
    for lg in opened:
        await lg.close()
