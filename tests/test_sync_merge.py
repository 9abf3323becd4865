"""The sync merge (pure, sans-I/O: its requests answered from a dict here) and the ledger's side
of it (a real SQLite file), against brute force."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.ledger import prefix_end
from ingest.ledger.port import Known
from ingest.model import Item, ItemType, ObjectInfo, Slot
from ingest.registrar import wire
from ingest.sync import (
    FlushVanished,
    NeedKnown,
    NeedLookup,
    PageDiff,
    ShardMerge,
    as_new_version,
    drive,
    versioned_name,
)

KEYS = st.text(alphabet="ab/é\U0001f600", min_size=1, max_size=5)

# The tests of the ledger's side below were written for the old synchronous ``Ledger``; they
# are skipped until they are ported to the async ledger port (their items are already typed
# ``Item``s). ``Ledger`` stands for the old class meanwhile.
ledger_pending = pytest.mark.skip(reason="ledger port pending")
Ledger: Any = None


class FakeLedger:
    """Answers a merge's requests from a dict, ``chunk`` rows at a time, and records them."""

    def __init__(self, known: dict[str, Known], chunk: int = 3) -> None:
        self.known = known
        self.ordered = sorted(known.values(), key=lambda k: k.key)
        self.chunk = chunk
        self.flushed: list[str] = []
        self.served = 0  # rows handed out by known_chunk
        self.asks: list[NeedKnown] = []

    def known_chunk(self, need: NeedKnown) -> list[Known]:
        self.asks.append(need)
        rows = [
            k
            for k in self.ordered
            if k.key > need.start or (need.inclusive and k.key == need.start)
        ][: self.chunk]
        self.served += len(rows)
        return rows

    def lookup(self, key: str) -> Known | None:
        return self.known.get(key)

    def flush(self, keys: list[str]) -> None:
        self.flushed.extend(keys)

    def page(self, merge: ShardMerge, objects: list[ObjectInfo], last: bool) -> PageDiff:
        return drive(merge.steps(objects, last), self.known_chunk, self.lookup, self.flush)


def _merge_all(
    known: dict[str, Known],
    listed: list[ObjectInfo],
    page_sizes: list[int],
    *,
    max_pending: int = 1000,
    chunk: int = 3,
) -> tuple[PageDiff, list[str]]:
    ledger = FakeLedger(known, chunk)
    merge = ShardMerge(max_pending=max_pending)
    total = PageDiff()
    i = 0
    sizes = iter(page_sizes)
    while True:
        n = next(sizes, 3)
        page = listed[i : i + n]
        i += n
        last = i >= len(listed)
        d = ledger.page(merge, page, last)
        total.new += d.new
        total.changed += d.changed
        total.reappeared += d.reappeared
        total.vanished += d.vanished
        total.unchanged += d.unchanged
        total.still_changed += d.still_changed
        if last:
            # Each ledger row is read once, in one chunk at a time: never re-read, never all.
            assert ledger.served == len(known)
            return total, ledger.flushed


@settings(max_examples=300, deadline=None)
@given(
    known=st.dictionaries(KEYS, st.tuples(st.sampled_from("xyz"), st.booleans(), st.booleans())),
    listed=st.dictionaries(KEYS, st.sampled_from("xyz")),
    page_sizes=st.lists(st.integers(0, 4), max_size=10),
    max_pending=st.integers(1, 4),
    chunk=st.integers(1, 5),
)
def test_merge_equals_set_arithmetic(
    known: dict[str, tuple[str, bool, bool]],
    listed: dict[str, str],
    page_sizes: list[int],
    max_pending: int,
    chunk: int,
) -> None:
    ledger = {
        k: Known(k, etag, "z" if reported else "", vanished)
        for k, (etag, reported, vanished) in known.items()
    }
    objs = [ObjectInfo(k, 1, etag) for k, etag in sorted(listed.items())]
    diff, flushed = _merge_all(ledger, objs, page_sizes, max_pending=max_pending, chunk=chunk)
    assert {o.key for o in diff.new} == set(listed) - set(known)
    assert sorted(diff.vanished + flushed) == sorted(
        k for k in set(known) - set(listed) if not ledger[k].vanished
    )
    both = set(listed) & set(known)
    assert set(diff.reappeared) == {k for k in both if ledger[k].vanished}
    changed = {k for k in both if listed[k] != ledger[k].etag and listed[k] != "z"}
    changed |= {k for k in both if listed[k] == "z" and ledger[k].etag != "z" and not known[k][1]}
    assert {o.key for o in diff.changed} == changed
    assert diff.unchanged + diff.still_changed + len(diff.changed) == len(both)


def test_out_of_order_listing_is_looked_up_and_a_false_vanish_is_undone() -> None:
    ledger = {k: Known(k, "e", "", False) for k in ("a", "b", "c", "d")}
    # "b" comes after "c" (a UTF-16-ordered listing): it is looked up (known, unchanged), not
    # called new, and taken back from the page's vanished keys it was put in when "c" came.
    objs = [ObjectInfo(k, 1, "e") for k in ("a", "c", "b", "d", "e")]
    diff, flushed = _merge_all(ledger, objs, [5])
    assert [o.key for o in diff.new] == ["e"]
    assert diff.vanished == [] and flushed == []
    assert diff.unchanged == 4
    # On a later page it was already written as vanished: the lookup sees that and clears it.
    page1, _ = _merge_all(ledger, objs, [2, 3])
    assert page1.vanished == ["b"]
    ledger["b"] = Known("b", "e", "", True)
    diff2, _ = _merge_all(ledger, objs, [2, 3])
    assert "b" in diff2.reappeared


def test_a_known_object_never_planned_is_planned_again() -> None:
    """A run stopped while the planner held a folder's first files (a DICOM series across a
    page boundary): those objects are in the ledger without an item, and the next sync must
    hand them to the planner with the rest, not call them unchanged."""
    ledger = {
        "s/1.dcm": Known("s/1.dcm", "e", "", False, unplanned=True),
        "s/2.dcm": Known("s/2.dcm", "e", "", False, unplanned=True),
        "t.jpg": Known("t.jpg", "e", "", False),
    }
    objs = [ObjectInfo(k, 1, "e") for k in ("s/1.dcm", "s/2.dcm", "s/3.dcm", "t.jpg")]
    diff, _ = _merge_all(ledger, objs, [1, 3])
    assert [o.key for o in diff.new] == ["s/1.dcm", "s/2.dcm", "s/3.dcm"]
    assert diff.unchanged == 1 and not diff.vanished


def test_a_resumed_shard_does_not_call_keys_before_its_checkpoint_vanished() -> None:
    ledger = FakeLedger({k: Known(k, "e", "", False) for k in ("a", "b", "c", "d")})
    # The interrupted sync merged up to "a"; "b" was deleted while it was down.
    merge = ShardMerge(resume_after="a")
    d = ledger.page(merge, [ObjectInfo("c", 1, "e")], last=True)
    assert d.vanished == ["b", "d"] and d.unchanged == 1 and not d.new
    assert ledger.asks[0] == NeedKnown("a", inclusive=False)  # the checkpoint itself is done
    # A resumed shard whose rest is now empty: everything after the checkpoint is gone.
    merge = ShardMerge(resume_after="b")
    d = ledger.page(merge, [], last=True)
    assert d.vanished == ["c", "d"]


def test_steps_are_requests_a_caller_answers() -> None:
    """Sans-I/O: the merge asks for ledger chunks after the last key it was given, flushes
    vanished keys in bounded chunks, and looks up a key listed out of order."""
    merge = ShardMerge(max_pending=2)
    rows = [Known(k, "e", "", False) for k in ("a", "b", "c", "e")]
    steps = merge.steps([ObjectInfo("e", 1, "e")], last=False)
    assert next(steps) == NeedKnown("", inclusive=True)
    assert steps.send(rows[:2]) == FlushVanished(["a", "b"])  # passed over: bounded
    assert steps.send(None) == NeedKnown("b", inclusive=False)
    with pytest.raises(StopIteration) as done:
        steps.send(rows[2:])  # c vanished (one short of a flush), e unchanged
    page: PageDiff = done.value.value
    assert (page.vanished, page.unchanged, page.new) == (["c"], 1, [])
    # Listed out of order ("b" after "e"): one lookup, nothing read from the chunks.
    steps = merge.steps([ObjectInfo("b", 1, "other")], last=False)
    assert next(steps) == NeedLookup("b")
    with pytest.raises(StopIteration) as done:
        steps.send(rows[1])
    assert [o.key for o in done.value.value.changed] == ["b"]
    # The last page drains the ledger: an empty chunk is its end.
    steps = merge.steps([], last=True)
    assert next(steps) == NeedKnown("e", inclusive=False)
    with pytest.raises(StopIteration) as done:
        steps.send([])
    assert done.value.value == PageDiff()


def test_versioned_names_are_deterministic() -> None:
    assert versioned_name("photo.jpg", '"9B2CF535F27731C974343645A3985328"') == (
        "photo.v9b2cf535.jpg"
    )
    assert versioned_name("README", "abc-1") == "README.vabc1"
    assert versioned_name("x.tar.gz", "") == "x.tar.vnew.gz"
    plan = _item("/a", "one.jpg", ("a/one.jpg",))
    v = as_new_version(plan, "ffff0000aaaa")
    assert v is not None and v.name == "one.vffff0000.jpg"
    assert wire.item_json(v, wire.KeyMap())["name"] == v.name  # what V7 is told
    assert (v.path, v.keys, v.slots, v.compact) == (plan.path, plan.keys, plan.slots, True)
    assert plan.name == "one.jpg"  # the original is untouched
    multi = _item("/a", "series", ("a/1.dcm", "a/2.dcm"))
    assert as_new_version(multi, "e") is None


def _item(path: str, name: str, keys: tuple[str, ...]) -> Item:
    """A single-image item, or a DICOM series (one slot) for several keys."""
    objs = tuple(ObjectInfo(k, 1) for k in keys)
    if len(keys) == 1:
        return Item(path, name, (Slot(name, ItemType.IMAGE, objs, name),), compact=True)
    return Item(path, name, (Slot("0", ItemType.DICOM, objs, keys[0].rpartition("/")[2]),))


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("", None), ("a/", "a0"), ("ab", "ac"), ("a\U0010ffff", "b"), ("\ud7ff", "\ue000")],
)
def test_prefix_end(prefix: str, end: str | None) -> None:
    assert prefix_end(prefix) == end


@ledger_pending
def test_ledger_shard_streams_match_brute_force(tmp_path: Path) -> None:
    rng = random.Random(7)
    parts = ["a", "b", "é", "z", "\U0001f600"]
    keys = sorted(
        {
            "/".join(rng.choice(parts) * rng.randint(1, 2) for _ in range(rng.randint(1, 4)))
            for _ in range(3000)
        }
    )
    ledger = Ledger(tmp_path / "l.sqlite", "job")
    ledger.start_run("run")
    objs = [ObjectInfo(k, 1, "e") for k in keys]
    ledger.record_page("s", "", False, objs, [])
    other = Ledger(tmp_path / "l.sqlite", "other-job")  # another job's keys never leak in
    other.record_page("s", "", False, [ObjectInfo("a/zzz", 1)], [])
    for prefix in ["", "a/", "aa/", "b/b/", "é/", "nope/"]:
        under = [k for k in keys if k.startswith(prefix)]
        got = [k.key for k in ledger.iter_known(prefix, True, batch=7)]
        assert got == under
        direct = [k for k in under if "/" not in k[len(prefix) :]]
        assert [k.key for k in ledger.iter_known(prefix, False, batch=7)] == direct
        start = under[len(under) // 2] if under else ""
        assert [k.key for k in ledger.iter_known(prefix, True, start, batch=5)] == [
            k for k in under if k >= start
        ]
        folders = sorted(
            {k[: k.index("/", len(prefix)) + 1] for k in under if "/" in k[len(prefix) :]}
        )
        assert list(ledger.sub_folders(prefix)) == folders
    assert ledger.mark_vanished_under("b/") == sum(1 for k in keys if k.startswith("b/"))
    assert ledger.status().vanished_objects == sum(1 for k in keys if k.startswith("b/"))
    assert ledger.known("a/zzz") is None  # other job's key
    ledger.close()
    other.close()


@ledger_pending
def test_lease_is_exclusive_until_expiry_or_death(tmp_path: Path) -> None:
    a = Ledger(tmp_path / "l.sqlite", "job")
    b = Ledger(tmp_path / "l.sqlite", "job")
    assert a.acquire_lease("A", 60, now=1000) is None
    held = b.acquire_lease("B", 60, now=1010)
    assert held is not None and held.holder == "A" and held.expires_at == 1060
    assert a.renew_lease("A", 60, now=1050)
    assert b.acquire_lease("B", 60, now=1100) is not None  # renewed until 1110
    assert b.acquire_lease("B", 60, now=1111) is None  # expired: taken over
    assert not a.renew_lease("A", 60, now=1112)  # A learns it lost the lease
    assert a.acquire_lease("A", 60, now=1113, holder_dead=lambda h: h == "B") is None
    a.release_lease("A")
    assert b.acquire_lease("B", 60, now=1114) is None
    a.close()
    b.close()


@ledger_pending
def test_failed_items_come_back_only_when_due(tmp_path: Path) -> None:
    from ingest.model import Outcome, State

    ledger = Ledger(tmp_path / "l.sqlite", "job")
    ledger.start_run("run")
    plans = [_item("/", f"{i}.jpg", (f"{i}.jpg",)) for i in range(4)]
    ledger.record_page("s", "", False, [ObjectInfo(p.keys[0], 1) for p in plans], plans)
    ledger.mark_sent(plans)
    ledger.record_outcomes(
        [Outcome(p.path, p.name, State.FAILED, reason="x", retryable=True) for p in plans[:3]]
    )
    seen: list[int] = []

    def due(failures: int, _at: float) -> bool:
        seen.append(failures)
        return len(seen) % 2 == 1

    assert ledger.requeue_due(due, batch=2) == 2
    assert seen == [1, 1, 1]
    assert ledger.status().items_by_state == {"PLANNED": 2, "FAILED": 1, "SENT": 1}
    # The one left FAILED: once its object is gone from the bucket it is never retried.
    left = next(p for p in plans[:3] if ledger.item_state(p.path, p.name) is State.FAILED)
    ledger.record_sync_page(vanished=[left.keys[0]])
    assert ledger.requeue_due(lambda _f, _at: True) == 0
    ledger.record_sync_page(reappeared=[left.keys[0]])
    assert ledger.requeue_due(lambda _f, _at: True) == 1
    ledger.close()


@ledger_pending
def test_final_failures_are_left_to_ingest_retry(tmp_path: Path) -> None:
    """A 422 or corrupt media fails the same way every time: the worker's back-off retries
    skip it (a new version of the object or `ingest retry` is what helps)."""
    from ingest.model import Outcome, State

    ledger = Ledger(tmp_path / "l.sqlite", "job")
    ledger.start_run("run")
    plans = [_item("/", f"{i}.jpg", (f"{i}.jpg",)) for i in range(3)]
    ledger.record_page("s", "", False, [ObjectInfo(p.keys[0], 1) for p in plans], plans)
    ledger.mark_sent(plans)
    rejected, flaky, corrupt = plans
    ledger.record_outcomes(
        [
            Outcome(rejected.path, rejected.name, State.FAILED, reason="HTTP 422", retryable=False),
            Outcome(flaky.path, flaky.name, State.FAILED, reason="gave up", retryable=True),
        ]
    )
    ledger.media_failed(corrupt, "truncated image file", final=True)
    assert ledger.requeue_due(lambda _f, _at: True) == 1
    assert ledger.item_state(flaky.path, flaky.name) is State.PLANNED
    assert ledger.item_state(rejected.path, rejected.name) is State.FAILED
    assert ledger.requeue_failed() == 2  # by hand: everything, final or not
    # ...and once re-sent and failing again for a transient reason, the worker retries it.
    ledger.mark_sent([rejected])
    ledger.record_outcomes(
        [Outcome(rejected.path, rejected.name, State.FAILED, reason="5xx", retryable=True)]
    )
    assert ledger.requeue_due(lambda _f, _at: True) == 1
    ledger.close()


@ledger_pending
def test_unplanned_objects_new_versions_and_vanished_counts(tmp_path: Path) -> None:
    from ingest.model import Skip

    ledger = Ledger(tmp_path / "l.sqlite", "job")
    ledger.start_run("run")
    series = _item("/s", "s", ("s/1.dcm", "s/2.dcm"))
    one = _item("/", "a.jpg", ("a.jpg",))
    objs = [ObjectInfo(k, 1, "e") for k in ("a.jpg", "b.txt", "s/1.dcm", "s/2.dcm")]
    # The planner still held the series when the page was recorded (checkpoint kept).
    ledger.record_page("s", "", False, objs, [one, Skip(objs[1], "unsupported")])
    flags = {k.key: k.unplanned for k in ledger.iter_known("", True)}
    assert flags == {"a.jpg": False, "b.txt": False, "s/1.dcm": True, "s/2.dcm": True}
    known = ledger.known("s/2.dcm")
    assert known is not None and known.unplanned
    # Meanwhile a held slice changed: it is planned with its new version, not "changed".
    objs[3] = ObjectInfo("s/2.dcm", 1, "e2")
    ledger.record_page("s", "z", True, objs[2:], [series])
    assert not any(k.unplanned for k in ledger.iter_known("", True))
    held = ledger.known("s/2.dcm")
    assert held is not None and held.etag == "e2"
    assert ledger.status().changed_objects == 0
    assert ledger.item_key_count("s/1.dcm") == 2
    assert ledger.item_key_count("a.jpg") == 1 and ledger.item_key_count("b.txt") == 0

    # A new version registered once; the object changing back to it later points at it
    # again instead of staying "changed" forever.
    v1, v2 = as_new_version(one, "v1"), as_new_version(one, "v2")
    assert v1 is not None and v2 is not None
    assert ledger.record_new_version(ObjectInfo("a.jpg", 2, "v1"), v1)
    assert ledger.record_new_version(ObjectInfo("a.jpg", 3, "v2"), v2)
    assert not ledger.record_new_version(ObjectInfo("a.jpg", 2, "v1"), v1)
    again = ledger.known("a.jpg")
    assert again is not None and again.etag == "v1" and again.changed_etag == ""
    # Another key whose new version has the same name (same file name, same content, folders
    # not preserved) is not pointed at a.jpg's item: it is reported changed instead.
    ledger.record_page("s", "", False, [ObjectInfo("x/a.jpg", 1, "e")], [])
    assert not ledger.record_new_version(ObjectInfo("x/a.jpg", 2, "v1"), v1)
    other = ledger.known("x/a.jpg")
    assert other is not None and other.changed_etag == "v1" and other.etag == "e"
    assert ledger.item_key_count("x/a.jpg") == 0

    assert ledger.record_sync_page(vanished=["a.jpg", "nope.jpg"]) == 1
    assert ledger.record_sync_page(vanished=["a.jpg"]) == 0  # already vanished
    ledger.close()


@ledger_pending
async def test_a_failed_lease_renewal_is_retried_not_fatal(tmp_path: Path) -> None:
    """SQLite busy past busy_timeout (another job writing the same file): the renewal tries
    again at the next tick instead of dying silently and letting the lease expire."""
    import asyncio
    import sqlite3

    from ingest.engine import hold_lease

    ledger = Ledger(tmp_path / "l.sqlite", "job")
    calls: list[bool] = []
    renewed = asyncio.Event()
    real_renew = ledger.renew_lease

    def flaky_renew(holder: str, ttl_s: float, now: float) -> bool:
        calls.append(True)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        renewed.set()
        return bool(real_renew(holder, ttl_s, now))

    ledger.renew_lease = flaky_renew
    lost: list[bool] = []
    async with hold_lease(ledger, 3.0, lambda: lost.append(True)) as holder:
        await asyncio.wait_for(renewed.wait(), 10)
        assert not lost
        other = Ledger(tmp_path / "l.sqlite", "job")
        held = other.acquire_lease("someone else", 60, now=time.time())
        assert held is not None and held.holder == holder
        other.close()
    assert len(calls) >= 2
    ledger.close()


def test_a_dead_holder_is_only_recognised_in_the_same_pid_namespace() -> None:
    """Two containers may share a hostname (host networking) but never a PID namespace: a
    pid that does not exist here may be alive there, so only our own namespace's dead pids
    free a lease early."""
    import os
    import socket
    import subprocess
    import sys

    from ingest.engine import _dead_here, _pid_space

    host, space = socket.gethostname(), _pid_space()
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    assert _dead_here(f"{host}:{dead_pid}:abc123:{space}")
    assert not _dead_here(f"{host}:{dead_pid}:abc123:other-namespace")
    assert not _dead_here(f"{host}:{dead_pid}:abc123")  # an old holder: wait for its expiry
    assert not _dead_here(f"elsewhere:{dead_pid}:abc123:{space}")
    assert not _dead_here(f"{host}:{os.getppid()}:abc123:{space}")  # alive
