"""The SQLite ledger itself: its thread, files (legacy, foreign, broken), crash durability, memory.

What every backend must do is in the contract suite (tests/ledger_contract.py)."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from ingest.errors import LedgerBusy, LedgerError
from ingest.ledger import SCHEMA_VERSION, SqliteLedger, codec, memory, open_ledger
from ingest.ledger.sqlite import _ADDED_COLUMNS, _SCHEMA
from ingest.model import (
    ImageFacts,
    Item,
    ItemType,
    Media,
    ObjectInfo,
    Slot,
    State,
    UploadFacts,
)
from tests.ledger_contract import collide, page, record
from tests.support.samples import legacy_video_slot, video_facts

pytestmark = pytest.mark.timeout(180)

REPO = str(Path(__file__).resolve().parents[1])


def user_version(path: Path) -> int:
    db = sqlite3.connect(path)
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    finally:
        db.close()


# --- the thread -----------------------------------------------------------------------------------


async def test_the_event_loop_keeps_running_while_a_big_page_commits(tmp_path: Path) -> None:
    """20k objects in one record_page: a task ticking on the loop keeps ticking meanwhile."""
    async with open_ledger(tmp_path / "l.sqlite", "j") as lg:
        await lg.start_run("run")
        objs, plans = page([f"big/{i:06d}.jpg" for i in range(20_000)])
        ticks = 0
        stop = False

        async def ticker() -> None:
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker has started
        before = ticks
        new = await lg.record_page("s", "", True, objs, plans, collide)
        during = ticks - before
        stop = True
        await task
        assert len(new) == 20_000
        # Had the page been written on the loop's thread, not one tick could happen during it.
        assert during > 100, during


async def test_every_statement_runs_on_the_ledgers_own_thread(tmp_path: Path) -> None:
    import threading

    seen: set[int] = set()
    async with open_ledger(tmp_path / "l.sqlite", "j") as lg:
        assert isinstance(lg, SqliteLedger)

        def spy(db: sqlite3.Connection) -> None:
            db.set_trace_callback(lambda _sql: seen.add(threading.get_ident()))

        await lg._run(spy)
        await lg.start_run("run")
        await record(lg, ["a.jpg", "b.jpg"])
        _ = [p async for p in lg.pending()]
        await lg.status()
    assert len(seen) == 1 and threading.get_ident() not in seen


async def test_calls_queued_meanwhile_share_one_commit(tmp_path: Path) -> None:
    """Group commit: 16 senders marking their batches SENT while the thread is busy cost
    fewer commits than calls, every attempt is counted, and one call's failure undoes only
    its own writes."""
    async with open_ledger(tmp_path / "l.sqlite", "j") as lg:
        assert isinstance(lg, SqliteLedger)
        await lg.start_run("run")
        keys = [f"k/{i:03d}.jpg" for i in range(160)]
        items = await record(lg, keys)
        statements: list[str] = []

        def spy(db: sqlite3.Connection) -> None:
            db.set_trace_callback(statements.append)

        await lg._run(spy)
        gate, entered = threading.Event(), threading.Event()

        def busy(_db: sqlite3.Connection) -> None:
            entered.set()
            gate.wait(10)  # hold the thread until every call below is queued

        def broken(db: sqlite3.Connection) -> None:
            from ingest.ledger.sqlite import _tx

            with _tx(db):
                db.execute("UPDATE items SET reason='half-done' WHERE job='j'")
                db.execute("SELECT * FROM no_such_table")

        blocker = asyncio.ensure_future(lg._run(busy))
        await asyncio.to_thread(entered.wait, 10)
        batches = [items[i : i + 10] for i in range(0, 160, 10)]
        calls = [asyncio.ensure_future(lg.mark_sent(b)) for b in batches]
        failing = asyncio.ensure_future(lg._run(broken))
        await asyncio.sleep(0)
        gate.set()
        await blocker
        attempts = await asyncio.gather(*calls)
        with pytest.raises(LedgerError, match="no_such_table"):
            await failing
        commits = sum(1 for sql in statements if sql.strip().upper() == "COMMIT")
        assert attempts == [[1] * 10] * 16
        assert 1 <= commits < 16, commits
        states = await lg.item_states([i.ident for i in items])
        assert set(states.values()) == {State.SENT}
        st = await lg.status()
        assert st.items_by_state == {"SENT": 160}
        reasons = await lg._run(
            lambda db: db.execute("SELECT count(*) FROM items WHERE reason='half-done'").fetchone()
        )
        assert reasons[0] == 0


async def test_an_error_that_ends_the_group_transaction_is_reported_truthfully(
    tmp_path: Path,
) -> None:
    """A full disk (or an I/O error) rolls the whole group back: the calls before it get that
    error (their writes are gone), the ones after it run alone and succeed."""
    async with open_ledger(tmp_path / "l.sqlite", "j") as lg:
        assert isinstance(lg, SqliteLedger)
        await lg.start_run("run")
        await record(lg, ["a.jpg", "b.jpg", "c.jpg"])
        gate, entered = threading.Event(), threading.Event()

        def busy(_db: sqlite3.Connection) -> None:
            entered.set()
            gate.wait(10)

        def write(reason: str) -> Callable[[sqlite3.Connection], None]:
            def work(db: sqlite3.Connection) -> None:
                from ingest.ledger.sqlite import _tx

                with _tx(db):
                    db.execute("UPDATE items SET reason=? WHERE name=?", (reason, reason))

            return work

        def disk_full(db: sqlite3.Connection) -> None:
            db.execute("ROLLBACK")  # what SQLite itself does on SQLITE_FULL
            raise sqlite3.OperationalError("database or disk is full")

        blocker = asyncio.ensure_future(lg._run(busy))
        await asyncio.to_thread(entered.wait, 10)  # the thread is busy: the next calls queue
        before = asyncio.ensure_future(lg._run(write("a.jpg")))
        full = asyncio.ensure_future(lg._run(disk_full))
        after = asyncio.ensure_future(lg._run(write("c.jpg")))
        await asyncio.sleep(0)
        gate.set()
        await blocker
        for fut in (before, full):
            with pytest.raises(LedgerError, match="disk is full"):
                await fut
        await after
        rows = await lg._run(
            lambda db: db.execute("SELECT name FROM items WHERE reason=name").fetchall()
        )
        assert rows == [("c.jpg",)]


async def test_a_schema_5_ledger_gains_the_id_lookups_column(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    async with open_ledger(path, "j") as lg:
        await lg.start_run("run")
        await record(lg, ["a.jpg"])
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE items DROP COLUMN id_lookups")
    db.execute("PRAGMA user_version=5")
    db.commit()
    db.close()
    async with open_ledger(path, "j") as lg:
        assert await lg.registered_without_id(10) == []
    assert user_version(path) == SCHEMA_VERSION == 6


async def test_a_scratch_ledger_in_memory() -> None:
    async with memory("j") as a, open_ledger(":memory:", "j") as b:
        await a.start_run("plan")
        assert len(await record(a, ["x.jpg"])) == 1
        assert (await b.status()).items_by_state == {}  # each one its own


async def test_a_closed_ledger_says_so(tmp_path: Path) -> None:
    lg = await open_ledger(tmp_path / "l.sqlite", "j")
    await lg.close()
    await lg.close()  # twice is fine
    with pytest.raises(LedgerError, match="closed"):
        await lg.status()


# --- files it cannot use -------------------------------------------------------------------------


def one_line(exc: LedgerError, *words: str) -> None:
    msg = str(exc)
    assert "\n" not in msg and "Traceback" not in msg
    for w in words:
        assert w in msg, msg
    # No driver exception chained to it: nothing but this line to show.
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


async def test_a_missing_directory_is_created(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "ledger.sqlite"
    async with open_ledger(path, "j") as lg:
        await lg.start_run("run")
    assert user_version(path) == SCHEMA_VERSION


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LedgerError) as e:
        await open_ledger(tmp_path, "j")
    one_line(e.value, str(tmp_path), "is a directory")


async def test_an_unwritable_place_is_refused() -> None:
    if sys.platform != "linux":
        pytest.skip("needs /proc")
    target = Path("/proc/ingest-ledger-test.sqlite")  # not writable, not even by root
    with pytest.raises(LedgerError) as e:
        await open_ledger(target, "j")
    one_line(e.value, str(target))


async def test_a_read_only_file_is_refused(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes read-only files")
    path = tmp_path / "l.sqlite"
    async with open_ledger(path, "j"):
        pass
    path.chmod(0o444)
    with pytest.raises(LedgerError) as e:
        async with open_ledger(path, "j") as lg:
            await lg.start_run("run")
    one_line(e.value, str(path), "not writable")


async def test_a_junk_file_is_not_a_ledger(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are my notes, not a database\n" * 200)
    with pytest.raises(LedgerError) as e:
        await open_ledger(path, "j")
    one_line(e.value, str(path), "is not an ingest ledger (file is not a database)")
    assert path.read_bytes().startswith(b"these are my notes")


@pytest.mark.parametrize(
    ("sql", "version"),
    [
        ("CREATE TABLE photos (id INTEGER PRIMARY KEY, title TEXT)", 0),
        ("CREATE TABLE photos (id INTEGER PRIMARY KEY, title TEXT)", 3),
        ("CREATE TABLE objects (id INTEGER PRIMARY KEY, blob BLOB)", 0),
        ("CREATE TABLE items (x); CREATE TABLE objects (y)", 2),
    ],
    ids=["foreign-tables", "foreign-versioned", "our-table-name", "our-names-other-columns"],
)
async def test_another_applications_database_is_refused(
    tmp_path: Path, sql: str, version: int
) -> None:
    path = tmp_path / "app.db"
    db = sqlite3.connect(path)
    db.executescript(sql)
    db.execute(f"PRAGMA user_version={version}")
    db.commit()
    db.close()
    with pytest.raises(LedgerError) as e:
        await open_ledger(path, "j")
    one_line(e.value, str(path), "another application", "not an ingest ledger")
    db = sqlite3.connect(path)  # left as it was: not even switched to WAL
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert int(db.execute("PRAGMA user_version").fetchone()[0]) == version
    db.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    async with open_ledger(path, "j"):
        pass
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LedgerError) as e:
        await open_ledger(path, "j")
    one_line(e.value, str(path), "newer version", "upgrade")


async def test_a_url_opens_postgresql_and_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(LedgerError) as e:  # a host that does not resolve: PostgreSQL tried
        await open_ledger("postgresql://u:pw@no-such-host.invalid/ingest", "j")
    one_line(e.value, "cannot reach the PostgreSQL server", "u:***@")
    with pytest.raises(LedgerError) as e:
        await open_ledger("mysql://u@db/ingest", "j")
    one_line(e.value, "'mysql://' is not a ledger backend")


async def test_a_ledger_locked_too_long_is_busy_and_retryable(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    lg = await SqliteLedger.open(path, "j", busy_timeout_s=0.05)
    try:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process writing for a long time
        with pytest.raises(LedgerBusy) as e:
            await lg.start_run("run")
        assert e.value.retryable is True and isinstance(e.value, LedgerError)
        one_line(e.value, str(path), "locked", "try again")
        other.execute("ROLLBACK")
        other.close()
        await lg.start_run("run")  # usable again once the other writer is done
        assert len(await record(lg, ["a.jpg"])) == 1
    finally:
        await lg.close()


# --- old ledgers ---------------------------------------------------------------------------------

SCHEMA_4 = """CREATE TABLE IF NOT EXISTS items (
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


def _legacy_ledger(path: Path) -> None:
    """A ledger as the engine before typed items left it: schema 4, V7 wire payloads."""
    db = sqlite3.connect(path)
    db.executescript(SCHEMA_4)

    def obj(key: str, etag: str, size: int, state: str = "PLANNED") -> None:
        db.execute(
            "INSERT INTO objects(job, key, etag, size, last_modified, state) "
            "VALUES ('job', ?, ?, ?, '2024-05-01T00:00:00Z', ?)",
            (key, etag, size, state),
        )

    def item(
        path: str,
        name: str,
        payload: object,
        keys: list[str],
        state: str,
        attempts: int = 0,
        media: str = "",
        readonly: int = 0,
    ) -> None:
        cur = db.execute(
            "INSERT INTO items(job, path, name, payload, keys, state, attempts, updated_at, "
            "media, readonly_endpoint) VALUES ('job',?,?,?,?,?,?,1.0,?,?)",
            (
                path,
                name,
                orjson.dumps(payload),
                orjson.dumps(keys),
                state,
                attempts,
                media,
                readonly,
            ),
        )
        db.executemany(
            "UPDATE objects SET item_id=? WHERE job='job' AND key=?",
            [(cur.lastrowid, k) for k in keys],
        )

    for key, etag, size in [
        ("a/1.jpg", "e1", 11),
        ("ro/t.jpg", "et", 12),
        ("s/1.dcm", "d1", 1),
        ("s/2.dcm", "d2", 2),
        ("s/a.jpg", "da", 3),
        ("v/c.mp4", "ev", 5000),
        ("done.jpg", "ed", 4),
    ]:
        obj(key, etag, size)
    obj("held.dcm", "eh", 9, "DISCOVERED")
    item(
        "/a",
        "1.jpg",
        {"path": "/a", "type": "image", "storage_key": "a/1.jpg", "name": "1.jpg"},
        ["a/1.jpg"],
        "PLANNED",
    )
    item(
        "/ro",
        "t.jpg",
        {
            "path": "/ro",
            "type": "image",
            "storage_key": "ro/t.jpg",
            "name": "t.jpg",
            "storage_thumbnail_key": "th/t.jpg",
            "width": 40,
            "height": 30,
        },
        ["ro/t.jpg"],
        "SENT",
        attempts=1,
        readonly=1,
    )
    series = [
        {"slot_name": "0", "type": "dicom", "storage_key": "s/1.dcm", "file_name": "1.dcm"},
        {"slot_name": "0", "type": "dicom", "storage_key": "s/2.dcm", "file_name": "2.dcm"},
        {"slot_name": "a.jpg", "type": "image", "storage_key": "s/a.jpg", "file_name": "a.jpg"},
    ]
    item(
        "/",
        "s",
        {"path": "/", "name": "s", "slots": series},
        ["s/1.dcm", "s/2.dcm", "s/a.jpg"],
        "PROCESSING",
        media="upload",
    )
    item(
        "/v",
        "c.mp4",
        {"path": "/v", "name": "c.mp4", "slots": [VIDEO_SLOT]},
        ["v/c.mp4"],
        "PLANNED",
        readonly=1,
    )
    item(
        "/",
        "done.jpg",
        {"path": "/", "type": "image", "storage_key": "done.jpg", "name": "done.jpg"},
        ["done.jpg"],
        "REGISTERED",
    )
    db.executemany(
        "INSERT INTO media_cache VALUES ('bkt', ?, ?, ?, ?)",
        [
            (
                "ro/t.jpg",
                "et",
                "thumbnail/v1",
                orjson.dumps({"storage_thumbnail_key": "th/t.jpg", "height": 30, "width": 40}),
            ),
            ("a/1.jpg", "e1", "upload/v1", orjson.dumps("art/files/abc/1.jpg")),
            ("v/c.mp4", "ev", "video/v1:opts", orjson.dumps(VIDEO_SLOT)),
        ],
    )
    db.execute("INSERT INTO jobs VALUES ('job', 0)")
    db.execute("INSERT INTO listing VALUES ('job', 's0', 'v/c.mp4', 0)")
    db.execute("PRAGMA user_version=4")
    db.commit()
    db.close()


VIDEO_FACTS = video_facts("v/c.mp4")
VIDEO_SLOT = legacy_video_slot(VIDEO_FACTS)


def _info(key: str, etag: str, size: int) -> ObjectInfo:
    return ObjectInfo(key, size, etag, "2024-05-01T00:00:00Z")


async def test_a_schema_4_ledger_migrates_and_its_items_decode(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _legacy_ledger(path)
    async with open_ledger(path, "job") as lg:
        assert user_version(path) == SCHEMA_VERSION  # an old engine now refuses the file
        got = [(p.item, p.attempts) async for p in lg.pending()]
        assert got == [
            (
                Item(
                    "/a",
                    "1.jpg",
                    (Slot("0", ItemType.IMAGE, (_info("a/1.jpg", "e1", 11),), "1.jpg"),),
                    compact=True,
                ),
                0,
            ),
            (
                Item(
                    "/ro",
                    "t.jpg",
                    (
                        Slot(
                            "0",
                            ItemType.IMAGE,
                            (_info("ro/t.jpg", "et", 12),),
                            "t.jpg",
                            facts=(ImageFacts(40, 30, "th/t.jpg"),),
                        ),
                    ),
                    compact=True,
                    readonly_endpoint=True,
                ),
                1,
            ),
            (
                Item(
                    "/",
                    "s",
                    (
                        Slot(
                            "0",
                            ItemType.DICOM,
                            (_info("s/1.dcm", "d1", 1), _info("s/2.dcm", "d2", 2)),
                            "1.dcm",
                        ),
                        Slot("a.jpg", ItemType.IMAGE, (_info("s/a.jpg", "da", 3),), "a.jpg"),
                    ),
                    media=Media.UPLOAD,
                ),
                0,
            ),
            (
                Item(
                    "/v",
                    "c.mp4",
                    (
                        Slot(
                            "c.mp4",
                            ItemType.VIDEO,
                            (_info("v/c.mp4", "ev", 5000),),
                            "c.mp4",
                            facts=(VIDEO_FACTS,),
                        ),
                    ),
                    readonly_endpoint=True,
                ),
                0,
            ),
        ]
        # The old media cache still answers.
        assert await lg.cached_facts("bkt", _info("ro/t.jpg", "et", 12), "thumbnail/v1") == (
            ImageFacts(40, 30, "th/t.jpg")
        )
        assert await lg.cached_facts("bkt", _info("a/1.jpg", "e1", 11), "upload/v1") == (
            UploadFacts("art/files/abc/1.jpg")
        )
        assert await lg.cached_facts("bkt", _info("v/c.mp4", "ev", 5000), "video/v1:opts") == (
            VIDEO_FACTS
        )
        # The interrupted listing resumes; re-listed objects of legacy items are not new.
        info = await lg.start_run("run")
        assert info.resume_listing and await lg.checkpoints() == {"s0": ("v/c.mp4", False)}
        assert await record(lg, ["a/1.jpg", "done.jpg"]) == []
        assert (await lg.known(["held.dcm"]))["held.dcm"].unplanned
        assert await lg.item_key_count("s/2.dcm") == 3
        # Stored again after its media work: now in the new format.
        series = got[2][0]
        await lg.media_done(
            replace(
                series,
                slots=tuple(
                    replace(s, facts=tuple(UploadFacts(f"up/{o.key}") for o in s.objects))
                    for s in series.slots
                ),
            )
        )
        await lg.mark_sent([got[0][0]])
        assert (await lg.status()).items_by_state == {"SENT": 2, "PLANNED": 2, "REGISTERED": 1}
    db = sqlite3.connect(path)
    payload = db.execute("SELECT payload FROM items WHERE name='s'").fetchone()[0]
    legacy = db.execute("SELECT payload FROM items WHERE name='done.jpg'").fetchone()[0]
    db.close()
    assert codec.is_current(payload) and not codec.is_current(legacy)
    async with open_ledger(path, "job") as again:  # and it opens again, pending as stored
        items = {p.item.name: p.item async for p in again.pending()}
        assert items["s"].slots[0].facts == (UploadFacts("up/s/1.dcm"), UploadFacts("up/s/2.dcm"))
        assert items["s"].media is Media.NONE


@pytest.mark.parametrize("half_done", [False, True])
async def test_a_schema_1_ledger_is_migrated_even_if_a_migration_was_cut_off(
    tmp_path: Path, half_done: bool
) -> None:
    """A schema-1 ledger (no media, sync or failure columns) opens, keeps its rows and gains
    the new columns; one whose migration was killed after some ALTERs opens too."""
    schema = _SCHEMA
    for _table, column, _decl in _ADDED_COLUMNS:
        schema = re.sub(rf"\n    {column} [^\n]*", "", schema)  # the whole line
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.execute(
        "INSERT INTO items(job, path, name, payload, keys, state, updated_at) "
        "VALUES ('job', '/', 'a.jpg', ?, '[\"a.jpg\"]', 'FAILED', 1.0)",
        (orjson.dumps({"path": "/", "type": "image", "storage_key": "a.jpg", "name": "a.jpg"}),),
    )
    if half_done:
        db.execute("ALTER TABLE items ADD COLUMN media TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE objects ADD COLUMN vanished_at REAL NOT NULL DEFAULT 0")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    async with open_ledger(path, "job") as lg:
        assert await lg.requeue_due(lambda _f, _at: True) == 1  # an old failure is not final
        assert [p.item.name async for p in lg.pending()] == ["a.jpg"]
    assert user_version(path) == SCHEMA_VERSION
    db = sqlite3.connect(path)
    for table, column, _decl in _ADDED_COLUMNS:
        assert column in {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
    db.close()
    async with open_ledger(path, "job") as again:  # and it opens again
        assert (await again.status()).items_by_state == {"PLANNED": 1}


async def test_two_ledgers_opening_an_old_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    _legacy_ledger(path)
    a, b = await asyncio.gather(open_ledger(path, "job"), open_ledger(path, "job"))
    try:
        assert len([p async for p in a.pending()]) == len([p async for p in b.pending()]) == 4
    finally:
        await a.close()
        await b.close()


# --- crash durability -----------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from ingest.ledger import open_ledger
    from ingest.model import Item, ItemType, ObjectInfo, Slot

    async def main():
        lg = await open_ledger(sys.argv[1], "job-1")
        await lg.start_run("run")
        objs = [ObjectInfo(f"c/{i}.jpg", 5, "e") for i in range(50)]
        items = [
            Item("/c", f"{i}.jpg", (Slot("0", ItemType.IMAGE, (o,), f"{i}.jpg"),), compact=True)
            for i, o in enumerate(objs)
        ]
        await lg.record_page("s", "c/49.jpg", False, objs, items, lambda _i, _k: [])
        await lg.mark_sent(items[:10])
        print("SENT", flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def test_mark_sent_survives_sigkill_right_after_it_returns(tmp_path: Path) -> None:
    db = tmp_path / "crash.sqlite"
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(db), stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"SENT"
        os.kill(proc.pid, signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 10) == -signal.SIGKILL
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    async with open_ledger(db, "job-1") as lg:
        assert (await lg.status()).items_by_state == {"SENT": 10, "PLANNED": 40}
        pend = {p.item.name: p.attempts async for p in lg.pending()}
        assert pend["0.jpg"] == 1 and pend["10.jpg"] == 0
        info = await lg.start_run("run")
        assert info.resume_listing is True
        assert await lg.checkpoints() == {"s": ("c/49.jpg", False)}
        assert (await lg.status()).last_runs[1]["status"] == "interrupted"


# --- memory --------------------------------------------------------------------------------------

N_BIG = 200_000


@pytest.fixture(scope="module")
async def big_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("big") / "big.sqlite"
    async with open_ledger(db, "big") as lg:
        await lg.start_run("run")
        step = 5000
        for start in range(0, N_BIG, step):
            keys = [f"data/{i // 1000:04d}/object-{i:08d}.jpg" for i in range(start, start + step)]
            objs, plans = page(keys)
            await lg.record_page("s", keys[-1], False, objs, plans, collide)
    return db


async def _peak(fn: Callable[[], Awaitable[int]]) -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    try:
        n = await fn()
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


async def test_streams_use_bounded_memory_over_200k_rows(big_ledger: Path) -> None:
    async with open_ledger(big_ledger, "big") as lg:
        # Reference: what holding every item at once would cost, from 1/40 of them held.
        part = N_BIG // 40

        async def hold_part() -> int:
            held = []
            async for p in lg.pending():
                held.append(p)
                if len(held) == part:
                    break
            return len(held)

        n_part, part_peak = await _peak(hold_part)
        assert n_part == part
        all_peak = part_peak * 40

        async def drain_pending() -> int:
            n = 0
            async for _ in lg.pending():
                n += 1
            return n

        async def drain_report() -> int:
            n, last = 0, ""
            async for r in lg.report_rows():
                assert r.key > last
                last = r.key
                n += 1
            return n

        n_p, pending_peak = await _peak(drain_pending)
        n_r, report_peak = await _peak(drain_report)
    assert n_p == n_r == N_BIG
    assert all_peak > 40_000_000  # sanity: 200k materialised items are big
    assert pending_peak < all_peak / 20, (pending_peak, all_peak)
    assert report_peak < all_peak / 20, (report_peak, all_peak)
    assert max(pending_peak, report_peak) < 8_000_000
