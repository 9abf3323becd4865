"""Live counters shared by the pipeline stages; read by the progress display, summary and metrics.

Plain integers mutated from one event loop: no locks needed.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    started_at: float = field(default_factory=time.monotonic)
    listed: int = 0  # objects seen in the listing
    planned: int = 0  # items planned (new this run)
    skipped: int = 0  # objects skipped (filtered / unsupported)
    registered: int = 0  # items registered
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

    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started_at, 1e-9)

    def items_per_s(self) -> float:
        return self.registered / self.elapsed_s()
