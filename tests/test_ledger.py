"""The SQLite ledger: pages, checkpoints, sending, outcomes, streams, crash durability, memory."""

from __future__ import annotations

import gc
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest

from ingest.ledger import Ledger
from ingest.model import ItemPlan, ObjectInfo, Outcome, Skip, State

pytestmark = pytest.mark.timeout(120)


def o(key: str, etag: str = "e1", size: int = 10) -> ObjectInfo:
    return ObjectInfo(key, size, etag=etag, last_modified="2024-01-01T00:00:00Z")


def single(key: str) -> ItemPlan:
    folder, _, name = key.rpartition("/")
    path = "/" + folder if folder else "/"
    payload = {"path": path, "type": "image", "storage_key": key, "name": name}
    return ItemPlan(path, name, payload, (key,))


def page(keys: list[str]) -> tuple[list[ObjectInfo], list[ItemPlan | Skip]]:
    objs = [o(k) for k in keys]
    plans: list[ItemPlan | Skip] = [
        Skip(x, "unsupported file type '.txt'") if x.key.endswith(".txt") else single(x.key)
        for x in objs
    ]
    return objs, plans


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    lg = Ledger(tmp_path / "l.sqlite", "job-1")
    lg.start_run("run")
    return lg


def report(lg: Ledger) -> dict[str, tuple[str, str]]:
    return {r.key: (r.state, r.reason) for r in lg.report_rows()}


def test_record_page_returns_new_items_once(ledger: Ledger) -> None:
    objs, plans = page(["a/1.jpg", "a/2.jpg", "a/n.txt"])
    new = ledger.record_page("s0", "a/n.txt", False, objs, plans)
    assert [(i.path, i.name) for i in new] == [("/a", "1.jpg"), ("/a", "2.jpg")]
    assert new[0].payload["storage_key"] == "a/1.jpg"
    # The same page again (re-listing after a crash): nothing new.
    assert ledger.record_page("s0", "a/n.txt", False, objs, plans) == []
    st = ledger.status()
    assert st.items_by_state == {"PLANNED": 2}
    assert st.objects_by_state == {"PLANNED": 2, "SKIPPED": 1}
    assert report(ledger)["a/n.txt"] == ("SKIPPED", "unsupported file type '.txt'")
    assert st.changed_objects == 0


def test_changed_etag_is_flagged(ledger: Ledger) -> None:
    objs, plans = page(["a/1.jpg", "a/2.jpg"])
    ledger.record_page("s0", "", True, objs, plans)
    relisted = [o("a/1.jpg", etag="e2"), o("a/2.jpg")]
    assert ledger.record_page("s0", "", True, relisted, plans) == []
    assert ledger.status().changed_objects == 1
    rows = {r.key: r for r in ledger.report_rows()}
    assert rows["a/1.jpg"].etag == "e1"  # the registered version is the one recorded


def test_an_item_is_not_planned_twice_in_different_jobs_or_twice_in_one(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "l.sqlite", "job-a")
    b = Ledger(tmp_path / "l.sqlite", "job-b")
    objs, plans = page(["x.jpg"])
    assert len(a.record_page("s", "", True, objs, plans)) == 1
    assert len(b.record_page("s", "", True, objs, plans)) == 1  # jobs are independent
    assert a.record_page("s", "", True, objs, plans) == []
    a.close()
    b.close()


def test_checkpoints_resume_and_listing_complete(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    lg = Ledger(path, "j")
    assert lg.start_run("run").resume_listing is False
    objs, plans = page(["a/1.jpg"])
    lg.record_page("s0", "a/1.jpg", False, objs, plans)
    lg.record_page("s1", "b/9.jpg", False, [], [])
    # "" keeps the stored checkpoint (the planner still holds part of a folder).
    lg.record_page("s0", "", False, [], [])
    lg.record_page("s1", "", True, [], [])
    assert lg.checkpoints() == {"s0": ("a/1.jpg", False), "s1": ("b/9.jpg", True)}
    lg.close()

    # Crash: the listing was never completed → the next run resumes from the checkpoints.
    lg = Ledger(path, "j")
    info = lg.start_run("run")
    assert info.resume_listing is True
    assert lg.checkpoints() == {"s0": ("a/1.jpg", False), "s1": ("b/9.jpg", True)}
    lg.record_page("s0", "a/5.jpg", True, [], [])
    lg.mark_listing_complete()
    lg.finish_run(info.run_id, "completed", {"listed": 1})
    assert lg.checkpoints() == {}
    # A completed listing starts over next time.
    assert lg.start_run("run").resume_listing is False
    runs = lg.status().last_runs
    assert [r["status"] for r in runs] == ["running", "completed", "interrupted"]
    assert runs[1]["counts"] == {"listed": 1}
    lg.close()


def test_mark_sent_counts_attempts_and_outcomes(ledger: Ledger) -> None:
    objs, plans = page(["a/1.jpg", "a/2.jpg", "a/3.jpg"])
    new = ledger.record_page("s", "", True, objs, plans)
    assert ledger.mark_sent(new[:2]) == {("/a", "1.jpg"): 1, ("/a", "2.jpg"): 1}
    assert ledger.item_state("/a", "1.jpg") is State.SENT
    assert ledger.mark_sent(new[:1]) == {("/a", "1.jpg"): 2}
    ledger.record_outcomes(
        [
            Outcome("/a", "1.jpg", State.REGISTERED, v7_id="id-1"),
            Outcome("/a", "2.jpg", State.BLOCKED, reason="ALREADY_EXISTS"),
        ]
    )
    rows = {r.key: r for r in ledger.report_rows()}
    assert (rows["a/1.jpg"].state, rows["a/1.jpg"].v7_id) == ("REGISTERED", "id-1")
    assert (rows["a/2.jpg"].state, rows["a/2.jpg"].reason) == ("BLOCKED", "ALREADY_EXISTS")
    assert rows["a/3.jpg"].state == "PLANNED"
    assert (rows["a/1.jpg"].item_path, rows["a/1.jpg"].item_name) == ("/a", "1.jpg")
    st = ledger.status()
    assert st.items_by_state == {"REGISTERED": 1, "BLOCKED": 1, "PLANNED": 1}
    assert ("BLOCKED: ALREADY_EXISTS", 1) in st.failures_by_reason
    # The attempt count survives: pending_items reports it for the SENT-then-requeued item.
    pend = {(p.path, p.name): n for p, n in ledger.pending_items()}
    assert pend == {("/a", "3.jpg"): 0}


def test_pending_items_streams_only_planned_and_sent_and_not_rows_added_meanwhile(
    ledger: Ledger,
) -> None:
    keys = [f"k/{i:04d}.jpg" for i in range(25)]
    objs, plans = page(keys)
    new = ledger.record_page("s", "", False, objs, plans)
    ledger.mark_sent(new[5:10])
    ledger.record_outcomes([Outcome(p.path, p.name, State.REGISTERED, "x") for p in new[10:15]])
    ledger.record_outcomes(
        [Outcome(p.path, p.name, State.FAILED, reason="boom") for p in new[15:17]]
    )
    seen: list[tuple[str, int]] = []
    for extra, (plan, attempts) in enumerate(ledger.pending_items(batch=4)):
        seen.append((plan.name, attempts))
        # Rows planned while the stream is open are not part of it...
        objs2, plans2 = page([f"late/{extra}.jpg"])
        assert len(ledger.record_page("s", "", False, objs2, plans2)) == 1
        # ...and items finished meanwhile are not returned later.
        if plan.name == "0000.jpg":
            ledger.record_outcomes([Outcome("/k", "0020.jpg", State.REGISTERED, "y")])
    expected = (
        [(f"{i:04d}.jpg", 0) for i in range(5)]
        + [(f"{i:04d}.jpg", 1) for i in range(5, 10)]
        + [(f"{i:04d}.jpg", 0) for i in range(17, 25) if i != 20]
    )
    assert seen == expected
    assert seen and all(isinstance(n, int) for _, n in seen)
    first = next(iter(ledger.pending_items()))[0]
    assert first.payload == {
        "path": "/k",
        "type": "image",
        "storage_key": "k/0000.jpg",
        "name": "0000.jpg",
    }
    assert first.keys == ("k/0000.jpg",)


def test_requeue_failed(ledger: Ledger) -> None:
    objs, plans = page(["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    ledger.record_page("s", "", True, objs, plans)
    ledger.record_outcomes(
        [
            Outcome("/", "a.jpg", State.FAILED, reason="HTTP 500"),
            Outcome("/", "b.jpg", State.BLOCKED, reason="ALREADY_EXISTS"),
            Outcome("/", "c.jpg", State.BLOCKED, reason="FILE_UPLOAD_TIMEOUT"),
            Outcome("/", "d.jpg", State.REGISTERED, v7_id="i"),
        ]
    )
    assert ledger.requeue_failed() == 1
    assert ledger.item_state("/", "a.jpg") is State.PLANNED
    assert ledger.requeue_failed("FILE_UPLOAD_TIMEOUT") == 1
    assert ledger.item_state("/", "c.jpg") is State.PLANNED
    assert ledger.item_state("/", "b.jpg") is State.BLOCKED
    assert ledger.item_state("/", "d.jpg") is State.REGISTERED
    assert report(ledger)["a.jpg"] == ("PLANNED", "")
    assert sorted(p.name for p, _ in ledger.pending_items()) == ["a.jpg", "c.jpg"]


def test_report_rows_stream_in_key_order_across_chunks(ledger: Ledger) -> None:
    keys = [f"r/{i:03d}.jpg" for i in range(30)] + ["r/zz.txt", "a/ü.jpg", "a/b c.jpg"]
    for chunk in (keys[20:], keys[:20]):  # inserted out of order
        objs, plans = page(chunk)
        ledger.record_page("s", "", False, objs, plans)
    rows = list(ledger.report_rows(batch=7))
    assert [r.key for r in rows] == sorted(keys)
    assert all(r.size == 10 and r.etag == "e1" for r in rows)


def test_multi_key_item_maps_every_object(ledger: Ledger) -> None:
    objs = [o("f/1.jpg"), o("f/2.jpg")]
    plan = ItemPlan("/", "f", {"path": "/", "name": "f", "slots": []}, ("f/1.jpg", "f/2.jpg"))
    assert len(ledger.record_page("s", "", True, objs, [plan])) == 1
    ledger.record_outcomes([Outcome("/", "f", State.REGISTERED, "id")])
    assert {k: v[0] for k, v in report(ledger).items()} == {
        "f/1.jpg": "REGISTERED",
        "f/2.jpg": "REGISTERED",
    }


# --- crash durability -------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from ingest.ledger import Ledger
    from ingest.model import ItemPlan, ObjectInfo
    lg = Ledger(sys.argv[1], "job-1")
    lg.start_run("run")
    objs = [ObjectInfo(f"c/{i}.jpg", 5, "e") for i in range(50)]
    plans = [ItemPlan("/c", f"{i}.jpg", {"name": f"{i}.jpg"}, (f"c/{i}.jpg",)) for i in range(50)]
    lg.record_page("s", "c/49.jpg", False, objs, plans)
    lg.mark_sent(plans[:10])
    print("SENT", flush=True)
    time.sleep(600)
    """
)


def test_mark_sent_survives_sigkill_right_after_it_returns(tmp_path: Path) -> None:
    db = tmp_path / "crash.sqlite"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SENT"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    lg = Ledger(db, "job-1")
    try:
        assert lg.status().items_by_state == {"SENT": 10, "PLANNED": 40}
        pend = dict(((p.name, n) for p, n in lg.pending_items()))
        assert pend["0.jpg"] == 1 and pend["10.jpg"] == 0
        info = lg.start_run("run")
        assert info.resume_listing is True
        assert lg.checkpoints() == {"s": ("c/49.jpg", False)}
        assert lg.status().last_runs[1]["status"] == "interrupted"
    finally:
        lg.close()


# --- memory ---------------------------------------------------------------------------------

N_BIG = 200_000


@pytest.fixture(scope="module")
def big_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("big") / "big.sqlite"
    lg = Ledger(db, "big")
    lg.start_run("run")
    step = 5000
    for start in range(0, N_BIG, step):
        keys = [f"data/{i // 1000:04d}/object-{i:08d}.jpg" for i in range(start, start + step)]
        lg.record_page("s", keys[-1], False, *page(keys))
    lg.close()
    return db


def _peak(fn: object) -> tuple[int, int]:
    gc.collect()
    tracemalloc.start()
    try:
        n = fn()  # type: ignore[operator]
        return n, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streams_use_bounded_memory_over_200k_rows(big_ledger: Path) -> None:
    lg = Ledger(big_ledger, "big")
    try:
        # Reference: what holding every row at once would cost, from 1/40 of them held.
        part = N_BIG // 40
        n_part, part_peak = _peak(lambda: len(list(itertools.islice(lg.pending_items(), part))))
        assert n_part == part
        all_peak = part_peak * 40

        def drain_pending() -> int:
            return sum(1 for _ in lg.pending_items())

        def drain_report() -> int:
            n = 0
            last = ""
            for r in lg.report_rows():
                assert r.key > last
                last = r.key
                n += 1
            return n

        n_p, pending_peak = _peak(drain_pending)
        n_r, report_peak = _peak(drain_report)
    finally:
        lg.close()
    assert n_p == n_r == N_BIG
    assert all_peak > 50_000_000  # sanity: 200k materialised plans are big
    assert pending_peak < all_peak / 20, (pending_peak, all_peak)
    assert report_peak < all_peak / 20, (report_peak, all_peak)
    assert max(pending_peak, report_peak) < 8_000_000


def test_a_name_collision_is_skipped_with_its_reason_not_hidden(ledger: Ledger) -> None:
    """Two keys planned to one (path, name) (e.g. preserve_folders = false): the second can
    never be sent, so it must not show as part of the first one's item."""
    first = ItemPlan("/", "x.jpg", {"path": "/", "name": "x.jpg"}, ("a/x.jpg",))
    second = ItemPlan("/", "x.jpg", {"path": "/", "name": "x.jpg"}, ("b/x.jpg",))
    new = ledger.record_page("s0", "", False, [o("a/x.jpg"), o("b/x.jpg")], [first, second])
    assert [i.keys for i in new] == [("a/x.jpg",)]
    rows = report(ledger)
    assert rows["a/x.jpg"] == ("PLANNED", "")
    state, reason = rows["b/x.jpg"]
    assert state == "SKIPPED"
    assert "name collision" in reason and "a/x.jpg" in reason
    # Re-listing the first object keeps it linked to its item.
    assert ledger.record_page("s0", "", False, [o("a/x.jpg")], [first]) == []
    assert report(ledger)["a/x.jpg"] == ("PLANNED", "")


@pytest.mark.parametrize("half_done", [False, True])
def test_an_old_ledger_is_migrated_even_if_a_migration_was_cut_off(
    tmp_path: Path, half_done: bool
) -> None:
    """A schema-1 ledger (no media, sync or failure columns) opens, keeps its rows and gains
    the new columns; one whose migration was killed after some ALTERs opens too."""
    import re
    import sqlite3

    from ingest.ledger import _ADDED_COLUMNS, _SCHEMA, SCHEMA_VERSION

    schema = _SCHEMA
    for _table, column, _decl in _ADDED_COLUMNS:
        schema = re.sub(rf"\n    {column} [^\n]*", "", schema)  # the whole line
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(schema)
    db.execute(
        "INSERT INTO items(job, path, name, payload, keys, state, updated_at) "
        "VALUES ('job', '/', 'a.jpg', '{}', '[\"a.jpg\"]', 'FAILED', 1.0)"
    )
    if half_done:
        db.execute("ALTER TABLE items ADD COLUMN media TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE objects ADD COLUMN vanished_at REAL NOT NULL DEFAULT 0")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with Ledger(path, "job") as ledger:
        assert ledger.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        for table, column, _decl in _ADDED_COLUMNS:
            assert column in {r[1] for r in ledger.db.execute(f"PRAGMA table_info({table})")}
        assert ledger.requeue_due(lambda _f, _at: True) == 1  # an old failure is not final
    with Ledger(path, "job") as again:  # and it opens again
        assert again.status().items_by_state == {"PLANNED": 1}
