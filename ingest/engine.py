"""Assembly: build the parts from a Config, run preflight, and hand back a ready pipeline.

The CLI, the worker and tests go through here so the wiring lives in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import IO

import orjson

from ingest import USER_AGENT
from ingest.batch import BatchBuilder
from ingest.config import Config
from ingest.ledger import Ledger
from ingest.log import set_run_id
from ingest.model import ItemPlan, Skip, State
from ingest.pipeline import Pipeline, Planning, RunResult, with_signals
from ingest.planner import request_options
from ingest.preflight import Target, check_source, check_v7
from ingest.progress import run_progress
from ingest.registrar.client import V7Client
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.registrar import Registrar
from ingest.registrar.retry import RetryPolicy
from ingest.sources import Source
from ingest.sources.factory import open_source
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


@dataclass
class Engine:
    cfg: Config
    source: Source
    ledger: Ledger
    target: Target
    stats: Stats
    pipeline: Pipeline

    async def run(self, kind: str = "run", *, list_bucket: bool = True) -> RunResult:
        progress = None
        if self.cfg.output.progress:
            progress = asyncio.create_task(run_progress(self.stats))
        task = asyncio.current_task()

        def abort() -> None:
            log.error("second signal: stopping now; run again to resume")
            if task is not None:
                task.cancel()

        try:
            result: RunResult = await with_signals(
                self.pipeline.run(kind, list_bucket=list_bucket), self.pipeline.request_stop, abort
            )
            return result
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress


@contextlib.asynccontextmanager
async def open_engine(cfg: Config) -> AsyncIterator[Engine]:
    """Preflight (V7, then the bucket) and build every part. Raises PreflightError first."""
    client = make_client(cfg)
    try:
        target = await check_v7(cfg, client)
        async with open_source(cfg) as source:
            await check_source(source)
            stats = Stats()
            registrar = make_registrar(cfg, client, target, stats)
            with Ledger(cfg.ledger.path, cfg.job) as ledger:
                pipeline = Pipeline(cfg, source, ledger, registrar, stats, readonly=target.readonly)
                set_run_id(f"{cfg.job}")
                yield Engine(cfg, source, ledger, target, stats, pipeline)
    finally:
        await client.close()


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
    endpoint = f"v2/teams/{team}/items/register_existing" + ("_readonly" if readonly else "")
    options = request_options(cfg.plan)
    done = ledger
    n_requests = n_items = n_skipped = 0

    def emit(batch: list[ItemPlan]) -> None:
        nonlocal n_requests, n_items
        body: dict[str, object] = {
            "items": [i.payload for i in batch],
            "dataset_slug": cfg.v7.dataset,
            "storage_slug": cfg.v7.storage,
        }
        if options:
            body["options"] = options
        out.write(orjson.dumps({"endpoint": endpoint, "body": body}) + b"\n")
        n_requests += 1
        n_items += len(batch)

    builder = BatchBuilder(cfg.batch.max_items, cfg.batch.max_bytes, cfg.batch.max_wait_s)
    async with open_source(cfg) as source:
        await check_source(source)
        planning = Planning(cfg, source, readonly)
        shards = await discover_shards(source, cfg.source.prefix, cfg.source.fanout_depth)
        listing = iter_shard_pages(source, shards, {}, set(), cfg.source.list_concurrency)
        async with contextlib.aclosing(listing) as pages:
            async for sp in pages:
                plans, _cp = planning.plan_page(sp)
                for p in plans:
                    if isinstance(p, Skip):
                        n_skipped += 1
                        continue
                    if done is not None and done.item_state(p.path, p.name) in (
                        State.REGISTERED,
                        State.BLOCKED,
                    ):
                        continue
                    # Order is all that matters in a dry run: no clock, no early flush.
                    for batch in builder.add(p, 0.0):
                        emit(batch)
        rest = builder.flush()
        if rest:
            emit(rest)
    return n_requests, n_items, n_skipped
