"""The sync merge (pure) and the ledger's side of it (a real SQLite file), against brute force."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.ledger import Known, Ledger, prefix_end
from ingest.model import ItemPlan, ObjectInfo
from ingest.sync import PageDiff, ShardMerge, as_new_version, versioned_name

KEYS = st.text(alphabet="ab/é\U0001f600", min_size=1, max_size=5)


def _merge_all(
    known: dict[str, Known],
    listed: list[ObjectInfo],
    page_sizes: list[int],
    *,
    max_pending: int = 1000,
) -> tuple[PageDiff, list[str]]:
    ordered = sorted(known.values(), key=lambda k: k.key)
    flushed: list[str] = []

    def known_from(start: str) -> Iterator[Known]:
        return (k for k in ordered if k.key >= start)

    merge = ShardMerge(
        known_from, known.get, flush_vanished=flushed.extend, max_pending=max_pending
    )
    total = PageDiff()
    i = 0
    sizes = iter(page_sizes)
    while True:
        n = next(sizes, 3)
        page = listed[i : i + n]
        i += n
        last = i >= len(listed)
        d = merge.page(page, last)
        total.new += d.new
        total.changed += d.changed
        total.reappeared += d.reappeared
        total.vanished += d.vanished
        total.unchanged += d.unchanged
        total.still_changed += d.still_changed
        if last:
            return total, flushed


@settings(max_examples=300, deadline=None)
@given(
    known=st.dictionaries(KEYS, st.tuples(st.sampled_from("xyz"), st.booleans(), st.booleans())),
    listed=st.dictionaries(KEYS, st.sampled_from("xyz")),
    page_sizes=st.lists(st.integers(0, 4), max_size=10),
    max_pending=st.integers(1, 4),
)
def test_merge_equals_set_arithmetic(
    known: dict[str, tuple[str, bool, bool]],
    listed: dict[str, str],
    page_sizes: list[int],
    max_pending: int,
) -> None:
    ledger = {
        k: Known(k, etag, "z" if reported else "", vanished)
        for k, (etag, reported, vanished) in known.items()
    }
    objs = [ObjectInfo(k, 1, etag) for k, etag in sorted(listed.items())]
    diff, flushed = _merge_all(ledger, objs, page_sizes, max_pending=max_pending)
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
    # "b" comes after "c": it is looked up (known, unchanged), not called new.
    objs = [ObjectInfo(k, 1, "e") for k in ("a", "c", "b", "d", "e")]
    diff, _ = _merge_all(ledger, objs, [5])
    assert [o.key for o in diff.new] == ["e"]
    assert diff.vanished == ["b"]  # passed over when "c" came...
    assert diff.unchanged == 4  # ...and "b" was still seen; the next merge clears it:
    ledger["b"] = Known("b", "e", "", True)
    diff2, _ = _merge_all(ledger, objs, [5])
    assert "b" in diff2.reappeared


def test_a_resumed_shard_does_not_call_keys_before_its_checkpoint_vanished() -> None:
    ordered = [Known(k, "e", "", False) for k in ("a", "b", "c", "d")]

    def known_from(start: str) -> Iterator[Known]:
        return (k for k in ordered if k.key >= start)

    merge = ShardMerge(known_from, lambda _k: None, resumed=True)
    d = merge.page([ObjectInfo("c", 1, "e")], last=True)
    assert d.vanished == ["d"] and d.unchanged == 1 and not d.new


def test_versioned_names_are_deterministic() -> None:
    assert versioned_name("photo.jpg", '"9B2CF535F27731C974343645A3985328"') == (
        "photo.v9b2cf535.jpg"
    )
    assert versioned_name("README", "abc-1") == "README.vabc1"
    assert versioned_name("x.tar.gz", "") == "x.tar.vnew.gz"
    plan = ItemPlan("/a", "one.jpg", {"name": "one.jpg", "path": "/a"}, ("a/one.jpg",))
    v = as_new_version(plan, "ffff0000aaaa")
    assert v is not None and v.name == "one.vffff0000.jpg" and v.payload["name"] == v.name
    assert plan.payload["name"] == "one.jpg"  # the original is untouched
    multi = ItemPlan("/a", "series", {"name": "series"}, ("a/1.dcm", "a/2.dcm"))
    assert as_new_version(multi, "e") is None


@pytest.mark.parametrize(
    ("prefix", "end"),
    [("", None), ("a/", "a0"), ("ab", "ac"), ("a\U0010ffff", "b"), ("\ud7ff", "\ue000")],
)
def test_prefix_end(prefix: str, end: str | None) -> None:
    assert prefix_end(prefix) == end


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


def test_failed_items_come_back_only_when_due(tmp_path: Path) -> None:
    from ingest.model import Outcome, State

    ledger = Ledger(tmp_path / "l.sqlite", "job")
    ledger.start_run("run")
    plans = [ItemPlan("/", f"{i}.jpg", {"name": f"{i}.jpg"}, (f"{i}.jpg",)) for i in range(4)]
    ledger.record_page("s", "", False, [ObjectInfo(p.keys[0], 1) for p in plans], plans)
    ledger.mark_sent(plans)
    ledger.record_outcomes([Outcome(p.path, p.name, State.FAILED, reason="x") for p in plans[:3]])
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
