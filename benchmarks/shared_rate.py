"""The shared rate budget: N client processes, one V7 key, one PostgreSQL row.

Each client is its own process (``python -m benchmarks.shared_rate client …``) with its own
asyncpg pool, registering 10 items a request with ``--senders`` concurrent senders through a
``SharedLimiter``, against the emulator (its own process) allowing R register requests/s (token
bucket, burst 1, integer ``Retry-After``). On a 429 a client reports it and sends the same batch
again after the pause. Figures, from the emulator's timeline (first to last register request,
plus one interval):

- **share of the ceiling**: accepted requests/s ÷ R, for 1, 2 and 4 clients (goal >= 0.95), and
  the share of requests answered 429;
- **local limiter, same run**: one client with the in-process ``Limiter`` (what a single
  process does today) — the baseline;
- **grants/s**: the database alone, clients drawing with no server behind them at a rate far
  above what one row can grant (round trips bound it), 1, 2, 4 processes; slots/s beside it.

    python -m benchmarks.shared_rate            # 30 s per point
    python -m benchmarks.shared_rate --quick    # 8 s per point
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson

from benchmarks import _common as c
from ingest.config import RateConfig
from ingest.emulator import API_KEY
from ingest.errors import Interrupted, RateLimited, RejectedError
from ingest.registrar.budget import SendBudget
from ingest.registrar.client import V7Client
from ingest.registrar.rate import Limiter, RateController
from ingest.registrar.shared_rate import budget_key, open_budget

RATE = 20.0
BATCH = 10
CLIENTS = (1, 2, 4)
SERVER_BURSTS = (1.0, 2.0)  # the emulator's bucket depth: 1 is the harshest server


# --- one client process ----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _limiter(ns: argparse.Namespace, cfg: RateConfig) -> AsyncIterator[SendBudget]:
    if ns.local:
        yield Limiter(RateController(cfg.requests_per_s, cfg.burst), cfg.max_in_flight)
        return
    async with open_budget(ns.pg, budget_key(ns.v7, API_KEY), cfg) as shared:
        yield shared


async def _client(ns: argparse.Namespace) -> dict[str, Any]:
    """Register batches until ``--seconds`` have passed; what happened, as JSON."""
    cfg = RateConfig(requests_per_s=ns.rate, burst=1.0, max_in_flight=ns.senders)
    stop = asyncio.Event()
    counts = {"ok": 0, "rate_limited": 0, "other": 0}
    async with V7Client(ns.v7, API_KEY, max_connections=ns.senders + 2) as v7:
        team = str((await v7.token_info())["selected_team"]["slug"])
        async with _limiter(ns, cfg) as limiter:
            next_name = iter(range(10**9))

            async def sender() -> None:
                body = _body(ns.tag, next_name)
                while not stop.is_set():
                    try:
                        async with limiter.slot(stop) as sent_at:
                            try:
                                await v7.register(team, False, body)
                            except (RateLimited, RejectedError) as e:
                                limiter.answered(sent_at, e)
                                counts[
                                    "rate_limited" if isinstance(e, RateLimited) else "other"
                                ] += 1
                                continue  # the same batch again, after the pause
                            limiter.answered(sent_at)
                    except Interrupted:
                        return
                    counts["ok"] += 1
                    body = _body(ns.tag, next_name)

            await _start_at(ns.start_at)
            started = time.monotonic()
            tasks = [asyncio.create_task(sender()) for _ in range(ns.senders)]
            await asyncio.sleep(ns.seconds)  # the measured period
            stop.set()
            await asyncio.gather(*tasks)
            out: dict[str, Any] = {**counts, "seconds": time.monotonic() - started}
            if not ns.local:
                out["grants"] = limiter.grants  # type: ignore[attr-defined]
                out["slots"] = limiter.slots_granted  # type: ignore[attr-defined]
                out["voided"] = limiter.voided  # type: ignore[attr-defined]
                out["missed"] = limiter.missed  # type: ignore[attr-defined]
                out["notices"] = limiter.notices  # type: ignore[attr-defined]
            return out


async def _start_at(epoch_s: float) -> None:
    """Every client starts sending at the same moment, once all of them are up (process
    start-up on 2 shared cores takes seconds and would starve the first ones' timers)."""
    await asyncio.sleep(max(0.0, epoch_s - time.time()))


def _body(tag: str, names: Iterator[int]) -> dict[str, Any]:
    items = []
    for _ in range(BATCH):
        n = next(names)
        items.append({"path": "/", "type": "image", "storage_key": f"{tag}/{n}.jpg",
                      "name": f"{tag}-{n}.jpg"})  # fmt: skip
    return {"items": items, "dataset_slug": "demo-dataset", "storage_slug": "s3-rw"}


async def _grants(ns: argparse.Namespace) -> dict[str, Any]:
    """Draw slots as fast as the row grants them (no server): grants/s of this process."""
    cfg = RateConfig(requests_per_s=1e6, burst=1.0, max_in_flight=ns.senders, adaptive=False)
    stop = asyncio.Event()
    async with open_budget(ns.pg, budget_key(ns.v7, API_KEY), cfg) as limiter:

        async def sender() -> None:
            with contextlib.suppress(Interrupted):
                while not stop.is_set():
                    async with limiter.slot(stop) as at:
                        limiter.answered(at)

        await _start_at(ns.start_at)
        t0 = time.monotonic()
        tasks = [asyncio.create_task(sender()) for _ in range(ns.senders)]
        await asyncio.sleep(ns.seconds)
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
        return {"grants": limiter.grants, "slots": limiter.slots_granted, "seconds": elapsed}


def client_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.shared_rate client")
    p.add_argument("--v7", required=True)
    p.add_argument("--pg", default="")
    p.add_argument("--rate", type=float, default=RATE)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--tag", default="c0")
    p.add_argument("--start-at", type=float, default=0.0, help="epoch seconds to start sending")
    p.add_argument("--local", action="store_true", help="the in-process Limiter instead")
    p.add_argument("--grants", action="store_true", help="measure grants/s (no V7 requests)")
    ns = p.parse_args(argv)
    result = asyncio.run(_grants(ns) if ns.grants else _client(ns))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


# --- the benchmark ---------------------------------------------------------------------------


START_DELAY_S = 6.0  # clients start this long after launch (all up by then)


def client_cmd(v7: str, pg: str, tag: str, seconds: float, *more: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.shared_rate", "client", "--v7", v7, "--pg", pg,
            "--tag", tag, "--seconds", str(seconds), *more]  # fmt: skip


def run_clients(cmds: list[list[str]], timeout_s: float) -> list[dict[str, Any]]:
    """Start every client; they send from the same moment on; their JSON results."""
    start = ["--start-at", str(time.time() + START_DELAY_S)]
    procs = [
        subprocess.Popen(
            [*cmd, *start],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=c.cli_env(),
        )
        for cmd in cmds
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout_s + START_DELAY_S)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed ({proc.returncode}): {err[-2000:]}")
        results.append(orjson.loads(out.strip().splitlines()[-1]))
    return results


def share_of_ceiling(timeline: list[tuple[float, int]], rate: float) -> tuple[float, float, int]:
    """(accepted requests/s ÷ rate, share answered 429, requests) over the emulator's timeline
    from the first to the last register request, plus one interval."""
    if not timeline:
        return 0.0, 0.0, 0
    times = [t for t, _ in timeline]
    span = max(times) - min(times) + 1.0 / rate
    ok = sum(1 for _, s in timeline if s == 200)
    limited = sum(1 for _, s in timeline if s == 429)
    return ok / span / rate, limited / len(timeline), len(timeline)


def max_per_window(timeline: list[tuple[float, int]], window_s: float) -> int:
    from ingest.registrar.shared_rate import max_in_window

    return max_in_window([t for t, _ in timeline], window_s)


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (the tests' recipe); yields a database URL."""
    from tests.support.postgres import _as_owner, _bin_dir, _run

    bin_dir, root = _bin_dir(), Path(tempfile.mkdtemp(prefix="bench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", c.free_port()
    _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
          "--no-sync"])  # fmt: skip
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o", opts,
          "start"])  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate",
                                  "-w", "stop"]), capture_output=True, timeout=60)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def reset_budget(pg: str) -> None:
    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg)
        try:
            await conn.execute("DROP TABLE IF EXISTS rate_budget")
        finally:
            await conn.close()

    asyncio.run(drop())


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        client_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seconds", type=float, default=0.0)
    ns = p.parse_args()
    seconds = ns.seconds or (8.0 if ns.quick else 30.0)
    rows: list[list[object]] = []
    with postgres() as pg, c.emulator("--rate", str(RATE), "--burst", "1") as v7:
        for server_burst in SERVER_BURSTS:
            c.admin(v7, "config", {"rate_per_s": RATE, "burst": server_burst})
            rows += _points(v7, pg, seconds, server_burst)
        print(f"Against the emulator at {RATE:g} req/s (integer Retry-After), {BATCH} items a "
              f"request, {seconds:g} s a point, 8 senders a process, budget burst 1:")  # fmt: skip
        print(c.table(["server burst", "budget", "processes", "requests", "share of ceiling",
                       "429", "max in 1 s", "slots/grant", "voided", "missed"], rows))  # fmt: skip
        grant_rows: list[list[object]] = []
        for n_clients in CLIENTS:
            reset_budget(pg)
            cmds = [client_cmd(v7, pg, f"g{i}", min(seconds, 8.0), "--grants", "--senders", "32")
                    for i in range(n_clients)]  # fmt: skip
            results = run_clients(cmds, seconds + 60)
            span = max(r["seconds"] for r in results)
            grants = sum(r["grants"] for r in results) / span
            slots = sum(r["slots"] for r in results) / span
            grant_rows.append([n_clients, round(grants), round(slots)])
        print("\nThe row alone (no V7 requests; 32 senders per process, ceiling 1e6/s):")
        print(c.table(["processes", "grants/s", "slots/s"], grant_rows))


def _points(v7: str, pg: str, seconds: float, server_burst: float) -> list[list[object]]:
    """The local limiter (one process), then the shared budget with 1, 2, 4 processes."""
    c.admin(v7, "reset", {})
    run_clients([client_cmd(v7, pg, "local", seconds, "--local")], seconds + 60)
    share, limited, n = share_of_ceiling(_timeline(v7), RATE)
    rows: list[list[object]] = [[server_burst, "local Limiter", 1, n, round(share, 3),
                                 f"{limited:.2%}", max_per_window(_timeline(v7), 1.0), "-", "-",
                                 "-"]]  # fmt: skip
    for n_clients in CLIENTS:
        c.admin(v7, "reset", {})
        reset_budget(pg)
        cmds = [client_cmd(v7, pg, f"c{i}", seconds) for i in range(n_clients)]
        results = run_clients(cmds, seconds + 60)
        tl = _timeline(v7)
        share, limited, n = share_of_ceiling(tl, RATE)
        grants = sum(r["grants"] for r in results)
        slots = sum(r["slots"] for r in results)
        rows.append([server_burst, "shared", n_clients, n, round(share, 3), f"{limited:.2%}",
                     max_per_window(tl, 1.0), round(slots / max(grants, 1), 2),
                     sum(r["voided"] for r in results),
                     sum(r["missed"] for r in results)])  # fmt: skip
    return rows


def _timeline(v7: str) -> list[tuple[float, int]]:
    return [(float(t), int(s)) for t, s in c.emulator_state(v7).get("timeline", [])]


if __name__ == "__main__":
    main()
