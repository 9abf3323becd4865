"""What only the PostgreSQL ledger does: migrations, connection errors, passwords never shown,
and the engine end to end on it (real PostgreSQL, moto, the V7 emulator)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingest.errors import LedgerError
from ingest.ledger import open_ledger
from ingest.ledger.postgres import SCHEMA_VERSION, PostgresLedger, mask_url
from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, cli_env, job_config, run_cli
from tests.support.postgres import PostgresServer

pytestmark = pytest.mark.timeout(180)

SECRET = "s3cr3t-pw"


def test_mask_url_hides_the_password_only() -> None:
    assert mask_url("postgresql://u:pw@h:5432/db?sslmode=require") == (
        "postgresql://u:***@h:5432/db?sslmode=require"
    )
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert SECRET not in mask_url(f"postgres://u:{SECRET}@[::1]:5/db")


async def _versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [int(r[0]) for r in await conn.fetch("SELECT version FROM schema_version")]
    finally:
        await conn.close()


async def test_migrations_run_once_when_many_processes_open_at_once(postgres_url: str) -> None:
    # Eight pools opening a fresh database at the same moment: one migrates under the
    # advisory lock, the others wait and find nothing to do (no duplicate-table error).
    ledgers = await asyncio.gather(
        *(PostgresLedger.open(postgres_url, f"job-{n}", pool_max_size=1) for n in range(8))
    )
    try:
        assert await _versions(postgres_url) == [v for v, _ in _migrations()]
        assert await ledgers[0].migrate() == SCHEMA_VERSION  # idempotent
        assert await _versions(postgres_url) == [v for v, _ in _migrations()]
    finally:
        for lg in ledgers:
            await lg.close()


def _migrations() -> tuple[tuple[int, tuple[str, ...]], ...]:
    from ingest.ledger.postgres import MIGRATIONS

    return MIGRATIONS


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    lg = await PostgresLedger.open(postgres_url, "j")
    await lg.close()
    conn = await asyncpg.connect(postgres_url)
    await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", SCHEMA_VERSION + 1)
    await conn.close()
    with pytest.raises(LedgerError, match="newer version of ingest"):
        await PostgresLedger.open(postgres_url, "j")


async def test_a_behind_schema_without_migrate_names_the_command(postgres_url: str) -> None:
    with pytest.raises(LedgerError, match="ingest ledger migrate"):
        await PostgresLedger.open(postgres_url, "j", migrate=False)


async def test_connection_errors_are_one_line_without_the_password(
    postgres_server: PostgresServer,
) -> None:
    host, port = postgres_server.host, postgres_server.port
    cases = {
        "missing database": f"postgresql://postgres:{SECRET}@{host}:{port}/no_such_db",
        "unknown role": f"postgresql://nobody:{SECRET}@{host}:{port}/postgres",
        "nothing listening": f"postgresql://postgres:{SECRET}@127.0.0.1:1/db",
    }
    for what, url in cases.items():
        with pytest.raises(LedgerError) as err:
            await open_ledger(url, "j", connect_timeout_s=5)
        msg = str(err.value)
        assert SECRET not in msg, what
        assert "\n" not in msg, what
        assert ":***@" in msg, what


def test_cli_maps_an_unreachable_ledger_to_exit_2_without_traceback(tmp_path: Path) -> None:
    url = f"postgresql://postgres:{SECRET}@127.0.0.1:1/db"
    done = run_cli("status", "--ledger", url, "--dataset", "d", "--bucket", "b", timeout=60)
    assert done.returncode == 2, done.stderr
    assert SECRET not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_ledger_migrate_command_prints_the_version(postgres_url: str) -> None:
    env = cli_env(INGEST_LEDGER=postgres_url)
    done = run_cli("ledger", "migrate", "--dataset", "d", "--bucket", "b", env=env)
    assert done.returncode == 0, done.stderr
    assert f"schema version {SCHEMA_VERSION}" in done.stdout
    again = run_cli("ledger", "migrate", "--dataset", "d", "--bucket", "b", env=env)
    assert again.returncode == 0 and f"schema version {SCHEMA_VERSION}" in again.stdout


def test_run_on_a_postgresql_ledger_then_status_report_and_prune(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    keys = [f"pg/{i // 40}/img_{i:04d}.jpg" for i in range(300)] + ["pg/notes.txt"]
    seed_bucket(moto_url, bucket_name, keys)
    storage = emulator.storage_for(bucket_name)
    cfg = job_config(
        tmp_path, emulator, moto_url, bucket_name, storage, extra="[rate]\nrequests_per_s = 200\n"
    )
    first = run_cli("run", "--config", str(cfg), "--ledger", postgres_url)
    assert first.returncode == 0, first.stderr[-3000:]
    stored = [s["storage_key"] for it in emulator.items() for s in it["slots"]]
    assert sorted(stored) == sorted(keys[:-1])
    assert not [k for k, n in Counter(stored).items() if n > 1]
    assert not (tmp_path / "l.sqlite").exists()  # the URL won over ledger.path

    # INGEST_LEDGER selects the same ledger: a re-run sends nothing.
    env = cli_env(INGEST_LEDGER=postgres_url)
    sent = emulator.counters()["register_requests"]
    second = run_cli("run", "--config", str(cfg), env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert emulator.counters()["register_requests"] == sent

    status = run_cli("status", "--config", str(cfg), "--json", env=env)
    assert status.returncode == 0, status.stderr
    doc = orjson.loads(status.stdout)
    assert doc["objects_by_state"] == {"REGISTERED": 300, "SKIPPED": 1}
    assert [r["status"] for r in doc["last_runs"]][:2] == ["completed", "completed"]

    report = run_cli("report", "--config", str(cfg), "--format", "jsonl", env=env)
    rows = [orjson.loads(line) for line in report.stdout.splitlines()]
    assert [r["key"] for r in rows] == sorted(keys)
    assert all(r["v7_id"] for r in rows if r["state"] == "REGISTERED")

    pruned = run_cli("ledger", "prune", "--config", str(cfg), "--state", "registered", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 300 registered items" in pruned.stdout
    after = orjson.loads(run_cli("status", "--config", str(cfg), "--json", env=env).stdout)
    assert after["objects_by_state"] == {"SKIPPED": 1}
