"""Assembly: build the parts from a Config, run preflight, and hand back a ready pipeline.

The CLI, the worker and tests go through here so the wiring lives in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import random
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from ingest import USER_AGENT
from ingest.config import Config
from ingest.errors import LeaseHeld, LedgerError, PreflightError
from ingest.ledger import LedgerPort, open_ledger
from ingest.log import set_run_id
from ingest.media.stage import MediaStage, provider_artifact_prefix
from ingest.model import Item, ObjectInfo, Outcome, State
from ingest.planner import request_options, video_local
from ingest.preflight import Target, check_source, check_v7
from ingest.progress import run_progress
from ingest.providers import Source
from ingest.providers.factory import open_bucket, open_source
from ingest.registrar import wire
from ingest.registrar.client import V7Client
from ingest.registrar.faults import FaultLog
from ingest.registrar.lookup import IdResolver, client_finder, limiter_slot
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.registrar import Registrar, Sending
from ingest.registrar.retry import RetryPolicy
from ingest.run.lifecycle import Lifecycle
from ingest.run.pipeline import Pipeline, RunResult
from ingest.stats import Stats

log = logging.getLogger("ingest.engine")


def make_client(cfg: Config, stats: Stats | None = None) -> V7Client:
    return V7Client(
        cfg.base_url,
        cfg.api_key,
        connect_timeout_s=cfg.v7.connect_timeout_s,
        request_timeout_s=cfg.v7.request_timeout_s,
        user_agent=USER_AGENT,
        max_connections=cfg.rate.max_in_flight + 2,
        stats=stats,
    )


def wire_target(cfg: Config, target: Target) -> wire.Target:
    return wire.Target(
        target.team, target.dataset_slug, target.storage_name, request_options(cfg.plan)
    )


def make_registrar(
    cfg: Config, client: V7Client, target: Target, stats: Stats, keys: wire.KeyMap
) -> Registrar:
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
        target=wire_target(cfg, target),
        keys=keys,
        readonly=target.readonly,
        rng=random.Random(),
    )


@contextlib.asynccontextmanager
async def hold_lease(
    ledger: LedgerPort, ttl_s: float, on_lost: Callable[[], None]
) -> AsyncIterator[str]:
    """One writer per job: take the ledger's lease or refuse; renew it every ttl/3 while we
    live; a holder killed -9 stops blocking others once its lease expires."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}:{_pid_space()}"
    other = await ledger.acquire_lease(holder, ttl_s, time.time(), _dead_here)
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
                ok = await ledger.renew_lease(holder, ttl_s, time.time())
            except LedgerError as e:  # e.g. locked by another writer past busy_timeout
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
            await ledger.release_lease(holder)
        except LedgerError as e:  # it expires by itself after ledger.lease_ttl_s
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
    ledger: LedgerPort
    target: Target
    stats: Stats
    new_pipeline: Callable[[bool], Pipeline]  # sync? -> a fresh single-pass pipeline
    current: Pipeline | None = None
    lease_lost: bool = field(default=False)

    def request_stop(self) -> None:
        """Graceful stop of the pass in progress (if any)."""
        if self.current is not None:
            self.current.request_stop()

    def _lost(self) -> None:
        self.lease_lost = True
        self.request_stop()

    async def run(
        self,
        kind: str = "run",
        *,
        list_bucket: bool = True,
        under_lease: Callable[[LedgerPort], Any] | None = None,
    ) -> RunResult:
        """One CLI pass with a lease, a progress line and signal handling. ``under_lease``
        changes the ledger once the lease is ours (``ingest retry`` re-queueing FAILED items
        must not write to a ledger that a worker holds)."""
        progress = None
        if self.cfg.output.progress:
            progress = asyncio.create_task(run_progress(self.stats))
        try:
            async with hold_lease(self.ledger, self.cfg.ledger.lease_ttl_s, self._lost):
                if under_lease is not None:
                    await under_lease(self.ledger)
                return await Lifecycle(self.request_stop).run(
                    self.pass_(kind, list_bucket=list_bucket)
                )
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
    stats = stats or Stats()
    client = make_client(cfg, stats)
    try:
        target = await check_v7(cfg, client)
        await check_media(cfg, target.readonly)
        async with open_source(cfg) as source, contextlib.AsyncExitStack() as stack:
            await check_source(source)
            destination = None
            if cfg.source.provider == "local":
                destination = await stack.enter_async_context(open_bucket(cfg.upload))
                await check_source(destination)
            keys = wire.KeyMap((destination or source).storage_key(""))
            registrar = make_registrar(cfg, client, target, stats, keys)
            ledger = await stack.enter_async_context(open_ledger(cfg.ledger.path, cfg.job))
            media = await open_media(cfg, target, source, ledger, stack, destination)
            ignore = artifact_prefixes(cfg, target, media)

            def new_pipeline(sync: bool) -> Pipeline:
                stop = asyncio.Event()
                resolver = IdResolver(
                    client_finder(client, target.team, target.dataset_id),
                    ledger.set_v7_ids,
                    acquire_slot=limiter_slot(registrar.limiter, stop),
                    missed=ledger.note_id_misses,
                )
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
                    resolver=resolver,
                    background=(resolver, FaultLog(stats)),
                    stop=stop,
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
    """Videos cut at once: configured, or half the cores (each runs three ffmpeg processes)."""
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
    ledger: LedgerPort,
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
            x264_preset=m.video_x264_preset,
            png_compression_level=m.video_png_compression_level,
            split_encoders=m.video_split_encoders,
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


class DryRun:
    """The registrar of `ingest plan`: writes each request it would send as one JSONL line
    (built by the same wire edge as a run), sends nothing, and skips items the user's ledger
    already has as REGISTERED or BLOCKED."""

    def __init__(
        self,
        out: IO[bytes],
        team: str,
        target: wire.Target,
        keys: wire.KeyMap,
        done: LedgerPort | None,
    ) -> None:
        self.out = out
        self.team = team
        self.target = target
        self.keys = keys
        self.done = done
        self.requests = 0
        self.items = 0

    async def register(
        self,
        items: Sequence[Item],
        sending: Sending,
        *,
        readonly: bool | None = None,
        stop: asyncio.Event | None = None,
    ) -> list[Outcome]:
        batch = list(items)
        if self.done is not None:
            states = await self.done.item_states([i.ident for i in batch])
            finished = (State.REGISTERED, State.BLOCKED)
            batch = [i for i in batch if states.get(i.ident) not in finished]
        if not batch:
            return []
        line: dict[str, object] = {
            "endpoint": wire.endpoint(self.team, bool(readonly)),
            "body": wire.envelope(batch, self.target, self.keys),
        }
        # Thumbnails, sizes and video artifacts are made by `run`, not by a dry run: say which
        # items would get them, so the payloads above are read as the planned skeleton.
        pending = [
            {"path": i.path, "name": i.name, "media": str(i.media)} for i in batch if i.media
        ]
        if pending:
            line["media_pending"] = pending
        self.out.write(orjson.dumps(line) + b"\n")
        self.requests += 1
        self.items += len(batch)
        return []


async def plan_only(
    cfg: Config, out: IO[bytes], *, readonly_hint: bool = False, done: LedgerPort | None = None
) -> tuple[int, int, int]:
    """`ingest plan`: the run's own pipeline over a scratch ledger in memory, with a dry-run
    registrar that writes one JSONL line per request it would send. The user's ledger is only
    read (``done``). When V7 is reachable (a key is set) the team, storage mode and endpoint
    come from preflight; otherwise from the config. Returns (requests, items, skipped)."""
    team, readonly = cfg.v7.team or "<team>", readonly_hint or cfg.v7.mode == "readonly"
    if cfg.api_key:
        client = make_client(cfg)
        try:
            found = await check_v7(cfg, client)
            team, readonly = found.team, found.readonly
        finally:
            await client.close()
    target = wire.Target(team, cfg.v7.dataset, cfg.v7.storage, request_options(cfg.plan))
    stats = Stats()
    # The scratch ledger is a temporary file, not memory: a plan of 10M objects must not
    # hold them all in RAM.
    temp_root = cfg.media.temp_dir or None
    if temp_root:
        Path(temp_root).mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before work)
    with tempfile.TemporaryDirectory(prefix="ingest-plan-", dir=temp_root) as d:
        async with (
            open_source(cfg) as source,
            open_ledger(str(Path(d) / "plan.sqlite"), cfg.job) as scratch,
        ):
            await check_source(source)
            dry = DryRun(out, team, target, wire.KeyMap(source.storage_key("")), done)
            # Order is all that matters in a dry run: batches fill by count and bytes only.
            cfg = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, max_wait_s=3600.0))
            pipeline = Pipeline(cfg, source, scratch, dry, stats, readonly=readonly, dry_run=True)
            await pipeline.run("plan")
    return dry.requests, dry.items, stats.skipped
