"""Health and Prometheus metrics of the worker: ``/healthz``, ``/readyz``, ``/metrics``.

The metrics are read at scrape time from the live ``Stats`` (plain counters mutated by the
pipeline on the same event loop) and a ``Health``, through a custom collector on a registry of
its own: nothing touches prometheus_client's global default registry, so tests and several
workers in one process do not collide.

- ``/healthz``: 200 "ok" whenever the event loop answers (liveness: restart only if it hangs).
- ``/readyz``: 200 when ``Health.ready`` says so, else 503 with the reason as text.
- ``/metrics``: the Prometheus text exposition (``prometheus_client.CONTENT_TYPE_LATEST``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ingest import __version__
from ingest.cpus import CgroupMemory, cgroup_memory, read_text
from ingest.errors import ConfigError
from ingest.stats import OTHER, Stats, reason_label

log = logging.getLogger("ingest.worker")

Clock = Callable[[], float]

HEALTHZ = "/healthz"
READYZ = "/readyz"
METRICS = "/metrics"
ROUTES: tuple[str, ...] = (HEALTHZ, READYZ, METRICS)

MAX_REASONS = 50  # distinct reason labels per metric; the rest are folded into OTHER
MIN_MAX_SYNC_AGE_S = 600.0


def default_max_sync_age_s(period_s: float, jitter_s: float = 0.0) -> float:
    """``worker.ready_max_sync_age_s = 0``: two schedule periods plus the jitter, at least ten
    minutes (one late or slow sync must not flap readiness)."""
    return max(2.0 * period_s + jitter_s, MIN_MAX_SYNC_AGE_S)


@dataclass
class Health:
    """What readiness depends on besides the Stats. Mutated by the worker on its event loop."""

    preflight_ok: bool = False  # V7 and the bucket answered the preflight checks
    last_error: str = ""  # the latest error worth showing (already free of secrets)
    started_at: float = field(default_factory=time.time)  # wall clock (time.time())
    max_sync_age_s: float = MIN_MAX_SYNC_AGE_S  # resolved: see default_max_sync_age_s
    draining: bool = False  # SIGTERM received: finishing in-flight work, then exiting

    def __post_init__(self) -> None:
        if not self.max_sync_age_s > 0:
            raise ValueError(f"Health.max_sync_age_s must be > 0, got {self.max_sync_age_s!r}")

    def ready(self, now: float, last_sync_success_at: float | None) -> tuple[bool, str]:
        """(ready, why). Ready iff the preflight passed, the worker is not draining, and the
        last successful sync is younger than ``max_sync_age_s``; before any sync has
        succeeded, a worker is ready for ``max_sync_age_s`` after it started (its first sync
        may still be running). All times are wall-clock seconds."""
        if self.draining:
            return False, "draining: shutting down after SIGTERM"
        if not self.preflight_ok:
            return False, "preflight has not passed" + self._error()
        limit = self.max_sync_age_s
        if last_sync_success_at is None:
            age = now - self.started_at
            if age < limit:
                return True, "ok: first sync in progress"
            return False, (
                f"no successful sync in the {age:.0f} s since the worker started "
                f"(limit {limit:.0f} s)" + self._error()
            )
        age = now - last_sync_success_at
        if age < limit:
            return True, "ok"
        return False, (
            f"last successful sync was {age:.0f} s ago (limit {limit:.0f} s)" + self._error()
        )

    def _error(self) -> str:
        return f"; last error: {self.last_error[:300]}" if self.last_error else ""


# --- reason labels -------------------------------------------------------------------------


class ReasonLabels:
    """Bounded label values for a ``reason`` label: at most ``limit`` reasons get a label of
    their own (the most frequent ones when there is room), everything else is summed into
    ``"other"``. A reason keeps the label it was given, so every exported counter only grows
    (a reason moving in and out of "other" would make "other" go down: a false reset)."""

    def __init__(self, limit: int = MAX_REASONS) -> None:
        self.limit = limit
        self._admitted: set[str] = set()

    def fold(self, counts: Mapping[str, int]) -> dict[str, int]:
        merged: dict[str, int] = {}
        for reason, n in counts.items():
            label = reason_label(reason)
            merged[label] = merged.get(label, 0) + n
        room = self.limit - len(self._admitted)
        if room > 0:
            fresh = [r for r in merged if r not in self._admitted and r != OTHER]
            fresh.sort(key=lambda r: (-merged[r], r))
            self._admitted.update(fresh[:room])
        out: dict[str, int] = {}
        for label, n in merged.items():
            key = label if label in self._admitted else OTHER
            out[key] = out.get(key, 0) + n
        return out


# --- the collector -------------------------------------------------------------------------


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class IngestCollector(Collector):
    """Reads a Stats and a Health at every scrape; one per registry."""

    def __init__(
        self,
        stats: Stats,
        health: Health,
        clock: Clock = time.time,
        memory: Callable[[], CgroupMemory] = lambda: cgroup_memory(read_text),
    ) -> None:
        self.stats = stats
        self.health = health
        self.clock = clock
        self.memory = memory
        self._blocked = ReasonLabels()
        self._failed = ReasonLabels()

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: the registry calls collect() only when scraped

    def collect(self) -> Iterable[Metric]:
        s = self.stats
        yield _counter("ingest_objects_listed_total", "Objects seen in bucket listings.", s.listed)
        yield _counter("ingest_items_planned_total", "Dataset items planned.", s.planned)
        yield _counter("ingest_items_registered_total", "Items registered in V7.", s.registered)
        yield self._by_reason(
            "ingest_items_blocked_total",
            "Items refused by V7 (blocked_items), by reason.",
            self._blocked,
            s.blocked_by_reason,
        )
        yield self._by_reason(
            "ingest_items_failed_total",
            "Items that failed, by reason (prefix).",
            self._failed,
            s.failures_by_reason,
        )
        yield _counter(
            "ingest_objects_skipped_total", "Objects skipped (filtered or unsupported).", s.skipped
        )
        yield _counter(
            "ingest_register_requests_total", "Register requests sent (every attempt).", s.requests
        )
        yield _counter(
            "ingest_rate_limited_total", "Register requests answered 429.", s.rate_limited
        )
        yield _counter("ingest_retries_total", "Register attempts beyond the first.", s.retries)
        yield _counter(
            "ingest_server_errors_total", "Register requests answered 5xx.", s.server_errors
        )
        yield _counter(
            "ingest_transport_errors_total",
            "Register requests without an answer (reset, timeout).",
            s.transport_errors,
        )
        yield _counter("ingest_syncs_total", "Syncs started.", s.syncs_total)
        yield _counter(
            "ingest_syncs_failed_total", "Syncs ended by an error.", s.syncs_failed_total
        )
        yield _counter(
            "ingest_object_events_total",
            "Object events received (SQS / Azure queue).",
            s.events_received,
        )
        yield _counter(
            "ingest_object_events_deferred_total",
            "Event objects of multi-file items (DICOM series, folder slots) left to the sync.",
            s.events_deferred,
        )
        yield _counter(
            "ingest_objects_vanished_total", "Objects syncs found gone from the bucket.", s.vanished
        )
        yield _counter(
            "ingest_objects_changed_total", "Objects syncs found with a new ETag.", s.changed
        )
        yield _gauge(
            "ingest_allowed_rate_requests_per_second",
            "Request rate the rate controller allows now.",
            s.current_rate_per_s,
        )
        yield _gauge(
            "ingest_requests_in_flight", "Register requests awaiting an answer.", s.in_flight
        )
        yield _gauge("ingest_media_items_processing", "Items in the media stage now.", s.processing)
        yield self._queues()
        if s.last_sync_success_at is not None:
            yield _gauge(
                "ingest_last_successful_sync_timestamp_seconds",
                "Unix time the last successful sync finished.",
                s.last_sync_success_at,
            )
        ready, _ = self.health.ready(self.clock(), s.last_sync_success_at)
        yield _gauge("ingest_ready", "1 when /readyz answers 200.", 1.0 if ready else 0.0)
        yield self._build_info()
        yield self._latency()
        yield from self._cgroup_memory()

    def _cgroup_memory(self) -> Iterable[Metric]:
        """The cgroup's memory (children included), read at each scrape; absent outside a
        memory cgroup, the limit absent when there is none."""
        try:
            m = self.memory()
        except Exception:  # unreadable /sys must not break the scrape
            log.debug("cgroup memory unavailable", exc_info=True)
            return
        for name, doc, value in (
            ("usage", "Memory charged to this process's cgroup (children included).",
             m.usage_bytes),
            ("working_set", "Cgroup memory minus inactive file cache (what an OOM kill counts).",
             m.working_set_bytes),
            ("limit", "The cgroup's memory limit (tightest up its ancestors).", m.limit_bytes),
        ):  # fmt: skip
            if value is not None:
                yield _gauge(f"ingest_cgroup_memory_{name}_bytes", doc, float(value))

    @staticmethod
    def _build_info() -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "ingest_build_info", "Always 1; the version running, as a label.", labels=["version"]
        )
        family.add_metric([__version__], 1.0)
        return family

    def _by_reason(
        self, name: str, doc: str, labels: ReasonLabels, counts: Mapping[str, int]
    ) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=["reason"])
        for reason, n in sorted(labels.fold(counts).items()):
            family.add_metric([reason], n)
        return family

    def _queues(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "ingest_queue_depth", "Items waiting in each pipeline queue.", labels=["queue"]
        )
        for name, depth in sorted(self.stats.queues.items()):
            try:
                value = float(depth())
            except Exception:  # a queue gone or broken must not break the scrape
                log.debug("queue depth unavailable", extra={"queue": name}, exc_info=True)
                continue
            family.add_metric([name], value)
        return family

    def _latency(self) -> HistogramMetricFamily:
        h = self.stats.request_latency_s
        buckets = [
            ("+Inf" if math.isinf(bound) else repr(float(bound)), float(n))
            for bound, n in h.cumulative()
        ]
        return HistogramMetricFamily(
            "ingest_register_request_duration_seconds",
            "Seconds from sending a register request to its answer or error.",
            buckets=buckets,
            sum_value=h.sum,
        )


def metrics_registry(stats: Stats, health: Health, clock: Clock = time.time) -> CollectorRegistry:
    """A registry of its own: the ingest collector and the process's own figures (memory,
    CPU seconds, open file descriptors, start time: prometheus_client's process collector)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(IngestCollector(stats, health, clock))
    ProcessCollector(registry=registry)
    return registry


# --- HTTP ----------------------------------------------------------------------------------


def make_app(stats: Stats, health: Health, clock: Clock = time.time) -> web.Application:
    registry = metrics_registry(stats, health, clock)

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ready, reason = health.ready(clock(), stats.last_sync_success_at)
        return web.Response(status=200 if ready else 503, text=reason + "\n")

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get(HEALTHZ, healthz)
    app.router.add_get(READYZ, readyz)
    app.router.add_get(METRICS, metrics)
    return app


@contextlib.asynccontextmanager
async def serve_http(
    host: str, port: int, stats: Stats, health: Health, clock: Clock = time.time
) -> AsyncIterator[int]:
    """Serve /healthz, /readyz and /metrics on host:port while the block runs; yields the
    bound port (port 0 binds a free one). Leaving the block closes the listener and any open
    connections."""
    runner = web.AppRunner(
        make_app(stats, health, clock),
        access_log=None,
        handle_signals=False,  # the worker owns SIGTERM / SIGINT
        shutdown_timeout=1.0,  # handlers answer at once; do not wait on idle keep-alives
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as e:  # EADDRINUSE, EACCES (< 1024), EADDRNOTAVAIL: fix the config
            raise ConfigError(
                f"config: worker.http_port {port} on {host!r} cannot be used "
                f"({e.strerror or e}): another worker or process holds it? stop it, or set "
                "worker.http_port to a free port (0 = no HTTP endpoint)"
            ) from None
        bound = int(runner.addresses[0][1])
        log.info("serving health and metrics", extra={"host": host, "port": bound})
        yield bound
    finally:
        await runner.cleanup()
