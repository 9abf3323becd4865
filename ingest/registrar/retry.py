"""Retry timing for V7 requests: full-jitter exponential backoff, pure.

The caller supplies the randomness (``rand`` in [0, 1)) and the time already spent retrying, so
every decision is a plain function of its arguments and tests need neither a clock nor a seed.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Full jitter: the n-th retry waits ``rand x min(cap, base x 2**n)``, but never less than
    the server asked for (``Retry-After``), and the retries of one request stop once their
    total wait would exceed ``max_total_s``."""

    base_s: float = 0.5
    cap_s: float = 60.0
    max_total_s: float = 900.0

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s <= 0 or self.max_total_s < 0:
            raise ValueError("RetryPolicy: base_s and cap_s must be > 0, max_total_s >= 0")

    def backoff_s(self, attempt: int, rand: float) -> float:
        """The jittered wait before retry number ``attempt`` (0 = the first retry)."""
        # 2**attempt overflows a float past ~1024 attempts; the cap is reached long before.
        ceiling = self.cap_s if attempt >= 64 else min(self.cap_s, self.base_s * 2.0**attempt)
        return min(max(rand, 0.0), 1.0) * ceiling

    def next_delay(
        self,
        attempt: int,
        elapsed_s: float,
        rand: float,
        server_delay_s: float | None = None,
    ) -> float | None:
        """How long to wait before retry number ``attempt`` (0 = the first retry), or None to
        give up.

        ``elapsed_s`` is the time already spent on this request since its first attempt;
        ``server_delay_s`` the server's Retry-After, if any (honoured even above ``cap_s``).
        Gives up when waiting would take the total past ``max_total_s``.
        """
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        delay = self.backoff_s(attempt, rand)
        if server_delay_s is not None:
            delay = max(delay, server_delay_s)
        if elapsed_s + delay > self.max_total_s:
            return None
        return delay
