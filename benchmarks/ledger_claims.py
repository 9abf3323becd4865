"""Several processes, one job: the PostgreSQL ledger's claim rate, and keys/s for N processes.

Part 1, in this process: ``ITEMS`` items recorded in pages of 1,000 by a handle that then
"dies" (its claims reaped), and the time to take them all over:

- **PG claim**: a joined handle's ``pending()`` — ``UPDATE … WHERE id IN (SELECT … FOR UPDATE
  SKIP LOCKED)`` in chunks of 1,000, each item now claimed with our fencing token;
- **PG claim x4**: four joined handles claiming concurrently from the same items (aggregate
  rate; every item claimed exactly once is checked);
- **SQLite recovery**: SQLite's equivalent, ``pending()`` on a single-process ledger (a
  read: one process per job needs no claims), and **PG read**: the same read on an unjoined
  PostgreSQL handle (the cost of the claim itself is PG claim vs PG read).
- **claim + send cycle**: per batch of 10, ``mark_sent`` (fenced, all or nothing) then
  ``record_outcomes`` (fenced): the per-batch ledger cost of a claimed item on the send path,
  PG joined vs SQLite.

Part 2, subprocesses: ``ingest run`` over a synthetic S3 listing (``OBJECTS`` keys in 40
folders, sharded two levels down) against an unlimited emulator (``--rate 0``), 10 items a
request: N = 1, 2, 4 processes on one job with a PostgreSQL ledger (all started at once;
wall time until the last exits), and one process on SQLite as the baseline. Aggregate
keys/s = objects / wall.

PostgreSQL runs with ``fsync=off`` (the test cluster); SQLite runs WAL with
``synchronous=NORMAL`` (no fsync per commit either), so neither pays for durable commits.

    python -m benchmarks.ledger_claims                 # 20,000 items, 20,000 objects
    python -m benchmarks.ledger_claims --quick         # 5,000 and 5,000
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks import _common as c
from ingest.ledger import open_ledger
from ingest.ledger.port import LedgerPort
from ingest.ledger.postgres import PostgresLedger
from ingest.model import Item, ItemType, ObjectInfo, Outcome, Slot, State
from tests.support.postgres import PostgresServer, running_postgres

PAGE = 1000


def _items(n: int) -> list[tuple[list[ObjectInfo], list[Item]]]:
    pages = []
    for start in range(0, n, PAGE):
        objs = [
            ObjectInfo(f"b/{i // 1000:04d}/img_{i:07d}.jpg", 10, etag="e", last_modified="")
            for i in range(start, min(n, start + PAGE))
        ]
        items = [
            Item(
                "/" + o.key.rsplit("/", 1)[0],
                o.key.rsplit("/", 1)[1],
                (Slot("0", ItemType.IMAGE, (o,), o.key.rsplit("/", 1)[1]),),
                compact=True,
            )
            for o in objs
        ]
        pages.append((objs, items))
    return pages


def _no_collision(_item: Item, _keys: tuple[str, ...]) -> list[Any]:
    return []


async def _fill(lg: LedgerPort, pages: list[tuple[list[ObjectInfo], list[Item]]]) -> None:
    await lg.start_run("run")
    # A joined handle records only pages of shards it holds, as a listing process does.
    await lg.register_shards([f"s{n:05d}" for n in range(len(pages))])
    for n, (objs, items) in enumerate(pages):
        if lg.cooperative:
            assert await lg.claim_shard() == (f"s{n:05d}", "")
        await lg.record_page(f"s{n:05d}", "", False, objs, list(items), _no_collision)


async def _drain(lg: LedgerPort) -> list[tuple[str, str]]:
    return [p.item.ident async for p in lg.pending()]


async def _fresh_db(server: PostgresServer) -> str:
    name = f"bench_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(server.url())
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.url(name)


async def _pg_claims(server: PostgresServer, n: int) -> dict[str, float]:
    pages = _items(n)
    out: dict[str, float] = {}
    # One claimer.
    url = await _fresh_db(server)
    dead = await PostgresLedger.open(url, "job")
    await dead.join("dead", 60)
    await _fill(dead, pages)
    taker = await PostgresLedger.open(url, "job")
    await taker.join("taker", 60)
    await taker.reap_claims(lambda h: h == "dead")
    t = time.perf_counter()
    got = await _drain(taker)
    out["PG claim"] = len(got) / (time.perf_counter() - t)
    assert len(got) == n
    # The same read, unjoined (no claim written).
    reader = await PostgresLedger.open(url, "job")
    t = time.perf_counter()
    got = await _drain(reader)
    out["PG read"] = len(got) / (time.perf_counter() - t)
    # The send path: mark_sent + record_outcomes per batch of 10, fenced.
    items = [it for _o, its in pages for it in its][: min(n, 5000)]
    t = time.perf_counter()
    for i in range(0, len(items), 10):
        batch = items[i : i + 10]
        await taker.mark_sent(batch)
        await taker.record_outcomes([Outcome(b.path, b.name, State.REGISTERED) for b in batch])
    out["PG send cycle"] = len(items) / (time.perf_counter() - t)
    for lg in (dead, taker, reader):
        await lg.close()
    # Four claimers at once.
    url = await _fresh_db(server)
    dead = await PostgresLedger.open(url, "job")
    await dead.join("dead", 60)
    await _fill(dead, pages)
    takers = [await PostgresLedger.open(url, "job", pool_max_size=2) for _ in range(4)]
    for k, lg in enumerate(takers):
        await lg.join(f"taker-{k}", 60)
    await takers[0].reap_claims(lambda h: h == "dead")
    t = time.perf_counter()
    results = await asyncio.gather(*(_drain(lg) for lg in takers))
    out["PG claim x4"] = sum(map(len, results)) / (time.perf_counter() - t)
    claimed = Counter(i for r in results for i in r)
    assert len(claimed) == n and max(claimed.values()) == 1, "an item claimed twice"
    out["x4 share min"] = min(map(len, results)) / n
    for lg in (dead, *takers):
        await lg.close()
    return out


async def _sqlite(n: int) -> dict[str, float]:
    pages = _items(n)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        lg = await open_ledger(str(Path(d) / "l.sqlite"), "job")
        await _fill(lg, pages)
        t = time.perf_counter()
        got = await _drain(lg)
        out["SQLite recovery"] = len(got) / (time.perf_counter() - t)
        items = [it for _o, its in pages for it in its][: min(n, 5000)]
        t = time.perf_counter()
        for i in range(0, len(items), 10):
            batch = items[i : i + 10]
            await lg.mark_sent(batch)
            await lg.record_outcomes([Outcome(b.path, b.name, State.REGISTERED) for b in batch])
        out["SQLite send cycle"] = len(items) / (time.perf_counter() - t)
        await lg.close()
    return out


def _processes(server: PostgresServer, objects: int, n: int, sqlite: bool) -> dict[str, Any]:
    d = c.workdir("ledger_claims")
    with c.emulator("--rate", "0") as v7, c.synthetic_s3(objects, folders=40) as s3:
        cfg = c.write_config(
            d / f"n{n}.toml",
            v7_url=v7,
            s3_url=s3,
            ledger=d / f"n{n}.sqlite",
            max_items=10,
            max_in_flight=8,
        )
        env = c.cli_env()
        if not sqlite:
            env["INGEST_LEDGER"] = asyncio.run(_fresh_db(server))
        cmd = c.ingest_cmd(cfg, "--set", "source.fanout_depth=2")
        t = time.perf_counter()
        procs = [
            subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for _ in range(n)
        ]
        codes = [p.wait(1800) for p in procs]
        wall = time.perf_counter() - t
        state = c.emulator_state(v7)
    stored = c.counter(state, "items_stored")
    return {
        "ledger": "SQLite" if sqlite else "PostgreSQL",
        "processes": n,
        "codes": codes,
        "stored": stored,
        "wall_s": wall,
        "keys_per_s": objects / wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--items", type=int)
    ap.add_argument("--objects", type=int)
    ns = ap.parse_args(argv)
    items = ns.items or (5000 if ns.quick else 20000)
    objects = ns.objects or (5000 if ns.quick else 20000)
    print(c.load_note())
    with running_postgres() as server:
        rates = asyncio.run(_pg_claims(server, items))
        rates |= asyncio.run(_sqlite(items))
        print(f"\nclaims over {items:,} items (items/s):")
        for k in ("PG claim", "PG claim x4", "PG read", "SQLite recovery"):
            print(f"  {k:<16} {rates[k]:>10,.0f}")
        print(f"  PG claim / SQLite recovery: {rates['PG claim'] / rates['SQLite recovery']:.2f}")
        print(f"  x4: smallest share of one claimer {rates['x4 share min']:.2f}")
        print("send path, mark_sent + record_outcomes per batch of 10 (items/s):")
        print(f"  PG (fenced)      {rates['PG send cycle']:>10,.0f}")
        print(f"  SQLite           {rates['SQLite send cycle']:>10,.0f}")
        print(f"\nengine processes over {objects:,} objects, unlimited emulator, 10 items/request:")
        runs = [_processes(server, objects, 1, sqlite=True)]
        runs += [_processes(server, objects, n, sqlite=False) for n in (1, 2, 4)]
        base = runs[0]["keys_per_s"]
        for r in runs:
            ok = "ok" if set(r["codes"]) == {0} and r["stored"] == objects else "CHECK"
            print(
                f"  {r['ledger']:<10} N={r['processes']}  {r['wall_s']:6.1f} s  "
                f"{r['keys_per_s']:8,.0f} keys/s  x{r['keys_per_s'] / base:.2f} of SQLite N=1  "
                f"stored {r['stored']:,}  exit {r['codes']} {ok}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
