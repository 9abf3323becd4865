"""Registrar against a small V7 register endpoint served by aiohttp on 127.0.0.1, through the
real V7Client: outcomes, bisection, ALREADY_EXISTS semantics, 429 / 5xx / transport retries,
commit-then-fail, the retry budget, fatal errors, stats.

Waits go through a fake clock (the limiter's sleep advances it), so retries and Retry-After
cost no real time; one test runs on the real loop clock to show a 429 pausing every sender.

Items are typed; the bodies V7 receives are their wire JSON (``wire.envelope``). The ledger's
side of sending (``mark_sent`` / ``unmark_sent``) is a recording fake.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
import pytest_asyncio
from aiohttp import web

from ingest.errors import AuthError, ClaimLost, Interrupted, NotFoundError, QuotaError
from ingest.model import Item, ItemType, ObjectInfo, Outcome, Slot, State
from ingest.registrar import wire
from ingest.registrar.client import V7Client
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.registrar import OURS, DrySending, Registrar
from ingest.registrar.retry import RetryPolicy
from ingest.stats import Stats

KEY = "registrar-test-key-5f2a9c"
TEAM = "acme"


class FakeTime:
    """Virtual clock; sleeping advances it at once (and yields to the loop)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        self.now += delay
        await asyncio.sleep(0)


class FixedRng:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def norm(path: str) -> str:
    return path.rstrip("/") or "/"


@dataclass
class FakeSending:
    """The ledger's side of sending, as the ledger contract has it: attempt counts per
    (path, name), the same item twice in one call counting twice; every call recorded as
    ("mark" | "unmark", names, fake time)."""

    clock: Callable[[], float] = lambda: 0.0
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    calls: list[tuple[str, list[str], float]] = field(default_factory=list)
    kept: list[list[str]] = field(default_factory=list)  # keep_claims calls, in order
    lost: bool = False  # our claims were taken over: keep_claims refuses

    def sent_before(self, *names: str, path: str = "/") -> FakeSending:
        for n in names:
            self.attempts[(path, n)] = 1
        return self

    async def mark_sent(self, items: Sequence[Item]) -> list[int]:
        self.calls.append(("mark", [i.name for i in items], self.clock()))
        await asyncio.sleep(0)  # a ledger write: other tasks may run meanwhile
        out = []
        for i in items:
            self.attempts[i.ident] = self.attempts.get(i.ident, 0) + 1
            out.append(self.attempts[i.ident])
        return out

    async def keep_claims(self, items: Sequence[Item]) -> None:
        self.kept.append([i.name for i in items])
        await asyncio.sleep(0)
        if self.lost:
            raise ClaimLost("claim lost", [i.ident for i in items])

    async def unmark_sent(self, items: Sequence[Item]) -> None:
        self.calls.append(("unmark", [i.name for i in items], self.clock()))
        await asyncio.sleep(0)
        for i in items:
            self.attempts[i.ident] -= 1

    def kinds(self) -> list[tuple[str, list[str]]]:
        return [(kind, names) for kind, names, _at in self.calls]


@dataclass
class Request:
    at: float
    endpoint: str
    body: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [i["name"] for i in self.body["items"]]


@dataclass
class FakeV7:
    """register_existing(_readonly) with V7's per-item semantics plus scripted faults.

    ``script`` holds one fault per coming request (popped in order): "429:<retry-after>",
    "429", "500", "503", "502-after-commit", "drop", "drop-after-commit", "401", "404",
    "quota". ``always`` is a fault for every request once the script is empty.
    """

    clock: Any = None
    url: str = ""
    store: dict[tuple[str, str], str] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)  # names that make the batch a 422
    blocked: dict[str, str] = field(default_factory=dict)  # name -> reason
    omit: set[str] = field(default_factory=set)  # names left out of the response
    blocked_ids: bool = False  # ALREADY_EXISTS entries carry the existing item's id
    script: list[str] = field(default_factory=list)
    always: str = ""
    requests: list[Request] = field(default_factory=list)
    ids: Any = field(default_factory=lambda: (f"id-{n}" for n in itertools.count(1)))

    def commit(self, body: dict[str, Any]) -> dict[str, Any]:
        items, blocked = [], []
        for item in body["items"]:
            key = (norm(item.get("path", "/")), item["name"])
            if item["name"] in self.blocked:
                reason = self.blocked[item["name"]]
                blocked.append(
                    {
                        "name": key[1],
                        "path": key[0],
                        "slots": [{"slot_name": "0", "reason": reason}],
                    }
                )
            elif key in self.store:
                entry = {
                    "name": key[1],
                    "path": key[0],
                    "slots": [{"slot_name": "0", "reason": "ALREADY_EXISTS"}],
                }
                if self.blocked_ids:
                    entry["id"] = self.store[key]
                blocked.append(entry)
            else:
                self.store[key] = next(self.ids)
                if item["name"] not in self.omit:
                    items.append(
                        {"id": self.store[key], "name": key[1], "path": key[0], "slots": []}
                    )
        return {"items": items, "blocked_items": blocked}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        now = self.clock() if self.clock else asyncio.get_running_loop().time()
        self.requests.append(Request(now, request.match_info["endpoint"], body))
        fault = self.script.pop(0) if self.script else self.always
        if request.headers.get("Authorization") != f"ApiKey {KEY}" or fault == "401":
            return web.json_response({"errors": {"message": "bad key"}}, status=401)
        if fault == "404":
            return web.json_response({"errors": {"message": "dataset not found"}}, status=404)
        if fault == "quota":
            return web.json_response(
                {"errors": {"code": "INSUFFICIENT_REMAINING_STORAGE", "message": "full"}},
                status=429,
            )
        if fault.startswith("429"):
            headers = {"Retry-After": fault[4:]} if ":" in fault else None
            return web.json_response({"errors": {"message": "rate"}}, status=429, headers=headers)
        if fault in ("500", "503"):
            return web.json_response({"errors": {"message": "oops"}}, status=int(fault))
        if fault == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        bad = [i["name"] for i in body["items"] if i["name"] in self.bad]
        if bad:
            return web.json_response(
                {"errors": {"message": f"item {bad[0]}: storage_key is invalid"}}, status=422
            )
        answer = self.commit(body)
        if fault == "502-after-commit":
            return web.Response(status=502, text="Bad Gateway")
        if fault == "drop-after-commit":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        return web.json_response(answer)


@dataclass
class Rig:
    v7: FakeV7
    client: V7Client
    time: FakeTime
    controller: RateController
    stats: Stats

    def registrar(
        self,
        *,
        policy: RetryPolicy | None = None,
        readonly: bool = False,
        options: dict[str, Any] | None = None,
        storage_prefix: str = "",
        rng: float = 0.5,
    ) -> Registrar:
        limiter = Limiter(self.controller, 4, clock=self.time.clock, sleep=self.time.sleep)
        return Registrar(
            self.client,
            limiter,
            policy or RetryPolicy(base_s=0.05, cap_s=1.0, max_total_s=60.0),
            self.stats,
            target=wire.Target(TEAM, "ds", "st", options),
            keys=wire.KeyMap(storage_prefix),
            readonly=readonly,
            rng=FixedRng(rng),
        )

    def sending(self) -> FakeSending:
        return FakeSending(self.time.clock)


async def serve(v7: FakeV7) -> web.AppRunner:
    app = web.Application()
    app.router.add_post("/api/v2/teams/{team}/items/{endpoint}", v7.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    v7.url = f"http://{host}:{port}"
    return runner


@pytest_asyncio.fixture(loop_scope="function")
async def rig() -> AsyncIterator[Rig]:
    ft = FakeTime()
    v7 = FakeV7(clock=ft.clock)
    runner = await serve(v7)
    client = V7Client(v7.url, KEY, connect_timeout_s=2.0, request_timeout_s=5.0)
    try:
        yield Rig(v7, client, ft, RateController(1000.0, 10.0), Stats())
    finally:
        await client.close()
        await runner.cleanup()


def plan(name: str, path: str = "/") -> Item:
    slot = Slot(name, ItemType.IMAGE, (ObjectInfo(f"data/{name}", 1),), name)
    return Item(path=path, name=name, slots=(slot,), compact=True)


def plans(n: int) -> list[Item]:
    return [plan(f"img_{i:02d}.jpg") for i in range(n)]


def states(outcomes: list[Outcome]) -> list[State]:
    return [o.state for o in outcomes]


# --- the happy path and the envelope ----------------------------------------------------------


async def test_a_batch_registers_with_ids_in_input_order(rig: Rig) -> None:
    items = plans(10)
    sending = rig.sending()
    out = await rig.registrar().register(items, sending)
    assert [(o.path, o.name) for o in out] == [(p.path, p.name) for p in items]
    assert states(out) == [State.REGISTERED] * 10
    assert [o.v7_id for o in out] == [rig.v7.store[("/", p.name)] for p in items]
    (req,) = rig.v7.requests
    assert req.endpoint == "register_existing"
    assert req.body == {
        "items": [
            {"path": "/", "type": "image", "storage_key": f"data/{p.name}", "name": p.name}
            for p in items
        ],
        "dataset_slug": "ds",
        "storage_slug": "st",
    }
    assert req.body == wire.envelope(items, wire.Target(TEAM, "ds", "st"), wire.KeyMap())
    assert sending.kinds() == [("mark", [p.name for p in items])]  # once, for the one request
    assert (rig.stats.requests, rig.stats.retries, rig.stats.in_flight) == (1, 0, 0)
    assert rig.stats.current_rate_per_s == rig.controller.rate


async def test_readonly_endpoint_and_options(rig: Rig) -> None:
    reg = rig.registrar(readonly=True, options={"ignore_dicom_layout": True})
    await reg.register(plans(2), DrySending())
    # A batch may pick the other endpoint (locally processed videos on read-write storage).
    await rig.registrar().register(plans(1), DrySending(), readonly=True)
    first, second = rig.v7.requests
    assert first.endpoint == second.endpoint == "register_existing_readonly"
    assert first.body["options"] == {"ignore_dicom_layout": True}
    assert "options" not in second.body
    assert wire.endpoint(TEAM, True) == f"v2/teams/{TEAM}/items/register_existing_readonly"


async def test_storage_keys_get_the_storage_prefix_at_the_wire(rig: Rig) -> None:
    # Azure: items hold blob names, V7 is told container/blob.
    out = await rig.registrar(storage_prefix="container/").register(plans(1), DrySending())
    assert states(out) == [State.REGISTERED]
    (req,) = rig.v7.requests
    assert req.body["items"][0]["storage_key"] == "container/data/img_00.jpg"


async def test_empty_batch_sends_nothing(rig: Rig) -> None:
    sending = rig.sending()
    assert await rig.registrar().register([], sending) == []
    assert rig.v7.requests == [] and sending.calls == []


async def test_response_matched_by_path_and_name(rig: Rig) -> None:
    items = [plan("a.jpg", "/x/"), plan("a.jpg", "/y"), plan("a.jpg")]
    out = await rig.registrar().register(items, rig.sending())
    assert states(out) == [State.REGISTERED] * 3
    assert out[0].v7_id == rig.v7.store[("/x", "a.jpg")]
    assert out[1].v7_id == rig.v7.store[("/y", "a.jpg")]
    assert out[2].v7_id == rig.v7.store[("/", "a.jpg")]


# --- bisection ----------------------------------------------------------------------------------


async def test_bisection_isolates_two_bad_items_among_ten(rig: Rig) -> None:
    items = plans(10)
    rig.v7.bad = {items[2].name, items[7].name}
    out = await rig.registrar().register(items, rig.sending())
    failed = [i for i, o in enumerate(out) if o.state is State.FAILED]
    assert failed == [2, 7]
    for i in failed:
        assert not out[i].retryable
        assert f"item {items[i].name}: storage_key is invalid" in out[i].reason
        assert "422" in out[i].reason
    good = [p.name for i, p in enumerate(items) if i not in failed]
    assert sorted(n for _, n in rig.v7.store) == sorted(good)  # each registered once
    assert all(out[i].state is State.REGISTERED for i in range(10) if i not in failed)
    # 10 -> 5 + 5 -> (2 + 3 -> 1 + 2) + (2 + 3 -> 1 + 2): eleven requests, none of them retries.
    assert [len(r.names) for r in rig.v7.requests] == [10, 5, 2, 3, 1, 2, 5, 2, 3, 1, 2]
    assert (rig.stats.requests, rig.stats.retries) == (11, 0)


async def test_a_single_bad_item_fails_alone(rig: Rig) -> None:
    (item,) = plans(1)
    rig.v7.bad = {item.name}
    (out,) = await rig.registrar().register([item], rig.sending())
    assert out.state is State.FAILED
    assert len(rig.v7.requests) == 1


# --- ALREADY_EXISTS and other blocks -----------------------------------------------------------


async def test_already_exists_is_blocked_unless_we_sent_it_before(rig: Rig) -> None:
    a, b, c = plan("a.jpg"), plan("b.jpg"), plan("c.jpg")
    rig.v7.store[("/", "a.jpg")] = "someone-else"
    rig.v7.store[("/", "b.jpg")] = "an-earlier-run-of-ours"
    sending = rig.sending().sent_before("b.jpg")
    out = await rig.registrar().register([a, b, c], sending)
    assert out[0] == Outcome("/", "a.jpg", State.BLOCKED, reason="ALREADY_EXISTS")
    assert out[1] == Outcome("/", "b.jpg", State.REGISTERED, v7_id="", reason=OURS)
    assert out[2].state is State.REGISTERED and out[2].v7_id
    assert sending.attempts == {("/", "a.jpg"): 1, ("/", "b.jpg"): 2, ("/", "c.jpg"): 1}


async def test_already_exists_with_an_id_for_an_item_sent_before_keeps_the_id(rig: Rig) -> None:
    rig.v7.blocked_ids = True
    rig.v7.store[("/", "a.jpg")] = "someone-else"
    rig.v7.store[("/", "b.jpg")] = "id-of-an-earlier-run"
    sending = rig.sending().sent_before("b.jpg")
    out = await rig.registrar().register([plan("a.jpg"), plan("b.jpg")], sending)
    # Not ours: still blocked, whatever id the entry carries.
    assert out[0] == Outcome("/", "a.jpg", State.BLOCKED, reason="ALREADY_EXISTS")
    assert out[1] == Outcome(
        "/", "b.jpg", State.REGISTERED, v7_id="id-of-an-earlier-run", reason=OURS
    )


async def test_commit_then_502_then_already_exists_with_ids(rig: Rig) -> None:
    rig.v7.blocked_ids = True
    rig.v7.script = ["502-after-commit"]
    out = await rig.registrar().register(plans(2), rig.sending())
    assert [(o.state, o.reason) for o in out] == [(State.REGISTERED, OURS)] * 2
    assert [o.v7_id for o in out] == [rig.v7.store[("/", o.name)] for o in out]


async def test_other_block_reasons_are_kept(rig: Rig) -> None:
    rig.v7.blocked = {"b.jpg": "FILE_UPLOAD_FAILED"}
    sending = rig.sending().sent_before("b.jpg")
    out = await rig.registrar().register([plan("a.jpg"), plan("b.jpg")], sending)
    assert out[0].state is State.REGISTERED
    assert out[1] == Outcome("/", "b.jpg", State.BLOCKED, reason="FILE_UPLOAD_FAILED")


async def test_an_item_missing_from_the_response_fails_retryable(rig: Rig) -> None:
    rig.v7.omit = {"b.jpg"}
    out = await rig.registrar().register([plan("a.jpg"), plan("b.jpg")], rig.sending())
    assert out[0].state is State.REGISTERED
    assert out[1] == Outcome(
        "/", "b.jpg", State.FAILED, reason="missing from V7 response", retryable=True
    )


async def test_duplicates_in_one_batch_each_get_one_outcome(rig: Rig) -> None:
    # Every item on its first attempt: the copy is refused like anyone else's item.
    out = await rig.registrar().register([plan("a.jpg"), plan("a.jpg")], DrySending())
    assert states(out) == [State.REGISTERED, State.BLOCKED]
    assert out[1].reason == "ALREADY_EXISTS"
    # Through the ledger, the copy is a second attempt of the same item (mark_sent counts it
    # twice): its ALREADY_EXISTS is ours.
    out = await rig.registrar().register([plan("b.jpg"), plan("b.jpg")], rig.sending())
    assert [(o.state, o.reason) for o in out] == [(State.REGISTERED, ""), (State.REGISTERED, OURS)]


# --- retries -----------------------------------------------------------------------------------


async def test_429_retry_after_is_honoured_and_slows_the_controller(rig: Rig) -> None:
    rig.v7.script = ["429:0.75"]
    rate_before = rig.controller.rate
    out = await rig.registrar(rng=0.0).register(plans(3), rig.sending())
    assert states(out) == [State.REGISTERED] * 3
    first, second = rig.v7.requests
    assert second.at - first.at >= 0.75 - 1e-9
    assert rig.controller.rate < rate_before
    assert (rig.stats.requests, rig.stats.retries, rig.stats.rate_limited) == (2, 1, 1)


async def test_429_without_retry_after_backs_off_with_jitter(rig: Rig) -> None:
    rig.v7.script = ["429", "429"]
    out = await rig.registrar(rng=1.0).register(plans(1), rig.sending())
    assert out[0].state is State.REGISTERED
    t = [r.at for r in rig.v7.requests]
    # Full-jitter ceilings with rand = 1: 0.05 then 0.1.
    assert t[1] - t[0] == pytest.approx(0.05)
    assert t[2] - t[1] == pytest.approx(0.1)
    assert rig.stats.rate_limited == 2


async def test_5xx_is_retried(rig: Rig) -> None:
    rig.v7.script = ["500", "503"]
    out = await rig.registrar().register(plans(4), rig.sending())
    assert states(out) == [State.REGISTERED] * 4
    assert (rig.stats.requests, rig.stats.retries, rig.stats.server_errors) == (3, 2, 2)
    assert rig.controller.cuts == 0  # a 5xx is not a rate signal


async def test_every_retry_first_keeps_our_claims(rig: Rig) -> None:
    rig.v7.script = ["500", "503"]
    sending = rig.sending()
    out = await rig.registrar().register(plans(2), sending)
    assert states(out) == [State.REGISTERED] * 2
    assert sending.kept == [["img_00.jpg", "img_01.jpg"]] * 2  # once before each retry


async def test_a_claim_lost_before_a_retry_stops_the_sending(rig: Rig) -> None:
    """Another process took the items over while we waited to retry: never POSTed again."""
    rig.v7.script = ["503"]
    sending = rig.sending()

    registrar = rig.registrar()
    sending.lost = True
    with pytest.raises(ClaimLost):
        await registrar.register(plans(2), sending)
    assert len(rig.v7.requests) == 1  # the first attempt only
    assert sending.kept == [["img_00.jpg", "img_01.jpg"]]


async def test_commit_then_502_ends_registered_not_blocked(rig: Rig) -> None:
    rig.v7.script = ["502-after-commit"]
    items = plans(5)
    out = await rig.registrar().register(items, rig.sending())
    assert states(out) == [State.REGISTERED] * 5
    assert all(o.reason == OURS and o.v7_id == "" for o in out)
    assert len(rig.v7.store) == 5
    assert rig.stats.server_errors == 1


async def test_connection_dropped_after_commit_ends_registered(rig: Rig) -> None:
    rig.v7.script = ["drop-after-commit"]
    out = await rig.registrar().register(plans(3), rig.sending())
    assert states(out) == [State.REGISTERED] * 3
    assert all(o.reason == OURS for o in out)
    assert rig.stats.transport_errors == 1


async def test_a_429_then_already_exists_is_not_ours(rig: Rig) -> None:
    """A 429 stores nothing: an ALREADY_EXISTS after it is somebody else's item."""
    rig.v7.script = ["429:0.1"]
    rig.v7.store[("/", "img_00.jpg")] = "theirs"
    out = await rig.registrar().register(plans(1), rig.sending())
    assert out[0] == Outcome("/", "img_00.jpg", State.BLOCKED, reason="ALREADY_EXISTS")


async def test_the_retry_budget_ends_in_a_retryable_failure(rig: Rig) -> None:
    rig.v7.always = "503"
    policy = RetryPolicy(base_s=0.1, cap_s=0.4, max_total_s=1.0)
    out = await rig.registrar(policy=policy, rng=1.0).register(plans(3), rig.sending())
    # Waits 0.1, 0.2, 0.4 (0.7 s in all); the next 0.4 would pass the 1 s budget.
    assert len(rig.v7.requests) == 4
    for o in out:
        assert o.state is State.FAILED and o.retryable
        assert o.reason.startswith("gave up after 4 attempts over 0.7 s: ")
        assert "HTTP 503" in o.reason
        assert KEY not in o.reason
    assert (rig.stats.requests, rig.stats.retries, rig.stats.server_errors) == (4, 3, 4)
    assert rig.stats.in_flight == 0


async def test_a_stop_before_a_retry_leaves_the_batch_unsent(rig: Rig) -> None:
    """Graceful shutdown: the request in flight finishes, but no retry starts (after a 5xx the
    items may have been stored: they stay SENT in the ledger and the next run re-sends them)."""
    rig.v7.always = "503"
    stop = asyncio.Event()
    stop.set()  # before the first attempt: nothing goes out, nothing is marked SENT
    sending = rig.sending()
    with pytest.raises(Interrupted):
        await rig.registrar().register(plans(3), sending, stop=stop)
    assert rig.v7.requests == [] and sending.calls == []
    stop.clear()
    real_sleep = rig.time.sleep

    async def stop_while_backing_off(delay: float) -> None:
        stop.set()  # SIGTERM arrives while the batch waits for its retry
        await real_sleep(delay)

    rig.time.sleep = stop_while_backing_off  # type: ignore[method-assign]
    items = plans(3)
    with pytest.raises(Interrupted, match="HTTP 503"):
        await rig.registrar().register(items, sending, stop=stop)
    assert len(rig.v7.requests) == 1  # the request on the wire was answered, none followed
    assert rig.stats.in_flight == 0
    assert sending.kinds() == [("mark", [p.name for p in items])]  # not taken back
    assert set(sending.attempts.values()) == {1}


async def test_a_stop_while_waiting_for_the_slot_marks_nothing(rig: Rig) -> None:
    """SENT is marked once the limiter grants the slot, never while the batch waits for it."""
    rig.controller = RateController(1.0, 1.0)  # one request a second
    stop = asyncio.Event()
    waits: list[float] = []

    async def stop_while_pacing(delay: float) -> None:
        waits.append(delay)
        stop.set()  # SIGTERM while the next batch waits for its turn
        await asyncio.Event().wait()

    rig.time.sleep = stop_while_pacing  # type: ignore[method-assign]
    reg = rig.registrar()
    sending = rig.sending()
    # The first request goes at once (no wait); the next must wait about a second.
    assert states(await reg.register([plan("first.jpg")], sending)) == [State.REGISTERED]
    assert waits == []
    with pytest.raises(Interrupted):
        await asyncio.wait_for(reg.register(plans(2), sending, stop=stop), 10)
    assert waits and waits[0] > 0.5  # it was waiting for the rate slot
    assert sending.kinds() == [("mark", ["first.jpg"])]  # never marked, never taken back
    assert len(rig.v7.requests) == 1


async def test_mark_sent_happens_when_the_slot_is_granted(rig: Rig) -> None:
    """A batch waiting for its rate slot is not SENT yet; it is marked once the wait is over,
    right before its POST (at the same clock time)."""
    rig.controller = RateController(1.0, 1.0)  # one request a second
    waiting, release = asyncio.Event(), asyncio.Event()
    real_sleep = rig.time.sleep

    async def gated(delay: float) -> None:
        waiting.set()
        await release.wait()
        await real_sleep(delay)

    rig.time.sleep = gated  # type: ignore[method-assign]
    reg = rig.registrar()
    sending = rig.sending()
    await reg.register([plan("first.jpg")], sending)  # takes the slot: the next one waits
    items = plans(2)
    task = asyncio.create_task(reg.register(items, sending))
    await asyncio.wait_for(waiting.wait(), 10)
    assert sending.kinds() == [("mark", ["first.jpg"])]  # waiting: not SENT
    assert len(rig.v7.requests) == 1
    release.set()
    assert states(await asyncio.wait_for(task, 10)) == [State.REGISTERED] * 2
    assert sending.kinds() == [("mark", ["first.jpg"]), ("mark", [p.name for p in items])]
    marked_at = [at for _k, _n, at in sending.calls]
    assert marked_at == [r.at for r in rig.v7.requests]
    assert marked_at[1] - marked_at[0] >= 1.0


async def test_a_stop_after_429s_only_takes_the_attempt_back(rig: Rig) -> None:
    """Answers that prove nothing was stored (429) and then a stop: the items were marked SENT
    for nothing; the attempt is taken back so a later ALREADY_EXISTS is not taken for ours."""
    rig.v7.always = "429"
    stop = asyncio.Event()
    real_sleep = rig.time.sleep
    backoffs = 0

    async def stop_on_second_backoff(delay: float) -> None:
        nonlocal backoffs
        backoffs += 1
        if backoffs == 2:
            stop.set()  # two 429s answered; SIGTERM while waiting for the third try
        await real_sleep(delay)

    rig.time.sleep = stop_on_second_backoff  # type: ignore[method-assign]
    items = plans(3)
    sending = rig.sending().sent_before("img_01.jpg")
    with pytest.raises(Interrupted):
        await rig.registrar().register(items, sending, stop=stop)
    assert len(rig.v7.requests) == 2
    names = [p.name for p in items]
    assert sending.kinds() == [("mark", names), ("unmark", names)]  # marked once per call
    assert sending.attempts == {("/", n): 1 if n == "img_01.jpg" else 0 for n in names}


async def test_a_stop_after_a_5xx_then_429_keeps_the_items_sent(rig: Rig) -> None:
    """One unclear answer (5xx) is enough: the items may be stored, they stay SENT."""
    rig.v7.script = ["503", "429", "429"]
    stop = asyncio.Event()
    real_sleep = rig.time.sleep
    backoffs = 0

    async def stop_on_second_backoff(delay: float) -> None:
        nonlocal backoffs
        backoffs += 1
        if backoffs == 2:
            stop.set()
        await real_sleep(delay)

    rig.time.sleep = stop_on_second_backoff  # type: ignore[method-assign]
    sending = rig.sending()
    with pytest.raises(Interrupted):
        await rig.registrar().register(plans(2), sending, stop=stop)
    assert len(rig.v7.requests) == 2
    assert [kind for kind, _n in sending.kinds()] == ["mark"]


async def test_a_stop_in_a_bisection_takes_back_what_never_reached_v7(rig: Rig) -> None:
    """The 422-rejected item and the 429-only half are taken back; the item V7 answered 200
    for keeps its attempt."""
    items = plans(4)
    rig.v7.bad = {items[0].name}
    # 4 -> 422; [0, 1] -> 422; [0] -> 422; [1] -> ok; [2, 3] -> 429, then a stop.
    rig.v7.script = ["", "", "", "", "429"]
    stop = asyncio.Event()
    real_sleep = rig.time.sleep

    async def stop_on_backoff(delay: float) -> None:
        if rig.v7.requests and rig.v7.requests[-1].names == [items[2].name, items[3].name]:
            stop.set()
        await real_sleep(delay)

    rig.time.sleep = stop_on_backoff  # type: ignore[method-assign]
    sending = rig.sending()
    with pytest.raises(Interrupted):
        await rig.registrar().register(items, sending, stop=stop)
    assert [len(r.names) for r in rig.v7.requests] == [4, 2, 1, 1, 2]
    assert sending.kinds() == [
        ("mark", [p.name for p in items]),
        ("unmark", [items[0].name, items[2].name, items[3].name]),
    ]


async def test_giving_up_after_429s_only_takes_the_attempt_back(rig: Rig) -> None:
    """The retry budget runs out with nothing but 429s: FAILED (retryable), and not counted as
    sent, so a retry's ALREADY_EXISTS (someone else's item) stays BLOCKED, never ours."""
    rig.v7.always = "429"
    items = plans(2)
    sending = rig.sending()
    reg = rig.registrar(policy=RetryPolicy(base_s=0.01, cap_s=0.02, max_total_s=0.05))
    outcomes = await reg.register(items, sending)
    assert [o.state for o in outcomes] == [State.FAILED, State.FAILED]
    names = [p.name for p in items]
    assert sending.kinds() == [("mark", names), ("unmark", names)]
    assert sending.attempts == {("/", n): 0 for n in names}


async def test_a_cancelled_call_keeps_items_whose_request_was_on_the_wire(rig: Rig) -> None:
    """A second signal cancels the send while the POST is out: it may have reached V7, so the
    items stay SENT (the next run's ALREADY_EXISTS for them is ours)."""
    items = plans(2)
    sending = rig.sending()
    posted = asyncio.Event()
    never = asyncio.Event()

    async def hang(team: str, readonly: bool, body: dict[str, object]) -> dict[str, object]:
        posted.set()
        await never.wait()
        return {}

    reg = rig.registrar()
    reg.client = type("Hanging", (), {"register": staticmethod(hang)})()
    task = asyncio.ensure_future(reg.register(items, sending))
    await posted.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    names = [p.name for p in items]
    assert sending.kinds() == [("mark", names)]


async def test_a_stop_during_a_retry_wait_ends_the_wait(rig: Rig) -> None:
    rig.v7.script = ["429:300"]
    stop = asyncio.Event()

    async def long_sleep(delay: float) -> None:
        if delay >= 1.0:  # the 300 s Retry-After pause: the stop comes while it lasts
            stop.set()
            await asyncio.Event().wait()
        await asyncio.sleep(0)

    rig.time.sleep = long_sleep  # type: ignore[method-assign]
    policy = RetryPolicy(base_s=0.05, cap_s=1.0, max_total_s=3600.0)
    sending = rig.sending()
    reg = rig.registrar(policy=policy)
    with pytest.raises(Interrupted):
        await asyncio.wait_for(reg.register(plans(2), sending, stop=stop), 10)
    assert len(rig.v7.requests) == 1
    assert [kind for kind, _n in sending.kinds()] == ["mark", "unmark"]  # a 429 stores nothing


async def test_retry_after_beyond_the_budget_gives_up_at_once(rig: Rig) -> None:
    rig.v7.script = ["429:120"]
    policy = RetryPolicy(base_s=0.1, cap_s=1.0, max_total_s=60.0)
    (out,) = await rig.registrar(policy=policy).register(plans(1), rig.sending())
    assert out.state is State.FAILED and out.retryable
    assert out.reason.startswith("gave up after 1 attempts over 0.0 s: ")
    assert len(rig.v7.requests) == 1


# --- fatal errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "exc"), [("401", AuthError), ("404", NotFoundError), ("quota", QuotaError)]
)
async def test_fatal_errors_propagate(rig: Rig, fault: str, exc: type[Exception]) -> None:
    rig.v7.script = [fault]
    with pytest.raises(exc) as info:
        await rig.registrar().register(plans(2), rig.sending())
    assert KEY not in str(info.value)
    assert len(rig.v7.requests) == 1
    assert rig.stats.in_flight == 0


async def test_a_bad_item_and_a_5xx_in_the_same_call(rig: Rig) -> None:
    items = plans(4)
    rig.v7.bad = {items[0].name}
    rig.v7.script = ["", "503"]  # the first request is the 422; the first half then gets a 503
    out = await rig.registrar().register(items, rig.sending())
    assert states(out) == [State.FAILED, State.REGISTERED, State.REGISTERED, State.REGISTERED]
    assert rig.stats.server_errors == 1


# --- every sender pauses on a 429 (real loop clock) --------------------------------------------


async def test_a_429_pauses_every_concurrent_sender() -> None:
    v7 = FakeV7(script=["429:0.3"])
    runner = await serve(v7)
    client = V7Client(v7.url, KEY)
    stats = Stats()
    try:
        # 5 requests/s: three concurrent batches would go at 0, 0.2 and 0.4 s.
        controller = RateController(5.0, 1.0)
        registrar = Registrar(
            client,
            Limiter(controller, 8),
            RetryPolicy(0.01, 0.05, 30.0),
            stats,
            target=wire.Target(TEAM, "ds", "st"),
            keys=wire.KeyMap(),
            readonly=False,
            rng=FixedRng(0.0),
        )
        batches = [[plan(f"{k}-{i}.jpg") for i in range(2)] for k in range(3)]
        results = await asyncio.gather(*(registrar.register(b, DrySending()) for b in batches))
    finally:
        await client.close()
        await runner.cleanup()
    assert all(o.state is State.REGISTERED for out in results for o in out)
    refused_at = v7.requests[0].at
    later = [r.at for r in v7.requests[1:]]
    assert len(later) == 3
    # Nobody (not the refused batch, not the two waiting for their turn) before the pause ends.
    assert min(later) >= refused_at + 0.3 - 0.005
    assert stats.rate_limited == 1 and stats.in_flight == 0


async def test_an_unknown_error_after_the_post_keeps_the_items_sent(rig: Rig) -> None:
    """A malformed answer (or any error the client does not map) may follow a stored batch:
    the attempt is not taken back, so the next run's ALREADY_EXISTS counts as ours."""
    items = plans(2)
    sending = rig.sending()

    async def garbled(team: str, readonly: bool, body: dict[str, object]) -> dict[str, object]:
        raise RuntimeError("malformed HTTP response")

    reg = rig.registrar()
    reg.client = type("Garbled", (), {"register": staticmethod(garbled)})()
    with pytest.raises(RuntimeError):
        await reg.register(items, sending)
    names = [p.name for p in items]
    assert sending.kinds() == [("mark", names)]
    assert sending.attempts == {("/", n): 1 for n in names}


async def test_cancelled_while_sent_is_committed_the_items_are_taken_back(rig: Rig) -> None:
    """A forced stop lands while the ledger commits SENT: the commit still happens, and since
    the request never left, the attempt is taken back."""
    items = plans(2)
    committing, finish = asyncio.Event(), asyncio.Event()

    class SlowSending(FakeSending):
        async def mark_sent(self, batch: Sequence[Item]) -> list[int]:
            committing.set()
            await finish.wait()
            return await super().mark_sent(batch)

    sending = SlowSending()
    task = asyncio.ensure_future(rig.registrar().register(items, sending))
    await committing.wait()
    task.cancel()
    await asyncio.sleep(0)
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    names = [p.name for p in items]
    assert sending.kinds() == [("mark", names), ("unmark", names)]
    assert sending.attempts == {("/", n): 0 for n in names}
    assert rig.v7.requests == []
