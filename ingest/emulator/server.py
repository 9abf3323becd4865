"""The emulator's HTTP side (aiohttp): auth, rate limiting, latency, faults, counters, admin API.

Admin endpoints (no auth), for tests and benchmarks:
  GET  /_emulator/state            counters and settings
  POST /_emulator/reset            forget items and counters
  POST /_emulator/config           change settings at run time: {"rate_per_s": 20, ...}
                                   (a new token bucket, full)
  POST /_emulator/rate             change the rate limit at run time, keeping the bucket's
                                   tokens: {"rate_per_s": 2, "burst"?: 1}; every change is
                                   listed in the state's "rate_changes" (time, rate)
  POST /_emulator/faults           queue faults for the next register requests:
                                   {"kind": "5xx"|"reset"|"stall"|"commit_then_fail"|"429",
                                    "count": N}
  POST /_emulator/datasets         {"slug": "...", "name"?: "..."}
  POST /_emulator/storage          {"name", "provider", "bucket", "prefix", "readonly", "default"}
                                   (at start: ``--storage name=…,provider=…,bucket=…,…``)
  GET  /_emulator/items?dataset=S  every item of a dataset (name, path, slots)

Items listing (``GET /api/v2/teams/{team}/items``), as darwin-py calls it
(``darwin/backend_v2.py: fetch_items``, ``darwin/dataset/remote_dataset_v2.py:
fetch_remote_files``): ``page[size]`` (capped at ``max_page_size``), ``page[from]`` (the
previous page's ``page.next``), ``dataset_ids[]``, and the filters ``item_names[]`` (item names,
repeated once per name; darwin-py's importer sends up to 100 per request) and
``item_paths[]`` (folder paths, repeated). The comma-separated ``item_names=a,b`` form that
darwin-py sends when given a string is accepted too. Filters are exact and case-sensitive;
the ``[]`` form carries names that contain commas. V7's semantics of ``item_paths[]`` are not
pinned down by darwin-py (it only passes the filter through): here it matches the item's folder
``path``, and clients should still check (path, name) of every row they get back.

``blocked_item_ids`` (off by default) puts the existing item's ``id`` into every
ALREADY_EXISTS entry of ``blocked_items``. V7's register_existing page shows blocked entries
without one; darwin-py's test fixtures for the register_upload sibling do carry it
(``ItemPayload.parse_v2`` reads ``id``). Off, the engine has to look ids up; on, it may take
them from the answer: both paths are testable.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import orjson
from aiohttp import web

from ingest.emulator import API_KEY
from ingest.emulator.store import Invalid, NotFound, StorageConfig, Store

FAULT_KINDS = ("5xx", "reset", "stall", "commit_then_fail", "429")


@dataclass
class EmulatorConfig:
    api_key: str = API_KEY
    team: str = "emulator-team"
    rate_per_s: float = 0.0  # register requests per second per key; 0 = unlimited
    burst: float = 1.0  # token bucket depth
    rate_all_endpoints: bool = False  # since 2025 V7 limits every endpoint; off by default
    retry_after: str = "ceil"  # "ceil" (integer seconds, as HTTP says), "exact", "none", or N
    latency_ms: float = 0.0  # added before every answer
    jitter_ms: float = 0.0  # uniform extra latency
    # Rate changes at run time, "T:RATE,T:RATE" (T = seconds after the first register
    # request, on the emulator's own clock): e.g. "10:2,20:20" cuts to 2 req/s for 10 s.
    rate_schedule: str = ""
    p_5xx: float = 0.0  # probabilities per register request
    p_reset: float = 0.0
    p_stall: float = 0.0
    p_commit_then_fail: float = 0.0
    stall_s: float = 30.0
    max_items_per_request: int = 500
    max_body_bytes: int = 5_000_000
    quota_exceeded: bool = False  # answer 429 INSUFFICIENT_REMAINING_STORAGE to registrations
    max_page_size: int = 500  # items per page of a listing, whatever page[size] asks for
    blocked_item_ids: bool = False  # ALREADY_EXISTS entries carry the existing item's "id"
    seed: int = 0


def parse_rate_schedule(text: str) -> list[tuple[float, float]]:
    """ "T:RATE,T:RATE" → [(T, RATE)] sorted by T; ValueError on anything else."""
    out: list[tuple[float, float]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        t, _, rate = part.partition(":")
        out.append((float(t), float(rate)))
        if out[-1][0] < 0 or out[-1][1] < 0:
            raise ValueError(f"rate schedule entry {part!r}: negative")
    return sorted(out)


class TokenBucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, max(burst, 1.0)
        self.tokens, self.at = self.burst, now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def set_rate(self, rate: float, now: float, burst: float | None = None) -> None:
        """From ``now`` on, ``rate`` (and ``burst``): tokens earned before it at the old rate
        are kept (up to the new depth), as a real limiter whose setting changes would."""
        if self.rate > 0:
            self._refill(now)
        else:
            self.tokens, self.at = self.burst, now
        self.rate = rate
        if burst is not None:
            self.burst = max(burst, 1.0)
        self.tokens = min(self.tokens, self.burst)

    def take(self, now: float) -> float:
        """0 when a token was taken, else seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class Emulator:
    def __init__(self, cfg: EmulatorConfig, store: Store | None = None) -> None:
        self.cfg = cfg
        self.store = store or Store.default()
        self.store.team = cfg.team
        self.store.max_items_per_request = cfg.max_items_per_request
        self.store.blocked_item_ids = cfg.blocked_item_ids
        self.rng = random.Random(cfg.seed)
        self.started = time.monotonic()
        self.fault_queue: collections.deque[str] = collections.deque()
        self.reset_counters()
        self.bucket = TokenBucket(cfg.rate_per_s, cfg.burst, time.monotonic())
        self.schedule = parse_rate_schedule(cfg.rate_schedule)
        self.first_register_at: float | None = None

    def reset_counters(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.blocked: collections.Counter[str] = collections.Counter()
        self.register_requests = 0
        # POSTs per item ("path/name") that reached the register handler (past the API key
        # and the rate limit), whatever came of them: shows an item sent by two processes.
        self.item_posts: collections.Counter[str] = collections.Counter()
        self.rate_limited = 0
        self.items_registered = 0
        self.items_received = 0
        self.timeline: collections.deque[tuple[float, int]] = collections.deque(maxlen=500_000)
        self.rate_changes: list[tuple[float, float]] = []

    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.cfg),
            "counters": {
                "register_requests": self.register_requests,
                "rate_limited": self.rate_limited,
                "items_registered": self.items_registered,
                "items_received": self.items_received,
                "items_stored": len(self.store.items),
                "items_blocked": dict(self.blocked),
                "faults": dict(self.faults),
                "requests": dict(self.requests),
                "item_posts": dict(self.item_posts),
            },
            "timeline": list(self.timeline),
            "rate_changes": list(self.rate_changes),
        }

    def set_rate(self, rate: float, now: float, burst: float | None = None) -> None:
        self.bucket.set_rate(rate, now, burst)
        self.cfg.rate_per_s = rate
        if burst is not None:
            self.cfg.burst = burst
        self.rate_changes.append((round(now - self.started, 4), rate))

    def _scheduled(self, now: float) -> None:
        """Apply the rate changes of the schedule that are due (each at its own time)."""
        if self.first_register_at is None:
            self.first_register_at = now
        while self.schedule and self.first_register_at + self.schedule[0][0] <= now:
            t, rate = self.schedule.pop(0)
            self.set_rate(rate, self.first_register_at + t)

    # --- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
        return web.Response(
            body=orjson.dumps(doc), status=status, headers=headers, content_type="application/json"
        )

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        field: str = "",
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        err: dict[str, Any] = {"code": code, "message": message}
        if field:
            err["field"] = field
        return self._json({"errors": err}, status, headers)

    def _retry_after(self, wait_s: float) -> dict[str, str]:
        mode = self.cfg.retry_after
        if mode == "none":
            return {}
        if mode == "ceil":
            return {"Retry-After": str(max(1, math.ceil(wait_s)))}
        if mode == "exact":
            return {"Retry-After": f"{wait_s:.3f}"}
        return {"Retry-After": mode}

    async def _latency(self) -> None:
        d = self.cfg.latency_ms + (
            self.rng.uniform(0, self.cfg.jitter_ms) if self.cfg.jitter_ms else 0
        )
        if d > 0:
            await asyncio.sleep(d / 1000)

    # --- middleware: auth, rate limit, latency, counters ------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/_emulator/"):
            return await handler(request)  # type: ignore[no-any-return]
        register = request.path.endswith(("/register_existing", "/register_existing_readonly"))
        label = request.path.rsplit("/", 1)[-1] if register else request.path
        now = time.monotonic()
        if register:
            self.register_requests += 1
            self._scheduled(now)
        resp: web.StreamResponse
        if request.headers.get("Authorization") != f"ApiKey {self.cfg.api_key}":
            resp = self._error(401, "UNAUTHORIZED", "invalid API key")
        elif (register or self.cfg.rate_all_endpoints) and (wait := self.bucket.take(now)) > 0:
            self.rate_limited += 1
            resp = self._error(
                429, "RATE_LIMITED", "rate limit exceeded", headers=self._retry_after(wait)
            )
        else:
            resp = await handler(request)
        await self._latency()
        self.requests[f"{request.method} {label} {resp.status}"] += 1
        if register:
            self.timeline.append((round(now - self.started, 4), resp.status))
        return resp

    # --- V7 endpoints ---------------------------------------------------------------------

    def _team_ok(self, request: web.Request) -> web.Response | None:
        if request.match_info["team"] != self.cfg.team:
            return self._error(404, "NOT_FOUND", f"team '{request.match_info['team']}' not found")
        return None

    async def token_info(self, request: web.Request) -> web.Response:
        return self._json(
            {
                "selected_team": {"slug": self.cfg.team},
                "user": {"id": 1, "email": "emulator@example.com"},
            }
        )

    async def datasets(self, request: web.Request) -> web.Response:
        return self._json([d.public() for d in self.store.datasets.values()])

    async def storage(self, request: web.Request) -> web.Response:
        if (bad := self._team_ok(request)) is not None:
            return bad
        return self._json([s.public() for s in self.store.storage.values()])

    async def register(self, request: web.Request) -> web.StreamResponse:
        if (bad := self._team_ok(request)) is not None:
            return bad
        readonly = request.path.endswith("_readonly")
        if request.content_length and request.content_length > self.cfg.max_body_bytes:
            return self._error(413, "PAYLOAD_TOO_LARGE", "request body too large")
        raw = await request.read()
        if len(raw) > self.cfg.max_body_bytes:
            return self._error(413, "PAYLOAD_TOO_LARGE", "request body too large")
        self._count_posts(raw)
        if self.cfg.quota_exceeded:
            return self._error(429, "INSUFFICIENT_REMAINING_STORAGE", "storage quota exceeded")
        fault = self._fault()
        if fault == "429":
            self.rate_limited += 1
            return self._error(
                429,
                "RATE_LIMITED",
                "rate limit exceeded",
                headers=self._retry_after(1.0 / max(self.cfg.rate_per_s, 1.0)),
            )
        if fault == "5xx":
            return self._error(self.rng.choice((500, 502, 503)), "SERVER_ERROR", "injected")
        if fault == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("injected reset")
        if fault == "stall":
            await asyncio.sleep(self.cfg.stall_s)
            return self._error(503, "SERVER_ERROR", "stalled")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._error(400, "BAD_REQUEST", "request body is not valid JSON")
        try:
            ds, items = self.store.check_envelope(body, readonly)
        except Invalid as e:
            return self._error(e.status, "VALIDATION_ERROR", e.message, e.field)
        except NotFound as e:
            return self._error(404, "NOT_FOUND", str(e))
        self.items_received += len(items)
        result = self.store.register(ds, items)
        self.items_registered += len(result["items"])
        for b in result["blocked_items"]:
            for s in b["slots"]:
                self.blocked[s["reason"]] += 1
        if fault == "commit_then_fail":
            return self._error(502, "BAD_GATEWAY", "injected failure after commit")
        return self._json(result)

    def _count_posts(self, raw: bytes) -> None:
        try:
            entries = orjson.loads(raw).get("items") or []
        except (orjson.JSONDecodeError, AttributeError):
            return
        for e in entries:
            if isinstance(e, dict) and isinstance(e.get("name"), str):
                path = e.get("path")
                folder = path.rstrip("/") if isinstance(path, str) else ""
                self.item_posts[f"{folder}/{e['name']}"] += 1

    def _fault(self) -> str | None:
        if self.fault_queue:
            kind = self.fault_queue.popleft()
        else:
            r = self.rng.random()
            kind = None
            for name, p in (
                ("5xx", self.cfg.p_5xx),
                ("reset", self.cfg.p_reset),
                ("stall", self.cfg.p_stall),
                ("commit_then_fail", self.cfg.p_commit_then_fail),
            ):
                if r < p:
                    kind = name
                    break
                r -= p
        if kind:
            self.faults[kind] += 1
        return kind

    async def list_items(self, request: web.Request) -> web.Response:
        if (bad := self._team_ok(request)) is not None:
            return bad
        q = request.query
        try:
            size = int(q.get("page[size]", "100"))
            start = int(q.get("page[from]", "0") or 0)
            ids = [int(v) for v in q.getall("dataset_ids[]", [])] or [
                d.id for d in self.store.datasets.values()
            ]
        except ValueError:
            return self._error(422, "VALIDATION_ERROR", "bad paging parameters", "page")
        if size < 1 or start < 0:
            return self._error(422, "VALIDATION_ERROR", "bad paging parameters", "page")
        if not ids or ids[0] not in self.store.order:
            return self._error(404, "NOT_FOUND", f"dataset {ids[0] if ids else ''} not found")
        names = q.getall("item_names[]", [])
        if "item_names" in q:  # darwin-py's string form: one comma-separated value
            names = [*names, *(n for v in q.getall("item_names") for n in v.split(",") if n)]
        paths = q.getall("item_paths[]", [])
        size = min(size, max(1, self.cfg.max_page_size))
        return self._json(self.store.list_items(ids[0], size, start, names=names, paths=paths))

    # --- admin ---------------------------------------------------------------------------

    async def admin_state(self, request: web.Request) -> web.Response:
        return self._json(self.state())

    async def admin_reset(self, request: web.Request) -> web.Response:
        self.store.clear_items()
        self.reset_counters()
        self.fault_queue.clear()
        return self._json({"ok": True})

    async def admin_config(self, request: web.Request) -> web.Response:
        patch = orjson.loads(await request.read() or b"{}")
        names = {f.name: f.type for f in fields(EmulatorConfig)}
        for k, v in patch.items():
            if k not in names:
                return self._error(422, "VALIDATION_ERROR", f"unknown setting {k!r}", k)
            setattr(self.cfg, k, v)
        self.bucket = TokenBucket(self.cfg.rate_per_s, self.cfg.burst, time.monotonic())
        if "rate_schedule" in patch:
            self.schedule = parse_rate_schedule(self.cfg.rate_schedule)
            self.first_register_at = None
        self.store.max_items_per_request = self.cfg.max_items_per_request
        self.store.blocked_item_ids = bool(self.cfg.blocked_item_ids)
        if "seed" in patch:
            self.rng = random.Random(self.cfg.seed)  # faults drawn from the new seed
        return self._json(asdict(self.cfg))

    async def admin_rate(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read() or b"{}")
        rate, burst = doc.get("rate_per_s"), doc.get("burst")
        ok = isinstance(rate, int | float) and rate >= 0
        if not ok or (burst is not None and not (isinstance(burst, int | float) and burst >= 1)):
            return self._error(
                422, "VALIDATION_ERROR", "rate_per_s >= 0 (and burst >= 1) expected", "rate_per_s"
            )
        self.set_rate(float(rate), time.monotonic(), None if burst is None else float(burst))
        return self._json({"rate_per_s": self.cfg.rate_per_s, "burst": self.cfg.burst})

    async def admin_faults(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        if doc.get("kind") not in FAULT_KINDS:
            return self._error(
                422, "VALIDATION_ERROR", f"kind must be one of {FAULT_KINDS}", "kind"
            )
        self.fault_queue.extend([doc["kind"]] * int(doc.get("count", 1)))
        return self._json({"queued": len(self.fault_queue)})

    async def admin_datasets(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        return self._json(self.store.add_dataset(doc["slug"], doc.get("name", "")).public())

    async def admin_storage(self, request: web.Request) -> web.Response:
        doc = orjson.loads(await request.read())
        known = {f.name for f in fields(StorageConfig)}
        self.store.add_storage(StorageConfig(**{k: v for k, v in doc.items() if k in known}))
        return self._json({"ok": True})

    async def admin_items(self, request: web.Request) -> web.Response:
        ds = self.store.datasets.get(request.query.get("dataset", "demo-dataset"))
        if ds is None:
            return self._error(404, "NOT_FOUND", "dataset not found")
        return self._json({"items": self.store.order.get(ds.id, [])})


def make_app(cfg: EmulatorConfig | None = None, store: Store | None = None) -> web.Application:
    emu = Emulator(cfg or EmulatorConfig(), store)
    app = web.Application(middlewares=[emu.middleware], client_max_size=64 * 1024 * 1024)
    app["emulator"] = emu
    r = app.router
    r.add_get("/api/users/token_info", emu.token_info)
    r.add_get("/api/datasets", emu.datasets)
    r.add_get("/api/teams/{team}/storage", emu.storage)
    r.add_post("/api/v2/teams/{team}/items/register_existing", emu.register)
    r.add_post("/api/v2/teams/{team}/items/register_existing_readonly", emu.register)
    r.add_get("/api/v2/teams/{team}/items", emu.list_items)
    r.add_get("/_emulator/state", emu.admin_state)
    r.add_post("/_emulator/reset", emu.admin_reset)
    r.add_post("/_emulator/config", emu.admin_config)
    r.add_post("/_emulator/rate", emu.admin_rate)
    r.add_post("/_emulator/faults", emu.admin_faults)
    r.add_post("/_emulator/datasets", emu.admin_datasets)
    r.add_post("/_emulator/storage", emu.admin_storage)
    r.add_get("/_emulator/items", emu.admin_items)
    return app


async def serve(
    cfg: EmulatorConfig, host: str, port: int, storages: Sequence[StorageConfig] = ()
) -> None:
    store = Store.default()
    for storage in storages:  # --storage: beside (or replacing, by name) s3-rw and s3-ro
        store.add_storage(storage)
    runner = web.AppRunner(make_app(cfg, store), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"emulator listening on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


STORAGE_FIELDS = ("name", "provider", "bucket", "prefix", "readonly", "default", "region")
PROVIDERS = ("aws", "gcp", "azure")


def parse_storage(text: str) -> StorageConfig:
    """``--storage name=gcs-ro,provider=gcp,bucket=b,prefix=thumbs,readonly=true``: one V7
    storage configuration (``name`` required; the rest default as in StorageConfig; for Azure
    ``bucket`` is the storage account, as V7 stores it)."""
    doc: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in STORAGE_FIELDS:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected key=value with key one of {', '.join(STORAGE_FIELDS)}"
            )
        if key in ("readonly", "default"):
            if value.lower() not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{key}={value!r}: expected true or false")
            doc[key] = value.lower() == "true"
        else:
            doc[key] = value.strip()
    if not doc.get("name"):
        raise argparse.ArgumentTypeError("name= is required (the storage configuration's name)")
    if doc.get("provider", "aws") not in PROVIDERS:
        raise argparse.ArgumentTypeError(f"provider must be one of {', '.join(PROVIDERS)}")
    return StorageConfig(**doc)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--rate",
        type=float,
        default=0.0,
        help="register requests per second (token bucket); 0 = unlimited",
    )
    p.add_argument("--burst", type=float, default=1.0, help="token bucket depth (requests)")
    p.add_argument(
        "--retry-after",
        default="ceil",
        help="Retry-After on 429: ceil (integer seconds), exact, none, or a number",
    )
    p.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="uniform extra latency, 0..N")
    p.add_argument(
        "--rate-schedule",
        default="",
        help='rate changes "T:RATE,..." (T = seconds after the first register request)',
    )
    p.add_argument("--p-5xx", type=float, default=0.0, help="probability of a 5xx per request")
    p.add_argument("--p-reset", type=float, default=0.0, help="probability of a connection reset")
    p.add_argument("--p-stall", type=float, default=0.0, help="probability of a stall")
    p.add_argument("--stall-s", type=float, default=30.0)
    p.add_argument(
        "--p-commit-then-fail",
        type=float,
        default=0.0,
        help="probability of storing the items and answering 502",
    )
    p.add_argument("--max-items", type=int, default=500, help="items allowed per request")
    p.add_argument(
        "--max-page-size", type=int, default=500, help="items per page of an items listing"
    )
    p.add_argument(
        "--blocked-item-ids",
        action="store_true",
        help="put the existing item's id into ALREADY_EXISTS entries of blocked_items",
    )
    p.add_argument("--api-key", default=API_KEY)
    p.add_argument("--team", default="emulator-team")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--storage",
        action="append",
        type=parse_storage,
        default=[],
        metavar="name=N,provider=P,bucket=B,prefix=X,readonly=BOOL",
        help="add a V7 storage configuration (repeatable; provider aws|gcp|azure; for Azure the "
        "bucket is the storage account; region= and default=true too); s3-rw and s3-ro (bucket "
        "demo-bucket) are always there unless a --storage takes their name",
    )


def config_from_args(ns: argparse.Namespace) -> EmulatorConfig:
    return EmulatorConfig(
        api_key=ns.api_key,
        team=ns.team,
        rate_per_s=ns.rate,
        burst=ns.burst,
        retry_after=ns.retry_after,
        latency_ms=ns.latency_ms,
        jitter_ms=ns.jitter_ms,
        rate_schedule=ns.rate_schedule,
        p_5xx=ns.p_5xx,
        p_reset=ns.p_reset,
        p_stall=ns.p_stall,
        stall_s=ns.stall_s,
        p_commit_then_fail=ns.p_commit_then_fail,
        max_items_per_request=ns.max_items,
        max_page_size=ns.max_page_size,
        blocked_item_ids=ns.blocked_item_ids,
        seed=ns.seed,
    )


def main_from_args(ns: argparse.Namespace) -> int:
    cfg = config_from_args(ns)
    try:
        parse_rate_schedule(cfg.rate_schedule)
    except ValueError as e:
        print(f"error: --rate-schedule: {e}", file=sys.stderr)
        return 2
    try:
        try:
            import uvloop

            uvloop.run(serve(cfg, ns.host, ns.port, ns.storage))
        except ImportError:  # pragma: no cover
            asyncio.run(serve(cfg, ns.host, ns.port, ns.storage))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        print(f"error: cannot listen on {ns.host}:{ns.port}: {e.strerror}", file=sys.stderr)
        return 2
    return 0
