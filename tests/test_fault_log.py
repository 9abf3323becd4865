"""Aggregated fault log lines (ingest.registrar.faults) and the Stats counters that feed them:
the pure line builder, the loop with a fake clock and sleep, Stats.record_pause, and
V7Client feeding per-status and per-kind counts."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ingest.errors import ServerError, TransportError
from ingest.log import JsonFormatter
from ingest.registrar.client import V7Client
from ingest.registrar.faults import FaultCounters, fault_line, report_faults
from ingest.stats import Stats

pytestmark = pytest.mark.timeout(30)


def snap(**kw: object) -> FaultCounters:
    return FaultCounters(**kw)  # type: ignore[arg-type]


# --- the pure part ---------------------------------------------------------------------------


def test_nothing_happened_no_line() -> None:
    a = snap(http_statuses=Counter({200: 5}), retries=3, rate_per_s=20.0)
    assert fault_line(a, a, 5.0) is None
    b = snap(http_statuses=Counter({200: 50}), retries=3, rate_per_s=22.0)  # only successes
    assert fault_line(a, b, 5.0) is None  # and a rate climbing back is not a fault


def test_full_line_and_fields() -> None:
    prev = snap(
        http_statuses=Counter({200: 10, 502: 1}),
        rate_per_s=20.0,
        retries=4,
        paused_s=1.0,
        rate_cuts=2,
    )
    now = snap(
        http_statuses=Counter({200: 90, 502: 43, 500: 2, 429: 7, 422: 1}),
        transport_by_kind=Counter({"reset": 3, "timeout": 1}),
        rate_per_s=14.0,
        retries=56,
        paused_s=3.1,
        rate_cuts=3,
        confirmed_existing=12,
        # the registrar's coarse counts move too; per-status ones win
        server_errors=44,
        transport_errors=4,
        rate_limited=7,
    )
    out = fault_line(prev, now, 5.0)
    assert out is not None
    line, fields = out
    assert line == (
        "faults in the last 5 s: 1 x HTTP 422, 2 x HTTP 500, 42 x HTTP 502, "
        "3 connection resets, 1 timeout, 7 x HTTP 429 (paused 2.1 s), "
        "rate cut 20.0 -> 14.0 req/s; 52 retries, 12 items confirmed through ALREADY_EXISTS"
    )
    assert fields == {
        "interval_s": 5.0,
        "http_errors": {"422": 1, "500": 2, "502": 42},
        "server_errors": 44,
        "rate_limited": 7,
        "paused_s": 2.1,
        "resets": 3,
        "timeouts": 1,
        "connect_errors": 0,
        "transport_errors": 4,
        "rate_cuts": 1,
        "rate_from": 20.0,
        "rate_to": 14.0,
        "retries": 52,
        "confirmed_existing": 12,
    }
    orjson.dumps(fields)  # JSON logs can carry them as they are


def test_coarse_counts_stand_in_without_a_client_feed() -> None:
    prev = snap()
    now = snap(server_errors=5, transport_errors=2, rate_limited=3, retries=10, rate_cuts=2)
    out = fault_line(prev, now, 4.96)
    assert out is not None
    line, fields = out
    assert line == (
        "faults in the last 5 s: 5 server errors, 2 connection errors, 3 x HTTP 429, "
        "rate cut 0.0 -> 0.0 req/s (2 cuts); 10 retries"
    )
    assert fields["server_errors"] == 5 and fields["transport_errors"] == 2


def test_retries_alone_and_singulars() -> None:
    out = fault_line(snap(), snap(retries=1, confirmed_existing=1), 12.3)
    assert out is not None
    assert out[0] == "faults in the last 12 s: 1 retry, 1 item confirmed through ALREADY_EXISTS"
    out = fault_line(
        snap(), snap(transport_by_kind=Counter({"reset": 1, "connect": 2}), retries=3), 2.5
    )
    assert out is not None
    assert out[0] == (
        "faults in the last 2.5 s: 1 connection reset, 2 failed connections; 3 retries"
    )


def test_pause_without_a_counted_429_still_reported() -> None:
    out = fault_line(snap(paused_s=0.0), snap(paused_s=1.5), 5.0)
    assert out is not None
    assert out[0] == "faults in the last 5 s: paused 1.5 s for HTTP 429"


def test_stats_record_pause_counts_overlaps_once() -> None:
    s = Stats()
    s.record_pause(10.0, 12.0)  # 2 s
    s.record_pause(11.0, 12.0)  # inside the first: nothing
    s.record_pause(11.5, 13.0)  # extends by 1 s
    s.record_pause(20.0, 20.5)  # a new pause
    s.record_pause(21.0, 20.0)  # already over
    s.record_pause(21.0, float("inf"))  # nonsense: ignored
    assert s.rate_limit_paused_s == pytest.approx(3.5)


# --- the loop, with a fake clock and sleep ---------------------------------------------------


class Ticker:
    """A sleep that hands control to the test: ``tick()`` ends one sleep (advancing the clock
    by what was asked) and returns once the loop is sleeping again."""

    def __init__(self) -> None:
        self.now = 100.0
        self.asked: list[float] = []
        self._release: asyncio.Queue[None] = asyncio.Queue()
        self._sleeping: asyncio.Queue[None] = asyncio.Queue()

    def clock(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.asked.append(s)
        await self._sleeping.put(None)
        await self._release.get()
        self.now += s

    async def started(self) -> None:
        await self._sleeping.get()

    async def tick(self) -> None:
        await self._release.put(None)
        await self._sleeping.get()


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "ingest.faults"]


async def test_loop_logs_each_interval_only_when_something_happened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stats = Stats(current_rate_per_s=20.0)
    t = Ticker()
    caplog.set_level(logging.WARNING, logger="ingest.faults")
    task = asyncio.create_task(report_faults(stats, 5.0, clock=t.clock, sleep=t.sleep))
    await t.started()

    stats.http_statuses[502] += 3
    stats.retries += 3
    await t.tick()
    (first,) = warnings_of(caplog)
    assert first.levelname == "WARNING"
    assert first.getMessage() == "faults in the last 5 s: 3 x HTTP 502; 3 retries"
    assert first.__dict__["http_errors"] == {"502": 3}

    stats.http_statuses[200] += 100  # quiet interval: no line
    await t.tick()
    assert len(warnings_of(caplog)) == 1

    stats.http_statuses[429] += 2
    stats.record_pause(t.now, t.now + 1.5)
    stats.rate_cuts += 1
    stats.current_rate_per_s = 14.0
    await t.tick()
    second = warnings_of(caplog)[-1]
    assert second.getMessage() == (
        "faults in the last 5 s: 2 x HTTP 429 (paused 1.5 s), rate cut 20.0 -> 14.0 req/s"
    )
    assert t.asked == [5.0] * 4

    # Cancelled mid-interval: what happened since the last line is logged, not lost.
    stats.transport_by_kind["reset"] += 1
    t.now += 2.0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    last = warnings_of(caplog)[-1]
    assert last.getMessage() == "faults in the last 2 s: 1 connection reset"
    assert len(warnings_of(caplog)) == 3


async def test_loop_line_renders_as_json() -> None:
    stats = Stats()
    t = Ticker()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.faults.json")
    logger.propagate = False
    logger.addHandler(Keep())
    task = asyncio.create_task(
        report_faults(stats, 1.0, clock=t.clock, sleep=t.sleep, logger=logger)
    )
    await t.started()
    stats.http_statuses[503] += 1
    await t.tick()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (rec,) = records
    doc = orjson.loads(JsonFormatter().format(rec))
    assert doc["level"] == "warning" and doc["http_errors"] == {"503": 1}
    assert doc["msg"] == "faults in the last 1 s: 1 x HTTP 503"


async def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError):
        await report_faults(Stats(), 0)


# --- V7Client feeds per-status and per-kind counts -------------------------------------------


async def test_client_counts_statuses_and_transport_kinds() -> None:
    answers = iter([502, 429, 200])

    async def handler(request: web.Request) -> web.StreamResponse:
        status = next(answers, 200)
        return web.json_response({"items": [], "blocked_items": []}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    stats = Stats()
    client = V7Client(str(server.make_url("")), "k" * 16, stats=stats, request_timeout_s=5)
    try:
        with pytest.raises(ServerError):
            await client.register("t", False, {"items": []})
        with pytest.raises(Exception, match="429"):
            await client.register("t", False, {"items": []})
        await client.register("t", False, {"items": []})
        assert stats.http_statuses == Counter({502: 1, 429: 1, 200: 1})
        port = server.port
    finally:
        await client.close()
        await server.close()
    # Nothing listens there any more: a failed connection.
    client = V7Client(f"http://127.0.0.1:{port}", "k" * 16, stats=stats, connect_timeout_s=2)
    try:
        with pytest.raises(TransportError):
            await client.token_info()
    finally:
        await client.close()
    assert stats.transport_by_kind == Counter({"connect": 1})


@pytest.mark.filterwarnings("ignore::aiohttp.web_exceptions.NotAppKeyWarning")
async def test_client_tells_resets_from_timeouts_against_the_emulator() -> None:
    from ingest.emulator import API_KEY
    from ingest.emulator.server import EmulatorConfig, make_app

    server = TestServer(make_app(EmulatorConfig(stall_s=5.0)), host="127.0.0.1")
    await server.start_server()
    stats = Stats()
    client = V7Client(str(server.make_url("")), API_KEY, stats=stats, request_timeout_s=0.3)
    emu = server.app["emulator"]
    body = {
        "items": [{"path": "/", "type": "image", "storage_key": "k/a.png", "name": "a.png"}],
        "dataset_slug": "demo-dataset",
        "storage_slug": "s3-rw",
    }
    try:
        emu.fault_queue.extend(["reset", "stall", "commit_then_fail"])
        for _ in range(2):
            with pytest.raises(TransportError):
                await client.register("emulator-team", False, body)
        with pytest.raises(ServerError):
            await client.register("emulator-team", False, body)
    finally:
        await client.close()
        await server.close()
    assert stats.transport_by_kind == Counter({"reset": 1, "timeout": 1})
    assert stats.http_statuses == Counter({502: 1})


async def test_the_fault_log_task_ends_on_close_even_before_it_started() -> None:
    from ingest.registrar.faults import FaultLog

    early = FaultLog(Stats())
    await early.close()
    await asyncio.wait_for(early.run(), 5)  # returns at once, no hang
    late = FaultLog(Stats())
    task = asyncio.ensure_future(late.run())
    await asyncio.sleep(0)
    await late.close()
    await asyncio.wait_for(task, 5)
