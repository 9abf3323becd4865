"""`ingest status` for a person (aligned text tables) and for scripts (JSON): pure functions of
the ledger's ``Status``; the CLI prints what they return.

Counts here are the ledger's, over every run of the job (the progress display and the run
summary show one run's)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Sequence
from typing import Any

from ingest.ledger import Status

# States in the order a reader follows an object through them.
STATE_ORDER = (
    "REGISTERED", "BLOCKED", "FAILED", "SKIPPED", "SENT", "PROCESSING", "PLANNED", "DISCOVERED",
)  # fmt: skip
REASONS_SHOWN = 10


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; ``right`` aligns numbers."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return "  ".join(out).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _ordered(counts: dict[str, int]) -> list[tuple[str, int]]:
    rank = {s: i for i, s in enumerate(STATE_ORDER)}
    return sorted(counts.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))


def state_table(title: str, counts: dict[str, int]) -> list[str]:
    total = sum(counts.values())
    rows = [
        [f"  {state}", f"{n:,}", f"{100 * n / total:.1f}%" if total else "-"]
        for state, n in _ordered(counts)
    ]
    rows.append(["  total", f"{total:,}", ""])
    return table([title, "count", "%"], rows, [False, True, True])


def _epoch(run: dict[str, Any], field: str) -> float | None:
    """An instant of a run in Unix seconds: the ledger's float (``<field>_s``, full
    resolution), else the ISO text (to the second) of a backend that has no float."""
    exact = run.get(f"{field}_s")
    if exact is not None:
        return float(exact)
    iso = run.get(field)
    if not iso:
        return None
    return float(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")))


def run_figures(run: dict[str, Any], now: float) -> dict[str, Any]:
    """A run record plus its duration (s; to ``now`` while running) and its settled items and
    objects per second (registered + blocked + failed items, skipped objects)."""
    started, finished = _epoch(run, "started_at"), _epoch(run, "finished_at")
    end = finished if finished is not None else now
    duration = None if started is None else max(end - started, 0.0)
    counts = run.get("counts") or {}
    settled = sum(int(counts.get(k, 0)) for k in ("registered", "blocked", "failed", "skipped"))
    rate = settled / duration if duration else None
    return {**run, "duration_s": duration, "settled": settled, "settled_per_s": rate}


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def runs_table(runs: Sequence[dict[str, Any]], now: float) -> list[str]:
    rows = []
    for run in (run_figures(r, now) for r in runs):
        counts = run.get("counts") or {}
        started = (run.get("started_at") or "").replace("T", " ").rstrip("Z")
        rate = run["settled_per_s"]
        rows.append(
            [
                f"  {run['id']}",
                str(run.get("kind", "")),
                started[:16],
                _clock(run["duration_s"]),
                "-" if rate is None else f"{rate:,.1f}",
                f"{int(counts.get('registered', 0)):,}",
                f"{int(counts.get('blocked', 0)) + int(counts.get('failed', 0)):,}",
                str(run.get("status", "")),
            ]
        )
    header = ["last runs", "kind", "started (UTC)", "took", "settled/s", "registered",
              "bl+failed", "outcome"]  # fmt: skip
    return table(header, rows, [False, False, False, True, True, True, True, False])


def status_lines(st: Status, ledger: str, now: float) -> list[str]:
    """The whole text of `ingest status`."""
    out = [f"job {st.job}  (ledger {ledger}; counts over every run)", ""]
    out += state_table("objects", st.objects_by_state)
    out.append("")
    out += state_table("items", st.items_by_state)
    if st.changed_objects or st.vanished_objects:
        out += [
            "",
            f"sync: {st.changed_objects:,} changed, {st.vanished_objects:,} vanished "
            "(ingest report --sync changed|vanished)",
        ]
    if st.last_runs:
        out += ["", *runs_table(st.last_runs, now)]
    if st.failures_by_reason:
        rows = [[f"  {n:,}", r] for r, n in top_reasons(st.failures_by_reason)]
        out += ["", *table(["top reasons", "state: reason"], rows, [True, False])]
        out.append("  (every row: ingest report --state FAILED|BLOCKED|SKIPPED)")
    return out


def top_reasons(reasons: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    """The most frequent reasons over every state (the ledger lists FAILED / BLOCKED ones,
    then SKIPPED ones: a slice of that would hide 10,000 skips behind one failure)."""
    return sorted(reasons, key=lambda rn: -rn[1])[:REASONS_SHOWN]


def status_doc(st: Status, now: float) -> dict[str, Any]:
    """`ingest status --format json`: the ledger's status; each run with its duration and
    rate as well."""
    doc = st.as_dict()
    doc["last_runs"] = [run_figures(r, now) for r in st.last_runs]
    return doc


def unknown_job_line(job: str, ledger: str, jobs: Sequence[str]) -> str:
    """One line for a job the ledger does not hold (`status` and `report` exit 2 with it)."""
    if not jobs:
        return f"job {job}: the ledger at {ledger} holds no run yet"
    return (
        f"job {job}: not in the ledger at {ledger}, which holds: {', '.join(jobs)} (the job "
        "name is ledger.job, else dataset + storage + bucket + prefix: set ledger.job to "
        "follow an earlier job)"
    )
