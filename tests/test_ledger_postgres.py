"""What only the PostgreSQL ledger does: migrations, connection errors, passwords never shown,
and the engine end to end on it (real PostgreSQL, moto, the V7 emulator)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.errors import ClaimLost, LedgerError
from ingest.ledger import open_ledger
from ingest.ledger.port import UNLISTED_SHARD
from ingest.ledger.postgres import SCHEMA_VERSION, PostgresLedger
from ingest.log import mask_url
from ingest.model import Media, Outcome, State
from tests.conftest import seed_bucket
from tests.ledger_contract import collide, record, single
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
    assert after["objects_by_state"] == {"REGISTERED": 300, "SKIPPED": 1}  # tombstones
    assert after["items_by_state"] == {}


# --- claims: several processes, one job --------------------------------------------------------


def _dead(*holders: str) -> Callable[[str], bool]:
    return lambda h: h in holders


async def _two(url: str, ttl_s: float = 60.0) -> tuple[PostgresLedger, PostgresLedger]:
    a = await PostgresLedger.open(url, "job", pool_max_size=2)
    b = await PostgresLedger.open(url, "job", pool_max_size=2)
    await a.join("A", ttl_s)
    await b.join("B", ttl_s)
    await a.start_run("run")
    await b.start_run("run")
    return a, b


async def test_items_a_process_plans_are_its_own_until_its_claims_go(postgres_url: str) -> None:
    a, b = await _two(postgres_url)
    try:
        await a.register_shards(["R:x/"])
        assert await a.claim_shard() == ("R:x/", "")
        assert await b.claim_shard() is None  # no two processes list the same range
        items = await record(a, [f"x/{n}.jpg" for n in range(5)], shard="R:x/", checkpoint="c1")
        assert [p async for p in b.pending()] == []  # claimed by A, which lives
        assert await b.outstanding()  # five items and a shard, held by A
        # B cannot record a page of A's shard.
        with pytest.raises(ClaimLost):
            await record(b, ["x/9.jpg"], shard="R:x/", checkpoint="c2")
        # A dies: its claims are reaped; B takes the items and the shard, at A's continuation.
        assert await b.reap_claims(_dead("A")) == 6
        got = [p.item for p in await _all(b.pending())]
        assert [it.ident for it in got] == [it.ident for it in items]
        assert await b.claim_shard() == ("R:x/", "c1")
        # A was only paused: every late write of it is refused, nothing recorded.
        with pytest.raises(ClaimLost) as lost:
            await a.mark_sent(items[:2])
        assert sorted(lost.value.idents) == sorted(it.ident for it in items[:2])
        with pytest.raises(ClaimLost):
            await a.record_outcomes([Outcome(items[0].path, items[0].name, State.REGISTERED)])
        with pytest.raises(ClaimLost):
            await a.mark_processing(items[1])
        with pytest.raises(ClaimLost):
            await record(a, ["x/8.jpg"], shard="R:x/", checkpoint="c3")
        assert (await b.item_states([items[0].ident])) == {items[0].ident: State.PLANNED}
        assert (await b.checkpoints())["R:x/"] == ("c1", False)
        # B's writes go through; an outcome ends B's claim.
        assert await b.mark_sent(items[:2]) == [1, 1]
        await b.record_outcomes([Outcome(it.path, it.name, State.REGISTERED) for it in items[:2]])
        assert await b.renew_claims() == 4  # three items and the shard
        await record(b, [], shard="R:x/", checkpoint="c4", done=True)
        assert await a.outstanding()
    finally:
        await a.close()
        await b.close()


async def _all(gen: Any) -> list[Any]:
    return [x async for x in gen]


async def test_an_expired_claim_is_taken_over_without_reaping(postgres_url: str) -> None:
    a, b = await _two(postgres_url, ttl_s=0.2)
    try:
        (item,) = await record(a, ["y/1.jpg"], shard=UNLISTED_SHARD)
        deadline = time.monotonic() + 10
        taken: list[Any] = []
        while not taken and time.monotonic() < deadline:  # a condition with a deadline
            taken = await _all(b.pending())
        assert [p.item.ident for p in taken] == [item.ident]
        assert await b.renew_claims() == 1
        assert await a.renew_claims() == 0  # A's renewal came too late
    finally:
        await a.close()
        await b.close()


async def test_roles_limit_what_a_process_claims(postgres_url: str) -> None:
    lister = await PostgresLedger.open(postgres_url, "job", pool_max_size=2)
    media = await PostgresLedger.open(postgres_url, "job", pool_max_size=2)
    sender = await PostgresLedger.open(postgres_url, "job", pool_max_size=2)
    try:
        await lister.join("L", 60, frozenset({"list"}))
        await media.join("M", 60, frozenset({"media"}))
        await sender.join("S", 60, frozenset({"send"}))
        await lister.start_run("run")
        for lg in (media, sender):
            await lg.start_run("run")
        await lister.register_shards(["s"])
        assert await lister.claim_shard() == ("s", "")
        plain = single("r/plain.jpg")
        thumb = replace(single("r/thumb.jpg"), media=Media.IMAGE)
        new = await lister.record_page("s", "", False, [], [plain, thumb], collide)
        assert len(new) == 2
        assert await lister.outstanding()  # neither is the lister's to work on
        assert await media.claim_shard() is None  # no "list" role
        assert [p.item.ident for p in await _all(media.pending())] == [thumb.ident]
        assert [p.item.ident for p in await _all(sender.pending())] == [plain.ident]
        # Media done by a process that does not send: the item is left for the senders.
        await media.media_done(thumb)
        assert [p.item.ident for p in await _all(sender.pending())] == [thumb.ident]
        # The others gone, the lister waits for no work it cannot do (it is left to a later
        # run); the sender still has its own to finish.
        await record(lister, [], shard="s", done=True)
        for lg in (media, sender):
            await lg.finish_run(lg._run_id, "completed", {})
        assert not await lister.outstanding()
        await sender.release_claims()
        assert await sender.outstanding()
    finally:
        for lg in (lister, media, sender):
            await lg.close()


async def test_listing_completes_only_when_every_shard_is_done(postgres_url: str) -> None:
    a, b = await _two(postgres_url)
    try:
        await a.register_shards(["R:p/", "R:q/"])
        assert await a.claim_shard() == ("R:p/", "")
        assert await b.claim_shard() == ("R:q/", "")
        await record(a, ["p/1.jpg"], shard="R:p/", checkpoint="p1", done=True)
        assert await a.mark_listing_complete() == []  # B still lists q/
        assert (await b.checkpoints())["R:q/"] == ("", False)
        await record(b, ["q/1.jpg"], shard="R:q/", checkpoint="q1", done=True)
        # The last to finish completes it, and it alone gets every process's shards (what a
        # sync sweeps vanished folders from), once.
        assert await b.mark_listing_complete() == ["R:p/", "R:q/"]
        assert await a.mark_listing_complete() == []
        assert await b.checkpoints() == {}
        # Neither run was taken for interrupted by the other's start.
        runs = (await a.status()).last_runs
        assert [r["status"] for r in runs] == ["running", "running"]
    finally:
        await a.close()
        await b.close()


def test_mask_url_masks_every_form_of_password() -> None:
    assert mask_url(f"postgresql://u@h/db?password={SECRET}&sslmode=require") == (
        "postgresql://u@h/db?sslmode=require"
    )
    for url in (
        f"postgresql://u:{SECRET}/x#y?z@h:5432/db",  # unencoded / # ? in the password
        f"postgresql://u:{SECRET}@h:99999/db",  # a port out of range
        f"postgresql://u@h/db?sslpassword={SECRET}",
        f"postgresql://u@h/db?passfile=/run/{SECRET}",
    ):
        assert SECRET not in mask_url(url), url


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://u:{SECRET}@127.0.0.1:99999/db",
        f"postgresql://u:{SECRET}/x#y@127.0.0.1:1/db",
        f"postgresql://u@127.0.0.1:1/db?password={SECRET}",
    ],
)
async def test_a_bad_url_is_one_line_without_the_password(url: str) -> None:
    with pytest.raises(LedgerError) as err:
        await PostgresLedger.open(url, "job", connect_timeout_s=2)
    assert SECRET not in str(err.value)
    assert "\n" not in str(err.value)


# --- claims follow the database's clock, and a write needs a claim still running -------------


async def _claim_left_s(url: str, name: str) -> float:
    """Seconds left on an item's claim, by the database's clock."""
    conn = await asyncpg.connect(url)
    try:
        return float(
            await conn.fetchval(
                "SELECT claim_expires - extract(epoch from clock_timestamp()) FROM items "
                "WHERE name=$1",
                name,
            )
        )
    finally:
        await conn.close()


async def _until_expired(url: str, name: str) -> None:
    deadline = time.monotonic() + 10
    while await _claim_left_s(url, name) > 0:  # a condition with a deadline
        assert time.monotonic() < deadline


async def test_a_machine_clock_ahead_takes_no_live_claim(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = await _two(postgres_url, ttl_s=30)
    try:
        (item,) = await record(a, ["skew/1.jpg"], shard=UNLISTED_SHARD)
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # B's clock an hour ahead
        assert await _all(b.pending()) == []
        assert await b.reap_claims(lambda _h: False) == 0
        await b.register_shards(["R:skew/"])
        assert await b.claim_shard() == ("R:skew/", "")
        monkeypatch.setattr(time, "time", lambda: real() - 3600)  # A's clock an hour behind
        assert await a.claim_shard() is None  # B's fresh shard claim is B's
        assert await a.mark_sent([item]) == [1]
        assert 25 < await _claim_left_s(postgres_url, item.name) <= 30
    finally:
        await a.close()
        await b.close()


async def test_a_write_to_an_expired_claim_is_refused_even_before_a_takeover(
    postgres_url: str,
) -> None:
    a, b = await _two(postgres_url, ttl_s=3.0)
    try:
        first, second, third = await record(
            a, ["exp/1.jpg", "exp/2.jpg", "exp/3.jpg"], shard=UNLISTED_SHARD
        )
        left = await _claim_left_s(postgres_url, second.name)
        await a.mark_sent([first])  # the write extends the claim by the lease
        assert await _claim_left_s(postgres_url, first.name) > left
        await _until_expired(postgres_url, second.name)
        with pytest.raises(ClaimLost):
            await a.mark_sent([second])  # nobody took it yet, but anybody may now
        with pytest.raises(ClaimLost):
            await a.mark_processing(third)
        with pytest.raises(ClaimLost):
            await a.record_outcomes([Outcome(third.path, third.name, State.REGISTERED)])
        with pytest.raises(ClaimLost):
            await a.keep_claims([second])
        # B takes them over and sends: only one process ever marks an item. A SENT item
        # taken over counts a second attempt: V7's ALREADY_EXISTS for it is then ours (the
        # registrar's sent_before), not somebody else's.
        await _until_expired(postgres_url, first.name)
        taken = {p.item.ident for p in await _all(b.pending())}
        assert taken == {first.ident, second.ident, third.ident}
        assert await b.mark_sent([second, first]) == [1, 2]
        await b.keep_claims([second, first])
    finally:
        await a.close()
        await b.close()


async def test_a_late_page_never_brings_back_a_completed_or_given_back_shard(
    postgres_url: str,
) -> None:
    a, b = await _two(postgres_url, ttl_s=0.3)
    try:
        await a.register_shards(["R:p/"])
        assert await a.claim_shard() == ("R:p/", "")
        await record(a, ["p/1.jpg"], shard="R:p/", checkpoint="c1")
        deadline = time.monotonic() + 10
        while (got := await b.claim_shard()) is None:  # A's claim expires: B takes the shard
            assert time.monotonic() < deadline
        assert got == ("R:p/", "c1")
        await record(b, ["p/2.jpg"], shard="R:p/", checkpoint="c2", done=True)
        await b.mark_listing_complete()
        assert await b.checkpoints() == {}
        with pytest.raises(ClaimLost):  # A's late page: the row is gone, not A's
            await record(a, ["p/9.jpg"], shard="R:p/", checkpoint="cX")
        assert await b.checkpoints() == {}
        # A shard given back (token 0) is nobody's until claimed again.
        await a.register_shards(["R:q/"])
        assert await a.claim_shard() == ("R:q/", "")
        await a.release_claims()
        with pytest.raises(ClaimLost):
            await record(a, ["q/1.jpg"], shard="R:q/", checkpoint="q1")
        assert (await a.checkpoints())["R:q/"] == ("", False)
    finally:
        await a.close()
        await b.close()


async def test_two_engines_of_one_process_never_reap_each_other(postgres_url: str) -> None:
    from ingest.engine import _dead_here, hold_lease

    a = await PostgresLedger.open(postgres_url, "job", pool_max_size=2)
    b = await PostgresLedger.open(postgres_url, "job", pool_max_size=2)
    try:
        async with (
            hold_lease(a, 30, lambda: None) as holder_a,
            hold_lease(b, 30, lambda: None) as holder_b,
        ):
            await a.start_run("run")
            await b.start_run("run")
            (item,) = await record(a, ["two/1.jpg"], shard=UNLISTED_SHARD)
            assert not _dead_here(holder_a) and not _dead_here(holder_b)
            assert await b.reap_claims(_dead_here) == 0  # A, same pid, lives
            assert await _all(b.pending()) == []
            assert await a.mark_sent([item]) == [1]
        assert _dead_here(holder_a)  # gone: an earlier life of this pid
    finally:
        await a.close()
        await b.close()


async def test_a_driver_usage_error_is_not_retried_as_a_lost_connection(postgres_url: str) -> None:
    # asyncpg.InterfaceError also means "misused" (e.g. another operation in progress): a
    # programming error, raised once, never run again as if the session had been lost.
    lg = await PostgresLedger.open(postgres_url, "job", pool_max_size=3)
    calls: list[int] = []

    async def misuse(_c: Any) -> None:
        calls.append(1)
        raise asyncpg.InterfaceError("cannot perform operation: another operation is in progress")

    try:
        with pytest.raises(LedgerError):
            await lg._tx(misuse)
        assert calls == [1]
    finally:
        await lg.close()
