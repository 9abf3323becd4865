"""`ingest`: the command line. Every command reads a TOML config (see config/) plus overrides.

Exit codes: 0 everything registered (or skipped / already there before us and not ours);
2 bad configuration or a failed preflight check; 3 the run finished but some items failed or
were blocked; 4 a fatal error stopped the run (e.g. the key was revoked); 5 another run, sync
or worker of the same job holds the ledger's lease; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from ingest import __version__, config
from ingest.errors import (
    Aborted,
    ConfigError,
    IngestError,
    LeaseHeld,
    LedgerError,
    PreflightError,
    V7Error,
)
from ingest.log import register_secret, setup
from ingest.run.lifecycle import (
    EXIT_BUSY,
    EXIT_CONFIG,
    EXIT_FATAL,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_OK,
)
from ingest.stats import Stats

log = logging.getLogger("ingest")


# --- argument parsing ----------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", help="TOML config file (see config/*.toml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set rate.requests_per_s=5 (repeatable)",
    )
    p.add_argument("--dataset", help="override v7.dataset")
    p.add_argument("--storage", help="override v7.storage")
    p.add_argument("--bucket", help="override source.bucket")
    p.add_argument("--prefix", help="override source.prefix")
    p.add_argument("--endpoint-url", help="override source.endpoint_url (S3-compatible store)")
    p.add_argument("--base-url", help="override v7.base_url (default $DARWIN_BASE_URL or V7)")
    p.add_argument(
        "--ledger", help="override the ledger: a file path (SQLite) or a postgresql:// URL"
    )
    p.add_argument("--rate", type=float, help="override rate.requests_per_s")
    p.add_argument("--batch-size", type=int, help="override batch.max_items")
    p.add_argument(
        "--log-format", choices=["auto", "json", "text"], help="override output.log_format"
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress line")


_FLAG_FIELDS = {
    "dataset": "v7.dataset",
    "storage": "v7.storage",
    "bucket": "source.bucket",
    "prefix": "source.prefix",
    "endpoint_url": "source.endpoint_url",
    "base_url": "v7.base_url",
    "rate": "rate.requests_per_s",
    "batch_size": "batch.max_items",
    "log_format": "output.log_format",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingest",
        description="Register objects already in S3 / GCS / Azure Blob as V7 Darwin dataset items.",
    )
    parser.add_argument("--version", action="version", version=f"ingest {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="one-off migration of a bucket prefix into a dataset",
        description="List the bucket prefix, plan items, register them within V7's rate limits. "
        "Resumable: run it again after a crash and it continues; what is done is never re-sent.",
    )
    _common(p)

    p = sub.add_parser(
        "sync",
        help="incremental: register only objects not registered yet; report changed and vanished",
        description="One listing merged with the ledger in key order: new objects are "
        "registered, changed (new ETag) and vanished objects are reported (sync.on_change), "
        "nothing is deleted in V7. Safe to schedule: a second sync of the same job is refused "
        "while one holds the ledger's lease.",
    )
    _common(p)

    p = sub.add_parser(
        "worker",
        help="long-lived: scheduled syncs, optional S3/Azure object events, /healthz /readyz "
        "/metrics, graceful SIGTERM",
        description="Runs `sync` on worker.schedule (cron or interval, with jitter), retries "
        "failed items with back-off between runs, keeps going while V7 or the bucket is "
        "unreachable, serves health and Prometheus metrics, and on SIGTERM finishes in-flight "
        "work within worker.grace_period_s, then exits 0.",
    )
    _common(p)
    p.add_argument(
        "--once", action="store_true", help="one scheduled pass, then exit (for testing a config)"
    )

    p = sub.add_parser(
        "plan",
        help="dry run: write the exact request payloads it would send (JSONL); sends nothing",
        description="List and plan like `run`, but send nothing and write nothing to the ledger. "
        'Each output line is one request: {"endpoint", "body"}. Items the ledger already '
        "records as done are left out.",
    )
    _common(p)
    p.add_argument("--output", "-o", help="JSONL file to write ('-' = stdout; default plan.jsonl)")
    p.add_argument(
        "--readonly",
        action="store_true",
        help="plan for a read-only storage configuration when V7 is not reachable to ask",
    )

    p = sub.add_parser(
        "status",
        help="what the ledger knows: counts per state, last runs, failures by reason",
        description="Summarise the ledger of this job. Reads only the ledger; no network.",
    )
    _common(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "report",
        help="one row per object: key, state, item name/path, V7 item id, reason",
        description="Export the ledger, one row per object, streamed (constant memory).",
    )
    _common(p)
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.add_argument("--output", "-o", default="-", help="file to write ('-' = stdout)")
    p.add_argument("--state", action="append", help="only rows in this state (repeatable)")
    p.add_argument(
        "--sync",
        choices=["changed", "vanished"],
        help="only objects a sync found changed (new ETag) or vanished from the bucket",
    )

    p = sub.add_parser(
        "retry",
        help="re-queue failed objects and send them again",
        description="Move FAILED items (and, with --blocked, BLOCKED items with that reason) back "
        "to PLANNED and register them; no listing.",
    )
    _common(p)
    p.add_argument("--blocked", metavar="REASON", help="also retry items blocked with REASON")

    p = sub.add_parser(
        "ledger",
        help="operate the ledger: migrate its schema, prune finished rows",
        description="`ingest ledger migrate` applies the ledger's schema migrations and prints "
        "the version (for databases where the engine's role may not create tables); "
        "`ingest ledger prune --state registered [--older-than-days N]` deletes this job's "
        "finished items and their objects (a later run lists them as new again).",
    )
    _common(p)
    p.add_argument("action", choices=["migrate", "prune"])
    p.add_argument(
        "--state",
        choices=["registered", "skipped", "failed", "blocked"],
        default="registered",
        help="prune: items in this state (default registered)",
    )
    p.add_argument(
        "--older-than-days",
        type=float,
        default=0.0,
        help="prune: only items last updated more than this many days ago (default 0: all)",
    )

    p = sub.add_parser(
        "emulator",
        help="run the local V7 API emulator (for dry runs, tests and benchmarks)",
        description="A local implementation of V7's registration API (see docs/v7-contract.md), "
        "with a configurable rate limit, latency and faults.",
    )
    from ingest.emulator.server import add_arguments

    add_arguments(p)
    return parser


def load_config(ns: argparse.Namespace) -> config.Config:
    overrides = list(ns.overrides or [])
    for attr, where in _FLAG_FIELDS.items():
        value = getattr(ns, attr, None)
        if value is not None:
            overrides.append(f"{where}={value}")
    ledger = getattr(ns, "ledger", None)
    if ledger is not None:  # a URL selects PostgreSQL, a path SQLite (and wins over a URL)
        overrides += (
            [f"ledger.url={ledger}"]
            if "://" in ledger
            else [
                f"ledger.path={ledger}",
                "ledger.url=",
            ]
        )
    if getattr(ns, "no_progress", False):
        overrides.append("output.progress=false")
    return config.load(ns.config, overrides)


# --- commands ------------------------------------------------------------------------------------


def _exit_code(stats: Stats, stopped_early: bool, ledger_status: Any = None) -> int:
    """3 when this run failed or blocked items, or when the ledger still holds FAILED items
    from earlier runs (a nightly job must not turn green while failures wait for `retry`)."""
    if stopped_early:
        return EXIT_INTERRUPTED
    left = ledger_status.items_by_state.get("FAILED", 0) if ledger_status is not None else 0
    return EXIT_INCOMPLETE if (stats.failed or stats.blocked or left) else EXIT_OK


def _summary(
    stats: Stats, ledger_status: Any, out: Callable[[str], None], *, sync: bool = False
) -> None:
    elapsed = stats.elapsed_s()
    out(
        f"done in {elapsed:.1f} s: listed {stats.listed:,}, registered {stats.registered:,}, "
        f"blocked {stats.blocked:,}, failed {stats.failed:,}, skipped {stats.skipped:,}; "
        f"{stats.requests:,} requests, {stats.rate_limited:,} answered 429, "
        f"{stats.retries:,} retries; {stats.registered / elapsed:,.1f} items/s"
    )
    if sync or stats.changed or stats.vanished:
        out(
            f"  sync: changed {stats.changed:,}, vanished {stats.vanished:,} (see `ingest report`"
            " column `sync`; nothing is deleted in V7)"
        )
    if stats.media_done or stats.artifacts_ignored:
        out(
            f"  media: {stats.media_done:,} items got thumbnails / video artifacts; "
            f"{stats.artifacts_ignored:,} listed artifacts ignored"
        )
    for reason, n in stats.blocked_by_reason.most_common(5):
        out(f"  blocked {n:,}: {reason}")
    for reason, n in stats.failures_by_reason.most_common(5):
        out(f"  failed {n:,}: {reason}")
    if ledger_status is not None:
        out(f"ledger totals: {_fmt_counts(ledger_status.objects_by_state)}")


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "empty"


async def _run(cfg: config.Config, kind: str, *, retry_blocked: str | None = None) -> int:
    from ingest.engine import open_engine
    from ingest.ledger import LedgerPort

    async def requeue(ledger: LedgerPort) -> None:
        n = await ledger.requeue_failed(retry_blocked)
        log.info("re-queued items", extra={"count": n})

    async with open_engine(cfg) as engine:
        result = await engine.run(
            kind, list_bucket=kind != "retry", under_lease=requeue if kind == "retry" else None
        )
        status = await engine.ledger.status()
        _summary(engine.stats, status, print, sync=kind == "sync")
        if engine.lease_lost:
            return EXIT_FATAL
        return _exit_code(engine.stats, result.stopped_early, status)


async def _plan(cfg: config.Config, output: str, readonly_flag: bool) -> int:
    from ingest.engine import plan_only

    out = sys.stdout.buffer if output == "-" else Path(output).open("wb")  # noqa: SIM115, ASYNC230 (a local file, opened once)
    try:
        async with _existing_ledger(cfg) as done:
            n_requests, n_items, n_skipped = await plan_only(
                cfg, out, readonly_hint=readonly_flag, done=done
            )
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    where = "stdout" if output == "-" else output
    print(
        f"planned {n_items:,} items in {n_requests:,} requests ({n_skipped:,} objects skipped) "
        f"→ {where}",
        file=sys.stderr,
    )
    return EXIT_OK


@contextlib.asynccontextmanager
async def _existing_ledger(cfg: config.Config) -> AsyncIterator[Any]:
    """The job's ledger when it exists (read by plan/status/report), else None."""
    from ingest.ledger import open_configured

    if not cfg.ledger.url and not Path(cfg.ledger.path).exists():  # noqa: ASYNC240
        yield None
        return
    async with open_configured(cfg.ledger, cfg.job) as ledger:
        yield ledger


async def _ledger_command(cfg: config.Config, action: str, state: str, days: float) -> int:
    """`ingest ledger migrate|prune`."""
    import time

    from ingest.ledger import open_configured
    from ingest.model import State

    if action == "migrate":
        from ingest.ledger.postgres import PostgresLedger, mask_url

        if not cfg.ledger.url:
            print("the SQLite ledger migrates itself when opened: nothing to do")
            return EXIT_OK
        async with open_configured(cfg.ledger, cfg.job) as ledger:
            assert isinstance(ledger, PostgresLedger)
            version = await ledger.migrate()  # idempotent: open applied what was missing
        print(f"ledger {mask_url(cfg.ledger.url)}: schema version {version}")
        return EXIT_OK
    if days < 0:
        raise ConfigError("--older-than-days must be >= 0")
    before = time.time() - days * 86400.0
    async with open_configured(cfg.ledger, cfg.job) as ledger:
        n = await ledger.prune(State(state.upper()), before)
    print(f"pruned {n:,} {state} items of job {cfg.job}")
    return EXIT_OK


async def _status(cfg: config.Config, as_json: bool) -> int:
    async with _existing_ledger(cfg) as ledger:
        if ledger is None:
            print(f"no ledger at {cfg.ledger.path}: nothing has run for this config yet")
            return EXIT_OK
        st = await ledger.status()
    doc = st.as_dict()
    if as_json:
        print(orjson.dumps(doc, default=str, option=orjson.OPT_INDENT_2).decode())
        return EXIT_OK
    print(f"job: {cfg.job}")
    print(f"objects: {_fmt_counts(st.objects_by_state)}")
    print(f"items:   {_fmt_counts(st.items_by_state)}")
    if st.changed_objects or st.vanished_objects:
        print(
            f"sync:    {st.changed_objects:,} changed, {st.vanished_objects:,} vanished "
            "(ingest report --sync changed|vanished)"
        )
    for run in st.last_runs:
        print(f"run {run}")
    for reason, n in st.failures_by_reason:
        print(f"  {n:,} x {reason}")
    return EXIT_OK


async def _report(
    cfg: config.Config, fmt: str, output: str, states: list[str] | None, sync: str | None = None
) -> int:
    wanted = {s.upper() for s in states} if states else None
    fields = ["key", "state", "item_path", "item_name", "v7_id", "reason", "etag", "size", "sync"]
    async with _existing_ledger(cfg) as ledger:
        if ledger is None:
            raise ConfigError(f"no ledger at {cfg.ledger.path}: run `ingest run` first")
        out = sys.stdout if output == "-" else open(output, "w", newline="", encoding="utf-8")  # noqa: SIM115, ASYNC230
        try:
            writer = csv.writer(out) if fmt == "csv" else None
            if writer:
                writer.writerow(fields)
            async with contextlib.aclosing(ledger.report_rows()) as rows:
                async for row in rows:
                    if wanted and str(row.state) not in wanted:
                        continue
                    if sync and not row.sync.startswith(sync):
                        continue
                    values = [getattr(row, f) for f in fields]
                    if writer:
                        writer.writerow(values)
                    else:
                        out.write(
                            orjson.dumps(dict(zip(fields, values, strict=True))).decode() + "\n"
                        )
        finally:
            if out is not sys.stdout:
                out.close()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "emulator":
        from ingest.emulator.server import main_from_args

        setup("text")
        return main_from_args(ns)
    try:
        cfg = load_config(ns)
        register_secret(cfg.api_key)
        setup(cfg.output.log_format)
        if ns.command in ("run", "retry", "sync"):
            config.require_for_run(cfg)
            return _asyncio_run(_run(cfg, ns.command, retry_blocked=getattr(ns, "blocked", None)))
        if ns.command == "worker":
            config.require_for_run(cfg)
            from ingest.worker.loop import main as worker_main

            return _asyncio_run(worker_main(cfg, once=ns.once))
        if ns.command == "plan":
            return _asyncio_run(_plan(cfg, ns.output or cfg.output.plan_output, ns.readonly))
        if ns.command == "status":
            return _asyncio_run(_status(cfg, ns.json))
        if ns.command == "report":
            return _asyncio_run(_report(cfg, ns.format, ns.output, ns.state, ns.sync))
        if ns.command == "ledger":
            return _asyncio_run(_ledger_command(cfg, ns.action, ns.state, ns.older_than_days))
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except LeaseHeld as e:
        print(f"busy: {e}", file=sys.stderr)
        return EXIT_BUSY
    except Aborted:
        return EXIT_INTERRUPTED
    except LedgerError as e:
        print(f"ledger: {e}", file=sys.stderr)
        return EXIT_FATAL if e.retryable else EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (V7Error, IngestError) as e:
        print(f"fatal: {e}", file=sys.stderr)
        return EXIT_FATAL
    parser.error(f"unknown command {ns.command}")
    return EXIT_CONFIG


def _loop_runner() -> Any:
    """uvloop's runner where available (INGEST_NO_UVLOOP=1 forces asyncio's own loop)."""
    if os.environ.get("INGEST_NO_UVLOOP"):
        return asyncio.run
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run
    return uvloop.run


def _asyncio_run(coro: Any) -> int:
    """Run ``coro``; an error that ended it inside a task group is raised as itself, so the
    one-line handlers of ``main`` see it (never an ExceptionGroup traceback)."""
    try:
        return int(_loop_runner()(coro))
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first error of ours in a (nested) exception group, else its first leaf."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    ours = [e for e in leaves if isinstance(e, IngestError)]
    return (ours or leaves)[0]
