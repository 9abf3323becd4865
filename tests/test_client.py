"""V7Client against a real aiohttp server on 127.0.0.1: requests on the wire, status mapping,
timeouts and broken connections, keep-alive, and the API key never leaking."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aioresponses import aioresponses

from ingest import USER_AGENT
from ingest.errors import (
    AuthError,
    NotFoundError,
    QuotaError,
    RateLimited,
    RejectedError,
    ServerError,
    TransportError,
    V7Error,
)
from ingest.registrar.client import V7Client, parse_retry_after
from ingest.registrar.rate import ON_WIRE

KEY = "sk-test-SECRET-0123456789abcdef"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    peer: Any


@dataclass
class FakeV7:
    url: str = ""
    handler: Handler | None = None
    seen: list[Seen] = field(default_factory=list)


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(doc), status=status, headers=headers, content_type="application/json"
    )


@pytest_asyncio.fixture(loop_scope="function")
async def v7() -> AsyncIterator[FakeV7]:
    state = FakeV7()

    async def dispatch(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        state.seen.append(
            Seen(
                request.method,
                request.path,
                list(request.query.items()),
                dict(request.headers),
                body,
                peer,
            )
        )
        assert state.handler is not None
        return await state.handler(request)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", dispatch)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture(loop_scope="function")
async def client(v7: FakeV7) -> AsyncIterator[V7Client]:
    c = V7Client(v7.url + "/", KEY, connect_timeout_s=2.0, request_timeout_s=2.0)
    try:
        yield c
    finally:
        await c.close()


def answer(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(_: web.Request) -> web.StreamResponse:
        return json_response(doc, status, headers)

    return handler


def assert_no_key(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    assert KEY not in str(exc)
    assert KEY not in repr(exc)
    assert KEY not in repr(exc.args)
    assert exc.__cause__ is None or KEY not in repr(exc.__cause__)
    assert KEY not in caplog.text
    for record in caplog.records:
        assert KEY not in repr(vars(record))


# --- requests on the wire -----------------------------------------------------------------------


async def test_get_sends_auth_accept_and_user_agent(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer({"selected_team": {"slug": "acme"}})
    info = await client.token_info()
    assert info == {"selected_team": {"slug": "acme"}}
    (req,) = v7.seen
    assert (req.method, req.path) == ("GET", "/api/users/token_info")
    assert req.headers["Authorization"] == f"ApiKey {KEY}"
    assert req.headers["Accept"] == "application/json"
    assert req.headers["User-Agent"] == USER_AGENT


async def test_register_posts_orjson_to_the_right_endpoint(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer({"items": [{"id": "1", "name": "a.jpg", "path": "/"}], "blocked_items": []})
    body = {
        "items": [{"path": "/", "name": "a.jpg", "storage_key": "k/a.jpg", "type": "image"}],
        "dataset_slug": "ds",
        "storage_slug": "st",
    }
    out = await client.register("my team", False, body)
    await client.register("acme", True, body)
    assert out["items"][0]["id"] == "1"
    rw, ro = v7.seen
    assert (rw.method, rw.path) == ("POST", "/api/v2/teams/my team/items/register_existing")
    assert ro.path == "/api/v2/teams/acme/items/register_existing_readonly"
    assert rw.headers["Content-Type"] == "application/json"
    assert orjson.loads(rw.body) == body


async def test_a_request_inside_a_limiter_slot_reports_when_it_is_on_the_wire(
    v7: FakeV7, client: V7Client
) -> None:
    """The rate limiter spaces the next send from the real one: the client reports the moment
    a request's headers are written, to whichever slot it goes out in (none: nothing)."""
    times: list[float] = []

    async def handler(_: web.Request) -> web.StreamResponse:
        times.append(time.monotonic())
        return json_response({"items": [], "blocked_items": []})

    v7.handler = handler
    reported: list[float] = []
    body = {"items": [], "dataset_slug": "ds", "storage_slug": "st"}
    await client.register("t", False, body)  # outside a slot: nobody to tell
    token = ON_WIRE.set(lambda: reported.append(time.monotonic()))
    try:
        before = time.monotonic()
        await client.register("t", False, body)
    finally:
        ON_WIRE.reset(token)
    assert len(reported) == 1
    assert before <= reported[0] <= times[-1]  # written before the server saw it


async def test_datasets_storage_and_items_listing(v7: FakeV7, client: V7Client) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/api/datasets":
            return json_response([{"id": 7, "slug": "ds"}])
        if request.path == "/api/teams/acme/storage":
            return json_response([{"name": "st", "readonly": False}])
        return json_response({"items": [], "page": {"next": None}})

    v7.handler = handler
    assert await client.datasets() == [{"id": 7, "slug": "ds"}]
    assert await client.storage_configs("acme") == [{"name": "st", "readonly": False}]
    assert await client.list_items("acme", 7, page_size=50, page_from="abc") == {
        "items": [],
        "page": {"next": None},
    }
    listing = v7.seen[-1]
    assert listing.path == "/api/v2/teams/acme/items"
    assert sorted(listing.query) == [
        ("dataset_ids[]", "7"),
        ("page[from]", "abc"),
        ("page[size]", "50"),
    ]


async def test_keep_alive_reuses_one_connection(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer([])
    for _ in range(5):
        await client.datasets()
    assert len({s.peer for s in v7.seen}) == 1


async def test_an_injected_session_is_used_and_left_open(v7: FakeV7) -> None:
    v7.handler = answer([])
    async with aiohttp.ClientSession() as session:
        c = V7Client(v7.url, KEY, session=session)
        await c.datasets()
        await c.close()
        assert not session.closed
        assert v7.seen[0].headers["Authorization"] == f"ApiKey {KEY}"


async def test_client_can_be_reopened_after_close(v7: FakeV7) -> None:
    v7.handler = answer([])
    c = V7Client(v7.url, KEY)
    await c.datasets()
    await c.close()
    await c.datasets()
    await c.close()
    assert len(v7.seen) == 2


# --- status mapping -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "doc", "cls"),
    [
        (401, {"errors": {"message": "bad key"}}, AuthError),
        (403, {"errors": {"message": "forbidden"}}, AuthError),
        (404, {"errors": {"message": "dataset not found"}}, NotFoundError),
        (400, {"errors": {"message": "bad request"}}, RejectedError),
        (413, {"errors": {"message": "too large"}}, RejectedError),
        (422, {"errors": {"items": {"0": {"storage_key": ["is invalid"]}}}}, RejectedError),
        (500, {"errors": {"message": "boom"}}, ServerError),
        (502, None, ServerError),
        (503, {"message": "maintenance"}, ServerError),
        (429, {"errors": {"message": "slow down"}}, RateLimited),
        (429, {"errors": {"code": "INSUFFICIENT_REMAINING_STORAGE"}}, QuotaError),
    ],
)
async def test_status_maps_to_the_error_hierarchy(
    v7: FakeV7,
    client: V7Client,
    caplog: pytest.LogCaptureFixture,
    status: int,
    doc: Any,
    cls: type[V7Error],
) -> None:
    caplog.set_level(logging.DEBUG)
    if doc is None:

        async def handler(_: web.Request) -> web.StreamResponse:
            return web.Response(status=status, text="<html>Bad Gateway</html>")

        v7.handler = handler
    else:
        v7.handler = answer(doc, status)
    with pytest.raises(V7Error) as info:
        await client.register("acme", False, {"items": []})
    exc = info.value
    assert type(exc) is cls
    assert exc.status == status
    assert_no_key(exc, caplog)


async def test_not_found_carries_the_server_message(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer({"errors": {"message": "Storage configuration 'x' not found"}}, 404)
    with pytest.raises(NotFoundError, match="Storage configuration 'x' not found"):
        await client.storage_configs("acme")


async def test_rejected_detail_is_the_server_message(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer({"errors": {"message": "storage_key must not start with /"}}, 422)
    with pytest.raises(RejectedError) as info:
        await client.register("acme", False, {"items": []})
    assert info.value.detail == "storage_key must not start with /"
    v7.handler = answer({"errors": {"items": {"0": ["bad"]}}}, 400)
    with pytest.raises(RejectedError) as info:
        await client.register("acme", False, {"items": []})
    assert info.value.detail == '{"items":{"0":["bad"]}}'


@pytest.mark.parametrize(
    ("header", "expected"), [("3", 3.0), ("0.25", 0.25), (None, None), ("soon", None)]
)
async def test_429_carries_retry_after(
    v7: FakeV7, client: V7Client, header: str | None, expected: float | None
) -> None:
    v7.handler = answer({}, 429, {"Retry-After": header} if header is not None else None)
    with pytest.raises(RateLimited) as info:
        await client.register("acme", False, {"items": []})
    assert info.value.delay_s == expected
    assert info.value.retryable


async def test_429_retry_after_as_http_date(v7: FakeV7, client: V7Client) -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    v7.handler = answer({}, 429, {"Retry-After": when})
    with pytest.raises(RateLimited) as info:
        await client.register("acme", False, {"items": []})
    assert info.value.delay_s is not None
    assert 25.0 <= info.value.delay_s <= 31.0


async def test_503_retry_after_is_kept(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer({}, 503, {"Retry-After": "7"})
    with pytest.raises(ServerError) as info:
        await client.datasets()
    assert info.value.delay_s == 7.0


async def test_200_that_is_not_json_is_a_server_error(v7: FakeV7, client: V7Client) -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(text="<html>proxy says hi</html>")

    v7.handler = handler
    with pytest.raises(ServerError):
        await client.datasets()


async def test_wrong_json_shape_is_a_server_error(v7: FakeV7, client: V7Client) -> None:
    v7.handler = answer({"not": "a list"})
    with pytest.raises(ServerError, match="expected a JSON array"):
        await client.datasets()


async def test_a_redirect_is_not_followed_and_says_what_to_fix(
    v7: FakeV7, client: V7Client
) -> None:
    async def handler(_: web.Request) -> web.StreamResponse:
        return web.Response(status=301, headers={"Location": "https://v7.example/api/datasets"})

    v7.handler = handler
    with pytest.raises(V7Error, match=r"redirects to https://v7\.example/api/datasets") as info:
        await client.datasets()
    assert not info.value.retryable
    assert type(info.value) is V7Error  # neither retried nor bisected: fatal for a run
    assert len(v7.seen) == 1


# --- transport failures ---------------------------------------------------------------------------


async def test_a_server_that_never_answers_times_out(
    v7: FakeV7, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    never = asyncio.Event()

    async def handler(_: web.Request) -> web.StreamResponse:
        await never.wait()  # until the test is over: the client gives up first
        return json_response({})

    v7.handler = handler
    c = V7Client(v7.url, KEY, connect_timeout_s=1.0, request_timeout_s=0.3)
    try:
        with pytest.raises(TransportError) as info:
            await c.register("acme", False, {"items": []})
    finally:
        never.set()
        await c.close()
    assert info.value.retryable
    assert_no_key(info.value, caplog)


async def test_connection_refused_is_a_transport_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # Bind a port and close it: nothing listens there any more.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    c = V7Client(f"http://127.0.0.1:{port}", KEY, connect_timeout_s=1.0, request_timeout_s=1.0)
    try:
        with pytest.raises(TransportError) as info:
            await c.token_info()
    finally:
        await c.close()
    assert_no_key(info.value, caplog)


async def test_server_hanging_up_is_a_transport_error(
    v7: FakeV7, client: V7Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    v7.handler = handler
    with pytest.raises(TransportError) as info:
        await client.register("acme", False, {"items": []})
    assert_no_key(info.value, caplog)


async def test_body_cut_short_is_a_transport_error(
    v7: FakeV7, client: V7Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b'{"items": [')
        assert request.transport is not None
        request.transport.close()
        return resp

    v7.handler = handler
    with pytest.raises(TransportError) as info:
        await client.register("acme", False, {"items": []})
    assert_no_key(info.value, caplog)


async def test_payload_error_mid_body_via_aioresponses(caplog: pytest.LogCaptureFixture) -> None:
    """A fault a real server cannot produce on demand: aiohttp's own payload error."""
    caplog.set_level(logging.DEBUG)
    c = V7Client("http://v7.invalid", KEY)
    try:
        with aioresponses() as mocked:
            mocked.get(
                "http://v7.invalid/api/datasets",
                exception=aiohttp.ClientPayloadError("Response payload is not completed"),
            )
            with pytest.raises(TransportError) as info:
                await c.datasets()
    finally:
        await c.close()
    assert_no_key(info.value, caplog)


# --- the key never leaks --------------------------------------------------------------------------


async def test_a_server_echoing_the_key_does_not_leak_it(
    v7: FakeV7, client: V7Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def echo(request: web.Request) -> web.StreamResponse:
        auth = request.headers.get("Authorization", "")
        return json_response({"errors": {"message": f"bad header {auth}"}}, 422)

    v7.handler = echo
    with pytest.raises(RejectedError) as info:
        await client.register("acme", False, {"items": []})
    assert "[REDACTED]" in info.value.detail
    assert KEY not in info.value.detail
    assert_no_key(info.value, caplog)


@pytest.mark.parametrize("status", [401, 404, 413, 429, 500])
async def test_plain_text_echo_of_the_key_is_scrubbed(
    v7: FakeV7, client: V7Client, caplog: pytest.LogCaptureFixture, status: int
) -> None:
    caplog.set_level(logging.DEBUG)

    async def echo(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=f"you sent {request.headers['Authorization']}")

    v7.handler = echo
    with pytest.raises(V7Error) as info:
        await client.datasets()
    assert_no_key(info.value, caplog)


def test_client_repr_has_no_key() -> None:
    c = V7Client("http://v7.example", KEY)
    assert KEY not in repr(c)
    assert KEY not in str(c)


# --- Retry-After parsing (pure) ----------------------------------------------------------------


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-3", now) == 0.0
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("nan", now) is None
    assert parse_retry_after("later", now) is None
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(42.0)
    past = email.utils.formatdate(now - 42, usegmt=True)
    assert parse_retry_after(past, now) == 0.0
