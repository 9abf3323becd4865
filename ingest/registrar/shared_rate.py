"""One rate budget per V7 key, shared by every process of a job through one PostgreSQL row.

V7 limits requests per API key, so N engine processes on several machines must draw from one
budget. The adaptive controller's state (current rate, pause, what was proven) lives in the
row ``rate_budget(key_id)``; a send slot is granted by the database.

Grants
------
GCRA on the row: ``tat`` is the theoretical arrival time of the next slot, on the database's
clock (``clock_timestamp()``, so machines with skewed clocks share one timeline). One
``UPDATE … RETURNING`` hands out a *grant* of ``k`` slots at ``max(now, pause_until,
base + i·T)`` for ``i < k`` (``T = 1 / rate``, ``base = max(tat, now) - (burst - 1)·T``) and
moves ``tat`` by ``k·T``: GCRA over the union of every process's slots, so they never exceed
``rate·t + burst`` over any window. ``k`` is sized from the rate so a grant covers at most
``grant_s`` (100 ms) of budget, between 1 and ``max_grant``: one round trip serves several
sends, and a process that stops holding slots wastes at most ``grant_s`` of budget. The
client turns the slot times into local monotonic time (the offset is measured on each round
trip) and sleeps until them.

Adaptation, shared
------------------
A 429 seen by any process is written to the row at once (one ``UPDATE``): the pause
(``pause_until = now + Retry-After``, ``tat`` past it so the next slots come after it, without
a burst) and, once per congestion episode, the cut: back to the rate proven good when there is
one below, else ``margin`` x the rate when the last cut is more than a proving period old (the
429 found the edge: a probe, timing jitter) and ``decrease`` x when 429s come in quick
succession (a rate far too high). A 429 opens a new episode only when its slot was granted
after the last cut and it was not the first send after a pause (the same rule as the local
controller). Every process sees the pause and the new
rate on its next grant; a grant that sees the row's ``generation`` change drops the slots it
still holds (they were booked before the 429). The increase is applied by the grant that finds
the row quiet for a proving period — one grant, on the shared row, so N processes do not each
add their own step: bisection between the proven rate and the rate that drew the last 429, a
plateau, then probes above (2 %, 4 %, 8 %…, at most 25 %), never above the configured ceiling.

The decisions are the pure functions ``grant`` and ``rate_limited`` over a ``BudgetRow``; the
SQL below does exactly the same arithmetic in one statement each (``tests/test_shared_rate.py``
runs both on the same sequence of events and compares). The key is identified by a hash of the
base URL and the API key (``budget_key``); the key itself never reaches the database, a log or
an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ingest.errors import Interrupted, PreflightError, RateLimited
from ingest.log import mask_url

if TYPE_CHECKING:
    import asyncpg

    from ingest.config import RateConfig

log = logging.getLogger("ingest.rate.shared")

Clock = Callable[[], float]

# --- pure decisions --------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetTuning:
    """Knobs of the shared budget; the adaptive ones match ``rate.Tuning``'s defaults."""

    slack: float = 0.005  # pace this fraction below the rate (clock rounding, timer jitter)
    grant_s: float = 0.1  # a grant covers at most this much of the rate (seconds of budget)
    max_grant: int = 16  # slots per grant at most
    decrease: float = 0.7  # cut factor for a 429 within prove_s of the last cut
    margin: float = 0.97  # otherwise (first or sparse 429s): just below the rate that drew it
    episode_s: float = 1.0  # without a grant time: 429s this close to a cut are its episode
    prove_s: float = 3.0  # a rate held this long without a 429 is proven good...
    prove_requests: int = 10  # ...and at least this many requests' worth of it
    tolerance: float = 0.01  # stop bisecting when the bracket is this narrow (share of hi)
    plateau_s: float = 5.0  # then hold the proven rate this long before probing above it
    probe: float = 0.02  # first probe step above the proven rate (doubles each period)
    max_probe: float = 0.25


@dataclass(frozen=True)
class BudgetRow:
    """The shared state of one key's budget. Times are database epoch seconds; 0 = never."""

    rate_per_s: float
    ceiling_per_s: float
    min_rate_per_s: float
    burst: float
    adaptive: bool = True
    tat: float = 0.0  # GCRA: theoretical arrival time of the next slot
    pause_until: float = 0.0  # no slot before this (a 429's Retry-After)
    proven_rate: float = 0.0  # highest rate proven good since the last invalidation (0: none)
    limit_rate: float = 0.0  # the rate that drew the last 429 (0: unknown or forgotten)
    quiet_since: float = 0.0  # last rate change or 429: the proving period counts from here
    cut_at: float = 0.0
    resumed_at: float = 0.0  # end of the last pause
    probes: int = 0  # probe steps since the last cut
    cuts: int = 0
    generation: int = 0  # changes when slots granted before it are void (a 429)

    @classmethod
    def new(
        cls, rate_per_s: float, burst: float, min_rate_per_s: float, adaptive: bool, now: float
    ) -> BudgetRow:
        ceiling = float(rate_per_s)
        return cls(
            rate_per_s=ceiling,
            ceiling_per_s=ceiling,
            min_rate_per_s=_min_rate(min_rate_per_s, ceiling),
            burst=float(burst),
            adaptive=adaptive,
            quiet_since=now,
        )


@dataclass(frozen=True)
class Grant:
    """Slots ``max(now, pause_until, base + i·interval)`` for ``i < count`` (database time)."""

    now: float
    base: float
    interval: float
    count: int
    pause_until: float
    generation: int

    def times(self) -> list[float]:
        floor = max(self.now, self.pause_until)
        return [max(floor, self.base + i * self.interval) for i in range(self.count)]


def _min_rate(min_rate_per_s: float, ceiling: float) -> float:
    return min(max(float(min_rate_per_s), 1e-6), ceiling)


def _clamp(row: BudgetRow, rate: float) -> float:
    return min(max(rate, row.min_rate_per_s), row.ceiling_per_s)


def grant_size(rate_per_s: float, want: int, t: BudgetTuning) -> int:
    """Slots in one grant: what the senders wait for, at most ``grant_s`` of the rate."""
    return max(1, min(want, t.max_grant, math.floor(rate_per_s * t.grant_s)))


def grant(
    row: BudgetRow, now: float, want: int, t: BudgetTuning = BudgetTuning()
) -> tuple[Grant, BudgetRow]:
    """Hand out the next slots of the budget (GCRA), then raise the rate if it was quiet."""
    interval = 1.0 / (row.rate_per_s * (1.0 - t.slack))
    tau = (row.burst - 1.0) * interval
    start = max(row.tat, now)
    k = grant_size(row.rate_per_s, want, t)
    g = Grant(now, start - tau, interval, k, row.pause_until, row.generation)
    return g, _raised(replace(row, tat=start + k * interval), now, t)


def _raised(row: BudgetRow, now: float, t: BudgetTuning) -> BudgetRow:
    """Additive increase while it is quiet, on the shared row (so it happens once)."""
    quiet = now - row.quiet_since
    proving = (
        row.adaptive
        and row.rate_per_s < row.ceiling_per_s
        and quiet >= max(t.prove_s, t.prove_requests / row.rate_per_s)
    )
    if not proving:
        return row
    lo, hi = max(row.proven_rate, row.rate_per_s), row.limit_rate
    if hi > 0 and hi - lo > t.tolerance * hi:
        rate = (lo + hi) / 2  # bisect the bracket
        return replace(row, rate_per_s=_clamp(row, rate), proven_rate=lo, quiet_since=now)
    if hi > 0 and quiet < t.plateau_s:
        return replace(row, proven_rate=lo)  # hold just below the limit
    step = min(t.probe * 2.0**row.probes, t.max_probe)  # then probe above it
    return replace(
        row,
        rate_per_s=_clamp(row, row.rate_per_s * (1 + step)),
        proven_rate=lo,
        limit_rate=0.0,
        probes=row.probes + 1,
        quiet_since=now,
    )


def rate_limited(
    row: BudgetRow,
    now: float,
    retry_after_s: float | None,
    granted_at: float | None = None,
    sent_at: float | None = None,
    t: BudgetTuning = BudgetTuning(),
) -> BudgetRow:
    """A 429 seen by any process: pause everyone; cut the rate once per congestion episode.

    ``granted_at``/``sent_at``: when the 429's slot was granted / its request sent (database
    time). A slot granted before the last cut was paced by the old rate: its 429 is the same
    episode; the first send after a pause says the pause was short, not that the rate is high.
    """
    if granted_at is not None:
        sent = sent_at if sent_at is not None else granted_at
        new_episode = granted_at >= row.cut_at and sent >= row.resumed_at + 0.5 / row.rate_per_s
    else:
        new_episode = now - row.cut_at >= t.episode_s
    cutting = row.adaptive and new_episode
    rate, proven, limit = row.rate_per_s, row.proven_rate, row.limit_rate
    cut_at, probes, cuts = row.cut_at, row.probes, row.cuts
    if cutting:
        keep = 0 < proven < rate
        if keep:
            new = proven  # back to the last rate proven good
        else:
            proven = 0.0  # what was proven is not true any more
            # A 429 long after the last cut found the edge (a probe, timing jitter): step just
            # below it. 429s in quick succession mean the rate is far too high: cut harder.
            sparse = row.cuts == 0 or now - row.cut_at > t.prove_s
            new = rate * (t.margin if sparse else t.decrease)
        limit, rate = rate, _clamp(row, new)
        cut_at, probes, cuts = now, 0, cuts + 1
    resume = now + (retry_after_s if retry_after_s is not None else 1.0 / rate)
    extends = resume > row.pause_until
    tat, pause_until, resumed_at = row.tat, row.pause_until, row.resumed_at
    if extends:
        tau = (row.burst - 1.0) / (rate * (1.0 - t.slack))
        tat, pause_until, resumed_at = max(row.tat, resume + tau), resume, resume
    return replace(
        row,
        rate_per_s=rate,
        proven_rate=proven,
        limit_rate=limit,
        cut_at=cut_at,
        probes=probes,
        cuts=cuts,
        tat=tat,
        pause_until=pause_until,
        resumed_at=resumed_at,
        quiet_since=now,
        generation=row.generation + (1 if cutting or extends else 0),
    )


def budget_key(base_url: str, api_key: str) -> str:
    """The budget's id: a hash of base URL and API key (V7 limits per key; the key itself is a
    secret and never stored)."""
    digest = hashlib.sha256(f"{base_url.rstrip('/')}\n{api_key}".encode()).hexdigest()
    return f"v7:{digest[:32]}"


def budget_url(shared: str, shared_url: str, ledger_url: str) -> str | None:
    """The PostgreSQL URL of the shared budget, or None for the local one.

    ``shared`` is ``rate.shared``: ``auto`` shares when a URL is known (``rate.shared_url``,
    else the ledger's when it is PostgreSQL), ``on`` requires one, ``off`` never shares."""
    if shared == "off":
        return None
    url = shared_url or (ledger_url if is_postgres_url(ledger_url) else "")
    if shared == "on" and not url:
        raise ValueError(
            'rate.shared = "on" needs a PostgreSQL URL: set rate.shared_url or a '
            "postgresql:// ledger"
        )
    return url or None


def is_postgres_url(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


# --- SQL (the same decisions, one statement each) ---------------------------------------------

TABLE_DDL = """
CREATE TABLE IF NOT EXISTS rate_budget (
    key_id          text PRIMARY KEY,          -- budget_key(): a hash, never the API key
    rate_per_s      double precision NOT NULL, -- the rate allowed now
    ceiling_per_s   double precision NOT NULL, -- the configured rate (never exceeded)
    min_rate_per_s  double precision NOT NULL,
    burst           double precision NOT NULL,
    adaptive        boolean NOT NULL,
    tat             double precision NOT NULL, -- GCRA: next slot (epoch s, database clock)
    pause_until     double precision NOT NULL, -- no slot before (a 429's Retry-After)
    proven_rate     double precision NOT NULL, -- highest rate proven good (0: none)
    limit_rate      double precision NOT NULL, -- rate that drew the last 429 (0: unknown)
    quiet_since     double precision NOT NULL,
    cut_at          double precision NOT NULL,
    resumed_at      double precision NOT NULL,
    probes          integer NOT NULL,
    cuts            integer NOT NULL,
    generation      bigint NOT NULL,
    grant_now       double precision NOT NULL, -- the last grant (read back by RETURNING)
    grant_base      double precision NOT NULL,
    grant_interval  double precision NOT NULL,
    grant_count     integer NOT NULL,
    updated_at      timestamptz NOT NULL
)
"""

NOTIFY_CHANNEL = "ingest_rate_budget"
_NOW = "coalesce({p}::float8, extract(epoch FROM clock_timestamp())::float8)"


def _lit(x: float) -> str:
    return repr(float(x))


def grant_sql(t: BudgetTuning = BudgetTuning()) -> str:
    """``grant()`` as one UPDATE. $1 key_id, $2 want, $3 now (NULL: the database's clock).

    Every value is computed from the row being updated (correlated subqueries in SET), so a
    concurrent grant that locked it first is seen: PostgreSQL re-evaluates on the new row."""
    one_minus_slack = _lit(1.0 - t.slack)
    return f"""
UPDATE rate_budget AS b SET
  (tat, rate_per_s, proven_rate, limit_rate, probes, quiet_since,
   grant_now, grant_base, grant_interval, grant_count, updated_at) = (
    SELECT g.start + g.k * g.iv,
      CASE r.action
        WHEN 'bisect' THEN least(greatest((r.lo + b.limit_rate) / 2, b.min_rate_per_s),
                                 b.ceiling_per_s)
        WHEN 'probe' THEN least(greatest(
            b.rate_per_s * (1 + least({_lit(t.probe)} * power(2::float8, b.probes),
                                      {_lit(t.max_probe)})),
            b.min_rate_per_s), b.ceiling_per_s)
        ELSE b.rate_per_s END,
      CASE WHEN r.action = 'none' THEN b.proven_rate ELSE r.lo END,
      CASE WHEN r.action = 'probe' THEN 0::float8 ELSE b.limit_rate END,
      CASE WHEN r.action = 'probe' THEN b.probes + 1 ELSE b.probes END,
      CASE WHEN r.action IN ('bisect', 'probe') THEN g.now ELSE b.quiet_since END,
      -- the grant itself (old rate and tat), for RETURNING, which sees only the new row
      g.now, g.start - (b.burst - 1) * g.iv, g.iv, g.k,
      clock_timestamp()
    FROM (
      SELECT n.now, i.iv, greatest(b.tat, n.now) AS start,
        greatest(1, least($2::float8, {int(t.max_grant)},
                          floor(b.rate_per_s * {_lit(t.grant_s)})))::int AS k
      FROM (SELECT {_NOW.format(p="$3")} AS now) n,
           (SELECT 1.0::float8 / (b.rate_per_s * {one_minus_slack}) AS iv) i
    ) g
    CROSS JOIN LATERAL (
      SELECT greatest(b.proven_rate, b.rate_per_s) AS lo,
        CASE
          WHEN NOT (b.adaptive AND b.rate_per_s < b.ceiling_per_s
                    AND g.now - b.quiet_since >= greatest({_lit(t.prove_s)},
                                                          {int(t.prove_requests)} / b.rate_per_s))
            THEN 'none'
          WHEN b.limit_rate > 0 AND b.limit_rate - greatest(b.proven_rate, b.rate_per_s)
                                    > {_lit(t.tolerance)} * b.limit_rate
            THEN 'bisect'
          WHEN b.limit_rate > 0 AND g.now - b.quiet_since < {_lit(t.plateau_s)} THEN 'hold'
          ELSE 'probe'
        END AS action
    ) r
  )
WHERE b.key_id = $1
RETURNING b.grant_now, b.grant_base, b.grant_interval, b.grant_count, b.pause_until,
  b.generation, b.rate_per_s, b.cuts
"""


def rate_limited_sql(t: BudgetTuning = BudgetTuning()) -> str:
    """``rate_limited()`` as one UPDATE. $1 key_id, $2 retry_after_s, $3 granted_at,
    $4 sent_at, $5 now (NULL: the database's clock); NULLs where unknown.

    The new pause is announced on ``NOTIFY_CHANNEL`` at commit (``key pause_until generation
    rate cuts``), so every listening process drops the slots it holds at once."""
    one_minus_slack = _lit(1.0 - t.slack)
    return f"""
WITH u AS (
UPDATE rate_budget AS b SET
  (rate_per_s, proven_rate, limit_rate, cut_at, probes, cuts, tat, pause_until, resumed_at,
   quiet_since, generation, updated_at) = (
    SELECT r.rate, r.proven, r.limit_, r.cut_at, r.probes, r.cuts,
      CASE WHEN p.extends
        THEN greatest(b.tat, p.resume + (b.burst - 1) / (r.rate * {one_minus_slack}))
        ELSE b.tat END,
      CASE WHEN p.extends THEN p.resume ELSE b.pause_until END,
      CASE WHEN p.extends THEN p.resume ELSE b.resumed_at END,
      e.now,
      b.generation + CASE WHEN e.cutting OR p.extends THEN 1 ELSE 0 END,
      clock_timestamp()
    FROM (
      SELECT n.now, b.adaptive AND CASE
          WHEN $3::float8 IS NOT NULL THEN $3::float8 >= b.cut_at
               AND coalesce($4::float8, $3::float8) >= b.resumed_at + 0.5 / b.rate_per_s
          ELSE n.now - b.cut_at >= {_lit(t.episode_s)} END AS cutting,
        0 < b.proven_rate AND b.proven_rate < b.rate_per_s AS keep
      FROM (SELECT {_NOW.format(p="$5")} AS now) n
    ) e
    CROSS JOIN LATERAL (
      SELECT
        CASE WHEN NOT e.cutting THEN b.rate_per_s
          ELSE least(greatest(CASE WHEN e.keep THEN b.proven_rate
                                   WHEN b.cuts = 0 OR e.now - b.cut_at > {_lit(t.prove_s)}
                                     THEN b.rate_per_s * {_lit(t.margin)}
                                   ELSE b.rate_per_s * {_lit(t.decrease)} END,
                              b.min_rate_per_s), b.ceiling_per_s) END AS rate,
        CASE WHEN e.cutting AND NOT e.keep THEN 0::float8 ELSE b.proven_rate END AS proven,
        CASE WHEN e.cutting THEN b.rate_per_s ELSE b.limit_rate END AS limit_,
        CASE WHEN e.cutting THEN e.now ELSE b.cut_at END AS cut_at,
        CASE WHEN e.cutting THEN 0 ELSE b.probes END AS probes,
        CASE WHEN e.cutting THEN b.cuts + 1 ELSE b.cuts END AS cuts
    ) r
    CROSS JOIN LATERAL (
      SELECT e.now + coalesce($2::float8, 1.0 / r.rate) AS resume
    ) q
    CROSS JOIN LATERAL (SELECT q.resume AS resume, q.resume > b.pause_until AS extends) p
  )
WHERE b.key_id = $1
RETURNING b.quiet_since AS now, b.rate_per_s, b.pause_until, b.generation, b.cuts
)
SELECT u.*, pg_notify('{NOTIFY_CHANNEL}', concat_ws(' ', $1::text, u.pause_until,
  u.generation, u.rate_per_s, u.cuts)) AS notified
FROM u
"""


_UPSERT_SQL = """
INSERT INTO rate_budget AS b (key_id, rate_per_s, ceiling_per_s, min_rate_per_s, burst, adaptive,
  tat, pause_until, proven_rate, limit_rate, quiet_since, cut_at, resumed_at, probes, cuts,
  generation, grant_now, grant_base, grant_interval, grant_count, updated_at)
VALUES ($1, $2, $2, $3, $4, $5, 0, 0, 0, 0, extract(epoch FROM clock_timestamp())::float8,
  0, 0, 0, 0, 0, 0, 0, 0, 0, clock_timestamp())
ON CONFLICT (key_id) DO UPDATE SET
  ceiling_per_s = EXCLUDED.ceiling_per_s, min_rate_per_s = EXCLUDED.min_rate_per_s,
  burst = EXCLUDED.burst, adaptive = EXCLUDED.adaptive,
  rate_per_s = least(greatest(b.rate_per_s, EXCLUDED.min_rate_per_s), EXCLUDED.ceiling_per_s)
RETURNING b.rate_per_s, b.cuts, b.generation
"""

# Concurrent CREATE TABLE IF NOT EXISTS can still collide in the catalog: serialise them with a
# transaction-scoped advisory lock (which a transaction-mode pooler keeps).
_MIGRATE_LOCK = 0x696E6772  # "ingr"


async def migrate(conn: asyncpg.Connection) -> None:
    """Create the ``rate_budget`` table if it is missing (idempotent; the ledger's migrations
    may call this instead)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
        await conn.execute(TABLE_DDL)


@dataclass(frozen=True)
class Granted:
    """Slots of one grant on the local monotonic clock, with the database's grant time."""

    times: list[float]
    granted_at: float  # database epoch seconds
    pause_until: float  # local monotonic (-inf: none)
    generation: int
    rate_per_s: float
    cuts: int
    db_times: list[float]  # the same slots on the database's clock


class SharedBudget:
    """The database edge: one UPDATE per grant, one per 429; a bounded asyncpg pool.

    Times cross the edge converted: the database's epoch seconds to this process's monotonic
    clock, by the offset measured on the round trip (its midpoint is taken as the database's
    ``now``; the sample with the shortest of the last 256 round trips wins, so the offset
    rarely moves: a jump would bunch two slots converted on either side of it)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        key_id: str,
        *,
        tuning: BudgetTuning = BudgetTuning(),
        clock: Clock = time.monotonic,
        timeout_s: float = 5.0,
    ) -> None:
        self.pool = pool
        self.key_id = key_id
        self.tuning = tuning
        self._clock = clock
        self._timeout_s = timeout_s
        self._grant_sql = grant_sql(tuning)
        self._limited_sql = rate_limited_sql(tuning)
        self._offsets: deque[tuple[float, float]] = deque(maxlen=256)  # (rtt, db - local)
        self.round_trips = 0

    @property
    def offset(self) -> float:
        """Database epoch seconds minus local monotonic seconds."""
        if not self._offsets:
            raise RuntimeError("no round trip yet")
        return min(self._offsets)[1]

    def to_db(self, local: float) -> float:
        return local + self.offset

    def to_local(self, db: float) -> float:
        return db - self.offset if db > 0 else -math.inf

    async def _fetch(self, sql: str, *args: Any) -> asyncpg.Record:
        t0 = self._clock()
        row = await self.pool.fetchrow(sql, *args, timeout=self._timeout_s)
        t1 = self._clock()
        self.round_trips += 1
        if row is None:
            raise PreflightError(f"rate budget {self.key_id} is missing from the database")
        self._offsets.append((t1 - t0, float(row[0]) - (t0 + t1) / 2))
        return row

    async def ensure(self, cfg: RateConfig) -> None:
        """Create the table and this key's row (or adopt the row with this process's config)."""
        async with self.pool.acquire(timeout=self._timeout_s) as conn:
            await migrate(conn)
            await conn.execute(
                _UPSERT_SQL,
                self.key_id,
                float(cfg.requests_per_s),
                _min_rate(cfg.min_requests_per_s, float(cfg.requests_per_s)),
                float(cfg.burst),
                bool(cfg.adaptive),
            )

    async def grant(self, want: int) -> Granted:
        r = await self._fetch(self._grant_sql, self.key_id, want, None)
        g = Grant(
            now=float(r["grant_now"]),
            base=float(r["grant_base"]),
            interval=float(r["grant_interval"]),
            count=int(r["grant_count"]),
            pause_until=float(r["pause_until"]),
            generation=int(r["generation"]),
        )
        return Granted(
            times=[self.to_local(x) for x in g.times()],
            granted_at=g.now,
            pause_until=self.to_local(g.pause_until),
            generation=g.generation,
            rate_per_s=float(r["rate_per_s"]),
            cuts=int(r["cuts"]),
            db_times=g.times(),
        )

    async def rate_limited(
        self, retry_after_s: float | None, granted_at: float | None, sent_at: float | None
    ) -> Granted:
        """Write a 429 to the shared row; ``sent_at`` local monotonic, ``granted_at`` database
        time. Returns the row's new pause (local) and generation (``times`` is empty)."""
        sent_db = self.to_db(sent_at) if sent_at is not None and self._offsets else None
        r = await self._fetch(
            self._limited_sql, self.key_id, retry_after_s, granted_at, sent_db, None
        )
        return Granted(
            times=[],
            granted_at=float(r["now"]),
            pause_until=self.to_local(float(r["pause_until"])),
            generation=int(r["generation"]),
            rate_per_s=float(r["rate_per_s"]),
            cuts=int(r["cuts"]),
            db_times=[],
        )


@dataclass
class _View:
    """What the engine reports (``budget.RateView``), as last seen on the shared row."""

    rate: float
    paused_until: float = -math.inf
    cuts: int = 0


class SharedLimiter:
    """A ``budget.SendBudget`` drawing from the shared row: bounded concurrency, slots from
    grants, local pacing only by sleeping until each granted time.

    - One grant round trip at a time per process; it books at most ``grant_s`` ahead of now
      (senders beyond that wait here), so N processes hold about N grants of budget at once.
    - A slot woken up for more than one interval late is forfeited (a stalled event loop must
      not send its missed slots in a bunch); within that, sends also conform to the budget on
      this process's *actual* send times (a late sender pushes this process's next one back).
      So any window holds at most one send per process beyond the granted schedule.
    - A 429 pauses this process at once and is written to the row in the background (the next
      grant waits for it); the row announces it (LISTEN/NOTIFY) and every process drops the
      slots it holds. Without notifications (a transaction-mode pooler) they learn on their
      next grant, at most ``grant_s`` later.
    """

    def __init__(
        self,
        budget: SharedBudget,
        max_in_flight: int,
        *,
        clock: Clock = time.monotonic,
        burst: float = 1.0,
        retry_s: float = 0.5,
        on_grant: Callable[[Granted], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.budget = budget
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._retry_s = retry_s
        self._horizon_s = budget.tuning.grant_s
        self._on_grant = on_grant  # observers (tests, the benchmark)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._held: deque[tuple[float, float]] = deque()  # (local send time, db grant time)
        self._booked_until = -math.inf  # the latest slot granted to this process (local)
        self._granting = asyncio.Lock()
        self._waiting = 0
        self._generation = 0  # the row's, as last seen
        self._local_generation = 0  # bumped whenever held slots become void
        self._view = _View(rate=0.0)
        self._interval = 0.0  # of the last grant
        self._burst = float(burst)  # for the conformance check on actual send times
        self._sent_tat = -math.inf  # GCRA over this process's actual send times
        self._reports: set[asyncio.Task[None]] = set()
        # send time -> grant time of the requests in flight (bounded: not every send is answered
        # through ``answered``, e.g. a 5xx)
        self._granted_at: OrderedDict[float, float] = OrderedDict()
        self.grants = 0
        self.slots_granted = 0
        self.notices = 0
        self.voided = 0  # granted slots dropped unused (a 429 made them void)
        self.missed = 0  # granted slots forfeited (woken too late to use them)

    @property
    def controller(self) -> _View:
        return self._view

    @property
    def rate(self) -> float:
        return self._view.rate

    def now(self) -> float:
        return self._clock()

    async def _next(self, stop: asyncio.Event | None) -> tuple[float, float]:
        """The next held slot; a grant round trip when there is none."""
        self._waiting += 1
        try:
            while not self._held:
                async with self._granting:
                    if self._held:
                        break
                    # Book no further ahead than the horizon: held slots are budget others
                    # cannot use, and slots a 429 would void.
                    ahead = self._booked_until - self.now() - self._horizon_s
                    if ahead > 0:
                        await self.sleep(ahead, stop)
                        continue
                    await self._refill(stop)
            return self._held.popleft()
        finally:
            self._waiting -= 1

    async def _refill(self, stop: asyncio.Event | None) -> None:
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)
        while True:
            if stop is not None and stop.is_set():
                raise Interrupted("stopped while waiting to send")
            try:
                g = await self.budget.grant(max(1, self._waiting))
                break
            except (OSError, TimeoutError, PreflightError) as e:
                self._db_trouble(e)
            except Exception as e:  # asyncpg's errors (imported lazily)
                if not type(e).__module__.startswith("asyncpg"):
                    raise
                self._db_trouble(e)
            await self.sleep(self._retry_s, stop)
        self.grants += 1
        self.slots_granted += len(g.times)
        if self._on_grant is not None:
            self._on_grant(g)
        if g.generation < self._generation:
            self.voided += len(g.times)
            return  # booked before a 429 we were told of meanwhile: void
        self._seen(g.generation, g.pause_until, g.rate_per_s, g.cuts)
        if g.times:
            self._interval = 1.0 / (g.rate_per_s * (1.0 - self.budget.tuning.slack))
            self._held.extend((t, g.granted_at) for t in g.times)
            self._booked_until = max(self._booked_until, g.times[-1])

    def _db_trouble(self, e: BaseException) -> None:
        # Never the URL or the exception's text (it may quote the connection string).
        log.warning(
            "could not reach the shared rate budget; retrying",
            extra={"error": type(e).__name__},
        )

    def _seen(self, generation: int, pause_until: float, rate: float, cuts: int) -> None:
        if generation > self._generation:
            # A 429 (here or elsewhere) changed the row: slots held from before it are void,
            # they would go into its pause.
            self._generation = generation
            self._void()
        self._view.rate = rate
        self._view.cuts = max(self._view.cuts, cuts)
        self._view.paused_until = max(self._view.paused_until, pause_until)

    def _void(self) -> None:
        self.voided += len(self._held)
        self._local_generation += 1
        self._held.clear()
        self._booked_until = -math.inf

    def notice(self, payload: str) -> None:
        """A 429 announced by the row (``NOTIFY``): ``key pause_until generation rate cuts``."""
        parts = payload.split()
        if len(parts) != 5 or parts[0] != self.budget.key_id:
            return
        try:
            pause_db, generation = float(parts[1]), int(parts[2])
            rate, cuts = float(parts[3]), int(parts[4])
        except ValueError:
            return
        self.notices += 1
        self._seen(generation, self.budget.to_local(pause_db), rate, cuts)

    async def acquire(self, stop: asyncio.Event | None = None) -> float:
        """Wait for the next granted slot; return the send time (local monotonic)."""
        while True:
            generation = self._local_generation
            at, granted_at = await self._next(stop)
            await self.sleep(max(at, self._view.paused_until) - self.now(), stop)
            if self._local_generation != generation:
                self.voided += 1
                continue  # a 429 arrived while we waited: that slot is void
            if self.now() > max(at, self._view.paused_until) + self._interval:
                # Woken more than an interval late (a stalled loop): sending now would bunch
                # with the slots after it, in this process or another. Forfeit it.
                self.missed += 1
                continue
            # A late wake-up must not bunch this send with this process's next one.
            while (extra := self._conform(self.now())) > 0:
                await self.sleep(extra, stop)
                if self._local_generation != generation:
                    break
            else:
                now = self.now()
                self._granted_at[now] = granted_at
                while len(self._granted_at) > 4 * self.max_in_flight:
                    self._granted_at.popitem(last=False)
                return now

    def _conform(self, now: float) -> float:
        tolerance = (self._burst - 1.0) * self._interval
        earliest = max(self._sent_tat - tolerance, self._view.paused_until)
        if now < earliest:
            return earliest - now
        # This process's first request also opens a connection: it reaches the server later
        # than it left, so (at burst 1) the next keeps one more interval from it.
        first = self._sent_tat == -math.inf and self._burst == 1.0
        self._sent_tat = max(self._sent_tat, now) + self._interval * (2 if first else 1)
        return 0.0

    @contextlib.asynccontextmanager
    async def slot(
        self,
        stop: asyncio.Event | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[float]:
        async with self._slots:
            granted = await self.acquire(stop)
            if before_send is None:
                yield granted
                return
            generation = self._local_generation
            await before_send()
            if self._local_generation != generation:
                # A 429 arrived during the commit: no send into the pause it began.
                await self.sleep(self._view.paused_until - self.now(), stop)
            yield granted

    def answered(self, sent_at: float | None, error: BaseException | None = None) -> None:
        if not isinstance(error, RateLimited):
            if sent_at is not None:
                self._granted_at.pop(sent_at, None)
            return  # success says nothing new: the increase is decided on the shared row
        granted_at = self._granted_at.pop(sent_at, None) if sent_at is not None else None
        now = self.now()
        delay = error.delay_s if error.delay_s is not None else 1.0 / max(self._view.rate, 1e-6)
        self._view.paused_until = max(self._view.paused_until, now + delay)
        self._void()
        task = asyncio.ensure_future(self._report(error.delay_s, granted_at, sent_at))
        self._reports.add(task)
        task.add_done_callback(self._reports.discard)

    async def _report(
        self, retry_after_s: float | None, granted_at: float | None, sent_at: float | None
    ) -> None:
        try:
            g = await self.budget.rate_limited(retry_after_s, granted_at, sent_at)
        except Exception as e:  # the local pause holds; the others learn on their own 429s
            self._db_trouble(e)
            return
        # Our own 429's generation: nothing more to void.
        self._generation = max(self._generation, g.generation)
        self._seen(g.generation, g.pause_until, g.rate_per_s, g.cuts)

    async def sleep(self, delay_s: float, stop: asyncio.Event | None = None) -> None:
        if stop is not None and stop.is_set():
            raise Interrupted("stopped while waiting to send")
        if delay_s <= 0:
            return
        if stop is None:
            await asyncio.sleep(delay_s)
            return
        try:
            async with asyncio.timeout(delay_s):
                await stop.wait()
        except TimeoutError:
            return
        raise Interrupted("stopped while waiting to send")

    async def close(self) -> None:
        """Let the 429 reports in flight land (bounded by the pool's timeout)."""
        if self._reports:
            await asyncio.gather(*self._reports, return_exceptions=True)


@contextlib.asynccontextmanager
async def open_budget(
    url: str,
    key_id: str,
    cfg: RateConfig,
    *,
    max_connections: int = 2,
    tuning: BudgetTuning = BudgetTuning(),
) -> AsyncIterator[SharedLimiter]:
    """Connect (a pool of at most ``max_connections``), create the table and the key's row,
    and yield the limiter. A database that cannot be reached is a PreflightError, one line,
    without the password."""
    import asyncpg

    try:
        pool = await asyncpg.create_pool(
            url, min_size=1, max_size=max_connections, command_timeout=10, timeout=10
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        raise PreflightError(
            f"rate.shared: cannot connect to {mask_url(url)} ({type(e).__name__})"
        ) from None
    try:
        budget = SharedBudget(pool, key_id, tuning=tuning)
        try:
            await budget.ensure(cfg)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise PreflightError(
                f"rate.shared: cannot set up the rate budget in {mask_url(url)} "
                f"({type(e).__name__}: {_scrub(str(e), url)})"
            ) from None
        limiter = SharedLimiter(budget, cfg.max_in_flight, burst=cfg.burst)
        listener = await _listen(url, limiter)
        try:
            yield limiter
        finally:
            await limiter.close()
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.close(timeout=5)
    finally:
        await pool.close()


async def _listen(url: str, limiter: SharedLimiter) -> asyncpg.Connection | None:
    """A connection of its own listening for 429s announced by the row, or None where that is
    impossible (a transaction-mode pooler): grants then carry the news, a little later."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=10)
        await conn.add_listener(
            NOTIFY_CHANNEL, lambda _c, _pid, _ch, payload: limiter.notice(payload)
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        log.info(
            "rate budget: no notifications, grants carry the news",
            extra={"error": type(e).__name__},
        )
        return None
    return conn


def _scrub(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def slot_times(grants: Sequence[Grant]) -> list[float]:
    """Every slot of these grants, sorted (tests and the benchmark check the union)."""
    return sorted(t for g in grants for t in g.times())


def max_in_window(times: Sequence[float], window_s: float) -> int:
    """The most of these times in any window of ``window_s`` (half-open)."""
    ordered = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(ordered):
        while ordered[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    return best
