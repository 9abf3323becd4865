"""The shared rate budget: pure GCRA/grant decisions on a fake clock, the SQL against a real
PostgreSQL (the same decisions, concurrent clients with pools of their own, a 429 seen by one
pausing the others, a bounded pool, no secret in the database)."""

from __future__ import annotations

import asyncio
import itertools
import random

import asyncpg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.config import RateConfig
from ingest.errors import PreflightError, RateLimited
from ingest.registrar.shared_rate import (
    BudgetRow,
    BudgetTuning,
    Grant,
    Granted,
    SharedLimiter,
    budget_key,
    budget_url,
    grant,
    grant_size,
    grant_sql,
    max_in_window,
    migrate,
    open_budget,
    rate_limited,
    rate_limited_sql,
    slot_times,
)

T = BudgetTuning()
Z = 1000.0  # a clock origin well after the row's zeros (as epoch seconds are)


def row(rate: float = 20.0, burst: float = 1.0, now: float = 1000.0) -> BudgetRow:
    return BudgetRow.new(rate, burst, 0.2, True, now)


def bound(rate: float, burst: float, window_s: float) -> float:
    """GCRA's promise over any window: rate x window + burst (the slack only lowers it)."""
    return rate * window_s + burst + 1e-9


# --- pure decisions ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    rate=st.floats(2.0, 500.0),
    burst=st.integers(1, 10),
    clients=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    idle=st.booleans(),
)
def test_grants_never_exceed_rate_times_window_plus_burst(
    rate: float, burst: int, clients: int, seed: int, idle: bool
) -> None:
    """Several clients, each asking again when its slots run out (or at random), at random
    times: the union of every slot granted stays within the budget over any window, and the
    budget is used when they ask for more than it allows."""
    rng = random.Random(seed)
    state = row(rate, burst, now=0.0)
    now, grants, until = 0.0, [], 5.0
    ready = [0.0] * clients  # when each client next asks
    while now < until:
        c = min(range(clients), key=lambda i: ready[i])
        now = ready[c]
        g, state = grant(state, now, rng.randint(1, 8))
        grants.append(g)
        # a client asks again at its last slot, or (idle) sometimes before, sometimes later
        pause = rng.choice((-0.01, 0.0, rng.uniform(0, 0.05))) if idle else 0.0
        ready[c] = max(now, g.times()[-1] + pause)
    times = [x for x in slot_times(grants) if x < until]
    for window in (1 / rate, 0.1, 0.5, 1.0, 2.5):
        assert max_in_window(times, window) <= bound(rate, burst, window)
    if not idle:
        assert len(times) >= 0.95 * rate * until


def test_grant_size_covers_at_most_a_tenth_of_a_second_of_budget() -> None:
    assert grant_size(20.0, 8, T) == 2  # 100 ms at 20/s
    assert grant_size(5.0, 8, T) == 1  # always at least one
    assert grant_size(1000.0, 8, T) == 8  # what the senders wait for...
    assert grant_size(1000.0, 100, T) == T.max_grant  # ...at most max_grant


def test_a_burst_goes_at_once_then_one_per_interval() -> None:
    g, state = grant(row(10.0, burst=3, now=0.0), 0.0, 8)
    assert g.count == 1  # 100 ms of 10/s
    times: list[float] = []
    for _ in range(6):
        g, state = grant(state, 0.0, 1)
        times += g.times()
    interval = 1 / (10 * (1 - T.slack))
    assert times[:2] == [0.0, 0.0]  # with the first grant: burst 3 at t = 0
    assert times[2:] == pytest.approx([interval * i for i in range(1, 5)])


def test_a_429_pauses_every_later_grant_until_retry_after_without_a_burst() -> None:
    state = row(20.0, burst=4, now=Z)
    g, state = grant(state, Z + 0.0, 2)
    state = rate_limited(state, Z + 0.05, retry_after_s=2.0, granted_at=g.now, sent_at=Z)
    assert state.pause_until == pytest.approx(Z + 2.05)
    assert state.generation == 1  # slots held elsewhere are void
    later: list[float] = []
    for now in (0.1, 0.5, 1.9):
        g, state = grant(state, Z + now, 2)
        later += g.times()
    assert min(later) >= Z + 2.05
    # after the pause, one interval apart (the server's bucket is empty): no burst
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert min(gaps) >= 1 / state.rate_per_s - 1e-9


def test_one_cut_per_congestion_episode() -> None:
    state = row(20.0, now=Z)
    g1, state = grant(state, Z + 0.0, 2)
    g2, state = grant(state, Z + 0.0, 2)
    # two 429s for slots granted before the first cut: one episode, one cut
    state = rate_limited(state, Z + 0.2, 0.5, granted_at=g1.now, sent_at=g1.times()[0])
    state = rate_limited(state, Z + 0.21, 0.5, granted_at=g2.now, sent_at=g2.times()[0])
    assert state.cuts == 1
    assert state.rate_per_s == pytest.approx(20 * T.margin)
    # the first send after the pause says the pause was short: no cut
    g3, state = grant(state, Z + 0.8, 1)
    state = rate_limited(state, Z + 0.9, 0.5, granted_at=g3.now, sent_at=state.resumed_at)
    assert state.cuts == 1
    # a slot granted after the cut and sent well after the pause: a new episode
    g4, state = grant(state, Z + 1.6, 1)
    state = rate_limited(state, Z + 1.7, 0.5, granted_at=g4.now, sent_at=g4.times()[0] + 0.2)
    assert state.cuts == 2  # in quick succession: the rate is far too high, cut harder
    assert state.rate_per_s == pytest.approx(20 * T.margin * T.decrease)
    # a 429 long after the last cut found the edge: a step just below it
    before = state.rate_per_s
    g5, state = grant(state, Z + 1.8, 1)
    at = g5.times()[0]
    late = Z + 1.7 + T.prove_s + 0.5
    state = rate_limited(state, late, 0.5, granted_at=g5.now, sent_at=at + 0.1)
    assert state.cuts == 3
    assert state.rate_per_s == pytest.approx(before * T.margin)


def test_the_increase_is_applied_once_by_whichever_process_is_granted_while_quiet() -> None:
    state = row(20.0, now=Z)
    g, state = grant(state, Z + 0.0, 1)
    state = rate_limited(state, Z + 0.1, 0.1, granted_at=g.now, sent_at=Z)
    cut = state.rate_per_s
    rates = []
    now = Z + 0.2
    while now < Z + 0.2 + T.prove_s + 0.5:  # three processes taking turns at grants
        for _ in range(3):
            g, state = grant(state, now, 1)
            rates.append(state.rate_per_s)
        now += 0.05
    raised = sorted(set(rates))
    assert raised[0] == cut
    assert len(raised) == 2  # one step in the proving period, not one per process
    # the rate that drew the 429 bounds the climb (bisection between proven and limit)
    assert raised[1] == pytest.approx((cut + 20.0) / 2)


def test_a_cut_goes_back_to_the_proven_rate() -> None:
    state = row(20.0, now=Z)
    g, state = grant(state, Z + 0.0, 1)
    state = rate_limited(state, Z + 0.1, 0.1, granted_at=g.now, sent_at=Z)  # 19.4
    proven = state.rate_per_s
    g, state = grant(state, Z + 0.1 + T.prove_s + 0.1, 1)  # proven at 19.4, bisect up
    assert state.proven_rate == proven and state.rate_per_s > proven
    g, state = grant(state, Z + 5.0, 1)
    state = rate_limited(state, Z + 5.1, 0.1, granted_at=g.now, sent_at=Z + 5.05)
    assert state.rate_per_s == proven


def test_the_configured_rate_is_a_ceiling_and_not_adaptive_means_fixed() -> None:
    state = row(20.0, now=Z)
    for now in range(0, 60):
        _, state = grant(state, Z + float(now), 1)
    assert state.rate_per_s == 20.0
    fixed = BudgetRow.new(20.0, 1.0, 0.2, False, Z)
    g, fixed = grant(fixed, Z + 0.0, 1)
    fixed = rate_limited(fixed, Z + 0.1, 1.0, granted_at=g.now, sent_at=Z)
    assert fixed.rate_per_s == 20.0 and fixed.pause_until == pytest.approx(Z + 1.1)


def test_the_budget_key_is_a_hash_never_the_key() -> None:
    key = budget_key("https://darwin.v7labs.com/", "ApiKey abc.secret-123")
    assert "secret" not in key and "abc" not in key
    assert key == budget_key("https://darwin.v7labs.com", "ApiKey abc.secret-123")
    assert key != budget_key("https://darwin.v7labs.com", "ApiKey abc.other")
    assert key != budget_key("http://127.0.0.1:1", "ApiKey abc.secret-123")


def test_which_budget_is_used() -> None:
    pg = "postgresql://ingest@db/ingest"
    assert budget_url("auto", "", "ingest-ledger.sqlite") is None
    assert budget_url("auto", "", pg) == pg
    assert budget_url("auto", pg, "l.sqlite") == pg
    assert budget_url("off", pg, pg) is None
    assert budget_url("on", pg, "") == pg
    with pytest.raises(ValueError, match=r"rate\.shared_url"):
        budget_url("on", "", "l.sqlite")


def test_a_url_is_shown_without_its_password() -> None:
    from ingest.log import mask_url as redact_url

    shown = redact_url("postgresql://ingest:hunter2@db:5432/ingest")
    assert "hunter2" not in shown and shown == "postgresql://ingest:***@db:5432/ingest"
    assert redact_url("postgresql://db/ingest") == "postgresql://db/ingest"


# --- against PostgreSQL -----------------------------------------------------------------------

FIELDS = [
    "rate_per_s", "ceiling_per_s", "min_rate_per_s", "burst", "tat", "pause_until",
    "proven_rate", "limit_rate", "quiet_since", "cut_at", "resumed_at", "probes", "cuts",
    "generation",
]  # fmt: skip


async def _insert(conn: asyncpg.Connection, key: str, r: BudgetRow) -> None:
    await conn.execute(
        """INSERT INTO rate_budget VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
           $13, $14, $15, $16, 0, 0, 0, 0, now())""",
        key, r.rate_per_s, r.ceiling_per_s, r.min_rate_per_s, r.burst, r.adaptive, r.tat,
        r.pause_until, r.proven_rate, r.limit_rate, r.quiet_since, r.cut_at, r.resumed_at,
        r.probes, r.cuts, r.generation,
    )  # fmt: skip


async def test_the_sql_makes_the_same_decisions_as_the_pure_functions(postgres_url: str) -> None:
    """A long random sequence of grants and 429s at explicit times, through both: every grant
    and every row field agree."""
    conn = await asyncpg.connect(postgres_url)
    try:
        await migrate(conn)
        await migrate(conn)  # idempotent
        rng = random.Random(7)
        for burst in (1.0, 4.0):
            key = f"k{burst}"
            state = BudgetRow.new(50.0, burst, 0.2, True, 0.0)
            await _insert(conn, key, state)
            now, last_grant, raises = 0.0, 0.0, 0
            for _ in range(400):
                now += rng.choice((0.001, 0.02, 0.3, 1.5))
                before = state.rate_per_s
                if rng.random() < 0.04:
                    retry = rng.choice((None, 0.5, 1.0))
                    granted = rng.choice((None, last_grant))
                    sent = None if granted is None else granted + rng.uniform(0, 0.3)
                    state = rate_limited(state, now, retry, granted, sent)
                    await conn.fetchrow(rate_limited_sql(), key, retry, granted, sent, now)
                else:
                    want = rng.randint(1, 10)
                    g, state = grant(state, now, want)
                    r = await conn.fetchrow(grant_sql(), key, want, now)
                    assert r is not None
                    last_grant = g.now
                    assert (r["grant_count"], r["generation"]) == (g.count, g.generation)
                    assert r["grant_base"] == pytest.approx(g.base, rel=1e-12, abs=1e-9)
                    assert r["grant_interval"] == pytest.approx(g.interval, rel=1e-12)
                db = await conn.fetchrow("SELECT * FROM rate_budget WHERE key_id = $1", key)
                assert db is not None
                for f in FIELDS:
                    assert db[f] == pytest.approx(getattr(state, f), rel=1e-9, abs=1e-9), f
                raises += state.rate_per_s > before
            assert state.cuts >= 3 and raises >= 3  # both directions were exercised
    finally:
        await conn.close()


def _cfg(rate: float, burst: float, max_in_flight: int = 8, *, adaptive: bool = True) -> RateConfig:
    return RateConfig(
        requests_per_s=rate, burst=burst, max_in_flight=max_in_flight, adaptive=adaptive
    )


async def _send_for(limiter: SharedLimiter, seconds: float, senders: int) -> list[float]:
    """``senders`` tasks taking slots for ``seconds``: the send times (database clock)."""
    sent: list[float] = []
    stop = asyncio.Event()

    async def sender() -> None:
        while not stop.is_set():
            async with limiter.slot() as at:
                sent.append(limiter.budget.to_db(at))
                limiter.answered(at)

    tasks = [asyncio.create_task(sender()) for _ in range(senders)]
    await asyncio.sleep(seconds)  # the measured period itself, not a synchronisation
    stop.set()
    await asyncio.gather(*tasks)
    return sent


async def test_three_clients_with_pools_of_their_own_share_one_budget(postgres_url: str) -> None:
    """Three budget clients (separate pools, as three processes would have) drawing at once:
    the union of granted slots never exceeds R x t + burst over any window, and they use it."""
    rate, burst, seconds = 200.0, 5.0, 3.0
    key = budget_key("http://v7", "ApiKey k")
    granted: list[list[Granted]] = [[], [], []]
    async with (
        open_budget(postgres_url, key, _cfg(rate, burst)) as a,
        open_budget(postgres_url, key, _cfg(rate, burst)) as b,
        open_budget(postgres_url, key, _cfg(rate, burst)) as c,
    ):
        for lim, seen in zip((a, b, c), granted, strict=True):
            lim._on_grant = seen.append
        sent = await asyncio.gather(*(_send_for(x, seconds, 6) for x in (a, b, c)))
    slots = sorted(t for seen in granted for g in seen for t in g.db_times)
    for window in (1 / rate, 0.05, 0.25, 1.0):
        assert max_in_window(slots, window) <= bound(rate, burst, window)
    # sends happen at their slots (a stalled sender forfeits its slot rather than bunch)
    everything = sorted(t for s in sent for t in s)
    for window in (0.05, 0.25, 1.0):  # at most one late send per process beyond the slots
        assert max_in_window(everything, window) <= bound(rate, burst, window) + 3
    assert len(everything) >= 0.25 * rate * seconds  # used (a liveness check, not a speed one)
    assert all(len(s) > 0.05 * rate * seconds for s in sent)  # each got a share


async def test_a_429_seen_by_one_pauses_the_others_until_retry_after(postgres_url: str) -> None:
    key = budget_key("http://v7", "ApiKey k")
    cfg = _cfg(20.0, 1.0)
    async with (
        open_budget(postgres_url, key, cfg) as a,
        open_budget(postgres_url, key, cfg) as b,
        open_budget(postgres_url, key, cfg) as c,
    ):
        for lim in (b, c):  # both hold a slot booked before the 429
            async with lim.slot():
                pass
        async with a.slot() as at:
            a.answered(at, RateLimited("429", status=429, delay_s=1.0))
        await a.close()  # the 429 is in the row
        db = await a.budget.pool.fetchrow("SELECT * FROM rate_budget WHERE key_id = $1", key)
        assert db is not None and db["cuts"] == 1
        pause_db = float(db["pause_until"])
        for lim in (b, c):
            async with lim.slot() as at:
                assert lim.budget.to_db(at) >= pause_db - 0.002
            assert lim.controller.cuts == 1
            assert lim.rate == pytest.approx(20 * T.margin)


async def test_the_pool_is_bounded_and_the_api_key_never_reaches_the_database(
    postgres_url: str,
) -> None:
    secret = "ApiKey s3cr3t-vAlue"
    key = budget_key("http://v7", secret)
    cfg = _cfg(500.0, 1.0, 64, adaptive=False)  # 429s pause, the rate stays
    async with open_budget(postgres_url, key, cfg, max_connections=2) as lim:
        peak = 0

        async def watch(stop: asyncio.Event) -> None:
            nonlocal peak
            conn = await asyncpg.connect(postgres_url)
            try:
                while not stop.is_set():
                    n = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND pid <> pg_backend_pid()"
                    )
                    peak = max(peak, int(n))
                    await asyncio.sleep(0.01)  # a polling period, not a synchronisation
            finally:
                await conn.close()

        stop = asyncio.Event()
        watcher = asyncio.create_task(watch(stop))
        # 64 senders, with 429s in between (each one a write of its own)
        sent = 0

        async def sender(i: int) -> None:
            nonlocal sent
            for j in range(5):
                async with lim.slot() as at:
                    sent += 1
                    err = RateLimited("429", delay_s=0.01) if (i + j) % 17 == 0 else None
                    lim.answered(at, err)

        await asyncio.gather(*(sender(i) for i in range(64)))
        stop.set()
        await watcher
        assert sent == 320
        assert 1 <= peak <= 3  # the pool's 2 and the listener
        rows = await lim.budget.pool.fetch("SELECT * FROM rate_budget")
    dump = repr([dict(r) for r in rows])
    assert "s3cr3t" not in dump and secret not in dump
    assert len(rows) == 1


async def test_an_unreachable_database_is_one_line_without_the_password() -> None:
    with pytest.raises(PreflightError) as e:
        async with open_budget("postgresql://u:hunter2@127.0.0.1:1/x", "k", _cfg(1, 1)):
            pass
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)


def test_grant_times_start_no_earlier_than_now_or_the_pause() -> None:
    g = Grant(now=5.0, base=4.0, interval=0.5, count=4, pause_until=5.2, generation=0)
    assert g.times() == [5.2, 5.2, 5.2, 5.5]
