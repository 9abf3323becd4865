"""Engine overhead and memory: N objects from a synthetic S3 listing into an UNLIMITED emulator.

What it measures, each in its own process (the servers in theirs):

- **listing baseline**: aiobotocore paging the same keys exactly as the engine's S3 source
  does (one recursive shard per folder, ``list_concurrency`` 8, 1,000 keys a page, uvloop) and
  nothing else: no planning, no ledger, no V7. ``engine / listing`` is the engine's overhead.
- **listing, fast parse** (informative): the same with botocore's timestamp parser replaced by
  the identity and the S3 "200 with an error inside" handler removed: what listing would cost
  if the source did that (see the README's profile notes).
- **engine**: ``python -m ingest run`` end to end (list → plan → ledger → batch → register →
  ledger) into the emulator with ``--rate 0``. V7 round trips are taken out of the way on
  purpose: 500 items a request, 16 in flight, 10,000 requests/s allowed.

Peak RSS of the engine process is the kernel's high-water mark for that child (``wait4``); the
run is repeated at ``--small`` and ``--objects`` keys so the two peaks can be compared.

    python -m benchmarks.overhead                # 100,000 and 1,000,000 keys
    python -m benchmarks.overhead --quick        # 20,000 and 200,000 keys
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from benchmarks import _common as c

TARGET_KEYS_PER_S = 20_000


# --- listing baseline (runs in a child process: `python -m benchmarks.overhead --list-only`) ---


async def _list_all(endpoint: str, concurrency: int, fast: bool) -> int:
    from aiobotocore.session import AioSession
    from botocore.config import Config as BotoConfig

    session = AioSession()
    if fast:
        session.get_component("response_parser_factory").set_parser_defaults(
            timestamp_parser=lambda s: s
        )
    cfg = BotoConfig(max_pool_connections=max(10, concurrency * 2))
    async with session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=cfg,
    ) as s3:
        folders: list[str] = []
        top = await s3.list_objects_v2(Bucket=c.BUCKET, Prefix="", Delimiter="/")
        for p in top.get("CommonPrefixes", []):
            sub = await s3.list_objects_v2(Bucket=c.BUCKET, Prefix=p["Prefix"], Delimiter="/")
            folders.extend(q["Prefix"] for q in sub.get("CommonPrefixes", []))
        sem = asyncio.Semaphore(concurrency)
        total = 0

        async def one(prefix: str) -> None:
            nonlocal total
            async with sem:
                params: dict[str, Any] = {"Bucket": c.BUCKET, "Prefix": prefix, "MaxKeys": 1000}
                while True:
                    resp = await s3.list_objects_v2(**params)
                    # What the engine's source keeps of each object (no more, no less).
                    for o in resp.get("Contents", []):
                        _ = (o["Key"], int(o.get("Size", 0)), str(o.get("ETag", "")).strip('"'))
                        total += 1
                    if not resp.get("IsTruncated"):
                        return
                    params["ContinuationToken"] = resp["NextContinuationToken"]

        await asyncio.gather(*(one(f) for f in folders))
        return total


def _list_only(endpoint: str, concurrency: int, fast: bool) -> None:
    import uvloop

    t0 = time.perf_counter()
    n = uvloop.run(_list_all(endpoint, concurrency, fast))
    dt = time.perf_counter() - t0
    print(f"listed {n} keys in {dt:.3f} s", flush=True)


def fast_timestamp(text: str) -> Any:
    """ISO 8601 → aware datetime with the C parser; botocore's (dateutil) only as a fallback."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(text)
    except ValueError:
        from botocore.utils import parse_timestamp

        return parse_timestamp(text)


def _engine_fast_parse(config: str) -> int:
    """`ingest run` with the S3 source's botocore session using ``fast_timestamp``: what the
    engine would do with that three-line change in ingest/providers/aws/s3.py (a what-if: the
    client factory, ingest/providers/aws/client.py, is patched in this process only)."""
    from aiobotocore.session import AioSession

    import ingest.providers.aws.client as clientmod
    from ingest.cli import main as cli_main

    class FastSession(AioSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.get_component("response_parser_factory").set_parser_defaults(
                timestamp_parser=fast_timestamp
            )

    clientmod.AioSession = FastSession  # type: ignore[misc]
    return cli_main(["run", "--config", config])


# --- the benchmark -------------------------------------------------------------------------------


def listing_baseline(objects: int, fast: bool = False) -> tuple[float, float]:
    """(keys/s, peak RSS MB) of aiobotocore listing ``objects`` keys, in a child process."""
    with c.synthetic_s3(objects) as s3:
        cmd = [sys.executable, "-m", "benchmarks.overhead", "--list-only", s3]
        if fast:
            cmd.append("--fast-parse")
        run = c.run_child(cmd)
    if run.returncode != 0 or f"listed {objects} keys" not in run.output:
        raise RuntimeError(f"listing baseline failed: {run.output[-2000:]}")
    seconds = float(run.output.split(" in ")[1].split(" s")[0])
    return objects / seconds, run.peak_rss_mb


def engine_run(objects: int, profile: str = "", fast_parse: bool = False) -> dict[str, Any]:
    """`ingest run` over ``objects`` keys into an unlimited emulator; figures and checks."""
    d = c.workdir("overhead")
    with c.synthetic_s3(objects) as s3, c.emulator("--rate", "0") as v7:
        cfg = c.write_config(d / "overhead.toml", v7_url=v7, s3_url=s3, ledger=d / "ledger.sqlite")
        cmd = c.ingest_cmd(cfg)
        if fast_parse:
            cmd = [sys.executable, "-m", "benchmarks.overhead", "--engine-fast-parse", str(cfg)]
        if profile:
            cmd = [
                str(c.ROOT / ".venv/bin/py-spy"),
                "record",
                "-o",
                profile,
                "--format",
                "raw",
                "-r",
                "100",
                "--",
                *cmd,
            ]
        run = c.run_child(cmd, log=d / f"ingest-{objects}.log")
        state = c.emulator_state(v7)
        servers = c.servers_usage()
    registered = c.counter(state, "items_stored")
    ok = run.returncode == 0 and registered == objects
    # RSS when about 10 % and 100 % of the run had passed (sampled every 0.5 s).
    early = [mb for t, mb in run.rss_samples if t <= 0.1 * run.wall_s] or [0.0]
    return {
        "objects": objects,
        "ok": ok,
        "returncode": run.returncode,
        "registered": registered,
        "wall_s": run.wall_s,
        "keys_per_s": objects / run.wall_s,
        "peak_rss_mb": run.peak_rss_mb,
        "rss_at_10pct_mb": max(early),
        "requests": c.counter(state, "register_requests"),
        "emulator_cpu_s": servers.get("emulator", (0.0, 0.0))[0],
        "emulator_rss_mb": servers.get("emulator", (0.0, 0.0))[1],
        "s3_cpu_s": servers.get("s3", (0.0, 0.0))[0],
        "summary": next((ln for ln in run.output.splitlines() if ln.startswith("done in")), ""),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 and 200,000 keys")
    ap.add_argument("--objects", type=int, default=0, help="large run (default 1,000,000)")
    ap.add_argument("--small", type=int, default=0, help="small run (default 100,000)")
    ap.add_argument("--profile", default="", help="py-spy raw profile of the large engine run")
    ap.add_argument("--list-only", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ap.add_argument("--fast-parse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine-fast-parse", metavar="CONFIG", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.list_only:
        _list_only(ns.list_only, 8, ns.fast_parse)
        return 0
    if ns.engine_fast_parse:
        return _engine_fast_parse(ns.engine_fast_parse)
    large = ns.objects or (200_000 if ns.quick else 1_000_000)
    small = ns.small or large // 10

    print(f"== engine overhead and memory: {small:,} and {large:,} keys ({c.load_note()})")
    list_rate, list_rss = listing_baseline(large)
    print(
        f"listing baseline (aiobotocore only): {list_rate:,.0f} keys/s, peak RSS {list_rss:.0f} MB"
    )
    fast_rate, _ = listing_baseline(large, fast=True)
    print(f"listing, fast timestamp parse:       {fast_rate:,.0f} keys/s")
    runs = []
    for n in (small, large):
        r = engine_run(n, ns.profile if n == large else "")
        runs.append(r)
        print(
            f"engine {n:,} keys: {r['wall_s']:.1f} s, {r['keys_per_s']:,.0f} keys/s, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB, stored {r['registered']:,}, exit {r['returncode']}; "
            f"CPU of the servers: emulator {r['emulator_cpu_s']:.1f} s "
            f"(RSS {r['emulator_rss_mb']:.0f} MB), synthetic S3 {r['s3_cpu_s']:.1f} s"
        )
    big = runs[-1]
    what_if = engine_run(large, fast_parse=True)
    print(
        f"engine {large:,} keys, fast timestamp parse (what-if): {what_if['wall_s']:.1f} s, "
        f"{what_if['keys_per_s']:,.0f} keys/s, stored {what_if['registered']:,}"
    )
    rows: list[list[object]] = [
        ["listing only (aiobotocore)", large, "", list_rate, 1.0, list_rss],
        ["listing only, fast timestamp parse", large, "", fast_rate, fast_rate / list_rate, ""],
    ]
    for r in runs:
        rows.append(
            [
                "ingest run (engine)",
                r["objects"],
                r["wall_s"],
                r["keys_per_s"],
                r["keys_per_s"] / list_rate,
                r["peak_rss_mb"],
            ]
        )
    rows.append(
        [
            "ingest run, fast timestamp parse (what-if)",
            large,
            what_if["wall_s"],
            what_if["keys_per_s"],
            what_if["keys_per_s"] / list_rate,
            what_if["peak_rss_mb"],
        ]
    )
    print()
    print(c.table(["what", "keys", "wall s", "keys/s", "÷ listing", "peak RSS MB"], rows))
    growth = big["peak_rss_mb"] / max(runs[0]["peak_rss_mb"], 1e-9)
    print()
    print(f"engine / listing: {big['keys_per_s'] / list_rate:.2f}")
    print(
        f"peak RSS {runs[0]['objects']:,} → {big['objects']:,} keys: "
        f"{runs[0]['peak_rss_mb']:.0f} → {big['peak_rss_mb']:.0f} MB (x{growth:.2f})"
    )
    target = "met" if big["keys_per_s"] >= TARGET_KEYS_PER_S else "NOT met"
    print(
        f"target >= {TARGET_KEYS_PER_S:,} keys/s: {target}; all stored: "
        f"{all(r['ok'] for r in runs)}"
    )
    return 0 if all(r["ok"] for r in [*runs, what_if]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
