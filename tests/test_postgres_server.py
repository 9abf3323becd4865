"""The test PostgreSQL server itself: a fresh database per test, reachable with asyncpg."""

from __future__ import annotations

import asyncpg


async def test_each_test_gets_an_empty_database_of_its_own(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
        await conn.execute("CREATE TABLE t (x int)")
        assert await conn.fetchval("SELECT current_database()") == postgres_url.rsplit("/", 1)[1]
    finally:
        await conn.close()
