"""Live counters shared by the pipeline stages; read by the progress display, summary and metrics.

Plain integers mutated from one event loop: no locks needed.
"""

from __future__ import annotations

import math
import re
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

# Upper bounds (seconds) of the register-request latency buckets; +Inf is implied.
LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


# Numbers in a reason ("gave up after 7 attempts over 901.3 s") would make every failure its
# own reason; HTTP status codes ("HTTP 422") are kept, they are few and telling.
_NUMBER = re.compile(r"(?<!HTTP )(?<![\w.])\d+(?:\.\d+)?(?![\w.])")
REASON_CHARS = 80  # a reason is cut to this many characters
MAX_REASON_KEYS = 200  # distinct reasons kept per counter; later ones are counted as OTHER
OTHER = "other"


def reason_label(reason: str) -> str:
    label = _NUMBER.sub("N", reason.strip())[:REASON_CHARS]
    return label or "unknown"


def count_reason(counts: Counter[str], reason: str) -> None:
    """Count one failure under its folded reason, in at most MAX_REASON_KEYS keys: a worker
    that runs for weeks must not grow a key per distinct message."""
    label = reason_label(reason)
    if label not in counts and len(counts) >= MAX_REASON_KEYS:
        label = OTHER
    counts[label] += 1


@dataclass
class LatencyHistogram:
    """Fixed-bucket histogram: a value v lands in the first bucket whose bound is >= v (the
    Prometheus ``le`` rule); values above the last bound land in the implied +Inf bucket."""

    bounds: tuple[float, ...] = LATENCY_BOUNDS_S
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last = +Inf
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)) or not all(
            math.isfinite(b) for b in self.bounds
        ):
            raise ValueError("LatencyHistogram: bounds must be finite and strictly increasing")
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        elif len(self.counts) != len(self.bounds) + 1:
            raise ValueError("LatencyHistogram: one count per bound plus one for +Inf")

    def observe(self, seconds: float) -> None:
        if math.isnan(seconds):
            return
        seconds = max(seconds, 0.0)  # a clock that stepped back: count it as instant
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= bound), ending with (inf, count)."""
        out: list[tuple[float, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class Stats:
    started_at: float = field(default_factory=time.monotonic)
    listed: int = 0  # objects seen in the listing
    planned: int = 0  # items planned (new this run)
    recovered: int = 0  # items re-queued from the ledger (left by an earlier run, or `retry`)
    planned_failed: int = 0  # items recorded FAILED while planning (manifest), never queued
    # The total may still grow: True until the pass's recovery and listing end (and before
    # a pass starts: preflight, lease).
    listing: bool = True
    skipped: int = 0  # objects skipped (filtered / unsupported)
    registered: int = 0  # items registered
    registered_objects: int = 0  # the objects of the items registered
    blocked: int = 0  # items refused by V7 (blocked_items)
    failed: int = 0  # items failed (4xx after bisection, retries exhausted, media errors)
    requests: int = 0  # register requests sent (every attempt)
    rate_limited: int = 0  # 429 answers
    retries: int = 0  # attempts beyond the first
    server_errors: int = 0  # 5xx answers
    transport_errors: int = 0  # resets / timeouts
    current_rate_per_s: float = 0.0  # the rate controller's allowed rate now
    in_flight: int = 0
    processing: int = 0  # items in the media stage now (thumbnails, videos)
    artifacts_ignored: int = 0  # listed keys under the thumbnail / artifact prefix
    media_done: int = 0  # items whose media work finished this run
    failures_by_reason: Counter[str] = field(default_factory=Counter)
    blocked_by_reason: Counter[str] = field(default_factory=Counter)
    # Seconds from sending a register request to its answer or error (every attempt).
    request_latency_s: LatencyHistogram = field(default_factory=LatencyHistogram)
    # Queue name -> current depth; the pipeline registers its queues here (e.g. q.qsize).
    queues: dict[str, Callable[[], int]] = field(default_factory=dict)
    # Worker / sync: wall-clock time (time.time()) the last sync finished successfully.
    last_sync_success_at: float | None = None
    syncs_total: int = 0  # syncs started
    syncs_failed_total: int = 0  # syncs that ended in an error
    events_received: int = 0  # object events (SQS / Azure queue) received
    events_deferred: int = 0  # event objects of multi-file items, left to the next sync
    vanished: int = 0  # objects a sync found gone from the bucket
    changed: int = 0  # objects a sync found with a new ETag / generation
    # --- faults, for the operator's log lines (ingest.registrar.faults) -------------------
    # Fed by V7Client (when given these stats), every endpoint, every attempt:
    http_statuses: Counter[int] = field(default_factory=Counter)  # answers by HTTP status
    transport_by_kind: Counter[str] = field(default_factory=Counter)  # reset|timeout|connect
    # Fed by the registrar:
    rate_limit_paused_s: float = 0.0  # seconds senders were held back by 429s (union)
    rate_cuts: int = 0  # rate cuts by the controller so far (RateController.cuts)
    already_exists_ours: int = 0  # items confirmed ours through ALREADY_EXISTS
    _paused_until: float = field(default=-math.inf, repr=False, compare=False)

    def record_pause(self, now: float, until: float) -> None:
        """A 429 holds every sender back until ``until`` (the limiter's ``paused_until``; same
        clock as ``now``). Adds the part of [now, until) not already counted, so overlapping
        pauses (many 429s of one episode) are counted once."""
        start = max(now, self._paused_until)
        if until > start and math.isfinite(until):
            self.rate_limit_paused_s += until - start
            self._paused_until = until

    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started_at, 1e-9)

    def items_per_s(self) -> float:
        return self.registered / self.elapsed_s()

    @property
    def settled(self) -> int:
        """This run's items and objects that need nothing more from it: items registered,
        blocked or failed, plus objects skipped by the filters."""
        return self.registered + self.blocked + self.failed + self.skipped

    @property
    def to_settle(self) -> int:
        """What this run has to settle so far: items queued (new, recovered from the ledger,
        failed while planning) plus objects skipped. Final once ``listing`` is over."""
        return self.planned + self.recovered + self.planned_failed + self.skipped
