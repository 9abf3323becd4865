"""The ledger: the engine's memory across runs and crashes (SQLite, WAL, batched transactions).

Durability: WAL with ``synchronous=NORMAL`` — a committed transaction survives the process being
killed (our threat model: kill -9, OOM, pod eviction); only an OS crash or power loss may lose
the last transactions, after which a re-run re-sends them and V7 answers ALREADY_EXISTS, which
the registrar counts as success for items sent before.

Every query that could return many rows streams with keyset pagination (``WHERE id > ? LIMIT``)
so memory never grows with the number of objects, and rows updated while a stream is open are
never seen twice.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from ingest.model import ItemPlan, Media, ObjectInfo, Outcome, Skip, State

SCHEMA_VERSION = 4

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
    final INTEGER NOT NULL DEFAULT 0,  -- FAILED for good (422, corrupt media): no automatic retry
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
"""

# (table, column, declaration) added to the schema after version 1, oldest first.
_ADDED_COLUMNS = (
    ("items", "media", "TEXT NOT NULL DEFAULT ''"),
    ("items", "readonly_endpoint", "INTEGER NOT NULL DEFAULT 0"),
    ("objects", "changed_etag", "TEXT NOT NULL DEFAULT ''"),
    ("objects", "vanished_at", "REAL NOT NULL DEFAULT 0"),
    ("items", "failures", "INTEGER NOT NULL DEFAULT 0"),
    ("items", "final", "INTEGER NOT NULL DEFAULT 0"),
)

CHUNK = 1000
# Rows per multi-row INSERT / UPDATE ... FROM (VALUES ...): well under SQLite's bound-variable
# limit (32766 since 3.32) at 9 columns, and large enough to amortise the statement.
_ROWS_PER_INSERT = 500


def _final(o: Outcome) -> int:
    """1 for a failure that sending the same item again cannot fix (V7 rejected it)."""
    return int(o.state is State.FAILED and not o.retryable)


@dataclass(frozen=True, slots=True)
class Known:
    """An object as the ledger last saw it: one side of the sync merge."""

    key: str
    etag: str
    changed_etag: str  # the new ETag a sync last reported (report mode), else ""
    vanished: bool
    # Listed but never planned: a run stopped while the planner held it (the rest of its
    # DICOM series or folder item was on the next page). The merge plans it again.
    unplanned: bool = False


_KNOWN_COLUMNS = "key, etag, changed_etag, vanished_at, state"


def _known(row: Sequence[Any]) -> Known:
    """A Known from a row of ``_KNOWN_COLUMNS``."""
    key, etag, changed_etag, vanished_at, state = row
    return Known(key, etag, changed_etag, bool(vanished_at), state == "DISCOVERED")


@dataclass(frozen=True)
class Lease:
    holder: str
    acquired_at: float
    expires_at: float


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


@dataclass(frozen=True)
class RunInfo:
    run_id: int
    resume_listing: bool


@dataclass(frozen=True)
class ReportRow:
    key: str
    state: str
    item_path: str
    item_name: str
    v7_id: str
    reason: str
    etag: str
    size: int
    sync: str = ""  # "vanished", "changed (etag …)" or "" (as listed last time)


@dataclass
class Status:
    job: str
    objects_by_state: dict[str, int] = field(default_factory=dict)
    items_by_state: dict[str, int] = field(default_factory=dict)
    failures_by_reason: list[tuple[str, int]] = field(default_factory=list)
    last_runs: list[dict[str, Any]] = field(default_factory=list)
    changed_objects: int = 0
    vanished_objects: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "objects_by_state": self.objects_by_state,
            "items_by_state": self.items_by_state,
            "failures_by_reason": [{"reason": r, "count": n} for r, n in self.failures_by_reason],
            "last_runs": self.last_runs,
            "changed_objects": self.changed_objects,
            "vanished_objects": self.vanished_objects,
        }


class Ledger:
    """One SQLite file; one job (a dataset + storage + bucket + prefix) per ``Ledger`` object."""

    def __init__(self, path: str | Path, job: str) -> None:
        self.path = Path(path)
        self.job = job
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA busy_timeout=10000")
        # temp_store stays FILE (the default): the GROUP BY of status() sorts every object, and
        # an in-memory temp store made that sort O(objects) in RAM (+50 MB at 1M objects); on
        # FILE, SQLite spills big sorts to a temp file and memory stays flat.
        self._migrate()
        self._run_id = 0

    # --- lifecycle -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        version = int(self.db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"ledger {self.path} was written by a newer version (schema {version})"
            )
        if 1 <= version < SCHEMA_VERSION:
            # Columns added since schema 1 (media; sync, retry back-off; final failures). Each
            # only if missing: two processes opening an old ledger at once, or one killed
            # half-way, must not leave a ledger that no longer opens.
            for table, column, decl in _ADDED_COLUMNS:
                have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # added meanwhile
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
        if version < SCHEMA_VERSION:
            # executescript runs its own transaction; CREATE ... IF NOT EXISTS is idempotent.
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    # --- runs and listing checkpoints -------------------------------------------------------------

    def start_run(self, kind: str, *, listing: bool = True) -> RunInfo:
        """Record a run. Only a run that lists the bucket touches the listing checkpoints:
        an event pass or a retry must not wipe the checkpoints of an interrupted sync."""
        now = time.time()
        resume = False
        with self._tx():
            self.db.execute(
                "UPDATE runs SET status='interrupted', finished_at=? "
                "WHERE job=? AND status='running'",
                (now, self.job),
            )
            if listing:
                row = self.db.execute(
                    "SELECT listing_complete FROM jobs WHERE job=?", (self.job,)
                ).fetchone()
                resume = row is not None and not row[0]
                if not resume:
                    self.db.execute("DELETE FROM listing WHERE job=?", (self.job,))
                self.db.execute(
                    "INSERT INTO jobs(job, listing_complete) VALUES (?, 0) "
                    "ON CONFLICT(job) DO UPDATE SET listing_complete=0",
                    (self.job,),
                )
            cur = self.db.execute(
                "INSERT INTO runs(job, kind, started_at, status) VALUES (?,?,?,'running')",
                (self.job, kind, now),
            )
        self._run_id = int(cur.lastrowid or 0)
        return RunInfo(self._run_id, resume)

    def finish_run(self, run_id: int, status: str, counts: dict[str, int]) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE runs SET status=?, finished_at=?, counts=? WHERE id=?",
                (status, time.time(), orjson.dumps(counts), run_id),
            )

    def mark_listing_complete(self) -> None:
        with self._tx():
            self.db.execute("UPDATE jobs SET listing_complete=1 WHERE job=?", (self.job,))
            self.db.execute("DELETE FROM listing WHERE job=?", (self.job,))

    def checkpoints(self) -> dict[str, tuple[str, bool]]:
        rows = self.db.execute(
            "SELECT shard_id, checkpoint, done FROM listing WHERE job=?", (self.job,)
        )
        return {sid: (cp, bool(done)) for sid, cp, done in rows}

    # --- listing → items ----------------------------------------------------------------------

    def record_page(
        self,
        shard_id: str,
        checkpoint: str,
        shard_done: bool,
        objects: Sequence[ObjectInfo],
        plans: Sequence[ItemPlan | Skip],
    ) -> list[ItemPlan]:
        """Store one listed page and its plans in ONE transaction; return the items new to the
        ledger (an item already known, in any state, is either done or recovered elsewhere).

        ``checkpoint`` "" keeps the stored one (the planner still holds part of a folder)."""
        now = time.time()
        new: list[ItemPlan] = []
        job = self.job
        with self._tx():
            db = self.db
            # Objects: insert new ones; an existing one keeps its row, a new ETag is flagged;
            # one never planned (held by a stopped run's planner) just takes the new version.
            db.executemany(
                "INSERT INTO objects(job, key, etag, size, last_modified, state) "
                "VALUES (?,?,?,?,?,'DISCOVERED') ON CONFLICT(job, key) DO UPDATE SET "
                "changed = objects.state != 'DISCOVERED' AND (changed OR "
                "(objects.etag != excluded.etag AND objects.etag != '')), "
                "etag = iif(objects.state = 'DISCOVERED', excluded.etag, objects.etag), "
                "size = iif(objects.state = 'DISCOVERED', excluded.size, objects.size), "
                "last_modified = iif(objects.state = 'DISCOVERED', excluded.last_modified, "
                "objects.last_modified)",
                [(job, o.key, o.etag, o.size, o.last_modified) for o in objects],
            )
            skips: list[tuple[str, str, str]] = []
            items = [p for p in plans if not isinstance(p, Skip)]
            for p in plans:
                if isinstance(p, Skip):
                    skips.append((p.reason, job, p.obj.key))
            # Items: multi-row INSERT ... RETURNING (one statement per chunk, not one per item);
            # the first plan of a (path, name) that got inserted is new, any other is known.
            inserted: dict[tuple[str, str], int] = {}
            for i in range(0, len(items), _ROWS_PER_INSERT):
                chunk = items[i : i + _ROWS_PER_INSERT]
                args: list[Any] = []
                for p in chunk:
                    args += (
                        job,
                        p.path,
                        p.name,
                        orjson.dumps(p.payload),
                        orjson.dumps(list(p.keys)),
                        self._run_id,
                        now,
                        str(p.media),
                        int(p.readonly_endpoint),
                    )
                rows = db.execute(
                    "INSERT INTO items(job, path, name, payload, keys, state, run_id, updated_at, "
                    "media, readonly_endpoint) VALUES "
                    + ",".join(["(?,?,?,?,?,'PLANNED',?,?,?,?)"] * len(chunk))
                    + " ON CONFLICT(job, path, name) DO NOTHING RETURNING id, path, name",
                    args,
                ).fetchall()
                inserted.update(((path, name), item_id) for item_id, path, name in rows)
            links: list[tuple[int, str, str]] = []
            for p in items:
                item_id = inserted.pop((p.path, p.name), None)
                if item_id is not None:
                    new.append(p)
                else:
                    row = db.execute(
                        "SELECT id, keys FROM items WHERE job=? AND path=? AND name=?",
                        (job, p.path, p.name),
                    ).fetchone()
                    item_id = row[0]
                    known = set(orjson.loads(row[1]))
                    # Another object planned to the same (path, name): it would never be sent,
                    # so say why instead of showing it as part of someone else's item.
                    for k in p.keys:
                        if k not in known:
                            skips.append((_collision(p, next(iter(known), "")), job, k))
                    links += ((item_id, job, k) for k in p.keys if k in known)
                    continue
                links += ((item_id, job, k) for k in p.keys)
            db.executemany(
                "UPDATE objects SET state='PLANNED', item_id=? "
                "WHERE job=? AND key=? AND item_id IS NULL",
                links,
            )
            if skips:
                db.executemany(
                    "UPDATE objects SET state='SKIPPED', reason=? WHERE job=? AND key=? "
                    "AND item_id IS NULL",
                    skips,
                )
            if checkpoint or shard_done:
                db.execute(
                    "INSERT INTO listing(job, shard_id, checkpoint, done) VALUES (?,?,?,?) "
                    "ON CONFLICT(job, shard_id) DO UPDATE SET "
                    "checkpoint = CASE WHEN excluded.checkpoint != '' THEN excluded.checkpoint "
                    "ELSE listing.checkpoint END, done = excluded.done",
                    (job, shard_id, checkpoint, int(shard_done)),
                )
        return new

    def add_failed_item(self, plan: ItemPlan, reason: str) -> bool:
        """An item that can never be sent (e.g. a manifest key missing from the bucket); its
        listed objects point at it so a report shows why. True when it is new."""
        with self._tx():
            cur = self.db.execute(
                "INSERT INTO items(job, path, name, payload, keys, state, reason, run_id, "
                "updated_at, final) VALUES (?,?,?,?,?,'FAILED',?,?,?,1) "
                "ON CONFLICT(job, path, name) DO NOTHING",
                (
                    self.job,
                    plan.path,
                    plan.name,
                    orjson.dumps(plan.payload),
                    orjson.dumps(list(plan.keys)),
                    reason,
                    self._run_id,
                    time.time(),
                ),
            )
            if cur.rowcount != 1:
                return False
            self.db.executemany(
                "UPDATE objects SET state='PLANNED', item_id=? "
                "WHERE job=? AND key=? AND item_id IS NULL",
                [(cur.lastrowid, self.job, k) for k in plan.keys],
            )
        return True

    def pending_items(self, batch: int = CHUNK) -> Iterator[tuple[ItemPlan, int]]:
        """Items left PLANNED, PROCESSING or SENT (crash recovery), oldest first. Only items
        that existed when the stream started are returned, so items planned meanwhile are not
        seen twice. An item whose media work was not finished comes back with ``media`` set."""
        top = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0]
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT id, path, name, payload, keys, attempts, media, readonly_endpoint "
                "FROM items WHERE job=? AND state IN ('PLANNED','PROCESSING','SENT') "
                "AND id > ? AND id <= ? ORDER BY id LIMIT ?",
                (self.job, last, top, batch),
            ).fetchall()
            if not rows:
                return
            for item_id, path, name, payload, keys, attempts, media, ro in rows:
                plan = ItemPlan(
                    path,
                    name,
                    orjson.loads(payload),
                    tuple(orjson.loads(keys)),
                    media=Media(media),
                    readonly_endpoint=bool(ro),
                )
                yield plan, int(attempts)
                last = item_id

    # --- media (thumbnails, local video processing) ------------------------------------------

    def mark_processing(self, item: ItemPlan) -> None:
        """The item's media work started (committed: a crash leaves it PROCESSING, re-done)."""
        with self._tx():
            self.db.execute(
                "UPDATE items SET state='PROCESSING', updated_at=? WHERE job=? AND path=? "
                "AND name=?",
                (time.time(), self.job, item.path, item.name),
            )

    def media_done(self, item: ItemPlan) -> None:
        """Store the completed payload; the item is ready to send (PLANNED, no media left)."""
        with self._tx():
            self.db.execute(
                "UPDATE items SET state='PLANNED', payload=?, media='', updated_at=? "
                "WHERE job=? AND path=? AND name=?",
                (orjson.dumps(item.payload), time.time(), self.job, item.path, item.name),
            )

    def media_failed(self, item: ItemPlan, reason: str, *, final: bool = False) -> None:
        """Media work failed: FAILED with the reason; ``final`` when the same bytes would fail
        again (corrupt image, no video stream), so the worker does not retry it by itself.
        ``media`` stays set, so ``ingest retry`` processes the item again."""
        with self._tx():
            self.db.execute(
                "UPDATE items SET state='FAILED', reason=?, updated_at=?, failures=failures+1, "
                "final=? WHERE job=? AND path=? AND name=?",
                (reason, time.time(), int(final), self.job, item.path, item.name),
            )

    def cached_media(self, bucket: str, key: str, etag: str, kind: str) -> Any:
        """A media result made earlier for this exact object version (any job), or None."""
        if not etag:
            return None
        row = self.db.execute(
            "SELECT result FROM media_cache WHERE bucket=? AND key=? AND etag=? AND kind=?",
            (bucket, key, etag, kind),
        ).fetchone()
        return orjson.loads(row[0]) if row else None

    def cache_media(self, bucket: str, key: str, etag: str, kind: str, result: Any) -> None:
        if not etag:
            return
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO media_cache(bucket, key, etag, kind, result) "
                "VALUES (?,?,?,?,?)",
                (bucket, key, etag, kind, orjson.dumps(result)),
            )

    def object_meta(self, key: str) -> tuple[str, int]:
        """(etag, size) of a listed object; ("", 0) when the ledger never saw it."""
        info = self.object_info(key)
        return (info.etag, info.size) if info else ("", 0)

    # --- sending ---------------------------------------------------------------------------

    def mark_sent(self, items: Sequence[ItemPlan]) -> dict[tuple[str, str], int]:
        """Mark SENT and count the attempt; committed before returning (before the POST)."""
        now = time.time()
        out: dict[tuple[str, str], int] = {}
        keys = [(it.path, it.name) for it in items]
        with self._tx():
            if len(set(keys)) < len(keys):  # the same item twice: count each attempt, in order
                for path, name in keys:
                    row = self.db.execute(
                        "UPDATE items SET state='SENT', attempts=attempts+1, updated_at=? "
                        "WHERE job=? AND path=? AND name=? RETURNING attempts",
                        (now, self.job, path, name),
                    ).fetchone()
                    out[(path, name)] = int(row[0]) if row else 1
                return out
            # One UPDATE ... FROM (VALUES ...) RETURNING per chunk instead of one per item.
            for i in range(0, len(keys), _ROWS_PER_INSERT):
                chunk = keys[i : i + _ROWS_PER_INSERT]
                rows = self.db.execute(
                    "UPDATE items SET state='SENT', attempts=attempts+1, updated_at=? FROM "
                    f"(VALUES {','.join(['(?,?)'] * len(chunk))}) AS v "
                    "WHERE items.job=? AND items.path=v.column1 AND items.name=v.column2 "
                    "RETURNING items.path, items.name, items.attempts",
                    [now, *(x for key in chunk for x in key), self.job],
                ).fetchall()
                out.update(((path, name), int(n)) for path, name, n in rows)
        for key in keys:
            out.setdefault(key, 1)  # no such row: a first attempt, as far as we know
        return {key: out[key] for key in keys}

    def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        now = time.time()
        with self._tx():
            if len({(o.path, o.name) for o in outcomes}) < len(outcomes):
                # The same item twice: apply in order, the last outcome wins.
                self.db.executemany(
                    "UPDATE items SET state=?, v7_id=?, reason=?, updated_at=?, "
                    "failures=failures+(?='FAILED'), final=? WHERE job=? AND path=? AND name=?",
                    [
                        (
                            str(o.state),
                            o.v7_id,
                            o.reason,
                            now,
                            str(o.state),
                            _final(o),
                            self.job,
                            o.path,
                            o.name,
                        )
                        for o in outcomes
                    ],
                )
                return
            # One UPDATE ... FROM (VALUES ...) per chunk instead of one statement per item.
            for i in range(0, len(outcomes), _ROWS_PER_INSERT):
                chunk = outcomes[i : i + _ROWS_PER_INSERT]
                self.db.execute(
                    "UPDATE items SET state=v.column1, v7_id=v.column2, reason=v.column3, "
                    "failures=items.failures+(v.column1='FAILED'), final=v.column6, "
                    f"updated_at=? FROM (VALUES {','.join(['(?,?,?,?,?,?)'] * len(chunk))}) AS v "
                    "WHERE items.job=? AND items.path=v.column4 AND items.name=v.column5",
                    [
                        now,
                        *(
                            x
                            for o in chunk
                            for x in (str(o.state), o.v7_id, o.reason, o.path, o.name, _final(o))
                        ),
                        self.job,
                    ],
                )

    def requeue_failed(self, blocked_reason: str | None = None) -> int:
        with self._tx():
            n = self.db.execute(
                "UPDATE items SET state='PLANNED', reason='', final=0 "
                "WHERE job=? AND state='FAILED'",
                (self.job,),
            ).rowcount
            if blocked_reason:
                n += self.db.execute(
                    "UPDATE items SET state='PLANNED', reason='' "
                    "WHERE job=? AND state='BLOCKED' AND reason=?",
                    (self.job, blocked_reason),
                ).rowcount
        return int(n)

    def requeue_due(self, is_due: Callable[[int, float], bool], batch: int = CHUNK) -> int:
        """FAILED items whose back-off has passed, back to PLANNED. ``is_due(failures,
        failed_at)`` decides (pure, from the worker's policy); streamed over FAILED rows only.
        Not retried: a final failure (V7 rejected the item, the media is corrupt: only a new
        version of the object or `ingest retry` can change that), and an item whose object a
        sync found gone from the bucket."""
        last, n = 0, 0
        while True:
            rows = self.db.execute(
                "SELECT id, failures, updated_at FROM items WHERE job=? AND state='FAILED' "
                "AND final=0 AND id > ? AND NOT EXISTS (SELECT 1 FROM json_each(CAST(items.keys "
                "AS TEXT)) AS k JOIN objects o ON o.job=items.job AND o.key=k.value "
                "WHERE o.vanished_at>0) ORDER BY id LIMIT ?",
                (self.job, last, batch),
            ).fetchall()
            if not rows:
                return n
            due = [(self.job, i) for i, failures, at in rows if is_due(int(failures), float(at))]
            if due:
                with self._tx():
                    self.db.executemany(
                        "UPDATE items SET state='PLANNED', reason='' WHERE job=? AND id=? "
                        "AND state='FAILED' AND final=0",
                        due,
                    )
                n += len(due)
            last = rows[-1][0]

    # --- sync: the ledger's side of the listing merge ------------------------------------------

    def iter_known(
        self, prefix: str, recursive: bool, start: str = "", batch: int = CHUNK
    ) -> Iterator[Known]:
        """Objects of one shard in key order from ``start`` (inclusive): keys under ``prefix``
        (recursive) or directly under it. Sub-folders of a non-recursive shard are skipped
        with one seek each, not read."""
        lo, inclusive = max(prefix, start), True
        hi = prefix_end(prefix)
        while True:
            op = ">=" if inclusive else ">"
            rows = self.db.execute(
                f"SELECT {_KNOWN_COLUMNS} FROM objects WHERE job=? "
                f"AND key {op} ? AND (? IS NULL OR key < ?) ORDER BY key LIMIT ?",
                (self.job, lo, hi, hi, batch),
            ).fetchall()
            seek = None
            for row in rows:
                key = row[0]
                if not recursive:
                    cut = key.find("/", len(prefix))
                    if cut >= 0:  # a sub-folder: listed by another shard
                        seek = prefix_end(key[: cut + 1])
                        break
                yield _known(row)
            if seek is not None:
                lo, inclusive = seek, True
            elif len(rows) < batch:
                return
            else:
                lo, inclusive = rows[-1][0], False

    def known(self, key: str) -> Known | None:
        row = self.db.execute(
            f"SELECT {_KNOWN_COLUMNS} FROM objects WHERE job=? AND key=?", (self.job, key)
        ).fetchone()
        return _known(row) if row else None

    def sub_folders(self, prefix: str) -> Iterator[str]:
        """Distinct first-level folders under ``prefix`` that the ledger holds keys for."""
        lo, hi = prefix, prefix_end(prefix)
        while True:
            row = self.db.execute(
                "SELECT key FROM objects WHERE job=? AND key >= ? AND (? IS NULL OR key < ?) "
                "AND instr(substr(key, ?), '/') > 0 ORDER BY key LIMIT 1",
                (self.job, lo, hi, hi, len(prefix) + 1),
            ).fetchone()
            if row is None:
                return
            key = row[0]
            folder = key[: key.index("/", len(prefix)) + 1]
            yield folder
            nxt = prefix_end(folder)
            if nxt is None:
                return
            lo = nxt

    def record_sync_page(
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
        now = time.time()
        with self._tx():
            gone = self.db.executemany(
                "UPDATE objects SET vanished_at=? WHERE job=? AND key=? AND vanished_at=0",
                [(now, self.job, k) for k in vanished],
            ).rowcount
            self.db.executemany(
                "UPDATE objects SET vanished_at=0 WHERE job=? AND key=?",
                [(self.job, k) for k in reappeared],
            )
            self.db.executemany(
                "UPDATE objects SET changed=1, changed_etag=? WHERE job=? AND key=?",
                [(etag, self.job, k) for k, etag in changed],
            )
        return max(gone, 0)

    def mark_vanished_under(self, prefix: str) -> int:
        """Every object under ``prefix`` is gone (the whole folder vanished from the listing)."""
        hi = prefix_end(prefix)
        with self._tx():
            n = self.db.execute(
                "UPDATE objects SET vanished_at=? WHERE job=? AND key >= ? "
                "AND (? IS NULL OR key < ?) AND vanished_at=0",
                (time.time(), self.job, prefix, hi, hi),
            ).rowcount
        return int(n)

    def record_new_version(self, obj: ObjectInfo, plan: ItemPlan) -> bool:
        """A changed object registered again as a new item (sync.on_change = "register"): the
        object now points at the new item; the old item stays in V7 untouched."""
        with self._tx():
            row = self.db.execute(
                "INSERT INTO items(job, path, name, payload, keys, state, run_id, updated_at, "
                "media, readonly_endpoint) VALUES (?,?,?,?,?,'PLANNED',?,?,?,?) "
                "ON CONFLICT(job, path, name) DO NOTHING RETURNING id",
                (
                    self.job,
                    plan.path,
                    plan.name,
                    orjson.dumps(plan.payload),
                    orjson.dumps(list(plan.keys)),
                    self._run_id,
                    time.time(),
                    str(plan.media),
                    int(plan.readonly_endpoint),
                ),
            ).fetchone()
            created = row is not None
            if row is None:
                # This version was registered before (the object changed back to it): point the
                # object at that item instead of reporting it as changed on every sync. An item
                # of that name made of another key is not ours: report the change instead.
                row = self.db.execute(
                    "SELECT id FROM items WHERE job=? AND path=? AND name=? AND keys=?",
                    (self.job, plan.path, plan.name, orjson.dumps([obj.key])),
                ).fetchone()
                if row is None:
                    self.db.execute(
                        "UPDATE objects SET changed=1, changed_etag=? WHERE job=? AND key=?",
                        (obj.etag, self.job, obj.key),
                    )
                    return False
            self.db.execute(
                "UPDATE objects SET etag=?, size=?, last_modified=?, item_id=?, changed=0, "
                "changed_etag='', vanished_at=0, state='PLANNED' WHERE job=? AND key=?",
                (obj.etag, obj.size, obj.last_modified, row[0], self.job, obj.key),
            )
        return created

    def item_key_count(self, key: str) -> int:
        """How many objects the item of ``key`` is made of (0 when it has no item)."""
        row = self.db.execute(
            "SELECT i.keys FROM objects o JOIN items i ON i.id = o.item_id "
            "WHERE o.job=? AND o.key=?",
            (self.job, key),
        ).fetchone()
        return len(orjson.loads(row[0])) if row else 0

    # --- leases: one writer per job -----------------------------------------------------------

    def acquire_lease(
        self,
        holder: str,
        ttl_s: float,
        now: float,
        holder_dead: Callable[[str], bool] = lambda _holder: False,
    ) -> Lease | None:
        """Take (or renew) the job's lease; None when it is ours. Returns the live lease of
        someone else when they hold it: the caller refuses to run. ``holder_dead(holder)``
        lets a lease whose holder is known dead (same host, no such process) go at once."""
        with self._tx():
            row = self.db.execute(
                "SELECT holder, acquired_at, expires_at FROM leases WHERE job=?", (self.job,)
            ).fetchone()
            if row is not None and row[0] != holder and row[2] > now and not holder_dead(row[0]):
                return Lease(row[0], row[1], row[2])
            self.db.execute(
                "INSERT INTO leases(job, holder, acquired_at, expires_at) VALUES (?,?,?,?) "
                "ON CONFLICT(job) DO UPDATE SET holder=excluded.holder, "
                "acquired_at=excluded.acquired_at, expires_at=excluded.expires_at",
                (self.job, holder, now, now + ttl_s),
            )
        return None

    def renew_lease(self, holder: str, ttl_s: float, now: float) -> bool:
        """Extend our lease; False when it is no longer ours (expired and taken over)."""
        with self._tx():
            n = self.db.execute(
                "UPDATE leases SET expires_at=? WHERE job=? AND holder=?",
                (now + ttl_s, self.job, holder),
            ).rowcount
        return n == 1

    def release_lease(self, holder: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM leases WHERE job=? AND holder=?", (self.job, holder))

    def item_state(self, path: str, name: str) -> State | None:
        row = self.db.execute(
            "SELECT state FROM items WHERE job=? AND path=? AND name=?", (self.job, path, name)
        ).fetchone()
        return State(row[0]) if row else None

    # --- reading ---------------------------------------------------------------------------

    _EFFECTIVE = "COALESCE(i.state, o.state)"

    def status(self, runs: int = 5) -> Status:
        st = Status(self.job)
        st.objects_by_state = dict(
            self.db.execute(
                f"SELECT {self._EFFECTIVE} AS s, count(*) FROM objects o "
                "LEFT JOIN items i ON i.id = o.item_id WHERE o.job=? GROUP BY s",
                (self.job,),
            ).fetchall()
        )
        st.items_by_state = dict(
            self.db.execute(
                "SELECT state, count(*) FROM items WHERE job=? GROUP BY state", (self.job,)
            ).fetchall()
        )
        st.failures_by_reason = [
            (f"{s}: {r}", int(n))
            for s, r, n in self.db.execute(
                "SELECT state, reason, count(*) AS n FROM items WHERE job=? "
                "AND state IN ('FAILED','BLOCKED') GROUP BY state, reason ORDER BY n DESC "
                "LIMIT 20",
                (self.job,),
            )
        ] + [
            (f"SKIPPED: {r}", int(n))
            for r, n in self.db.execute(
                "SELECT reason, count(*) AS n FROM objects WHERE job=? AND state='SKIPPED' "
                "GROUP BY reason ORDER BY n DESC LIMIT 20",
                (self.job,),
            )
        ]
        changed, vanished = self.db.execute(
            "SELECT COALESCE(SUM(changed=1 AND vanished_at=0), 0), "
            "COALESCE(SUM(vanished_at>0), 0) FROM objects WHERE job=?",
            (self.job,),
        ).fetchone()
        st.changed_objects, st.vanished_objects = int(changed), int(vanished)
        for rid, kind, started, finished, status, counts in self.db.execute(
            "SELECT id, kind, started_at, finished_at, status, counts FROM runs WHERE job=? "
            "ORDER BY id DESC LIMIT ?",
            (self.job, runs),
        ):
            st.last_runs.append(
                {
                    "id": rid,
                    "kind": kind,
                    "started_at": _iso(started),
                    "finished_at": _iso(finished) if finished else None,
                    "status": status,
                    "counts": orjson.loads(counts) if counts else {},
                }
            )
        return st

    def report_rows(self, batch: int = CHUNK) -> Iterator[ReportRow]:
        """One row per object in key order, streamed."""
        last = ""
        first = True
        while True:
            rows = self.db.execute(
                f"SELECT o.key, {self._EFFECTIVE}, COALESCE(i.path,''), COALESCE(i.name,''), "
                "COALESCE(i.v7_id,''), CASE WHEN o.item_id IS NULL THEN o.reason "
                "ELSE COALESCE(i.reason,'') END, o.etag, o.size, CASE WHEN o.vanished_at>0 "
                "THEN 'vanished' WHEN o.changed=1 AND o.changed_etag!='' THEN "
                "'changed (etag ' || o.changed_etag || ')' WHEN o.changed=1 THEN 'changed' "
                "ELSE '' END FROM objects o "
                "LEFT JOIN items i ON i.id = o.item_id WHERE o.job=? AND (? OR o.key > ?) "
                "ORDER BY o.key LIMIT ?",
                (self.job, first, last, batch),
            ).fetchall()
            if not rows:
                return
            for r in rows:
                yield ReportRow(*r)
            last, first = rows[-1][0], False

    def iter_keys(self, after: str = "", batch: int = CHUNK) -> Iterator[tuple[str, str]]:
        """(key, etag) in key order from ``after``: one side of a listing/ledger merge."""
        last = after
        while True:
            rows = self.db.execute(
                "SELECT key, etag FROM objects WHERE job=? AND key > ? ORDER BY key LIMIT ?",
                (self.job, last, batch),
            ).fetchall()
            if not rows:
                return
            yield from rows
            last = rows[-1][0]

    # --- manifests -----------------------------------------------------------------------

    def stage_manifest(self, rows: Iterable[tuple[str, str, str, str]]) -> int:
        """(item_name, slot_name, key, path) rows into a staging table, in chunked transactions."""
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS manifest (job TEXT, item_name TEXT, slot_name TEXT, "
            "key TEXT, path TEXT, seq INTEGER)"
        )
        self.db.execute(
            "CREATE INDEX IF NOT EXISTS manifest_item ON manifest (job, path, item_name, seq)"
        )
        self.db.execute("CREATE INDEX IF NOT EXISTS manifest_key ON manifest (job, key)")
        with self._tx():
            self.db.execute("DELETE FROM manifest WHERE job=?", (self.job,))
        n = 0
        chunk: list[tuple[str, str, str, str, str, int]] = []
        for item_name, slot_name, key, path in rows:
            chunk.append((self.job, item_name, slot_name, key, path, n))
            n += 1
            if len(chunk) >= CHUNK:
                self._insert_manifest(chunk)
                chunk = []
        if chunk:
            self._insert_manifest(chunk)
        return n

    def _insert_manifest(self, chunk: list[tuple[str, str, str, str, str, int]]) -> None:
        with self._tx():
            self.db.executemany("INSERT INTO manifest VALUES (?,?,?,?,?,?)", chunk)

    def iter_manifest_items(self) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
        """(item_name, path, [(slot_name, key), ...]) grouped by item (path + name), in file
        order within an item, streamed with keyset pagination."""
        current: tuple[str, str] | None = None
        slots: list[tuple[str, str]] = []
        last: tuple[str, str, int] = ("", "", -1)
        while True:
            rows = self.db.execute(
                "SELECT path, item_name, seq, slot_name, key FROM manifest WHERE job=? AND "
                "(path, item_name, seq) > (?, ?, ?) ORDER BY path, item_name, seq LIMIT ?",
                (self.job, *last, CHUNK),
            ).fetchall()
            if not rows:
                break
            for path, item_name, seq, slot_name, key in rows:
                if current != (item_name, path):
                    if current is not None:
                        yield current[0], current[1], slots
                    current, slots = (item_name, path), []
                slots.append((slot_name, key))
                last = (path, item_name, seq)
        if current is not None:
            yield current[0], current[1], slots

    def in_manifest(self, key: str) -> bool:
        row = self.db.execute(
            "SELECT 1 FROM manifest WHERE job=? AND key=? LIMIT 1", (self.job, key)
        ).fetchone()
        return row is not None

    def object_info(self, key: str) -> ObjectInfo | None:
        """The object as last listed, or None when the listing never saw it."""
        row = self.db.execute(
            "SELECT etag, size, last_modified FROM objects WHERE job=? AND key=?", (self.job, key)
        ).fetchone()
        return ObjectInfo(key, int(row[1]), str(row[0]), str(row[2])) if row else None


def _collision(plan: ItemPlan, other_key: str) -> str:
    where = plan.path.rstrip("/") + "/" + plan.name
    return (
        f"name collision: item '{where}' already comes from '{other_key}' (rename one, or "
        "change plan.preserve_folders / plan.slots)"
    )[:300]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


class _Tx:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
