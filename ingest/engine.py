"""Assembly: build the parts from a Config, run preflight, and hand back a ready pipeline.

The CLI, the worker and tests go through here so the wiring lives in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import orjson

from ingest import USER_AGENT
from ingest.batch import BatchBuilder
from ingest.config import Config
from ingest.errors import LeaseHeld, PreflightError
from ingest.ledger import Ledger
from ingest.log import set_run_id
from ingest.manifest import read_manifest
from ingest.media.stage import MediaStage, provider_artifact_prefix
from ingest.model import ItemPlan, ObjectInfo, Skip, State
from ingest.pipeline import Pipeline, Planning, RunResult, with_signals
from ingest.planner import plan_manifest_item, request_options, video_local
from ingest.preflight import Target, check_source, check_v7
from ingest.progress import run_progress
from ingest.registrar.client import V7Client
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.registrar import Registrar
from ingest.registrar.retry import RetryPolicy
from ingest.sources import Source
from ingest.sources.factory import open_bucket, open_source
from ingest.sources.fanout import discover_shards, iter_shard_pages
from ingest.stats import Stats

log = logging.getLogger("ingest.engine")


def make_client(cfg: Config) -> V7Client:
    return V7Client(
        cfg.base_url,
        cfg.api_key,
        connect_timeout_s=cfg.v7.connect_timeout_s,
        request_timeout_s=cfg.v7.request_timeout_s,
        user_agent=USER_AGENT,
        max_connections=cfg.rate.max_in_flight + 2,
    )


def make_registrar(cfg: Config, client: V7Client, target: Target, stats: Stats) -> Registrar:
    controller = RateController(
        rate_per_s=cfg.rate.requests_per_s,
        burst=cfg.rate.burst,
        min_rate_per_s=cfg.rate.min_requests_per_s,
        adaptive=cfg.rate.adaptive,
    )
    return Registrar(
        client,
        Limiter(controller, cfg.rate.max_in_flight),
        RetryPolicy(cfg.rate.retry_base_s, cfg.rate.retry_cap_s, cfg.rate.retry_max_total_s),
        stats,
        team=target.team,
        dataset_slug=target.dataset_slug,
        storage_slug=target.storage_name,
        readonly=target.readonly,
        options=request_options(cfg.plan),
        rng=random.Random(),
    )


@contextlib.asynccontextmanager
async def hold_lease(
    ledger: Ledger, ttl_s: float, on_lost: Callable[[], None]
) -> AsyncIterator[str]:
    """One writer per job: take the ledger's lease or refuse; renew it every ttl/3 while we
    live; a holder killed -9 stops blocking others once its lease expires."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}:{_pid_space()}"
    other = ledger.acquire_lease(holder, ttl_s, time.time(), holder_dead=_dead_here)
    if other is not None:
        left = max(0.0, other.expires_at - time.time())
        raise LeaseHeld(
            f"job {ledger.job!r} is already running ({other.holder}; its lease ends in "
            f"{left:.0f} s unless renewed): wait for it, or stop it first"
        )

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                ok = ledger.renew_lease(holder, ttl_s, time.time())
            except sqlite3.Error as e:  # e.g. locked by another writer past busy_timeout
                log.warning("could not renew the ledger lease; trying again", extra={"error": e})
                continue  # two more tries before the lease can expire
            if not ok:
                log.error("lost the ledger lease (stalled longer than ledger.lease_ttl_s?)")
                on_lost()
                return

    task = asyncio.create_task(renew(), name="lease")
    try:
        yield holder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            ledger.release_lease(holder)
        except sqlite3.Error as e:  # it expires by itself after ledger.lease_ttl_s
            log.warning("could not release the ledger lease", extra={"error": e})


def _pid_space() -> str:
    """This boot and PID namespace: two containers can share a hostname (host networking) but
    not a PID namespace, so a pid is only compared with pids of the same space."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        return f"{boot}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "unknown"


def _dead_here(holder: str) -> bool:
    """A lease holder in this very PID namespace whose process is gone (killed -9, OOM): no
    need to wait for its lease to expire. Anywhere else: wait for it."""
    parts = holder.split(":")
    if len(parts) != 4:
        return False
    host, pid, _token, space = parts
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if space == "unknown" or space != _pid_space():
        return False
    if int(pid) == os.getpid():  # an earlier life of this very process slot (a container's pid 1)
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Engine:
    cfg: Config
    source: Source
    ledger: Ledger
    target: Target
    stats: Stats
    new_pipeline: Callable[[bool], Pipeline]  # sync? -> a fresh single-pass pipeline
    current: Pipeline | None = None

    def request_stop(self) -> None:
        """Graceful stop of the pass in progress (if any)."""
        if self.current is not None:
            self.current.request_stop()

    async def run(
        self,
        kind: str = "run",
        *,
        list_bucket: bool = True,
        under_lease: Callable[[Ledger], None] | None = None,
    ) -> RunResult:
        """One CLI pass with a lease, a progress line and signal handling. ``under_lease``
        changes the ledger once the lease is ours (``ingest retry`` re-queueing FAILED items
        must not write to a ledger that a worker holds)."""
        progress = None
        if self.cfg.output.progress:
            progress = asyncio.create_task(run_progress(self.stats))
        task = asyncio.current_task()

        def abort() -> None:
            log.error("second signal: stopping now; run again to resume")
            if task is not None:
                task.cancel()

        try:
            async with hold_lease(self.ledger, self.cfg.ledger.lease_ttl_s, self.request_stop):
                if under_lease is not None:
                    under_lease(self.ledger)
                result: RunResult = await with_signals(
                    self.pass_(kind, list_bucket=list_bucket), self.request_stop, abort
                )
            return result
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress

    async def pass_(
        self,
        kind: str,
        *,
        list_bucket: bool = True,
        objects: Sequence[ObjectInfo] | None = None,
    ) -> RunResult:
        """One pass of a fresh pipeline (the caller holds the lease): `run`/`retry`, a `sync`
        (listing merged with the ledger), or an events pass over ``objects``."""
        self.current = self.new_pipeline(kind == "sync")
        try:
            return await self.current.run(kind, list_bucket=list_bucket, objects=objects)
        finally:
            self.current = None


@contextlib.asynccontextmanager
async def open_engine(cfg: Config, stats: Stats | None = None) -> AsyncIterator[Engine]:
    """Preflight (V7, then the bucket) and build every part. Raises PreflightError first."""
    client = make_client(cfg)
    try:
        target = await check_v7(cfg, client)
        await check_media(cfg, target.readonly)
        async with open_source(cfg) as source, contextlib.AsyncExitStack() as stack:
            await check_source(source)
            destination = None
            if cfg.source.provider == "local":
                destination = await stack.enter_async_context(open_bucket(cfg.upload))
                await check_source(destination)
            stats = stats or Stats()
            registrar = make_registrar(cfg, client, target, stats)
            ledger = stack.enter_context(Ledger(cfg.ledger.path, cfg.job))
            media = await open_media(cfg, target, source, ledger, stack, destination)
            ignore = artifact_prefixes(cfg, target, media)

            def new_pipeline(sync: bool) -> Pipeline:
                return Pipeline(
                    cfg,
                    source,
                    ledger,
                    registrar,
                    stats,
                    readonly=target.readonly,
                    media=media,
                    image_workers=cfg.media.thumbnail_concurrency,
                    video_workers=video_workers(cfg),
                    ignore_prefixes=ignore,
                    sync=sync,
                )

            set_run_id(cfg.job)
            yield Engine(cfg, source, ledger, target, stats, new_pipeline)
    finally:
        await client.close()


def artifact_prefixes(cfg: Config, target: Target, media: MediaStage | None) -> list[str]:
    """Bucket prefixes the listing ignores: where V7 writes its own thumbnails (the storage
    configuration's prefix) and where we write ours and the video artifacts."""
    found = set()
    if str(target.storage.get("prefix") or "").strip("/"):
        found.add(provider_artifact_prefix("", target.storage, cfg.bucket_source.provider))
    if media is not None:
        found.add(media.prefix)
    return sorted(found)


def video_workers(cfg: Config) -> int:
    """ffmpeg processes at once: configured, or half the cores (each uses several threads)."""
    return cfg.media.video_workers or max(1, (os.cpu_count() or 2) // 2)


async def check_media(cfg: Config, readonly: bool) -> None:
    """Preflight for media work: the mode is consistent and ffmpeg is there when needed."""
    if readonly and cfg.media.video_processing == "server":
        raise PreflightError(
            "the storage configuration is read-only, so videos must be processed locally: "
            'set media.video_processing = "local" (or "auto")'
        )
    if video_local(cfg, readonly):
        from ingest.media.video import check_ffmpeg

        await check_ffmpeg()


async def open_media(
    cfg: Config,
    target: Target,
    source: Source,
    ledger: Ledger,
    stack: contextlib.AsyncExitStack,
    destination: Source | None = None,
) -> MediaStage | None:
    """The media stage when this run needs one (read-only storage, local video, local files)."""
    vlocal = video_local(cfg, target.readonly)
    if not (target.readonly or vlocal or destination is not None):
        return None
    m = cfg.media
    thumbnails = None
    if target.readonly:
        from ingest.media.thumbnail import ThumbnailPool

        thumbnails = await stack.enter_async_context(
            ThumbnailPool(
                workers=m.thumbnail_workers,
                max_pending=m.thumbnail_concurrency,
                max_pixels=m.max_image_pixels,
            )
        )
    videos = None
    options = None
    if vlocal:
        from ingest.media.video import VideoOptions, VideoPool

        workers = video_workers(cfg)
        threads = m.video_threads_per_worker or max(1, (os.cpu_count() or 2) // workers)
        videos = VideoPool(
            workers=workers,
            threads_per_worker=threads,
            time_limit_s=m.video_time_limit_s,
            upload_concurrency=m.upload_concurrency,
            temp_dir=Path(m.temp_dir) if m.temp_dir else None,
        )
        fps = 0.0 if cfg.plan.fps == "native" else float(cfg.plan.fps)
        options = VideoOptions(
            fps=fps,
            segment_length=m.segment_length_s,
            extract_preview_frames=m.extract_preview_frames,
            primary_frames_quality=m.primary_frames_quality,
        )
    prefix = provider_artifact_prefix(m.artifact_prefix, target.storage, cfg.bucket_source.provider)
    return MediaStage(
        source,
        ledger,
        artifact_prefix=prefix,
        storage_name=target.storage_name,
        thumbnails=thumbnails,
        videos=videos,
        video_options=options,
        max_image_bytes=m.max_image_bytes,
        temp_dir=Path(m.temp_dir) if m.temp_dir else None,
        destination=destination,
    )


async def plan_only(
    cfg: Config, out: IO[bytes], *, readonly_hint: bool = False, ledger: Ledger | None = None
) -> tuple[int, int, int]:
    """`ingest plan`: list and plan, write one JSONL line per request it would send.

    Sends nothing and writes nothing to the ledger. When V7 is reachable (a key is set) the
    team, storage mode and endpoint come from preflight; otherwise from the config.
    Returns (requests, items, skipped).
    """
    team, readonly = cfg.v7.team or "<team>", readonly_hint or cfg.v7.mode == "readonly"
    if cfg.api_key:
        client = make_client(cfg)
        try:
            target = await check_v7(cfg, client)
            team, readonly = target.team, target.readonly
        finally:
            await client.close()
    options = request_options(cfg.plan)
    done = ledger
    n_requests = n_items = n_skipped = 0

    def emit(batch: list[ItemPlan]) -> None:
        nonlocal n_requests, n_items
        ro = batch[0].readonly_endpoint
        body: dict[str, object] = {
            "items": [i.payload for i in batch],
            "dataset_slug": cfg.v7.dataset,
            "storage_slug": cfg.v7.storage,
        }
        if options:
            body["options"] = options
        line: dict[str, object] = {
            "endpoint": f"v2/teams/{team}/items/register_existing" + ("_readonly" if ro else ""),
            "body": body,
        }
        # Thumbnails, sizes and video artifacts are made by `run`, not by a dry run: say which
        # items would get them, so the payloads above are read as the planned skeleton.
        pending = [
            {"path": i.path, "name": i.name, "media": str(i.media)} for i in batch if i.media
        ]
        if pending:
            line["media_pending"] = pending
        out.write(orjson.dumps(line) + b"\n")
        n_requests += 1
        n_items += len(batch)

    builders = {
        ro: BatchBuilder(cfg.batch.max_items, cfg.batch.max_bytes, cfg.batch.max_wait_s)
        for ro in (False, True)
    }

    def add(p: ItemPlan) -> None:
        if done is not None and done.item_state(p.path, p.name) in (
            State.REGISTERED,
            State.BLOCKED,
        ):
            return
        # Order is all that matters in a dry run: no clock, no early flush.
        for batch in builders[p.readonly_endpoint].add(p, 0.0):
            emit(batch)

    manifest = cfg.plan.slots == "manifest"
    # Manifest mode needs the listing remembered: a throwaway ledger in memory, never the
    # user's file.
    scratch = Ledger(":memory:", cfg.job) if manifest else None
    try:
        async with open_source(cfg) as source:
            await check_source(source)
            if scratch is not None:
                scratch.stage_manifest(read_manifest(cfg.plan.manifest))
            planning = Planning(
                cfg, source, readonly, scratch.in_manifest if scratch is not None else None
            )
            shards = await discover_shards(source, cfg.source.prefix, cfg.source.fanout_depth)
            listing = iter_shard_pages(source, shards, {}, set(), cfg.source.list_concurrency)
            async with contextlib.aclosing(listing) as pages:
                async for sp in pages:
                    plans, _cp = planning.plan_page(sp)
                    if scratch is not None:
                        scratch.record_page(sp.shard.id, "", False, sp.page.objects, [])
                    for p in plans:
                        if isinstance(p, Skip):
                            n_skipped += 1
                        else:
                            add(p)
            if scratch is not None:
                planner = planning.new_planner()
                for name, rel_path, slots in scratch.iter_manifest_items():
                    objs = [(slot, scratch.object_info(key), key) for slot, key in slots]
                    plan, problem = plan_manifest_item(planner, name, rel_path, objs)
                    if problem:
                        n_skipped += len(slots)
                        log.warning(
                            "manifest item cannot be registered",
                            extra={"item": name, "reason": problem},
                        )
                    else:
                        add(plan)
    finally:
        if scratch is not None:
            scratch.close()
    for b in builders.values():
        rest = b.flush()
        if rest:
            emit(rest)
    return n_requests, n_items, n_skipped
