"""Several engine processes on one job through a PostgreSQL ledger (real PostgreSQL, moto, the
V7 emulator, the CLI as subprocesses): they share the listing and the work, a process killed
-9 or paused past its claims loses nothing and records nothing twice."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, cli_env, job_config, wait_for

pytestmark = pytest.mark.timeout(120)

TTL = "5"  # ledger.lease_ttl_s: the shortest allowed, so takeovers come quickly
MAX_IN_FLIGHT = 4  # rate.max_in_flight of these jobs
BATCH_ITEMS = 10  # batch.max_items (the default)

_children: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_child_left() -> Any:
    """Every engine a test started is gone when it ends, passed or failed (a paused one is
    woken first so that the kill lands)."""
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            proc.wait(30)


def _query(url: str, sql: str, *args: Any) -> list[Any]:
    async def go() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(go())


def _start(cfg: Path, url: str, *sets: str) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "ingest", "run", "--config", str(cfg)]
    for s in ("ledger.lease_ttl_s=" + TTL, "ledger.idle_in_transaction_timeout_s=2", *sets):
        args += ["--set", s]
    proc = subprocess.Popen(
        args,
        env=cli_env(INGEST_LEDGER=url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _children.append(proc)
    return proc


def _registered_keys(emulator: Emulator) -> list[str]:
    return [s["storage_key"] for it in emulator.items() for s in it["slots"]]


def _exactly_once(emulator: Emulator, url: str, keys: list[str]) -> None:
    stored = _registered_keys(emulator)
    assert not [k for k, n in Counter(stored).items() if n > 1]
    assert sorted(stored) == sorted(keys)
    states = dict(_query(url, "SELECT state, count(*) FROM items GROUP BY state"))
    assert states == {"REGISTERED": len(keys)}


def _holds(url: str, pid: int, table: str, extra: str = "") -> int:
    """Live claims of process ``pid`` in ``table`` (0 before the schema exists)."""
    try:
        rows = _query(
            url,
            f"SELECT count(*) FROM {table} WHERE claim_holder LIKE $1 AND claim_expires > "
            f"extract(epoch FROM now()) {extra}",
            f"%:{pid}:%",
        )
    except asyncpg.UndefinedTableError:
        return 0
    return int(rows[0][0])


def _job(
    tmp_path: Path, moto_url: str, bucket: str, emulator: Emulator, n: int, folders: int
) -> tuple[Path, list[str]]:
    keys = [f"f{i % folders:02d}/obj_{i:05d}.png" for i in range(n)]
    seed_bucket(moto_url, bucket, keys)
    storage = emulator.storage_for(bucket)
    cfg = job_config(
        tmp_path,
        emulator,
        moto_url,
        bucket,
        storage,
        extra=f"[rate]\nrequests_per_s = 60\nmax_in_flight = {MAX_IN_FLIGHT}\n",
    )
    return cfg, keys


def test_three_processes_share_one_job(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    cfg, keys = _job(tmp_path, moto_url, bucket_name, emulator, 3000, 12)
    emulator.configure(latency_ms=10)
    procs = [_start(cfg, postgres_url, "source.page_size=100") for _ in range(3)]
    codes = [p.wait(90) for p in procs]
    errors = [p.stderr.read()[-2000:] if p.stderr else "" for p in procs]
    assert codes == [0, 0, 0], errors  # never 5: they cooperate
    _exactly_once(emulator, postgres_url, keys)
    # The work was shared: more than one process registered items, and their counts add up.
    runs = _query(postgres_url, "SELECT status, counts FROM runs")
    assert [r["status"] for r in runs] == ["completed"] * 3
    import orjson

    registered = [orjson.loads(r["counts"])["registered"] for r in runs]
    if os.environ.get("DEBUG_MP"):
        print(_query(postgres_url, "SELECT attempts, run_id, count(*) FROM items GROUP BY 1, 2"))
        print([r["counts"] for r in runs])
        for e in errors:
            print(
                [
                    line
                    for line in e.splitlines()
                    if "DEBUG" in line or "claim" in line or "arning" in line
                ][:20]
            )
    assert sum(registered) == len(keys)
    assert sum(1 for n in registered if n > 0) >= 2, registered
    shards = _query(postgres_url, "SELECT count(*) FROM listing")
    assert shards[0][0] == 0  # the listing completed: its shards are gone


def test_kill_dash_nine_mid_shard_then_restart(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    cfg, keys = _job(tmp_path, moto_url, bucket_name, emulator, 2400, 6)
    emulator.configure(latency_ms=20)
    sets = ("source.page_size=50", "source.list_concurrency=1")
    victim = _start(cfg, postgres_url, *sets)
    # The victim holds a shard listed part-way (a stored continuation) and items it claimed.
    assert wait_for(
        lambda: (
            victim.poll() is not None
            or (
                _holds(postgres_url, victim.pid, "listing", "AND checkpoint <> '' AND NOT done") > 0
                and _holds(postgres_url, victim.pid, "items") > 0
                and emulator.counters()["register_requests"] >= 5
            )
        ),
        60,
    )
    assert victim.poll() is None, "finished before it could be killed"
    other = _start(cfg, postgres_url, *sets)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(30)
    shard = _query(
        postgres_url,
        "SELECT shard_id, checkpoint FROM listing WHERE claim_holder LIKE $1 AND NOT done",
        f"%:{victim.pid}:%",
    )
    restart = _start(cfg, postgres_url, *sets)
    assert restart.wait(90) == 0, restart.stderr.read()[-2000:] if restart.stderr else ""
    assert other.wait(90) == 0, other.stderr.read()[-2000:] if other.stderr else ""
    _exactly_once(emulator, postgres_url, keys)
    assert shard, "the victim held no shard when killed"
    # Its claims went (reaped: same host, the process is gone) and its shard was finished.
    assert (
        _query(
            postgres_url,
            "SELECT count(*) FROM items WHERE claim_holder LIKE $1",
            f"%:{victim.pid}:%",
        )[0][0]
        == 0
    )


def test_a_process_paused_past_its_claims_is_fenced(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    cfg, keys = _job(tmp_path, moto_url, bucket_name, emulator, 2000, 4)
    emulator.configure(latency_ms=20)
    sets = ("source.page_size=50", "source.list_concurrency=1")
    paused = _start(cfg, postgres_url, *sets)
    assert wait_for(
        lambda: (
            paused.poll() is not None
            or (
                _holds(postgres_url, paused.pid, "items") > 20
                and emulator.counters()["register_requests"] >= 5
            )
        ),
        60,
    )
    assert paused.poll() is None, "finished before it could be paused"
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        other = _start(cfg, postgres_url, *sets)
        # The other process waits out the paused one's claims, takes its work over, finishes.
        assert other.wait(90) == 0, other.stderr.read()[-2000:] if other.stderr else ""
        _exactly_once(emulator, postgres_url, keys)
        requests = emulator.counters()["register_requests"]
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    code = paused.wait(60)
    err = paused.stderr.read() if paused.stderr else ""
    if os.environ.get("DEBUG_MP"):
        Path("/tmp/paused.err").write_text(err)
    assert code != 5, err[-2000:]
    # Its late writes were refused and nothing it did afterwards was recorded twice.
    assert "claim lost" in err, err[-2000:]
    _exactly_once(emulator, postgres_url, keys)
    # After the takeover the paused process sent nothing new: every request of it checks
    # and extends its claims first (mark_sent, keep_claims before a retry), in the
    # database. What remains allowed: the requests that had passed that check when it was
    # stopped (at most rate.max_in_flight of them) still leave once it wakes, since a check
    # in the ledger and a POST to V7 cannot be one atomic step; each such item reaches V7
    # twice, answered ALREADY_EXISTS the second time, and the ledger refuses the late
    # outcome. No item is POSTed more than twice.
    counters = emulator.counters()
    assert counters["register_requests"] - requests <= MAX_IN_FLIGHT
    posts = counters["item_posts"]
    assert len(posts) == len(keys)
    assert max(posts.values()) <= 2
    assert sum(1 for n in posts.values() if n == 2) <= MAX_IN_FLIGHT * BATCH_ITEMS


def test_two_syncs_at_once_register_only_what_is_new(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    cfg, keys = _job(tmp_path, moto_url, bucket_name, emulator, 600, 6)

    def two_syncs() -> None:
        procs = []
        for _ in range(2):
            args = [sys.executable, "-m", "ingest", "sync", "--config", str(cfg)]
            args += ["--set", "ledger.lease_ttl_s=" + TTL]
            procs.append(
                subprocess.Popen(
                    args,
                    env=cli_env(INGEST_LEDGER=postgres_url),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        codes = [p.wait(90) for p in procs]
        assert codes == [0, 0], [p.stderr.read()[-2000:] if p.stderr else "" for p in procs]

    two_syncs()
    _exactly_once(emulator, postgres_url, keys)
    new = [f"f{i % 6:02d}/new_{i:04d}.png" for i in range(120)]
    seed_bucket(moto_url, bucket_name, new)
    requests = emulator.counters()["register_requests"]
    two_syncs()
    _exactly_once(emulator, postgres_url, keys + new)
    assert emulator.counters()["register_requests"] - requests <= 120 // 10 + 6


def test_roles_split_listing_from_sending(
    tmp_path: Path, moto_url: str, bucket_name: str, emulator: Emulator, postgres_url: str
) -> None:
    cfg, keys = _job(tmp_path, moto_url, bucket_name, emulator, 800, 4)
    lister = _start(cfg, postgres_url, "worker.roles=list,media")
    sender = _start(cfg, postgres_url, "worker.roles=send")
    try:
        codes = [p.wait(90) for p in (lister, sender)]
    except subprocess.TimeoutExpired:  # say what was left and by whom, not only "timed out"
        left = _query(
            postgres_url,
            "SELECT state, media <> '' AS media, claim_holder, count(*) FROM items "
            "WHERE state IN ('PLANNED', 'PROCESSING', 'SENT') GROUP BY 1, 2, 3",
        )
        runs = _query(postgres_url, "SELECT id, status, alive_until FROM runs")
        shards = _query(postgres_url, "SELECT shard_id, done, claim_holder FROM listing")
        pytest.fail(f"hung: items left {left}; runs {runs}; shards {shards}")
    assert codes == [0, 0], [p.stderr.read()[-2000:] if p.stderr else "" for p in (lister, sender)]
    _exactly_once(emulator, postgres_url, keys)
    import orjson

    runs = {r["id"]: orjson.loads(r["counts"]) for r in _query(postgres_url, "SELECT * FROM runs")}
    by_role = sorted((c["listed"], c["registered"]) for c in runs.values())
    assert by_role == [(0, len(keys)), (len(keys), 0)]  # one listed all, the other sent all
