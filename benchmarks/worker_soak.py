"""The long-lived worker: does anything grow with the number of syncs it has run?

A worker runs for weeks; a leak of a few kilobytes per sync is invisible in a test and fatal in
production. This runs ``ingest worker`` with ``schedule = "every 1s"`` over a synthetic
20,000-object bucket (benchmarks/synthetic_s3.py) and the V7 emulator (unlimited), and samples
the worker process's RSS (psutil) and each sync's duration (from ``/metrics``) as the syncs go
by. The first sync registers the bucket; every later one is the steady state of a nightly job
(one listing, nothing new, zero register requests). The baseline is the worker itself, early
on: RSS and sync time after the warm-up syncs against the same at the end. Then SIGTERM, and
the exit code must be 0.

    python -m benchmarks.worker_soak              # 150 syncs
    python -m benchmarks.worker_soak --quick      # 40 syncs
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks import _common as c

WARMUP_SYNCS = 5


def _metrics(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def main(argv: list[str] | None = None) -> int:
    import psutil

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="40 syncs")
    ap.add_argument("--syncs", type=int, default=0, help="syncs to run (default 150)")
    ap.add_argument("--objects", type=int, default=20_000)
    ns = ap.parse_args(argv)
    syncs = ns.syncs or (40 if ns.quick else 150)
    d = c.workdir("soak")
    port = c.free_port()
    print(
        f"== worker soak: {syncs} syncs of {ns.objects:,} objects, every 1 s ({c.load_note()})",
        flush=True,
    )
    with c.synthetic_s3(ns.objects) as s3, c.emulator("--rate", "0") as v7:
        cfg = c.write_config(
            d / "soak.toml",
            v7_url=v7,
            s3_url=s3,
            ledger=d / "ledger.sqlite",
            extra=f'\n[worker]\nschedule = "every 1s"\nhttp_host = "127.0.0.1"\n'
            f"http_port = {port}\ngrace_period_s = 30\n",
        )
        log = (d / "worker.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingest", "worker", "--config", str(cfg)],
            env=c.cli_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=c.ROOT,
        )
        ps = psutil.Process(proc.pid)
        samples: list[tuple[int, float, float]] = []  # (syncs done, RSS MB, wall clock)
        seen = 0
        deadline = time.monotonic() + 60 + syncs * 10
        try:
            while seen < syncs and time.monotonic() < deadline and proc.poll() is None:
                done = int(_metrics(port).get("ingest_syncs_total", 0))
                if done > seen:
                    seen = done
                    samples.append((done, ps.memory_info().rss / 2**20, time.monotonic()))
                time.sleep(0.05)  # polling an outside process's counter, not synchronisation
            stats = _metrics(port)
            state = c.emulator_state(v7)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            log.close()
    return _report(samples, syncs, code, stats, state, ns.objects, d / "worker.log")


def _report(
    samples: list[tuple[int, float, float]],
    syncs: int,
    code: int,
    stats: dict[str, float],
    state: dict[str, object],
    objects: int,
    log: Path,
) -> int:
    if len(samples) < WARMUP_SYNCS + 2:
        print(f"error: only {len(samples)} syncs seen (exit {code}); see {log}", file=sys.stderr)
        return 1
    early = [s for s in samples if s[0] <= WARMUP_SYNCS + 5 and s[0] > WARMUP_SYNCS]
    late = samples[-5:]
    rss_early = max(s[1] for s in early)
    rss_late = max(s[1] for s in late)
    # Seconds per sync, from the times the counter moved (schedule 1 s + the sync itself).
    period_early = (early[-1][2] - early[0][2]) / max(early[-1][0] - early[0][0], 1)
    period_late = (late[-1][2] - late[0][2]) / max(late[-1][0] - late[0][0], 1)
    per_sync_kb = (rss_late - rss_early) * 1024 / max(late[-1][0] - early[-1][0], 1)
    rows: list[list[object]] = [
        [f"syncs {early[0][0]}-{early[-1][0]}", rss_early, period_early],
        [f"syncs {late[0][0]}-{late[-1][0]}", rss_late, period_late],
    ]
    print(c.table(["when", "worker RSS MB (max)", "s between syncs"], rows))
    print()
    requests = c.counter(state, "register_requests")
    stored = c.counter(state, "items_stored")
    print(
        f"RSS late / early: {rss_late / rss_early:.3f} ({per_sync_kb:+.1f} KB per sync); "
        f"sync period late / early: {period_late / period_early:.2f}; "
        f"register requests in all {requests:,} (first sync only: "
        f"{-(-objects // 500):,} expected), items stored {stored:,}; "
        f"objects listed {stats.get('ingest_objects_listed_total', 0):,.0f}; "
        f"SIGTERM exit {code}"
    )
    ok = code == 0 and stored == objects and samples[-1][0] >= syncs
    print(f"all as expected: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
