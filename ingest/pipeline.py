"""The run: listing → planning → ledger → batching → registration, as bounded async stages.

Every arrow is a bounded asyncio.Queue, so the slowest stage sets the pace and memory stays flat
however many objects the bucket holds. The ledger is written from this one event loop only.

Exactly-once: a page's items and its listing checkpoint are committed in one transaction; an
item is marked SENT (committed) before its request goes out; on restart, PLANNED and SENT items
are re-queued first and the listing resumes from the last checkpoint. ``ALREADY_EXISTS`` for an
item we had sent before is success (the registrar decides that from the attempt count).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ingest.batch import BatchBuilder, run_batcher
from ingest.config import Config
from ingest.errors import Interrupted, SourceRetryable
from ingest.ledger import Known, Ledger
from ingest.log import set_run_id
from ingest.manifest import read_manifest
from ingest.media import MediaError
from ingest.model import ItemPlan, Media, ObjectInfo, Outcome, Skip, State
from ingest.planner import ShardPlanner, make_shard_planner, plan_manifest_item
from ingest.sources import Page, Shard, Source
from ingest.sources.fanout import ShardPage, discover_shards, iter_shard_pages
from ingest.sources.globs import compile_filter
from ingest.stats import Stats, count_reason
from ingest.sync import ShardMerge, as_new_version

log = logging.getLogger("ingest.pipeline")

ITEM_QUEUE_BATCHES = 4  # item queue holds this many batches' worth per in-flight request
PAGE_QUEUE_PAGES = 8
PLAN_CHUNK_OBJECTS = 200  # objects planned and recorded between yields to the loop


class Register(Protocol):
    async def register(
        self,
        items: Sequence[ItemPlan],
        sent_before: Iterable[tuple[str, str]],
        *,
        readonly: bool | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[Outcome]: ...


class Prepare(Protocol):
    """The media stage (ingest.media.stage.MediaStage): raises MediaError for a bad object."""

    async def prepare(self, item: ItemPlan) -> ItemPlan: ...


# Called with each planned page; returns the items to send now.
PageSink = Callable[[Shard, Page, bool, list[ItemPlan | Skip], str], list[ItemPlan]]


@dataclass
class RunResult:
    run_id: int = 0
    stopped_early: bool = False
    counts: dict[str, int] = field(default_factory=dict)


class Planning:
    """Filters and plans each shard's pages; one stateful planner per shard (held folders)."""

    def __init__(
        self,
        cfg: Config,
        source: Source,
        readonly: bool,
        in_manifest: Callable[[str], bool] | None = None,
    ) -> None:
        self._cfg = cfg
        self._source = source
        self._readonly = readonly
        self._filter = compile_filter(cfg.source.include, cfg.source.exclude)
        self._planners: dict[str, ShardPlanner] = {}
        # Manifest mode: listed keys named in the manifest wait for the manifest's items
        # (planned after the listing); every other key is skipped.
        self._in_manifest = in_manifest

    def new_planner(self) -> ShardPlanner:
        return make_shard_planner(self._cfg, self._source.storage_key, self._readonly)

    def plan_page(self, sp: ShardPage) -> tuple[list[ItemPlan | Skip], str]:
        """Plans for one page and the checkpoint that is safe to store after it ("" = keep the
        previous one: the planner still holds objects of an unfinished folder)."""
        planner = self._planners.get(sp.shard.id)
        if planner is None:
            planner = self.new_planner()
            self._planners[sp.shard.id] = planner
        kept: list[ObjectInfo] = []
        plans: list[ItemPlan | Skip] = []
        for obj in sp.page.objects:
            reason = self._filter(obj.key)
            if reason is None and self._in_manifest is not None:
                if self._in_manifest(obj.key):
                    continue
                reason = "not named in the manifest (plan.manifest)"
            if reason is None:
                kept.append(obj)
            else:
                plans.append(Skip(obj, reason))
        plans.extend(planner.feed(kept))
        if sp.last:
            plans.extend(planner.finish())
            del self._planners[sp.shard.id]
            return plans, sp.page.checkpoint
        return plans, (sp.page.checkpoint if not planner.holding else "")


def _chunks(sp: ShardPage, size: int) -> list[ShardPage]:
    """A page as consecutive pieces; only the last carries the checkpoint and ``last``, so a
    crash between pieces resumes from the previous page and re-plans idempotently."""
    objs = sp.page.objects
    if len(objs) <= size:
        return [sp]
    out = []
    for i in range(0, len(objs), size):
        final = i + size >= len(objs)
        page = Page(objs[i : i + size], [], sp.page.checkpoint if final else "")
        out.append(ShardPage(sp.shard, page, sp.last and final))
    return out


def _uses_readonly_endpoint(item: ItemPlan) -> bool:
    return item.readonly_endpoint


def _sent_before(attempts: dict[tuple[str, str], int]) -> set[tuple[str, str]]:
    return {k for k, n in attempts.items() if n > 1}


class Pipeline:
    """One `ingest run` (or `retry`): owns the queues and tasks of a single pass."""

    def __init__(
        self,
        cfg: Config,
        source: Source,
        ledger: Ledger,
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
    ) -> None:
        # sync: merge the listing with the ledger (only new objects are planned; changed and
        # vanished ones are recorded) instead of recording every listed object.
        self.sync = sync
        self.cfg = cfg
        self.source = source
        self.ledger = ledger
        self.registrar = registrar
        self.stats = stats
        self.readonly = readonly
        self._clock = clock or asyncio.get_event_loop().time
        n = cfg.rate.max_in_flight
        self.items: asyncio.Queue[ItemPlan | None] = asyncio.Queue(
            max(cfg.batch.max_items * n * ITEM_QUEUE_BATCHES, 64)
        )
        self.batches: asyncio.Queue[list[ItemPlan] | None] = asyncio.Queue(n)
        self._stop = asyncio.Event()
        # Where thumbnails and video artifacts are written (by us, or by V7 on read-write
        # storage): never registered, never recorded, or every run would find them anew.
        self.ignore_prefixes = tuple(p.rstrip("/") + "/" for p in ignore_prefixes if p.strip("/"))
        # Media work: its own bounded queues and workers, beside registration.
        self.media = media
        self._media_workers = {
            Media.IMAGE: max(1, image_workers),
            Media.VIDEO: max(1, video_workers),
        }
        self._media_queues: dict[Media, asyncio.Queue[ItemPlan | None]] = {
            kind: asyncio.Queue(2 * n_workers) for kind, n_workers in self._media_workers.items()
        }
        stats.queues.update(
            items=self.items.qsize,
            batches=self.batches.qsize,
            media_images=self._media_queues[Media.IMAGE].qsize,
            media_videos=self._media_queues[Media.VIDEO].qsize,
        )

    def request_stop(self) -> None:
        """Graceful stop: no new listing, no new request or media job; requests and uploads
        already in flight finish. Items not started stay PLANNED in the ledger for next time."""
        self._stop.set()

    async def run(
        self,
        kind: str = "run",
        *,
        list_bucket: bool = True,
        objects: Sequence[ObjectInfo] | None = None,
    ) -> RunResult:
        """One pass: recovery of pending items, then the listing (``list_bucket``) or the given
        ``objects`` (from bucket events; known ones are not sent again)."""
        run = self.ledger.start_run(kind, listing=list_bucket)
        result = RunResult(run_id=run.run_id)
        set_run_id(f"{self.ledger.job}#{run.run_id}")
        log.info(
            "run started",
            extra={"kind": kind, "run": run.run_id, "resume_listing": run.resume_listing},
        )
        self._objects = objects
        before = self.counts()  # Stats may be shared by many passes (the worker's)
        status = "failed"
        try:
            await self._run_stages(run.resume_listing, list_bucket)
            result.stopped_early = self._stop.is_set()
            if list_bucket and not result.stopped_early:
                self.ledger.mark_listing_complete()
            status = "interrupted" if result.stopped_early else "completed"
        except asyncio.CancelledError:
            status = "interrupted"
            raise
        finally:
            result.counts = {k: v - before.get(k, 0) for k, v in self.counts().items()}
            self.ledger.finish_run(run.run_id, status, result.counts)
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

    async def _run_stages(self, resume_listing: bool, list_bucket: bool) -> None:
        builder = BatchBuilder(
            self.cfg.batch.max_items, self.cfg.batch.max_bytes, self.cfg.batch.max_wait_s
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._feed(resume_listing, list_bucket, tg), name="produce")
            tg.create_task(self._batch(builder), name="batcher")
            senders = [
                tg.create_task(self._send_loop(), name=f"sender-{i}")
                for i in range(self.cfg.rate.max_in_flight)
            ]
            await asyncio.gather(*senders)

    async def _batch(self, builder: BatchBuilder) -> None:
        # Requests for the two register endpoints never mix in one batch.
        await run_batcher(
            self.items, self.batches, builder, self._clock, split=_uses_readonly_endpoint
        )
        await self.batches.put(None)  # the senders stop when they see it

    async def _feed(self, resume_listing: bool, list_bucket: bool, tg: asyncio.TaskGroup) -> None:
        """Listing and recovery, then the media workers drain, then the batcher is told."""
        workers = [
            tg.create_task(self._media_loop(kind), name=f"media-{kind}-{i}")
            for kind, n in self._media_workers.items()
            if self.media is not None
            for i in range(n)
        ]
        try:
            await self._produce(resume_listing, list_bucket)
        finally:
            for kind, n in self._media_workers.items():
                if self.media is not None:
                    for _ in range(n):
                        await self._media_queues[kind].put(None)
            await asyncio.gather(*workers, return_exceptions=True)
            # Always release the batcher, even when failing: the TaskGroup cancels the rest.
            await self.items.put(None)

    async def _produce(self, resume_listing: bool, list_bucket: bool) -> None:
        # Recovery first: items left PLANNED, PROCESSING or SENT by an interrupted run.
        for item, _attempts in self.ledger.pending_items():
            if self._stop.is_set():
                return
            await self._route(item)
        if self._objects is not None and not self._stop.is_set():
            await self._plan_objects(self._objects)
        if list_bucket and not self._stop.is_set():
            await self._list_and_plan(resume_listing)

    async def _route(self, item: ItemPlan) -> None:
        """Items with media work go to the media workers first; the rest straight on."""
        if self._stop.is_set():
            return  # stays PLANNED in the ledger: the next run picks it up
        if item.media is Media.NONE:
            await self.items.put(item)
        elif self.media is None:
            reason = "needs media processing, which this run cannot do"
            self.ledger.media_failed(item, reason)
            self._count_failure(reason)
        else:
            # Uploads of local files are I/O like thumbnails: same workers.
            kind = Media.VIDEO if item.media is Media.VIDEO else Media.IMAGE
            await self._media_queues[kind].put(item)

    async def _media_loop(self, kind: Media) -> None:
        assert self.media is not None
        queue = self._media_queues[kind]
        while (item := await queue.get()) is not None:
            if self._stop.is_set():
                continue  # not started: stays PLANNED for the next run
            self.ledger.mark_processing(item)
            self.stats.processing += 1
            try:
                ready = await self.media.prepare(item)
            except MediaError as e:
                self.ledger.media_failed(item, e.reason, final=e.final)
                self._count_failure(e.reason)
                continue
            except SourceRetryable as e:
                reason = f"storage error, retry later: {e}"
                self.ledger.media_failed(item, reason)
                self._count_failure(reason)
                continue
            except Exception as e:  # a bug must not sink the run: record it, go on
                log.exception("media processing failed", extra={"item": item.name})
                reason = f"internal error: {type(e).__name__}: {e}"[:300]
                self.ledger.media_failed(item, reason)
                self._count_failure(reason)
                continue
            finally:
                self.stats.processing -= 1
            self.ledger.media_done(ready)
            self.stats.media_done += 1
            await self.items.put(ready)

    def _count_failure(self, reason: str) -> None:
        self.stats.failed += 1
        count_reason(self.stats.failures_by_reason, reason.split(":")[0])

    async def _list_and_plan(self, resume_listing: bool) -> None:
        cfg = self.cfg
        checkpoints = self.ledger.checkpoints() if resume_listing else {}
        done = {sid for sid, (_cp, is_done) in checkpoints.items() if is_done}
        resume = {sid: cp for sid, (cp, _d) in checkpoints.items() if cp}
        manifest = cfg.plan.slots == "manifest"
        if manifest:
            n = self.ledger.stage_manifest(read_manifest(cfg.plan.manifest))
            log.info("manifest staged", extra={"rows": n, "file": cfg.plan.manifest})
        shards = await discover_shards(self.source, cfg.source.prefix, cfg.source.fanout_depth)
        planning = Planning(
            cfg, self.source, self.readonly, self.ledger.in_manifest if manifest else None
        )
        listing = iter_shard_pages(
            self.source, shards, resume, done, cfg.source.list_concurrency, PAGE_QUEUE_PAGES
        )
        merges: dict[str, ShardMerge] = {}
        async with contextlib.aclosing(listing) as pages:
            async for page in pages:
                if self.ignore_prefixes:
                    page = self._without_artifacts(page)
                if self.sync:
                    self.stats.listed += len(page.page.objects)
                    cp = resume.get(page.shard.id)
                    after = None if cp is None else self.source.checkpoint_key(cp)
                    page = await self._merge(page, merges, resume_after=after)
                for sp in _chunks(page, PLAN_CHUNK_OBJECTS):
                    plans, checkpoint = planning.plan_page(sp)
                    if not self.sync:
                        self.stats.listed += len(sp.page.objects)
                    new = self.ledger.record_page(
                        sp.shard.id, checkpoint, sp.last, sp.page.objects, plans
                    )
                    self.stats.skipped += sum(1 for p in plans if isinstance(p, Skip))
                    self.stats.planned += len(new)
                    for item in new:
                        await self._route(item)
                    # Let the senders' timers fire on time: a whole 1,000-key page planned
                    # and written in one go held the loop ~200 ms and bunched requests
                    # (burst-1 servers answer the second of a bunch with 429).
                    await asyncio.sleep(0)
                if self._stop.is_set():
                    return
        if self.sync:
            self._sweep_vanished_folders(shards)
        if manifest:
            await self._plan_manifest(planning.new_planner())

    # --- sync -----------------------------------------------------------------------------

    async def _merge(
        self, sp: ShardPage, merges: dict[str, ShardMerge], *, resume_after: str | None
    ) -> ShardPage:
        """Keep only the page's new objects; record what changed, came back or vanished."""
        merge = merges.get(sp.shard.id)
        if merge is None:
            shard = sp.shard

            def known_from(start: str) -> Iterator[Known]:
                return self.ledger.iter_known(shard.prefix, shard.recursive, start)

            merge = merges[sp.shard.id] = ShardMerge(
                known_from,
                self.ledger.known,
                resume_after=resume_after,
                flush_vanished=self._vanished,
            )
        diff = merge.page(sp.page.objects, sp.last)
        if sp.last:
            del merges[sp.shard.id]
        self._vanished(diff.vanished)
        register_again = self.cfg.sync.on_change == "register"
        reported = [] if register_again else diff.changed
        self.ledger.record_sync_page(
            reappeared=diff.reappeared, changed=[(o.key, o.etag) for o in reported]
        )
        self.stats.changed += len(diff.changed)
        if diff.changed or diff.reappeared:
            log.info(
                "sync: objects changed or back",
                extra={
                    "changed": len(diff.changed),
                    "reappeared": len(diff.reappeared),
                    "policy": self.cfg.sync.on_change,
                    "example": (diff.changed or [ObjectInfo(k, 0) for k in diff.reappeared])[0].key,
                },
            )
        if register_again:
            await self._register_new_versions(diff.changed)
        if len(diff.new) == len(sp.page.objects):
            return sp
        return ShardPage(sp.shard, Page(diff.new, [], sp.page.checkpoint), sp.last)

    def _report_changed(self, obj: ObjectInfo, why: str) -> None:
        self.ledger.record_sync_page(changed=[(obj.key, obj.etag)])
        log.warning(
            "changed object reported, not re-registered", extra={"key": obj.key, "why": why}
        )

    def _vanished(self, keys: list[str]) -> None:
        if keys:
            self.stats.vanished += self.ledger.record_sync_page(vanished=keys)

    def _sweep_vanished_folders(self, shards: Sequence[Shard]) -> None:
        """Folders the ledger knows that no shard listed any more: every key under them is
        gone (their keys were never merged, since discovery found no such folder)."""
        prefixes = [s.prefix for s in shards if s.recursive or s.prefix]
        for shard in shards:
            if shard.recursive:
                continue
            for folder in self.ledger.sub_folders(shard.prefix):
                if any(p.startswith(folder) for p in prefixes):
                    continue
                n = self.ledger.mark_vanished_under(folder)
                self.stats.vanished += n
                if n:
                    log.info("sync: folder vanished", extra={"folder": folder, "objects": n})

    async def _register_new_versions(self, changed: Sequence[ObjectInfo]) -> None:
        """sync.on_change = "register": each changed object becomes a new item named after its
        new version; the old item stays in V7."""
        for obj in changed:
            planner = make_shard_planner(self.cfg, self.source.storage_key, self.readonly)
            if planner.grouped(obj.key) or self.ledger.item_key_count(obj.key) > 1:
                # A slice of a DICOM series or a slot of a folder item: a lone new version
                # would be a one-slot item of its own, so it is only reported.
                self._report_changed(obj, "part of a multi-file item")
                continue
            plans = [*planner.feed([obj]), *planner.finish()]
            for p in plans:
                version = None if isinstance(p, Skip) else as_new_version(p, obj.etag)
                if version is None:
                    self._report_changed(obj, "part of a multi-file item or no longer planned")
                elif self.ledger.record_new_version(obj, version):
                    self.stats.planned += 1
                    await self._route(version)

    async def _plan_objects(self, objects: Sequence[ObjectInfo]) -> None:
        """Objects reported by bucket events: planned and recorded like a listed page. A key
        the ledger already holds is not sent again (events are at-least-once)."""
        objs = sorted(
            (o for o in objects if not o.key.startswith(self.ignore_prefixes)),
            key=lambda o: o.key,
        )
        self.stats.artifacts_ignored += len(objects) - len(objs)
        planning = Planning(self.cfg, self.source, self.readonly)
        # A file of a multi-file item (DICOM series, folder slots) is left to the scheduled
        # sync: events of one folder arrive over seconds, and an item planned from the first
        # few would register without the rest (V7 items do not take slots later).
        grouped = planning.new_planner().grouped
        now: list[ObjectInfo] = []
        later: list[ObjectInfo] = []
        for o in objs:
            (later if grouped(o.key) else now).append(o)
        objs = now
        if later:
            self.stats.events_deferred += len(later)
            log.info(
                "events: files of multi-file items left to the next sync",
                extra={"count": len(later), "example": later[0].key},
            )
        sp = ShardPage(Shard("events:", recursive=True), Page(objs, [], ""), last=True)
        plans, _cp = planning.plan_page(sp)
        self.stats.listed += len(objs)
        new = self.ledger.record_page("events", "", False, objs, plans)
        self.stats.skipped += sum(1 for p in plans if isinstance(p, Skip))
        self.stats.planned += len(new)
        for item in new:
            await self._route(item)

    def _without_artifacts(self, sp: ShardPage) -> ShardPage:
        kept = [o for o in sp.page.objects if not o.key.startswith(self.ignore_prefixes)]
        if len(kept) == len(sp.page.objects):
            return sp
        self.stats.artifacts_ignored += len(sp.page.objects) - len(kept)
        return ShardPage(sp.shard, Page(kept, sp.page.prefixes, sp.page.checkpoint), sp.last)

    async def _plan_manifest(self, planner: ShardPlanner) -> None:
        """After the listing: one item per manifest item, its keys checked against what was
        listed. Items already in the ledger are neither re-planned nor re-sent."""
        for item_name, rel_path, slots in self.ledger.iter_manifest_items():
            if self._stop.is_set():
                return
            objs = [(slot, self.ledger.object_info(key), key) for slot, key in slots]
            plan, problem = plan_manifest_item(planner, item_name, rel_path, objs)
            if problem:
                if self.ledger.add_failed_item(plan, problem):
                    self._count_failure(problem)
                continue
            for item in self.ledger.record_page("manifest", "", False, [], [plan]):
                self.stats.planned += 1
                await self._route(item)

    async def _send_loop(self) -> None:
        while (batch := await self.batches.get()) is not None:
            if not self._stop.is_set():  # after a stop: not sent, still PLANNED in the ledger
                await self._send(batch)
        # Let the other senders see the end too.
        await self.batches.put(None)

    async def _send(self, batch: list[ItemPlan]) -> None:
        attempts = self.ledger.mark_sent(batch)  # committed before the POST
        try:
            outcomes = await self.registrar.register(
                batch, _sent_before(attempts), readonly=batch[0].readonly_endpoint, stop=self._stop
            )
        except Interrupted as e:  # stays SENT: re-sent (and deduplicated) by the next run
            log.info("batch left for the next run", extra={"items": len(batch), "why": str(e)})
            return
        self.ledger.record_outcomes(outcomes)
        for o in outcomes:
            if o.state is State.REGISTERED:
                self.stats.registered += 1
            elif o.state is State.BLOCKED:
                self.stats.blocked += 1
                count_reason(self.stats.blocked_by_reason, o.reason)
            else:
                self._count_failure(o.reason)


async def with_signals(
    coro: Awaitable[Any], on_first: Callable[[], None], on_second: Callable[[], None]
) -> Any:
    """Run ``coro``; SIGINT/SIGTERM once → ``on_first`` (graceful), twice → ``on_second``."""
    import signal

    loop = asyncio.get_running_loop()
    seen = {"n": 0}

    def handler() -> None:
        seen["n"] += 1
        if seen["n"] == 1:
            log.warning("stop requested: finishing in-flight work (signal again to abort)")
            on_first()
        else:
            on_second()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        return await coro
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
