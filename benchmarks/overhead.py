"""Engine overhead and memory: N objects from a synthetic S3 listing into an UNLIMITED emulator,
10 items a request (what V7's own SDK sends), against darwin-py's register loop in the same run.

What it measures, each in its own process (the servers in theirs):

- **darwin-py's register loop alone** (the baseline of the issue): ``dataset.register(store,
  keys)`` with the keys handed to it in memory (no listing), 10 items a request, one request
  after another, into the same unlimited emulator; items/s of ``register()`` only.
- **listing baseline**: aiobotocore paging the same keys exactly as the engine's S3 source
  does (one recursive shard per folder, ``list_concurrency`` 8, 1,000 keys a page, uvloop) and
  nothing else: no planning, no ledger, no V7.
- **engine**: ``python -m ingest run`` end to end (list → plan → ledger → batch → register →
  ledger), 10 items a request, 16 in flight, no rate limit; process start to exit.

Peak RSS of the engine process is the kernel's high-water mark for that child (``wait4``); the
run is repeated at ``--small`` and ``--objects`` keys so the two peaks can be compared.

    python -m benchmarks.overhead                # 100,000 and 1,000,000 keys
    python -m benchmarks.overhead --quick        # 20,000 and 200,000 keys
    python -m benchmarks.overhead --profile p.txt  # py-spy raw profile of the large run
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

import orjson

from benchmarks import _common as c

TARGET_KEYS_PER_S = 20_000
TARGET_VS_DARWIN = 5.0
ITEMS_PER_REQUEST = 10
IN_FLIGHT = 16  # register requests in flight (--in-flight)
DARWIN_KEYS = 50_000  # darwin-py holds every key in memory; its rate does not depend on N


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


def darwin_register(keys: int) -> dict[str, Any]:
    """darwin-py's register loop alone into an unlimited emulator (its own venv)."""
    from benchmarks import darwin_py

    py = darwin_py.ensure_venv()
    script = c.workdir("darwin") / "register_with_darwin_py.py"
    script.write_text(darwin_py.DARWIN_SCRIPT, encoding="utf-8")
    with c.emulator("--rate", "0") as v7:
        env = c.cli_env(DARWIN_BASE_URL=v7, HOME=str(c.workdir("darwin")))
        run = c.run_child([py, str(script), str(keys), c.DATASET, c.STORAGE], env=env)
        stored = c.counter(c.emulator_state(v7), "items_stored")
    if run.returncode != 0 or stored != keys:
        raise RuntimeError(f"darwin-py failed (exit {run.returncode}):\n{run.output[-3000:]}")
    doc = orjson.loads(run.output.strip().splitlines()[-1])
    return {"version": darwin_py.darwin_version(py), "items_per_s": keys / doc["register_s"], **doc}


def engine_run(objects: int, profile: str = "") -> dict[str, Any]:
    """`ingest run` over ``objects`` keys into an unlimited emulator; figures and checks."""
    d = c.workdir("overhead")
    with c.synthetic_s3(objects) as s3, c.emulator("--rate", "0") as v7:
        cfg = c.write_config(
            d / "overhead.toml",
            v7_url=v7,
            s3_url=s3,
            ledger=d / "ledger.sqlite",
            max_items=ITEMS_PER_REQUEST,
            max_in_flight=IN_FLIGHT,
        )
        cmd = c.ingest_cmd(cfg)
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
    global IN_FLIGHT
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20,000 and 200,000 keys")
    ap.add_argument("--objects", type=int, default=0, help="large run (default 1,000,000)")
    ap.add_argument("--small", type=int, default=0, help="small run (default 100,000)")
    ap.add_argument("--darwin-keys", type=int, default=DARWIN_KEYS, help="keys for darwin-py")
    ap.add_argument("--profile", default="", help="py-spy raw profile of the large engine run")
    ap.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="rate.max_in_flight")
    ap.add_argument("--list-only", metavar="ENDPOINT", help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    IN_FLIGHT = ns.in_flight
    if ns.list_only:
        _list_only(ns.list_only, 8, False)
        return 0
    large = ns.objects or (200_000 if ns.quick else 1_000_000)
    small = ns.small or large // 10

    print(f"== engine overhead and memory: {small:,} and {large:,} keys ({c.load_note()})")
    dw = darwin_register(min(ns.darwin_keys, large))
    print(
        f"darwin-py {dw['version']} register loop alone: {dw['items_per_s']:,.0f} items/s "
        f"({ns.darwin_keys:,} keys, register() {dw['register_s']:.1f} s)",
        flush=True,
    )
    list_rate, list_rss = listing_baseline(large)
    print(
        f"listing baseline (aiobotocore only): {list_rate:,.0f} keys/s, peak RSS {list_rss:.0f} MB",
        flush=True,
    )
    runs = []
    for n in (small, large):
        r = engine_run(n, ns.profile if n == large else "")
        runs.append(r)
        print(
            f"engine {n:,} keys: {r['wall_s']:.1f} s, {r['keys_per_s']:,.0f} keys/s, "
            f"{r['requests']:,} requests, peak RSS {r['peak_rss_mb']:.0f} MB, "
            f"stored {r['registered']:,}, exit {r['returncode']}; CPU of the servers: "
            f"emulator {r['emulator_cpu_s']:.1f} s (RSS {r['emulator_rss_mb']:.0f} MB), "
            f"synthetic S3 {r['s3_cpu_s']:.1f} s",
            flush=True,
        )
    big = runs[-1]
    rows: list[list[object]] = [
        [
            "darwin-py register loop (no listing)",
            ns.darwin_keys,
            dw["register_s"],
            dw["items_per_s"],
            1.0,
            "",
        ],
        [
            "listing only (aiobotocore)",
            large,
            "",
            list_rate,
            list_rate / dw["items_per_s"],
            list_rss,
        ],
    ]
    for r in runs:
        rows.append(
            [
                "ingest run (engine, end to end)",
                r["objects"],
                r["wall_s"],
                r["keys_per_s"],
                r["keys_per_s"] / dw["items_per_s"],
                r["peak_rss_mb"],
            ]
        )
    print()
    print(c.table(["what", "keys", "wall s", "items/s", "÷ darwin-py", "peak RSS MB"], rows))
    growth = big["peak_rss_mb"] / max(runs[0]["peak_rss_mb"], 1e-9)
    ratio = big["keys_per_s"] / dw["items_per_s"]
    print()
    print(f"engine ÷ darwin-py register loop: {ratio:.2f} (goal >= {TARGET_VS_DARWIN:g})")
    print(f"engine ÷ listing alone: {big['keys_per_s'] / list_rate:.2f}")
    print(
        f"peak RSS {runs[0]['objects']:,} → {big['objects']:,} keys: "
        f"{runs[0]['peak_rss_mb']:.0f} → {big['peak_rss_mb']:.0f} MB (x{growth:.2f}, goal <= 1.2)"
    )
    print(
        f"goals: >= {TARGET_VS_DARWIN:g}x darwin-py "
        f"{'met' if ratio >= TARGET_VS_DARWIN else 'NOT met'}"
        f"; >= {TARGET_KEYS_PER_S:,} keys/s "
        f"{'met' if big['keys_per_s'] >= TARGET_KEYS_PER_S else 'NOT met'}"
        f"; all stored: {all(r['ok'] for r in runs)}"
    )
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
