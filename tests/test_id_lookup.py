"""V7 ids for items confirmed through ALREADY_EXISTS: the emulator's item filters and
blocked-item ids, V7Client.find_item_ids, and IdResolver (pure policy, fakes, and end to end
against the emulator process)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from ingest.emulator import API_KEY
from ingest.emulator.server import EmulatorConfig, make_app
from ingest.errors import Interrupted, NotFoundError, RejectedError, ServerError, TransportError
from ingest.registrar.client import SlotFactory, V7Client, lookup_chunks
from ingest.registrar.lookup import FlushPolicy, IdResolver, Pair, Record, client_finder
from ingest.registrar.retry import RetryPolicy
from ingest.registrar.wire import Ident
from ingest.stats import Stats
from tests.support.e2e import DATASET, STORAGE_RW, emulator_process

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]

TEAM = "emulator-team"
AUTH = {"Authorization": f"ApiKey {API_KEY}", "Content-Type": "application/json"}
ITEMS = f"/api/v2/teams/{TEAM}/items"


def img(name: str, path: str = "/") -> dict[str, Any]:
    return {"path": path, "type": "image", "storage_key": f"k{path}/{name}", "name": name}


def envelope(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"items": items, "dataset_slug": DATASET, "storage_slug": STORAGE_RW}


@contextlib.asynccontextmanager
async def served(cfg: EmulatorConfig) -> AsyncIterator[tuple[TestServer, aiohttp.ClientSession]]:
    server = TestServer(make_app(cfg), host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield server, session
    finally:
        await session.close()
        await server.close()


async def call(
    server: TestServer,
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
    params: list[tuple[str, str]] | None = None,
) -> tuple[int, Any]:
    data = None if body is None else orjson.dumps(body)
    async with session.request(
        method, server.make_url(path), data=data, params=params, headers=AUTH
    ) as r:
        raw = await r.read()
        return r.status, orjson.loads(raw) if raw else None


# --- emulator: item filters, page size, blocked-item ids -------------------------------------


async def test_emulator_filters_items_by_names_and_paths() -> None:
    async with served(EmulatorConfig()) as (server, session):
        items = [img("a.png"), img("b.png"), img("a.png", "/x"), img("c,d.png", "/x")]
        status, _ = await call(
            server, session, "POST", f"{ITEMS}/register_existing", envelope(items)
        )
        assert status == 200

        async def names(params: list[tuple[str, str]]) -> list[tuple[str, str]]:
            status, doc = await call(
                server, session, "GET", ITEMS, params=[("dataset_ids[]", "1"), *params]
            )
            assert status == 200, doc
            return [(r["path"], r["name"]) for r in doc["items"]]

        assert await names([("item_names[]", "a.png")]) == [("/", "a.png"), ("/x", "a.png")]
        assert await names([("item_names[]", "a.png"), ("item_paths[]", "/x")]) == [("/x", "a.png")]
        assert await names([("item_paths[]", "/x/")]) == [("/x", "a.png"), ("/x", "c,d.png")]
        # [] form keeps a comma in a name; the plain form is darwin-py's comma-separated string
        assert await names([("item_names[]", "c,d.png")]) == [("/x", "c,d.png")]
        assert await names([("item_names", "a.png,b.png"), ("item_paths[]", "/")]) == [
            ("/", "a.png"),
            ("/", "b.png"),
        ]
        assert await names([("item_names[]", "A.PNG")]) == []  # exact, case-sensitive
        assert len(await names([])) == 4  # no filter: everything


async def test_emulator_max_page_size_caps_pages_and_paginates_filtered_rows() -> None:
    async with served(EmulatorConfig(max_page_size=2)) as (server, session):
        items = [img(f"{i}.png") for i in range(5)] + [img("other.png")]
        await call(server, session, "POST", f"{ITEMS}/register_existing", envelope(items))
        wanted = [("item_names[]", f"{i}.png") for i in range(5)]
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params = [("dataset_ids[]", "1"), ("page[size]", "500"), *wanted]
            if cursor is not None:
                params.append(("page[from]", cursor))
            status, doc = await call(server, session, "GET", ITEMS, params=params)
            assert status == 200
            assert len(doc["items"]) <= 2
            assert doc["page"]["count"] == 5
            seen += [r["name"] for r in doc["items"]]
            pages += 1
            if doc["page"]["next"] is None:
                break
            cursor = str(doc["page"]["next"])
        assert pages == 3 and seen == [f"{i}.png" for i in range(5)]


@pytest.mark.parametrize("with_ids", [False, True])
async def test_emulator_blocked_item_ids_switch(with_ids: bool) -> None:
    async with served(EmulatorConfig(blocked_item_ids=with_ids)) as (server, session):
        _, first = await call(
            server, session, "POST", f"{ITEMS}/register_existing", envelope([img("a.png")])
        )
        _, again = await call(
            server, session, "POST", f"{ITEMS}/register_existing", envelope([img("a.png")])
        )
        (blocked,) = again["blocked_items"]
        assert blocked["slots"][0]["reason"] == "ALREADY_EXISTS"
        if with_ids:
            assert blocked["id"] == first["items"][0]["id"]
        else:
            assert "id" not in blocked


async def test_emulator_blocked_item_ids_settable_at_run_time() -> None:
    async with served(EmulatorConfig()) as (server, session):
        status, _ = await call(
            server, session, "POST", "/_emulator/config", {"blocked_item_ids": True}
        )
        assert status == 200
        await call(server, session, "POST", f"{ITEMS}/register_existing", envelope([img("a.png")]))
        _, again = await call(
            server, session, "POST", f"{ITEMS}/register_existing", envelope([img("a.png")])
        )
        assert again["blocked_items"][0]["id"]


# --- client ----------------------------------------------------------------------------------


def test_lookup_chunks_bound_count_and_query_length() -> None:
    names = [f"n{i}" for i in range(250)]
    chunks = lookup_chunks(names, max_names=100)
    assert [len(c) for c in chunks] == [100, 100, 50]
    assert [n for c in chunks for n in c] == names
    long = ["x" * 3000, "y" * 3000, "z"]
    assert lookup_chunks(long, max_names=100, max_query_chars=6000) == [
        ["x" * 3000],
        ["y" * 3000, "z"],
    ]
    assert lookup_chunks(["x" * 9000], max_query_chars=100) == [["x" * 9000]]  # alone, not lost
    assert lookup_chunks([]) == []


async def test_client_find_item_ids_batches_paginates_and_matches_exactly() -> None:
    cfg = EmulatorConfig(max_page_size=3)
    async with served(cfg) as (server, session):
        existing = [img(f"{i}.png", "/d") for i in range(8)] + [img("0.png", "/other")]
        await call(server, session, "POST", f"{ITEMS}/register_existing", envelope(existing))
        emu = server.app["emulator"]
        ids = {(d["path"], d["name"]): d["id"] for d in emu.store.order[1]}
        client = V7Client(str(server.make_url("")), API_KEY, session=session)
        stats = Stats()
        client.stats = stats
        slots = 0

        @contextlib.asynccontextmanager
        async def slot() -> AsyncIterator[None]:
            nonlocal slots
            slots += 1
            yield

        wanted = [("/d", f"{i}.png") for i in range(8)] + [("/d/", "missing.png"), ("d", "0.png")]
        found = await client.find_item_ids(TEAM, 1, wanted, max_names=4, slot=slot)
        assert found == {(p, n): ids[(p, n)] for p, n in wanted[:8]}
        assert ("/other", "0.png") not in found
        gets = emu.requests[f"GET {ITEMS} 200"]
        assert slots == gets  # every GET went out inside a slot
        assert gets >= 3  # 9 distinct names in chunks of 4, several pages of 3 each
        assert stats.http_statuses[200] == gets

        emu.requests.clear()
        found2 = await client.find_item_ids(TEAM, 1, wanted, max_names=100, filter_paths=True)
        assert found2 == found
        # with item_paths[], /other's row is not returned: 8 rows, pages of 3
        assert emu.requests[f"GET {ITEMS} 200"] == 3


async def test_client_find_item_ids_maps_errors() -> None:
    async with served(EmulatorConfig()) as (server, session):
        client = V7Client(str(server.make_url("")), API_KEY, session=session)
        with pytest.raises(NotFoundError):
            await client.find_item_ids(TEAM, 99, [("/", "a.png")])
        with pytest.raises(NotFoundError):
            await client.find_item_ids("no-team", 1, [("/", "a.png")])
        assert await client.find_item_ids(TEAM, 1, []) == {}


# --- IdResolver: the pure flush policy -------------------------------------------------------


def test_flush_policy() -> None:
    p = FlushPolicy(batch_size=3, max_wait_s=2.0)
    assert p.due_in(0, None, 10.0) is None
    assert p.due_in(0, None, 10.0, draining=True) is None
    assert p.due_in(3, 9.9, 10.0) == 0.0  # full batch: now
    assert p.due_in(5, 9.9, 10.0) == 0.0
    assert p.due_in(1, 9.5, 10.0) == pytest.approx(1.5)  # partial: when the oldest is 2 s old
    assert p.due_in(1, 7.0, 10.0) == 0.0  # overdue
    assert p.due_in(1, 9.9, 10.0, draining=True) == 0.0  # drain sends what is left
    with pytest.raises(ValueError):
        FlushPolicy(batch_size=0)


# --- IdResolver with a fake finder -----------------------------------------------------------


class FakeFinder:
    def __init__(self, known: dict[Ident, str], errors: Sequence[Exception] = ()) -> None:
        self.known = known
        self.errors = list(errors)
        self.batches: list[list[Ident]] = []
        self.slots = 0

    async def __call__(self, idents: Sequence[Ident], slot: SlotFactory) -> dict[Ident, str]:
        async with slot():
            self.slots += 1
            self.batches.append(list(idents))
            if self.errors:
                raise self.errors.pop(0)
            return {k: self.known[k] for k in idents if k in self.known}


class Recorder:
    def __init__(self) -> None:
        self.pairs: list[Pair] = []

    async def __call__(self, pairs: list[Pair]) -> None:
        self.pairs.extend(pairs)


class FakeSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, s: float) -> None:
        self.waits.append(s)


def resolver(finder: FakeFinder, rec: Record, **kw: Any) -> IdResolver:
    kw.setdefault("policy", FlushPolicy(batch_size=3, max_wait_s=1000.0))
    kw.setdefault("sleep", FakeSleep())
    kw.setdefault("rand", lambda: 0.5)
    return IdResolver(finder, rec, **kw)


async def test_resolver_batches_dedupes_and_records() -> None:
    known = {("/", f"{i}"): f"id{i}" for i in range(5)}
    finder, rec = FakeFinder(known), Recorder()
    r = resolver(finder, rec)
    task = asyncio.create_task(r.run())
    r.add([("/", "0"), ("/", "1"), ("", "0")])  # "" normalises to "/": a duplicate
    r.add([("/", "2"), ("/", "9")])
    await r.close()
    await task
    assert finder.batches == [[("/", "0"), ("/", "1"), ("/", "2")], [("/", "9")]]
    assert sorted(rec.pairs) == [(("/", "0"), "id0"), (("/", "1"), "id1"), (("/", "2"), "id2")]
    assert (r.counts.found, r.counts.not_found, r.counts.unknown) == (3, 1, 1)
    r.add([("/", "3")])  # after close: ignored
    assert r.pending == 0


async def test_resolver_tells_which_idents_the_listing_did_not_show() -> None:
    finder, rec = FakeFinder({("/", "0"): "id0"}), Recorder()
    missed: list[Ident] = []

    async def note(idents: list[Ident]) -> None:
        missed.extend(idents)

    r = resolver(finder, rec, missed=note)
    r.add([("/", "0"), ("/", "1"), ("/", "2")])
    await r.close()
    assert rec.pairs == [(("/", "0"), "id0")]
    assert missed == [("/", "1"), ("/", "2")]


async def test_resolver_close_without_run_drains() -> None:
    finder, rec = FakeFinder({("/a", "x"): "1"}), Recorder()
    r = resolver(finder, rec)
    r.add([("/a/", "x")])
    await r.close()
    assert rec.pairs == [(("/a", "x"), "1")]


async def test_resolver_bounded_drops_oldest(caplog: pytest.LogCaptureFixture) -> None:
    finder, rec = FakeFinder({("/", "c"): "C", ("/", "d"): "D"}), Recorder()
    r = resolver(finder, rec, max_pending=2, policy=FlushPolicy(batch_size=10))
    r.add([("/", "a"), ("/", "b"), ("/", "c")])
    r.add([("/", "d")])
    assert r.pending == 2 and r.counts.dropped == 2
    with caplog.at_level("INFO", logger="ingest.registrar.lookup"):
        await r.close()
    assert finder.batches == [[("/", "c"), ("/", "d")]]
    assert r.counts.unknown == 2
    (line,) = [x for x in caplog.records if "ids looked up" in x.getMessage()]
    assert line.levelname == "WARNING" and "2 found, 2 still unknown" in line.getMessage()
    assert line.__dict__["ids_dropped"] == 2


async def test_resolver_retries_transient_errors_with_backoff() -> None:
    errors = [ServerError("502", status=502), TransportError("reset")]
    finder, rec, sleep = FakeFinder({("/", "a"): "A"}, errors), Recorder(), FakeSleep()
    r = resolver(finder, rec, sleep=sleep, retry_policy=RetryPolicy(base_s=1.0, cap_s=8.0))
    r.add([("/", "a")])
    await r.close()
    assert rec.pairs == [(("/", "a"), "A")]
    assert len(finder.batches) == 3 and sleep.waits == [0.5, 1.0]  # rand 0.5 x 1, x 2
    assert r.counts.requests == 3


async def test_resolver_gives_up_after_max_attempts_and_honours_retry_after() -> None:
    errors: list[Exception] = [ServerError("503", status=503, delay_s=7.0) for _ in range(5)]
    finder, rec, sleep = FakeFinder({("/", "a"): "A"}, errors), Recorder(), FakeSleep()
    r = resolver(finder, rec, sleep=sleep, max_attempts=3)
    r.add([("/", "a"), ("/", "b")])
    await r.close()
    assert rec.pairs == [] and r.counts.failed == 2
    assert sleep.waits == [7.0, 7.0]  # Retry-After above the jittered backoff


async def test_resolver_splits_a_batch_refused_as_too_large() -> None:
    known = {("/", "a"): "A", ("/", "b"): "B", ("/", "c"): "C"}
    finder, rec = FakeFinder(known, [RejectedError("414", status=414)]), Recorder()
    r = resolver(finder, rec)
    r.add(list(known))
    await r.close()
    assert finder.batches == [list(known), [("/", "a")], [("/", "b"), ("/", "c")]]
    assert sorted(rec.pairs) == sorted(known.items())


async def test_resolver_final_errors_and_stop_do_not_crash_the_run() -> None:
    finder, rec = FakeFinder({}, [NotFoundError("404", status=404)]), Recorder()
    r = resolver(finder, rec, policy=FlushPolicy(batch_size=1))
    r.add([("/", "a"), ("/", "b")])
    await r.close()
    assert r.counts.failed == 1 and r.counts.not_found == 1

    finder = FakeFinder({}, [Interrupted("stopped")])
    r = resolver(finder, rec, policy=FlushPolicy(batch_size=1))
    r.add([("/", "a"), ("/", "b")])
    await r.close()  # stops at the first Interrupted; the rest is left
    assert len(finder.batches) == 1 and r.counts.failed == 1 and r.pending == 1


async def test_resolver_partial_batch_goes_after_max_wait_without_close() -> None:
    finder, rec = FakeFinder({("/", "a"): "A"}), Recorder()
    sent = asyncio.Event()

    async def record(pairs: list[Pair]) -> None:
        await rec(pairs)
        sent.set()

    r = resolver(finder, record, policy=FlushPolicy(batch_size=100, max_wait_s=0.05))
    task = asyncio.create_task(r.run())
    r.add([("/", "a")])
    for _ in range(3):
        await asyncio.sleep(0)
    assert finder.batches == []  # a partial batch waits for more...
    await asyncio.wait_for(sent.wait(), 10)  # ...then goes on its own, no close needed
    assert len(finder.batches) == 1 and rec.pairs == [(("/", "a"), "A")]
    await r.close()
    await task


# --- end to end: the emulator process --------------------------------------------------------


async def test_resolver_end_to_end_against_the_emulator_process() -> None:
    with emulator_process("--max-page-size", "7") as emu:
        client = V7Client(emu.url, API_KEY, stats=Stats())
        try:
            items = [img(f"{i:03d}.png", "/f") for i in range(40)] + [img("000.png", "/g")]
            for i in range(0, len(items), 10):
                await client.register(TEAM, False, envelope(items[i : i + 10]))
            ids = {(d["path"], d["name"]): d["id"] for d in emu.items()}
            assert len(ids) == 41

            existing = [("/f", f"{i:03d}.png") for i in range(0, 40, 2)]  # 20 that exist
            missing = [("/f", f"nope-{i}.png") for i in range(7)] + [("/h", "000.png")]
            rec = Recorder()
            slots = 0

            @contextlib.asynccontextmanager
            async def acquire_slot() -> AsyncIterator[None]:
                nonlocal slots
                slots += 1
                yield

            r = IdResolver(
                client_finder(client, TEAM, 1),
                rec,
                acquire_slot=acquire_slot,
                policy=FlushPolicy(batch_size=12, max_wait_s=60.0),
            )
            task = asyncio.create_task(r.run())
            r.add(existing[:10] + missing[:4])
            r.add(existing[10:] + missing[4:])
            await r.close()
            await task
            assert dict(rec.pairs) == {k: ids[k] for k in existing}
            assert r.counts.found == 20 and r.counts.not_found == 8
            gets = emu.counters()["requests"][f"GET {ITEMS} 200"]
            assert slots == gets
            assert gets > r.counts.requests  # pages of 7 < batches of 12: pagination ran
        finally:
            await client.close()


async def test_limiter_slot_reports_answers_to_the_shared_limiter() -> None:
    from ingest.errors import RateLimited
    from ingest.registrar.lookup import limiter_slot
    from ingest.registrar.rate import Limiter, RateController

    controller = RateController(1000.0, burst=10)
    limiter = Limiter(controller, max_in_flight=2)
    slot = limiter_slot(limiter)
    async with slot():
        pass  # answered: counted as a success
    assert controller.paused_until == float("-inf")
    with pytest.raises(RateLimited):
        async with slot():
            raise RateLimited("429", status=429, delay_s=30.0)
    assert controller.paused_until > limiter.now() + 20  # every sender waits for Retry-After
    # A 5xx says nothing about the rate: the controller neither speeds up nor slows down.
    from ingest.errors import ServerError

    fresh = RateController(1000.0, burst=10)
    before = (fresh.rate, fresh.paused_until, fresh.cuts)
    with pytest.raises(ServerError):
        async with limiter_slot(Limiter(fresh, max_in_flight=2))():
            raise ServerError("502", status=502)
    assert (fresh.rate, fresh.paused_until, fresh.cuts) == before
