"""Listing cost per key: raw aiobotocore ``list_objects_v2`` vs the engine's S3 source.

Both list the same keyspace served by ``benchmarks/synthetic_s3.py`` (its own process), the way
the engine does: one recursive shard per folder, ``--concurrency`` shards at a time, 1,000 keys
a page, uvloop. Each variant keeps what the engine keeps of an object (key, size, ETag without
quotes, LastModified as ISO 8601 text). Rounds alternate a, b, a, b, … in one process; the
best round of each is reported (the box is shared: the minimum is the steadiest figure).

- **aiobotocore**: a plain ``AioSession`` client, botocore's own parser end to end.
- **S3Source**: ``ingest.providers.aws.s3.S3Source.list_pages`` exactly as the engine calls it.

CPU µs per key is this process's user+system time (the server's is not counted) over the keys
listed; ``b/a`` < 1 means the source is cheaper.

    python -m benchmarks.listing                      # 300,000 keys, 2 rounds
    python -m benchmarks.listing --objects 100000 --rounds 3
    python -m benchmarks.listing --profile source     # cProfile one S3Source pass, top 25
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import _common as c

PAGE = 1000


async def _folders(endpoint: str) -> list[str]:
    """The synthetic keyspace's folders (data/00000/ …), found with two delimiter listings."""
    from aiobotocore.session import AioSession

    async with _client(AioSession(), endpoint) as s3:
        top = await s3.list_objects_v2(Bucket=c.BUCKET, Prefix="", Delimiter="/")
        out: list[str] = []
        for p in top.get("CommonPrefixes", []):
            sub = await s3.list_objects_v2(Bucket=c.BUCKET, Prefix=p["Prefix"], Delimiter="/")
            out.extend(q["Prefix"] for q in sub.get("CommonPrefixes", []))
        return out


def _client(session: Any, endpoint: str, concurrency: int = 8) -> Any:
    from botocore.config import Config as BotoConfig

    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=BotoConfig(max_pool_connections=max(10, concurrency * 2)),
    )


async def _fan_out(
    folders: list[str], concurrency: int, one: Callable[[str], Awaitable[int]]
) -> int:
    sem = asyncio.Semaphore(concurrency)

    async def bounded(prefix: str) -> int:
        async with sem:
            return await one(prefix)

    return sum(await asyncio.gather(*(bounded(f) for f in folders)))


async def list_aiobotocore(endpoint: str, folders: list[str], concurrency: int) -> int:
    from aiobotocore.session import AioSession

    async with _client(AioSession(), endpoint, concurrency) as s3:

        async def one(prefix: str) -> int:
            n = 0
            params: dict[str, Any] = {"Bucket": c.BUCKET, "Prefix": prefix, "MaxKeys": PAGE}
            while True:
                resp = await s3.list_objects_v2(**params)
                for o in resp.get("Contents", []):
                    _ = (
                        o["Key"],
                        int(o.get("Size", 0)),
                        str(o.get("ETag", "")).strip('"'),
                        o["LastModified"].isoformat(),
                    )
                    n += 1
                if not resp.get("IsTruncated"):
                    return n
                params["ContinuationToken"] = resp["NextContinuationToken"]

        return await _fan_out(folders, concurrency, one)


async def list_source(endpoint: str, folders: list[str], concurrency: int) -> int:
    from ingest.config import SourceConfig
    from ingest.providers import Shard
    from ingest.providers.aws.s3 import S3Source

    cfg = SourceConfig(
        provider="aws",
        bucket=c.BUCKET,
        endpoint_url=endpoint,
        page_size=PAGE,
        list_concurrency=concurrency,
    )
    src = S3Source(cfg, aws_access_key_id="testing", aws_secret_access_key="testing")
    try:

        async def one(prefix: str) -> int:
            n = 0
            async for page in src.list_pages(Shard(prefix)):
                n += len(page.objects)
            return n

        return await _fan_out(folders, concurrency, one)
    finally:
        await src.close()


VARIANTS = {"aiobotocore": list_aiobotocore, "source": list_source}


def _measure(
    name: str, endpoint: str, folders: list[str], concurrency: int
) -> tuple[int, float, float]:
    """(keys, wall s, CPU s) of one pass of ``name``."""
    import uvloop

    cpu0, t0 = c.self_cpu_s(), time.perf_counter()
    n = uvloop.run(VARIANTS[name](endpoint, folders, concurrency))
    return n, time.perf_counter() - t0, c.self_cpu_s() - cpu0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100,000 keys, 2 rounds")
    ap.add_argument("--objects", type=int, default=0, help="keys to list (default 300,000)")
    ap.add_argument("--folders", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", choices=sorted(VARIANTS), help="cProfile one pass, print top 25")
    ap.add_argument("--only", choices=sorted(VARIANTS), help="run this variant only (for py-spy)")
    ns = ap.parse_args(argv)
    objects = ns.objects or (100_000 if ns.quick else 300_000)
    import uvloop

    with c.synthetic_s3(objects, folders=ns.folders) as s3:
        folders = uvloop.run(_folders(s3))
        if ns.profile:
            prof = cProfile.Profile()
            prof.enable()
            n, wall, cpu = _measure(ns.profile, s3, folders, ns.concurrency)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
            print(out.getvalue())
            print(f"{ns.profile}: {n} keys, {n / wall:,.0f} keys/s under cProfile")
            return 0
        best: dict[str, tuple[float, float]] = {}  # name -> (keys/s, CPU µs/key)
        for r in range(ns.rounds):
            for name in [ns.only] if ns.only else VARIANTS:
                n, wall, cpu = _measure(name, s3, folders, ns.concurrency)
                if n != objects:
                    print(f"error: {name} listed {n} keys, expected {objects}")
                    return 1
                rate, us = n / wall, cpu / n * 1e6
                print(
                    f"round {r + 1} {name:12} {rate:9,.0f} keys/s {us:7.2f} CPU µs/key", flush=True
                )
                prev = best.get(name)
                best[name] = (max(rate, prev[0]), min(us, prev[1])) if prev else (rate, us)
    if ns.only:
        return 0
    a, b = best["aiobotocore"], best["source"]
    print()
    print(f"{objects:,} keys, {len(folders)} shards, concurrency {ns.concurrency}; {c.load_note()}")
    print(
        c.table(
            ["variant", "keys/s", "CPU µs/key", "÷ aiobotocore keys/s", "÷ aiobotocore µs/key"],
            [
                ["aiobotocore list_objects_v2", a[0], a[1], 1.0, 1.0],
                ["S3Source.list_pages", b[0], b[1], b[0] / a[0], b[1] / a[1]],
            ],
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
