"""The ledger contract (tests/ledger_contract.py) run against every backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ingest.ledger import LedgerPort, open_ledger
from tests.ledger_contract import *  # noqa: F403
from tests.ledger_contract import Factory

# The fixtures run on the session's event loop (pyproject): the tests must too, since an
# asyncpg pool belongs to the loop that made it.
pytestmark = [pytest.mark.timeout(120), pytest.mark.asyncio(loop_scope="session")]

BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=BACKENDS)
async def ledger_factory(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    opened: list[LedgerPort] = []
    if request.param == "sqlite":
        store = str(tmp_path / "ledger.sqlite")
    else:
        store = request.getfixturevalue("postgres_url")

    async def make(job: str = "job-1") -> LedgerPort:
        lg = await open_ledger(store, job, pool_max_size=4)
        opened.append(lg)
        return lg

    yield make
    for lg in opened:
        await lg.close()
