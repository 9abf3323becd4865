"""The sync merge (pure, sans-I/O: its requests answered from a dict here) and the ledger's side
of it (a real SQLite file), against brute force."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.ledger import prefix_end
from ingest.ledger.port import Known
from ingest.model import Item, ItemType, ObjectInfo, Slot
from ingest.planner import collision
from ingest.registrar import wire
from ingest.sync import (
    FlushVanished,
    NeedKnown,
    NeedLookup,
    PageDiff,
    ShardMerge,
    Steps,
    as_new_version,
    versioned_name,
)


def drive(
    steps: Steps,
    known_chunk: Callable[[NeedKnown], list[Known]],
    lookup: Callable[[str], Known | None],
    flush: Callable[[list[str]], None],
) -> PageDiff:
    """Run a merge's steps with plain callables (the engine answers them through the async
    ledger port: ``ingest.run.merge``)."""
    answer: Any = None
    try:
        while True:
            need = steps.send(answer)
            if isinstance(need, NeedKnown):
                answer = known_chunk(need)
            elif isinstance(need, NeedLookup):
                answer = lookup(need.key)
            else:
                flush(need.keys)
                answer = None
    except StopIteration as done:
        return done.value


KEYS = st.text(alphabet="ab/é\U0001f600", min_size=1, max_size=5)


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


async def _known_keys(
    ledger: Any, prefix: str, recursive: bool, start: str = "", limit: int = 7
) -> list[str]:
    """A shard's ledger keys the way the sync stage reads them: chunk after chunk."""
    out: list[str] = []
    cursor, inclusive = start, True
    while True:
        rows = await ledger.known_range(prefix, recursive, cursor, inclusive, limit)
        out += [r.key for r in rows]
        if len(rows) < limit:
            return out
        cursor, inclusive = rows[-1].key, False


async def test_ledger_shard_streams_match_brute_force(tmp_path: Path) -> None:
    from ingest.ledger import open_ledger

    rng = random.Random(7)
    parts = ["a", "b", "é", "z", "\U0001f600"]
    keys = sorted(
        {
            "/".join(rng.choice(parts) * rng.randint(1, 2) for _ in range(rng.randint(1, 4)))
            for _ in range(3000)
        }
    )
    path = str(tmp_path / "l.sqlite")
    async with open_ledger(path, "job") as ledger, open_ledger(path, "other-job") as other:
        await ledger.start_run("run")
        objs = [ObjectInfo(k, 1, "e") for k in keys]
        await ledger.record_page("s", "", False, objs, [], collision)
        # another job's keys never leak in
        await other.record_page("s", "", False, [ObjectInfo("a/zzz", 1)], [], collision)
        for prefix in ["", "a/", "aa/", "b/b/", "é/", "nope/"]:
            under = [k for k in keys if k.startswith(prefix)]
            assert await _known_keys(ledger, prefix, True) == under
            direct = [k for k in under if "/" not in k[len(prefix) :]]
            assert await _known_keys(ledger, prefix, False) == direct
            start = under[len(under) // 2] if under else ""
            got = await _known_keys(ledger, prefix, True, start, limit=5)
            assert got == [k for k in under if k >= start]
            folders = sorted(
                {k[: k.index("/", len(prefix)) + 1] for k in under if "/" in k[len(prefix) :]}
            )
            assert await ledger.sub_folders(prefix) == folders
        n_b = sum(1 for k in keys if k.startswith("b/"))
        assert await ledger.mark_vanished_under("b/") == n_b
        assert (await ledger.status()).vanished_objects == n_b
        assert "a/zzz" not in await ledger.known(["a/zzz"])  # the other job's key


# Leases, failed items coming back when due, final failures and new versions are covered by
# the ledger contract suite (tests/ledger_contract.py).


async def test_a_failed_lease_renewal_is_retried_not_fatal(tmp_path: Path) -> None:
    """The ledger busy past its timeout (another job writing the same file): the renewal
    tries again at the next tick instead of dying silently and letting the lease expire."""
    import asyncio

    from ingest.engine import hold_lease
    from ingest.errors import LedgerBusy
    from ingest.ledger import open_ledger

    path = str(tmp_path / "l.sqlite")
    async with open_ledger(path, "job") as ledger, open_ledger(path, "job") as other:
        calls: list[bool] = []
        renewed = asyncio.Event()
        real_renew = ledger.renew_lease

        async def flaky_renew(holder: str, ttl_s: float, now: float) -> bool:
            calls.append(True)
            if len(calls) == 1:
                raise LedgerBusy("database is locked")
            renewed.set()
            return await real_renew(holder, ttl_s, now)

        ledger.renew_lease = flaky_renew  # type: ignore[method-assign]
        lost: list[bool] = []
        async with hold_lease(ledger, 3.0, lambda: lost.append(True)) as holder:
            await asyncio.wait_for(renewed.wait(), 10)
            assert not lost
            held = await other.acquire_lease("someone else", 60, time.time(), lambda _h: False)
            assert held is not None and held.holder == holder
        assert len(calls) >= 2


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
