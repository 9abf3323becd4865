"""The V7 emulator held to v7-contract.md, over real sockets (aiohttp test server in-process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from ingest.emulator.server import (
    Emulator,
    EmulatorConfig,
    TokenBucket,
    make_app,
    parse_rate_schedule,
)

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning"),
]

KEY = "emulator-key"
TEAM = "emulator-team"
AUTH = {"Authorization": f"ApiKey {KEY}", "Content-Type": "application/json"}
RW = f"/api/v2/teams/{TEAM}/items/register_existing"
RO = f"/api/v2/teams/{TEAM}/items/register_existing_readonly"


@dataclass
class Api:
    server: TestServer
    session: aiohttp.ClientSession

    @property
    def emu(self) -> Emulator:
        emu: Emulator = self.server.app["emulator"]
        return emu

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(
            method,
            self.server.make_url(path),
            data=data,
            headers=AUTH if headers is None else headers,
        ) as r:
            raw = await r.read()
            return r.status, (orjson.loads(raw) if raw else None), r.headers

    async def register(
        self, items: list[dict[str, Any]], *, readonly: bool = False, **envelope: Any
    ) -> tuple[int, Any, Any]:
        body = {
            "items": items,
            "dataset_slug": "demo-dataset",
            "storage_slug": "s3-ro" if readonly else "s3-rw",
            **envelope,
        }
        return await self.call("POST", RO if readonly else RW, body)


@pytest_asyncio.fixture(loop_scope="function")
async def api() -> AsyncIterator[Api]:
    async with await _api(EmulatorConfig()) as a:
        yield a


class _Ctx:
    def __init__(self, cfg: EmulatorConfig) -> None:
        self.server = TestServer(make_app(cfg), host="127.0.0.1")
        self.session = aiohttp.ClientSession()

    async def __aenter__(self) -> Api:
        await self.server.start_server()
        return Api(self.server, self.session)

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.server.close()


async def _api(cfg: EmulatorConfig) -> _Ctx:
    return _Ctx(cfg)


def img(name: str, path: str = "/", **extra: Any) -> dict[str, Any]:
    return {"path": path, "type": "image", "storage_key": f"k/{name}", "name": name, **extra}


# --- discovery endpoints -------------------------------------------------------------------


async def test_token_info_datasets_storage(api: Api) -> None:
    status, doc, _ = await api.call("GET", "/api/users/token_info")
    assert status == 200 and doc["selected_team"]["slug"] == TEAM
    status, doc, _ = await api.call("GET", "/api/datasets")
    assert status == 200
    (ds,) = doc
    assert {"id", "name", "slug"} <= set(ds) and ds["slug"] == "demo-dataset"
    status, doc, _ = await api.call("GET", f"/api/teams/{TEAM}/storage")
    assert status == 200
    by = {s["name"]: s for s in doc}
    assert set(by) == {"s3-rw", "s3-ro"}
    for s in doc:
        assert {"name", "prefix", "readonly", "provider", "default", "bucket"} <= set(s)
        assert s["provider"] in ("aws", "gcp", "azure")
    assert by["s3-ro"]["readonly"] is True and by["s3-rw"]["readonly"] is False
    assert by["s3-rw"]["default"] is True


@pytest.mark.parametrize(
    "path",
    ["/api/users/token_info", "/api/datasets", f"/api/teams/{TEAM}/storage", RW, RO],
)
async def test_401_without_key_or_with_a_bad_key(api: Api, path: str) -> None:
    method = "POST" if "register" in path else "GET"
    body = {"items": [img("a.jpg")]} if method == "POST" else None
    for headers in ({}, {"Authorization": "ApiKey wrong"}, {"Authorization": KEY}):
        status, doc, _ = await api.call(method, path, body, headers=headers)
        assert status == 401, headers
        assert doc["errors"]["code"] == "UNAUTHORIZED"
        assert "wrong" not in orjson.dumps(doc).decode()
    assert api.emu.store.items == {}


async def test_404_unknown_team_dataset_storage(api: Api) -> None:
    status, doc, _ = await api.call("GET", "/api/teams/nope/storage")
    assert status == 404 and "nope" in doc["errors"]["message"]
    status, _, _ = await api.call("POST", "/api/v2/teams/nope/items/register_existing", {})
    assert status == 404
    status, doc, _ = await api.register([img("a.jpg")], dataset_slug="ghost")
    assert status == 404 and "ghost" in doc["errors"]["message"]
    status, doc, _ = await api.register([img("a.jpg")], storage_slug="ghost-store")
    assert status == 404 and "ghost-store" in doc["errors"]["message"]
    status, _, _ = await api.call("GET", "/api/v2/teams/nope/items")
    assert status == 404
    assert api.emu.store.items == {}


# --- registration ---------------------------------------------------------------------------


async def test_register_existing_shorthand_multislot_and_listing(api: Api) -> None:
    items = [
        img("car_1.png"),
        {
            "path": "/",
            "name": "cars",
            "slots": [
                {"slot_name": "0", "type": "image", "storage_key": "c/1.png", "file_name": "1.png"},
                {
                    "slot_name": "1",
                    "type": "video",
                    "storage_key": "c/cars.mp4",
                    "file_name": "cars.mp4",
                    "fps": 10,
                },
            ],
        },
        {"path": "/d", "name": "n.jpg", "storage_key": "d/n.jpg"},  # type from the extension
    ]
    status, doc, _ = await api.register(items)
    assert status == 200, doc
    assert doc["blocked_items"] == []
    assert [(i["path"], i["name"]) for i in doc["items"]] == [
        ("/", "car_1.png"),
        ("/", "cars"),
        ("/d", "n.jpg"),
    ]
    assert all(i["id"] for i in doc["items"])
    assert len({i["id"] for i in doc["items"]}) == 3
    cars = doc["items"][1]
    assert [s["storage_key"] for s in cars["slots"]] == ["c/1.png", "c/cars.mp4"]
    st = api.emu.state()["counters"]
    assert st["items_registered"] == 3 and st["items_received"] == 3
    assert st["register_requests"] == 1 and st["items_stored"] == 3


async def test_dicom_series_shares_slot_zero_with_options(api: Api) -> None:
    slots = [
        {"slot_name": "0", "type": "dicom", "storage_key": f"s/{i}.dcm", "file_name": f"{i}.dcm"}
        for i in range(3)
    ]
    slots[0]["extract_views"] = "true"
    status, doc, _ = await api.register(
        [{"path": "/", "name": "series", "slots": slots}], options={"ignore_dicom_layout": True}
    )
    assert status == 200, doc
    assert len(doc["items"][0]["slots"]) == 3


async def test_already_exists_is_per_item_with_a_reason_per_slot(api: Api) -> None:
    multi = {
        "path": "/m",
        "name": "multi",
        "slots": [
            {"slot_name": "a.jpg", "type": "image", "storage_key": "m/a.jpg"},
            {"slot_name": "b.jpg", "type": "image", "storage_key": "m/b.jpg"},
        ],
    }
    status, doc, _ = await api.register([img("a.jpg"), multi])
    assert status == 200 and len(doc["items"]) == 2
    # Same names again, plus one at another path and one new: only the repeats are refused.
    status, doc, _ = await api.register(
        [img("a.jpg"), multi, img("a.jpg", path="/other"), img("new.jpg")]
    )
    assert status == 200
    assert [(i["path"], i["name"]) for i in doc["items"]] == [("/other", "a.jpg"), ("/", "new.jpg")]
    blocked = {(b["path"], b["name"]): b for b in doc["blocked_items"]}
    assert set(blocked) == {("/", "a.jpg"), ("/m", "multi")}
    assert blocked[("/", "a.jpg")]["slots"] == [{"slot_name": "0", "reason": "ALREADY_EXISTS"}]
    assert [s["reason"] for s in blocked[("/m", "multi")]["slots"]] == ["ALREADY_EXISTS"] * 2
    assert [s["slot_name"] for s in blocked[("/m", "multi")]["slots"]] == ["a.jpg", "b.jpg"]
    # Another dataset is a different namespace.
    api.emu.store.add_dataset("other-ds")
    status, doc, _ = await api.register([img("a.jpg")], dataset_slug="other-ds")
    assert status == 200 and len(doc["items"]) == 1 and doc["blocked_items"] == []
    assert api.emu.state()["counters"]["items_blocked"] == {"ALREADY_EXISTS": 3}


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"path": "/", "type": "image", "name": "a.jpg"}, "items[0].storage_key"),
        (img("a.jpg", storage_key="/lead/a.jpg"), "items[0].storage_key"),
        (img("a.jpg", type="audio"), "items[0].type"),
        ({"path": "/", "storage_key": "k/a", "name": "a"}, "items[0].type"),
        (img("a.jpg", fps=10), "items[0].fps"),
        ({**img("a.mp4"), "type": "video", "fps": "fast"}, "items[0].fps"),
        ({"path": "/", "type": "image", "storage_key": "k"}, "items[0].name"),
        (img("a.jpg", path="no-slash"), "items[0].path"),
        (
            {
                "path": "/",
                "name": "dup",
                "slots": [
                    {"slot_name": "x", "type": "image", "storage_key": "k/1.jpg"},
                    {"slot_name": "x", "type": "image", "storage_key": "k/2.jpg"},
                ],
            },
            "items[0].slots[1].slot_name",
        ),
        (
            {
                "path": "/",
                "name": "ev",
                "slots": [
                    {
                        "slot_name": "1",
                        "type": "dicom",
                        "storage_key": "k/1.dcm",
                        "extract_views": "true",
                    }
                ],
            },
            "items[0].slots[0].extract_views",
        ),
        ({"path": "/", "name": "e", "slots": []}, "items[0].slots"),
    ],
)
async def test_422_names_the_bad_field(api: Api, item: dict[str, Any], field: str) -> None:
    status, doc, _ = await api.register([img("fine.jpg"), item])
    assert status == 422, doc
    assert doc["errors"]["field"] == field.replace("items[0]", "items[1]")
    assert doc["errors"]["code"] == "VALIDATION_ERROR"
    assert api.emu.store.items == {}  # the whole request is refused


RO_IMAGE = img("a.jpg", storage_thumbnail_key="thumbs/a.jpg", height=1080, width=1920)


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({**img("s.dcm"), "type": "dicom"}, "items[0].type"),
        (
            {
                "path": "/",
                "name": "ser",
                "slots": [{"slot_name": "0", "type": "dicom", "storage_key": "s/1.dcm"}],
            },
            "items[0].slots[0].type",
        ),
        (img("a.jpg", height=10, width=10), "items[0].storage_thumbnail_key"),
        ({k: v for k, v in RO_IMAGE.items() if k != "height"}, "items[0].height"),
        ({**RO_IMAGE, "width": 0}, "items[0].width"),
        ({**RO_IMAGE, "width": "1920"}, "items[0].width"),
        ({**img("v.mp4"), "type": "video", "storage_thumbnail_key": "t"}, "items[0].width"),
        (
            {
                "path": "/",
                "name": "two",
                "slots": [
                    {"slot_name": "x", **{k: v for k, v in RO_IMAGE.items() if k != "name"}},
                    {"slot_name": "x", **{k: v for k, v in RO_IMAGE.items() if k != "name"}},
                ],
            },
            "items[0].slots[1].slot_name",
        ),
    ],
)
async def test_422_readonly_rules(api: Api, item: dict[str, Any], field: str) -> None:
    status, doc, _ = await api.register([item], readonly=True)
    assert status == 422, doc
    assert doc["errors"]["field"] == field


async def test_readonly_image_accepted_and_endpoint_must_match_storage(api: Api) -> None:
    status, doc, _ = await api.register([RO_IMAGE], readonly=True)
    assert status == 200 and len(doc["items"]) == 1, doc
    status, doc, _ = await api.register([img("b.jpg")], storage_slug="s3-ro")
    assert status == 422 and doc["errors"]["field"] == "storage_slug"
    # Locally processed videos go through the read-only endpoint on read-write storage too.
    status, doc, _ = await api.call(
        "POST",
        RO,
        {
            "items": [{**RO_IMAGE, "name": "c.jpg"}],
            "dataset_slug": "demo-dataset",
            "storage_slug": "s3-rw",
        },
    )
    assert status == 200 and len(doc["items"]) == 1, doc


async def test_max_items_per_request() -> None:
    async with await _api(EmulatorConfig(max_items_per_request=10)) as api:
        status, doc, _ = await api.register([img(f"{i}.jpg") for i in range(11)])
        assert status == 422 and doc["errors"]["field"] == "items"
        assert "11" in doc["errors"]["message"]
        status, doc, _ = await api.register([img(f"{i}.jpg") for i in range(10)])
        assert status == 200 and len(doc["items"]) == 10


async def test_body_too_large_is_413() -> None:
    async with await _api(EmulatorConfig(max_body_bytes=2000)) as api:
        status, doc, _ = await api.register([img(f"{i:04d}.jpg") for i in range(100)])
        assert status == 413 and doc["errors"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_bad_json_and_empty_items(api: Api) -> None:
    status, _, _ = await api.call("POST", RW, None)
    assert status == 400
    status, doc, _ = await api.register([])
    assert status == 422 and doc["errors"]["field"] == "items"


# --- rate limit ------------------------------------------------------------------------------


async def test_429_with_retry_after_from_the_token_bucket() -> None:
    async with await _api(EmulatorConfig(rate_per_s=2.0, burst=1.0)) as api:
        status, _, _ = await api.register([img("a.jpg")])
        assert status == 200
        status, doc, headers = await api.register([img("b.jpg")])
        assert status == 429
        assert doc["errors"]["code"] == "RATE_LIMITED"
        assert headers["Retry-After"] == "1"  # ceil(0.5 s), integer seconds
        assert "b.jpg" not in {k[2] for k in api.emu.store.items}
        # Discovery endpoints are not limited by default.
        assert (await api.call("GET", "/api/datasets"))[0] == 200
        c = api.emu.state()["counters"]
        assert c["rate_limited"] == 1 and c["register_requests"] == 2
        assert c["requests"]["POST register_existing 429"] == 1
        # Exact mode: the wait the bucket computes.
        await api.call("POST", "/_emulator/config", {"retry_after": "exact", "rate_per_s": 4.0})
        assert (await api.register([img("c.jpg")]))[0] == 200
        status, _, headers = await api.register([img("d.jpg")])
        assert status == 429
        assert 0.0 < float(headers["Retry-After"]) <= 0.25


async def test_token_bucket_admits_the_configured_rate() -> None:
    async with await _api(EmulatorConfig(rate_per_s=50.0, burst=1.0)) as api:
        t0 = time.monotonic()
        ok = 0
        n = 0
        while time.monotonic() - t0 < 0.5:
            status, _, _ = await api.register([img(f"{n}.jpg")])
            ok += status == 200
            n += 1
        elapsed = time.monotonic() - t0
        assert n > ok > 0
        assert ok <= 50 * elapsed + 2  # never more than rate x time + the bucket
        assert ok >= 50 * elapsed * 0.5  # and not far below it


def test_a_rate_change_keeps_the_tokens_earned_at_the_old_rate() -> None:
    b = TokenBucket(10.0, 5.0, 0.0)
    for _ in range(5):
        assert b.take(0.0) == 0.0
    b.set_rate(2.0, 0.2)  # two tokens earned at 10/s before the cut...
    assert b.take(0.2) == 0.0 and b.take(0.2) == 0.0
    assert b.take(0.2) == pytest.approx(0.5)  # ...then one per 0.5 s
    b.set_rate(2.0, 100.0, burst=1.0)  # a shallower bucket holds at most its new depth
    assert b.take(100.0) == 0.0
    assert b.take(100.0) > 0


def test_rate_schedule_parses_and_refuses_nonsense() -> None:
    assert parse_rate_schedule("20:20, 10:2") == [(10.0, 2.0), (20.0, 20.0)]
    assert parse_rate_schedule("") == []
    for bad in ("x:1", "10", "-1:2", "1:-2"):
        with pytest.raises(ValueError):
            parse_rate_schedule(bad)


async def test_the_rate_changes_on_schedule_and_on_request() -> None:
    async with await _api(
        EmulatorConfig(rate_per_s=1000.0, burst=5.0, rate_schedule="0.2:1")
    ) as api:
        t0 = time.monotonic()
        assert (await api.register([img("a.jpg")]))[0] == 200  # starts the schedule's clock
        assert (await api.register([img("b.jpg")]))[0] == 200
        while time.monotonic() - t0 < 0.3:  # poll past the change (a deadline, not a sleep)
            await api.register([img(f"p{time.monotonic()}.jpg")])
        statuses = [(await api.register([img(f"c{i}.jpg")]))[0] for i in range(8)]
        assert 429 in statuses  # 1 req/s now
        changes = api.emu.state()["rate_changes"]
        assert [r for _, r in changes] == [1.0]
        status, doc, _ = await api.call("POST", "/_emulator/rate", {"rate_per_s": 0})
        assert status == 200 and doc["rate_per_s"] == 0
        assert (await api.register([img("d.jpg")]))[0] == 200  # unlimited again
        assert (await api.call("POST", "/_emulator/rate", {"rate_per_s": -1}))[0] == 422
        assert (await api.call("POST", "/_emulator/rate", {"burst": 2}))[0] == 422


async def test_rate_all_endpoints_and_quota() -> None:
    async with await _api(EmulatorConfig(rate_per_s=1.0, rate_all_endpoints=True)) as api:
        assert (await api.call("GET", "/api/datasets"))[0] == 200
        assert (await api.call("GET", "/api/datasets"))[0] == 429
    async with await _api(EmulatorConfig(quota_exceeded=True)) as api:
        status, doc, _ = await api.register([img("a.jpg")])
        assert status == 429 and doc["errors"]["code"] == "INSUFFICIENT_REMAINING_STORAGE"


# --- faults ------------------------------------------------------------------------------------


async def _fault(api: Api, kind: str, count: int = 1) -> None:
    status, doc, _ = await api.call("POST", "/_emulator/faults", {"kind": kind, "count": count})
    assert status == 200, doc


async def test_fault_5xx_stores_nothing(api: Api) -> None:
    await _fault(api, "5xx", 2)
    for _ in range(2):
        status, _, _ = await api.register([img("a.jpg")])
        assert status in (500, 502, 503)
    assert api.emu.store.items == {}
    assert (await api.register([img("a.jpg")]))[0] == 200
    assert api.emu.state()["counters"]["faults"] == {"5xx": 2}


async def test_fault_reset_drops_the_connection(api: Api) -> None:
    await _fault(api, "reset")
    with pytest.raises(aiohttp.ClientError):
        await api.register([img("a.jpg")])
    assert api.emu.store.items == {}
    assert (await api.register([img("a.jpg")]))[0] == 200


async def test_fault_stall_outlasts_a_client_timeout() -> None:
    async with await _api(EmulatorConfig(stall_s=5.0)) as api:
        await _fault(api, "stall")
        url = api.server.make_url(RW)
        body = orjson.dumps(
            {"items": [img("a.jpg")], "dataset_slug": "demo-dataset", "storage_slug": "s3-rw"}
        )
        with pytest.raises(asyncio.TimeoutError):
            async with api.session.post(
                url, data=body, headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.3)
            ) as r:
                await r.read()
        assert api.emu.store.items == {}


async def test_fault_commit_then_fail_stores_then_answers_502(api: Api) -> None:
    await _fault(api, "commit_then_fail")
    status, doc, _ = await api.register([img("a.jpg"), img("b.jpg")])
    assert status == 502 and doc["errors"]["code"] == "BAD_GATEWAY"
    assert {k[2] for k in api.emu.store.items} == {"a.jpg", "b.jpg"}
    # The retry sees ALREADY_EXISTS for both.
    status, doc, _ = await api.register([img("a.jpg"), img("b.jpg")])
    assert status == 200 and doc["items"] == [] and len(doc["blocked_items"]) == 2


async def test_fault_kinds_are_validated_and_probabilities_apply() -> None:
    async with await _api(EmulatorConfig(p_5xx=1.0)) as api:
        status, doc, _ = await api.call("POST", "/_emulator/faults", {"kind": "meteor"})
        assert status == 422 and doc["errors"]["field"] == "kind"
        assert (await api.register([img("a.jpg")]))[0] >= 500
        await api.call("POST", "/_emulator/config", {"p_5xx": 0.0})
        assert (await api.register([img("a.jpg")]))[0] == 200
        status, doc, _ = await api.call("POST", "/_emulator/config", {"nope": 1})
        assert status == 422 and doc["errors"]["field"] == "nope"


# --- listing, counters, admin ------------------------------------------------------------------


async def test_items_listing_paginates(api: Api) -> None:
    for start in range(0, 25, 10):
        status, _, _ = await api.register([img(f"{i:02d}.jpg") for i in range(start, start + 10)])
        assert status == 200
    seen: list[str] = []
    offset: int | None = 0
    pages = 0
    while offset is not None:
        status, doc, _ = await api.call(
            "GET", f"/api/v2/teams/{TEAM}/items?page[size]=7&page[from]={offset}&dataset_ids[]=1"
        )
        assert status == 200
        assert doc["page"]["count"] == 30
        seen += [i["name"] for i in doc["items"]]
        offset = doc["page"]["next"]
        pages += 1
    assert seen == [f"{i:02d}.jpg" for i in range(30)]
    assert pages == 5
    status, doc, _ = await api.call("GET", f"/api/v2/teams/{TEAM}/items?page[size]=x")
    assert status == 422
    status, doc, _ = await api.call("GET", f"/api/v2/teams/{TEAM}/items?dataset_ids[]=999")
    assert status == 404, doc


async def test_counters_timeline_and_reset(api: Api) -> None:
    await api.register([img("a.jpg")])
    await api.register([img("a.jpg")])
    await api.call("GET", "/api/datasets", headers={})
    status, st, _ = await api.call("GET", "/_emulator/state", headers={})
    assert status == 200
    c = st["counters"]
    assert c["register_requests"] == 2
    assert c["items_received"] == 2 and c["items_registered"] == 1
    assert c["items_blocked"] == {"ALREADY_EXISTS": 1}
    assert c["requests"] == {
        "POST register_existing 200": 2,
        "GET /api/datasets 401": 1,
    }
    assert [s for _, s in st["timeline"]] == [200, 200]
    assert st["timeline"][0][0] <= st["timeline"][1][0]
    status, items, _ = await api.call("GET", "/_emulator/items?dataset=demo-dataset", headers={})
    assert [i["name"] for i in items["items"]] == ["a.jpg"]
    await api.call("POST", "/_emulator/reset", {}, headers={})
    _, st, _ = await api.call("GET", "/_emulator/state", headers={})
    assert st["counters"]["register_requests"] == 0 and st["counters"]["items_stored"] == 0
    assert (await api.register([img("a.jpg")]))[1]["items"][0]["name"] == "a.jpg"


async def test_admin_can_add_dataset_and_storage(api: Api) -> None:
    await api.call("POST", "/_emulator/datasets", {"slug": "ds2"}, headers={})
    await api.call(
        "POST",
        "/_emulator/storage",
        {"name": "gcs", "provider": "gcp", "bucket": "b", "prefix": "p", "readonly": False},
        headers={},
    )
    _, dss, _ = await api.call("GET", "/api/datasets")
    assert {d["slug"] for d in dss} == {"demo-dataset", "ds2"}
    status, doc, _ = await api.register([img("a.jpg")], dataset_slug="ds2", storage_slug="gcs")
    assert status == 200, doc
    ids = {d["slug"]: d["id"] for d in dss}
    _, page, _ = await api.call(
        "GET", f"/api/v2/teams/{TEAM}/items?dataset_ids[]={ids['ds2']}&page[size]=10"
    )
    assert [i["name"] for i in page["items"]] == ["a.jpg"]
    _, page, _ = await api.call(
        "GET", f"/api/v2/teams/{TEAM}/items?dataset_ids[]={ids['demo-dataset']}"
    )
    assert page["items"] == []


async def test_seed_set_at_run_time_makes_faults_reproducible(api: Api) -> None:
    async def statuses() -> list[int]:
        await api.call("POST", "/_emulator/reset", {}, headers={})
        await api.call("POST", "/_emulator/config", {"seed": 11, "p_5xx": 0.5}, headers={})
        return [(await api.register([img(f"{i}.jpg")]))[0] for i in range(20)]

    first = await statuses()
    assert 0 < sum(s >= 500 for s in first) < 20
    assert await statuses() == first
