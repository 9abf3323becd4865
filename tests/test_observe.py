"""Health and metrics of the worker: the latency histogram, ``Health.ready`` (pure, table
tests), bounded reason labels, and /healthz /readyz /metrics over a real socket on 127.0.0.1
(parsed with prometheus_client's own parser). Time is a fake clock everywhere; no sleeps."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import prometheus_client
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from ingest import __version__
from ingest.errors import RateLimited, ServerError, TransportError
from ingest.model import Item, ItemType, ObjectInfo, Slot
from ingest.registrar import wire
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.registrar import DrySending, Registrar
from ingest.registrar.retry import RetryPolicy
from ingest.stats import LATENCY_BOUNDS_S, LatencyHistogram, Stats
from ingest.worker.observe import (
    MAX_REASONS,
    OTHER,
    Health,
    ReasonLabels,
    default_max_sync_age_s,
    reason_label,
    serve_http,
)
from tests.conftest import seed_bucket
from tests.support.e2e import Emulator, job_config

T0 = 1_700_000_000.0  # a wall-clock time
MAX_AGE = 600.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the histogram -------------------------------------------------------------------------


def test_histogram_buckets_are_le_and_cumulative() -> None:
    h = LatencyHistogram(bounds=(0.1, 1.0, 10.0))
    for v in (0.05, 0.1, 0.1000001, 1.0, 9.0, 10.0, 60.0, 1e9):
        h.observe(v)
    assert h.counts == [2, 2, 2, 2]  # a value equal to a bound belongs to that bound's bucket
    assert h.cumulative() == [(0.1, 2), (1.0, 4), (10.0, 6), (math.inf, 8)]
    assert h.count == 8
    assert h.sum == pytest.approx(0.05 + 0.1 + 0.1000001 + 1.0 + 9.0 + 10.0 + 60.0 + 1e9)


def test_histogram_ignores_nan_and_clamps_a_clock_step_back() -> None:
    h = LatencyHistogram()
    h.observe(float("nan"))
    h.observe(-0.5)
    assert h.count == 1 and h.sum == 0.0 and h.counts[0] == 1
    assert h.bounds == LATENCY_BOUNDS_S and len(h.counts) == len(LATENCY_BOUNDS_S) + 1


@pytest.mark.parametrize("bounds", [(1.0, 0.5), (0.5, 0.5), (0.5, math.inf)])
def test_histogram_rejects_bad_bounds(bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="bounds"):
        LatencyHistogram(bounds=bounds)


# --- Health.ready (pure) -------------------------------------------------------------------


def health(**kw: Any) -> Health:
    base: dict[str, Any] = {"preflight_ok": True, "started_at": T0, "max_sync_age_s": MAX_AGE}
    return Health(**(base | kw))


@pytest.mark.parametrize(
    ("case", "h", "now", "last_sync", "ready", "reason"),
    [
        ("fresh, first sync running", health(), T0 + 1, None, True, "first sync"),
        ("fresh, just below the limit", health(), T0 + MAX_AGE - 0.001, None, True, "first"),
        ("first sync overdue", health(), T0 + MAX_AGE, None, False, "no successful sync"),
        ("recent sync", health(), T0 + 5000, T0 + 4500, True, "ok"),
        ("sync at the limit", health(), T0 + 5000, T0 + 5000 - MAX_AGE, False, "600 s ago"),
        ("stale sync", health(), T0 + 5000, T0 + 100, False, "4900 s ago (limit 600 s)"),
        ("preflight failed", health(preflight_ok=False), T0 + 1, None, False, "preflight"),
        (
            "preflight failed, recent sync",
            health(preflight_ok=False, last_error="bucket unreachable"),
            T0 + 100,
            T0 + 99,
            False,
            "preflight has not passed; last error: bucket unreachable",
        ),
        ("draining", health(draining=True), T0 + 100, T0 + 99, False, "draining"),
        (
            "draining wins over a failed preflight",
            health(draining=True, preflight_ok=False),
            T0,
            None,
            False,
            "draining",
        ),
        (
            "stale sync shows the last error",
            health(last_error="V7 answered 503"),
            T0 + 5000,
            T0,
            False,
            "last error: V7 answered 503",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_ready(
    case: str, h: Health, now: float, last_sync: float | None, ready: bool, reason: str
) -> None:
    got, why = h.ready(now, last_sync)
    assert got is ready, why
    assert reason in why


def test_health_needs_a_positive_max_age() -> None:
    with pytest.raises(ValueError, match="max_sync_age_s"):
        Health(max_sync_age_s=0)


def test_default_max_sync_age() -> None:
    assert default_max_sync_age_s(3600, 120) == 7320
    assert default_max_sync_age_s(60) == 600  # at least ten minutes


# --- reason labels -------------------------------------------------------------------------


def test_reason_labels_fold_numbers_but_keep_http_status() -> None:
    assert reason_label("gave up after 7 attempts over 901.3 s") == (
        "gave up after N attempts over N s"
    )
    assert reason_label("rejected by V7 (HTTP 422)") == "rejected by V7 (HTTP 422)"
    assert reason_label("x" * 500) == "x" * 80
    assert reason_label("  ") == "unknown"
    assert reason_label("codec h264 not found") == "codec h264 not found"


def test_reason_cardinality_is_capped_and_nothing_is_lost() -> None:
    counts = {f"REASON_{chr(65 + i // 26)}{chr(65 + i % 26)}": 100 + i for i in range(60)}
    labels = ReasonLabels()
    out = labels.fold(counts)
    assert len(out) == MAX_REASONS + 1
    assert sum(out.values()) == sum(counts.values())
    # the 50 most frequent keep their label; the 10 least frequent are "other"
    assert out[OTHER] == sum(100 + i for i in range(10))
    assert all(out[r] == n for r, n in counts.items() if n >= 110)
    # Later: a new, very frequent reason goes to "other" (labels are sticky), and every
    # series only grows.
    later = counts | {"NEW": 10_000, "REASON_AA": counts["REASON_AA"] + 1}
    out2 = labels.fold(later)
    assert set(out2) == set(out)
    assert out2[OTHER] == out[OTHER] + 10_000 + 1
    assert all(out2[k] >= v for k, v in out.items())


def test_reason_labels_fill_up_while_there_is_room() -> None:
    labels = ReasonLabels(limit=2)
    assert labels.fold({"A": 1}) == {"A": 1}
    assert labels.fold({"A": 1, "B": 1, "C": 5}) == {"A": 1, "C": 5, OTHER: 1}
    assert labels.fold({"A": 1, "B": 9, "C": 5, OTHER: 2}) == {"A": 1, "C": 5, OTHER: 11}


# --- the registrar observes every answered or failed request ------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.now += delay
        await asyncio.sleep(0)


@dataclass
class ScriptedApi:
    """Each request takes ``durations[i]`` seconds of fake time, then answers or raises."""

    time: FakeTime
    script: list[tuple[float, Exception | None]]
    hang: asyncio.Event | None = None

    async def register(self, team: str, readonly: bool, body: dict[str, Any]) -> dict[str, Any]:
        if self.hang is not None:
            await self.hang.wait()
        took, error = self.script.pop(0)
        self.time.now += took
        if error is not None:
            raise error
        return {"items": [{"id": "1", "name": i["name"], "path": "/"} for i in body["items"]]}


def registrar(api: ScriptedApi, stats: Stats) -> Registrar:
    ft = api.time
    limiter = Limiter(RateController(1000.0, 10.0), 4, clock=ft.clock, sleep=ft.sleep)
    return Registrar(
        api,
        limiter,
        RetryPolicy(base_s=0.01, cap_s=0.01, max_total_s=60.0),
        stats,
        target=wire.Target("t", "d", "s"),
        keys=wire.KeyMap(),
        readonly=False,
    )


def plan(name: str) -> Item:
    slot = Slot(name, ItemType.IMAGE, (ObjectInfo(name, 1),), name)
    return Item(path="/", name=name, slots=(slot,), compact=True)


async def test_registrar_observes_request_latency_of_answers_and_errors() -> None:
    stats = Stats()
    api = ScriptedApi(
        FakeTime(),
        [
            (0.02, RateLimited("429", status=429)),
            (3.0, ServerError("503", status=503)),
            (45.0, TransportError("timeout")),
            (0.3, None),
        ],
    )
    outcomes = await registrar(api, stats).register([plan("a")], DrySending())
    assert [o.state for o in outcomes] == ["REGISTERED"]
    h = stats.request_latency_s
    assert h.count == 4 == stats.requests
    assert h.sum == pytest.approx(48.32)
    cumulative = dict(h.cumulative())
    assert cumulative[0.025] == 1 and cumulative[0.25] == 1 and cumulative[0.5] == 2
    assert cumulative[5.0] == 3 and cumulative[30.0] == 3 and cumulative[60.0] == 4


async def test_a_cancelled_request_is_not_observed() -> None:
    stats = Stats()
    api = ScriptedApi(FakeTime(), [(1.0, None)], hang=asyncio.Event())
    task = asyncio.create_task(registrar(api, stats).register([plan("a")], DrySending()))
    for _ in range(20):
        await asyncio.sleep(0)
        if stats.in_flight:
            break
    assert stats.in_flight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stats.in_flight == 0 and stats.request_latency_s.count == 0


# --- over HTTP -----------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    stats: Stats
    health: Health
    clock: FakeClock
    session: aiohttp.ClientSession

    async def get(self, path: str) -> tuple[int, str, str]:
        async with self.session.get(self.url + path) as r:
            return r.status, r.headers.get("Content-Type", ""), await r.text()

    async def samples(self) -> Samples:
        status, ctype, text = await self.get("/metrics")
        assert status == 200
        assert ctype == prometheus_client.CONTENT_TYPE_LATEST
        out: Samples = {}
        for family in text_string_to_metric_families(text):
            assert family.name.startswith(("ingest_", "process_")), family.name
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out


def one(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[Server]:
    stats, clock = Stats(), FakeClock()
    h = Health(preflight_ok=True, started_at=T0, max_sync_age_s=MAX_AGE)
    async with (
        serve_http("127.0.0.1", 0, stats, h, clock=clock) as port,
        aiohttp.ClientSession() as session,
    ):
        yield Server(f"http://127.0.0.1:{port}", port, stats, h, clock, session)


async def test_metrics_equal_the_stats(server: Server) -> None:
    s = server.stats
    s.listed, s.planned, s.registered, s.skipped = 1000, 900, 850, 100
    s.blocked, s.failed, s.requests, s.rate_limited = 3, 7, 95, 4
    s.retries, s.server_errors, s.transport_errors = 6, 1, 1
    s.syncs_total, s.syncs_failed_total, s.events_received = 12, 2, 340
    s.vanished, s.changed = 5, 9
    s.current_rate_per_s, s.in_flight, s.processing = 7.5, 3, 2
    s.blocked_by_reason.update({"ALREADY_EXISTS": 2, "UNSUPPORTED_TYPE": 1})
    s.failures_by_reason.update({"gave up after 4 attempts over 901.2 s": 4})
    s.failures_by_reason.update({"gave up after 5 attempts over 903.0 s": 2})
    s.failures_by_reason.update({"rejected by V7 (HTTP 422)": 1})
    depth = {"items": 17}
    s.queues["items"] = lambda: depth["items"]
    s.queues["batches"] = lambda: 2

    m = await server.samples()
    expected_counters = {
        "ingest_objects_listed_total": 1000,
        "ingest_items_planned_total": 900,
        "ingest_items_registered_total": 850,
        "ingest_objects_skipped_total": 100,
        "ingest_register_requests_total": 95,
        "ingest_rate_limited_total": 4,
        "ingest_retries_total": 6,
        "ingest_server_errors_total": 1,
        "ingest_transport_errors_total": 1,
        "ingest_syncs_total": 12,
        "ingest_syncs_failed_total": 2,
        "ingest_object_events_total": 340,
        "ingest_objects_vanished_total": 5,
        "ingest_objects_changed_total": 9,
        "ingest_allowed_rate_requests_per_second": 7.5,
        "ingest_requests_in_flight": 3,
        "ingest_media_items_processing": 2,
        "ingest_ready": 1,
    }
    for name, value in expected_counters.items():
        assert one(m, name) == value, name
    assert one(m, "ingest_items_blocked_total", reason="ALREADY_EXISTS") == 2
    assert one(m, "ingest_items_blocked_total", reason="UNSUPPORTED_TYPE") == 1
    reason = "gave up after N attempts over N s"
    assert one(m, "ingest_items_failed_total", reason=reason) == 6
    assert one(m, "ingest_items_failed_total", reason="rejected by V7 (HTTP 422)") == 1
    assert one(m, "ingest_queue_depth", queue="items") == 17
    assert one(m, "ingest_queue_depth", queue="batches") == 2
    assert not [k for k in m if k[0] == "ingest_last_successful_sync_timestamp_seconds"]
    assert one(m, "ingest_build_info", version=__version__) == 1
    assert not [k for k in m if k[0] == "ingest_up"]
    # The process's own figures (prometheus_client's process collector, read from /proc).
    assert one(m, "process_resident_memory_bytes") > 10e6
    assert one(m, "process_open_fds") >= 3
    assert one(m, "process_max_fds") > one(m, "process_open_fds")
    assert one(m, "process_cpu_seconds_total") > 0

    # Live: the next scrape reads the Stats again.
    depth["items"] = 0
    s.registered += 10
    s.last_sync_success_at = T0 + 42.5
    m = await server.samples()
    assert one(m, "ingest_queue_depth", queue="items") == 0
    assert one(m, "ingest_items_registered_total") == 860
    assert one(m, "ingest_last_successful_sync_timestamp_seconds") == T0 + 42.5


async def test_latency_histogram_over_http(server: Server) -> None:
    for v in (0.004, 0.005, 0.2, 0.2, 1.5, 61.0):
        server.stats.request_latency_s.observe(v)
    m = await server.samples()
    name = "ingest_register_request_duration_seconds"
    buckets = {dict(labels)["le"]: v for (n, labels), v in m.items() if n == f"{name}_bucket"}
    assert buckets == {
        "0.005": 2,
        "0.01": 2,
        "0.025": 2,
        "0.05": 2,
        "0.1": 2,
        "0.25": 4,
        "0.5": 4,
        "1.0": 4,
        "2.5": 5,
        "5.0": 5,
        "10.0": 5,
        "30.0": 5,
        "60.0": 5,
        "+Inf": 6,
    }
    assert one(m, f"{name}_count") == 6
    assert one(m, f"{name}_sum") == pytest.approx(0.004 + 0.005 + 0.2 + 0.2 + 1.5 + 61.0)


async def test_reason_labels_are_capped_over_http(server: Server) -> None:
    for i in range(120):
        server.stats.failures_by_reason[f"media error {chr(65 + i % 26)}{chr(65 + i // 26)}"] = 1
        server.stats.blocked_by_reason[f"CODE_{chr(65 + i % 26)}{chr(65 + i // 26)}"] = i + 1
    m = await server.samples()
    for name in ("ingest_items_failed_total", "ingest_items_blocked_total"):
        values = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == name}
        assert len(values) == MAX_REASONS + 1, name
        assert OTHER in values
    failed = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "ingest_items_failed_total"}
    assert sum(failed.values()) == 120 and failed[OTHER] == 70
    blocked = {
        dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "ingest_items_blocked_total"
    }
    assert sum(blocked.values()) == sum(range(1, 121))
    assert blocked[OTHER] == sum(range(1, 71))  # the 70 least frequent
    assert min(v for r, v in blocked.items() if r != OTHER) == 71


async def test_a_broken_queue_does_not_break_the_scrape(server: Server) -> None:
    def broken() -> int:
        raise RuntimeError("queue closed")

    server.stats.queues["gone"] = broken
    server.stats.queues["ok"] = lambda: 1
    m = await server.samples()
    assert one(m, "ingest_queue_depth", queue="ok") == 1
    assert ("ingest_queue_depth", frozenset({("queue", "gone")})) not in m


async def test_healthz_and_unknown_paths(server: Server) -> None:
    assert (await server.get("/healthz"))[0::2] == (200, "ok\n")
    assert (await server.get("/nope"))[0] == 404
    assert (await server.get("/metrics/"))[0] == 404
    async with server.session.post(server.url + "/metrics") as r:
        assert r.status == 405


async def test_readyz_transitions(server: Server) -> None:
    h, clock, stats = server.health, server.clock, server.stats

    async def readyz() -> tuple[int, str, float]:
        status, _, text = await server.get("/readyz")
        return status, text, one(await server.samples(), "ingest_ready")

    clock.now = T0 + 10
    status, text, gauge = await readyz()
    assert (status, gauge) == (200, 1) and "first sync" in text

    h.preflight_ok, h.last_error = False, "V7 unreachable: connection refused"
    status, text, gauge = await readyz()
    assert (status, gauge) == (503, 0)
    assert text == "preflight has not passed; last error: V7 unreachable: connection refused\n"

    h.preflight_ok, h.last_error = True, ""
    clock.now = T0 + MAX_AGE + 1  # the first sync has not finished in time
    status, text, gauge = await readyz()
    assert (status, gauge) == (503, 0) and "no successful sync" in text

    stats.last_sync_success_at = clock.now
    assert (await readyz())[0::2] == (200, 1)

    clock.now += MAX_AGE + 30  # stale
    status, text, gauge = await readyz()
    assert (status, gauge) == (503, 0) and f"{MAX_AGE + 30:.0f} s ago" in text

    stats.last_sync_success_at = clock.now - 1
    assert (await readyz())[0::2] == (200, 1)

    h.draining = True
    status, text, gauge = await readyz()
    assert (status, gauge) == (503, 0) and text.startswith("draining")
    # liveness is not readiness: a draining worker is still alive
    assert (await server.get("/healthz"))[0] == 200


async def test_servers_have_their_own_registries_and_close_on_exit() -> None:
    a, b = Stats(listed=1), Stats(listed=2)
    async with (
        serve_http("127.0.0.1", 0, a, Health()) as port_a,
        serve_http("127.0.0.1", 0, b, Health()) as port_b,
        aiohttp.ClientSession() as session,
    ):
        assert port_a != port_b and port_a > 0
        for port, listed in ((port_a, 1), (port_b, 2)):
            async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
            assert f"ingest_objects_listed_total {listed}.0" in text
        # nothing was registered on the process-wide default registry
        default = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
        assert "ingest_" not in default
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"http://127.0.0.1:{port_a}/healthz") as r:
                await r.read()


def test_reasons_are_counted_folded_and_in_bounded_keys() -> None:
    """A worker that runs for weeks: "gave up after N attempts over N s" is one reason, and
    the counter never holds more than MAX_REASON_KEYS keys whatever the messages."""
    from collections import Counter

    from ingest.stats import MAX_REASON_KEYS, count_reason

    counts: Counter[str] = Counter()
    count_reason(counts, "gave up after 4 attempts over 901.2 s")
    count_reason(counts, "gave up after 5 attempts over 903.0 s")
    count_reason(counts, "rejected by V7 (HTTP 422)")
    assert counts == {"gave up after N attempts over N s": 2, "rejected by V7 (HTTP 422)": 1}
    for i in range(3 * MAX_REASON_KEYS):
        count_reason(counts, f"media error {chr(65 + i % 26)}{chr(65 + i // 26 % 26)}{i // 676}")
    assert len(counts) == MAX_REASON_KEYS + 1  # + "other"
    assert counts[OTHER] > 0 and sum(counts.values()) == 3 + 3 * MAX_REASON_KEYS


async def test_queue_depths_read_zero_once_a_pass_is_over(
    tmp_path: Path,
    moto_url: str,
    bucket_name: str,
    emulator: Emulator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The senders leave their end-of-stream marker in the batch queue: an idle worker must
    not read as one batch waiting. A real pass: moto's bucket, our V7 emulator, the SQLite
    ledger."""
    from ingest import config
    from ingest.emulator import local_env
    from ingest.engine import open_engine

    seed_bucket(moto_url, bucket_name, [f"q/{i:02d}.jpg" for i in range(30)])
    path = job_config(
        tmp_path, emulator, moto_url, bucket_name, emulator.storage_for(bucket_name),
        extra="[rate]\nmax_in_flight = 3\n[batch]\nmax_items = 4\n",
    )  # fmt: skip
    for name, value in local_env().items():
        monkeypatch.setenv(name, value)
    cfg = config.load(path)
    async with open_engine(cfg) as engine:
        result = await engine.run("run")
        assert result is not None and not result.stopped_early
        stats = engine.stats
    assert stats.registered == 30 and len(emulator.items()) == 30
    assert {"items", "batches"} <= set(stats.queues)
    depths = {name: depth() for name, depth in stats.queues.items()}
    assert depths == dict.fromkeys(stats.queues, 0)


def test_cgroup_memory_is_exported_children_included() -> None:
    """process_resident_memory_bytes is the worker alone; a limit counts its Pillow and ffmpeg
    children too: the cgroup's figures are exported (the limit only when there is one)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from ingest.cpus import CgroupMemory
    from ingest.worker.observe import IngestCollector

    def scrape(memory: CgroupMemory) -> dict[str, float]:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(IngestCollector(Stats(), Health(), lambda: T0, lambda: memory))
        text = generate_latest(registry).decode()
        return {
            s.name: s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("ingest_cgroup_memory")
        }

    assert scrape(CgroupMemory(300, 200, 2**31)) == {
        "ingest_cgroup_memory_usage_bytes": 300.0,
        "ingest_cgroup_memory_working_set_bytes": 200.0,
        "ingest_cgroup_memory_limit_bytes": float(2**31),
    }
    assert scrape(CgroupMemory(300, 200, None)) == {
        "ingest_cgroup_memory_usage_bytes": 300.0,
        "ingest_cgroup_memory_working_set_bytes": 200.0,
    }
    assert scrape(CgroupMemory(None, None, None)) == {}
