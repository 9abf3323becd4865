"""`ingest worker`: a process that lives for weeks under systemd or Kubernetes.

It syncs on a schedule, optionally registers objects from bucket events within seconds (the
scheduled sync stays as the reconciliation that catches a missed event), retries failed items
with back-off between syncs, keeps trying while V7 or the bucket is unreachable (not ready, but
alive: no crash loop), serves /healthz /readyz /metrics, and on SIGTERM stops taking work, lets
in-flight requests and uploads finish within the grace period, and exits 0. A second signal, or
the grace period running out, exits at once; the ledger makes the next start resume cleanly.

Passes never overlap: a sync and an events pass take turns on one lock, and the whole worker
holds the job's ledger lease, so a manual `ingest sync` of the same job is refused meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ingest.config import Config
from ingest.engine import Engine, hold_lease, open_engine
from ingest.errors import Aborted, ConfigError, IngestError, PreflightError
from ingest.log import redact, set_run_id
from ingest.model import ObjectInfo
from ingest.providers import Delivery, EventSource
from ingest.providers.factory import open_events
from ingest.run.lifecycle import (
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Lifecycle,
)
from ingest.run.pipeline import cooperates
from ingest.stats import Stats
from ingest.worker.observe import Health, default_max_sync_age_s, serve_http
from ingest.worker.schedule import (
    failed_retry_due,
    parse_schedule,
    unreachable_delay_s,
    with_jitter,
)

log = logging.getLogger("ingest.worker")

# A lost lease (another process took the job over) exits non-zero so a supervisor sees it.
EXIT_LEASE_LOST = EXIT_FATAL
RECEIVE_MAX_MESSAGES = 10


class Worker:
    def __init__(
        self,
        cfg: Config,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.schedule = parse_schedule(cfg.worker.schedule)
        self.clock = clock
        self.rng = rng or random.Random()
        self.stats = Stats()
        w = cfg.worker
        max_age = w.ready_max_sync_age_s or default_max_sync_age_s(
            self.schedule.typical_period_s(clock()), w.jitter_s
        )
        self.health = Health(started_at=clock(), max_sync_age_s=max_age)
        self.http_port = 0  # bound port, once serving
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()  # one pass at a time: sync or events
        self._engine: Engine | None = None
        self._lost_lease = False
        self._last_exit = EXIT_OK

    # --- lifecycle ----------------------------------------------------------------------------

    def _lease_lost(self) -> None:
        self._lost_lease = True
        self.stop()

    def stop(self) -> None:
        """Graceful: no new passes, the current pass finishes what is in flight."""
        if self._stopping.is_set():
            return
        self.health.draining = True
        self._stopping.set()
        if self._engine is not None:
            self._engine.request_stop()

    async def serve(self, *, once: bool = False) -> int:
        """Run until stopped (or one pass with ``once``); returns the exit code."""
        life = Lifecycle(self.stop, grace_period_s=self.cfg.worker.grace_period_s)
        set_run_id(f"worker:{self.cfg.job}")
        try:
            return await life.run(self._serve_http(once))
        except Aborted:
            return EXIT_INTERRUPTED
        finally:
            log.info("worker stopped", extra={"forced": life.forced})

    async def _serve_http(self, once: bool) -> int:
        async with self._http():
            log.info(
                "worker started",
                extra={"schedule": self.schedule.text, "http_port": self.http_port},
            )
            return await self._live(once)

    @contextlib.asynccontextmanager
    async def _http(self) -> Any:
        w = self.cfg.worker
        if not w.http_port:
            yield None
            return
        async with serve_http(w.http_host, w.http_port, self.stats, self.health) as port:
            self.http_port = port
            yield port

    async def _live(self, once: bool) -> int:
        """Open the engine (preflight), hold the lease, serve; on an unreachable V7 or bucket
        keep retrying with back-off instead of exiting. A bad config fails at once."""
        attempt = 0
        ever_ready = False
        while not self._stopping.is_set():
            try:
                async with open_engine(self.cfg, self.stats) as engine:
                    self.health.preflight_ok, self.health.last_error = True, ""
                    ever_ready, attempt = True, 0
                    ttl = self.cfg.ledger.lease_ttl_s
                    roles = frozenset(self.cfg.worker.roles)
                    alone = not cooperates(self.cfg, engine.ledger)
                    async with hold_lease(engine.ledger, ttl, self._lease_lost, roles, alone=alone):
                        self._engine = engine
                        try:
                            code = await self._serve_engine(engine, once)
                        finally:
                            self._engine = None
                    return EXIT_LEASE_LOST if self._lost_lease else code
            except asyncio.CancelledError:
                raise
            except ConfigError as e:  # a manifest, profile or endpoint retrying will not fix
                if not ever_ready:
                    log.error(f"preflight failed: {e}")
                    return EXIT_CONFIG
                self._unhealthy(e)  # the manifest broke since: fixable without a restart
            except PreflightError as e:
                if not (e.retryable or ever_ready):
                    log.error(f"preflight failed: {e}")
                    return EXIT_CONFIG
                self._unhealthy(e)
            except Exception as e:  # the worker must outlive any outage: report, back off
                self._unhealthy(e)
            if once:
                return EXIT_INCOMPLETE
            delay = unreachable_delay_s(
                attempt, self.cfg.worker.unreachable_retry_cap_s, self.rng.random()
            )
            attempt += 1
            log.warning(
                "V7 or the bucket is unavailable; trying again",
                extra={
                    "reason": self.health.last_error,
                    "retry_in_s": round(delay, 1),
                    "attempt": attempt,
                },
            )
            await self._sleep(delay)
        return EXIT_OK

    def _unhealthy(self, e: BaseException) -> None:
        self.health.preflight_ok = False
        self.health.last_error = redact(f"{type(e).__name__}: {e}")[:300]
        if not isinstance(e, IngestError):
            log.exception("worker pass failed")

    async def _sleep(self, seconds: float) -> None:
        """Wait, but wake at once on stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), max(0.0, seconds))

    # --- passes -------------------------------------------------------------------------------

    async def _serve_engine(self, engine: Engine, once: bool) -> int:
        async with open_events(self.cfg) as events, asyncio.TaskGroup() as tg:
            if events is not None and not once:
                tg.create_task(self._events_loop(engine, events), name="events")
            failures = 0
            while not self._stopping.is_set():
                ok = await self._sync(engine)
                if once:
                    self._stopping.set()  # let the events task (none) and the group end
                    return self._last_exit
                now = self.clock()
                if ok:
                    failures = 0
                    nxt = with_jitter(
                        self.schedule.next_after(now), self.cfg.worker.jitter_s, self.rng.random()
                    )
                else:  # try again sooner than the schedule, backing off
                    nxt = min(
                        self.schedule.next_after(now),
                        now
                        + unreachable_delay_s(
                            failures, self.cfg.worker.unreachable_retry_cap_s, self.rng.random()
                        ),
                    )
                    failures += 1
                log.info("next sync", extra={"in_s": round(nxt - now, 1)})
                await self._sleep(nxt - now)
        return EXIT_OK

    async def _sync(self, engine: Engine) -> bool:
        """One scheduled sync (failed items whose back-off passed go first). True when it
        completed and reached V7; a failure is counted and reported, never raised."""
        w = self.cfg.worker
        async with self._lock:
            if self._stopping.is_set():
                return True
            now = self.clock()
            requeued = await engine.ledger.requeue_due(
                lambda failures, at: failed_retry_due(
                    failures, at, now, w.retry_failed_base_s, w.retry_failed_cap_s
                )
            )
            if requeued:
                log.info("failed items due for another try", extra={"count": requeued})
            try:
                result = await engine.pass_("sync")
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.stats.syncs_failed_total += 1
                self.health.last_error = redact(f"sync failed: {type(e).__name__}: {e}")[:300]
                log.error("sync failed", extra={"error": self.health.last_error})
                return False
            finally:
                self.stats.syncs_total += 1
                set_run_id(f"worker:{self.cfg.job}")
        c = result.counts
        failed = c.get("failed", 0)
        self._last_exit = EXIT_INCOMPLETE if failed or c.get("blocked", 0) else EXIT_OK
        log.info("sync finished", extra={"stopped_early": result.stopped_early, **c})
        for warning in result.warnings:
            log.warning(warning)
        if result.stopped_early:
            return True
        if failed and not c.get("registered", 0) and c.get("requests", 0):
            # Everything sent failed: V7 is likely down. Not a success for /readyz.
            self.stats.syncs_failed_total += 1
            self.health.last_error = "sync: every request failed (is V7 reachable?)"
            return False
        self.stats.last_sync_success_at = self.clock()
        self.health.last_error = ""
        return True

    async def _events_loop(self, engine: Engine, events: EventSource) -> None:
        """Object events → small passes within seconds; messages are deleted only after the
        pass recorded them (at-least-once in, exactly-once out through the ledger)."""
        failures = 0
        w = self.cfg.worker
        while not self._stopping.is_set():
            try:
                deliveries = await self._gather_events(events)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self.health.last_error = redact(f"events: {type(e).__name__}: {e}")[:300]
                log.warning("event queue unavailable", extra={"error": self.health.last_error})
                await self._sleep(unreachable_delay_s(failures, w.unreachable_retry_cap_s, 0.5))
                failures += 1
                continue
            failures = 0
            if not deliveries:
                continue
            try:
                done = await self._apply_events(engine, deliveries)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # not acked: the messages come back
                self.health.last_error = redact(f"events pass: {type(e).__name__}: {e}")[:300]
                log.error("events pass failed", extra={"error": self.health.last_error})
                await self._sleep(unreachable_delay_s(0, w.unreachable_retry_cap_s, 0.5))
                continue
            if done:
                try:
                    await events.ack(deliveries)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # not acked: delivered again, and deduped by the ledger
                    self.health.last_error = redact(f"events ack: {type(e).__name__}: {e}")[:300]
                    log.warning("could not ack events", extra={"error": self.health.last_error})

    async def _gather_events(self, events: EventSource) -> list[Delivery]:
        """Messages until events_max_batch objects or events_wait_s after the first one."""
        w = self.cfg.worker
        out: list[Delivery] = []
        n = 0
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        while n < w.events_max_batch and not self._stopping.is_set():
            wait_s = 20.0 if deadline is None else max(0.0, deadline - loop.time())
            if deadline is not None and wait_s <= 0:
                break
            got = await self._until_stopped(events.receive(RECEIVE_MAX_MESSAGES, wait_s))
            if got is None:
                break
            out += got
            n += sum(len(d.events) for d in got)
            if got and deadline is None:
                deadline = loop.time() + w.events_wait_s
        return out

    async def _until_stopped(self, aw: Awaitable[list[Delivery]]) -> list[Delivery] | None:
        receive = asyncio.ensure_future(aw)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({receive, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if receive.done():
            return receive.result()
        receive.cancel()  # not received: the queue redelivers after its visibility timeout
        with contextlib.suppress(asyncio.CancelledError):
            await receive
        return None

    async def _apply_events(self, engine: Engine, deliveries: Sequence[Delivery]) -> bool:
        latest: dict[str, ObjectInfo] = {}
        deleted: set[str] = set()
        for d in deliveries:
            for ev in d.events:
                self.stats.events_received += 1
                if ev.kind == "created":
                    latest[ev.obj.key] = ev.obj
                    deleted.discard(ev.obj.key)
                else:
                    deleted.add(ev.obj.key)
                    latest.pop(ev.obj.key, None)
        async with self._lock:
            if self._stopping.is_set():
                return False
            if deleted:
                self.stats.vanished += await engine.ledger.record_sync_page(
                    vanished=sorted(deleted)
                )
            if not latest:
                return True
            try:
                result = await engine.pass_("events", list_bucket=False, objects=[*latest.values()])
            finally:
                set_run_id(f"worker:{self.cfg.job}")
        log.info("events registered", extra={"objects": len(latest), **result.counts})
        return not result.stopped_early


async def main(cfg: Config, *, once: bool = False) -> int:
    return await Worker(cfg).serve(once=once)
