"""Rate efficiency: how much of a rate-limited V7 the engine actually uses.

The emulator (its own process) allows R register requests/s (token bucket, burst 1, 429 with an
integer ``Retry-After`` like HTTP) and answers after L ms; the engine (``python -m ingest run``,
its own process) registers N objects listed from benchmarks/synthetic_s3.py, 10 items a request.

- **known rate**: the engine is configured at R. Efficiency = achieved items/s ÷ (R x 10),
  items/s measured on the emulator's timeline (first to last register request, + one interval).
  Target >= 0.97 with < 1 % of requests answered 429, at L = 0, 50, 200 ms.
- **unknown rate**: the engine is configured at 10 x R (it has to find R): efficiency over the
  whole run and over its second half, and the settling time = the earliest t after which < 1 %
  of the register requests were answered 429 (from the emulator's timeline).
- **baseline, darwin-py-like sender** (same emulator, same run): one request at a time, 10 items,
  a new TCP connection per POST (``http.client``, ``Connection: close``), on 429 sleep and send
  the same request again. darwin-py sleeps 60 s on a first 429; here the sleep is scaled down to
  ``--baseline-sleep`` (0.25 s) so the run ends, and the figure with the real 60 s is
  extrapolated: measured time + (60 - scaled sleep) x number of 429s. It sends ``--baseline``
  items (fewer than N: its rate, not its total, is what is compared).

    python -m benchmarks.rate_efficiency             # N = 20,000 (about 100 s per run)
    python -m benchmarks.rate_efficiency --quick     # N = 4,000
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks import _common as c
from ingest.emulator import API_KEY

RATE = 20.0
BATCH = 10
LATENCIES_MS = (0, 50, 200)
DARWIN_SLEEP_S = 60.0
BURST = 1.0  # the emulator's token bucket depth (--burst)
ENGINE_SET: list[str] = []  # --set overrides passed to `ingest run` (--engine-set)


@dataclass
class Timeline:
    """Register requests as the emulator saw them: (seconds since it started, HTTP status)."""

    events: list[tuple[float, int]]

    @classmethod
    def of(cls, state: dict[str, Any]) -> Timeline:
        return cls([(float(t), int(s)) for t, s in state.get("timeline", [])])

    def ok(self, start: float = float("-inf")) -> list[float]:
        return [t for t, s in self.events if s == 200 and t >= start]

    def items_per_s(self, start: float = float("-inf")) -> float:
        """Items/s between the first and the last accepted request after ``start``, counting
        one request interval for the last one (n requests at R/s take n/R seconds)."""
        ok = self.ok(start)
        if len(ok) < 2:
            return 0.0
        span = ok[-1] - ok[0] + 1.0 / RATE
        return len(ok) * BATCH / span

    def fraction_429(self, start: float = float("-inf")) -> float:
        ev = [s for t, s in self.events if t >= start]
        return sum(1 for s in ev if s == 429) / max(len(ev), 1)

    def gap_ms(self, q: float) -> float:
        """Quantile ``q`` of the gaps between consecutive register requests as the emulator
        saw them (ms): pacing at R/s gives 1000/R; a loaded machine bunches them."""
        t = [x for x, _ in self.events]
        gaps = sorted(b - a for a, b in itertools.pairwise(t))
        return 1000 * gaps[min(int(q * len(gaps)), len(gaps) - 1)] if gaps else 0.0

    def settle_s(self, threshold: float = 0.01) -> float:
        """Seconds from the first request until, from then on, < ``threshold`` of requests
        were answered 429 (a suffix scan over the timeline)."""
        if not self.events:
            return 0.0
        t0 = self.events[0][0]
        n429 = 0
        settle = self.events[-1][0]
        for n, (t, s) in enumerate(reversed(self.events), start=1):
            n429 += s == 429
            if n429 / n < threshold:
                settle = t
        return settle - t0


def emulator_args(latency_ms: float) -> list[str]:
    return ["--rate", str(RATE), "--burst", str(BURST), "--latency-ms", str(latency_ms)]


def engine_run(
    s3_url: str, objects: int, latency_ms: float, configured_rate: float
) -> dict[str, Any]:
    d = c.workdir("rate")
    with c.emulator(*emulator_args(latency_ms)) as v7:
        cfg = c.write_config(
            d / "rate.toml",
            v7_url=v7,
            s3_url=s3_url,
            ledger=d / "ledger.sqlite",
            requests_per_s=configured_rate,
            max_in_flight=8,
            max_items=BATCH,
        )
        more = [x for kv in ENGINE_SET for x in ("--set", kv)]
        run = c.run_child(c.ingest_cmd(cfg, *more), log=d / f"ingest-L{latency_ms:g}.log")
        state = c.emulator_state(v7)
    tl = Timeline.of(state)
    name = f"timeline-L{latency_ms:g}-R{configured_rate:g}.json"
    (d / name).write_bytes(orjson.dumps(tl.events))  # for a closer look
    stored = c.counter(state, "items_stored")
    mid = (tl.events[0][0] + tl.events[-1][0]) / 2 if tl.events else 0.0
    return {
        "latency_ms": latency_ms,
        "configured": configured_rate,
        "ok": run.returncode == 0 and stored == objects,
        "stored": stored,
        "wall_s": run.wall_s,
        "requests": len(tl.events),
        "n429": sum(1 for _, s in tl.events if s == 429),
        "frac429": tl.fraction_429(),
        "eff": tl.items_per_s() / (RATE * BATCH),
        "eff_wall": objects / run.wall_s / (RATE * BATCH),
        "eff_2nd_half": tl.items_per_s(mid) / (RATE * BATCH),
        "frac429_2nd_half": tl.fraction_429(mid),
        "settle_s": tl.settle_s(),
        "gap_p1": tl.gap_ms(0.01),
        "gap_p50": tl.gap_ms(0.5),
    }


def darwin_like(v7_url: str, items: int, sleep_s: float) -> dict[str, Any]:
    """One request at a time, 10 items, a new connection per POST, sleep on 429, same request
    again. Returns the measured time and the number of 429s."""
    u = urlsplit(v7_url)
    path = "/api/v2/teams/emulator-team/items/register_existing"
    headers = {
        "Authorization": f"ApiKey {API_KEY}",
        "Content-Type": "application/json",
        "Accept": "application/json",
        "Connection": "close",
    }
    n429 = 0
    t0 = time.perf_counter()
    for start in range(0, items, BATCH):
        body = orjson.dumps(
            {
                "items": [
                    {
                        "path": "/",
                        "type": "image",
                        "name": f"{i:09d}.jpg",
                        "storage_key": f"data/{i:09d}.jpg",
                    }
                    for i in range(start, min(start + BATCH, items))
                ],
                "dataset_slug": c.DATASET,
                "storage_slug": c.STORAGE,
            }
        )
        while True:
            conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=60)
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
            finally:
                conn.close()
            if resp.status == 429:
                n429 += 1
                time.sleep(sleep_s)
                continue
            if resp.status != 200:
                raise RuntimeError(f"darwin-like sender: HTTP {resp.status}")
            break
    return {"seconds": time.perf_counter() - t0, "n429": n429}


def baseline_run(items: int, latency_ms: float, sleep_s: float) -> dict[str, Any]:
    with c.emulator(*emulator_args(latency_ms)) as v7:
        r = darwin_like(v7, items, sleep_s)
        stored = c.counter(c.emulator_state(v7), "items_stored")
    real = r["seconds"] + r["n429"] * (DARWIN_SLEEP_S - sleep_s)
    return {
        "latency_ms": latency_ms,
        "ok": stored == items,
        "n429": r["n429"],
        "requests": items // BATCH + r["n429"],
        "eff_scaled": items / r["seconds"] / (RATE * BATCH),
        "eff_60s": items / real / (RATE * BATCH),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4,000 objects instead of 20,000")
    ap.add_argument("--objects", type=int, default=0)
    ap.add_argument("--baseline", type=int, default=0, help="items the baseline sends (1,000)")
    ap.add_argument("--baseline-sleep", type=float, default=0.25, help="its sleep on 429 (s)")
    ap.add_argument("--latencies", default=",".join(map(str, LATENCIES_MS)))
    ap.add_argument("--burst", type=float, default=1.0, help="the emulator's bucket depth")
    ap.add_argument(
        "--engine-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override for `ingest run` (diagnosis), e.g. source.page_size=100",
    )
    ns = ap.parse_args(argv)
    global BURST
    BURST = ns.burst
    ENGINE_SET[:] = ns.engine_set
    objects = ns.objects or (4_000 if ns.quick else 20_000)
    base_items = ns.baseline or (400 if ns.quick else 1_000)
    latencies = [float(x) for x in ns.latencies.split(",") if x]
    print(
        f"== rate efficiency: {objects:,} objects, emulator {RATE:g} req/s (burst {BURST:g}), "
        f"batch {BATCH} ({c.load_note()})"
        + (f"; engine overrides: {' '.join(ENGINE_SET)}" if ENGINE_SET else "")
    )
    known: list[dict[str, Any]] = []
    base: list[dict[str, Any]] = []
    with c.synthetic_s3(objects, folders=20) as s3:
        for lat in latencies:
            r = engine_run(s3, objects, lat, RATE)
            known.append(r)
            print(
                f"engine, rate known, L={lat:g} ms: efficiency {r['eff']:.3f} "
                f"(wall {r['eff_wall']:.3f}), 429 {r['n429']}/{r['requests']}, "
                f"stored {r['stored']:,}; arrival gaps p1 {r['gap_p1']:.1f} ms, "
                f"median {r['gap_p50']:.1f} ms",
                flush=True,
            )
            b = baseline_run(base_items, lat, ns.baseline_sleep)
            base.append(b)
            print(
                f"darwin-py-like, L={lat:g} ms: efficiency {b['eff_scaled']:.3f} with "
                f"{ns.baseline_sleep:g} s sleeps, {b['eff_60s']:.4f} with 60 s; 429 {b['n429']}",
                flush=True,
            )
        unknown = engine_run(s3, objects, 50, RATE * 10)
        print(
            f"engine, rate unknown (configured {RATE * 10:g}), L=50 ms: efficiency "
            f"{unknown['eff']:.3f} whole, {unknown['eff_2nd_half']:.3f} second half, settled "
            f"after {unknown['settle_s']:.1f} s, 429 {unknown['n429']}/{unknown['requests']}",
            flush=True,
        )
    print()
    rows: list[list[object]] = []
    for r, b in zip(known, base, strict=True):
        rows.append(
            [
                f"{r['latency_ms']:g}",
                r["eff"],
                f"{100 * r['frac429']:.2f} %",
                r["eff_wall"],
                b["eff_scaled"],
                b["eff_60s"],
                r["eff"] / max(b["eff_60s"], 1e-9),
            ]
        )
    print(
        c.table(
            [
                "L ms",
                "engine eff.",
                "engine 429",
                "engine eff. (wall)",
                f"darwin-like eff. (sleep {ns.baseline_sleep:g} s)",
                "darwin-like eff. (sleep 60 s)",
                "engine ÷ darwin-like (60 s)",
            ],
            rows,
        )
    )
    print()
    print(
        c.table(
            [
                "configured",
                "server",
                "L ms",
                "eff. whole",
                "eff. 2nd half",
                "429 whole",
                "429 2nd half",
                "settled after s",
            ],
            [
                [
                    f"{RATE * 10:g} req/s",
                    f"{RATE:g} req/s",
                    "50",
                    unknown["eff"],
                    unknown["eff_2nd_half"],
                    f"{100 * unknown['frac429']:.2f} %",
                    f"{100 * unknown['frac429_2nd_half']:.2f} %",
                    unknown["settle_s"],
                ]
            ],
        )
    )
    met = all(r["eff"] >= 0.97 and r["frac429"] < 0.01 for r in known)
    print(f"\ntarget (>= 0.97, < 1 % 429 at every L): {'met' if met else 'NOT met'}")
    ok = all(r["ok"] for r in [*known, unknown]) and all(b["ok"] for b in base)
    print(f"every run stored every item exactly once: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
