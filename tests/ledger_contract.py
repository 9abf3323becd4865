"""The ledger contract: what every ``LedgerPort`` backend must do, backend-agnostic.

A test module imports everything from here and provides ``ledger_factory``: an async
``make(job="job-1")`` that opens a ledger of ``job`` on ONE store shared by every call of that
test (so two jobs, two processes' handles, or "the next run" are two calls), and closes them
all at the end. Nothing here may know which backend it talks to.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import pytest

from ingest.ledger import Known, Lease, LedgerPort, ManifestItem
from ingest.model import (
    ConvertedFacts,
    Facts,
    ImageFacts,
    Item,
    ItemType,
    Media,
    ObjectInfo,
    Outcome,
    Skip,
    Slot,
    State,
    UploadFacts,
)
from tests.support.samples import video_facts

Factory = Callable[..., Awaitable[LedgerPort]]

pytestmark = pytest.mark.timeout(120)

# --- helpers ----------------------------------------------------------------------------------


def o(key: str, etag: str = "e1", size: int = 10) -> ObjectInfo:
    return ObjectInfo(key, size, etag=etag, last_modified="2024-01-01T00:00:00Z")


def single(obj: ObjectInfo | str, name: str | None = None) -> Item:
    """The compact one-image item of an object, at its folder's path."""
    info = obj if isinstance(obj, ObjectInfo) else o(obj)
    folder, _, base = info.key.rpartition("/")
    path = "/" + folder if folder else "/"
    return Item(path, name or base, (Slot("0", ItemType.IMAGE, (info,), base),), compact=True)


def page(keys: list[str], etag: str = "e1") -> tuple[list[ObjectInfo], list[Item | Skip]]:
    objs = [o(k, etag) for k in keys]
    plans: list[Item | Skip] = [
        Skip(x, "unsupported file type '.txt'") if x.key.endswith(".txt") else single(x)
        for x in objs
    ]
    return objs, plans


class Collisions:
    """A collision policy that records its calls: the objects of the new item that are not in
    the recorded item are skipped, naming the recorded item's first key."""

    def __init__(self) -> None:
        self.calls: list[tuple[Item, tuple[str, ...]]] = []

    def __call__(self, item: Item, recorded: tuple[str, ...]) -> list[Skip]:
        self.calls.append((item, recorded))
        first = recorded[0] if recorded else ""
        return [
            Skip(obj, f"name collision: item already comes from '{first}'")
            for s in item.slots
            for obj in s.objects
            if obj.key not in recorded
        ]


def collide(item: Item, recorded: tuple[str, ...]) -> list[Skip]:
    """The same policy, recording nothing (for pages with no collision to look at)."""
    return Collisions()(item, recorded)


async def record(
    lg: LedgerPort,
    keys: list[str],
    *,
    shard: str = "s",
    checkpoint: str = "",
    done: bool = False,
    etag: str = "e1",
) -> list[Item]:
    objs, plans = page(keys, etag)
    return await lg.record_page(shard, checkpoint, done, objs, plans, collide)


async def report(lg: LedgerPort) -> dict[str, tuple[str, str]]:
    return {r.key: (r.state, r.reason) async for r in lg.report_rows()}


async def pending(lg: LedgerPort) -> list[tuple[Item, int]]:
    return [(p.item, p.attempts) async for p in lg.pending()]


async def state(lg: LedgerPort, item: Item) -> State | None:
    return (await lg.item_states([item.ident])).get(item.ident)


@pytest.fixture
async def ledger(ledger_factory: Factory) -> AsyncIterator[LedgerPort]:
    lg = await ledger_factory()
    await lg.start_run("run")
    yield lg


# --- listing -> items ---------------------------------------------------------------------------


async def test_record_page_returns_new_items_once(ledger: LedgerPort) -> None:
    objs, plans = page(["a/1.jpg", "a/2.jpg", "a/n.txt"])
    new = await ledger.record_page("s0", "a/n.txt", False, objs, plans, collide)
    assert new == plans[:2]
    # The same page again (re-listing after a crash): nothing new, nothing changed.
    assert await ledger.record_page("s0", "a/n.txt", False, objs, plans, collide) == []
    st = await ledger.status()
    assert st.items_by_state == {"PLANNED": 2}
    assert st.objects_by_state == {"PLANNED": 2, "SKIPPED": 1}
    assert st.changed_objects == 0
    assert (await report(ledger))["a/n.txt"] == ("SKIPPED", "unsupported file type '.txt'")
    assert ("SKIPPED: unsupported file type '.txt'", 1) in st.failures_by_reason


async def test_a_changed_etag_is_flagged_and_the_recorded_version_kept(ledger: LedgerPort) -> None:
    await record(ledger, ["a/1.jpg", "a/2.jpg"], done=True)
    objs = [o("a/1.jpg", etag="e2"), o("a/2.jpg")]
    assert await ledger.record_page("s", "", True, objs, [single(x) for x in objs], collide) == []
    assert (await ledger.status()).changed_objects == 1
    rows = {r.key: r async for r in ledger.report_rows()}
    assert rows["a/1.jpg"].etag == "e1"


async def test_jobs_are_independent(ledger_factory: Factory) -> None:
    a = await ledger_factory("job-a")
    b = await ledger_factory("job-b")
    await a.start_run("run")
    await b.start_run("run")
    assert len(await record(a, ["x.jpg"])) == 1
    assert len(await record(b, ["x.jpg"])) == 1
    assert await record(a, ["x.jpg"]) == []
    assert (await a.status()).items_by_state == {"PLANNED": 1}
    assert (await b.status()).job == "job-b"


async def test_jobs_lists_every_job_with_a_run(ledger_factory: Factory) -> None:
    a = await ledger_factory("job-b")
    assert await a.jobs() == []
    await a.start_run("sync", listing=False)
    b = await ledger_factory("job-a")
    await b.start_run("run")
    await b.start_run("run")
    assert await a.jobs() == ["job-a", "job-b"]
    assert await (await ledger_factory("job-c")).jobs() == ["job-a", "job-b"]  # opening adds none


async def test_checkpoints_resume_and_listing_complete(ledger_factory: Factory) -> None:
    lg = await ledger_factory()
    assert (await lg.start_run("run")).resume_listing is False
    await record(lg, ["a/1.jpg"], shard="s0", checkpoint="a/1.jpg")
    await lg.record_page("s1", "b/9.jpg", False, [], [], collide)
    # "" keeps the stored checkpoint (the planner still holds part of a folder).
    await lg.record_page("s0", "", False, [], [], collide)
    await lg.record_page("s1", "", True, [], [], collide)
    assert await lg.checkpoints() == {"s0": ("a/1.jpg", False), "s1": ("b/9.jpg", True)}

    # The listing never completed: the next run (another handle) resumes from them.
    nxt = await ledger_factory()
    info = await nxt.start_run("run")
    assert info.resume_listing is True
    assert await nxt.checkpoints() == {"s0": ("a/1.jpg", False), "s1": ("b/9.jpg", True)}
    # A run that does not list leaves them alone.
    await nxt.start_run("retry", listing=False)
    assert len(await nxt.checkpoints()) == 2
    await nxt.record_page("s0", "a/5.jpg", True, [], [], collide)
    await nxt.mark_listing_complete()
    await nxt.finish_run(info.run_id, "completed", {"listed": 1})
    assert await nxt.checkpoints() == {}
    assert (await nxt.start_run("run")).resume_listing is False  # completed: start over
    runs = (await nxt.status()).last_runs
    assert [r["status"] for r in runs] == ["running", "interrupted", "completed", "interrupted"]
    assert runs[2]["counts"] == {"listed": 1}
    assert [r["kind"] for r in runs][:2] == ["run", "retry"]
    assert len((await nxt.status(runs=2)).last_runs) == 2
    # Instants as floats at full resolution (durations of short runs), and the ISO text too.
    done = runs[2]
    assert isinstance(done["started_at_s"], float) and isinstance(done["finished_at_s"], float)
    assert 0 <= done["finished_at_s"] - done["started_at_s"] < 600
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(done["started_at_s"]))
    assert done["started_at"] == iso
    assert runs[0]["finished_at_s"] is None and runs[0]["finished_at"] is None


async def test_a_name_collision_records_the_policys_skips(ledger: LedgerPort) -> None:
    """Two keys planned to one (path, name): the policy is asked about the second, gets the
    recorded keys, and its skips are recorded with their reason."""
    policy = Collisions()
    first = single(o("a/x.jpg"), "x.jpg")
    second = replace(single(o("b/x.jpg"), "x.jpg"), path=first.path)
    objs = [o("a/x.jpg"), o("b/x.jpg")]
    new = await ledger.record_page("s0", "", False, objs, [first, second], policy)
    assert new == [first]
    assert policy.calls == [(second, ("a/x.jpg",))]
    rows = await report(ledger)
    assert rows["a/x.jpg"] == ("PLANNED", "")
    assert rows["b/x.jpg"] == ("SKIPPED", "name collision: item already comes from 'a/x.jpg'")
    # Re-listing the first object keeps it in its item, and asks the policy nothing.
    assert await ledger.record_page("s0", "", False, [objs[0]], [first], policy) == []
    assert len(policy.calls) == 1
    assert (await report(ledger))["a/x.jpg"] == ("PLANNED", "")
    # In a later page: same answer.
    assert await ledger.record_page("s0", "", False, [objs[1]], [second], policy) == []
    assert len(policy.calls) == 2
    assert (await report(ledger))["b/x.jpg"][0] == "SKIPPED"


async def test_a_multi_object_item_maps_every_object(ledger: LedgerPort) -> None:
    objs = [o("f/1.dcm"), o("f/2.dcm"), o("f/a.jpg")]
    item = Item(
        "/",
        "f",
        (
            Slot("0", ItemType.DICOM, tuple(objs[:2]), "1.dcm", extract_views=True),
            Slot("a.jpg", ItemType.IMAGE, (objs[2],), "a.jpg"),
        ),
    )
    assert await ledger.record_page("s", "", True, objs, [item], collide) == [item]
    assert await ledger.item_key_count("f/2.dcm") == 3
    assert await ledger.item_key_count("nope") == 0
    await ledger.record_outcomes([Outcome("/", "f", State.REGISTERED, "id")])
    assert {k: v[0] for k, v in (await report(ledger)).items()} == dict.fromkeys(
        ["f/1.dcm", "f/2.dcm", "f/a.jpg"], "REGISTERED"
    )


async def test_add_failed_item_is_final(ledger: LedgerPort) -> None:
    # A manifest run: objects listed, not planned from the listing.
    await ledger.record_page("s", "", True, [o("m/1.jpg")], [], collide)
    item = Item(
        "/",
        "m",
        (
            Slot("a", ItemType.IMAGE, (o("m/1.jpg"),), "1.jpg"),
            Slot("b", ItemType.IMAGE, (ObjectInfo("m/gone.jpg", 0),), "gone.jpg"),
        ),
    )
    assert await ledger.add_failed_item(item, "m/gone.jpg: not in the bucket listing") is True
    assert await ledger.add_failed_item(item, "again") is False
    assert await state(ledger, item) is State.FAILED
    assert (await report(ledger))["m/1.jpg"] == (
        "FAILED",
        "m/gone.jpg: not in the bucket listing",
    )
    assert await ledger.requeue_due(lambda _f, _at: True) == 0  # final


# --- pending ------------------------------------------------------------------------------------


async def test_pending_streams_left_items_and_not_those_planned_meanwhile(
    ledger: LedgerPort,
) -> None:
    keys = [f"k/{i:04d}.jpg" for i in range(1500)]  # more than one chunk of any backend
    new = await record(ledger, keys)
    await ledger.mark_sent(new[5:10])
    await ledger.record_outcomes(
        [Outcome(p.path, p.name, State.REGISTERED, "x") for p in new[10:15]]
    )
    await ledger.record_outcomes(
        [Outcome(p.path, p.name, State.FAILED, reason="boom") for p in new[15:17]]
    )
    await ledger.mark_processing(new[17])
    seen: list[tuple[str, int]] = []
    async for p in ledger.pending():
        seen.append((p.item.name, p.attempts))
        if len(seen) <= 20:
            # Items planned while the stream is open are not part of it.
            assert len(await record(ledger, [f"late/{len(seen)}.jpg"])) == 1
        if len(seen) == 1:
            # An item finished meanwhile is not returned later (once past a chunk boundary).
            await ledger.record_outcomes([Outcome("/k", "1400.jpg", State.REGISTERED, "y")])
    assert seen == (
        [(f"{i:04d}.jpg", 0) for i in range(5)]
        + [(f"{i:04d}.jpg", 1) for i in range(5, 10)]
        + [(f"{i:04d}.jpg", 0) for i in range(17, 1500) if i != 1400]
    )
    items = {p.item.name: p.item async for p in ledger.pending()}
    assert items["0000.jpg"] == new[0]
    assert len(items) == len(seen) + 20  # the late ones now


async def test_pending_crosses_chunks_in_order(ledger: LedgerPort) -> None:
    keys = [f"c/{i:05d}.jpg" for i in range(2345)]
    await record(ledger, keys)
    names = [p.item.name async for p in ledger.pending()]
    assert names == [k.rpartition("/")[2] for k in keys]


async def test_pending_returns_items_exactly_as_recorded(ledger: LedgerPort) -> None:
    video = o("v/clip.mp4", "ev", 1_000)
    dicoms = (o("v/s/1.dcm"), o("v/s/2.dcm"))
    items = [
        Item(
            "/v",
            "clip.mp4",
            (Slot("0", ItemType.VIDEO, (video,), "clip.mp4", fps=25),),
            compact=True,
            media=Media.VIDEO,
            readonly_endpoint=True,
        ),
        Item("/v", "s", (Slot("0", ItemType.DICOM, dicoms, "1.dcm", extract_views=True),)),
        Item("/v", "fps", (Slot("x", ItemType.VIDEO, (o("v/f.mov"),), "f.mov", fps="native"),)),
    ]
    objs = [video, *dicoms, o("v/f.mov")]
    assert await ledger.record_page("s", "", True, objs, items, collide) == items
    assert [(i, 0) for i in items] == await pending(ledger)


# --- media --------------------------------------------------------------------------------------

_VIDEO = video_facts("v/clip.mp4", preview=True)
_FACTS: list[Facts] = [
    ImageFacts(640, 480, "thumbs/a.jpg"),
    UploadFacts("container/files/abc/a.jpg"),
    _VIDEO,
    replace(_VIDEO, low_sections_prefix="", audio_peaks_key="art/v/audio_peaks.gz"),
]


async def test_media_work_and_its_facts_are_stored(ledger: LedgerPort) -> None:
    obj = o("m/a.jpg")
    item = replace(single(obj), media=Media.IMAGE, readonly_endpoint=True)
    await ledger.record_page("s", "", True, [obj], [item], collide)
    await ledger.mark_processing(item)
    assert await state(ledger, item) is State.PROCESSING
    assert await pending(ledger) == [(item, 0)]  # a crash now: the media work is redone
    done = replace(item, slots=(replace(item.slots[0], facts=(_FACTS[0],)),))
    await ledger.media_done(done)
    assert await state(ledger, item) is State.PLANNED
    assert await pending(ledger) == [(replace(done, media=Media.NONE), 0)]

    await ledger.media_failed(done, "corrupt image", final=True)
    assert (await report(ledger))["m/a.jpg"] == ("FAILED", "corrupt image")
    assert await ledger.requeue_due(lambda _f, _at: True) == 0
    await ledger.media_failed(done, "bucket timeout", final=False)
    assert await ledger.requeue_due(lambda failures, _at: failures == 2) == 1


@pytest.mark.parametrize("facts", _FACTS, ids=["image", "upload", "video", "video-audio"])
async def test_facts_cache_round_trip(ledger_factory: Factory, facts: Facts) -> None:
    a = await ledger_factory("job-a")
    obj = o("m/a.jpg", "etag-1")
    assert await a.cached_facts("bucket", obj, "thumbnail/v1") is None
    await a.cache_facts("bucket", obj, "thumbnail/v1", facts)
    assert await a.cached_facts("bucket", obj, "thumbnail/v1") == facts
    b = await ledger_factory("job-b")  # any job
    assert await b.cached_facts("bucket", obj, "thumbnail/v1") == facts
    # Another version, kind or bucket: a miss. No ETag: never cached.
    assert await b.cached_facts("bucket", replace(obj, etag="etag-2"), "thumbnail/v1") is None
    assert await b.cached_facts("bucket", obj, "upload/v1") is None
    assert await b.cached_facts("other", obj, "thumbnail/v1") is None
    await a.cache_facts("bucket", replace(obj, etag=""), "thumbnail/v1", facts)
    assert await a.cached_facts("bucket", replace(obj, etag=""), "thumbnail/v1") is None


# --- sending ------------------------------------------------------------------------------------


async def test_mark_sent_counts_attempts_and_duplicates_in_one_batch(ledger: LedgerPort) -> None:
    a, b, c = await record(ledger, ["a/1.jpg", "a/2.jpg", "a/3.jpg"])
    assert await ledger.mark_sent([a, b]) == [1, 1]
    assert await state(ledger, a) is State.SENT
    assert await ledger.mark_sent([a]) == [2]
    assert await ledger.mark_sent([c, a, c]) == [1, 3, 2]
    assert await ledger.mark_sent([single("nowhere/x.jpg")]) == [1]  # not recorded: a first
    assert {p.item.name: p.attempts async for p in ledger.pending()} == {
        "1.jpg": 3,
        "2.jpg": 1,
        "3.jpg": 2,
    }


async def test_mark_sent_many_items(ledger: LedgerPort) -> None:
    items = await record(ledger, [f"n/{i:04d}.jpg" for i in range(1234)])
    assert await ledger.mark_sent(items) == [1] * 1234
    assert await ledger.mark_sent(items[::-1]) == [2] * 1234
    assert (await ledger.status()).items_by_state == {"SENT": 1234}


async def test_unmark_sent_takes_the_attempt_back(ledger: LedgerPort) -> None:
    first, again, twice, done = await record(ledger, ["u/1.jpg", "u/2.jpg", "u/3.jpg", "u/4.jpg"])
    await ledger.mark_sent([again, done])  # an earlier run sent these
    await ledger.record_outcomes([Outcome(done.path, done.name, State.REGISTERED, "id")])
    await ledger.mark_sent([first, again, twice, twice, done])
    await ledger.unmark_sent([first, again, twice, twice, done])
    attempts = {p.item.name: p.attempts async for p in ledger.pending()}
    assert attempts == {"1.jpg": 0, "2.jpg": 1, "3.jpg": 0, "4.jpg": 1}
    states = await ledger.item_states([first.ident, again.ident, twice.ident, done.ident])
    assert states == {
        first.ident: State.PLANNED,  # never sent before: planned again
        again.ident: State.SENT,  # sent by an earlier run: still SENT
        twice.ident: State.PLANNED,
        done.ident: State.SENT,  # registered, then re-sent: one attempt left
    }
    await ledger.unmark_sent([first])  # not SENT: untouched
    assert (await ledger.item_states([first.ident]))[first.ident] is State.PLANNED
    assert await ledger.mark_sent([first]) == [1]


async def test_outcomes_final_flag_and_report(ledger: LedgerPort) -> None:
    a, b, c, d = await record(ledger, ["o/a.jpg", "o/b.jpg", "o/c.jpg", "o/d.jpg"])
    await ledger.mark_sent([a, b, c, d])
    await ledger.record_outcomes(
        [
            Outcome(a.path, a.name, State.REGISTERED, v7_id="id-a"),
            Outcome(b.path, b.name, State.BLOCKED, reason="ALREADY_EXISTS"),
            Outcome(c.path, c.name, State.FAILED, reason="HTTP 422", retryable=False),
            Outcome(d.path, d.name, State.FAILED, reason="HTTP 503", retryable=True),
        ]
    )
    rows = {r.key: r async for r in ledger.report_rows()}
    assert (rows["o/a.jpg"].state, rows["o/a.jpg"].v7_id) == ("REGISTERED", "id-a")
    assert (rows["o/a.jpg"].item_path, rows["o/a.jpg"].item_name) == ("/o", "a.jpg")
    assert (rows["o/b.jpg"].state, rows["o/b.jpg"].reason) == ("BLOCKED", "ALREADY_EXISTS")
    st = await ledger.status()
    assert st.items_by_state == {"REGISTERED": 1, "BLOCKED": 1, "FAILED": 2}
    assert ("BLOCKED: ALREADY_EXISTS", 1) in st.failures_by_reason
    assert ("FAILED: HTTP 422", 1) in st.failures_by_reason
    # The non-retryable failure is final: only the 503 is retried automatically.
    seen: list[int] = []

    def due(failures: int, _at: float) -> bool:
        seen.append(failures)
        return True

    assert await ledger.requeue_due(due) == 1
    assert seen == [1]
    assert await state(ledger, d) is State.PLANNED
    assert await state(ledger, c) is State.FAILED
    # The same item twice in one batch: the last outcome wins.
    await ledger.record_outcomes(
        [
            Outcome(d.path, d.name, State.FAILED, reason="x", retryable=True),
            Outcome(d.path, d.name, State.REGISTERED, v7_id="id-d"),
        ]
    )
    assert await state(ledger, d) is State.REGISTERED


async def test_v7_ids_learned_later(ledger: LedgerPort) -> None:
    items = await record(ledger, [f"i/{n}.jpg" for n in range(5)])
    await ledger.record_outcomes([Outcome(i.path, i.name, State.REGISTERED) for i in items[:4]])
    await ledger.record_outcomes([Outcome(items[0].path, items[0].name, State.REGISTERED, "i0")])
    assert await ledger.registered_without_id(10) == [i.ident for i in items[1:4]]
    assert await ledger.registered_without_id(2) == [i.ident for i in items[1:3]]
    await ledger.set_v7_ids([(items[1].ident, "i1"), (items[3].ident, "i3")])
    assert await ledger.registered_without_id(10) == [items[2].ident]
    rows = {r.key: r.v7_id async for r in ledger.report_rows()}
    assert rows == {"i/0.jpg": "i0", "i/1.jpg": "i1", "i/2.jpg": "", "i/3.jpg": "i3", "i/4.jpg": ""}


async def test_items_the_listing_keeps_missing_are_not_looked_up_for_ever(
    ledger: LedgerPort,
) -> None:
    items = await record(ledger, ["m/a.jpg", "m/b.jpg"])
    await ledger.record_outcomes([Outcome(i.path, i.name, State.REGISTERED) for i in items])
    for _ in range(2):
        await ledger.note_id_misses([items[0].ident, ("/m", "unknown.jpg")])
    assert await ledger.registered_without_id(10) == [i.ident for i in items]
    await ledger.note_id_misses([items[0].ident])
    assert await ledger.registered_without_id(10) == [items[1].ident]


async def test_item_states_batched(ledger: LedgerPort) -> None:
    items = await record(ledger, [f"b/{n:04d}.jpg" for n in range(1200)])
    await ledger.mark_sent(items[:600])
    got = await ledger.item_states([i.ident for i in items] + [("/b", "missing.jpg")])
    assert len(got) == 1200
    assert [got[i.ident] for i in items] == [State.SENT] * 600 + [State.PLANNED] * 600
    assert await ledger.item_states([]) == {}


# --- retry --------------------------------------------------------------------------------------


async def test_requeue_failed(ledger: LedgerPort) -> None:
    a, b, c, d = await record(ledger, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    assert await ledger.blocked_reasons() == []
    await ledger.record_outcomes(
        [
            Outcome("/", "a.jpg", State.FAILED, reason="HTTP 422"),  # final: retry anyway
            Outcome("/", "b.jpg", State.BLOCKED, reason="ALREADY_EXISTS"),
            Outcome("/", "c.jpg", State.BLOCKED, reason="FILE_UPLOAD_TIMEOUT"),
            Outcome("/", "d.jpg", State.REGISTERED, v7_id="i"),
        ]
    )
    assert await ledger.blocked_reasons() == ["ALREADY_EXISTS", "FILE_UPLOAD_TIMEOUT"]
    assert await ledger.requeue_failed() == 1
    assert await ledger.requeue_failed("FILE_UPLOAD_TIMEOUT") == 1
    assert await ledger.blocked_reasons() == ["ALREADY_EXISTS"]
    states = await ledger.item_states([a.ident, b.ident, c.ident, d.ident])
    assert [states[x.ident] for x in (a, b, c, d)] == [
        State.PLANNED,
        State.BLOCKED,
        State.PLANNED,
        State.REGISTERED,
    ]
    assert (await report(ledger))["a.jpg"] == ("PLANNED", "")
    assert sorted([p.item.name async for p in ledger.pending()]) == ["a.jpg", "c.jpg"]


async def test_requeue_due_skips_final_and_vanished(ledger: LedgerPort) -> None:
    items = await record(ledger, [f"r/{n:04d}.jpg" for n in range(1500)])
    await ledger.record_outcomes(
        [Outcome(i.path, i.name, State.FAILED, reason="HTTP 500", retryable=True) for i in items]
    )
    await ledger.record_outcomes(
        [Outcome(items[0].path, items[0].name, State.FAILED, reason="422", retryable=False)]
    )
    assert await ledger.record_sync_page(vanished=["r/0001.jpg"]) == 1
    calls: list[tuple[int, float]] = []

    def is_due(failures: int, failed_at: float) -> bool:
        calls.append((failures, failed_at))
        return len(calls) % 2 == 0

    assert await ledger.requeue_due(is_due) == 749  # every other one of 1498
    assert len(calls) == 1498 and all(f == 1 and at > 0 for f, at in calls)
    assert await ledger.requeue_due(lambda _f, _at: True) == 749
    states = await ledger.item_states([i.ident for i in items[:3]])
    assert [states[i.ident] for i in items[:3]] == [State.FAILED, State.FAILED, State.PLANNED]


# --- sync ---------------------------------------------------------------------------------------

_TREE = ["d/a.jpg", "d/b.jpg", "d/sub/1.jpg", "d/sub/2.jpg", "d/t/x.jpg", "d/z.jpg", "e/q.jpg"]


async def _keys(
    lg: LedgerPort,
    prefix: str,
    recursive: bool,
    start: str = "",
    inclusive: bool = True,
    limit: int = 100,
) -> list[str]:
    return [k.key for k in await lg.known_range(prefix, recursive, start, inclusive, limit)]


async def test_known_range(ledger: LedgerPort) -> None:
    tree = [*_TREE, "d/n.txt"]
    under_d = sorted(k for k in tree if k.startswith("d/"))
    await record(ledger, tree)
    assert await _keys(ledger, "d/", True) == under_d
    assert await _keys(ledger, "", True) == sorted(tree)
    # Non-recursive: only keys directly under the prefix; sub-folders are skipped.
    assert await _keys(ledger, "d/", False) == ["d/a.jpg", "d/b.jpg", "d/n.txt", "d/z.jpg"]
    assert await _keys(ledger, "", False) == []
    # From a start key, inclusive or not, and a start before the prefix.
    assert await _keys(ledger, "d/", False, "d/b.jpg") == ["d/b.jpg", "d/n.txt", "d/z.jpg"]
    assert await _keys(ledger, "d/", False, "d/b.jpg", False) == ["d/n.txt", "d/z.jpg"]
    assert await _keys(ledger, "d/", False, "d/sub/1.jpg") == ["d/z.jpg"]
    assert await _keys(ledger, "d/", True, "a", False) == under_d
    assert await _keys(ledger, "d/sub/", True, "d/sub/1.jpg", False) == ["d/sub/2.jpg"]
    # A limit, across sub-folders that are skipped.
    assert await _keys(ledger, "d/", False, limit=3) == ["d/a.jpg", "d/b.jpg", "d/n.txt"]
    assert await _keys(ledger, "d/", False, "d/n.txt", False, limit=1) == ["d/z.jpg"]
    assert await _keys(ledger, "d/", True, limit=3) == ["d/a.jpg", "d/b.jpg", "d/n.txt"]


async def test_known_range_pages_through_many_sub_folders(ledger: LedgerPort) -> None:
    keys = [f"p/{i:04d}.jpg" for i in range(0, 3000, 2)]
    keys += [f"p/{i:04d}/x.jpg" for i in range(1, 3000, 2)]  # a folder between every two
    await record(ledger, keys)
    got: list[str] = []
    start, inclusive = "", True
    while batch := await ledger.known_range("p/", False, start, inclusive, 400):
        got += [k.key for k in batch]
        start, inclusive = batch[-1].key, False
    assert got == sorted(k for k in keys if k.count("/") == 1)


async def test_known_batched_and_its_flags(ledger: LedgerPort) -> None:
    keys = [f"k/{i:04d}.jpg" for i in range(1100)]
    await record(ledger, keys)
    # Listed but never planned (a stopped run's planner held it).
    await ledger.record_page("s", "", False, [o("k/held.dcm")], [], collide)
    await ledger.record_sync_page(vanished=["k/0001.jpg"], changed=[("k/0002.jpg", "e9")])
    got = await ledger.known([*keys, "k/held.dcm", "k/unknown.jpg", "k/0000.jpg"])
    assert len(got) == 1101 and "k/unknown.jpg" not in got
    assert got["k/0000.jpg"] == Known("k/0000.jpg", "e1", "", False, False)
    assert got["k/0001.jpg"].vanished is True
    assert got["k/0002.jpg"].changed_etag == "e9"
    assert got["k/held.dcm"].unplanned is True
    assert await ledger.known([]) == {}


async def test_sub_folders(ledger: LedgerPort) -> None:
    await record(ledger, _TREE)
    assert await ledger.sub_folders("d/") == ["d/sub/", "d/t/"]
    assert await ledger.sub_folders("") == ["d/", "e/"]
    assert await ledger.sub_folders("e/") == []


async def test_record_sync_page_counts_and_report(ledger: LedgerPort) -> None:
    await record(ledger, ["s/1.jpg", "s/2.jpg", "s/3.jpg"])
    assert await ledger.record_sync_page() == 0
    assert await ledger.record_sync_page(vanished=["s/1.jpg", "s/2.jpg", "s/nope.jpg"]) == 2
    assert await ledger.record_sync_page(vanished=["s/1.jpg"]) == 0  # already vanished
    assert await ledger.record_sync_page(reappeared=["s/2.jpg"], changed=[("s/3.jpg", "e7")]) == 0
    st = await ledger.status()
    assert (st.vanished_objects, st.changed_objects) == (1, 1)
    rows = {r.key: r.sync async for r in ledger.report_rows()}
    assert rows == {"s/1.jpg": "vanished", "s/2.jpg": "", "s/3.jpg": "changed (etag e7)"}
    # A re-listing with another ETag is "changed" without a recorded new ETag.
    await record(ledger, ["s/2.jpg"], etag="e8")
    assert {r.key: r.sync async for r in ledger.report_rows()}["s/2.jpg"] == "changed"


async def test_mark_vanished_under(ledger: LedgerPort) -> None:
    await record(ledger, _TREE)
    assert await ledger.mark_vanished_under("d/sub/") == 2
    assert await ledger.mark_vanished_under("d/sub/") == 0
    assert await ledger.mark_vanished_under("d/") == 4
    assert (await ledger.status()).vanished_objects == 6


async def test_record_new_version_and_changing_back(ledger: LedgerPort) -> None:
    (v1,) = await record(ledger, ["n/photo.jpg"])
    changed = o("n/photo.jpg", "e2", 20)
    v2 = single(changed, "photo.ve2.jpg")
    assert await ledger.record_new_version(changed, v2) is True
    assert await ledger.record_new_version(changed, v2) is False  # a re-run of the same sync
    assert (await ledger.known(["n/photo.jpg"]))["n/photo.jpg"].etag == "e2"
    (row,) = [r async for r in ledger.report_rows()]
    assert (row.item_name, row.state, row.etag, row.size, row.sync) == (
        "photo.ve2.jpg",
        "PLANNED",
        "e2",
        20,
        "",
    )
    assert [p.item for p in [p async for p in ledger.pending()]] == [v1, v2]
    # Back to the first version, registered again under its versioned name earlier:
    back = o("n/photo.jpg", "e1")
    v1b = single(back, "photo.ve1.jpg")
    assert await ledger.record_new_version(back, v1b) is True
    v3 = o("n/photo.jpg", "e3")
    assert await ledger.record_new_version(v3, single(v3, "photo.ve3.jpg")) is True
    assert await ledger.record_new_version(back, v1b) is False  # changed back: that item again
    (row,) = [r async for r in ledger.report_rows()]
    assert (row.item_name, row.etag, row.sync) == ("photo.ve1.jpg", "e1", "")
    assert await ledger.item_key_count("n/photo.jpg") == 1
    # An item of that name made of another key is not ours: the change is reported.
    await record(ledger, ["n/other.jpg"])
    clash = o("n/other.jpg", "e5")
    assert (
        await ledger.record_new_version(clash, replace(single(clash), name="photo.ve1.jpg"))
        is False
    )
    assert {r.key: r.sync async for r in ledger.report_rows()}["n/other.jpg"] == (
        "changed (etag e5)"
    )


# --- leases -------------------------------------------------------------------------------------


async def test_leases(ledger_factory: Factory) -> None:
    a = await ledger_factory()
    b = await ledger_factory()
    assert await a.acquire_lease("A", 30, now=100, holder_dead=lambda _h: False) is None
    assert await a.acquire_lease("A", 30, now=110, holder_dead=lambda _h: False) is None
    held = await b.acquire_lease("B", 30, now=120, holder_dead=lambda _h: False)
    assert held == Lease("A", 110, 140)
    assert await a.renew_lease("A", 30, now=125) is True
    # The holder is known dead: taken over at once; the old holder cannot renew any more.
    asked: list[str] = []

    def dead(holder: str) -> bool:
        asked.append(holder)
        return True

    assert await b.acquire_lease("B", 30, now=126, holder_dead=dead) is None
    assert asked == ["A"]
    assert await a.renew_lease("A", 30, now=127) is False
    await a.release_lease("A")  # not ours: nothing happens
    assert await a.acquire_lease("A", 30, 128, lambda _h: False) == Lease("B", 126, 156)
    # Expired: anyone takes it.
    assert await a.acquire_lease("A", 30, now=157, holder_dead=lambda _h: False) is None
    await a.release_lease("A")
    assert await b.acquire_lease("B", 30, now=158, holder_dead=lambda _h: False) is None
    other_job = await ledger_factory("job-2")  # leases are per job
    assert await other_job.acquire_lease("C", 30, now=159, holder_dead=lambda _h: False) is None


# --- reading ------------------------------------------------------------------------------------


async def test_report_rows_stream_in_key_order_across_chunks(ledger: LedgerPort) -> None:
    keys = [f"r/{i:04d}.jpg" for i in range(2100)] + ["r/zz.txt", "a/ü.jpg", "a/b c.jpg"]
    for chunk in (keys[1000:], keys[:1000]):  # recorded out of order
        await record(ledger, chunk)
    rows = [r async for r in ledger.report_rows()]
    assert [r.key for r in rows] == sorted(keys)
    assert all(r.size == 10 and r.etag == "e1" for r in rows)
    skipped = next(r for r in rows if r.key == "r/zz.txt")
    assert (skipped.state, skipped.item_path, skipped.item_name, skipped.v7_id) == (
        "SKIPPED",
        "",
        "",
        "",
    )


async def test_report_rows_say_what_read_only_dicom_was_converted_into(
    ledger: LedgerPort,
) -> None:
    dcm = o("d/ct.dcm")
    made = ConvertedFacts("conv/ct.png", ImageFacts(64, 32, "t/ct.jpg"))
    slot = Slot("0", ItemType.IMAGE, (dcm,), "ct.png", facts=(made,))
    item = Item("/d", "ct.dcm", (slot,), readonly_endpoint=True)
    await ledger.record_page(
        "s", "", False, [dcm, o("d/plain.jpg")], [item, single("d/plain.jpg")], collide
    )
    rows = {r.key: r.converted async for r in ledger.report_rows()}
    assert rows == {"d/ct.dcm": "conv/ct.png", "d/plain.jpg": ""}


async def test_status_counts(ledger: LedgerPort) -> None:
    items = await record(ledger, ["x/1.jpg", "x/2.jpg", "x/3.jpg", "x/4.txt"])
    await ledger.record_page("s", "", False, [o("x/held.dcm")], [], collide)
    await ledger.mark_sent(items[:1])
    await ledger.record_outcomes([Outcome(items[1].path, items[1].name, State.FAILED, "", "e")])
    st = await ledger.status()
    assert st.job == "job-1"
    assert st.objects_by_state == {
        "SENT": 1,
        "FAILED": 1,
        "PLANNED": 1,
        "SKIPPED": 1,
        "DISCOVERED": 1,
    }
    assert st.items_by_state == {"SENT": 1, "FAILED": 1, "PLANNED": 1}
    assert st.failures_by_reason[0] == ("FAILED: e", 1)
    assert st.as_dict()["failures_by_reason"][0] == {"reason": "FAILED: e", "count": 1}
    assert st.last_runs[0]["status"] == "running" and st.last_runs[0]["kind"] == "run"


# --- manifests ----------------------------------------------------------------------------------


async def test_manifest_staging_and_grouping(ledger: LedgerPort) -> None:
    rows = [(f"item-{i // 3:04d}", f"slot{2 - i % 3}", f"m/{i:05d}.jpg", "/p") for i in range(3003)]
    rows.append(("item-0000", "extra", "m/extra.jpg", "/q"))  # same name, other path
    rows.insert(0, ("item-0001", "first", "m/first.jpg", "/p"))  # out of order in the file
    assert await ledger.stage_manifest(iter(rows)) == len(rows)
    got = [m async for m in ledger.manifest_items()]
    assert len(got) == 1001 + 1
    assert got[0] == ManifestItem(
        "item-0000",
        "/p",
        (("slot2", "m/00000.jpg"), ("slot1", "m/00001.jpg"), ("slot0", "m/00002.jpg")),
    )
    assert got[1].slots[0] == ("first", "m/first.jpg")  # file order within an item
    assert got[-1] == ManifestItem("item-0000", "/q", (("extra", "m/extra.jpg"),))
    assert await ledger.in_manifest(["m/00007.jpg", "m/extra.jpg", "m/nope.jpg"]) == {
        "m/00007.jpg",
        "m/extra.jpg",
    }
    many = [f"m/{i:05d}.jpg" for i in range(0, 3003, 2)]
    assert await ledger.in_manifest(many) == set(many)
    # Staging again replaces the manifest.
    assert await ledger.stage_manifest([("only", "0", "m/only.jpg", "/")]) == 1
    assert [m async for m in ledger.manifest_items()] == [
        ManifestItem("only", "/", (("0", "m/only.jpg"),))
    ]
    assert await ledger.in_manifest(["m/00007.jpg"]) == set()


async def test_object_infos_batched(ledger: LedgerPort) -> None:
    keys = [f"i/{n:04d}.jpg" for n in range(1300)]
    await ledger.record_page("s", "", False, [o(k, size=7) for k in keys], [], collide)
    got = await ledger.object_infos([*keys, "i/none.jpg"])
    assert len(got) == 1300
    assert got["i/0005.jpg"] == ObjectInfo("i/0005.jpg", 7, "e1", "2024-01-01T00:00:00Z")
    assert await ledger.object_infos([]) == {}


__all__ = ["Factory", "ledger", *(n for n in list(globals()) if n.startswith("test_"))]


# --- operations -------------------------------------------------------------------------------


async def test_prune_deletes_finished_items_of_this_job_only(ledger_factory: Factory) -> None:
    import time

    lg = await ledger_factory()
    other = await ledger_factory("job-2")
    await lg.start_run("run")
    await other.start_run("run")
    a, b, c = await record(lg, ["p/a.jpg", "p/b.jpg", "p/c.jpg"])
    (x,) = await record(other, ["p/a.jpg"])
    await lg.record_outcomes(
        [
            Outcome(a.path, a.name, State.REGISTERED, v7_id="1"),
            Outcome(b.path, b.name, State.REGISTERED, v7_id="2"),
        ]
    )
    await other.record_outcomes([Outcome(x.path, x.name, State.REGISTERED, v7_id="3")])
    # Nothing older than a minute ago.
    assert await lg.prune(State.REGISTERED, time.time() - 60) == 0
    assert await lg.prune(State.REGISTERED, time.time() + 1) == 2
    assert await report(lg) == {
        "p/a.jpg": ("REGISTERED", ""),
        "p/b.jpg": ("REGISTERED", ""),
        "p/c.jpg": ("PLANNED", ""),
    }
    assert (await lg.status()).items_by_state == {"PLANNED": 1}
    assert await state(other, x) is State.REGISTERED  # another job's rows stay
    assert await state(lg, c) is State.PLANNED
    # Their objects stay, REGISTERED, as tombstones: listed again, they are not planned
    # (never sent twice), and status still counts them.
    assert await record(lg, ["p/a.jpg", "p/new.jpg"]) == [single("p/new.jpg")]
    assert (await lg.status()).objects_by_state == {"REGISTERED": 2, "PLANNED": 2}
    assert (await report(lg))["p/a.jpg"] == ("REGISTERED", "")


async def test_prune_skipped_objects_and_never_while_the_job_runs(
    ledger_factory: Factory,
) -> None:
    import time

    from ingest.errors import LeaseHeld

    lg = await ledger_factory()
    await lg.start_run("run")
    await record(lg, ["k/a.jpg", "k/notes.txt", "k/more.txt"])  # .txt: skipped
    assert (await lg.status()).objects_by_state == {"PLANNED": 1, "SKIPPED": 2}
    assert await lg.prune(State.SKIPPED, time.time()) == 2
    assert (await lg.status()).objects_by_state == {"PLANNED": 1}
    assert await lg.acquire_lease("H", 60, time.time(), lambda _h: False) is None
    with pytest.raises(LeaseHeld):
        await lg.prune(State.REGISTERED, time.time())
    await lg.release_lease("H")
    assert await lg.prune(State.REGISTERED, time.time()) == 0
