"""Rate efficiency: how much of a rate-limited V7 the engine uses, beside darwin-py, same run.

The emulator (its own process) allows R = 20 register requests/s (token bucket of depth 1 or
20, 429 with an integer ``Retry-After`` like HTTP) and answers after L ms (``±10`` = uniform
L-10..L+10 ms, added after the limiter, as a far server's latency would be); the engine
(``python -m ingest run``, its own process) registers N objects listed from
benchmarks/synthetic_s3.py, 10 items a request, 8 in flight. Efficiency = accepted items/s on
the emulator's own arrival timeline (first to last accepted register request, + one interval)
÷ (R x 10).

Scenarios (``--scenarios``):

- **known**: the engine is configured at R; every (burst, L) cell of the grid, ``--repeats``
  engine runs each, and one darwin-py run beside them (its real ``dataset.register`` from
  ``.bench/darwin-venv``, as benchmarks/darwin_py.py runs it, ``--darwin-items`` items).
  darwin-py's first wait after a 429 is 60 s; it runs here with ``DARWIN_RETRY_INITIAL_WAIT=1``
  so the run ends, and the 60 s figure is extrapolated (+59 s per 429). Target: >= 0.97 with
  < 1 % 429 in every cell.
- **unknown**: configured 10 x R (the engine has to find R), L = 50 ms, each burst: efficiency
  over the run and the settling time (from then on < 1 % 429). Target: >= 0.9, settled <= 5 s.
- **recovery**: configured R; the server cuts its limit to R/10 after ``--calm`` s and
  restores it ``--storm`` s later (``--rate-schedule``); seconds of 429s after the cut (first
  to last 429 before 3 s without one; the single 429s of later probes are counted apart), and
  how long after the restore the accepted rate is back at >= 0.9 R (every 1 s window for 5 s).
  Target: < 2 s of 429s, back within 10 s.

``--baseline-root DIR`` runs another copy of the code (e.g. ``git archive main ingest | tar -x
-C DIR``) right after each engine run, same cell: a before/after pair from the same window (the
machine is shared; figures from different windows do not compare). ``--engine-root DIR`` runs
only that copy.

    python -m benchmarks.rate_efficiency             # 20,000 objects a run, 2 repeats
    python -m benchmarks.rate_efficiency --quick     # 4,000 objects, 1 repeat, burst 1 + 20
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from benchmarks import _common as c
from benchmarks import darwin_py

RATE = 20.0
BATCH = 10
BURSTS = (1.0, 20.0)
# Cell name → (emulator latency_ms, jitter_ms): "50±10" = 40 ms + uniform 0..20 ms.
NETWORKS = {
    "0": (0.0, 0.0),
    "50": (50.0, 0.0),
    "50±10": (40.0, 20.0),
    "200": (200.0, 0.0),
    "200±10": (190.0, 20.0),
}
DARWIN_SLEEP_S = 60.0  # darwin-py's first wait after a 429 (DARWIN_RETRY_INITIAL_WAIT)


@dataclass
class Timeline:
    """Register requests as the emulator saw them: (seconds since it started, HTTP status)."""

    events: list[tuple[float, int]]

    @classmethod
    def of(cls, state: dict[str, Any]) -> Timeline:
        # The emulator appends a request when it answers: with jitter, not in arrival order.
        return cls(sorted((float(t), int(s)) for t, s in state.get("timeline", [])))

    def ok(self, start: float = float("-inf"), end: float = float("inf")) -> list[float]:
        return [t for t, s in self.events if s == 200 and start <= t < end]

    def items_per_s(self, start: float = float("-inf")) -> float:
        """Items/s between the first and the last accepted request after ``start``, counting
        one request interval for the last one (n requests at R/s take n/R seconds)."""
        ok = self.ok(start)
        if len(ok) < 2:
            return 0.0
        span = ok[-1] - ok[0] + 1.0 / RATE
        return len(ok) * BATCH / span

    def fraction_429(self, start: float = float("-inf"), end: float = float("inf")) -> float:
        ev = [s for t, s in self.events if start <= t < end]
        return sum(1 for s in ev if s == 429) / max(len(ev), 1)

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

    def storm_s(self, start: float, quiet_s: float = 3.0) -> float:
        """Seconds of 429s after ``start``: from the first to the last 429 before the first
        spell of ``quiet_s`` without one (later single 429s are probes finding the limit
        again; a deep bucket delays the first 429 after a cut)."""
        first: float | None = None
        last = start
        for t, s in self.events:
            if t < start or s != 429:
                continue
            if first is not None and t - last >= quiet_s:
                break
            first = t if first is None else first
            last = t
        return 0.0 if first is None else last - first

    def back_at(self, start: float, rate: float, share: float = 0.9, hold_s: float = 5.0) -> float:
        """The earliest t >= start from which every 1 s window for ``hold_s`` accepted
        >= share x rate requests (inf: never)."""
        ok = self.ok(start)
        end = ok[-1] if ok else start
        t = start
        while t + hold_s + 1.0 <= end:
            starts = [t + 0.25 * k for k in range(int(hold_s / 0.25))]
            if all(
                bisect.bisect_left(ok, u + 1.0) - bisect.bisect_left(ok, u) >= share * rate
                for u in starts
            ):
                return t
            t += 0.25
        return math.inf


def emulator_args(burst: float, net: str, schedule: str = "") -> list[str]:
    latency, jitter = NETWORKS[net]
    args = ["--rate", str(RATE), "--burst", str(burst), "--latency-ms", str(latency)]
    args += ["--jitter-ms", str(jitter)]
    return args + (["--rate-schedule", schedule] if schedule else [])


def engine_run(
    ns: argparse.Namespace,
    s3_url: str,
    objects: int,
    burst: float,
    net: str,
    configured: float,
    schedule: str = "",
    tag: str = "",
    root: str = "",
) -> dict[str, Any]:
    d = c.workdir("rate")
    with c.emulator(*emulator_args(burst, net, schedule)) as v7:
        cfg = c.write_config(
            d / "rate.toml",
            v7_url=v7,
            s3_url=s3_url,
            ledger=d / "ledger.sqlite",
            requests_per_s=configured,
            max_in_flight=8,
            max_items=BATCH,
        )
        more = [x for kv in ns.engine_set for x in ("--set", kv)]
        env = c.cli_env()
        cwd = None
        root = root or ns.engine_root
        if root:
            env["PYTHONPATH"] = root
            cwd = Path(root)
        run = c.run_child(c.ingest_cmd(cfg, *more), env=env, log=d / "ingest.log", cwd=cwd)
        state = c.emulator_state(v7)
    tl = Timeline.of(state)
    name = f"timeline-b{burst:g}-L{net}-R{configured:g}{tag}{'-base' if root else ''}.json"
    (d / name).write_bytes(orjson.dumps({"events": tl.events, "rates": state["rate_changes"]}))
    stored = c.counter(state, "items_stored")
    return {
        "ok": run.returncode == 0 and stored == objects,
        "stored": stored,
        "requests": len(tl.events),
        "n429": sum(1 for _, s in tl.events if s == 429),
        "frac429": tl.fraction_429(),
        "eff": tl.items_per_s() / (RATE * BATCH),
        "settle_s": tl.settle_s(),
        "timeline": tl,
        "rate_changes": [(float(t), float(r)) for t, r in state["rate_changes"]],
    }


def darwin_run(py: str, items: int, burst: float, net: str) -> dict[str, Any]:
    """darwin-py's real ``dataset.register`` against the same emulator settings."""
    script = c.workdir("darwin") / "register_with_darwin_py.py"
    script.write_text(darwin_py.DARWIN_SCRIPT, encoding="utf-8")
    with c.emulator(*emulator_args(burst, net)) as v7:
        env = c.cli_env(DARWIN_BASE_URL=v7, HOME=str(c.workdir("darwin")))
        run = c.run_child([py, str(script), str(items), c.DATASET, c.STORAGE], env=env)
        state = c.emulator_state(v7)
    tl = Timeline.of(state)
    n429 = sum(1 for _, s in tl.events if s == 429)
    ok = tl.ok()
    span = ok[-1] - ok[0] + 1.0 / RATE if len(ok) > 1 else float("inf")
    return {
        "ok": run.returncode == 0 and c.counter(state, "items_stored") == items,
        "n429": n429,
        "eff": len(ok) * BATCH / span / (RATE * BATCH),
        "eff_60s": len(ok) * BATCH / (span + n429 * (DARWIN_SLEEP_S - 1)) / (RATE * BATCH),
    }


def engines(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(label, code root) of the engines each cell runs, interleaved: this one, and the
    baseline (``--baseline-root``) right after it in the same window."""
    out = [("engine", "")]
    if ns.baseline_root:
        out.append(("baseline", os.path.abspath(ns.baseline_root)))
    return out


def known(ns: argparse.Namespace, s3: str, objects: int) -> tuple[list[list[object]], bool, bool]:
    py = darwin_py.ensure_venv() if ns.darwin_items else ""
    rows: list[list[object]] = []
    ok = met = True
    for burst, net in itertools.product(ns.burst_list, ns.network_list):
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in engines(ns)}
        for k in range(ns.repeats):
            for label, root in engines(ns):
                r = engine_run(ns, s3, objects, burst, net, RATE, tag=f"-{k}", root=root)
                runs[label].append(r)
                print(
                    f"{label}, burst {burst:g}, L={net} ms, run {k + 1}: efficiency "
                    f"{r['eff']:.3f}, 429 {r['n429']}/{r['requests']}, stored {r['stored']:,}",
                    flush=True,
                )
        dp: dict[str, Any] = {"eff": float("nan"), "eff_60s": float("nan"), "n429": 0, "ok": True}
        if py:
            dp = darwin_run(py, ns.darwin_items, burst, net)
            print(
                f"darwin-py, burst {burst:g}, L={net} ms: efficiency {dp['eff']:.3f} with 1 s "
                f"waits, {dp['eff_60s']:.3f} with 60 s; 429 {dp['n429']}",
                flush=True,
            )
        mine = runs["engine"]
        ok = ok and dp["ok"] and all(r["ok"] for rs in runs.values() for r in rs)
        met = met and all(r["eff"] >= 0.97 and r["frac429"] < 0.01 for r in mine)
        row: list[object] = [f"{burst:g}", net]
        for rs in runs.values():
            row.append(" / ".join(f"{r['eff']:.3f}" for r in rs))
            row.append(" / ".join(f"{100 * r['frac429']:.2f} %" for r in rs))
        row.append(f"{dp['eff']:.3f} / {dp['eff_60s']:.3f} ({dp['n429']})")
        rows.append(row)
    return rows, ok, met


def unknown(ns: argparse.Namespace, s3: str, objects: int) -> tuple[list[list[object]], bool, bool]:
    rows: list[list[object]] = []
    ok = met = True
    for burst, k, (label, root) in itertools.product(ns.burst_list, range(ns.repeats), engines(ns)):
        r = engine_run(ns, s3, objects, burst, "50", RATE * 10, tag=f"-{k}", root=root)
        tl: Timeline = r["timeline"]
        t0 = tl.events[0][0] if tl.events else 0.0
        after = tl.fraction_429(t0 + r["settle_s"])
        print(
            f"{label}, rate unknown (configured {RATE * 10:g}), burst {burst:g}, L=50 ms, "
            f"run {k + 1}: efficiency {r['eff']:.3f}, settled after {r['settle_s']:.1f} s, "
            f"429 {r['n429']}/{r['requests']}",
            flush=True,
        )
        ok = ok and r["ok"]
        if label == "engine":
            met = met and r["eff"] >= 0.9 and r["settle_s"] <= 5.0
        rows.append(
            [
                label,
                f"{burst:g}",
                k + 1,
                r["eff"],
                r["settle_s"],
                f"{100 * r['frac429']:.2f} %",
                f"{100 * after:.2f} %",
            ]
        )
    return rows, ok, met


def recovery(ns: argparse.Namespace) -> tuple[list[list[object]], bool, bool]:
    calm, storm, after = ns.calm, ns.storm, 20.0
    low = RATE / 10
    objects = int(BATCH * (RATE * calm + low * storm + RATE * after))
    schedule = f"{calm:g}:{low:g},{calm + storm:g}:{RATE:g}"
    rows: list[list[object]] = []
    ok = met = True
    with c.synthetic_s3(objects, folders=20) as s3r:
        for burst, k, (label, root) in itertools.product(
            ns.burst_list, range(ns.repeats), engines(ns)
        ):
            tag = f"-rec{k}"
            r = engine_run(ns, s3r, objects, burst, "50", RATE, schedule, tag=tag, root=root)
            tl: Timeline = r["timeline"]
            changes = r["rate_changes"]
            if len(changes) < 2:
                print(f"recovery, burst {burst:g}: the run ended before the restore")
                ok = False
                continue
            (cut, _), (restore, _) = changes[0], changes[1]
            storm_429 = tl.storm_s(cut)
            back_s = tl.back_at(restore, RATE) - restore
            # On a loaded machine the engine may not reach 0.9 R at all: also how long until
            # it is back at 0.9 of what it achieved before the cut.
            calm_rate = len(tl.ok(cut - min(10.0, cut), cut)) / min(10.0, cut)
            back_calm_s = tl.back_at(restore, calm_rate) - restore
            n429_storm = sum(1 for t, s in tl.events if s == 429 and cut <= t < restore)
            late_429 = sum(1 for t, s in tl.events if s == 429 and t >= restore)
            print(
                f"{label}, recovery, burst {burst:g}, run {k + 1}: 429s for {storm_429:.1f} s "
                f"after the cut ({n429_storm} in the storm), back at 0.9 R {back_s:.1f} s after "
                f"the restore ({back_calm_s:.1f} s to 0.9 x the {calm_rate:.1f} req/s before "
                f"the cut); 429 after it: {late_429}; stored {r['stored']:,}",
                flush=True,
            )
            ok = ok and r["ok"]
            if label == "engine":
                met = met and storm_429 < 2.0 and back_s <= 10.0
            rows.append(
                [label, f"{burst:g}", k + 1, storm_429, n429_storm, back_s, back_calm_s, late_429]
            )
    return rows, ok, met


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4,000 objects, 1 repeat")
    ap.add_argument("--objects", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=0, help="engine runs per cell (2; quick 1)")
    ap.add_argument("--bursts", default="1,20", help="the emulator's bucket depths")
    ap.add_argument("--networks", default=",".join(NETWORKS), help=f"of {', '.join(NETWORKS)}")
    ap.add_argument("--scenarios", default="known,unknown,recovery")
    ap.add_argument("--darwin-items", type=int, default=400, help="0 = no darwin-py runs")
    ap.add_argument("--calm", type=float, default=15.0, help="recovery: s before the cut")
    ap.add_argument("--storm", type=float, default=0.0, help="recovery: s at R/10 (30; quick 10)")
    ap.add_argument("--engine-root", default="", help="run the engine from this copy of the code")
    ap.add_argument(
        "--baseline-root",
        default="",
        help="also run this copy of the code after each engine run, same cell (before/after)",
    )
    ap.add_argument(
        "--engine-set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config override for `ingest run` (diagnosis), e.g. source.page_size=100",
    )
    ns = ap.parse_args(argv)
    ns.burst_list = [float(x) for x in ns.bursts.split(",") if x]
    ns.network_list = [x for x in ns.networks.split(",") if x]
    for net in ns.network_list:
        if net not in NETWORKS:
            ap.error(f"--networks: {net!r} is not one of {', '.join(NETWORKS)}")
    ns.repeats = ns.repeats or (1 if ns.quick else 2)
    ns.storm = ns.storm or (10.0 if ns.quick else 30.0)
    objects = ns.objects or (4_000 if ns.quick else 20_000)
    scenarios = set(ns.scenarios.split(","))
    root = os.path.abspath(ns.engine_root) if ns.engine_root else "this worktree"
    print(
        f"== rate efficiency: {objects:,} objects a run, emulator {RATE:g} req/s, bursts "
        f"{ns.bursts}, batch {BATCH}, engine from {root} ({c.load_note()})"
        + (f"; engine overrides: {' '.join(ns.engine_set)}" if ns.engine_set else ""),
        flush=True,
    )
    ok = True
    tables: list[str] = []
    verdicts: list[str] = []
    with c.synthetic_s3(objects, folders=20) as s3:
        if "known" in scenarios:
            rows, good, met = known(ns, s3, objects)
            ok = ok and good
            heads = ["burst", "L ms"]
            for label, _ in engines(ns):
                heads += [f"{label} eff.", f"{label} 429"]
            heads.append("darwin-py eff. (1 s / 60 s)")
            tables.append(c.table(heads, rows))
            verdicts.append(f"known rate (>= 0.97, < 1 % 429 in every cell): {_met(met)}")
        if "unknown" in scenarios:
            rows, good, met = unknown(ns, s3, objects)
            ok = ok and good
            heads = [
                "engine",
                "burst",
                "run",
                "eff.",
                "settled after s",
                "429",
                "429 after settling",
            ]
            tables.append(c.table(heads, rows))
            verdicts.append(f"unknown rate (>= 0.9, settled <= 5 s): {_met(met)}")
    if "recovery" in scenarios:
        rows, good, met = recovery(ns)
        ok = ok and good
        heads = ["engine", "burst", "run", "429s after the cut, s", "429 in storm"]
        heads += ["back at 0.9 R after s", "back at 0.9 x before-cut rate after s"]
        tables.append(c.table([*heads, "429 after the restore"], rows))
        verdicts.append(f"recovery (< 2 s of 429s, back <= 10 s): {_met(met)}")
    for t in tables:
        print(f"\n{t}")
    print()
    for v in verdicts:
        print(v)
    print(f"every run stored every item exactly once: {ok}")
    return 0 if ok else 1


def _met(met: bool) -> str:
    return "met" if met else "NOT met"


if __name__ == "__main__":
    raise SystemExit(main())
