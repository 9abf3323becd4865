"""Request rate control for V7: a pure, clock-driven controller and the async limiter around it.

``RateController`` decides; it never sleeps and never reads a clock: every method takes ``now``
(seconds, any monotonic origin). ``Limiter`` is the thin async edge: it reads a monotonic
clock, sleeps for the delay the controller returns, and bounds concurrency. Nothing else in the
engine sleeps to pace requests.

Pacing
------
A token bucket kept as a virtual schedule (GCRA): ``reserve(now)`` books the next free slot and
returns how long the caller must wait, so concurrent callers are spaced out (``burst`` go at
once, then one every ``1/rate`` seconds). It paces ``slack`` (0.5 %) below the allowed rate so
that clock rounding and timer jitter do not turn an exact match with the server's rate into
429s. Bookings are made before sleeping, so a sender whose timer fires late would go out right
before the next one; ``conform(now)`` runs the same bucket over *actual* send times and holds
the next sender back instead (on a busy loop this halved the 429s against a burst-1 server).

Adaptation (``adaptive=True``)
------------------------------
V7 publishes no limits, so the controller searches for the server's rate, starting from the
configured rate, which stays a ceiling:

1. Every 429 pauses every sender: no slot is granted before ``now + Retry-After`` (or one
   interval when the server gave none), and slots booked before it are void (``generation``
   changes; the limiter books again).
2. Only the first 429 of a congestion episode cuts the rate. A 429 starts a new episode when
   its request was sent at least one round trip after the last cut (requests in flight at the
   cut had already taken the server's tokens) and was not the first request after a pause
   (that one says the pause was short, not that the rate is high). Without ``sent_at``: when
   it arrives ``episode_s`` after the last cut.
3. A cut goes back to the highest rate *proven* good (held for ``prove_s`` without a 429) when
   there is one below the rate that drew the 429. Otherwise it goes to what the server
   *accepted* over the last ``window_s`` seconds (``margin`` x accepted rate, at most halving)
   when the server clearly set the pace (>= 10 % refused, or accepted < 90 % of our rate), or
   just below the edge (``margin`` x rate) when hardly anything was refused. The accepted
   rate is measured around the 429s: accepted answers per second of wall time (too low when
   long Retry-After pauses let the server's bucket overflow) and per second of sending time
   (too high: its bucket refilled during each pause); the estimate is their geometric mean.
   Sending ten times too fast, a cut or two land next to the server's rate; a stray 429 at the
   right rate costs 3 %, not a sawtooth.
4. While it is quiet the rate climbs back by bisection between the proven rate (``lo``) and
   the rate that drew the last 429 (``hi``), one step per proving period. When the bracket is
   narrower than ``tolerance`` it holds there for ``plateau_s`` (doubling, up to
   ``max_plateau_s``, each time the probe finds the same limit again), then forgets ``hi`` and
   probes above with steps of 2 %, 4 %, 8 %... (up to 25 %), never above the ceiling.
5. A proof can be wrong: a server's burst hides a small excess for ``burst / excess`` seconds.
   When a 429 arrives at or below the proven rate, the proof is dropped and the proving
   period grows to 1.5x how long the excess stayed hidden (up to ``max_prove_s``).

Simulated against a token-bucket server (``tests/test_rate.py``): configured at the server's
rate, 99 % of it with no 429 when the server allows a burst >= 2, 98 % with 0.2-0.6 % 429s at
burst 1 and 0.5 ms jitter; configured 10x too high, within 10 % of the server's rate after
1-4 s (sub-second Retry-After) or 5-15 s (whole-second Retry-After).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ingest.errors import Interrupted, RateLimited, RejectedError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Tuning:
    """Knobs of the adaptive part; the defaults are what the simulations were run with."""

    slack: float = 0.005  # pace this fraction below the rate (clock rounding, timer jitter)
    decrease: float = 0.7  # cut factor when there is nothing better to go on
    max_cut: float = 0.5  # a measured cut never goes below this share of the rate
    margin: float = 0.97  # cut to margin x (measured accepted rate | rate at the 429)
    window_s: float = 3.0  # responses counted for the accepted-rate measurement
    min_window_s: float = 0.5  # a measurement needs at least this much history...
    min_responses: int = 8  # ...and this many responses in the window
    server_limited: float = 0.1  # this share of 429s in the window: the server sets the pace
    episode_s: float = 1.0  # without sent_at: 429s this close to a cut belong to its episode
    prove_s: float = 3.0  # a rate held this long without a 429 is proven good...
    prove_requests: int = 10  # ...and at least this many requests' worth of it
    max_prove_s: float = 10.0  # (longer after a proof turned out wrong)
    tolerance: float = 0.01  # stop bisecting when the bracket is this narrow (share of hi)
    plateau_s: float = 5.0  # then hold the proven rate this long before probing above it
    max_plateau_s: float = 60.0  # (doubling each time the probe finds the same limit)
    probe: float = 0.02  # first probe step above the proven rate (doubles each period)
    max_probe: float = 0.25


class RateController:
    """Token bucket (rate, burst) with adaptive rate on 429. Pure: every method takes ``now``."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float = 1.0,
        *,
        min_rate_per_s: float = 0.2,
        adaptive: bool = True,
        tuning: Tuning | None = None,
    ) -> None:
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if burst < 1:
            raise ValueError("burst must be >= 1")
        self._ceiling = float(rate_per_s)
        self._min = min(max(float(min_rate_per_s), 1e-6), self._ceiling)
        self._burst = float(burst)
        self._adaptive = adaptive
        self._t = tuning or Tuning()
        self._rate = self._ceiling
        # GCRA state: theoretical arrival time of the next slot; the same on actual send times.
        self._tat = -math.inf
        self._sent_tat = -math.inf
        self._paused_until = -math.inf
        self._generation = 0
        # Adaptation state.
        self._responses: deque[tuple[float, bool]] = deque()  # (time, accepted)
        self._first_response_at: float | None = None
        self._pauses: deque[tuple[float, float]] = deque()  # (start, end) of 429 pauses
        self._lo = 0.0  # highest rate proven good since the last invalidation (0 = unknown)
        self._hi = math.inf  # lowest rate that drew a 429 (inf = unknown / forgotten)
        self._last_hi = math.inf  # the limit the last probe ran into
        self._changed_at = -math.inf  # when the rate was last set
        self._cut_at = -math.inf  # when the last cut took effect
        self._resumed_at = -math.inf  # when the last 429's pause ended
        self._probes = 0  # probe steps since the last cut
        self._rtt = 0.0  # smoothed round-trip time of requests (from sent_at)
        self._rtt_unknown = True
        self._last_429_at = -math.inf
        self._plateau_s = self._t.plateau_s
        self._prove_s = self._t.prove_s
        self._cuts = 0

    # --- read-only views (metrics, tests) --------------------------------------------------

    @property
    def rate(self) -> float:
        """The rate allowed now (requests per second)."""
        return self._rate

    @property
    def ceiling(self) -> float:
        return self._ceiling

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def paused_until(self) -> float:
        """No slot is granted before this time (``-inf`` when there is no pause)."""
        return self._paused_until

    @property
    def generation(self) -> int:
        """Changes whenever earlier bookings become void (a 429 paused or slowed everyone)."""
        return self._generation

    @property
    def cuts(self) -> int:
        """How many times the rate was cut (one per congestion episode)."""
        return self._cuts

    @property
    def bracket(self) -> tuple[float, float]:
        """(highest rate proven good, lowest rate that drew a 429); 0 / inf when unknown."""
        return self._lo, self._hi

    # --- pacing ----------------------------------------------------------------------------

    def reserve(self, now: float) -> float:
        """Book the next slot; return how long to wait (seconds, >= 0) before sending."""
        interval = 1.0 / (self._rate * (1.0 - self._t.slack))
        tolerance = (self._burst - 1.0) * interval
        tat = max(self._tat, now)
        send_at = max(now, tat - tolerance, self._paused_until)
        self._tat = max(tat, send_at) + interval
        return send_at - now

    def sent_late(self, actually_at: float) -> None:
        """A send ``conform`` counted earlier really leaves at ``actually_at`` (its caller did
        work in between, e.g. the ledger's commit): the next send keeps one interval from the
        real send. The latest real send counts, not the sum of the delays, so concurrent
        senders are not serialised by each other's work."""
        if self._sent_tat == -math.inf:
            return
        interval = 1.0 / (self._rate * (1.0 - self._t.slack))
        self._sent_tat = max(self._sent_tat, actually_at + interval)

    def conform(self, now: float) -> float:
        """Check a send about to happen against the same token bucket, on *actual* send times;
        return how much longer to wait (0: go, and it is counted).

        A sender whose timer fired late goes out closer to the next one than its booking
        said; a burst-1 server refuses the second of two requests that arrive closer than one
        interval. Booking alone cannot prevent it (the next slot is already booked), this
        check does: late wake-ups push the following sends back instead of bunching them."""
        interval = 1.0 / (self._rate * (1.0 - self._t.slack))
        tolerance = (self._burst - 1.0) * interval
        earliest = max(self._sent_tat - tolerance, self._paused_until)
        if now < earliest:
            return earliest - now
        # The very first request also opens a connection and warms the client: it reaches
        # the server later than it left, so the second keeps one more interval from it.
        first = self._sent_tat == -math.inf and self._burst == 1.0
        self._sent_tat = max(self._sent_tat, now) + interval * (2 if first else 1)
        return 0.0

    # --- adaptation ------------------------------------------------------------------------

    def on_success(self, now: float, sent_at: float | None = None) -> None:
        """A request was answered by a server that was not throttling it."""
        if sent_at is not None:
            self._observe_rtt(now - sent_at)
        self._record(now, accepted=True)
        if self._adaptive:
            self._raise(now)

    def on_rate_limited(
        self, now: float, retry_after_s: float | None, sent_at: float | None = None
    ) -> None:
        """A 429: pause everyone, and cut the rate once per congestion episode."""
        self._record(now, accepted=False)
        quiet_since = self._quiet_since()
        self._last_429_at = now
        if sent_at is not None:
            self._observe_rtt(now - sent_at)
            # Sent one round trip after the last cut (requests still in flight at the cut took
            # the server's tokens) and not the very first request after a pause (that one
            # says the pause was short, not that the rate is too high).
            new_episode = sent_at >= max(
                self._cut_at + self._rtt, self._resumed_at + 0.5 / self._rate
            )
        else:
            new_episode = now - self._cut_at >= self._t.episode_s
        if self._adaptive and new_episode:
            self._cut(now, quiet_s=now - quiet_since)
        interval = 1.0 / self._rate
        resume = now + (retry_after_s if retry_after_s is not None else interval)
        if resume > self._paused_until:
            if self._pauses and self._pauses[-1][1] >= now:
                self._pauses[-1] = (self._pauses[-1][0], resume)
            else:
                self._pauses.append((now, resume))
            self._paused_until = self._resumed_at = resume
            # Slots booked before this 429 are void; after the pause, pace from scratch and
            # without a burst (the server's bucket is empty).
            self._tat = self._sent_tat = resume + (self._burst - 1.0) * interval
            self._generation += 1

    def accepted_rate(self, now: float) -> float | None:
        """The server's rate as measured over the window, or None when the window is too thin.

        Accepted responses per second of wall time under-estimate it when the server kept us
        waiting (long Retry-After pauses let its bucket overflow); per second of sending time
        (pauses excluded) they over-estimate it (its bucket refilled during each pause). The
        truth lies between: the geometric mean of the two is the estimate.
        """
        self._prune(now)
        if self._first_response_at is None:
            return None
        start = max(now - self._t.window_s, self._first_response_at)
        wall = now - start
        if wall < self._t.min_window_s or len(self._responses) < self._t.min_responses:
            return None
        active = wall
        for p_start, p_end in self._pauses:
            active -= max(0.0, min(p_end, now) - max(p_start, start))
        accepted = sum(1 for _, ok in self._responses if ok)
        return accepted / math.sqrt(wall * max(active, wall / 16))

    def _observe_rtt(self, rtt: float) -> None:
        rtt = max(rtt, 0.0)
        self._rtt = rtt if self._rtt_unknown else 0.875 * self._rtt + 0.125 * rtt
        self._rtt_unknown = False

    def _record(self, now: float, *, accepted: bool) -> None:
        if self._first_response_at is None:
            self._first_response_at = now
        self._responses.append((now, accepted))
        self._prune(now)

    def _prune(self, now: float) -> None:
        horizon = now - self._t.window_s
        while self._responses and self._responses[0][0] < horizon:
            self._responses.popleft()
        while self._pauses and self._pauses[0][1] < horizon:
            self._pauses.popleft()

    def _set(self, now: float, rate: float) -> None:
        self._rate = min(max(rate, self._min), self._ceiling)
        self._changed_at = now

    def _quiet_since(self) -> float:
        """Since when the current rate has been held without a 429 or a pause."""
        return max(self._changed_at, self._paused_until, self._last_429_at)

    def _cut(self, now: float, quiet_s: float) -> None:
        t = self._t
        old = self._rate
        # Plateau: longer each time the probe runs into the same limit.
        if abs(old - self._last_hi) <= 5 * t.tolerance * self._last_hi:
            self._plateau_s = min(self._plateau_s * 2, t.max_plateau_s)
        else:
            self._plateau_s = t.plateau_s
        self._hi = self._last_hi = old
        measured = self.accepted_rate(now)
        if 0 < self._lo < old:
            new = self._lo  # back to the last rate that was proven good...
            if measured is not None:  # ...unless the server just accepted clearly more
                new = max(new, min(old * t.margin, 0.9 * measured))
        else:
            # What was proven is not true any more: the limit moved, or the server's burst
            # hid an excess for longer than we watched. Watch longer before the next proof.
            if self._lo > 0:
                self._prove_s = min(max(self._prove_s, 1.5 * quiet_s), t.max_prove_s)
            self._lo = 0.0
            rejected = sum(1 for _, ok in self._responses if not ok)
            if measured is None:
                # Nothing measured yet: a first 429 may be a timing accident, a second is not.
                new = old * (t.margin if self._cuts == 0 else t.decrease)
            elif (
                rejected >= t.server_limited * len(self._responses)
                or measured < (1 - t.server_limited) * old
            ):
                # The server refused a good part of what we sent, or kept us waiting (long
                # Retry-After pauses): what it accepted is about its rate.
                new = min(max(measured * t.margin, old * t.max_cut), old * t.margin)
            else:
                new = old * t.margin  # hardly anything refused: step just below the edge
        self._set(now, new)
        self._cut_at = now
        self._probes = 0
        self._cuts += 1
        self._generation += 1

    def _raise(self, now: float) -> None:
        t = self._t
        if self._rate >= self._ceiling:
            return
        since = self._quiet_since()
        if now - since < max(self._prove_s, t.prove_requests / self._rate):
            return
        self._lo = max(self._lo, self._rate)  # this rate is proven good
        if self._hi < math.inf and self._hi - self._lo > t.tolerance * self._hi:
            self._set(now, (self._lo + self._hi) / 2)  # bisect the bracket
        elif self._hi < math.inf:
            if now - since < self._plateau_s:
                return  # hold just below the limit...
            self._hi = math.inf  # ...then forget it and probe above
            self._probe(now)
        else:
            self._probe(now)

    def _probe(self, now: float) -> None:
        # Above any known limit: larger and quicker steps while they keep succeeding.
        if self._probes:
            self._prove_s = max(self._t.prove_s, self._prove_s / 2)
        step = min(self._t.probe * 2**self._probes, self._t.max_probe)
        self._probes += 1
        self._set(now, self._rate * (1 + step))


class Limiter:
    """The async edge of rate control: bounded concurrency plus the controller's pacing.

    ``async with limiter.slot() as sent_at:`` waits for a free in-flight slot, then for the
    controller's token (booking it; if a 429 voids the booking meanwhile, it books again), and
    yields the send time; report the answer with ``success(sent_at)`` or
    ``rate_limited(sent_at, retry_after_s)``. ``clock`` and ``sleep`` default to the running
    loop's ``time()`` and ``asyncio.sleep``. Every wait takes an optional ``stop`` event: set
    (a graceful shutdown), the wait ends with ``Interrupted`` instead of a send.
    """

    def __init__(
        self,
        controller: RateController,
        max_in_flight: int,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be >= 1")
        self.controller = controller
        self.max_in_flight = max_in_flight
        self._clock = clock
        self._sleep: Sleep = sleep or asyncio.sleep
        self._slots = asyncio.Semaphore(max_in_flight)

    def now(self) -> float:
        # time.monotonic by default, not loop.time(): uvloop's loop time is cached per loop
        # iteration at 1 ms resolution, so a pacing wait shorter than 1 ms saw no time pass
        # and spun the loop (a profile found 12 % of the engine's CPU there at high rates).
        return (self._clock or time.monotonic)()

    @property
    def rate(self) -> float:
        return self.controller.rate

    async def acquire(self, stop: asyncio.Event | None = None) -> float:
        """Wait for the controller's next slot (books it); return the send time."""
        while True:
            generation = self.controller.generation
            delay = self.controller.reserve(self.now())
            await self.sleep(delay, stop)
            if self.controller.generation != generation:
                continue  # a 429 arrived while we waited: that booking is void, book again
            # A late wake-up must not bunch this send with the next: wait until it conforms.
            while (extra := self.controller.conform(self.now())) > 0:
                await self.sleep(extra, stop)
                if self.controller.generation != generation:
                    break
            else:
                return self.now()

    @contextlib.asynccontextmanager
    async def slot(
        self,
        stop: asyncio.Event | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[float]:
        """A send slot. ``before_send`` runs once the slot is granted, right before the send
        (the registrar records SENT there); the time it takes counts as the send being later,
        so the next sender keeps its distance from the actual send, not from the booking, and
        a pause that began meanwhile holds the send.

        Known limit: at rates whose interval is shorter than a ledger commit (hundreds of
        requests/s), senders released by one group commit leave together; servers that fast
        take bursts. Counting every send after its commit instead (measured) cost ~0.04 of
        rate efficiency against a 20 req/s burst-1 server at 50 ms latency."""
        async with self._slots:
            granted = await self.acquire(stop)
            if before_send is None:
                yield granted
                return
            generation = self.controller.generation
            await before_send()
            now = self.now()
            if self.controller.generation != generation:
                # A 429 arrived during the commit: no send into the pause it began.
                while (extra := self.controller.conform(now)) > 0:
                    await self.sleep(extra, stop)
                    now = self.now()
            elif now > granted:
                self.controller.sent_late(now)
            yield now

    async def sleep(self, delay_s: float, stop: asyncio.Event | None = None) -> None:
        """Wait ``delay_s`` (a pacing wait or a retry backoff; the engine's waits all go through
        the limiter); raise ``Interrupted`` if ``stop`` is or gets set first."""
        if stop is not None and stop.is_set():
            raise Interrupted("stopped while waiting to send")
        if delay_s <= 0:
            return
        if stop is None:
            await self._sleep(delay_s)
            return
        if self._sleep is asyncio.sleep:
            # The common case, on the hot path of every send: one timeout, no extra tasks.
            try:
                async with asyncio.timeout(delay_s):
                    await stop.wait()
            except TimeoutError:
                return
            raise Interrupted("stopped while waiting to send")
        sleeper = asyncio.ensure_future(self._sleep(delay_s))
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({sleeper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, waiter):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if stop.is_set():
            raise Interrupted("stopped while waiting to send")

    def answered(self, sent_at: float | None, error: BaseException | None = None) -> None:
        """What a request's answer tells the controller — the one rule for every endpoint:
        an answer (2xx, or a refused payload) proves the rate was fine; a 429 pauses and slows
        every sender; a 5xx, a reset or a timeout says nothing about the rate."""
        if error is None or isinstance(error, RejectedError):
            self.success(sent_at)
        elif isinstance(error, RateLimited):
            self.rate_limited(sent_at, error.delay_s)

    def success(self, sent_at: float | None = None) -> None:
        self.controller.on_success(self.now(), sent_at)

    def rate_limited(self, sent_at: float | None, retry_after_s: float | None) -> None:
        self.controller.on_rate_limited(self.now(), retry_after_s, sent_at)
