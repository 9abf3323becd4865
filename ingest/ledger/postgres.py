"""The PostgreSQL ledger: one database that many jobs, and many processes of one job, share.

Same port, same semantics as the SQLite ledger (``sqlite.py``); what differs is how:

- **Connections**: an asyncpg pool bounded by ``ledger.pool_max_size``. Each port call takes
  one connection for one transaction (a page, a batch of outcomes), so concurrent callers
  commit in parallel on the server instead of queueing behind one thread: PostgreSQL's own
  group commit replaces the SQLite ledger's.
- **Batched writes** ship whole arrays: ``INSERT … SELECT FROM unnest($arrays) ON CONFLICT``
  and ``UPDATE … FROM unnest(…)``, one statement per kind of row per page; the manifest is
  staged with ``COPY``.
- **Ordering**: every key column is ``COLLATE "C"`` (byte order of UTF-8 = code point
  order), so key ranges, seeks and ``prefix_end`` mean exactly what they mean in SQLite and
  Python, whatever the database's default collation.
- **Schema**: versioned migrations (``MIGRATIONS``: ordered SQL steps; ``schema_version``
  holds the last applied). The engine applies missing steps when it opens the ledger, in one
  transaction under ``pg_advisory_xact_lock`` (two processes opening at once: one migrates,
  the other waits and finds nothing left to do). A role that may not create tables gets one
  line asking for ``ingest ledger migrate`` (run once by a role that may).
- **Poolers**: every lock is transaction-scoped (``pg_advisory_xact_lock``, row locks), no
  session state is relied on, so the ledger works behind a transaction-mode pooler
  (pgbouncer ``pool_mode = transaction``) once asyncpg's prepared-statement cache is off:
  ``ledger.statement_cache_size = 0``.
- **Secrets**: the password comes from the URL, ``PGPASSWORD`` or ``.pgpass`` (asyncpg reads
  them); every URL this module prints or puts in an error has its password masked
  (``mask_url``), and driver errors become one-line ``LedgerError``s, never tracebacks.

Rows are keyed by job (every table's key starts with ``job``), so one database holds any
number of jobs; ``media_cache`` is shared by all of them (keyed by bucket, key, ETag).

Several processes, one job (schema 2) — the ledger rows are the work queue:

- **Who**: a process ``join``s with a holder name (host:pid:random:pid-namespace) and gets a
  fencing token from the ``claim_tokens`` sequence (never handed out twice). ``items`` and
  ``listing`` rows carry ``claim_holder``, ``claim_token``, ``claim_expires``; a claim lives
  ``ttl_s`` (``ledger.lease_ttl_s``) and the engine renews all of a process's claims in one
  statement per table every ttl/3 (``renew_claims``; a partial index on live tokens).
- **Clock**: every claim expiry, and every comparison with one, is computed in SQL from the
  database's clock (``_DB_NOW``: ``clock_timestamp()``), never a machine's: machines whose
  clocks disagree still agree on when a claim ends. (The job lease of a process that holds a
  job alone still takes the caller's ``now``, as the port has it.)
- **Listing**: every process inserts the discovered shards (``register_shards``, ``ON
  CONFLICT DO NOTHING``) and claims one at a time (``claim_shard``: ``UPDATE … FROM (SELECT …
  FOR UPDATE SKIP LOCKED LIMIT 1)``) from its stored continuation; ``record_page`` locks the
  shard's row and refuses the page (``ClaimLost``) unless our token holds it (a row gone or
  given back is not ours either), and writes the continuation as an UPDATE of that claimed
  row, never an INSERT: a page's objects, items and continuation commit only for the shard's
  current owner. Pages of bucket events (``UNLISTED_SHARD``) need no shard. A shard done keeps
  its row until every shard is done (``mark_listing_complete`` waits for the last, and
  returns every shard id to it alone: a sync sweeps vanished folders once, from the union).
- **Items**: new items are inserted claimed by their planner (its fast path: it works them
  from memory), unless its roles do not cover the next step (``role_for``: media work or
  sending), then unclaimed. ``pending`` claims in chunks what no live process holds (expired
  or given back), within the roles, with ``SKIP LOCKED``. ``reap_claims`` expires at once the
  claims of holders known dead (same host, no such pid).
- **Fencing**: ``mark_processing``, ``media_done``, ``media_failed``, ``mark_sent`` (all or
  nothing), ``keep_claims`` and ``record_outcomes`` (commits what is ours, names the rest)
  only touch rows still claimed with our token AND not expired by the database's clock (an
  expired claim may be taken any moment), and extend the claim by the lease; a refused write
  raises ``ClaimLost`` (our own expired claims among the refused are given back, so anyone,
  us too, may take them at once) and the caller drops that work, so a process paused past
  its claims records nothing twice. The registrar calls ``keep_claims`` before every further
  request of a batch (a retry, a bisected half): a process whose claims went sends nothing
  more. What remains: a request that passed its check just before its process was paused
  still leaves when it wakes (a check in the ledger and a POST to V7 are not one step); the
  item then reaches V7 twice, the taker's attempt counts 2 (``ALREADY_EXISTS`` is ours) and
  the late outcome is refused. An outcome (or a media failure) ends the claim.
  ``unmark_sent`` needs only our token. A handle that never joined (``status``, tests of the
  single-process contract) is not fenced.
- **Lock order**: rows are locked in id order by every multi-row writer (``ORDER BY id FOR
  UPDATE``); renewals skip rows locked right now (``SKIP LOCKED``); an aborted transaction
  (deadlock, serialization) is run again.
- **Waiting**: ``outstanding`` (EXISTS, polled every second) keeps a pass waiting while a
  shard is unlisted or an item is pending that it may do, or another live run may; an item
  no live process has the role for is left to a later run.
- **Stalls**: ``idle_in_transaction_session_timeout`` (``ledger.idle_in_transaction_timeout_s``)
  makes the server end the session of a process paused inside a transaction, so its row
  locks do not hold the others up; a call whose session was lost before COMMIT is retried
  once on a fresh connection (nothing was committed; its fencing checks run again).
- **Runs**: a run's ``alive_until`` is renewed with the claims, so a process starting never
  marks another live process's run interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

import asyncpg
import orjson

from ingest.errors import ClaimLost, LeaseHeld, LedgerBusy, LedgerError
from ingest.ledger import codec
from ingest.ledger.port import (
    ROLES,
    UNLISTED_SHARD,
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
    role_for,
)
from ingest.ledger.sqlite import CHUNK, MAX_ID_LOOKUPS, prefix_end
from ingest.log import mask_url
from ingest.model import Facts, Item, Media, ObjectInfo, Outcome, Skip, State

T = TypeVar("T")

POOL_MAX_SIZE = 10
CONNECT_TIMEOUT_S = 10.0
PRUNE_CHUNK = 5000  # rows deleted per statement (and transaction) by prune
# Any 64-bit number of our own: the advisory lock migrations run under.
MIGRATION_LOCK = 0x696E6765737431  # "ingest1"

_S = {s: str(s.value) for s in State}  # asyncpg binds plain str

# Ordered migrations: (version, statements). Never edit a released step; add one.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """CREATE TABLE IF NOT EXISTS items (
                id BIGSERIAL PRIMARY KEY,
                job TEXT NOT NULL,
                path TEXT COLLATE "C" NOT NULL,
                name TEXT COLLATE "C" NOT NULL,
                payload BYTEA NOT NULL,
                keys TEXT[] COLLATE "C" NOT NULL,
                state TEXT NOT NULL,
                v7_id TEXT NOT NULL DEFAULT '',
                reason TEXT NOT NULL DEFAULT '',
                attempts INTEGER NOT NULL DEFAULT 0,
                run_id BIGINT NOT NULL DEFAULT 0,
                updated_at DOUBLE PRECISION NOT NULL,
                media TEXT NOT NULL DEFAULT '',
                readonly_endpoint BOOLEAN NOT NULL DEFAULT FALSE,
                failures INTEGER NOT NULL DEFAULT 0,
                final BOOLEAN NOT NULL DEFAULT FALSE,
                id_lookups INTEGER NOT NULL DEFAULT 0,
                UNIQUE (job, path, name))""",
            "CREATE INDEX IF NOT EXISTS items_pending ON items (job, state, id)",
            """CREATE TABLE IF NOT EXISTS objects (
                job TEXT NOT NULL,
                key TEXT COLLATE "C" NOT NULL,
                etag TEXT NOT NULL DEFAULT '',
                size BIGINT NOT NULL DEFAULT 0,
                last_modified TEXT NOT NULL DEFAULT '',
                state TEXT NOT NULL,
                item_id BIGINT,
                reason TEXT NOT NULL DEFAULT '',
                changed BOOLEAN NOT NULL DEFAULT FALSE,
                changed_etag TEXT NOT NULL DEFAULT '',
                vanished_at DOUBLE PRECISION NOT NULL DEFAULT 0,
                PRIMARY KEY (job, key))""",
            "CREATE INDEX IF NOT EXISTS objects_item ON objects (item_id)",
            """CREATE TABLE IF NOT EXISTS listing (
                job TEXT NOT NULL,
                shard_id TEXT COLLATE "C" NOT NULL,
                checkpoint TEXT NOT NULL DEFAULT '',
                done BOOLEAN NOT NULL DEFAULT FALSE,
                PRIMARY KEY (job, shard_id))""",
            """CREATE TABLE IF NOT EXISTS jobs (
                job TEXT PRIMARY KEY,
                listing_complete BOOLEAN NOT NULL DEFAULT TRUE)""",
            """CREATE TABLE IF NOT EXISTS media_cache (
                bucket TEXT NOT NULL,
                key TEXT NOT NULL,
                etag TEXT NOT NULL,
                kind TEXT NOT NULL,
                result BYTEA NOT NULL,
                PRIMARY KEY (bucket, key, etag, kind))""",
            """CREATE TABLE IF NOT EXISTS leases (
                job TEXT PRIMARY KEY,
                holder TEXT NOT NULL,
                acquired_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS runs (
                id BIGSERIAL PRIMARY KEY,
                job TEXT NOT NULL,
                kind TEXT NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                finished_at DOUBLE PRECISION,
                status TEXT NOT NULL,
                counts JSONB)""",
            "CREATE INDEX IF NOT EXISTS runs_job ON runs (job, id)",
            """CREATE TABLE IF NOT EXISTS manifest (
                job TEXT NOT NULL,
                item_name TEXT COLLATE "C" NOT NULL,
                slot_name TEXT NOT NULL,
                key TEXT COLLATE "C" NOT NULL,
                path TEXT COLLATE "C" NOT NULL,
                seq BIGINT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS manifest_item ON manifest (job, path, item_name, seq)",
            "CREATE INDEX IF NOT EXISTS manifest_key ON manifest (job, key)",
        ),
    ),
    (
        2,  # claims: several processes, one job
        (
            "CREATE SEQUENCE IF NOT EXISTS claim_tokens",
            "ALTER TABLE items ADD COLUMN IF NOT EXISTS claim_holder TEXT NOT NULL DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS claim_token BIGINT NOT NULL DEFAULT 0, "
            "ADD COLUMN IF NOT EXISTS claim_expires DOUBLE PRECISION NOT NULL DEFAULT 0",
            "CREATE INDEX IF NOT EXISTS items_claims ON items (claim_token) WHERE claim_token <> 0",
            "ALTER TABLE listing ADD COLUMN IF NOT EXISTS claim_holder TEXT NOT NULL DEFAULT '', "
            "ADD COLUMN IF NOT EXISTS claim_token BIGINT NOT NULL DEFAULT 0, "
            "ADD COLUMN IF NOT EXISTS claim_expires DOUBLE PRECISION NOT NULL DEFAULT 0",
            "ALTER TABLE runs ADD COLUMN IF NOT EXISTS alive_until DOUBLE PRECISION "
            "NOT NULL DEFAULT 0",
        ),
    ),
)
_PENDING = [str(State.PLANNED.value), str(State.PROCESSING.value), str(State.SENT.value)]
# A write to claimed work: unfenced for a handle that never joined (token 0), else only
# while the row is still claimed with our token. "+ 0" keeps the planner from reading the
# token's index (every row of ours matches it) instead of the (job, path, name) key of the
# rows being written: measured 30 ms instead of 0.5 per batch of 10 on a fresh table.
#
# Every claim time is the DATABASE's clock (``_DB_NOW``), never a machine's: two machines whose
# clocks disagree still agree on when a claim ends. A write to a claim that has expired is
# refused even when nobody took it yet (it may be taken any moment).
_DB_NOW = "extract(epoch from clock_timestamp())::float8"
_FENCE = f"($TOK = 0 OR (claim_token + 0 = $TOK AND claim_expires > {_DB_NOW}))"
_UNCLAIM = "claim_holder='', claim_token=0, claim_expires=0"


def _fence(param: int) -> str:
    return _FENCE.replace("$TOK", f"${param}")


def _extend(tok: int, ttl: int, column: str = "claim_expires") -> str:
    """SQL for a fenced write's new expiry: a write to our claim extends it by the lease."""
    return f"CASE WHEN ${tok} = 0 THEN {column} ELSE {_DB_NOW} + ${ttl}::float8 END"


SCHEMA_VERSION = MIGRATIONS[-1][0]


# The connection went away under a transaction: retried once when nothing was committed.
_LOST_CONNECTION = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.IdleInTransactionSessionTimeoutError,
    asyncpg.AdminShutdownError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionFailureError,
    asyncpg.exceptions._base.InternalClientError,  # the protocol's state after a lost session
    ConnectionError,
)


# Raised at COMMIT, these say it was never sent or never took effect: the driver refused to
# send it (the protocol had already seen the session end), or the server had ended the
# session for idling inside the transaction (rolled back).
_NOT_COMMITTED = (
    asyncpg.exceptions._base.InternalClientError,
    asyncpg.IdleInTransactionSessionTimeoutError,
)
# The server aborted the transaction (nothing committed): run it again.
_ABORTED = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)




def _error(where: str, exc: BaseException) -> LedgerError:
    """One line naming the ledger (password masked) and the fix, for any driver error."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(
        exc, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return LedgerError(
            f"ledger {where}: the server refused the credentials ({msg}): check the user and "
            "the password (PGPASSWORD, ~/.pgpass or the URL)"
        )
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return LedgerError(f"ledger {where}: {msg}: create the database or fix the URL")
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        return LedgerError(
            f"ledger {where}: not allowed ({msg}): grant the role the rights it needs, or "
            "run `ingest ledger migrate` as a role that may create tables"
        )
    if isinstance(exc, asyncpg.DeadlockDetectedError | asyncpg.SerializationError):
        return LedgerBusy(f"ledger {where}: {msg}: try again")
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return LedgerBusy(
            f"ledger {where}: the server has no connection left ({msg}): lower "
            "ledger.pool_max_size or raise max_connections"
        )
    if isinstance(exc, OSError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return LedgerError(
            f"ledger {where}: cannot reach the PostgreSQL server ({msg}): check the host, the "
            "port and that the server runs"
        )
    return LedgerError(f"ledger {where}: {msg}")


def _rowcount(status: str) -> int:
    """The row count of a command tag such as 'UPDATE 3'."""
    try:
        return int(status.rsplit(" ", 1)[-1])
    except (ValueError, IndexError):
        return 0


def _final(o: Outcome) -> bool:
    return o.state is State.FAILED and not o.retryable


def _known(row: Any) -> Known:
    return Known(
        row["key"],
        row["etag"],
        row["changed_etag"],
        bool(row["vanished_at"]),
        row["state"] == State.DISCOVERED,
    )


_KNOWN = "key, etag, changed_etag, vanished_at, state"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _last_by(rows: Iterable[T], key: Callable[[T], Any]) -> list[T]:
    """One row per key, the last one winning (what applying them in order would leave)."""
    return list({key(r): r for r in rows}.values())


def _first_by(rows: Iterable[T], key: Callable[[T], Any]) -> list[T]:
    out: dict[Any, T] = {}
    for r in rows:
        out.setdefault(key(r), r)
    return list(out.values())


class PostgresLedger:
    """One job's rows in a PostgreSQL database. Open with ``await PostgresLedger.open(url,
    job)`` (or ``ingest.ledger.open_ledger``)."""

    cooperative = True  # several processes share a job through claims

    def __init__(self, url: str, job: str, pool: Any) -> None:
        self.url = url
        self.where = mask_url(url)
        self.job = job
        self._pool = pool
        self._run_id = 0
        self._closed = False
        # Claims (``join``): who we are, our fencing token (0: never joined, nothing fenced),
        # how long a claim lives, what we may claim.
        self._holder = ""
        self._token = 0
        self._ttl_s = 0.0
        self._roles: frozenset[str] = ROLES

    def _ttl(self) -> float:
        """The lease a new claim gets, added to the database's clock in SQL."""
        return self._ttl_s if self._token else 0.0

    def _lost(self, what: str, idents: list[Ident] | None = None) -> ClaimLost:
        return ClaimLost(
            f"claim lost: another process took over {what} (our claim expired)", idents
        )

    @classmethod
    async def open(
        cls,
        url: str,
        job: str,
        *,
        pool_max_size: int = POOL_MAX_SIZE,
        statement_cache_size: int = 100,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        migrate: bool = True,
        idle_in_transaction_timeout_s: float = 0.0,
    ) -> PostgresLedger:
        """Connect (a bounded pool), check the schema and apply missing migrations."""
        where = mask_url(url)
        settings: dict[str, str] = {}
        if idle_in_transaction_timeout_s > 0:
            # A process paused inside a transaction (SIGSTOP, a long GC) would keep its row
            # locks: the server ends such a session, and the others go on.
            ms = max(1, int(idle_in_transaction_timeout_s * 1000))
            settings["idle_in_transaction_session_timeout"] = str(ms)
        try:
            pool = await asyncio.wait_for(
                asyncpg.create_pool(
                    url,
                    min_size=1,
                    max_size=max(1, pool_max_size),
                    statement_cache_size=statement_cache_size,
                    timeout=connect_timeout_s,
                    command_timeout=None,
                    server_settings=settings or None,
                ),
                timeout=connect_timeout_s * 2,
            )
        except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            raise _error(where, exc) from None
        except (ValueError, OverflowError, TypeError) as exc:  # a malformed URL, a bad port
            # The driver's message may quote the URL's parts (a password): not shown.
            raise LedgerError(
                f"ledger {where}: not a valid PostgreSQL URL ({type(exc).__name__}): check "
                "the host, the port (1-65535) and percent-encode the password"
            ) from None
        except Exception as exc:  # anything else the driver raises: one line, never a trace
            raise LedgerError(f"ledger {where}: cannot open ({type(exc).__name__})") from None
        lg = cls(url, job, pool)
        try:
            version = await lg._schema_version()
            if version > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger {where} was written by a newer version of ingest (schema "
                    f"{version}, this one reads up to {SCHEMA_VERSION}): upgrade ingest"
                )
            if version < SCHEMA_VERSION:
                if not migrate:
                    raise LedgerError(
                        f"ledger {where} is at schema {version}, this engine needs "
                        f"{SCHEMA_VERSION}: run `ingest ledger migrate`"
                    )
                await lg.migrate()
        except BaseException:
            await lg._terminate()
            raise
        return lg

    async def __aenter__(self) -> PostgresLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._pool.close(), timeout=10)
        except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError):
            self._pool.terminate()

    async def _terminate(self) -> None:
        self._closed = True
        self._pool.terminate()

    # --- transactions ------------------------------------------------------------------------

    async def _tx(self, fn: Callable[[Any], Awaitable[T]], *, single: bool = False) -> T:
        """``fn(connection)`` in one transaction; driver errors become one LedgerError line.

        ``single``: ``fn`` runs ONE statement, atomic by itself: no BEGIN/COMMIT round trips
        (the send path's batches: two round trips a batch instead of seven)."""
        if self._closed:
            raise LedgerError(f"ledger {self.where} is closed")
        # Every connection of the pool may have lost its session at once (a long pause):
        # one more try than the pool has connections.
        tries = self._pool.get_max_size() + 1
        for attempt in range(1, tries + 1):
            committing = committed = False
            result: Any = None
            try:
                async with self._pool.acquire() as conn:
                    try:
                        if single:
                            committing = True  # sent: it may have taken effect
                            result = await fn(conn)
                            committed = True
                            return cast(T, result)
                        tx = conn.transaction()
                        await tx.start()
                        try:
                            result = await fn(conn)
                        except _LOST_CONNECTION:
                            raise
                        except BaseException:
                            with contextlib.suppress(Exception):
                                await tx.rollback()
                            raise
                        committing = True
                        await tx.commit()
                        committed = True
                    except _LOST_CONNECTION:
                        conn.terminate()  # never handed out again: the pool opens a new one
                        raise
                return cast(T, result)
            except _LOST_CONNECTION as exc:
                if committed:  # only giving the connection back failed: the work is done
                    return cast(T, result)
                # The session ended before COMMIT was sent (the server ended it while we
                # were paused inside the transaction, a restart, a pooler), or the driver
                # refused to send it (the server's goodbye had come first): nothing was
                # committed, so the call runs again on another connection, where its
                # fencing checks apply. Lost during the commit: unknown, say so.
                unknown = committing and not isinstance(exc, _NOT_COMMITTED)
                if unknown or attempt == tries:
                    raise _error(self.where, exc) from None
            except _ABORTED as exc:
                if attempt == tries:
                    raise _error(self.where, exc) from None
            except (TimeoutError, asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
                raise _error(self.where, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _schema_version(self) -> int:
        async def work(c: Any) -> int:
            exists = await c.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
            if not exists:
                return 0
            return int(await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))

        return await self._tx(work)

    async def migrate(self) -> int:
        """Apply the missing migration steps in one transaction under a transaction-level
        advisory lock (safe with several processes and behind a transaction pooler); returns
        the schema version."""

        async def work(c: Any) -> int:
            await c.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await c.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                "applied_at DOUBLE PRECISION NOT NULL)"
            )
            have = int(await c.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            for version, steps in MIGRATIONS:
                if version <= have:
                    continue
                for sql in steps:
                    await c.execute(sql)
                await c.execute(
                    "INSERT INTO schema_version(version, applied_at) VALUES ($1, $2)",
                    version,
                    time.time(),
                )
                have = version
            return have

        return await self._tx(work)

    # --- runs and listing checkpoints --------------------------------------------------------

    async def start_run(self, kind: str, *, listing: bool = True) -> RunInfo:
        job = self.job

        async def work(c: Any) -> RunInfo:
            now = time.time()
            resume = False
            await c.execute(  # a run of another live process is not interrupted
                "UPDATE runs SET status='interrupted', finished_at=$1 "
                f"WHERE job=$2 AND status='running' AND alive_until < {_DB_NOW}",
                now,
                job,
            )
            if listing:
                done = await c.fetchval(
                    "SELECT listing_complete FROM jobs WHERE job=$1 FOR UPDATE", job
                )
                resume = done is not None and not done
                if not resume:
                    await c.execute("DELETE FROM listing WHERE job=$1", job)
                await c.execute(
                    "INSERT INTO jobs(job, listing_complete) VALUES ($1, FALSE) "
                    "ON CONFLICT (job) DO UPDATE SET listing_complete=FALSE",
                    job,
                )
            run_id = await c.fetchval(
                "INSERT INTO runs(job, kind, started_at, status, alive_until) "
                f"VALUES ($1,$2,$3,'running',CASE WHEN $4::float8 > 0 THEN {_DB_NOW} + $4 "
                "ELSE 0 END) RETURNING id",
                job,
                kind,
                now,
                self._ttl(),
            )
            return RunInfo(int(run_id), resume)

        info = await self._tx(work)
        self._run_id = info.run_id
        return info

    async def finish_run(self, run_id: int, status: str, counts: dict[str, int]) -> None:
        async def work(c: Any) -> None:
            await c.execute(
                "UPDATE runs SET status=$1, finished_at=$2, counts=$3::jsonb WHERE id=$4",
                status,
                time.time(),
                orjson.dumps(counts).decode(),
                run_id,
            )

        await self._tx(work)

    async def mark_listing_complete(self) -> list[str]:
        job = self.job

        async def work(c: Any) -> list[str]:
            # The job's row first: two processes finishing at once complete it one after the
            # other, and only the first finds shard rows left to delete (and returns them).
            await c.execute("SELECT 1 FROM jobs WHERE job=$1 FOR UPDATE", job)
            if self._token and await c.fetchval(
                "SELECT EXISTS (SELECT 1 FROM listing WHERE job=$1 AND NOT done)", job
            ):
                return []  # other processes still list their shards: the last one completes
            await c.execute("UPDATE jobs SET listing_complete=TRUE WHERE job=$1", job)
            rows = await c.fetch("DELETE FROM listing WHERE job=$1 RETURNING shard_id", job)
            return sorted(str(r[0]) for r in rows) if self._token else []

        return await self._tx(work)

    async def checkpoints(self) -> dict[str, tuple[str, bool]]:
        async def work(c: Any) -> dict[str, tuple[str, bool]]:
            rows = await c.fetch(
                "SELECT shard_id, checkpoint, done FROM listing WHERE job=$1", self.job
            )
            return {r["shard_id"]: (r["checkpoint"], bool(r["done"])) for r in rows}

        return await self._tx(work)

    # --- listing -> items --------------------------------------------------------------------

    async def record_page(
        self,
        shard_id: str,
        checkpoint: str,
        shard_done: bool,
        objects: Sequence[ObjectInfo],
        plans: Sequence[Item | Skip],
        collision: CollisionPolicy,
    ) -> list[Item]:
        job, run_id = self.job, self._run_id
        objs = _last_by(objects, lambda o: o.key)
        items = [p for p in plans if isinstance(p, Item)]
        skips = [(p.obj.key, p.reason) for p in plans if isinstance(p, Skip)]

        token, holder, ttl = self._token, self._holder, self._ttl()
        fenced = bool(token) and shard_id != UNLISTED_SHARD

        async def work(c: Any) -> list[Item]:
            now = time.time()
            if fenced:
                # Only the shard's owner records its pages: a row gone (the listing was
                # completed by others) or given back (token 0) is not ours either.
                owner = await c.fetchval(
                    "SELECT claim_token FROM listing WHERE job=$1 AND shard_id=$2 FOR UPDATE",
                    job,
                    shard_id,
                )
                if owner != token:
                    raise self._lost(f"listing shard {shard_id}")
            if objs:
                await _upsert_objects(c, job, objs)
            todo = items
            if items:  # an object pruned before (a tombstone) is not planned again
                gone = await _tombstones(c, job, [k for it in items for k in it.keys])
                todo = [it for it in items if not gone.intersection(it.keys)]
            claimed = [bool(token) and role_for(it) in self._roles for it in todo]
            inserted: dict[Ident, int] = {}
            if todo:
                rows = await c.fetch(
                    "INSERT INTO items(job, path, name, payload, keys, state, run_id, "
                    "updated_at, media, readonly_endpoint, claim_holder, claim_token, "
                    "claim_expires) "
                    "SELECT $1, u.path, u.name, u.payload, "
                    "ARRAY(SELECT jsonb_array_elements_text(u.keys::jsonb)), $2, $3, $4, "
                    "u.media, u.ro, CASE WHEN u.mine THEN $12 ELSE '' END, "
                    "CASE WHEN u.mine THEN $13::bigint ELSE 0 END, "
                    f"CASE WHEN u.mine THEN {_DB_NOW} + $14::float8 ELSE 0 END "
                    "FROM unnest($5::text[], $6::text[], $7::bytea[], "
                    "$8::text[], $9::text[], $10::bool[], $11::bool[]) "
                    "WITH ORDINALITY AS u(path, name, payload, keys, media, ro, mine, n) "
                    "ORDER BY u.n "
                    "ON CONFLICT (job, path, name) DO NOTHING RETURNING id, path, name",
                    job,
                    _S[State.PLANNED],
                    run_id,
                    now,
                    [it.path for it in todo],
                    [it.name for it in todo],
                    [codec.item_to_bytes(it) for it in todo],
                    [orjson.dumps(list(it.keys)).decode() for it in todo],
                    [str(it.media) for it in todo],
                    [it.readonly_endpoint for it in todo],
                    claimed,
                    holder,
                    token,
                    ttl,
                )
                inserted = {(r["path"], r["name"]): int(r["id"]) for r in rows}
            new: list[Item] = []
            known: list[Item] = []
            links: list[tuple[int, str]] = []
            for it in todo:
                item_id = inserted.pop(it.ident, None)
                if item_id is None:
                    known.append(it)
                else:
                    new.append(it)
                    links += ((item_id, k) for k in it.keys)
            more_skips: list[tuple[str, str]] = []
            if known:
                recorded = await _recorded_items(c, job, [it.ident for it in known])
                for it in known:
                    item_id, recorded_keys = recorded[it.ident]
                    mine = set(recorded_keys)
                    if any(k not in mine for k in it.keys):
                        more_skips += ((s.obj.key, s.reason) for s in collision(it, recorded_keys))
                    links += ((item_id, k) for k in it.keys if k in mine)
            links_once = _first_by(links, lambda link: link[1])
            if links_once:
                await c.execute(
                    "UPDATE objects o SET state=$2, item_id=u.id FROM "
                    "unnest($3::bigint[], $4::text[]) AS u(id, key) "
                    "WHERE o.job=$1 AND o.key=u.key AND o.item_id IS NULL",
                    job,
                    _S[State.PLANNED],
                    [link[0] for link in links_once],
                    [link[1] for link in links_once],
                )
            all_skips = _first_by(skips + more_skips, lambda s: s[0])
            if all_skips:
                await c.execute(
                    "UPDATE objects o SET state=$2, reason=u.reason FROM "
                    "unnest($3::text[], $4::text[]) AS u(key, reason) "
                    "WHERE o.job=$1 AND o.key=u.key AND o.item_id IS NULL",
                    job,
                    _S[State.SKIPPED],
                    [s[0] for s in all_skips],
                    [s[1] for s in all_skips],
                )
            if fenced and (checkpoint or shard_done):
                # The owner's continuation: an UPDATE of its claimed row, never an INSERT (a
                # late page must not bring back a shard the others completed).
                await c.execute(
                    "UPDATE listing SET checkpoint = CASE WHEN $3 <> '' THEN $3 "
                    "ELSE checkpoint END, done = $4, claim_expires = CASE WHEN $4 THEN 0 "
                    f"ELSE {_DB_NOW} + $6 END WHERE job=$1 AND shard_id=$2 AND claim_token=$5",
                    job,
                    shard_id,
                    checkpoint,
                    shard_done,
                    token,
                    ttl,
                )
            elif not token and (checkpoint or shard_done):
                await c.execute(
                    "INSERT INTO listing(job, shard_id, checkpoint, done) VALUES ($1,$2,$3,$4) "
                    "ON CONFLICT (job, shard_id) DO UPDATE SET "
                    "checkpoint = CASE WHEN excluded.checkpoint <> '' "
                    "THEN excluded.checkpoint ELSE listing.checkpoint END, done = excluded.done, "
                    "claim_expires = CASE WHEN excluded.done THEN 0 "
                    "ELSE listing.claim_expires END",
                    job,
                    shard_id,
                    checkpoint,
                    shard_done,
                )
            return new

        return await self._tx(work)

    async def add_failed_item(self, item: Item, reason: str) -> bool:
        job, run_id = self.job, self._run_id

        async def work(c: Any) -> bool:
            item_id = await c.fetchval(
                "INSERT INTO items(job, path, name, payload, keys, state, reason, run_id, "
                "updated_at, media, readonly_endpoint, final) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,TRUE) "
                "ON CONFLICT (job, path, name) DO NOTHING RETURNING id",
                job,
                item.path,
                item.name,
                codec.item_to_bytes(item),
                list(item.keys),
                _S[State.FAILED],
                reason,
                run_id,
                time.time(),
                str(item.media),
                item.readonly_endpoint,
            )
            if item_id is None:
                return False
            await c.execute(
                "UPDATE objects SET state=$2, item_id=$3 WHERE job=$1 AND key = ANY($4::text[]) "
                "AND item_id IS NULL",
                job,
                _S[State.PLANNED],
                item_id,
                list(item.keys),
            )
            return True

        return await self._tx(work)

    async def pending(self) -> AsyncGenerator[Pending, None]:
        job = self.job
        top = await self._tx(
            lambda c: c.fetchval("SELECT COALESCE(MAX(id), 0) FROM items WHERE job=$1", job)
        )
        last = 0
        while True:

            async def chunk(c: Any, last: int = last) -> tuple[list[Any], int]:
                if not self._token:
                    rows = await c.fetch(
                        "SELECT id, path, name, payload, attempts, media, readonly_endpoint "
                        "FROM items WHERE job=$1 AND state = ANY($2::text[]) AND id > $3 "
                        "AND id <= $4 ORDER BY id LIMIT $5",
                        job,
                        _PENDING,
                        last,
                        int(top),
                        CHUNK,
                    )
                    return list(rows), int(rows[-1]["id"]) if rows else last
                # Joined: claim what no live process holds (SKIP LOCKED: rows another process
                # is claiming right now are left to it), within our roles, in one statement.
                rows = await c.fetch(
                    "UPDATE items SET claim_holder=$2, claim_token=$3, "
                    f"claim_expires={_DB_NOW} + $4 "
                    "WHERE id IN (SELECT id FROM items WHERE job=$1 AND state = ANY($5::text[]) "
                    f"AND id > $6 AND id <= $7 AND claim_expires < {_DB_NOW} "
                    "AND claim_holder <> $2 "
                    "AND (($8 AND media <> '') OR ($9 AND media = '')) "
                    "ORDER BY id LIMIT $10 FOR UPDATE SKIP LOCKED) "
                    "RETURNING id, path, name, payload, attempts, media, readonly_endpoint",
                    job,
                    self._holder,
                    self._token,
                    self._ttl(),
                    _PENDING,
                    last,
                    int(top),
                    "media" in self._roles,
                    "send" in self._roles,
                    CHUNK,
                )
                if not rows:
                    return [], last
                got = sorted(rows, key=lambda row: int(row["id"]))
                return got, int(got[-1]["id"])

            rows, nxt = await self._tx(chunk)
            if nxt == last:
                return
            for r in rows:
                yield Pending(self._decode(r), int(r["attempts"]))
            last = nxt

    def _decode(self, r: Any) -> Item:
        path, name, media, ro = r["path"], r["name"], r["media"], bool(r["readonly_endpoint"])
        try:
            item = codec.item_from_bytes(bytes(r["payload"]))
        except codec.CodecError as exc:
            raise LedgerError(
                f"ledger {self.where}: item '{path.rstrip('/')}/{name}' cannot be read ({exc})"
            ) from None
        return codec.with_columns(item, path, name, media, ro)

    # --- media ---------------------------------------------------------------------------------

    async def mark_processing(self, item: Item) -> None:
        async def work(c: Any) -> int:
            n = await c.execute(
                f"UPDATE items SET state=$1, updated_at=$2, claim_expires={_extend(6, 7)} "
                f"WHERE job=$3 AND path=$4 AND name=$5 AND {_fence(6)}",
                _S[State.PROCESSING],
                time.time(),
                self.job,
                item.path,
                item.name,
                self._token,
                self._ttl(),
            )
            return _rowcount(n)

        if not await self._tx(work, single=True) and self._token:
            await self._drop_expired([item.ident])
            raise self._lost(f"item {item.name}", [item.ident])

    async def media_done(self, item: Item) -> None:
        done = dataclasses.replace(item, media=Media.NONE)

        keep = not self._token or "send" in self._roles  # else the senders take it from here

        async def work(c: Any) -> int:
            n = await c.execute(
                "UPDATE items SET state=$1, payload=$2, media='', updated_at=$3, "
                "claim_holder = CASE WHEN $8 THEN claim_holder ELSE '' END, "
                "claim_token = CASE WHEN $8 THEN claim_token ELSE 0 END, "
                f"claim_expires = CASE WHEN $8 THEN {_extend(7, 9)} ELSE 0 END "
                f"WHERE job=$4 AND path=$5 AND name=$6 AND {_fence(7)}",
                _S[State.PLANNED],
                codec.item_to_bytes(done),
                time.time(),
                self.job,
                item.path,
                item.name,
                self._token,
                keep,
                self._ttl(),
            )
            return _rowcount(n)

        if not await self._tx(work, single=True) and self._token:
            await self._drop_expired([item.ident])
            raise self._lost(f"item {item.name}", [item.ident])

    async def media_failed(self, item: Item, reason: str, *, final: bool) -> None:
        async def work(c: Any) -> int:
            n = await c.execute(
                "UPDATE items SET state=$1, reason=$2, updated_at=$3, failures=failures+1, "
                f"final=$4, {_UNCLAIM} WHERE job=$5 AND path=$6 AND name=$7 AND {_fence(8)}",
                _S[State.FAILED],
                reason,
                time.time(),
                final,
                self.job,
                item.path,
                item.name,
                self._token,
            )
            return _rowcount(n)

        if not await self._tx(work, single=True) and self._token:
            await self._drop_expired([item.ident])
            raise self._lost(f"item {item.name}", [item.ident])

    async def cached_facts(self, bucket: str, obj: ObjectInfo, kind: str) -> Facts | None:
        if not obj.etag:
            return None
        data = await self._tx(
            lambda c: c.fetchval(
                "SELECT result FROM media_cache WHERE bucket=$1 AND key=$2 AND etag=$3 AND kind=$4",
                bucket,
                obj.key,
                obj.etag,
                kind,
            )
        )
        if data is None:
            return None
        try:
            return codec.facts_from_bytes(bytes(data))
        except codec.CodecError:
            return None

    async def cache_facts(self, bucket: str, obj: ObjectInfo, kind: str, facts: Facts) -> None:
        if not obj.etag:
            return
        data = codec.facts_to_bytes(facts)

        async def work(c: Any) -> None:
            await c.execute(
                "INSERT INTO media_cache(bucket, key, etag, kind, result) VALUES ($1,$2,$3,$4,$5) "
                "ON CONFLICT (bucket, key, etag, kind) DO UPDATE SET result=excluded.result",
                bucket,
                obj.key,
                obj.etag,
                kind,
                data,
            )

        await self._tx(work)

    # --- sending -------------------------------------------------------------------------------

    async def mark_sent(self, items: Sequence[Item]) -> list[int]:
        """Joined: all or nothing — one item another process took over and none is marked
        (``ClaimLost`` names those). One statement (no transaction round trips) unless the
        same item is in the batch twice."""
        idents = [it.ident for it in items]
        job, token = self.job, self._token
        if not idents:
            return []
        if len(set(idents)) == len(idents):
            paths, names = [p for p, _ in idents], [n for _, n in idents]

            async def one(c: Any) -> list[Any]:
                return list(
                    await c.fetch(
                        # Rows locked in id order (every writer does: no deadlock); all of
                        # them still ours and unexpired, or none is marked.
                        "WITH t AS (SELECT i.id, i.claim_token, i.claim_expires FROM items i "
                        "JOIN unnest($4::text[], $5::text[]) AS u(path, name) ON i.job=$3 "
                        "AND i.path=u.path AND i.name=u.name ORDER BY i.id FOR UPDATE OF i) "
                        "UPDATE items i SET state=$1, attempts=i.attempts+1, updated_at=$2, "
                        f"claim_expires={_extend(6, 7, 'i.claim_expires')} "
                        "FROM t WHERE i.id = t.id AND ($6 = 0 OR NOT EXISTS "
                        "(SELECT 1 FROM t WHERE t.claim_token <> $6 "
                        f"OR t.claim_expires <= {_DB_NOW})) "
                        "RETURNING i.path, i.name, i.attempts",
                        _S[State.SENT],
                        time.time(),
                        job,
                        paths,
                        names,
                        token,
                        self._ttl(),
                    )
                )

            rows = await self._tx(one, single=True)
            if token and not rows:
                await self._refuse_lost(paths, names)
            got = {(r["path"], r["name"]): int(r["attempts"]) for r in rows}
            return [got.get(ident, 1) for ident in idents]

        async def work(c: Any) -> list[int]:
            now = time.time()
            if token:  # all or nothing
                rows = await c.fetch(
                    f"SELECT i.path, i.name, i.claim_token, i.claim_expires > {_DB_NOW} AS live "
                    "FROM items i JOIN unnest($2::text[], $3::text[]) AS u(path, name) "
                    "ON i.job=$1 AND i.path=u.path AND i.name=u.name ORDER BY i.id FOR UPDATE OF i",
                    job,
                    [p for p, _ in idents],
                    [n for _, n in idents],
                )
                lost = [
                    (r["path"], r["name"])
                    for r in rows
                    if r["claim_token"] != token or not r["live"]
                ]
                if lost:
                    raise self._lost(f"{len(lost)} items of a batch", lost)  # rolled back
            out: list[int] = []  # the same item twice: each attempt, in order
            for path, name in idents:
                n = await c.fetchval(
                    "UPDATE items SET state=$1, attempts=attempts+1, updated_at=$2, "
                    f"claim_expires={_extend(6, 7)} "
                    "WHERE job=$3 AND path=$4 AND name=$5 RETURNING attempts",
                    _S[State.SENT],
                    now,
                    job,
                    path,
                    name,
                    token,
                    self._ttl(),
                )
                out.append(int(n) if n is not None else 1)
            return out

        return await self._tx(work)

    async def _refuse_lost(self, paths: list[str], names: list[str]) -> None:
        """Nothing was marked: raise ClaimLost naming the items another token holds (none:
        the ledger holds none of them, a first attempt each)."""

        async def work(c: Any) -> list[Ident]:
            rows = await c.fetch(
                "SELECT i.path, i.name FROM items i JOIN unnest($2::text[], $3::text[]) AS "
                "u(path, name) ON i.job=$1 AND i.path=u.path AND i.name=u.name "
                f"WHERE i.claim_token + 0 <> $4 OR i.claim_expires <= {_DB_NOW}",
                self.job,
                paths,
                names,
                self._token,
            )
            return [(r["path"], r["name"]) for r in rows]

        lost = await self._tx(work, single=True)
        if lost:
            await self._drop_expired(lost)
            raise self._lost(f"{len(lost)} items of a batch", lost)

    async def _drop_expired(self, idents: Sequence[Ident]) -> None:
        """Our claims among these that expired (a write of ours was refused for it) are given
        back: any process, this one too, may take the items again at once. Claims another
        process took are left alone."""

        async def work(c: Any) -> None:
            await c.execute(
                f"UPDATE items i SET {_UNCLAIM} FROM unnest($3::text[], $4::text[]) AS "
                "u(path, name) WHERE i.job=$1 AND i.path=u.path AND i.name=u.name "
                f"AND i.claim_token + 0 = $2 AND i.claim_expires <= {_DB_NOW}",
                self.job,
                self._token,
                [p for p, _ in idents],
                [n for _, n in idents],
            )

        if idents and self._token:
            await self._tx(work, single=True)

    async def keep_claims(self, items: Sequence[Item]) -> None:
        """Before a further request for items we marked SENT: each claim still ours and
        running (by the database's clock) is extended by the lease; any other and nothing is
        sent (``ClaimLost`` names them)."""
        wanted = list(dict.fromkeys(it.ident for it in items))
        if not self._token or not wanted:
            return
        paths, names = [p for p, _ in wanted], [n for _, n in wanted]

        async def work(c: Any) -> list[Any]:
            return list(
                await c.fetch(
                    f"UPDATE items i SET claim_expires={_DB_NOW} + $3 FROM (SELECT i.id FROM "
                    "items i JOIN unnest($4::text[], $5::text[]) AS u(path, name) ON "
                    "i.job=$1 AND i.path=u.path AND i.name=u.name WHERE i.claim_token + 0 = $2 "
                    f"AND i.claim_expires > {_DB_NOW} ORDER BY i.id FOR UPDATE OF i) t "
                    "WHERE i.id = t.id RETURNING i.path, i.name",
                    self.job,
                    self._token,
                    self._ttl_s,
                    paths,
                    names,
                )
            )

        kept = {(r["path"], r["name"]) for r in await self._tx(work, single=True)}
        lost = [ident for ident in wanted if ident not in kept]
        if lost:
            await self._drop_expired(lost)
            raise self._lost(f"{len(lost)} items of a batch being sent", lost)

    async def unmark_sent(self, items: Sequence[Item]) -> None:
        counts = list(Counter(it.ident for it in items).items())
        if not counts:
            return

        async def work(c: Any) -> None:
            await c.execute(
                "UPDATE items i SET attempts=GREATEST(i.attempts - u.n, 0), "
                "state=CASE WHEN i.attempts - u.n <= 0 THEN $1 ELSE i.state END, updated_at=$2 "
                "FROM unnest($4::text[], $5::text[], $6::int[]) AS u(path, name, n) "
                "WHERE i.job=$3 AND i.path=u.path AND i.name=u.name AND i.state=$7 "
                # Our token only, expired or not: while nobody took the item, taking back an
                # attempt that never reached V7 is right (else a later ALREADY_EXISTS would
                # pass for ours).
                "AND ($8 = 0 OR i.claim_token + 0 = $8)",
                _S[State.PLANNED],
                time.time(),
                self.job,
                [p for (p, _), _n in counts],
                [n for (_, n), _c in counts],
                [k for _, k in counts],
                _S[State.SENT],
                self._token,
            )

        await self._tx(work)

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Outcomes applied in one transaction; a joined handle's claims on them end. Joined,
        outcomes of items another process took over are refused: the rest is committed and
        ``ClaimLost`` names the refused ones."""
        if not outcomes:
            return
        job, token = self.job, self._token

        async def work(c: Any) -> list[Ident]:
            now = time.time()
            if len({(o.path, o.name) for o in outcomes}) < len(outcomes):
                # The same item twice: applied in order, the last outcome wins.
                refused: list[Ident] = []
                for o in outcomes:
                    n = await c.execute(
                        "UPDATE items SET state=$1, v7_id=$2, reason=$3, updated_at=$4, "
                        "failures=failures+(CASE WHEN $1='FAILED' THEN 1 ELSE 0 END), final=$5, "
                        f"{_UNCLAIM} WHERE job=$6 AND path=$7 AND name=$8 AND {_fence(9)}",
                        str(o.state),
                        o.v7_id,
                        o.reason,
                        now,
                        _final(o),
                        job,
                        o.path,
                        o.name,
                        token,
                    )
                    if _rowcount(n) == 0:
                        refused.append((o.path, o.name))
                return refused if token else []
            rows = await c.fetch(
                # Rows locked in id order first, as every writer locks them: no deadlock.
                "WITH u AS (SELECT * FROM unnest($4::text[], $5::text[], $6::text[], "
                "$7::text[], $8::text[], $9::bool[]) AS u(state, v7_id, reason, path, name, "
                "final)), t AS (SELECT i.id FROM items i JOIN u ON i.job=$1 AND i.path=u.path "
                "AND i.name=u.name ORDER BY i.id FOR UPDATE OF i) "
                "UPDATE items i SET state=u.state, v7_id=u.v7_id, reason=u.reason, "
                "failures=i.failures+(CASE WHEN u.state=$3 THEN 1 ELSE 0 END), final=u.final, "
                "updated_at=$2, claim_holder='', claim_token=0, claim_expires=0 "
                "FROM u, t WHERE t.id = i.id "
                "AND i.job=$1 AND i.path=u.path AND i.name=u.name "
                f"AND ($10 = 0 OR (i.claim_token + 0 = $10 AND i.claim_expires > {_DB_NOW})) "
                "RETURNING i.path, i.name",
                job,
                now,
                _S[State.FAILED],
                [str(o.state) for o in outcomes],
                [o.v7_id for o in outcomes],
                [o.reason for o in outcomes],
                [o.path for o in outcomes],
                [o.name for o in outcomes],
                [_final(o) for o in outcomes],
                token,
            )
            if not token:
                return []
            done = {(r["path"], r["name"]) for r in rows}
            return [(o.path, o.name) for o in outcomes if (o.path, o.name) not in done]

        duplicates = len({(o.path, o.name) for o in outcomes}) < len(outcomes)
        refused = await self._tx(work, single=not duplicates)
        if refused:
            await self._drop_expired(refused)
            raise self._lost(f"{len(refused)} items whose outcomes came late", refused)

    async def set_v7_ids(self, ids: Sequence[tuple[Ident, str]]) -> None:
        rows = _last_by(ids, lambda r: r[0])
        if not rows:
            return

        async def work(c: Any) -> None:
            await c.execute(
                "UPDATE items i SET v7_id=u.v7 FROM unnest($2::text[], $3::text[], $4::text[]) "
                "AS u(path, name, v7) WHERE i.job=$1 AND i.path=u.path AND i.name=u.name",
                self.job,
                [p for (p, _), _v in rows],
                [n for (_, n), _v in rows],
                [v for _, v in rows],
            )

        await self._tx(work)

    async def note_id_misses(self, idents: Sequence[Ident]) -> None:
        rows = list(dict.fromkeys(idents))
        if not rows:
            return

        async def work(c: Any) -> None:
            await c.execute(
                "UPDATE items i SET id_lookups=i.id_lookups+1 FROM "
                "unnest($2::text[], $3::text[]) AS u(path, name) "
                "WHERE i.job=$1 AND i.path=u.path AND i.name=u.name",
                self.job,
                [p for p, _ in rows],
                [n for _, n in rows],
            )

        await self._tx(work)

    async def registered_without_id(self, limit: int) -> list[Ident]:
        async def work(c: Any) -> list[Ident]:
            rows = await c.fetch(
                "SELECT path, name FROM items WHERE job=$1 AND state=$2 AND v7_id='' "
                "AND id_lookups < $3 ORDER BY id LIMIT $4",
                self.job,
                _S[State.REGISTERED],
                MAX_ID_LOOKUPS,
                limit,
            )
            return [(str(r["path"]), str(r["name"])) for r in rows]

        return await self._tx(work)

    async def item_states(self, idents: Sequence[Ident]) -> dict[Ident, State]:
        wanted = list(dict.fromkeys(idents))
        if not wanted:
            return {}

        async def work(c: Any) -> dict[Ident, State]:
            rows = await c.fetch(
                "SELECT i.path, i.name, i.state FROM unnest($2::text[], $3::text[]) AS "
                "u(path, name) JOIN items i ON i.job=$1 AND i.path=u.path AND i.name=u.name",
                self.job,
                [p for p, _ in wanted],
                [n for _, n in wanted],
            )
            return {(r["path"], r["name"]): State(r["state"]) for r in rows}

        return await self._tx(work)

    # --- retry -----------------------------------------------------------------------------------

    async def requeue_failed(self, blocked_reason: str | None = None) -> int:
        async def work(c: Any) -> int:
            n = _rowcount(
                await c.execute(
                    f"UPDATE items SET state=$1, reason='', final=FALSE, {_UNCLAIM} "
                    "WHERE job=$2 AND state=$3",
                    _S[State.PLANNED],
                    self.job,
                    _S[State.FAILED],
                )
            )
            if blocked_reason:
                n += _rowcount(
                    await c.execute(
                        "UPDATE items SET state=$1, reason='' WHERE job=$2 AND state=$3 "
                        "AND reason=$4",
                        _S[State.PLANNED],
                        self.job,
                        _S[State.BLOCKED],
                        blocked_reason,
                    )
                )
            return n

        return await self._tx(work)

    async def requeue_due(self, is_due: Callable[[int, float], bool]) -> int:
        job = self.job
        n, last = 0, 0
        while True:

            async def chunk(c: Any, last: int = last) -> tuple[int, int | None]:
                rows = await c.fetch(
                    "SELECT id, failures, updated_at FROM items i WHERE job=$1 AND state=$2 "
                    "AND NOT final AND id > $3 AND NOT EXISTS (SELECT 1 FROM objects o "
                    "WHERE o.job=i.job AND o.key = ANY(i.keys) AND o.vanished_at > 0) "
                    "ORDER BY id LIMIT $4",
                    job,
                    _S[State.FAILED],
                    last,
                    CHUNK,
                )
                if not rows:
                    return 0, None
                due = [
                    int(r["id"]) for r in rows if is_due(int(r["failures"]), float(r["updated_at"]))
                ]
                if due:
                    await c.execute(
                        "UPDATE items SET state=$1, reason='' WHERE job=$2 "
                        "AND id = ANY($3::bigint[]) AND state=$4 AND NOT final",
                        _S[State.PLANNED],
                        job,
                        due,
                        _S[State.FAILED],
                    )
                return len(due), int(rows[-1]["id"])

            got, nxt = await self._tx(chunk)
            n += got
            if nxt is None:
                return n
            last = nxt

    # --- sync ------------------------------------------------------------------------------------

    async def known_range(
        self, prefix: str, recursive: bool, start: str, inclusive: bool, limit: int
    ) -> list[Known]:
        job = self.job

        async def work(c: Any) -> list[Known]:
            out: list[Known] = []
            lo, incl = (start, inclusive) if start >= prefix else (prefix, True)
            hi = prefix_end(prefix)
            while len(out) < limit:
                want = limit - len(out)
                rows = await c.fetch(
                    f"SELECT {_KNOWN} FROM objects WHERE job=$1 "
                    f"AND key {'>=' if incl else '>'} $2 AND ($3::text IS NULL OR key < $3) "
                    "ORDER BY key LIMIT $4",
                    job,
                    lo,
                    hi,
                    want,
                )
                seek = None
                for row in rows:
                    key = row["key"]
                    if not recursive:
                        cut = key.find("/", len(prefix))
                        if cut >= 0:
                            seek = prefix_end(key[: cut + 1])
                            break
                    out.append(_known(row))
                if seek is not None:
                    lo, incl = seek, True
                elif len(rows) < want:
                    break
                else:
                    lo, incl = rows[-1]["key"], False
            return out

        return await self._tx(work)

    async def known(self, keys: Sequence[str]) -> dict[str, Known]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}

        async def work(c: Any) -> dict[str, Known]:
            rows = await c.fetch(
                f"SELECT {_KNOWN} FROM objects WHERE job=$1 AND key = ANY($2::text[])",
                self.job,
                wanted,
            )
            return {r["key"]: _known(r) for r in rows}

        return await self._tx(work)

    async def sub_folders(self, prefix: str) -> list[str]:
        job = self.job

        async def work(c: Any) -> list[str]:
            out: list[str] = []
            lo: str | None = prefix
            hi = prefix_end(prefix)
            while lo is not None:
                key = await c.fetchval(
                    "SELECT key FROM objects WHERE job=$1 AND key >= $2 "
                    "AND ($3::text IS NULL OR key < $3) AND strpos(substr(key, $4), '/') > 0 "
                    "ORDER BY key LIMIT 1",
                    job,
                    lo,
                    hi,
                    len(prefix) + 1,
                )
                if key is None:
                    return out
                folder = key[: key.index("/", len(prefix)) + 1]
                out.append(folder)
                lo = prefix_end(folder)
            return out

        return await self._tx(work)

    async def record_sync_page(
        self,
        vanished: Sequence[str] = (),
        reappeared: Sequence[str] = (),
        changed: Sequence[tuple[str, str]] = (),
    ) -> int:
        if not (vanished or reappeared or changed):
            return 0
        job = self.job
        changes = _last_by(changed, lambda r: r[0])

        async def work(c: Any) -> int:
            gone = 0
            if vanished:
                gone = _rowcount(
                    await c.execute(
                        "UPDATE objects SET vanished_at=$1 WHERE job=$2 "
                        "AND key = ANY($3::text[]) AND vanished_at=0",
                        time.time(),
                        job,
                        list(vanished),
                    )
                )
            if reappeared:
                await c.execute(
                    "UPDATE objects SET vanished_at=0 WHERE job=$1 AND key = ANY($2::text[])",
                    job,
                    list(reappeared),
                )
            if changes:
                await c.execute(
                    "UPDATE objects o SET changed=TRUE, changed_etag=u.etag FROM "
                    "unnest($2::text[], $3::text[]) AS u(key, etag) "
                    "WHERE o.job=$1 AND o.key=u.key",
                    job,
                    [k for k, _ in changes],
                    [e for _, e in changes],
                )
            return gone

        return await self._tx(work)

    async def mark_vanished_under(self, prefix: str) -> int:
        hi = prefix_end(prefix)

        async def work(c: Any) -> int:
            return _rowcount(
                await c.execute(
                    "UPDATE objects SET vanished_at=$1 WHERE job=$2 AND key >= $3 "
                    "AND ($4::text IS NULL OR key < $4) AND vanished_at=0",
                    time.time(),
                    self.job,
                    prefix,
                    hi,
                )
            )

        return await self._tx(work)

    async def record_new_version(self, obj: ObjectInfo, item: Item) -> bool:
        job, run_id = self.job, self._run_id

        async def work(c: Any) -> bool:
            mine = bool(self._token) and role_for(item) in self._roles
            item_id = await c.fetchval(
                "INSERT INTO items(job, path, name, payload, keys, state, run_id, updated_at, "
                "media, readonly_endpoint, claim_holder, claim_token, claim_expires) "
                f"VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,CASE WHEN $13::float8 > 0 "
                f"THEN {_DB_NOW} + $13 ELSE 0 END) "
                "ON CONFLICT (job, path, name) DO NOTHING RETURNING id",
                job,
                item.path,
                item.name,
                codec.item_to_bytes(item),
                list(item.keys),
                _S[State.PLANNED],
                run_id,
                time.time(),
                str(item.media),
                item.readonly_endpoint,
                self._holder if mine else "",
                self._token if mine else 0,
                self._ttl() if mine else 0.0,
            )
            created = item_id is not None
            if item_id is None:
                item_id = await c.fetchval(
                    "SELECT id FROM items WHERE job=$1 AND path=$2 AND name=$3 "
                    "AND keys = $4::text[]",
                    job,
                    item.path,
                    item.name,
                    [obj.key],
                )
                if item_id is None:
                    await c.execute(
                        "UPDATE objects SET changed=TRUE, changed_etag=$1 WHERE job=$2 AND key=$3",
                        obj.etag,
                        job,
                        obj.key,
                    )
                    return False
            await c.execute(
                "UPDATE objects SET etag=$1, size=$2, last_modified=$3, item_id=$4, "
                "changed=FALSE, changed_etag='', vanished_at=0, state=$5 WHERE job=$6 AND key=$7",
                obj.etag,
                obj.size,
                obj.last_modified,
                item_id,
                _S[State.PLANNED],
                job,
                obj.key,
            )
            return created

        return await self._tx(work)

    async def item_key_count(self, key: str) -> int:
        n = await self._tx(
            lambda c: c.fetchval(
                "SELECT cardinality(i.keys) FROM objects o JOIN items i ON i.id = o.item_id "
                "WHERE o.job=$1 AND o.key=$2",
                self.job,
                key,
            )
        )
        return int(n) if n is not None else 0

    # --- leases ----------------------------------------------------------------------------------

    async def acquire_lease(
        self, holder: str, ttl_s: float, now: float, holder_dead: Callable[[str], bool]
    ) -> Lease | None:
        job = self.job

        async def work(c: Any) -> Lease | None:
            await c.execute(
                "INSERT INTO leases(job, holder, acquired_at, expires_at) VALUES ($1,'',0,0) "
                "ON CONFLICT (job) DO NOTHING",
                job,
            )
            row = await c.fetchrow(
                "SELECT holder, acquired_at, expires_at FROM leases WHERE job=$1 FOR UPDATE", job
            )
            if (
                row["holder"]
                and row["holder"] != holder
                and row["expires_at"] > now
                and not holder_dead(row["holder"])
            ):
                return Lease(row["holder"], row["acquired_at"], row["expires_at"])
            await c.execute(
                "UPDATE leases SET holder=$2, acquired_at=$3, expires_at=$4 WHERE job=$1",
                job,
                holder,
                now,
                now + ttl_s,
            )
            return None

        return await self._tx(work)

    async def renew_lease(self, holder: str, ttl_s: float, now: float) -> bool:
        async def work(c: Any) -> bool:
            status = await c.execute(
                "UPDATE leases SET expires_at=$1 WHERE job=$2 AND holder=$3",
                now + ttl_s,
                self.job,
                holder,
            )
            return _rowcount(status) == 1

        return await self._tx(work)

    async def release_lease(self, holder: str) -> None:
        async def work(c: Any) -> None:
            await c.execute("DELETE FROM leases WHERE job=$1 AND holder=$2", self.job, holder)

        await self._tx(work)

    # --- claims: several processes, one job ---------------------------------------------------

    async def join(self, holder: str, ttl_s: float, roles: frozenset[str] = ROLES) -> None:
        """A new fencing token (a sequence: never handed out twice) for this handle."""

        async def work(c: Any) -> int:
            return int(await c.fetchval("SELECT nextval('claim_tokens')"))

        self._token = await self._tx(work)
        self._holder, self._ttl_s, self._roles = holder, ttl_s, frozenset(roles)

    async def renew_claims(self) -> int:
        if not self._token:
            return 0
        job, token, ttl = self.job, self._token, self._ttl_s

        async def work(c: Any) -> int:
            # SKIP LOCKED: a row one of our writes holds right now is renewed next time
            # (two more before it can expire), never waited for (no deadlock with it).
            n = _rowcount(
                await c.execute(
                    f"UPDATE items SET claim_expires={_DB_NOW} + $3 WHERE id IN (SELECT id "
                    "FROM items WHERE claim_token=$2 AND job=$1 ORDER BY id "
                    "FOR UPDATE SKIP LOCKED)",
                    job,
                    token,
                    ttl,
                )
            )
            n += _rowcount(
                await c.execute(
                    f"UPDATE listing l SET claim_expires={_DB_NOW} + $3 FROM (SELECT shard_id "
                    "FROM listing WHERE job=$1 AND claim_token=$2 AND NOT done "
                    "FOR UPDATE SKIP LOCKED) s WHERE l.job=$1 AND l.shard_id=s.shard_id",
                    job,
                    token,
                    ttl,
                )
            )
            if self._run_id:
                await c.execute(
                    f"UPDATE runs SET alive_until={_DB_NOW} + $2 WHERE id=$1 AND status='running'",
                    self._run_id,
                    ttl,
                )
            return n

        return await self._tx(work)

    async def reap_claims(self, holder_dead: Callable[[str], bool]) -> int:
        job = self.job

        async def holders(c: Any) -> list[str]:
            rows = await c.fetch(
                "SELECT DISTINCT claim_holder FROM items WHERE claim_token <> 0 AND job=$1 "
                f"AND claim_expires >= {_DB_NOW} UNION SELECT DISTINCT claim_holder FROM "
                f"listing WHERE job=$1 AND claim_token <> 0 AND claim_expires >= {_DB_NOW} "
                "AND NOT done",
                job,
            )
            return [str(r[0]) for r in rows]

        dead = [h for h in await self._tx(holders) if h and h != self._holder and holder_dead(h)]
        if not dead:
            return 0

        async def expire(c: Any) -> int:
            n = _rowcount(
                await c.execute(
                    "UPDATE items SET claim_expires=0 WHERE job=$1 AND claim_token <> 0 "
                    "AND claim_holder = ANY($2::text[])",
                    job,
                    dead,
                )
            )
            return n + _rowcount(
                await c.execute(
                    "UPDATE listing SET claim_expires=0 WHERE job=$1 "
                    "AND claim_holder = ANY($2::text[])",
                    job,
                    dead,
                )
            )

        return await self._tx(expire)

    async def release_claims(self, idents: Sequence[Ident] | None = None) -> None:
        if not self._token:
            return
        job, token = self.job, self._token
        if idents is not None:
            wanted = list(dict.fromkeys(idents))

            async def some(c: Any) -> None:
                await c.execute(
                    f"UPDATE items i SET {_UNCLAIM} FROM unnest($3::text[], $4::text[]) AS "
                    "u(path, name) WHERE i.job=$1 AND i.path=u.path AND i.name=u.name "
                    "AND i.claim_token + 0 = $2",
                    job,
                    token,
                    [p for p, _ in wanted],
                    [n for _, n in wanted],
                )

            if wanted:
                await self._tx(some)
            return

        async def work(c: Any) -> None:
            await c.execute(
                f"UPDATE items SET {_UNCLAIM} WHERE claim_token=$2 AND job=$1", job, token
            )
            await c.execute(
                f"UPDATE listing SET {_UNCLAIM} WHERE job=$1 AND claim_token=$2", job, token
            )

        await self._tx(work)

    async def register_shards(self, shard_ids: Sequence[str]) -> None:
        ids = list(dict.fromkeys(shard_ids))
        if not ids:
            return

        async def work(c: Any) -> None:
            await c.execute(
                "INSERT INTO listing(job, shard_id) SELECT $1, u.id FROM unnest($2::text[]) "
                "AS u(id) ORDER BY u.id ON CONFLICT (job, shard_id) DO NOTHING",
                self.job,
                ids,
            )

        await self._tx(work)

    async def claim_shard(self) -> tuple[str, str] | None:
        if not self._token or "list" not in self._roles:
            return None

        async def work(c: Any) -> tuple[str, str] | None:
            row = await c.fetchrow(
                "UPDATE listing l SET claim_holder=$2, claim_token=$3, "
                f"claim_expires={_DB_NOW} + $4 "
                "FROM (SELECT shard_id FROM listing WHERE job=$1 AND NOT done "
                f"AND claim_expires < {_DB_NOW} AND claim_holder <> $2 ORDER BY shard_id "
                "LIMIT 1 FOR UPDATE SKIP LOCKED) s WHERE l.job=$1 AND l.shard_id=s.shard_id "
                "RETURNING l.shard_id, l.checkpoint",
                self.job,
                self._holder,
                self._token,
                self._ttl(),
            )
            return None if row is None else (str(row["shard_id"]), str(row["checkpoint"]))

        return await self._tx(work)

    async def outstanding(self) -> int:
        """1 while a shard is not listed to the end (its items are still to come, whoever
        lists it), or an item is pending that we may yet do (within our roles: a claim of a
        process that dies comes to us) or that another live process may (any role, while one
        runs); else 0. An item no live process has the role for is left to a later run, so a
        lister never waits forever for a sender that has gone. EXISTS, not counts: polled
        every second by every process, and only "none?" is asked."""
        if not self._token:
            return 0
        roles = self._roles

        async def work(c: Any) -> int:
            some = await c.fetchval(
                "WITH others AS (SELECT EXISTS (SELECT 1 FROM runs WHERE job=$1 "
                f"AND status='running' AND alive_until > {_DB_NOW} AND id <> $4) AS alive) "
                "SELECT EXISTS (SELECT 1 FROM items, others WHERE job=$1 "
                "AND state = ANY($2::text[]) AND claim_holder <> $3 AND (others.alive "
                "OR ($5 AND media <> '') OR ($6 AND media = ''))) "
                "OR EXISTS (SELECT 1 FROM listing WHERE job=$1 AND NOT done "
                "AND claim_holder <> $3)",
                self.job,
                _PENDING,
                self._holder,
                self._run_id,
                "media" in roles,
                "send" in roles,
            )
            return int(bool(some))

        return await self._tx(work)

    # --- reading ---------------------------------------------------------------------------------

    async def status(self, runs: int = 5) -> Status:
        job = self.job

        async def work(c: Any) -> Status:
            st = Status(job)
            st.objects_by_state = {
                r["s"]: int(r["n"])
                for r in await c.fetch(
                    "SELECT COALESCE(i.state, o.state) AS s, count(*) AS n FROM objects o "
                    "LEFT JOIN items i ON i.id = o.item_id WHERE o.job=$1 GROUP BY 1",
                    job,
                )
            }
            st.items_by_state = {
                r["state"]: int(r["n"])
                for r in await c.fetch(
                    "SELECT state, count(*) AS n FROM items WHERE job=$1 GROUP BY state", job
                )
            }
            st.failures_by_reason = [
                (f"{r['state']}: {r['reason']}", int(r["n"]))
                for r in await c.fetch(
                    "SELECT state, reason, count(*) AS n FROM items WHERE job=$1 "
                    "AND state = ANY($2::text[]) GROUP BY state, reason ORDER BY n DESC LIMIT 20",
                    job,
                    [_S[State.FAILED], _S[State.BLOCKED]],
                )
            ] + [
                (f"{State.SKIPPED}: {r['reason']}", int(r["n"]))
                for r in await c.fetch(
                    "SELECT reason, count(*) AS n FROM objects WHERE job=$1 AND state=$2 "
                    "GROUP BY reason ORDER BY n DESC LIMIT 20",
                    job,
                    _S[State.SKIPPED],
                )
            ]
            row = await c.fetchrow(
                "SELECT count(*) FILTER (WHERE changed AND vanished_at=0) AS changed, "
                "count(*) FILTER (WHERE vanished_at>0) AS vanished FROM objects WHERE job=$1",
                job,
            )
            st.changed_objects, st.vanished_objects = int(row["changed"]), int(row["vanished"])
            for r in await c.fetch(
                "SELECT id, kind, started_at, finished_at, status, counts FROM runs WHERE job=$1 "
                "ORDER BY id DESC LIMIT $2",
                job,
                runs,
            ):
                st.last_runs.append(
                    {
                        "id": int(r["id"]),
                        "kind": r["kind"],
                        "started_at": _iso(r["started_at"]),
                        "finished_at": _iso(r["finished_at"]) if r["finished_at"] else None,
                        "started_at_s": float(r["started_at"]),
                        "finished_at_s": float(r["finished_at"]) if r["finished_at"] else None,
                        "status": r["status"],
                        "counts": orjson.loads(r["counts"]) if r["counts"] else {},
                    }
                )
            return st

        return await self._tx(work)

    async def blocked_reasons(self) -> list[str]:
        async def work(c: Any) -> list[str]:
            rows = await c.fetch(
                "SELECT DISTINCT reason FROM items WHERE job=$1 AND state=$2 ORDER BY 1",
                self.job,
                _S[State.BLOCKED],
            )
            return [str(r["reason"]) for r in rows]

        return await self._tx(work)

    async def jobs(self) -> list[str]:
        async def work(c: Any) -> list[str]:
            rows = await c.fetch("SELECT job FROM jobs UNION SELECT job FROM runs ORDER BY 1")
            return [str(r["job"]) for r in rows]

        return await self._tx(work)

    async def report_rows(self) -> AsyncGenerator[ReportRow, None]:
        job = self.job
        first, last = True, ""
        while True:

            async def chunk(c: Any, first: bool = first, last: str = last) -> list[ReportRow]:
                rows = await c.fetch(
                    "SELECT o.key, COALESCE(i.state, o.state), COALESCE(i.path,''), "
                    "COALESCE(i.name,''), COALESCE(i.v7_id,''), CASE WHEN o.item_id IS NULL "
                    "THEN o.reason ELSE COALESCE(i.reason,'') END, o.etag, o.size, "
                    "CASE WHEN o.vanished_at>0 THEN 'vanished' WHEN o.changed AND "
                    "o.changed_etag<>'' THEN 'changed (etag ' || o.changed_etag || ')' "
                    "WHEN o.changed THEN 'changed' ELSE '' END, o.item_id FROM objects o "
                    "LEFT JOIN items i ON i.id = o.item_id WHERE o.job=$1 AND o.key >= $2 "
                    "AND ($3 OR o.key > $2) ORDER BY o.key LIMIT $4",
                    job,
                    last,
                    first,
                    CHUNK,
                )
                converted = await _converted(c, {r[9] for r in rows if r[9] is not None})
                return [
                    ReportRow(
                        *(r[0], r[1], r[2], r[3], r[4], r[5], r[6], int(r[7]), r[8]),
                        converted=converted.get(r[0], ""),
                    )
                    for r in rows
                ]

            rows = await self._tx(chunk)
            if not rows:
                return
            for r in rows:
                yield r
            first, last = False, rows[-1].key

    # --- manifests -------------------------------------------------------------------------------

    async def stage_manifest(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """(item_name, slot_name, key, path) rows, COPYed in chunks; ``rows`` is read in a
        thread (it may read a file)."""
        job = self.job
        it = iter(rows)
        await self._tx(lambda c: c.execute("DELETE FROM manifest WHERE job=$1", job))
        n = 0

        def read() -> list[tuple[str, str, str, str]]:
            return list(itertools.islice(it, CHUNK * 10))

        while True:
            part = await asyncio.to_thread(read)
            if not part:
                return n
            records = [(job, a, b, k, p, n + i) for i, (a, b, k, p) in enumerate(part)]
            n += len(part)

            async def copy(c: Any, records: list[tuple[Any, ...]] = records) -> None:
                await c.copy_records_to_table(
                    "manifest",
                    records=records,
                    columns=["job", "item_name", "slot_name", "key", "path", "seq"],
                )

            await self._tx(copy)

    async def manifest_items(self) -> AsyncGenerator[ManifestItem, None]:
        job = self.job
        current: tuple[str, str] | None = None
        slots: list[tuple[str, str]] = []
        last: tuple[str, str, int] = ("", "", -1)
        while True:

            async def chunk(c: Any, last: tuple[str, str, int] = last) -> list[Any]:
                return list(
                    await c.fetch(
                        "SELECT path, item_name, seq, slot_name, key FROM manifest WHERE job=$1 "
                        "AND (path, item_name, seq) > ($2, $3, $4) "
                        "ORDER BY path, item_name, seq LIMIT $5",
                        job,
                        *last,
                        CHUNK,
                    )
                )

            rows = await self._tx(chunk)
            if not rows:
                break
            for r in rows:
                path, item_name = r["path"], r["item_name"]
                if current != (path, item_name):
                    if current is not None:
                        yield ManifestItem(current[1], current[0], tuple(slots))
                    current, slots = (path, item_name), []
                slots.append((r["slot_name"], r["key"]))
                last = (path, item_name, int(r["seq"]))
        if current is not None:
            yield ManifestItem(current[1], current[0], tuple(slots))

    async def in_manifest(self, keys: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return set()
        rows = await self._tx(
            lambda c: c.fetch(
                "SELECT DISTINCT key FROM manifest WHERE job=$1 AND key = ANY($2::text[])",
                self.job,
                wanted,
            )
        )
        return {r["key"] for r in rows}

    async def object_infos(self, keys: Sequence[str]) -> dict[str, ObjectInfo]:
        wanted = list(dict.fromkeys(keys))
        if not wanted:
            return {}
        rows = await self._tx(
            lambda c: c.fetch(
                "SELECT key, etag, size, last_modified FROM objects WHERE job=$1 "
                "AND key = ANY($2::text[])",
                self.job,
                wanted,
            )
        )
        return {
            r["key"]: ObjectInfo(r["key"], int(r["size"]), r["etag"], r["last_modified"])
            for r in rows
        }

    # --- operations ------------------------------------------------------------------------------

    async def prune(self, state: State, before: float) -> int:
        """Delete this job's items in ``state`` last updated before ``before`` (epoch s), in
        chunks of ``PRUNE_CHUNK`` (each its own short transaction, deleted on the server:
        no id comes back to us); returns how many went. ``SKIPPED``: the skipped objects
        (they have no time: ``before`` does not apply).

        Their objects stay as tombstones (state kept, item link dropped): status still counts
        them, and a later run does not plan them again (so never re-sends what V7 holds).
        Refused (``LeaseHeld``) while a process holds the job: the lease, or live claims."""
        job = self.job
        await self._tx(self._refuse_if_running)
        if state is State.SKIPPED:
            sql = (
                "WITH d AS (DELETE FROM objects WHERE job=$1 AND key IN (SELECT key FROM "
                "objects WHERE job=$1 AND state=$2 AND item_id IS NULL AND $3::float8 = $3 "
                "LIMIT $4) RETURNING 1) SELECT count(*) FROM d"
            )
        else:
            sql = (
                "WITH d AS (DELETE FROM items WHERE id IN (SELECT id FROM items WHERE "
                "job=$1 AND state=$2 AND updated_at < $3 ORDER BY id LIMIT $4) RETURNING id), "
                "t AS (UPDATE objects o SET item_id=NULL, state=$2 FROM d "
                "WHERE o.job=$1 AND o.item_id=d.id) SELECT count(*) FROM d"
            )

        async def chunk(c: Any) -> int:
            return int(await c.fetchval(sql, job, str(state), before, PRUNE_CHUNK))

        n = 0
        while True:
            got = await self._tx(chunk, single=True)
            n += got
            if got < PRUNE_CHUNK:
                return n

    async def _refuse_if_running(self, c: Any) -> None:
        row = await c.fetchrow(
            # The job lease is written with the holder's clock (the port's ``now``).
            "SELECT (SELECT holder FROM leases WHERE job=$1 AND holder <> '' "
            "AND expires_at > $2) AS lease, (SELECT claim_holder FROM items "
            f"WHERE job=$1 AND claim_token <> 0 AND claim_expires > {_DB_NOW} LIMIT 1) AS item, "
            "(SELECT claim_holder FROM listing WHERE job=$1 AND claim_token <> 0 "
            f"AND claim_expires > {_DB_NOW} LIMIT 1) AS shard",
            self.job,
            time.time(),
        )
        holder = row["lease"] or row["item"] or row["shard"]
        if holder:
            raise LeaseHeld(
                f"job {self.job!r} is running ({holder}): prune it once no process works on it"
            )


async def _tombstones(c: Any, job: str, keys: list[str]) -> set[str]:
    """The keys whose item was pruned (``prune`` keeps the object, state and all, unlinked)."""
    rows = await c.fetch(
        "SELECT key FROM objects WHERE job=$1 AND key = ANY($2::text[]) AND item_id IS NULL "
        "AND state <> ALL($3::text[])",
        job,
        keys,
        [_S[State.DISCOVERED], _S[State.SKIPPED]],
    )
    return {r["key"] for r in rows}


async def _converted(c: Any, item_ids: set[int]) -> dict[str, str]:
    """Provider key -> what it was converted into, for the items of a report chunk that hold
    converted DICOM (each such item decoded once, however many slices it has)."""
    if not item_ids:
        return {}
    out: dict[str, str] = {}
    for r in await c.fetch(
        "SELECT payload FROM items WHERE id = ANY($1::bigint[]) AND position($2 in payload) > 0",
        sorted(item_ids),
        codec.CONVERTED_MARK,
    ):
        with contextlib.suppress(codec.CodecError):
            out.update(codec.converted_by_key(codec.item_from_bytes(bytes(r["payload"]))))
    return out


async def _upsert_objects(c: Any, job: str, objs: Sequence[ObjectInfo]) -> None:
    """New objects are inserted DISCOVERED; a known one keeps its row and a new ETag is
    flagged; one never planned (held by a stopped run's planner) takes the new version."""
    await c.execute(
        "INSERT INTO objects(job, key, etag, size, last_modified, state) "
        "SELECT $1, u.key, u.etag, u.size, u.lm, $2 FROM "
        "unnest($3::text[], $4::text[], $5::bigint[], $6::text[]) AS u(key, etag, size, lm) "
        "ON CONFLICT (job, key) DO UPDATE SET "
        "changed = objects.state <> excluded.state AND (objects.changed OR "
        "(objects.etag <> excluded.etag AND objects.etag <> '')), "
        "etag = CASE WHEN objects.state = excluded.state THEN excluded.etag ELSE objects.etag END, "
        "size = CASE WHEN objects.state = excluded.state THEN excluded.size ELSE objects.size END, "
        "last_modified = CASE WHEN objects.state = excluded.state THEN excluded.last_modified "
        "ELSE objects.last_modified END",
        job,
        _S[State.DISCOVERED],
        [o.key for o in objs],
        [o.etag for o in objs],
        [o.size for o in objs],
        [o.last_modified for o in objs],
    )


async def _recorded_items(
    c: Any, job: str, idents: Sequence[Ident]
) -> dict[Ident, tuple[int, tuple[str, ...]]]:
    wanted = list(dict.fromkeys(idents))
    rows = await c.fetch(
        "SELECT i.path, i.name, i.id, i.keys FROM unnest($2::text[], $3::text[]) AS "
        "u(path, name) JOIN items i ON i.job=$1 AND i.path=u.path AND i.name=u.name",
        job,
        [p for p, _ in wanted],
        [n for _, n in wanted],
    )
    return {(r["path"], r["name"]): (int(r["id"]), tuple(r["keys"])) for r in rows}


if TYPE_CHECKING:  # mypy proves the backend implements the whole port

    def _implements_port(ledger: PostgresLedger) -> LedgerPort:
        return ledger
