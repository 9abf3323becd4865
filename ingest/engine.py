"""Assembly: build the parts from a Config, run preflight, and hand back a ready pipeline.

The CLI, the worker and tests go through here so the wiring lives in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import random
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from ingest import USER_AGENT
from ingest.config import Config
from ingest.cpus import available_cpus
from ingest.errors import LeaseHeld, LedgerError, PreflightError
from ingest.ledger import LedgerPort, open_configured, open_ledger
from ingest.ledger.port import ROLES
from ingest.log import set_run_id
from ingest.manifest import check_manifest
from ingest.media.stage import DicomOptions, MediaStage, provider_artifact_prefix
from ingest.model import Item, ItemType, Media, ObjectInfo, Outcome, Slot, State
from ingest.planner import request_options, video_local
from ingest.preflight import Target, check_source, check_v7
from ingest.progress import run_progress
from ingest.providers import Source
from ingest.providers.factory import open_bucket, open_source
from ingest.registrar import wire
from ingest.registrar.budget import SendBudget
from ingest.registrar.client import V7Client
from ingest.registrar.faults import FaultLog
from ingest.registrar.lookup import IdResolver, client_finder, limiter_slot
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.registrar import Registrar, Sending
from ingest.registrar.retry import RetryPolicy
from ingest.registrar.shared_rate import budget_key, budget_url
from ingest.run.lifecycle import Lifecycle
from ingest.run.pipeline import Pipeline, RunResult, cooperates
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


def make_limiter(cfg: Config) -> Limiter:
    """The local (one-process) rate budget."""
    controller = RateController(
        rate_per_s=cfg.rate.requests_per_s,
        burst=cfg.rate.burst,
        min_rate_per_s=cfg.rate.min_requests_per_s,
        adaptive=cfg.rate.adaptive,
    )
    return Limiter(controller, cfg.rate.max_in_flight)


def ledger_url(cfg: Config) -> str:
    """The ledger's location as a URL when it has one (a PostgreSQL ledger), else its path
    (``INGEST_LEDGER`` is already folded into ``ledger.url`` by the config)."""
    return cfg.ledger.url or cfg.ledger.path


@contextlib.asynccontextmanager
async def open_send_budget(cfg: Config) -> AsyncIterator[SendBudget]:
    """The rate budget every send draws from: shared by every process on the V7 key when a
    PostgreSQL URL is known (``rate.shared``), else this process's own."""
    try:
        url = budget_url(cfg.rate.shared, cfg.rate.shared_url, ledger_url(cfg))
    except ValueError as e:
        raise PreflightError(str(e)) from None
    if url is None:
        yield make_limiter(cfg)
        return
    from ingest.registrar.shared_rate import open_budget

    key_id = budget_key(cfg.base_url, cfg.api_key)
    async with open_budget(
        url, key_id, cfg.rate, max_connections=cfg.rate.shared_connections
    ) as shared:
        log.info("rate budget shared through PostgreSQL", extra={"budget": key_id})
        yield shared


def make_registrar(
    cfg: Config,
    client: V7Client,
    target: Target,
    stats: Stats,
    keys: wire.KeyMap,
    limiter: SendBudget | None = None,
) -> Registrar:
    return Registrar(
        client,
        limiter or make_limiter(cfg),
        RetryPolicy(cfg.rate.retry_base_s, cfg.rate.retry_cap_s, cfg.rate.retry_max_total_s),
        stats,
        target=wire_target(cfg, target),
        keys=keys,
        readonly=target.readonly,
        rng=random.Random(),
    )


@contextlib.asynccontextmanager
async def hold_lease(
    ledger: LedgerPort,
    ttl_s: float,
    on_lost: Callable[[], None],
    roles: frozenset[str] = ROLES,
    *,
    alone: bool = False,
) -> AsyncIterator[str]:
    """One writer per job: take the ledger's lease or refuse; renew it every ttl/3 while we
    live; a holder killed -9 stops blocking others once its lease expires.

    A cooperative ledger (PostgreSQL) has no such lease unless ``alone``: the process joins the
    job beside the others (``roles``), its claims are renewed every ttl/3 and given back at
    the end."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}:{_pid_space()}"
    _HOLDERS_HERE.add(holder)
    try:
        if ledger.cooperative and not alone:
            async with _hold_claims(ledger, holder, ttl_s, roles) as joined:
                yield joined
            return
        async with _hold_job_lease(ledger, holder, ttl_s, on_lost) as held:
            yield held
    finally:
        _HOLDERS_HERE.discard(holder)


@contextlib.asynccontextmanager
async def _hold_job_lease(
    ledger: LedgerPort, holder: str, ttl_s: float, on_lost: Callable[[], None]
) -> AsyncIterator[str]:
    """The job's single lease (SQLite, or a process that holds the job alone)."""
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


@contextlib.asynccontextmanager
async def _hold_claims(
    ledger: LedgerPort, holder: str, ttl_s: float, roles: frozenset[str]
) -> AsyncIterator[str]:
    """Join the job (a fencing token of our own) and renew our claims every ttl/3. A renewal
    that comes too late (we were paused) is harmless: what others took over meanwhile is no
    longer ours, and our writes to it are refused (``ClaimLost``)."""
    await ledger.join(holder, ttl_s, roles)

    async def renew() -> None:
        while True:
            await asyncio.sleep(ttl_s / 3)
            try:
                await ledger.renew_claims()
            except LedgerError as e:
                log.warning("could not renew our claims; trying again", extra={"error": e})

    task = asyncio.create_task(renew(), name="claims")
    try:
        yield holder
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        try:
            await ledger.release_claims()
        except LedgerError as e:  # they expire by themselves after ledger.lease_ttl_s
            log.warning("could not give our claims back", extra={"error": e})


def _pid_space() -> str:
    """This boot and PID namespace: two containers can share a hostname (host networking) but
    not a PID namespace, so a pid is only compared with pids of the same space."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        return f"{boot}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return "unknown"


# The holders (leases, claims) of the engines alive in this process: one process may run
# several engines, which must never reap each other.
_HOLDERS_HERE: set[str] = set()


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
    if int(pid) == os.getpid():
        # Our own pid: another engine of this very process (its random part is one of ours,
        # alive), or an earlier life of this process slot (a container's pid 1).
        return holder not in _HOLDERS_HERE
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


async def end_progress(progress: asyncio.Task[None]) -> None:
    """Stop the display and wait for its last frame. Whatever ended it early (a write error,
    a bug) is logged once and goes no further: the display must never replace the run's
    result."""
    progress.cancel()
    try:
        await progress
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # we are being cancelled ourselves (a forced stop): let it through
    except Exception as e:
        log.warning("progress display failed; the run is unaffected", extra={"error": repr(e)})


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
        under_lease: Callable[[LedgerPort], Awaitable[bool]] | None = None,
    ) -> RunResult | None:
        """One CLI pass with a lease, a progress display and signal handling. ``under_lease``
        changes the ledger once the lease is ours (``ingest retry`` re-queueing FAILED items
        must not write to a ledger that a worker holds); when it returns False there is
        nothing to do: no pass, no run record, None. The display starts once the lease is
        held and the signal handlers are in place, and ends before they go: a busy job or a
        no-op retry draws nothing, and a signal never leaves the terminal without a cursor."""
        roles = frozenset(self.cfg.worker.roles)
        alone = not cooperates(self.cfg, self.ledger)
        ttl = self.cfg.ledger.lease_ttl_s
        async with hold_lease(self.ledger, ttl, self._lost, roles, alone=alone):
            if under_lease is not None and not await under_lease(self.ledger):
                return None
            return await Lifecycle(self.request_stop).run(
                self._shown(self.pass_(kind, list_bucket=list_bucket))
            )

    async def _shown(self, aw: Awaitable[RunResult]) -> RunResult:
        """``aw`` with the progress display (when configured) running beside it."""
        if not self.cfg.output.progress:
            return await aw
        progress = asyncio.create_task(
            run_progress(self.stats, interval_s=self.cfg.output.progress_interval_s)
        )
        try:
            return await aw
        finally:
            await end_progress(progress)

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
    if cfg.plan.slots == "manifest":
        check_manifest(cfg.plan.manifest)  # a local file: before anything is opened
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
            limiter = await stack.enter_async_context(open_send_budget(cfg))
            registrar = make_registrar(cfg, client, target, stats, keys, limiter)
            ledger = await stack.enter_async_context(open_configured(cfg.ledger, cfg.job))
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
                    holder_dead=_dead_here,
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
    """Videos cut at once: configured, or half the usable CPUs (each uses several threads)."""
    return cfg.media.video_workers or max(1, available_cpus() // 2)


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
        threads = m.video_threads_per_worker or max(1, available_cpus() // workers)
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
        dicom=DicomOptions(m.dicom_fps, cfg.plan.ignore_dicom_layout) if target.readonly else None,
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
        self.dicom_layout: Callable[[Slot], dict[str, object]] | None = None

    def _pending(self, item: Item) -> dict[str, object]:
        entry: dict[str, object] = {"path": item.path, "name": item.name, "media": str(item.media)}
        layout = self.dicom_layout
        if layout is not None and item.media is Media.DICOM:
            entry["converted"] = [layout(s) for s in item.slots if s.type is ItemType.DICOM]
        return entry

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
        pending = [self._pending(i) for i in batch if i.media]
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
    storage: dict[str, Any] = {}
    if cfg.api_key:
        client = make_client(cfg)
        try:
            found = await check_v7(cfg, client)
            team, readonly, storage = found.team, found.readonly, found.storage
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
            keys = wire.KeyMap(source.storage_key(""))
            dry = DryRun(out, team, target, keys, done)
            if readonly:
                prefix = provider_artifact_prefix(
                    cfg.media.artifact_prefix, storage, cfg.bucket_source.provider
                )
                dry.dicom_layout = functools.partial(
                    dicom_plan, prefix=prefix, storage_name=cfg.v7.storage, keys=keys
                )
            # Order is all that matters in a dry run: batches fill by count and bytes only.
            cfg = dataclasses.replace(cfg, batch=dataclasses.replace(cfg.batch, max_wait_s=3600.0))
            pipeline = Pipeline(cfg, source, scratch, dry, stats, readonly=readonly, dry_run=True)
            result = await pipeline.run("plan")
            for warning in result.warnings:
                log.warning(warning)
    return dry.requests, dry.items, stats.skipped


def dicom_plan(
    slot: Slot, *, prefix: str, storage_name: str, keys: wire.KeyMap
) -> dict[str, object]:
    """What `ingest plan` shows for a read-only DICOM slot: the storage keys its conversion
    will have (known from the keys alone; whether one file is multi-frame needs its header,
    so both are shown for one file)."""
    from ingest.media.convert import layout

    k = layout(slot, prefix, storage_name)
    video = {
        "as": "video",
        "storage_key": keys.to_storage(f"{k.video_prefix}/{k.video_name}"),
        "artifacts_prefix": keys.to_storage(k.video_prefix),
    }
    entry: dict[str, object] = {"slot_name": slot.name, "objects": len(slot.objects)}
    if len(slot.objects) > 1:
        return {**entry, **video, "sections": "one per slice, in V7's DICOM order"}
    image = {
        "as": "image",
        "storage_key": keys.to_storage(k.png),
        "storage_thumbnail_key": keys.to_storage(k.thumbnail),
    }
    return {**entry, **image, "if_multi_frame": video}
