"""Nightly sync at scale: a 1,000,000-object bucket of which 1,000 are new, against a full run.

Three steps, each `python -m ingest …` in its own process (the servers in theirs):

1. **pre-fill** (setup, timed for information): ``ingest run`` over the bucket *before* the new
   objects arrived (the synthetic listing leaves out every 1,000th key) into emulator A.
2. **sync**: ``ingest sync`` over the whole bucket with that ledger, into the same emulator A
   (which holds the 999,000 items already, as V7 would). Then a **second sync** over the same,
   unchanged bucket: the steady state of a nightly job.
3. **baseline**: a full ``ingest run`` of the same 1,000,000-object bucket with a fresh ledger
   into a fresh emulator B, with the same batch size and rate settings as the sync.
4. **floor**: aiobotocore listing the same keys and nothing else (benchmarks/overhead.py's
   listing baseline), with botocore's timestamp parser and with none at all: a sync costs one
   listing plus what is new, so its wall time should sit near these.

Both V7 emulators are unlimited (``--rate 0``) so that the figures are the engine's own work;
under V7's real rate limit the difference is the ratio of register requests, since a full run
is then paced by its requests (100,000 at 10 items a request) and a sync by its listing.
Figures: wall time, register requests sent (the emulator's count), items stored, peak RSS of
the engine process (``wait4``).

    python -m benchmarks.sync                  # 1,000,000 objects, 1,000 new
    python -m benchmarks.sync --quick          # 200,000 objects, 200 new
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from benchmarks import _common as c
from benchmarks.overhead import listing_baseline


def _step(name: str, cmd: list[str], v7: str, log: Path) -> dict[str, Any]:
    before = c.emulator_state(v7)
    run = c.run_child(cmd, log=log)
    after = c.emulator_state(v7)
    summary = next((ln for ln in run.output.splitlines() if ln.startswith("done in")), "")
    return {
        "what": name,
        "returncode": run.returncode,
        "wall_s": run.wall_s,
        "peak_rss_mb": run.peak_rss_mb,
        "requests": c.counter(after, "register_requests") - c.counter(before, "register_requests"),
        "stored": c.counter(after, "items_stored") - c.counter(before, "items_stored"),
        "summary": summary,
        "tail": run.output[-1500:],
    }


def _config(
    d: Path, name: str, v7: str, s3: str, ledger: Path, max_items: int, keep: bool = False
) -> Path:
    return c.write_config(
        d / f"{name}.toml",
        v7_url=v7,
        s3_url=s3,
        ledger=ledger,
        max_items=max_items,
        keep_ledger=keep,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200,000 objects, 200 new")
    ap.add_argument("--objects", type=int, default=0, help="bucket size (default 1,000,000)")
    ap.add_argument("--new-every", type=int, default=1000, help="one object in K is new")
    ap.add_argument("--max-items", type=int, default=10, help="items a request (V7 SDK: 10)")
    ns = ap.parse_args(argv)
    objects = ns.objects or (200_000 if ns.quick else 1_000_000)
    new = objects // ns.new_every
    d = c.workdir("sync")
    ledger = d / "ledger.sqlite"
    print(
        f"== sync: {objects:,} objects, {new:,} new, {ns.max_items} items a request "
        f"({c.load_note()})",
        flush=True,
    )
    steps: list[dict[str, Any]] = []
    with c.emulator("--rate", "0") as v7:
        # 1. The ledger as last night's run left it (bigger batches: this is only setup).
        with c.synthetic_s3(objects, hide_every=ns.new_every) as s3:
            cfg = _config(d, "prefill", v7, s3, ledger, max_items=500)
            prefill = c.ingest_cmd(cfg)
            steps.append(_step("pre-fill: ingest run (setup)", prefill, v7, d / "prefill.log"))
        # 2. Tonight's sync, then the next night's over an unchanged bucket.
        with c.synthetic_s3(objects) as s3:
            cfg = _config(d, "sync", v7, s3, ledger, ns.max_items, keep=True)
            sync_cmd = [sys.executable, "-m", "ingest", "sync", "--config", str(cfg)]
            steps.append(_step("ingest sync", sync_cmd, v7, d / "sync.log"))
            steps.append(_step("ingest sync again (nothing new)", sync_cmd, v7, d / "sync2.log"))
    # 3. The baseline: a full run of the same bucket, fresh ledger, fresh V7.
    with c.emulator("--rate", "0") as v7, c.synthetic_s3(objects) as s3:
        cfg = _config(d, "full", v7, s3, d / "full.sqlite", ns.max_items)
        steps.append(_step("ingest run, full (baseline)", c.ingest_cmd(cfg), v7, d / "full.log"))

    list_rate, list_rss = listing_baseline(objects)
    fast_rate, fast_rss = listing_baseline(objects, fast=True)
    list_s, fast_s = objects / list_rate, objects / fast_rate
    prefill, sync, resync, full = steps
    for s in steps:
        print(f"{s['what']}: exit {s['returncode']}; {s['summary']}", flush=True)
    print()
    rows: list[list[object]] = [
        [s["what"], s["wall_s"], s["wall_s"] / list_s, s["requests"], s["stored"], s["peak_rss_mb"]]
        for s in steps
    ]
    rows.append(["listing only (aiobotocore)", list_s, 1.0, 0, 0, list_rss])
    rows.append(["listing only, no timestamp parse", fast_s, fast_s / list_s, 0, 0, fast_rss])
    headers = ["what", "wall s", "÷ listing", "register requests", "items stored", "peak RSS MB"]
    print(c.table(headers, rows))
    print()
    print(
        f"sync / full run: wall {sync['wall_s'] / full['wall_s']:.3f}, register requests "
        f"{sync['requests'] / max(full['requests'], 1):.4f}, peak RSS "
        f"{sync['peak_rss_mb'] / max(full['peak_rss_mb'], 1e-9):.2f}; "
        f"sync / listing only: wall {sync['wall_s'] / list_s:.2f} "
        f"({sync['wall_s'] / fast_s:.2f} against the no-parse listing)"
    )
    expected_requests = -(-new // ns.max_items)
    ok = (
        all(s["returncode"] == 0 for s in steps)
        and prefill["stored"] == objects - new
        and sync["stored"] == new
        and resync["requests"] == 0
        and full["stored"] == objects
    )
    print(
        f"sync registered {sync['stored']:,} of {new:,} new in {sync['requests']:,} requests "
        f"(ceil(new / batch) = {expected_requests:,}); second sync sent {resync['requests']:,}; "
        f"all as expected: {ok}"
    )
    if not ok:
        for s in steps:
            print(f"--- {s['what']} (exit {s['returncode']}):\n{s['tail']}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
