"""Request rate control for V7: a pure, clock-driven controller and the async limiter around it.

``RateController`` decides; it never sleeps and never reads a clock: every method takes ``now``
(seconds, any monotonic origin). ``Limiter`` is the thin async edge: it reads a monotonic
clock, sleeps for the delay the controller returns, and bounds concurrency. Nothing else in the
engine sleeps to pace requests.

Pacing
------
A token bucket kept as a virtual schedule (GCRA): ``reserve(now)`` books the next free slot and
returns how long the caller must wait, so concurrent callers are spaced out (``burst`` go at
once, then one every ``1/rate`` seconds). It paces ``slack`` (1.5 %) below the allowed rate: a
burst-1 server refuses a request that arrives even a hair early, and arrivals are never exact.
``conform(now)`` runs the same bucket over *actual* send times and holds a sender back when an
earlier one left late; the HTTP client reports when each request is really on the wire (its
headers written: ``ON_WIRE``), so an event-loop stall between the slot and the write pushes
the next send back instead of bunching the two. The limiter ends its pacing waits precisely
(the last 1.5 ms yield to the loop instead of sleeping: uvloop's timers have a millisecond's
resolution) and starts the SENT commit (``before_send``) ahead of the slot by the commit's
usual duration.

Spacing on the server's acceptance: while round trips are steady (median within 2 ms of the
minimum) and shorter than the interval, the answer to the latest send normally arrives before
the next send; the server took that request at the latest ``answer - min round trip``, so the
next send keeps one interval from *that* (a request held up on its way there shows as a long
round trip), and waits up to 5 ms for an answer that is late. With a jittery return path, or a
round trip longer than the interval, only the slack protects against a stall on the way.

Adaptation (``adaptive=True``)
------------------------------
V7 publishes no limits, so the controller searches for the server's rate, starting from the
configured rate, which stays a ceiling:

1. Every 429 pauses every sender: no slot is granted before ``now + Retry-After`` (or one
   interval when the server gave none), and slots booked before it are void (``generation``
   changes; the limiter books again).
2. Only the first 429 of a congestion episode cuts the rate. A 429 starts a new episode when
   its request was sent at least one round trip after the last cut and was not the first
   request after a pause. Without ``sent_at``: when it arrives ``episode_s`` after the last cut.
3. A cut goes back to the highest rate proven good (held for ``prove_s`` without a 429) when
   there is one below the rate that drew the 429; otherwise to what the server accepted over
   the last ``window_s`` (when it clearly set the pace) or just below the edge (``margin``).
   Two corrections: *a storm* — 429s keep coming since the first one (within
   ``congestion_quiet_s``), the server refused more than it let through and that was under
   half our rate: cut to what it let through since the first 429 (pauses included), down to a
   tenth; *a deep bucket* — a rate held for ``deep_quiet_s`` and more drew a 429 (the bucket
   hid a small excess for a while): cut to what was accepted since the last cut, per second of
   wall and of sending time (geometric mean), the refill of the pause included.
4. While it is quiet the rate climbs back. Below a rate that a whole ``best_hold_s`` (10 s)
   window accepted within the last ``best_s`` (60 s) — the rate before a storm — it climbs
   quickly: after ``hold_s`` without a 429 (doubling after each failed climb, up to
   ``max_hold_s``), steps of 25 %, 50 %, then doubling, each held 0.5 s or three requests. A
   failed climb close to its target forgets the target. Otherwise: bisection between the proven
   rate and the rate of the last 429 when that is within 25 %, steps of 2 %, 4 %, 8 %... (up to
   25 %) when it is further, a plateau below a limit found again and again (doubling, up to
   ``max_plateau_s``), never above the ceiling.
5. A proof can be wrong: a server's burst hides a small excess for ``burst / excess`` seconds.
   When a 429 arrives at or below the proven rate, the proof is dropped and the proving
   period grows to 1.5x how long the excess stayed hidden (up to ``max_prove_s``).

Simulated against a token bucket on the server's own arrival timeline, with the emulator's
whole-second Retry-After (``tests/test_rate.py``; ``python -m tests.test_rate`` prints them):
configured at the server's rate, 0.98 at every latency and burst on a quiet machine; with
rare stalls the client cannot see, burst 1 behind 50 ± 10 or 200 ms drops to 0.92-0.95 (each
stall costs a whole-second pause); configured 10x too high, 0.86-1.0 over 100 s, settled within
5 s; a cut from 20 to 2 req/s for 30 s: 1.1-1.2 s of 429s, back at 0.9 of the limit 4-8 s after
it is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from ingest.errors import Interrupted, RateLimited, RejectedError

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Set by ``Limiter.slot`` while its send goes out; the HTTP client calls it once the request
# is on the wire (its headers written), so the next send keeps its distance from the *real*
# send: an event-loop stall between the slot and the write must not bunch two requests.
ON_WIRE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "ingest_rate_on_wire", default=None
)

MAX_LEAD_S = 0.02  # before_send starts at most this long ahead of its slot
PRECISE_S = 0.0015  # the end of a pacing wait spent yielding to the loop rather than asleep...
PRECISE_MAX_RATE = 100.0  # ...at rates up to this (requests/s; above, plain sleeps)


@dataclass(frozen=True)
class Tuning:
    """Knobs of the adaptive part; the defaults are what the simulations were run with."""

    slack: float = 0.015  # pace this fraction below the rate (arrival noise at the server)
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
    congestion_quiet_s: float = 3.0  # a 429 after this long without one starts a congestion
    deep_cut: float = 0.1  # within a congestion, cut to what it let through, down to this share
    deep_quiet_s: float = 2.0  # a 429 after this long at a rate: a deep bucket hid an excess
    best_s: float = 60.0  # a rate held within this long is climbed back to quickly...
    best_hold_s: float = 10.0  # ...when it was held this long without a 429 (a deep bucket
    # hides a small excess for a while: a short proof would make a bad target)
    hold_s: float = 2.0  # ...after holding this long without a 429 (doubling on failure...)
    max_hold_s: float = 8.0  # ...up to this)
    climb: float = 0.25  # first step of that climb (doubling each step, up to 100 %)
    climb_requests: int = 3  # each step held at least this many requests' worth...
    climb_s: float = 0.5  # ...and this long
    rtt_samples: int = 32  # round trips kept for spacing on the server's acceptance...
    acceptance_spread_s: float = 0.002  # ...used only while their median is this close to the min
    acceptance_hold_s: float = 0.005  # a late answer to the last send holds the next this long


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
        # Congestion: since when 429s keep coming, and how much was accepted since.
        self._congestion_at = -math.inf
        self._accepted_total = 0
        self._accepted_at_congestion = 0
        self._refused_total = 0
        self._refused_at_congestion = 0
        self._accepted_at_cut = 0
        self._pause_total = 0.0  # seconds paused by 429s, all told
        self._pause_at_cut = 0.0
        # The highest rate proven good lately, climbed back to quickly after a storm.
        self._best = 0.0
        self._best_at = -math.inf
        self._hold_s = self._t.hold_s
        self._climbs = 0
        self._bins: deque[list[int]] = deque(maxlen=int(self._t.best_hold_s) + 2)
        # Spacing on the server's acceptance: the last counted send, recent round trips.
        self._last_send = -math.inf
        self._last_answered = True
        self._rtts: deque[float] = deque(maxlen=self._t.rtt_samples)

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
        self._last_send = max(self._last_send, actually_at)

    def until_conforming(self, now: float) -> float:
        """How long until a send would conform (``conform`` without counting it): a sender
        about to record SENT waits for this first, so SENT is not recorded long before the
        send can leave."""
        interval = 1.0 / (self._rate * (1.0 - self._t.slack))
        tolerance = (self._burst - 1.0) * interval
        return max(0.0, self._sent_tat - tolerance - now, self._paused_until - now)

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
        if (hold := self._answer_due(now, interval)) > 0:
            return hold
        # The very first request also opens a connection and warms the client: it reaches
        # the server later than it left, so the second keeps one more interval from it.
        first = self._sent_tat == -math.inf and self._burst == 1.0
        self._sent_tat = max(self._sent_tat, now) + interval * (2 if first else 1)
        self._last_send = now
        self._last_answered = False
        return 0.0

    def _answer_due(self, now: float, interval: float) -> float:
        """While round trips are steady and shorter than the interval, the answer to the last
        send normally comes before the next one leaves; when it is late (the request was held
        up on its way, so the server took it late), wait for it a little (``acceptance_hold_s``
        at most): ``on_success`` then spaces the next send from the server's acceptance."""
        low = self._steady_rtt()
        if self._last_answered or low is None or low >= interval or self._burst > 1.0:
            return 0.0
        until = self._last_send + low + self._t.acceptance_hold_s
        return min(until - now, 0.0005) if now < until else 0.0

    def _steady_rtt(self) -> float | None:
        """The minimum of the recent round trips, when their median is close to it."""
        if len(self._rtts) < 4:
            return None
        ordered = sorted(self._rtts)
        if ordered[len(ordered) // 2] - ordered[0] > self._t.acceptance_spread_s:
            return None
        return ordered[0]

    # --- adaptation ------------------------------------------------------------------------

    def on_success(self, now: float, sent_at: float | None = None) -> None:
        """A request was answered by a server that was not throttling it."""
        if sent_at is not None:
            self._observe_rtt(now - sent_at)
            self._space_on_acceptance(now, sent_at)
        self._record(now, accepted=True)
        self._accepted_total += 1
        self._count_accepted(now)
        if self._adaptive:
            self._raise(now)

    def _count_accepted(self, now: float) -> None:
        """Accepted answers in 1 s bins; each full ``best_hold_s`` window that accepted more
        than any other lately becomes the rate to climb back to after a storm. A window, not
        a rate we held: a deep bucket lets a small excess through for seconds, a window
        as long as this shows the server's rate (and a stray 429 costs it only its pause)."""
        second = math.floor(now)
        if not self._bins or self._bins[-1][0] != second:
            span = int(self._t.best_hold_s)
            full = [n for sec, n in self._bins if second - span <= sec < second]
            if self._first_response_at is not None and now - self._first_response_at > span + 1:
                window = sum(full) / span / (1.0 - self._t.slack)
                if window >= self._best or now - self._best_at > self._t.best_s:
                    self._best, self._best_at = min(window, self._ceiling), now
            self._bins.append([second, 0])
        self._bins[-1][1] += 1

    def _space_on_acceptance(self, now: float, sent_at: float) -> None:
        """The answer to the latest send came back before the next one left: the server took
        it at the latest ``now - min round trip`` (a stall on the way there shows as a longer
        round trip), so the next send keeps one interval from *that*, not from our send.
        Only while round trips are steady (their median near their minimum): with a jittery
        return path a long round trip says nothing about the arrival, and would only slow us."""
        self._rtts.append(now - sent_at)
        if sent_at < self._last_send:
            return
        self._last_answered = True
        low = self._steady_rtt()
        if low is None:
            return
        interval = 1.0 / (self._rate * (1.0 - self._t.slack))
        tolerance = (self._burst - 1.0) * interval
        self._sent_tat = max(self._sent_tat, now - low + interval - tolerance)

    def on_rate_limited(
        self, now: float, retry_after_s: float | None, sent_at: float | None = None
    ) -> None:
        """A 429: pause everyone, and cut the rate once per congestion episode."""
        self._record(now, accepted=False)
        quiet_since = self._quiet_since()
        if now - self._last_429_at >= self._t.congestion_quiet_s:
            self._congestion_at = now  # the first 429 after a quiet spell
            self._accepted_at_congestion = self._accepted_total
            self._refused_at_congestion = self._refused_total
        self._refused_total += 1
        self._last_429_at = now
        if sent_at is not None:
            self._observe_rtt(now - sent_at)
            if sent_at >= self._last_send:
                self._last_answered = True
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
            self._pause_total += resume - max(now, self._paused_until)
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
        cycle = None
        if now - self._cut_at <= t.best_s and now > self._cut_at and quiet_s >= t.deep_quiet_s:
            # What the server accepted since the last cut, its pause included: its rate over
            # a whole cycle of refill and drain (a deep bucket hides a small excess for a
            # while, so the rate that drew this 429 may not be the one that was too high).
            # Per second of wall time it is too low when the pause let a shallow bucket
            # overflow, per second of sending time too high when a deep one refilled: the
            # geometric mean of the two.
            wall = now - self._cut_at
            active = max(wall - (self._pause_total - self._pause_at_cut), wall / 16)
            cycle = (self._accepted_total - self._accepted_at_cut) / math.sqrt(wall * active)
        if 0 < self._lo < old:
            new = self._lo  # back to the last rate that was proven good...
            if measured is not None:  # ...unless the server just accepted clearly more
                new = max(new, min(old * t.margin, 0.9 * measured))
            if cycle is not None:
                new = min(new, max(cycle * t.margin, old * t.max_cut))
        else:
            # What was proven is not true any more: the limit moved, or the server's burst
            # hid an excess for longer than we watched. Watch longer before the next proof.
            proof_wrong = self._lo > 0
            if proof_wrong:
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
            # 429s keep coming since the congestion began, the server refused more than it
            # let through and that was less than half our rate (pauses included): the limit
            # dropped, to about that.
            let_through = self._accepted_total - self._accepted_at_congestion
            since = let_through / (now - self._congestion_at) if now > self._congestion_at else 0
            refused = self._refused_total - self._refused_at_congestion
            if now > self._congestion_at and since < 0.5 * old and refused >= let_through:
                new = min(new, max(since * t.margin, old * t.deep_cut))
            elif proof_wrong and cycle is not None:
                new = min(new, max(cycle * t.margin, old * t.max_cut))
        if self._climbs:
            self._hold_s = min(self._hold_s * 2, t.max_hold_s)  # the climb back failed
            if old >= (1 - t.max_probe) * self._best:
                self._best = 0.0  # ...close to its target: that target is not true any more
        self._climbs = 0
        self._set(now, new)
        self._cut_at = now
        self._accepted_at_cut = self._accepted_total
        self._pause_at_cut = self._pause_total
        self._probes = 0
        self._cuts += 1
        self._generation += 1

    def _raise(self, now: float) -> None:
        t = self._t
        since = self._quiet_since()
        first = now if self._first_response_at is None else self._first_response_at
        held = now - max(since, first)  # (no proof before the first answer)
        proven = held >= max(self._prove_s, t.prove_requests / self._rate)
        if self._rate >= self._ceiling:
            if proven:
                self._hold_s = t.hold_s
            return
        if self._best > self._rate * (1 + t.climb / 2) and now - self._best_at <= t.best_s:
            self._climb(now, since)
            return
        if not proven:
            return
        self._lo = max(self._lo, self._rate)  # this rate is proven good
        if self._hi < math.inf and self._hi > (1 + t.max_probe) * self._lo:
            self._probe(now)  # the 429 was far above: climb in steps, not halfway to it
        elif self._hi < math.inf and self._hi - self._lo > t.tolerance * self._hi:
            self._set(now, (self._lo + self._hi) / 2)  # bisect the bracket
        elif self._hi < math.inf:
            if now - since < self._plateau_s:
                return  # hold just below the limit...
            self._hi = math.inf  # ...then forget it and probe above
            self._probe(now)
        else:
            self._probe(now)

    def _climb(self, now: float, since: float) -> None:
        """Below a rate proven good lately (a storm cut us down): once quiet for the hold,
        climb back in growing steps (25 %, 50 %, then doubling), each held briefly; a 429 on
        the way goes back to the last step and doubles the hold."""
        t = self._t
        wait = self._hold_s if not self._climbs else max(t.climb_s, t.climb_requests / self._rate)
        if now - since < wait:
            return
        self._lo = max(self._lo, self._rate)
        step = min(t.climb * 2**self._climbs, 1.0)
        self._climbs += 1
        self._set(now, min(self._best, self._rate * (1 + step)))
        if self._rate >= self._best:
            if self._hi < self._best:
                self._hi = math.inf  # back above the storm's limits: they are history
            self._hold_s = t.hold_s
            self._climbs = 0

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
        self._commit_s = 0.0  # the usual duration of ``before_send``

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
        await self._booked(stop, 0.0)
        return await self._conforming(stop)

    async def _booked(self, stop: asyncio.Event | None, lead_s: float) -> None:
        """Book a slot and sleep until ``lead_s`` before it; book again whenever a 429 voided
        the booking meanwhile."""
        while True:
            generation = self.controller.generation
            delay = self.controller.reserve(self.now())
            await self.sleep(delay - lead_s, stop)
            if self.controller.generation == generation:
                return

    async def _conforming(self, stop: asyncio.Event | None) -> float:
        """Wait until a send now conforms on actual send times (a late wake-up must not bunch
        this send with the next; a pause begun meanwhile holds it); return the send time."""
        while (extra := self.controller.conform(self.now())) > 0:
            await self.pace(extra, stop)
        return self.now()

    @contextlib.asynccontextmanager
    async def slot(
        self,
        stop: asyncio.Event | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
    ) -> AsyncIterator[float]:
        """A send slot. ``before_send`` runs right before the send (the registrar records SENT
        there): it starts about its own usual duration ahead of the booked slot, so that its
        time does not delay the send, and the send still waits until it conforms on actual
        send times, after it (a pause that began meanwhile holds it)."""
        async with self._slots:
            if before_send is None:
                sent = await self.acquire(stop)
            else:
                await self._booked(stop, self._commit_s)
                while (wait := self.controller.until_conforming(self.now() + self._commit_s)) > 0:
                    await self.sleep(wait, stop)
                started = self.now()
                await before_send()
                took = self.now() - started
                # Its usual duration: a smoothed figure, bounded (a stalled commit once must
                # not make every later one start early).
                self._commit_s = min(0.875 * self._commit_s + 0.125 * took, MAX_LEAD_S)
                sent = await self._conforming(stop)
            token = ON_WIRE.set(self._on_wire)
            try:
                yield sent
            finally:
                ON_WIRE.reset(token)

    def _on_wire(self) -> None:
        self.controller.sent_late(self.now())

    async def pace(self, delay_s: float, stop: asyncio.Event | None = None) -> None:
        """A pacing wait, ended on time: timers fire up to a millisecond late (uvloop's clock
        has that resolution), which at a burst-1 server is the whole margin. On the real clock
        the last ``PRECISE_S`` of a wait yields to the loop instead of sleeping (bounded CPU:
        at most that much per send, and only at rates where it matters)."""
        precise = (
            self._clock is None
            and self._sleep is asyncio.sleep
            and self.controller.rate <= PRECISE_MAX_RATE
            and delay_s > 0
        )
        if not precise:
            await self.sleep(delay_s, stop)
            return
        until = self.now() + delay_s
        if delay_s > PRECISE_S:
            await self.sleep(delay_s - PRECISE_S, stop)
        while self.now() < until:
            if stop is not None and stop.is_set():
                raise Interrupted("stopped while waiting to send")
            await asyncio.sleep(0)

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
