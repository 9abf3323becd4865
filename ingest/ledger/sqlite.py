"""The SQLite ledger: one file, WAL, batched transactions, on a thread of its own.

Threading: every ledger owns one thread that opens the connection and runs every statement;
the coroutines of ``SqliteLedger`` queue closures for it and await them, so the event loop
never waits on SQLite (a commit's fsync, a lock, a big page). Calls that queue up while the
thread is busy run in one transaction (group commit: each call in a savepoint, all committed
before any is answered), so 16 senders marking batches SENT cost one commit, not 16.

Durability: WAL with ``synchronous=NORMAL`` — a committed transaction survives the process being
killed (our threat model: kill -9, OOM, pod eviction); only an OS crash or power loss may lose
the last transactions, after which a re-run re-sends them and V7 answers ALREADY_EXISTS, which
the registrar counts as success for items sent before.

Every read that could return many rows is chunked with keyset pagination (``WHERE id > ?
LIMIT``): memory never grows with the number of objects, and rows updated while a stream is
open are never seen twice.

Schema 5 stores items in the ledger's own format (``codec``; schema 6 adds ``id_lookups``);
rows of schema <= 4 hold V7's
wire JSON and are decoded when read (the migration only adds columns: it stays O(1)). An
older engine refuses a schema-5 or -6 file (it refuses any newer ``user_version``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import orjson

from ingest.errors import LeaseHeld, LedgerBusy, LedgerError
from ingest.ledger import codec
from ingest.ledger.port import (
    ROLES,
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
)
from ingest.model import Facts, Item, Media, ObjectInfo, Outcome, Skip, State

T = TypeVar("T")

SCHEMA_VERSION = 6
# An item whose id the items listing did not show this many times is not looked up again.
MAX_ID_LOOKUPS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    path TEXT NOT NULL,
    name TEXT NOT NULL,
    payload BLOB NOT NULL,
    keys BLOB NOT NULL,
    state TEXT NOT NULL,
    v7_id TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    run_id INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL,
    media TEXT NOT NULL DEFAULT '',
    readonly_endpoint INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    final INTEGER NOT NULL DEFAULT 0,
    id_lookups INTEGER NOT NULL DEFAULT 0,  -- items listing searched without finding the id
    UNIQUE (job, path, name)
);
CREATE INDEX IF NOT EXISTS items_pending ON items (job, state, id);
CREATE TABLE IF NOT EXISTS objects (
    job TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL DEFAULT '',
    size INTEGER NOT NULL DEFAULT 0,
    last_modified TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    item_id INTEGER,
    reason TEXT NOT NULL DEFAULT '',
    changed INTEGER NOT NULL DEFAULT 0,
    changed_etag TEXT NOT NULL DEFAULT '',
    vanished_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (job, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS listing (
    job TEXT NOT NULL,
    shard_id TEXT NOT NULL,
    checkpoint TEXT NOT NULL DEFAULT '',
    done INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job, shard_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    job TEXT PRIMARY KEY,
    listing_complete INTEGER NOT NULL DEFAULT 1
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media_cache (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    etag TEXT NOT NULL,
    kind TEXT NOT NULL,
    result BLOB NOT NULL,
    PRIMARY KEY (bucket, key, etag, kind)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (
    job TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    acquired_at REAL NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    job TEXT NOT NULL,
    kind TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    status TEXT NOT NULL,
    counts BLOB
);
CREATE TABLE IF NOT EXISTS manifest (
    job TEXT, item_name TEXT, slot_name TEXT, key TEXT, path TEXT, seq INTEGER
);
CREATE INDEX IF NOT EXISTS manifest_item ON manifest (job, path, item_name, seq);
CREATE INDEX IF NOT EXISTS manifest_key ON manifest (job, key)
"""
_SCHEMA_STATEMENTS = tuple(s.strip() for s in _SCHEMA.split(";") if s.strip())
_TABLES = frozenset(
    ("items", "objects", "listing", "jobs", "media_cache", "leases", "runs", "manifest")
)
# Columns every schema since 1 has: a file without them is not a ledger.
_BASE_COLUMNS = {
    "items": {"id", "job", "path", "name", "payload", "keys", "state", "attempts"},
    "objects": {"job", "key", "etag", "size", "state", "item_id"},
}

# (table, column, declaration) added to the schema after version 1, oldest first.
_ADDED_COLUMNS = (
    ("items", "media", "TEXT NOT NULL DEFAULT ''"),
    ("items", "readonly_endpoint", "INTEGER NOT NULL DEFAULT 0"),
    ("objects", "changed_etag", "TEXT NOT NULL DEFAULT ''"),
    ("objects", "vanished_at", "REAL NOT NULL DEFAULT 0"),
    ("items", "failures", "INTEGER NOT NULL DEFAULT 0"),
    ("items", "final", "INTEGER NOT NULL DEFAULT 0"),
    ("items", "id_lookups", "INTEGER NOT NULL DEFAULT 0"),
)

CHUNK = 1000  # rows per read of a stream
# Rows per multi-row INSERT / UPDATE ... FROM (VALUES ...) and keys per IN (...): well under
# SQLite's bound-variable limit (32766 since 3.32) at 10 columns, and large enough to amortise
# the statement.
_ROWS_PER_INSERT = 500
BUSY_TIMEOUT_S = 10.0

_PENDING = (State.PLANNED, State.PROCESSING, State.SENT)


def prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix`` (None: none).

    Python and SQLite (BINARY on UTF-8) both order strings by code point, so this bound is
    the same for both."""
    p = prefix.rstrip(chr(0x10FFFF))
    if not p:
        return None
    nxt = ord(p[-1]) + 1
    if 0xD800 <= nxt <= 0xDFFF:  # surrogates cannot be encoded: next real code point
        nxt = 0xE000
    return p[:-1] + chr(nxt)


PRUNE_CHUNK = 5000  # items (or skipped objects) deleted per transaction by prune


def _chunks(seq: Sequence[T], n: int = _ROWS_PER_INSERT) -> Iterator[Sequence[T]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _values(n: int, width: int) -> str:
    row = "(" + ",".join("?" * width) + ")"
    return ",".join([row] * n)


def _keys_blob(keys: Iterable[str]) -> bytes:
    """``items.keys``: the provider keys in slot order (the same JSON list schema 1 wrote)."""
    return orjson.dumps(list(keys))


def _blob(v: bytes | str) -> bytes:
    """A BLOB column's bytes (a hand-made or very old row may hold TEXT)."""
    return v.encode() if isinstance(v, str) else bytes(v)


def _final(o: Outcome) -> int:
    """1 for a failure that sending the same item again cannot fix (V7 rejected it)."""
    return int(o.state is State.FAILED and not o.retryable)


_KNOWN_COLUMNS = "key, etag, changed_etag, vanished_at, state"


def _known(row: Sequence[Any]) -> Known:
    """A Known from a row of ``_KNOWN_COLUMNS``."""
    key, etag, changed_etag, vanished_at, state = row
    return Known(key, etag, changed_etag, bool(vanished_at), state == State.DISCOVERED)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@contextlib.contextmanager
def _tx(db: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection; inside a
    group commit (a transaction already open) a SAVEPOINT, so one call's error undoes only
    its own writes."""
    if db.in_transaction:
        db.execute("SAVEPOINT call")
        try:
            yield
        except BaseException:
            if db.in_transaction:  # an error such as a full disk may have ended it already
                db.execute("ROLLBACK TO call")
                db.execute("RELEASE call")
            raise
        db.execute("RELEASE call")
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


@dataclasses.dataclass(frozen=True, slots=True)
class _Call:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    fut: asyncio.Future[Any]
    alone: bool = False  # open / close: never grouped


def _deliver(answers: list[tuple[_Call, Any, BaseException | None]]) -> None:
    for call, value, exc in answers:
        if call.fut.done():  # the caller was cancelled meanwhile
            continue
        if exc is None:
            call.fut.set_result(value)
        else:
            call.fut.set_exception(exc)


# Calls queued while the thread was busy run in one transaction (group commit), at most this
# many: 16 senders each marking a batch SENT commit once, not 16 times.
GROUP_MAX_CALLS = 64


def _error(path: str, exc: sqlite3.Error, busy_timeout_s: float) -> LedgerError:
    """One line naming the file and the fix, for any sqlite3 exception."""
    msg = str(exc)
    low = msg.lower()
    if "locked" in low or "busy" in low:
        return LedgerBusy(
            f"ledger {path} stayed locked by another process for more than "
            f"{busy_timeout_s:g}s ({msg}): try again once it has finished"
        )
    if "not a database" in low or "encrypted" in low:
        return LedgerError(
            f"{path} is not an ingest ledger (file is not a database): point the ledger "
            "at another file, or move this one away"
        )
    if "readonly" in low or "read-only" in low:
        return LedgerError(
            f"ledger {path} is not writable ({msg}): fix the permissions of the file and "
            "its directory, or use another path"
        )
    if "unable to open" in low:
        return LedgerError(
            f"cannot open ledger {path} ({msg}): check that the path is a file in a "
            "writable directory"
        )
    if "full" in low:
        return LedgerError(f"ledger {path}: the disk is full ({msg}): free some space")
    if "malformed" in low or "corrupt" in low:
        return LedgerError(
            f"ledger {path} is corrupt ({msg}): restore it from a backup or start a new one"
        )
    return LedgerError(f"ledger {path}: {msg}")


class SqliteLedger:
    """One SQLite file; one job (a dataset + storage + bucket + prefix) per object.

    Create with ``await SqliteLedger.open(path, job)`` (or ``ingest.ledger.open_ledger``);
    ":memory:" is a scratch ledger that lives as long as the object."""

    cooperative = False  # one process per job: the job lease, no claims

    def __init__(self, path: str, job: str, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = path
        self.job = job
        self._busy_timeout_s = busy_timeout_s
        self._run_id = 0
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="ledger", daemon=True)
        self._thread.start()
        self._db: sqlite3.Connection | None = None  # touched by the ledger's thread only
        self._closed = False

    @classmethod
    async def open(
        cls, path: str | os.PathLike[str], job: str, *, busy_timeout_s: float = BUSY_TIMEOUT_S
    ) -> SqliteLedger:
        lg = cls(os.fspath(path), job, busy_timeout_s)
        try:
            await lg._submit(lambda _db: lg._open(), alone=True)
        except BaseException:
            lg._closed = True
            lg._calls.put(None)
            raise
        return lg

    async def __aenter__(self) -> SqliteLedger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True

        def close(db: sqlite3.Connection) -> None:
            db.close()
            self._db = None

        try:
            await self._submit(close, alone=True)
        finally:
            self._calls.put(None)  # the thread ends

    # --- the ledger thread --------------------------------------------------------------------

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise LedgerError(f"ledger {self.path} is closed")
        return await self._submit(fn)

    async def _submit(self, fn: Callable[[sqlite3.Connection], T], *, alone: bool = False) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put(_Call(fn, loop, fut, alone))
        return await fut

    def _serve(self) -> None:
        """The ledger's thread: runs calls in order; calls that queued up meanwhile share one
        transaction (each in a savepoint), committed before any of them is answered."""
        stop = False
        while not stop:
            first = self._calls.get()
            if first is None:
                return
            group = [first]
            while not first.alone and len(group) < GROUP_MAX_CALLS:
                try:
                    nxt = self._calls.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if nxt.alone:  # open / close run on their own, after this group
                    self._answer(self._execute(group))
                    group = [nxt]
                    break
                group.append(nxt)
            self._answer(self._execute(group))

    def _execute(self, group: list[_Call]) -> list[tuple[_Call, Any, BaseException | None]]:
        db = self._db
        if len(group) == 1 or db is None:
            return [self._one(c) for c in group]
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = _error(self.path, exc, self._busy_timeout_s)
            return [(c, None, err) for c in group]
        done: list[tuple[_Call, Any, BaseException | None]] = []
        for n, call in enumerate(group):
            result = self._one(call)
            if not db.in_transaction:
                # The error rolled the whole group back (a full disk, an I/O error): the calls
                # before it lost their writes too, so they get its error; the rest run alone.
                lost_err: BaseException = result[2] or LedgerError(
                    f"ledger {self.path}: the transaction was lost"
                )
                lost = [(c, None, lost_err) for c, _v, _e in done] + [(call, None, lost_err)]
                return lost + [self._one(c) for c in group[n + 1 :]]
            done.append(result)
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            err = _error(self.path, exc, self._busy_timeout_s)
            return [(c, None, err) for c in group]
        return done

    def _one(self, call: _Call) -> tuple[_Call, Any, BaseException | None]:
        try:
            return call, self._guarded(call.fn), None
        except BaseException as exc:  # delivered to the caller, never lost in the thread
            return call, None, exc

    @staticmethod
    def _answer(done: list[tuple[_Call, Any, BaseException | None]]) -> None:
        """One wake-up of the event loop per group, not one per call."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Call, Any, BaseException | None]]]
        by_loop = {}
        for d in done:
            by_loop.setdefault(d[0].loop, []).append(d)
        for loop, answers in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_deliver, answers)

    def _guarded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            return fn(db)  # type: ignore[arg-type]  # only _open runs before the connection
        grouped = db.in_transaction
        try:
            return fn(db)
        except sqlite3.Error as exc:
            if not grouped:
                with contextlib.suppress(sqlite3.Error):
                    if db.in_transaction:
                        db.execute("ROLLBACK")
            raise _error(self.path, exc, self._busy_timeout_s) from None

    def _open(self) -> None:
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise LedgerError(f"ledger {p} is a directory: point the ledger at a file")
            if not p.parent.exists():
                try:
                    p.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise LedgerError(
                        f"cannot create the directory of ledger {p} ({exc.strerror}): create "
                        "it or use another path"
                    ) from None
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _error(self.path, exc, self._busy_timeout_s) from None
        try:
            db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._check(db)  # before WAL: never convert another application's file
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # temp_store stays FILE (the default): the GROUP BY of status() sorts every object,
            # and an in-memory temp store made that sort O(objects) in RAM (+50 MB at 1M
            # objects); on FILE, SQLite spills big sorts to a temp file and memory stays flat.
            db.execute("PRAGMA temp_store=FILE")
            self._migrate(db)
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise _error(self.path, exc, self._busy_timeout_s) from None
            raise
        self._db = db

    def _check(self, db: sqlite3.Connection) -> None:
        """Refuse a file that is not ours, or that a newer engine wrote."""
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger {self.path} was written by a newer version of ingest (schema "
                f"{version}, this one reads up to {SCHEMA_VERSION}): upgrade ingest"
            )
        tables = {
            r[0]
            for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
            if not r[0].startswith("sqlite_")
        }
        foreign = tables - _TABLES
        missing = [t for t in _BASE_COLUMNS if t not in tables]
        if (version == 0 and foreign) or (version > 0 and missing):
            raise LedgerError(
                f"{self.path} is an SQLite database of another application, not an ingest "
                "ledger: point the ledger at another file"
            )
        for table, columns in _BASE_COLUMNS.items():
            if table in tables:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if not columns <= have:
                    raise LedgerError(
                        f"{self.path} is an SQLite database of another application (its "
                        f"'{table}' table is not a ledger's), not an ingest ledger: point the "
                        "ledger at another file"
                    )

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Create the schema, or bring a schema 1..5 file to 6: one transaction, and every
        step only if still needed (two processes opening an old ledger at once, or an old
        engine's migration killed half-way, must not leave a ledger that no longer opens)."""
        if int(db.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
            return
        with _tx(db):
            if int(db.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
                return  # migrated meanwhile
            for stmt in _SCHEMA_STATEMENTS:  # IF NOT EXISTS: only what is missing
                db.execute(stmt)
            for table, column, decl in _ADDED_COLUMNS:
                have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    # --- runs and listing checkpoints -------------------------------------------------------

    async def start_run(self, kind: str, *, listing: bool = True) -> RunInfo:
        """Record a run. Only a run that lists the bucket touches the listing checkpoints:
        an event pass or a retry must not wipe the checkpoints of an interrupted sync."""
        job = self.job

        def work(db: sqlite3.Connection) -> RunInfo:
            now = time.time()
            resume = False
            with _tx(db):
                db.execute(
                    "UPDATE runs SET status='interrupted', finished_at=? "
                    "WHERE job=? AND status='running'",
                    (now, job),
                )
                if listing:
                    row = db.execute(
                        "SELECT listing_complete FROM jobs WHERE job=?", (job,)
                    ).fetchone()
                    resume = row is not None and not row[0]
                    if not resume:
                        db.execute("DELETE FROM listing WHERE job=?", (job,))
                    db.execute(
                        "INSERT INTO jobs(job, listing_complete) VALUES (?, 0) "
                        "ON CONFLICT(job) DO UPDATE SET listing_complete=0",
                        (job,),
                    )
                cur = db.execute(
                    "INSERT INTO runs(job, kind, started_at, status) VALUES (?,?,?,'running')",
                    (job, kind, now),
                )
            return RunInfo(int(cur.lastrowid or 0), resume)

        info = await self._run(work)
        self._run_id = info.run_id
        return info

    async def finish_run(self, run_id: int, status: str, counts: dict[str, int]) -> None:
        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute(
                    "UPDATE runs SET status=?, finished_at=?, counts=? WHERE id=?",
                    (status, time.time(), orjson.dumps(counts), run_id),
                )

        await self._run(work)

    async def mark_listing_complete(self) -> list[str]:
        job = self.job

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute("UPDATE jobs SET listing_complete=1 WHERE job=?", (job,))
                db.execute("DELETE FROM listing WHERE job=?", (job,))

        await self._run(work)
        return []  # one process lists the whole job: it knows its shards

    async def checkpoints(self) -> dict[str, tuple[str, bool]]:
        def work(db: sqlite3.Connection) -> dict[str, tuple[str, bool]]:
            rows = db.execute(
                "SELECT shard_id, checkpoint, done FROM listing WHERE job=?", (self.job,)
            )
            return {sid: (cp, bool(done)) for sid, cp, done in rows}

        return await self._run(work)

    # --- listing → items ----------------------------------------------------------------------

    async def record_page(
        self,
        shard_id: str,
        checkpoint: str,
        shard_done: bool,
        objects: Sequence[ObjectInfo],
        plans: Sequence[Item | Skip],
        collision: CollisionPolicy,
    ) -> list[Item]:
        """Store one listed page and its plans in ONE transaction; return the items new to the
        ledger (an item already known, in any state, is either done or recovered elsewhere).

        ``checkpoint`` "" keeps the stored one (the planner still holds part of a folder)."""
        job, run_id = self.job, self._run_id

        def work(db: sqlite3.Connection) -> list[Item]:
            now = time.time()
            items = [p for p in plans if isinstance(p, Item)]
            if items:  # an object pruned before (a tombstone) is not planned again
                gone = _tombstones(db, job, [k for it in items for k in it.keys])
                items = [it for it in items if not gone.intersection(it.keys)]
            skips = [(p.reason, job, p.obj.key) for p in plans if isinstance(p, Skip)]
            new: list[Item] = []
            links: list[tuple[int, str, str]] = []
            with _tx(db):
                # Objects: insert new ones; an existing one keeps its row, a new ETag is
                # flagged; one never planned (held by a stopped run's planner) just takes the
                # new version. (excluded.state is DISCOVERED: what a new row gets.)
                db.executemany(
                    "INSERT INTO objects(job, key, etag, size, last_modified, state) "
                    "VALUES (?,?,?,?,?,?) ON CONFLICT(job, key) DO UPDATE SET "
                    "changed = objects.state != excluded.state AND (changed OR "
                    "(objects.etag != excluded.etag AND objects.etag != '')), "
                    "etag = iif(objects.state = excluded.state, excluded.etag, objects.etag), "
                    "size = iif(objects.state = excluded.state, excluded.size, objects.size), "
                    "last_modified = iif(objects.state = excluded.state, "
                    "excluded.last_modified, objects.last_modified)",
                    [
                        (job, o.key, o.etag, o.size, o.last_modified, State.DISCOVERED)
                        for o in objects
                    ],
                )
                # Items: multi-row INSERT ... RETURNING (one statement per chunk, not one per
                # item); the first plan of a (path, name) that got inserted is new, any other
                # is known.
                inserted: dict[Ident, int] = {}
                for chunk in _chunks(items):
                    args: list[Any] = []
                    for it in chunk:
                        args += (
                            job,
                            it.path,
                            it.name,
                            codec.item_to_bytes(it),
                            _keys_blob(it.keys),
                            State.PLANNED,
                            run_id,
                            now,
                            str(it.media),
                            int(it.readonly_endpoint),
                        )
                    rows = db.execute(
                        "INSERT INTO items(job, path, name, payload, keys, state, run_id, "
                        f"updated_at, media, readonly_endpoint) VALUES {_values(len(chunk), 10)}"
                        " ON CONFLICT(job, path, name) DO NOTHING RETURNING id, path, name",
                        args,
                    ).fetchall()
                    inserted.update(((path, name), item_id) for item_id, path, name in rows)
                known: list[Item] = []
                for it in items:
                    item_id = inserted.pop(it.ident, None)
                    if item_id is None:
                        known.append(it)
                    else:
                        new.append(it)
                        links += ((item_id, job, k) for k in it.keys)
                if known:
                    recorded = _recorded_items(db, job, [it.ident for it in known])
                    for it in known:
                        item_id, recorded_keys = recorded[it.ident]
                        mine = set(recorded_keys)
                        if any(k not in mine for k in it.keys):
                            # Another object planned to the same (path, name): the policy says
                            # why it is not sent instead of showing it in someone else's item.
                            skips += (
                                (s.reason, job, s.obj.key) for s in collision(it, recorded_keys)
                            )
                        links += ((item_id, job, k) for k in it.keys if k in mine)
                db.executemany(
                    "UPDATE objects SET state=?, item_id=? "
                    "WHERE job=? AND key=? AND item_id IS NULL",
                    [(State.PLANNED, *link) for link in links],
                )
                if skips:
                    db.executemany(
                        "UPDATE objects SET state=?, reason=? WHERE job=? AND key=? "
                        "AND item_id IS NULL",
                        [(State.SKIPPED, *skip) for skip in skips],
                    )
                if checkpoint or shard_done:
                    db.execute(
                        "INSERT INTO listing(job, shard_id, checkpoint, done) VALUES (?,?,?,?) "
                        "ON CONFLICT(job, shard_id) DO UPDATE SET "
                        "checkpoint = CASE WHEN excluded.checkpoint != '' "
                        "THEN excluded.checkpoint ELSE listing.checkpoint END, "
                        "done = excluded.done",
                        (job, shard_id, checkpoint, int(shard_done)),
                    )
            return new

        return await self._run(work)

    async def add_failed_item(self, item: Item, reason: str) -> bool:
        """An item that can never be sent (e.g. a manifest key missing from the bucket); its
        listed objects point at it so a report shows why. True when it is new."""
        job, run_id = self.job, self._run_id

        def work(db: sqlite3.Connection) -> bool:
            with _tx(db):
                cur = db.execute(
                    "INSERT INTO items(job, path, name, payload, keys, state, reason, run_id, "
                    "updated_at, media, readonly_endpoint, final) VALUES (?,?,?,?,?,?,?,?,?,?,?,1) "
                    "ON CONFLICT(job, path, name) DO NOTHING",
                    (
                        job,
                        item.path,
                        item.name,
                        codec.item_to_bytes(item),
                        _keys_blob(item.keys),
                        State.FAILED,
                        reason,
                        run_id,
                        time.time(),
                        str(item.media),
                        int(item.readonly_endpoint),
                    ),
                )
                if cur.rowcount != 1:
                    return False
                db.executemany(
                    "UPDATE objects SET state=?, item_id=? "
                    "WHERE job=? AND key=? AND item_id IS NULL",
                    [(State.PLANNED, cur.lastrowid, job, k) for k in item.keys],
                )
            return True

        return await self._run(work)

    async def pending(self) -> AsyncGenerator[Pending, None]:
        """Items left PLANNED, PROCESSING or SENT (crash recovery), oldest first. Only items
        that existed when the stream started are returned, so items planned meanwhile are not
        seen twice. An item whose media work was not finished comes back with ``media`` set."""
        top = await self._run(
            lambda db: int(db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])
        )
        last = 0
        while True:
            chunk, last = await self._run(functools.partial(self._pending_chunk, last, top))
            if not chunk:
                return
            for p in chunk:
                yield p

    def _pending_chunk(
        self, last: int, top: int, db: sqlite3.Connection
    ) -> tuple[list[Pending], int]:
        rows = db.execute(
            "SELECT id, path, name, payload, keys, attempts, media, readonly_endpoint "
            "FROM items WHERE job=? AND state IN (?,?,?) AND id > ? AND id <= ? "
            "ORDER BY id LIMIT ?",
            (self.job, *_PENDING, last, top, CHUNK),
        ).fetchall()
        if not rows:
            return [], last
        rows = [(r[0], r[1], r[2], _blob(r[3]), _blob(r[4]), *r[5:]) for r in rows]
        legacy = [k for r in rows if not codec.is_current(r[3]) for k in codec.legacy_keys(r[4])]
        infos = _object_infos(db, self.job, legacy) if legacy else {}
        out = [
            Pending(self._decode(path, name, payload, keys, media, bool(ro), infos), attempts)
            for _id, path, name, payload, keys, attempts, media, ro in rows
        ]
        return out, int(rows[-1][0])

    def _decode(
        self,
        path: str,
        name: str,
        payload: bytes,
        keys: bytes,
        media: str,
        readonly: bool,
        infos: dict[str, ObjectInfo],
    ) -> Item:
        try:
            if not codec.is_current(payload):
                return codec.item_from_legacy(path, name, payload, keys, media, readonly, infos)
            item = codec.item_from_bytes(payload)
        except codec.CodecError as exc:
            raise LedgerError(
                f"ledger {self.path}: item '{path.rstrip('/')}/{name}' cannot be read ({exc})"
            ) from None
        return codec.with_columns(item, path, name, media, readonly)

    # --- media (thumbnails, local video processing) ------------------------------------------

    async def mark_processing(self, item: Item) -> None:
        """The item's media work started (committed: a crash leaves it PROCESSING, re-done)."""

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute(
                    "UPDATE items SET state=?, updated_at=? WHERE job=? AND path=? AND name=?",
                    (State.PROCESSING, time.time(), self.job, item.path, item.name),
                )

        await self._run(work)

    async def media_done(self, item: Item) -> None:
        """Store the item with its facts; it is ready to send (PLANNED, no media left)."""
        done = dataclasses.replace(item, media=Media.NONE)

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute(
                    "UPDATE items SET state=?, payload=?, media=?, updated_at=? "
                    "WHERE job=? AND path=? AND name=?",
                    (
                        State.PLANNED,
                        codec.item_to_bytes(done),
                        str(Media.NONE),
                        time.time(),
                        self.job,
                        item.path,
                        item.name,
                    ),
                )

        await self._run(work)

    async def media_failed(self, item: Item, reason: str, *, final: bool) -> None:
        """Media work failed: FAILED with the reason; ``final`` when the same bytes would fail
        again (corrupt image, no video stream), so the worker does not retry it by itself.
        ``media`` stays set, so ``ingest retry`` processes the item again."""

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute(
                    "UPDATE items SET state=?, reason=?, updated_at=?, failures=failures+1, "
                    "final=? WHERE job=? AND path=? AND name=?",
                    (State.FAILED, reason, time.time(), int(final), self.job, item.path, item.name),
                )

        await self._run(work)

    async def cached_facts(self, bucket: str, obj: ObjectInfo, kind: str) -> Facts | None:
        """Media facts made earlier for this exact object version (any job), or None. An
        entry that cannot be read is a miss (the media stage makes it again)."""
        if not obj.etag:
            return None

        def work(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT result FROM media_cache WHERE bucket=? AND key=? AND etag=? AND kind=?",
                (bucket, obj.key, obj.etag, kind),
            ).fetchone()
            return bytes(row[0]) if row else None

        data = await self._run(work)
        if data is None:
            return None
        try:
            return codec.facts_from_bytes(data)
        except codec.CodecError:
            return None

    async def cache_facts(self, bucket: str, obj: ObjectInfo, kind: str, facts: Facts) -> None:
        if not obj.etag:
            return
        data = codec.facts_to_bytes(facts)

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute(
                    "INSERT OR REPLACE INTO media_cache(bucket, key, etag, kind, result) "
                    "VALUES (?,?,?,?,?)",
                    (bucket, obj.key, obj.etag, kind, data),
                )

        await self._run(work)

    # --- sending ---------------------------------------------------------------------------

    async def keep_claims(self, items: Sequence[Item]) -> None:
        return None  # one process per job: nothing to keep

    async def mark_sent(self, items: Sequence[Item]) -> list[int]:
        """Mark SENT and count the attempt; committed before returning (before the POST).
        Returns each item's attempt count, in order (the same item twice counts twice)."""
        idents = [it.ident for it in items]
        job = self.job

        def work(db: sqlite3.Connection) -> list[int]:
            now = time.time()
            with _tx(db):
                if len(set(idents)) < len(idents):  # the same item twice: each attempt, in order
                    out: list[int] = []
                    for path, name in idents:
                        row = db.execute(
                            "UPDATE items SET state=?, attempts=attempts+1, updated_at=? "
                            "WHERE job=? AND path=? AND name=? RETURNING attempts",
                            (State.SENT, now, job, path, name),
                        ).fetchone()
                        out.append(int(row[0]) if row else 1)
                    return out
                # One UPDATE ... FROM (VALUES ...) RETURNING per chunk, not one per item.
                got: dict[Ident, int] = {}
                for chunk in _chunks(idents):
                    rows = db.execute(
                        "UPDATE items SET state=?, attempts=attempts+1, updated_at=? FROM "
                        f"(VALUES {_values(len(chunk), 2)}) AS v "
                        "WHERE items.job=? AND items.path=v.column1 AND items.name=v.column2 "
                        "RETURNING items.path, items.name, items.attempts",
                        [State.SENT, now, *(x for ident in chunk for x in ident), job],
                    ).fetchall()
                    got.update(((path, name), int(n)) for path, name, n in rows)
            # No such row: a first attempt, as far as we know.
            return [got.get(ident, 1) for ident in idents]

        return await self._run(work)

    async def unmark_sent(self, items: Sequence[Item]) -> None:
        """Take back the attempts of requests that never reached V7: an item sent by an earlier
        run stays SENT (attempts > 0 left), one never sent before is PLANNED again."""
        counts = list(Counter(it.ident for it in items).items())
        job = self.job

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            with _tx(db):
                for chunk in _chunks(counts):
                    db.execute(
                        "UPDATE items SET attempts=max(items.attempts - v.column3, 0), "
                        "state=iif(items.attempts - v.column3 <= 0, ?, items.state), "
                        f"updated_at=? FROM (VALUES {_values(len(chunk), 3)}) AS v "
                        "WHERE items.job=? AND items.path=v.column1 AND items.name=v.column2 "
                        "AND items.state=?",
                        [
                            State.PLANNED,
                            now,
                            *(x for (path, name), n in chunk for x in (path, name, n)),
                            job,
                            State.SENT,
                        ],
                    )

        await self._run(work)

    async def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        job = self.job

        def work(db: sqlite3.Connection) -> None:
            now = time.time()
            with _tx(db):
                if len({(o.path, o.name) for o in outcomes}) < len(outcomes):
                    # The same item twice: apply in order, the last outcome wins.
                    db.executemany(
                        "UPDATE items SET state=?, v7_id=?, reason=?, updated_at=?, "
                        "failures=failures+(?=?), final=? WHERE job=? AND path=? AND name=?",
                        [
                            (
                                o.state,
                                o.v7_id,
                                o.reason,
                                now,
                                o.state,
                                State.FAILED,
                                _final(o),
                                job,
                                o.path,
                                o.name,
                            )
                            for o in outcomes
                        ],
                    )
                    return
                # One UPDATE ... FROM (VALUES ...) per chunk instead of one statement per item.
                for chunk in _chunks(outcomes):
                    db.execute(
                        "UPDATE items SET state=v.column1, v7_id=v.column2, reason=v.column3, "
                        "failures=items.failures+(v.column1=?), final=v.column6, updated_at=? "
                        f"FROM (VALUES {_values(len(chunk), 6)}) AS v "
                        "WHERE items.job=? AND items.path=v.column4 AND items.name=v.column5",
                        [
                            State.FAILED,
                            now,
                            *(
                                x
                                for o in chunk
                                for x in (o.state, o.v7_id, o.reason, o.path, o.name, _final(o))
                            ),
                            job,
                        ],
                    )

        await self._run(work)

    async def set_v7_ids(self, ids: Sequence[tuple[Ident, str]]) -> None:
        job = self.job
        rows = list(ids)

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                for chunk in _chunks(rows):
                    db.execute(
                        f"UPDATE items SET v7_id=v.column3 FROM (VALUES {_values(len(chunk), 3)})"
                        " AS v WHERE items.job=? AND items.path=v.column1 "
                        "AND items.name=v.column2",
                        [*(x for (path, name), v7 in chunk for x in (path, name, v7)), job],
                    )

        await self._run(work)

    async def note_id_misses(self, idents: Sequence[Ident]) -> None:
        job = self.job
        rows = list(dict.fromkeys(idents))

        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                for chunk in _chunks(rows):
                    db.execute(
                        f"UPDATE items SET id_lookups=id_lookups+1 FROM (VALUES "
                        f"{_values(len(chunk), 2)}) AS v WHERE items.job=? "
                        "AND items.path=v.column1 AND items.name=v.column2",
                        [*(x for ident in chunk for x in ident), job],
                    )

        await self._run(work)

    async def registered_without_id(self, limit: int) -> list[Ident]:
        def work(db: sqlite3.Connection) -> list[Ident]:
            rows = db.execute(
                "SELECT path, name FROM items WHERE job=? AND state=? AND v7_id='' "
                "AND id_lookups < ? ORDER BY id LIMIT ?",
                (self.job, State.REGISTERED, MAX_ID_LOOKUPS, limit),
            ).fetchall()
            return [(str(p), str(n)) for p, n in rows]

        return await self._run(work)

    async def item_states(self, idents: Sequence[Ident]) -> dict[Ident, State]:
        wanted = list(dict.fromkeys(idents))
        job = self.job

        def work(db: sqlite3.Connection) -> dict[Ident, State]:
            out: dict[Ident, State] = {}
            for chunk in _chunks(wanted):
                rows = db.execute(
                    f"SELECT i.path, i.name, i.state FROM (VALUES {_values(len(chunk), 2)}) AS v "
                    "JOIN items i ON i.job=? AND i.path=v.column1 AND i.name=v.column2",
                    [*(x for ident in chunk for x in ident), job],
                )
                out.update(((path, name), State(state)) for path, name, state in rows)
            return out

        return await self._run(work)

    # --- retry -------------------------------------------------------------------------------

    async def requeue_failed(self, blocked_reason: str | None = None) -> int:
        job = self.job

        def work(db: sqlite3.Connection) -> int:
            with _tx(db):
                n = db.execute(
                    "UPDATE items SET state=?, reason='', final=0 WHERE job=? AND state=?",
                    (State.PLANNED, job, State.FAILED),
                ).rowcount
                if blocked_reason:
                    n += db.execute(
                        "UPDATE items SET state=?, reason='' WHERE job=? AND state=? AND reason=?",
                        (State.PLANNED, job, State.BLOCKED, blocked_reason),
                    ).rowcount
            return int(n)

        return await self._run(work)

    async def blocked_reasons(self) -> list[str]:
        job = self.job

        def work(db: sqlite3.Connection) -> list[str]:
            rows = db.execute(
                "SELECT DISTINCT reason FROM items WHERE job=? AND state=? ORDER BY 1",
                (job, State.BLOCKED),
            )
            return [str(reason) for (reason,) in rows]

        return await self._run(work)

    async def requeue_due(self, is_due: Callable[[int, float], bool]) -> int:
        """FAILED items whose back-off has passed, back to PLANNED. ``is_due(failures,
        failed_at)`` decides (pure, from the worker's policy); chunked over FAILED rows only.
        Not retried: a final failure (V7 rejected the item, the media is corrupt: only a new
        version of the object or `ingest retry` can change that), and an item whose object a
        sync found gone from the bucket."""
        job = self.job

        def chunk(last: int, db: sqlite3.Connection) -> tuple[int, int | None]:
            rows = db.execute(
                "SELECT id, failures, updated_at FROM items WHERE job=? AND state=? "
                "AND final=0 AND id > ? AND NOT EXISTS (SELECT 1 FROM json_each(CAST(items.keys "
                # CROSS JOIN keeps json_each outside: one primary-key probe per key, not a
                # scan of the job's objects per key (13 s → 1 ms at 1k FAILED, 200k objects).
                "AS TEXT)) AS k CROSS JOIN objects o ON o.job=items.job AND o.key=k.value "
                "WHERE o.vanished_at>0) ORDER BY id LIMIT ?",
                (job, State.FAILED, last, CHUNK),
            ).fetchall()
            if not rows:
                return 0, None
            due = [
                (State.PLANNED, job, i, State.FAILED)
                for i, failures, at in rows
                if is_due(int(failures), float(at))
            ]
            if due:
                with _tx(db):
                    db.executemany(
                        "UPDATE items SET state=?, reason='' WHERE job=? AND id=? "
                        "AND state=? AND final=0",
                        due,
                    )
            return len(due), int(rows[-1][0])

        n, last = 0, 0
        while True:
            got, nxt = await self._run(functools.partial(chunk, last))
            n += got
            if nxt is None:
                return n
            last = nxt

    # --- sync: the ledger's side of the listing merge ------------------------------------------

    async def known_range(
        self, prefix: str, recursive: bool, start: str, inclusive: bool, limit: int
    ) -> list[Known]:
        """Up to ``limit`` objects of one shard in key order from ``start``: keys under
        ``prefix`` (recursive) or directly under it. Sub-folders of a non-recursive shard are
        skipped with one seek each, not read."""
        job = self.job

        def work(db: sqlite3.Connection) -> list[Known]:
            out: list[Known] = []
            lo, incl = (start, inclusive) if start >= prefix else (prefix, True)
            hi = prefix_end(prefix)
            while len(out) < limit:
                want = limit - len(out)
                rows = db.execute(
                    f"SELECT {_KNOWN_COLUMNS} FROM objects WHERE job=? "
                    f"AND key {'>=' if incl else '>'} ? AND (? IS NULL OR key < ?) "
                    "ORDER BY key LIMIT ?",
                    (job, lo, hi, hi, want),
                ).fetchall()
                seek = None
                for row in rows:
                    key = row[0]
                    if not recursive:
                        cut = key.find("/", len(prefix))
                        if cut >= 0:  # a sub-folder: listed by another shard
                            seek = prefix_end(key[: cut + 1])
                            break
                    out.append(_known(row))
                if seek is not None:
                    lo, incl = seek, True
                elif len(rows) < want:
                    break
                else:
                    lo, incl = rows[-1][0], False
            return out

        return await self._run(work)

    async def known(self, keys: Sequence[str]) -> dict[str, Known]:
        wanted = list(dict.fromkeys(keys))
        job = self.job

        def work(db: sqlite3.Connection) -> dict[str, Known]:
            out: dict[str, Known] = {}
            for chunk in _chunks(wanted):
                rows = db.execute(
                    f"SELECT {_KNOWN_COLUMNS} FROM objects WHERE job=? "
                    f"AND key IN ({','.join('?' * len(chunk))})",
                    (job, *chunk),
                )
                out.update((row[0], _known(row)) for row in rows)
            return out

        return await self._run(work)

    async def sub_folders(self, prefix: str) -> list[str]:
        """Distinct first-level folders under ``prefix`` that the ledger holds keys for."""
        job = self.job

        def work(db: sqlite3.Connection) -> list[str]:
            out: list[str] = []
            lo, hi = prefix, prefix_end(prefix)
            while True:
                row = db.execute(
                    "SELECT key FROM objects WHERE job=? AND key >= ? AND (? IS NULL OR key < ?) "
                    "AND instr(substr(key, ?), '/') > 0 ORDER BY key LIMIT 1",
                    (job, lo, hi, hi, len(prefix) + 1),
                ).fetchone()
                if row is None:
                    return out
                key = row[0]
                folder = key[: key.index("/", len(prefix)) + 1]
                out.append(folder)
                nxt = prefix_end(folder)
                if nxt is None:
                    return out
                lo = nxt

        return await self._run(work)

    async def record_sync_page(
        self,
        vanished: Sequence[str] = (),
        reappeared: Sequence[str] = (),
        changed: Sequence[tuple[str, str]] = (),
    ) -> int:
        """What one merged page found, in one transaction: keys gone from the bucket, keys back
        again, and (key, new etag) of objects whose content changed (reported, not re-sent).
        Returns how many known objects were newly marked vanished."""
        if not (vanished or reappeared or changed):
            return 0
        job = self.job

        def work(db: sqlite3.Connection) -> int:
            now = time.time()
            with _tx(db):
                gone = db.executemany(
                    "UPDATE objects SET vanished_at=? WHERE job=? AND key=? AND vanished_at=0",
                    [(now, job, k) for k in vanished],
                ).rowcount
                db.executemany(
                    "UPDATE objects SET vanished_at=0 WHERE job=? AND key=?",
                    [(job, k) for k in reappeared],
                )
                db.executemany(
                    "UPDATE objects SET changed=1, changed_etag=? WHERE job=? AND key=?",
                    [(etag, job, k) for k, etag in changed],
                )
            return max(gone, 0)

        return await self._run(work)

    async def mark_vanished_under(self, prefix: str) -> int:
        """Every object under ``prefix`` is gone (the whole folder vanished from the listing)."""
        hi = prefix_end(prefix)
        job = self.job

        def work(db: sqlite3.Connection) -> int:
            with _tx(db):
                n = db.execute(
                    "UPDATE objects SET vanished_at=? WHERE job=? AND key >= ? "
                    "AND (? IS NULL OR key < ?) AND vanished_at=0",
                    (time.time(), job, prefix, hi, hi),
                ).rowcount
            return int(n)

        return await self._run(work)

    async def record_new_version(self, obj: ObjectInfo, item: Item) -> bool:
        """A changed object registered again as a new item (sync.on_change = "register"): the
        object now points at the new item; the old item stays in V7 untouched."""
        job, run_id = self.job, self._run_id

        def work(db: sqlite3.Connection) -> bool:
            with _tx(db):
                row = db.execute(
                    "INSERT INTO items(job, path, name, payload, keys, state, run_id, "
                    "updated_at, media, readonly_endpoint) VALUES (?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(job, path, name) DO NOTHING RETURNING id",
                    (
                        job,
                        item.path,
                        item.name,
                        codec.item_to_bytes(item),
                        _keys_blob(item.keys),
                        State.PLANNED,
                        run_id,
                        time.time(),
                        str(item.media),
                        int(item.readonly_endpoint),
                    ),
                ).fetchone()
                created = row is not None
                if row is None:
                    # This version was registered before (the object changed back to it): point
                    # the object at that item instead of reporting it as changed on every sync.
                    # An item of that name made of another key is not ours: report the change.
                    row = db.execute(
                        "SELECT id FROM items WHERE job=? AND path=? AND name=? AND keys=?",
                        (job, item.path, item.name, _keys_blob([obj.key])),
                    ).fetchone()
                    if row is None:
                        db.execute(
                            "UPDATE objects SET changed=1, changed_etag=? WHERE job=? AND key=?",
                            (obj.etag, job, obj.key),
                        )
                        return False
                db.execute(
                    "UPDATE objects SET etag=?, size=?, last_modified=?, item_id=?, changed=0, "
                    "changed_etag='', vanished_at=0, state=? WHERE job=? AND key=?",
                    (obj.etag, obj.size, obj.last_modified, row[0], State.PLANNED, job, obj.key),
                )
            return created

        return await self._run(work)

    async def item_key_count(self, key: str) -> int:
        """How many objects the item of ``key`` is made of (0 when it has no item)."""

        def work(db: sqlite3.Connection) -> int:
            row = db.execute(
                "SELECT json_array_length(CAST(i.keys AS TEXT)) FROM objects o "
                "JOIN items i ON i.id = o.item_id WHERE o.job=? AND o.key=?",
                (self.job, key),
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._run(work)

    # --- leases: one writer per job -----------------------------------------------------------

    async def acquire_lease(
        self,
        holder: str,
        ttl_s: float,
        now: float,
        holder_dead: Callable[[str], bool],
    ) -> Lease | None:
        """Take (or renew) the job's lease; None when it is ours. Returns the live lease of
        someone else when they hold it: the caller refuses to run. ``holder_dead(holder)``
        lets a lease whose holder is known dead (same host, no such process) go at once."""
        job = self.job

        def work(db: sqlite3.Connection) -> Lease | None:
            with _tx(db):
                row = db.execute(
                    "SELECT holder, acquired_at, expires_at FROM leases WHERE job=?", (job,)
                ).fetchone()
                if (
                    row is not None
                    and row[0] != holder
                    and row[2] > now
                    and not holder_dead(row[0])
                ):
                    return Lease(row[0], row[1], row[2])
                db.execute(
                    "INSERT INTO leases(job, holder, acquired_at, expires_at) VALUES (?,?,?,?) "
                    "ON CONFLICT(job) DO UPDATE SET holder=excluded.holder, "
                    "acquired_at=excluded.acquired_at, expires_at=excluded.expires_at",
                    (job, holder, now, now + ttl_s),
                )
            return None

        return await self._run(work)

    async def renew_lease(self, holder: str, ttl_s: float, now: float) -> bool:
        """Extend our lease; False when it is no longer ours (expired and taken over)."""

        def work(db: sqlite3.Connection) -> bool:
            with _tx(db):
                n = db.execute(
                    "UPDATE leases SET expires_at=? WHERE job=? AND holder=?",
                    (now + ttl_s, self.job, holder),
                ).rowcount
            return bool(n == 1)

        return await self._run(work)

    async def release_lease(self, holder: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            with _tx(db):
                db.execute("DELETE FROM leases WHERE job=? AND holder=?", (self.job, holder))

        await self._run(work)

    # --- claims: trivial, one process holds the whole job under the lease --------------------

    async def join(self, holder: str, ttl_s: float, roles: frozenset[str] = ROLES) -> None:
        return None

    async def renew_claims(self) -> int:
        return 0

    async def reap_claims(self, holder_dead: Callable[[str], bool]) -> int:
        return 0

    async def release_claims(self, idents: Sequence[Ident] | None = None) -> None:
        return None

    async def register_shards(self, shard_ids: Sequence[str]) -> None:
        return None

    async def claim_shard(self) -> tuple[str, str] | None:
        return None

    async def outstanding(self) -> int:
        return 0

    # --- reading ---------------------------------------------------------------------------

    _EFFECTIVE = "COALESCE(i.state, o.state)"

    async def status(self, runs: int = 5) -> Status:
        job = self.job
        eff = self._EFFECTIVE

        def work(db: sqlite3.Connection) -> Status:
            st = Status(job)
            st.objects_by_state = dict(
                db.execute(
                    f"SELECT {eff} AS s, count(*) FROM objects o "
                    "LEFT JOIN items i ON i.id = o.item_id WHERE o.job=? GROUP BY s",
                    (job,),
                ).fetchall()
            )
            st.items_by_state = dict(
                db.execute(
                    "SELECT state, count(*) FROM items WHERE job=? GROUP BY state", (job,)
                ).fetchall()
            )
            st.failures_by_reason = [
                (f"{s}: {r}", int(n))
                for s, r, n in db.execute(
                    "SELECT state, reason, count(*) AS n FROM items WHERE job=? "
                    "AND state IN (?,?) GROUP BY state, reason ORDER BY n DESC LIMIT 20",
                    (job, State.FAILED, State.BLOCKED),
                )
            ] + [
                (f"{State.SKIPPED}: {r}", int(n))
                for r, n in db.execute(
                    "SELECT reason, count(*) AS n FROM objects WHERE job=? AND state=? "
                    "GROUP BY reason ORDER BY n DESC LIMIT 20",
                    (job, State.SKIPPED),
                )
            ]
            changed, vanished = db.execute(
                "SELECT COALESCE(SUM(changed=1 AND vanished_at=0), 0), "
                "COALESCE(SUM(vanished_at>0), 0) FROM objects WHERE job=?",
                (job,),
            ).fetchone()
            st.changed_objects, st.vanished_objects = int(changed), int(vanished)
            for rid, kind, started, finished, status, counts in db.execute(
                "SELECT id, kind, started_at, finished_at, status, counts FROM runs WHERE job=? "
                "ORDER BY id DESC LIMIT ?",
                (job, runs),
            ):
                st.last_runs.append(
                    {
                        "id": rid,
                        "kind": kind,
                        "started_at": _iso(started),
                        "finished_at": _iso(finished) if finished else None,
                        "started_at_s": float(started),
                        "finished_at_s": float(finished) if finished else None,
                        "status": status,
                        "counts": orjson.loads(counts) if counts else {},
                    }
                )
            return st

        return await self._run(work)

    async def jobs(self) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            rows = db.execute("SELECT job FROM jobs UNION SELECT job FROM runs ORDER BY 1")
            return [str(job) for (job,) in rows]

        return await self._run(work)

    async def report_rows(self) -> AsyncGenerator[ReportRow, None]:
        """One row per object in key order, streamed in chunks."""
        job = self.job
        eff = self._EFFECTIVE

        def chunk(first: bool, last: str, db: sqlite3.Connection) -> list[ReportRow]:
            rows = db.execute(
                f"SELECT o.key, {eff}, COALESCE(i.path,''), COALESCE(i.name,''), "
                "COALESCE(i.v7_id,''), CASE WHEN o.item_id IS NULL THEN o.reason "
                "ELSE COALESCE(i.reason,'') END, o.etag, o.size, CASE WHEN o.vanished_at>0 "
                "THEN 'vanished' WHEN o.changed=1 AND o.changed_etag!='' THEN "
                "'changed (etag ' || o.changed_etag || ')' WHEN o.changed=1 THEN 'changed' "
                "ELSE '' END, o.item_id FROM objects o "
                "LEFT JOIN items i ON i.id = o.item_id WHERE o.job=? AND o.key >= ? "
                "AND (? OR o.key > ?) ORDER BY o.key LIMIT ?",
                # key >= last is a range the primary key serves; the OR only drops ``last``.
                (job, last, first, last, CHUNK),
            ).fetchall()
            converted = _converted(db, {r[-1] for r in rows if r[-1] is not None})
            return [
                dataclasses.replace(ReportRow(*r[:-1]), converted=converted.get(r[0], ""))
                for r in rows
            ]

        first, last = True, ""
        while True:
            rows = await self._run(functools.partial(chunk, first, last))
            if not rows:
                return
            for r in rows:
                yield r
            first, last = False, rows[-1].key

    # --- manifests -----------------------------------------------------------------------

    async def stage_manifest(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """(item_name, slot_name, key, path) rows into a staging table, in chunked
        transactions; ``rows`` is read in the ledger's thread (it may read a file)."""
        job = self.job

        def work(db: sqlite3.Connection) -> int:
            with _tx(db):
                db.execute("DELETE FROM manifest WHERE job=?", (job,))
            n = 0
            chunk: list[tuple[str, str, str, str, str, int]] = []
            for item_name, slot_name, key, path in rows:
                chunk.append((job, item_name, slot_name, key, path, n))
                n += 1
                if len(chunk) >= CHUNK:
                    with _tx(db):
                        db.executemany("INSERT INTO manifest VALUES (?,?,?,?,?,?)", chunk)
                    chunk = []
            if chunk:
                with _tx(db):
                    db.executemany("INSERT INTO manifest VALUES (?,?,?,?,?,?)", chunk)
            return n

        return await self._run(work)

    async def manifest_items(self) -> AsyncGenerator[ManifestItem, None]:
        """Manifest items grouped by (path, name), slots in file order, streamed in chunks."""
        job = self.job

        def chunk(last: tuple[str, str, int], db: sqlite3.Connection) -> list[Any]:
            return db.execute(
                "SELECT path, item_name, seq, slot_name, key FROM manifest WHERE job=? AND "
                "(path, item_name, seq) > (?, ?, ?) ORDER BY path, item_name, seq LIMIT ?",
                (job, *last, CHUNK),
            ).fetchall()

        current: tuple[str, str] | None = None  # (path, name)
        slots: list[tuple[str, str]] = []
        last: tuple[str, str, int] = ("", "", -1)
        while True:
            rows = await self._run(functools.partial(chunk, last))
            if not rows:
                break
            for path, item_name, seq, slot_name, key in rows:
                if current != (path, item_name):
                    if current is not None:
                        yield ManifestItem(current[1], current[0], tuple(slots))
                    current, slots = (path, item_name), []
                slots.append((slot_name, key))
                last = (path, item_name, seq)
        if current is not None:
            yield ManifestItem(current[1], current[0], tuple(slots))

    async def in_manifest(self, keys: Sequence[str]) -> set[str]:
        wanted = list(dict.fromkeys(keys))
        job = self.job

        def work(db: sqlite3.Connection) -> set[str]:
            out: set[str] = set()
            for chunk in _chunks(wanted):
                out.update(
                    r[0]
                    for r in db.execute(
                        "SELECT DISTINCT key FROM manifest WHERE job=? "
                        f"AND key IN ({','.join('?' * len(chunk))})",
                        (job, *chunk),
                    )
                )
            return out

        return await self._run(work)

    async def object_infos(self, keys: Sequence[str]) -> dict[str, ObjectInfo]:
        """The objects as last listed; a key the listing never saw is absent."""
        wanted = list(dict.fromkeys(keys))
        return await self._run(lambda db: _object_infos(db, self.job, wanted))

    # --- operations ------------------------------------------------------------------------

    async def prune(self, state: State, before: float) -> int:
        """Delete this job's items in ``state`` last updated before ``before``, in chunks of
        ``PRUNE_CHUNK`` (short transactions: a writer waits for one chunk at most); returns
        how many went. ``SKIPPED``: the skipped objects (they have no time: ``before`` does
        not apply). Their objects stay as tombstones (state kept, item link dropped): status
        still counts them, and a later run does not plan them again (never re-sends what V7
        holds). Refused (``LeaseHeld``) while a process holds the job's lease."""
        job = self.job

        def refuse(db: sqlite3.Connection) -> None:
            row = db.execute(
                "SELECT holder FROM leases WHERE job=? AND holder != '' AND expires_at > ?",
                (job, time.time()),
            ).fetchone()
            if row:
                raise LeaseHeld(
                    f"job {job!r} is running ({row[0]}): prune it once no process works on it"
                )

        def chunk(db: sqlite3.Connection) -> int:
            with _tx(db):
                refuse(db)
                if state is State.SKIPPED:
                    return int(
                        db.execute(
                            "DELETE FROM objects WHERE job=? AND key IN (SELECT key FROM "
                            "objects WHERE job=? AND state=? AND item_id IS NULL LIMIT ?)",
                            (job, job, str(state), PRUNE_CHUNK),
                        ).rowcount
                    )
                rows = db.execute(
                    "SELECT id, keys FROM items WHERE job=? AND state=? AND updated_at < ? "
                    "ORDER BY id LIMIT ?",
                    (job, str(state), before, PRUNE_CHUNK),
                ).fetchall()
                # Objects found by key (their primary key), not by item id (no index).
                db.executemany(
                    "UPDATE objects SET item_id=NULL, state=? WHERE job=? AND key=? AND item_id=?",
                    [
                        (str(state), job, key, int(item_id))
                        for item_id, keys in rows
                        for key in codec.legacy_keys(_blob(keys))
                    ],
                )
                db.executemany("DELETE FROM items WHERE id=?", [(int(r[0]),) for r in rows])
                return len(rows)

        n = 0
        while True:
            got = await self._run(chunk)
            n += got
            if got < PRUNE_CHUNK:
                return n


def _tombstones(db: sqlite3.Connection, job: str, keys: Sequence[str]) -> set[str]:
    """The keys whose item was pruned (``prune`` keeps the object, state and all, unlinked)."""
    out: set[str] = set()
    for part in _chunks(list(dict.fromkeys(keys))):
        out.update(
            str(r[0])
            for r in db.execute(
                f"SELECT key FROM objects WHERE job=? AND key IN ({','.join('?' * len(part))}) "
                "AND item_id IS NULL AND state NOT IN (?, ?)",
                (job, *part, str(State.DISCOVERED), str(State.SKIPPED)),
            )
        )
    return out


def _object_infos(db: sqlite3.Connection, job: str, keys: Sequence[str]) -> dict[str, ObjectInfo]:
    out: dict[str, ObjectInfo] = {}
    for chunk in _chunks(keys):
        rows = db.execute(
            "SELECT key, etag, size, last_modified FROM objects WHERE job=? "
            f"AND key IN ({','.join('?' * len(chunk))})",
            (job, *chunk),
        )
        out.update((k, ObjectInfo(k, int(size), str(etag), str(lm))) for k, etag, size, lm in rows)
    return out


def _recorded_items(
    db: sqlite3.Connection, job: str, idents: Sequence[Ident]
) -> dict[Ident, tuple[int, tuple[str, ...]]]:
    """(id, keys) of recorded items by (path, name), chunked."""
    wanted = list(dict.fromkeys(idents))
    out: dict[Ident, tuple[int, tuple[str, ...]]] = {}
    for chunk in _chunks(wanted):
        rows = db.execute(
            f"SELECT i.path, i.name, i.id, i.keys FROM (VALUES {_values(len(chunk), 2)}) AS v "
            "JOIN items i ON i.job=? AND i.path=v.column1 AND i.name=v.column2",
            [*(x for ident in chunk for x in ident), job],
        )
        out.update(
            ((path, name), (int(item_id), tuple(codec.legacy_keys(_blob(keys)))))
            for path, name, item_id, keys in rows
        )
    return out


if TYPE_CHECKING:  # mypy proves the backend implements the whole port

    def _implements_port(ledger: SqliteLedger) -> LedgerPort:
        return ledger


def _converted(db: sqlite3.Connection, item_ids: set[int]) -> dict[str, str]:
    """Provider key -> what it was converted into, for the items of a report chunk that hold
    converted DICOM (each such item decoded once, however many slices it has)."""
    if not item_ids:
        return {}
    out: dict[str, str] = {}
    marks = ",".join("?" * len(item_ids))
    for (payload,) in db.execute(
        f"SELECT payload FROM items WHERE id IN ({marks}) AND instr(payload, ?) > 0",
        (*item_ids, codec.CONVERTED_MARK),
    ):
        with contextlib.suppress(codec.CodecError):
            out.update(codec.converted_by_key(codec.item_from_bytes(bytes(payload))))
    return out
