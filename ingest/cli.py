"""`ingest`: the command line. Every command reads a TOML config (see config/) plus overrides.

Exit codes: 0 everything registered (or skipped / already there before us and not ours);
2 bad configuration or a failed preflight check; 3 the run finished but some items failed or
were blocked; 4 a fatal error stopped the run (e.g. the key was revoked); 5 another run, sync
or worker of the same job holds the ledger's lease; 130 interrupted; 141 the reader of stdout
went away (``ingest report | head``): like ``cat`` killed by SIGPIPE, quietly, so a pipeline
under ``set -o pipefail`` still sees that the output was cut short.

Every error that ends a command goes through one table, ``_exit_for``: one line on stderr
and an exit code, never a traceback (the tree it maps is drawn in ``ingest/errors.py``).
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
from ingest.model import State
from ingest.output import OutputGone, Sink
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


def _flags(add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """A parent parser of shared flags; each subcommand takes only the groups it uses, so its
    --help lists only the flags it reads."""
    parent = argparse.ArgumentParser(add_help=False)
    add(parent)
    return parent


def _config_flags(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--ledger", help="override the ledger: a file path (SQLite) or a postgresql:// URL"
    )


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", help="override source.endpoint_url (S3-compatible store)")
    p.add_argument("--base-url", help="override v7.base_url (default $DARWIN_BASE_URL or V7)")
    p.add_argument("--batch-size", type=int, help="override batch.max_items")
    p.add_argument(
        "--log-format", choices=["auto", "json", "text"], help="override output.log_format"
    )


def _send_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, help="override rate.requests_per_s")


def _progress_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no live progress display")


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
    # Which flags a subcommand reads: the config and the job's names (every one), where it
    # reads and sends (not status/report), the rate (what sends), the progress display (what
    # runs in a terminal).
    names, target, send, progress = (
        _flags(f) for f in (_config_flags, _target_flags, _send_flags, _progress_flags)
    )
    sending = [names, target, send]

    p = sub.add_parser(
        "run",
        help="one-off migration of a bucket prefix into a dataset",
        description="List the bucket prefix, plan items, register them within V7's rate limits. "
        "Resumable: run it again after a crash and it continues; what is done is never re-sent.",
        parents=[*sending, progress],
    )

    p = sub.add_parser(
        "sync",
        help="incremental: register only objects not registered yet; report changed and vanished",
        description="One listing merged with the ledger in key order: new objects are "
        "registered, changed (new ETag) and vanished objects are reported (sync.on_change), "
        "nothing is deleted in V7. Safe to schedule: a second sync of the same job is refused "
        "while one holds the ledger's lease.",
        parents=[*sending, progress],
    )
    p.add_argument(
        "--busy-ok",
        action="store_true",
        help="exit 0, not 5, when another run of the job holds the lease (it does the work): "
        "for schedulers with no success-exit-code setting (a Kubernetes CronJob)",
    )

    p = sub.add_parser(
        "worker",
        help="long-lived: scheduled syncs, optional S3/Azure object events, /healthz /readyz "
        "/metrics, graceful SIGTERM",
        description="Runs `sync` on worker.schedule (cron or interval, with jitter), retries "
        "failed items with back-off between runs, keeps going while V7 or the bucket is "
        "unreachable, serves health and Prometheus metrics, and on SIGTERM finishes in-flight "
        "work within worker.grace_period_s, then exits 0.",
        parents=sending,
    )
    p.add_argument(
        "--once", action="store_true", help="one scheduled pass, then exit (for testing a config)"
    )
    p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)  # never shown

    p = sub.add_parser(
        "plan",
        help="dry run: write the exact request payloads it would send (JSONL); sends nothing",
        description="List and plan like `run`, but send nothing and write nothing to the ledger. "
        'Each output line is one request: {"endpoint", "body"}. Items the ledger already '
        "records as done are left out.",
        parents=[names, target],
    )
    p.add_argument("--output", "-o", help="JSONL file to write ('-' = stdout; default plan.jsonl)")
    p.add_argument(
        "--readonly",
        action="store_true",
        help="plan for a read-only storage configuration when V7 is not reachable to ask",
    )

    p = sub.add_parser(
        "status",
        help="what the ledger knows: counts per state, last runs, failures by reason",
        description="Summarise the ledger of this job: counts per state (over every run), "
        "the last runs, the top failure reasons. Reads only the ledger; no network.",
        parents=[names],
    )
    p.add_argument(
        "--format", choices=["text", "json"], default="text", help="text tables, or JSON"
    )
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # = --format json

    p = sub.add_parser(
        "report",
        help="one row per object: key, state, item name/path, V7 item id, reason",
        description="Export the ledger, one row per object, streamed (constant memory).",
        parents=[names],
    )
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
        "to PLANNED and register them; no listing. With nothing to re-queue and nothing "
        "pending it says so and records no run.",
        parents=[*sending, progress],
    )
    p.add_argument("--blocked", metavar="REASON", help="also retry items blocked with REASON")

    p = sub.add_parser(
        "ledger",
        help="operate the ledger: migrate its schema, prune finished rows",
        description="`ingest ledger migrate` applies the ledger's schema migrations and prints "
        "the version (for databases where the engine's role may not create tables); "
        "`ingest ledger prune --state registered [--older-than-days N]` deletes this job's "
        "finished items; their objects stay as tombstones, so a later run does not send them "
        "again (--state skipped: the skipped objects). Refused while the job runs.",
        parents=[names],
    )
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
        description="A local implementation of V7's registration API (held to docs/v7-contract.md "
        "in this repository), with a configurable rate limit, latency and faults. Storage "
        "configurations: s3-rw and s3-ro (bucket demo-bucket) by default; --storage adds more.",
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
    """The end-of-run text (stdout, even when piped; logs go to stderr). Counts are this
    run's, each with its unit; the ledger's totals over every run follow on their own line."""
    elapsed = stats.elapsed_s()
    out(
        f"done in {elapsed:.1f} s (this run): registered {_n(stats.registered, 'item')} "
        f"({_n(stats.registered_objects, 'object')}), blocked {_n(stats.blocked, 'item')}, "
        f"failed {_n(stats.failed, 'item')}, skipped {_n(stats.skipped, 'object')}; "
        f"listed {_n(stats.listed, 'object')}"
        + (f", recovered {_n(stats.recovered, 'item')} from the ledger" if stats.recovered else "")
    )
    out(
        f"  {stats.requests:,} requests, {stats.rate_limited:,} answered 429, "
        f"{stats.retries:,} retries; {stats.settled / elapsed:,.1f} settled/s"
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
        out(f"ledger totals (every run), objects: {_fmt_counts(ledger_status.objects_by_state)}")


def _n(count: int, unit: str) -> str:
    return f"{count:,} {unit}" + ("" if count == 1 else "s")


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())) or "empty"


async def _run(
    cfg: config.Config, kind: str, *, retry_blocked: str | None = None, busy_ok: bool = False
) -> int:
    """One run, sync or retry; with ``busy_ok`` (``sync --busy-ok``) a job whose lease another
    process holds is exit 0, not 5 (that process does the work)."""
    try:
        return await _run_held(cfg, kind, retry_blocked=retry_blocked)
    except LeaseHeld as e:
        if not busy_ok:
            raise
        print(f"busy: {e} (--busy-ok: exit 0)", file=sys.stderr)
        return EXIT_OK


async def _run_held(cfg: config.Config, kind: str, *, retry_blocked: str | None = None) -> int:
    from ingest.engine import open_engine
    from ingest.ledger import LedgerPort

    if retry_blocked is not None:  # before any preflight: a typo is refused at once
        retry_blocked = await _blocked_reason(cfg, retry_blocked)

    async def requeue(ledger: LedgerPort) -> bool:
        """Re-queue FAILED (and BLOCKED) items; False when there is nothing to send at all,
        so a no-op `retry` records no run."""
        n = await ledger.requeue_failed(retry_blocked)
        log.info("re-queued items", extra={"count": n})
        if n:
            return True
        async with contextlib.aclosing(ledger.pending()) as pending:
            return await anext(pending, None) is not None

    async with open_engine(cfg) as engine:
        result = await engine.run(
            kind, list_bucket=kind != "retry", under_lease=requeue if kind == "retry" else None
        )
        status = await engine.ledger.status()
        if result is None:
            what = "FAILED items"
            if retry_blocked:
                what += f" nor items BLOCKED {retry_blocked!r}"
            print(f"nothing to retry: no {what} and nothing pending; no run recorded")
            return _exit_code(engine.stats, False, status)
        _summary(engine.stats, status, print, sync=kind == "sync")
        for warning in result.warnings:  # the run still ends 0: an empty prefix is no error
            log.warning(warning)
        if engine.lease_lost:
            return EXIT_FATAL
        return _exit_code(engine.stats, result.stopped_early, status)


async def _plan(cfg: config.Config, output: str, readonly_flag: bool) -> int:
    from ingest.engine import plan_only

    to_file = output != "-"
    out: Any = Sink(
        _open_output(output, "wb") if to_file else sys.stdout.buffer,
        output if to_file else "stdout",
    )
    try:
        async with _existing_ledger(cfg) as done:
            n_requests, n_items, n_skipped = await plan_only(
                cfg, out, readonly_hint=readonly_flag, done=done
            )
    finally:
        if to_file:
            out.close()
    where = "stdout" if output == "-" else output
    print(
        f"planned {n_items:,} items in {n_requests:,} requests ({n_skipped:,} objects skipped) "
        f"→ {where}",
        file=sys.stderr,
    )
    return EXIT_OK


def _open_output(path: str, mode: str) -> Any:
    """The file a command writes (``-o``), or a ConfigError naming it."""
    try:
        if "b" in mode:
            return Path(path).open(mode)
        return Path(path).open(mode, newline="", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None


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
        from ingest.ledger.postgres import PostgresLedger
        from ingest.log import mask_url

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
    """Exit 2 with one line when the ledger does not hold the job (a script can tell); no
    ledger at all is "nothing has run yet", exit 0."""
    import time

    from ingest.status_view import status_doc, status_lines, unknown_job_line

    async with _existing_ledger(cfg) as ledger:
        if ledger is None:
            print(f"no ledger at {cfg.ledger.path}: nothing has run for this config yet")
            return EXIT_OK
        st = await ledger.status()
        jobs = await ledger.jobs()
    now = time.time()
    known = cfg.job in jobs or bool(st.objects_by_state)
    if as_json:
        doc = {**status_doc(st, now), "job_in_ledger": cfg.job in jobs, "ledger_jobs": jobs}
        print(orjson.dumps(doc, default=str, option=orjson.OPT_INDENT_2).decode())
    elif known:
        print("\n".join(status_lines(st, cfg.ledger.path, now)))
    if not known:
        raise ConfigError(unknown_job_line(cfg.job, cfg.ledger.path, jobs))
    return EXIT_OK


async def _report(
    cfg: config.Config, fmt: str, output: str, states: list[str] | None, sync: str | None = None
) -> int:
    wanted = set(check_states(states)) if states else None
    fields = ["key", "state", "item_path", "item_name", "v7_id", "reason", "etag", "size", "sync"]
    fields.append("converted")  # read-only DICOM: the PNG / series video made of the object
    async with _existing_ledger(cfg) as ledger:
        if ledger is None:
            raise ConfigError(f"no ledger at {cfg.ledger.path}: run `ingest run` first")
        jobs = await ledger.jobs()
        if cfg.job not in jobs:
            from ingest.status_view import unknown_job_line

            raise ConfigError(unknown_job_line(cfg.job, cfg.ledger.path, jobs))
        to_file = output != "-"
        out = Sink(_open_output(output, "w"), output) if to_file else Sink(sys.stdout, "stdout")
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
            if to_file:
                out.close()
    return EXIT_OK


EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for `cat big | head`

# V7's known blocked-item reasons (docs/v7-contract.md, "Known reasons") and the registrar's
# UNKNOWN (V7 gave none): `retry --blocked` takes these even when no item is blocked for them,
# and any other reason the ledger holds (V7 may add some).
BLOCKED_REASONS = (
    "ALREADY_EXISTS",
    "FILE_UPLOAD_TIMEOUT",
    "FILE_UPLOAD_FAILED",
    "UNEXPECTED_ERROR",
    "ITEM_COUNT_LIMIT_EXCEEDED",
    "UNKNOWN",
)


def check_states(states: Sequence[str]) -> list[str]:
    """``report --state`` values, upper-cased; a typo is refused with the valid ones."""
    valid = [str(s) for s in State]
    out = []
    for raw in states:
        state = raw.strip().upper()
        if state not in valid:
            raise ConfigError(
                f"report --state {raw!r} is not a state{_nearest(state, valid)} "
                f"(one of: {', '.join(valid)})"
            )
        out.append(state)
    return out


def check_blocked_reason(reason: str, in_ledger: Sequence[str]) -> str:
    """``retry --blocked`` value as the ledger stores it: upper-cased, each part of a combined
    reason ("a, b") trimmed and matched in any order against ``in_ledger`` (the job's BLOCKED
    reasons). A known V7 reason no item is blocked for passes (nothing to re-queue for it);
    anything else is refused with the nearest candidate."""
    parts = [p.strip().upper() for p in reason.split(",") if p.strip()]
    if not parts:
        raise ConfigError("retry --blocked needs a reason (e.g. ALREADY_EXISTS)")
    for stored in in_ledger:
        if {p.strip().upper() for p in stored.split(",")} == set(parts):
            return stored
    if all(p in BLOCKED_REASONS for p in parts):
        return ",".join(parts)
    value = ",".join(parts)
    candidates = sorted(set(in_ledger) | set(BLOCKED_REASONS))
    blocked = ", ".join(in_ledger) or "none"
    raise ConfigError(
        f"retry --blocked {reason!r}: no item is blocked for it{_nearest(value, candidates)} "
        f"(blocked in this job: {blocked}; V7's reasons: {', '.join(BLOCKED_REASONS)})"
    )


async def _blocked_reason(cfg: config.Config, reason: str) -> str:
    """``check_blocked_reason`` against the job's ledger (none yet: nothing is blocked)."""
    async with _existing_ledger(cfg) as ledger:
        in_ledger = await ledger.blocked_reasons() if ledger is not None else []
    return check_blocked_reason(reason, in_ledger)


def _nearest(value: str, known: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command == "emulator":
        from ingest.emulator.server import main_from_args

        setup("text")
        return main_from_args(ns)
    stdout, sys.stdout = sys.stdout, Sink(sys.stdout, "stdout")
    try:
        code = _dispatch(ns)
        sys.stdout.flush()  # a reader gone by now is a broken pipe too: handled below
        return code
    except (Exception, KeyboardInterrupt) as e:
        line, code = _exit_for(e)
        if line:
            with contextlib.suppress(OSError):  # stderr's reader gone: the code still counts
                print(line, file=sys.stderr)
        return code
    finally:
        sys.stdout = stdout


def _dispatch(ns: argparse.Namespace) -> int:
    cfg = load_config(ns)
    register_secret(cfg.api_key)
    setup(cfg.output.log_format)
    if ns.command in ("run", "retry", "sync"):
        config.require_for_run(cfg)
        blocked = getattr(ns, "blocked", None)
        busy_ok = getattr(ns, "busy_ok", False)
        return _asyncio_run(_run(cfg, ns.command, retry_blocked=blocked, busy_ok=busy_ok))
    if ns.command == "worker":
        config.require_for_run(cfg)
        from ingest.worker.loop import main as worker_main

        return _asyncio_run(worker_main(cfg, once=ns.once))
    if ns.command == "plan":
        return _asyncio_run(_plan(cfg, ns.output or cfg.output.plan_output, ns.readonly))
    if ns.command == "status":
        return _asyncio_run(_status(cfg, ns.json or ns.format == "json"))
    if ns.command == "report":
        if ns.state:
            check_states(ns.state)  # before the ledger is opened
        return _asyncio_run(_report(cfg, ns.format, ns.output, ns.state, ns.sync))
    if ns.command == "ledger":
        return _asyncio_run(_ledger_command(cfg, ns.action, ns.state, ns.older_than_days))
    raise ConfigError(f"unknown command {ns.command}")


def _exit_for(e: BaseException) -> tuple[str, int]:
    """The one mapping from an error that ended a command to its stderr line ("" = nothing
    to say) and exit code. Anything not ours and not listed is a bug: re-raised, traceback."""
    if isinstance(e, ConfigError | PreflightError):
        return f"error: {e}", EXIT_CONFIG
    if isinstance(e, LeaseHeld):
        return f"busy: {e}", EXIT_BUSY
    if isinstance(e, Aborted | KeyboardInterrupt):
        return "", EXIT_INTERRUPTED
    if isinstance(e, LedgerError):
        return f"ledger: {e}", EXIT_FATAL if e.retryable else EXIT_CONFIG
    if isinstance(e, V7Error | IngestError):
        return f"fatal: {e}", EXIT_FATAL
    if isinstance(e, OutputGone):  # stdout's reader only: any other broken pipe is no such
        _stdout_to_devnull()
        return "", EXIT_PIPE
    raise e


def _stdout_to_devnull() -> None:
    """The reader of stdout is gone: point stdout at /dev/null so that the interpreter's own
    flush at exit does not fail again (Python's documented recipe for SIGPIPE)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


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
    one-line handlers of ``main`` see it (never an ExceptionGroup traceback, unless a bug is in
    it)."""
    try:
        return int(_loop_runner()(coro))
    except BaseExceptionGroup as group:
        raise _first_leaf(group) from None


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a (nested) exception group stands for: the group itself when any of its errors is
    not ours (a bug keeps its traceback, even beside errors of ours), else an interruption
    (Ctrl-C: the other errors are likely its consequences), else the first error of ours."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for sub in e.exceptions:
                walk(sub)
        else:
            leaves.append(e)

    walk(group)
    if any(not isinstance(e, IngestError | OutputGone | KeyboardInterrupt) for e in leaves):
        return group
    interrupted = [e for e in leaves if isinstance(e, KeyboardInterrupt | Aborted)]
    return (interrupted or leaves)[0]
