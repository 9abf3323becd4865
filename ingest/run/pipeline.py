"""The pipeline: the stages of one pass wired with bounded queues — wiring only.

    recovery / listing (+ sync merge) → planning → ledger → media workers → batcher → senders

Every arrow is a bounded asyncio.Queue, so the slowest stage sets the pace and memory stays flat
however many objects the bucket holds. Every ledger call goes through the async port.

Exactly-once: a page's items and its listing checkpoint are committed in one transaction; an
item is marked SENT (committed) once its rate slot is granted, just before its request goes
out; on restart, PLANNED and SENT items are re-queued first and the listing resumes from the
last checkpoint. ``ALREADY_EXISTS`` for an item we had sent before is success.

Several processes on one job (a ``cooperative`` ledger, PostgreSQL): the listing's shards
are rows each process claims one at a time (``iter_claimed_pages``); the items a process
plans or recovers are claimed by it, and work it is not given a role for
(``worker.roles``) is left to others. After its own listing a process keeps recovering
what others leave (a process that died: its claims expire, or are reaped at once when it
ran on this host) until no work is outstanding. A write refused because another process took
the work over (``ClaimLost``) drops that work here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ingest.batch import BatchBuilder, run_batcher
from ingest.config import Config
from ingest.errors import ClaimLost
from ingest.ledger import LedgerPort, ManifestItem
from ingest.ledger.port import UNLISTED_SHARD, role_for
from ingest.log import set_run_id
from ingest.manifest import read_manifest
from ingest.model import Item, Media, ObjectInfo, Skip
from ingest.planner import ShardPlanner, collision, make_shard_planner, plan_manifest_item
from ingest.providers import Page, Shard, Source
from ingest.providers.fanout import (
    ShardPage,
    discover_shards,
    iter_claimed_pages,
    iter_shard_pages,
)
from ingest.run.merge import SyncMerge
from ingest.run.planning import (
    Planning,
    chunks,
    empty_listing_warning,
    partition_events,
    without_prefixes,
)
from ingest.run.processing import MediaWorkers, Prepare
from ingest.run.sending import Register, Resolve, Sender
from ingest.stats import Stats, count_reason

log = logging.getLogger("ingest.pipeline")

ITEM_QUEUE_BATCHES = 4  # item queue holds this many batches' worth per in-flight request
PAGE_QUEUE_PAGES = 8
PLAN_CHUNK_OBJECTS = 200  # objects planned and recorded between yields to the loop
MANIFEST_CHUNK_ITEMS = 500  # manifest items looked up and recorded per ledger call
RESOLVE_AT_START = 10_000  # registered items without a V7 id, looked up again per pass
# Cooperative passes: how often a process that has finished its own work looks for work that
# others left (their claims expired) while some is outstanding.
OUTSTANDING_POLL_S = 1.0


def cooperates(cfg: Config, ledger: LedgerPort) -> bool:
    """Whether this process shares the job with others (claims) rather than holding it alone
    (the job lease): a cooperative ledger, except in manifest mode, whose staged manifest
    every listing process would read while another one re-staged it."""
    return ledger.cooperative and cfg.plan.slots != "manifest"


def _empty() -> int:
    return 0


def _shard_of(shard_id: str) -> Shard:
    """The shard a listing row's id names ("R:<prefix>" recursive, "L:<prefix>" one level)."""
    kind, _sep, prefix = shard_id.partition(":")
    return Shard(prefix, recursive=kind != "L")


class Background(Protocol):
    """A helper task that lives as long as the pass (fault log, id resolver)."""

    async def run(self) -> None: ...
    async def close(self) -> None: ...


@dataclass
class RunResult:
    run_id: int = 0
    stopped_early: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    # A complete listing that gave nothing to register says why (empty prefix, patterns that
    # match nothing): the caller logs it as a WARNING at the end; the exit code stays 0.
    warnings: list[str] = field(default_factory=list)


class Pipeline:
    """One pass (`run`, `sync`, `retry`, an events pass or a dry-run `plan`)."""

    def __init__(
        self,
        cfg: Config,
        source: Source,
        ledger: LedgerPort,
        registrar: Register,
        stats: Stats,
        *,
        readonly: bool,
        clock: Callable[[], float] | None = None,
        media: Prepare | None = None,
        image_workers: int = 16,
        video_workers: int = 2,
        ignore_prefixes: Sequence[str] = (),
        sync: bool = False,
        dry_run: bool = False,
        resolver: Resolve | None = None,
        background: Sequence[Background] = (),
        stop: asyncio.Event | None = None,
        holder_dead: Callable[[str], bool] | None = None,
    ) -> None:
        # sync: merge the listing with the ledger (only new objects are planned; changed and
        # vanished ones are recorded) instead of recording every listed object.
        # dry_run (`ingest plan`): items needing media work are sent on as they are.
        self.cfg = cfg
        self.source = source
        self.ledger = ledger
        self.stats = stats
        self.readonly = readonly
        self.dry_run = dry_run
        self._clock = clock or asyncio.get_event_loop().time
        self._stop = stop or asyncio.Event()
        self._background = background
        self._resolver = resolver
        self.cooperative = cooperates(cfg, ledger) and not dry_run
        self.roles = (
            frozenset(cfg.worker.roles)
            if self.cooperative
            else frozenset(("list", "media", "send"))
        )
        self._holder_dead = holder_dead or (lambda _h: False)
        self._lost_shards: set[str] = set()
        self._shards: list[Shard] | None = None  # discovered once per pass
        n = cfg.rate.max_in_flight
        self.items: asyncio.Queue[Item | None] = asyncio.Queue(
            max(cfg.batch.max_items * n * ITEM_QUEUE_BATCHES, 64)
        )
        self.batches: asyncio.Queue[list[Item] | None] = asyncio.Queue(n)
        # Where thumbnails and video artifacts are written (by us, or by V7 on read-write
        # storage): never registered, never recorded, or every run would find them anew.
        self.ignore_prefixes = tuple(p.rstrip("/") + "/" for p in ignore_prefixes if p.strip("/"))
        self.warnings: list[str] = []
        self._listed = 0  # objects this pass listed (the empty-listing warning)
        self.planning = Planning(
            cfg.source.include,
            cfg.source.exclude,
            lambda: make_shard_planner(cfg, readonly),
        )
        self.media = (
            None
            if media is None
            else MediaWorkers(
                media,
                ledger,
                stats,
                image_workers=image_workers,
                video_workers=video_workers,
                ready=self.items.put,
                stopped=self._stop.is_set,
                failed=self._count_failure,
                send_ready="send" in self.roles,
            )
        )
        self.sender = Sender(
            registrar, ledger, stats, stop=self._stop, failed=self._count_failure, resolver=resolver
        )
        self.merge = (
            SyncMerge(
                cfg.sync.on_change, source, ledger, stats, self.planning.new_planner, self._route
            )
            if sync
            else None
        )
        stats.queues.update(items=self.items.qsize, batches=self.batches.qsize)

    def request_stop(self) -> None:
        """Graceful stop: no new listing, no new request or media job; requests and uploads
        already in flight finish. Items not started stay PLANNED in the ledger for next time."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def run(
        self,
        kind: str = "run",
        *,
        list_bucket: bool = True,
        objects: Sequence[ObjectInfo] | None = None,
    ) -> RunResult:
        """One pass: recovery of pending items, then the listing (``list_bucket``) or the given
        ``objects`` (from bucket events; known ones are not sent again)."""
        run = await self.ledger.start_run(kind, listing=list_bucket)
        result = RunResult(run_id=run.run_id)
        set_run_id(f"{self.ledger.job}#{run.run_id}")
        log.info(
            "run started",
            extra={"kind": kind, "run": run.run_id, "resume_listing": run.resume_listing},
        )
        before = self.counts()  # Stats may be shared by many passes (the worker's)
        status = "failed"
        try:
            await self._run_stages(run.resume_listing, list_bucket, objects)
            result.stopped_early = self._stop.is_set()
            if list_bucket and not result.stopped_early:
                completed = await self.ledger.mark_listing_complete()
                if self.cooperative and completed and self.merge is not None:
                    # Once, by the process that completed the listing, from every process's
                    # shards: one process's own discovery may have missed a folder.
                    await self.merge.sweep_vanished_folders([_shard_of(s) for s in completed])
            status = "interrupted" if result.stopped_early else "completed"
            result.warnings = [] if result.stopped_early else list(self.warnings)
        except asyncio.CancelledError:
            status = "interrupted"
            raise
        finally:
            # The queues end holding end-of-stream markers, not work: idle reads 0.
            self.stats.queues.update(dict.fromkeys(self.stats.queues, _empty))
            result.counts = {k: v - before.get(k, 0) for k, v in self.counts().items()}
            with contextlib.suppress(Exception):  # never mask the error that ended the pass
                await asyncio.shield(self.ledger.finish_run(run.run_id, status, result.counts))
            if self.cooperative:  # what this pass left, others (or our next pass) may take
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.ledger.release_claims())
        return result

    def counts(self) -> dict[str, int]:
        s = self.stats
        return {
            "listed": s.listed,
            "planned": s.planned,
            "skipped": s.skipped,
            "registered": s.registered,
            "blocked": s.blocked,
            "failed": s.failed,
            "requests": s.requests,
            "rate_limited": s.rate_limited,
        }

    async def _run_stages(
        self, resume_listing: bool, list_bucket: bool, objects: Sequence[ObjectInfo] | None
    ) -> None:
        builder = BatchBuilder(
            self.cfg.batch.max_items, self.cfg.batch.max_bytes, self.cfg.batch.max_wait_s
        )
        async with asyncio.TaskGroup() as tg:
            helpers = [tg.create_task(b.run(), name=type(b).__name__) for b in self._background]
            tg.create_task(self._feed(resume_listing, list_bucket, objects, tg), name="produce")
            # Requests for the two register endpoints never mix in one batch.
            tg.create_task(self._batch(builder), name="batcher")
            senders = [
                tg.create_task(self.sender.loop(self.batches), name=f"sender-{i}")
                for i in range(self.cfg.rate.max_in_flight)
            ]
            await asyncio.gather(*senders)
            for b in self._background:
                await b.close()
            await asyncio.gather(*helpers)

    async def _batch(self, builder: BatchBuilder) -> None:
        await run_batcher(
            self.items, self.batches, builder, self._clock, split=lambda i: i.readonly_endpoint
        )
        await self.batches.put(None)  # the senders stop when they see it

    async def _feed(
        self,
        resume_listing: bool,
        list_bucket: bool,
        objects: Sequence[ObjectInfo] | None,
        tg: asyncio.TaskGroup,
    ) -> None:
        """Recovery and listing, then the media workers drain, then the batcher is told."""
        workers = self.media.start(tg) if self.media is not None else []
        # On an error or a cancellation this raises and the TaskGroup cancels every other
        # stage: nothing to drain, and a put into a full queue nobody reads would hang.
        await self._produce(resume_listing, list_bucket, objects)
        if self.media is not None:
            await self.media.close()
        await asyncio.gather(*workers)
        await self.items.put(None)  # the batcher flushes and tells the senders

    async def _produce(
        self, resume_listing: bool, list_bucket: bool, objects: Sequence[ObjectInfo] | None
    ) -> None:
        if self._resolver is not None:  # ids still unknown from earlier runs
            self._resolver.add(await self.ledger.registered_without_id(RESOLVE_AT_START))
        self.stats.listing = True  # the progress display's total grows until this ends
        try:
            await self._recover()
            if objects is not None and not self._stop.is_set():
                await self._plan_events(list(objects))
            if list_bucket and not self._stop.is_set():
                await self._list_and_plan(resume_listing)
        finally:
            self.stats.listing = False
        if self.cooperative:
            await self._take_over_left_work(list_bucket)

    async def _recover(self) -> None:
        """Items left PLANNED, PROCESSING or SENT by an interrupted run (cooperative: not
        claimed by a live process; those returned are now ours)."""
        if self.cooperative:
            await self.ledger.reap_claims(self._holder_dead)
        async with contextlib.aclosing(self.ledger.pending()) as pending:
            async for p in pending:
                if self._stop.is_set():
                    return
                self.stats.recovered += 1
                await self._route(p.item)

    async def _take_over_left_work(self, list_bucket: bool) -> None:
        """Cooperative: until no work is outstanding, take over what other processes leave
        (their claims expired or were reaped) — the shards they listed, the items they
        held. Polls the ledger (the only shared state) at a bounded pace."""
        while not self._stop.is_set():
            if await self.ledger.outstanding() == 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), OUTSTANDING_POLL_S)
            if self._stop.is_set():
                return
            await self._recover()
            if list_bucket and "list" in self.roles and self._shards is not None:
                await self._list_claimed()

    async def _route(self, item: Item) -> None:
        """Items with media work go to the media workers first; the rest straight on."""
        if self._stop.is_set():
            return  # stays PLANNED in the ledger: the next run picks it up
        if self.cooperative and role_for(item) not in self.roles:
            return  # unclaimed in the ledger: a process with that role takes it
        if item.media is Media.NONE or self.dry_run:
            await self.items.put(item)
        elif self.media is None:
            reason = "needs media processing, which this run cannot do"
            await self.ledger.media_failed(item, reason, final=False)
            self._count_failure(reason)
        else:
            await self.media.put(item)

    def _count_failure(self, reason: str) -> None:
        self.stats.failed += 1
        count_reason(self.stats.failures_by_reason, reason.split(":")[0])

    async def _record(
        self,
        shard_id: str,
        checkpoint: str,
        done: bool,
        objects: Sequence[ObjectInfo],
        plans: Sequence[Item | Skip],
    ) -> None:
        try:
            new = await self.ledger.record_page(
                shard_id, checkpoint, done, objects, plans, collision
            )
        except ClaimLost as e:  # another process lists this shard now, from its checkpoint
            log.warning(str(e), extra={"shard": shard_id})
            self._lost_shards.add(shard_id)
            return
        self.stats.skipped += sum(1 for p in plans if isinstance(p, Skip))
        self.stats.planned += len(new)
        for item in new:
            await self._route(item)

    async def _list_and_plan(self, resume_listing: bool) -> None:
        cfg = self.cfg
        checkpoints = await self.ledger.checkpoints() if resume_listing else {}
        done = {sid for sid, (_cp, is_done) in checkpoints.items() if is_done}
        resume = {sid: cp for sid, (cp, _d) in checkpoints.items() if cp}
        manifest = cfg.plan.slots == "manifest"
        if manifest:
            n = await self.ledger.stage_manifest(read_manifest(cfg.plan.manifest))
            log.info("manifest staged", extra={"rows": n, "file": cfg.plan.manifest})
        shards = await discover_shards(self.source, cfg.source.prefix, cfg.source.fanout_depth)
        if self.cooperative:
            self._shards = shards
            await self.ledger.register_shards([s.id for s in shards])
            if "list" in self.roles:
                await self._list_claimed()
            if self._stop.is_set():
                return
        else:
            listing = iter_shard_pages(
                self.source, shards, resume, done, cfg.source.list_concurrency, PAGE_QUEUE_PAGES
            )
            async with contextlib.aclosing(listing) as pages:
                async for page in pages:
                    await self._plan_listed(page, resume.get(page.shard.id), manifest)
                    if self._stop.is_set():
                        return
        if self.merge is not None and not self.cooperative:  # cooperative: see run()
            await self.merge.sweep_vanished_folders(shards)
        if manifest:
            await self._plan_manifest()
        # A resumed listing lists only what was left; a cooperating process may list nothing
        # because the others took every shard.
        if not (resume or done or self.cooperative):
            warning = empty_listing_warning(
                cfg.source.prefix,
                cfg.source.include,
                cfg.source.exclude,
                listed=self._listed,
                planned_from=self.planning.seen,
                filtered=self.planning.filtered,
            )
            if warning:
                self.warnings.append(warning)

    async def _plan_listed(self, page: ShardPage, resume: str | None, manifest: bool) -> None:
        page, dropped = without_prefixes(page, self.ignore_prefixes)
        self.stats.artifacts_ignored += dropped
        self._listed += len(page.page.objects)
        if self.merge is not None:
            self.stats.listed += len(page.page.objects)
            page = await self.merge.page(page, resume)
        for sp in chunks(page, PLAN_CHUNK_OBJECTS):
            if sp.shard.id in self._lost_shards:
                return
            wanted = None
            if manifest:
                wanted = await self.ledger.in_manifest([o.key for o in sp.page.objects])
            plans, checkpoint = self.planning.plan_page(sp, wanted)
            if self.merge is None:
                self.stats.listed += len(sp.page.objects)
            await self._record(sp.shard.id, checkpoint, sp.last, sp.page.objects, plans)

    async def _list_claimed(self) -> None:
        """Cooperative listing: shards claimed one at a time from the ledger, each listed
        from its stored continuation (a crashed process's shard resumes where it stopped)."""
        manifest = self.cfg.plan.slots == "manifest"
        listing = iter_claimed_pages(
            self.source,
            self.ledger.claim_shard,
            self._lost_shards,
            self.cfg.source.list_concurrency,
            PAGE_QUEUE_PAGES,
        )
        async with contextlib.aclosing(listing) as pages:
            async for page, continuation in pages:
                if page.shard.id in self._lost_shards:
                    continue
                await self._plan_listed(page, continuation or None, manifest)
                if self._stop.is_set():
                    return

    async def _plan_events(self, objects: list[ObjectInfo]) -> None:
        """Objects reported by bucket events: planned and recorded like a listed page. A key
        the ledger already holds is not sent again (events are at-least-once)."""
        now, later, ignored = partition_events(
            objects, self.ignore_prefixes, self.planning.new_planner().grouped
        )
        self.stats.artifacts_ignored += ignored
        if later:
            self.stats.events_deferred += len(later)
            log.info(
                "events: files of multi-file items left to the next sync",
                extra={"count": len(later), "example": later[0].key},
            )
        sp = ShardPage(Shard(UNLISTED_SHARD, recursive=True), Page(now, [], ""), last=True)
        plans, _cp = self.planning.plan_page(sp)
        self.stats.listed += len(now)
        await self._record("events", "", False, now, plans)

    async def _plan_manifest(self) -> None:
        """After the listing: one item per manifest item, its keys checked against what was
        listed. Items already in the ledger are neither re-planned nor re-sent. Manifest items
        go in chunks: one lookup of their objects and one recorded page per chunk."""
        planner = self.planning.new_planner()
        chunk: list[ManifestItem] = []
        async with contextlib.aclosing(self.ledger.manifest_items()) as items:
            async for m in items:
                if self._stop.is_set():
                    return
                chunk.append(m)
                if len(chunk) >= MANIFEST_CHUNK_ITEMS:
                    await self._plan_manifest_chunk(planner, chunk)
                    chunk = []
        if chunk and not self._stop.is_set():
            await self._plan_manifest_chunk(planner, chunk)

    async def _plan_manifest_chunk(self, planner: ShardPlanner, chunk: list[ManifestItem]) -> None:
        infos = await self.ledger.object_infos([k for m in chunk for _s, k in m.slots])
        plans: list[Item | Skip] = []
        for m in chunk:
            objs = [(slot, infos.get(key), key) for slot, key in m.slots]
            plan, problem = plan_manifest_item(planner, m.name, m.path, objs)
            if not problem:
                plans.append(plan)
            elif self.dry_run:  # `ingest plan`: say it, count its objects as skipped
                log.warning(
                    "manifest item cannot be registered", extra={"item": m.name, "reason": problem}
                )
                self.stats.skipped += len(m.slots)
            elif await self.ledger.add_failed_item(plan, problem):
                self.stats.planned_failed += 1
                self._count_failure(problem)
        if plans:
            await self._record("manifest", "", False, [], plans)
