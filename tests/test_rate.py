"""Rate control: the pure controller on a fake clock, the async limiter on fake and real clocks,
and a virtual-time simulation against a token-bucket server (no sleeping anywhere).

Run ``python -m tests.test_rate`` to print the simulation figures quoted in rate.py.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from ingest.registrar.rate import Limiter, RateController, Tuning
from ingest.registrar.retry import RetryPolicy

EXACT = Tuning(slack=0.0)  # pacing without the safety slack, for exact arithmetic


# --- pacing ---------------------------------------------------------------------------------


def test_burst_one_spaces_concurrent_callers_k_over_r() -> None:
    c = RateController(10.0, 1.0, tuning=EXACT)
    waits = [c.reserve(100.0) for _ in range(5)]
    assert waits == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def test_burst_goes_at_once_then_one_per_interval() -> None:
    c = RateController(4.0, 3.0, tuning=EXACT)
    waits = [c.reserve(0.0) for _ in range(6)]
    assert waits == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.5, 0.75])


def test_idle_time_refills_the_bucket_but_never_beyond_the_burst() -> None:
    c = RateController(2.0, 2.0, tuning=EXACT)
    for _ in range(4):
        c.reserve(0.0)
    # Long idle: two tokens again, not more.
    assert [c.reserve(100.0) for _ in range(3)] == pytest.approx([0.0, 0.0, 0.5])


def test_a_caller_that_arrives_later_waits_less() -> None:
    c = RateController(10.0, 1.0, tuning=EXACT)
    assert c.reserve(0.0) == 0.0
    assert c.reserve(0.04) == pytest.approx(0.06)
    assert c.reserve(0.5) == 0.0


def test_slack_paces_slightly_below_the_rate() -> None:
    c = RateController(100.0, 1.0)
    waits = [c.reserve(0.0) for _ in range(101)]
    assert 1.0 < waits[-1] < 1.01  # 100 intervals of 1/(100 x 0.995)


def test_invalid_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateController(0.0)
    with pytest.raises(ValueError):
        RateController(1.0, burst=0.5)


# --- 429: pause everyone ------------------------------------------------------------------------


def test_a_429_pauses_every_sender_until_retry_after() -> None:
    c = RateController(10.0, 5.0, tuning=EXACT)
    gen = c.generation
    c.on_rate_limited(10.0, 2.0, sent_at=9.9)
    assert c.generation != gen  # bookings made before are void
    assert c.paused_until == pytest.approx(12.0)
    waits = [c.reserve(10.0 + k * 0.01) for k in range(4)]
    starts = [10.0 + k * 0.01 + w for k, w in enumerate(waits)]
    assert min(starts) >= 12.0  # nobody before the pause ends...
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(g == pytest.approx(1 / c.rate) for g in gaps)  # ...then no burst, paced


def test_a_429_without_retry_after_still_resets_the_schedule() -> None:
    c = RateController(10.0, 1.0, tuning=EXACT)
    c.on_rate_limited(5.0, None, sent_at=4.9)
    assert c.reserve(5.0) == pytest.approx(1 / c.rate)


def test_later_429s_extend_the_pause_but_never_shorten_it() -> None:
    c = RateController(10.0, 1.0, tuning=EXACT)
    c.on_rate_limited(0.0, 5.0, sent_at=0.0)
    c.on_rate_limited(0.1, 1.0, sent_at=0.0)
    assert c.paused_until == pytest.approx(5.0)
    c.on_rate_limited(0.2, 6.0, sent_at=0.0)
    assert c.paused_until == pytest.approx(6.2)


def test_non_adaptive_keeps_its_rate_but_obeys_the_pause() -> None:
    c = RateController(10.0, 1.0, adaptive=False, tuning=EXACT)
    c.on_rate_limited(0.0, 1.5, sent_at=0.0)
    assert c.rate == 10.0
    assert c.reserve(0.0) == pytest.approx(1.5)


# --- 429: one cut per congestion episode --------------------------------------------------------


def test_concurrent_429s_of_one_episode_cut_once() -> None:
    c = RateController(20.0)
    for k in range(8):  # eight requests sent before the cut, refused together
        c.on_rate_limited(1.0 + k * 0.001, 0.05, sent_at=0.9)
    assert c.cuts == 1
    assert c.rate < 20.0


def test_a_429_for_a_request_sent_after_the_cut_starts_a_new_episode() -> None:
    c = RateController(20.0)
    c.on_success(0.5, sent_at=0.45)  # round trip 50 ms
    c.on_rate_limited(1.0, 0.0, sent_at=0.95)
    first = c.rate
    # Sent within one round trip of the cut: still the same episode.
    c.on_rate_limited(1.1, 0.0, sent_at=1.02)
    assert (c.cuts, c.rate) == (1, first)
    # Sent well after the cut and not first after the pause: a new episode.
    c.on_rate_limited(1.5, 0.0, sent_at=1.4)
    assert c.cuts == 2
    assert c.rate < first


def test_first_request_after_a_pause_does_not_cut_again() -> None:
    c = RateController(20.0)
    c.on_rate_limited(1.0, 0.2, sent_at=0.95)
    # The first request sent when the pause ended is refused (the pause was a bit short):
    c.on_rate_limited(1.25, 0.05, sent_at=1.2)
    assert c.cuts == 1
    assert c.paused_until == pytest.approx(1.3)


def test_without_sent_at_429s_within_episode_s_cut_once() -> None:
    c = RateController(20.0, tuning=Tuning(episode_s=1.0))
    c.on_rate_limited(10.0, None)
    c.on_rate_limited(10.5, None)
    assert c.cuts == 1
    c.on_rate_limited(11.2, None)
    assert c.cuts == 2


def test_a_stray_429_at_the_configured_rate_costs_a_few_percent() -> None:
    c = RateController(20.0)
    t = 0.0
    for _ in range(100):  # 5 s of answers at 20/s
        t += 0.05
        c.on_success(t, sent_at=t - 0.01)
    c.on_rate_limited(t + 0.01, 0.05, sent_at=t)
    assert 0.95 * 20 <= c.rate < 20


def _accepting(c: RateController, per_s: float, seconds: float) -> float:
    """Answers at ``per_s`` for ``seconds`` (from t = 0); returns the time of the last one."""
    t = 0.0
    for k in range(1, int(per_s * seconds) + 1):
        t = k / per_s
        c.on_success(t)
    return t


def test_a_cut_aims_at_what_the_server_accepted() -> None:
    c = RateController(30.0)
    t = _accepting(c, 20.0, 3.0)  # we sent at 30/s, the server took 20/s
    c.on_rate_limited(t + 0.01, 0.0)
    assert c.rate == pytest.approx(0.97 * 20.0, rel=0.03)


def test_a_measured_cut_at_most_halves_the_rate() -> None:
    c = RateController(200.0)
    t = _accepting(c, 20.0, 3.0)
    c.on_rate_limited(t + 0.01, 0.0)
    assert c.rate == pytest.approx(100.0)


def test_a_first_429_with_nothing_measured_is_a_small_cut_a_second_a_big_one() -> None:
    c = RateController(100.0)
    c.on_rate_limited(0.01, 0.0, sent_at=0.0)
    assert c.rate == pytest.approx(97.0)
    c.on_rate_limited(0.1, 0.0, sent_at=0.09)
    assert c.rate == pytest.approx(97.0 * 0.7)


def test_never_below_the_minimum_rate() -> None:
    c = RateController(10.0, min_rate_per_s=2.0)
    t = 0.0
    for _ in range(50):
        t += 10.0
        c.on_rate_limited(t, 0.0, sent_at=t - 0.001)
    assert c.rate == pytest.approx(2.0)


def test_success_never_raises_the_rate_above_the_ceiling() -> None:
    c = RateController(10.0)
    for k in range(2000):
        c.on_success(k * 0.1, sent_at=k * 0.1 - 0.01)
    assert c.rate == 10.0


def test_rate_climbs_back_to_the_ceiling_after_a_cut_while_quiet() -> None:
    c = RateController(20.0)
    c.on_rate_limited(0.0, 0.0, sent_at=0.0)
    c.on_rate_limited(5.0, 0.0, sent_at=4.99)  # a second one, measured: cut further
    low = c.rate
    assert low < 20.0 * 0.97
    t = 5.0
    while t < 120.0:
        t += 1 / c.rate
        c.on_success(t, sent_at=t - 0.01)
    assert low < c.rate
    assert c.rate == pytest.approx(20.0)


def test_after_a_429_the_rate_holds_below_the_limit_that_drew_it() -> None:
    """Bisection between the proven rate and the 429's rate, then a plateau below the latter."""
    c = RateController(30.0)
    t = 0.0
    for _ in range(200):
        t += 1 / 30
        c.on_success(t, sent_at=t - 0.01)
    c.on_rate_limited(t, 0.0, sent_at=t - 0.01)  # limit found at 30: cut
    assert c.rate < 30.0
    ceiling_hits = []
    for _ in range(30 * 20):  # 20 s of quiet: climbs back, but stays under 30 for the plateau
        t += 1 / c.rate
        c.on_success(t, sent_at=t - 0.01)
        ceiling_hits.append(c.rate >= 30.0)
    assert c.rate > 29.0
    assert not any(ceiling_hits[: 30 * 5])  # held below the limit for a while


# --- the async limiter ----------------------------------------------------------------------------


class FakeTime:
    """A virtual clock and a sleep that advances it (yielding once to the loop)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep: Callable[[float], None] | None = None

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.on_sleep is not None:
            self.on_sleep(delay)
        self.now += delay
        await asyncio.sleep(0)


async def test_limiter_sleeps_what_the_controller_says() -> None:
    ft = FakeTime()
    lim = Limiter(RateController(10.0, tuning=EXACT), 4, clock=ft.clock, sleep=ft.sleep)
    sent = [await lim.acquire() for _ in range(4)]
    # The first request also opens a connection: the second keeps an extra interval from it.
    assert sent == pytest.approx([0.0, 0.2, 0.3, 0.4])
    assert ft.sleeps == pytest.approx([0.1, 0.1, 0.1, 0.1])


def test_a_late_wake_up_pushes_the_next_send_back_instead_of_bunching() -> None:
    ctl = RateController(10.0, tuning=EXACT)
    assert ctl.conform(0.0) == 0.0  # the first request: the next keeps two intervals
    assert ctl.conform(0.1) == pytest.approx(0.1)
    assert ctl.conform(0.2) == 0.0
    assert ctl.conform(0.33) == 0.0  # booked for 0.3, its timer fired 30 ms late
    assert ctl.conform(0.4) == pytest.approx(0.03)  # booked for 0.4: waits until 0.43
    assert ctl.conform(0.4301) == 0.0


def test_conform_obeys_a_pause_and_allows_the_burst() -> None:
    c = RateController(10.0, 3.0, tuning=EXACT)
    assert [c.conform(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst goes at once
    assert c.conform(0.0) == pytest.approx(0.1)
    c.on_rate_limited(0.05, 2.0)
    assert c.conform(0.5) == pytest.approx(1.55)  # nothing before the pause ends


def test_a_send_that_leaves_later_than_counted_pushes_the_next_one_back() -> None:
    """Work between the slot and the POST (the ledger's commit of SENT) must not bunch two
    requests at a burst-1 server: the next send keeps its distance from the real one."""
    c = RateController(10.0, 1.0, tuning=EXACT)
    assert c.conform(0.0) == 0.0
    assert c.conform(0.2) == 0.0  # (the first send keeps two intervals)
    c.sent_late(0.23)  # it left at 0.23
    assert c.conform(0.3) == pytest.approx(0.03)  # not before 0.33
    c.sent_late(0.1)  # an earlier real send never pulls the schedule back
    assert c.conform(0.33 + 1e-9) == 0.0


def test_concurrent_late_sends_are_not_serialised_by_each_other() -> None:
    """At a high rate, sixteen senders whose SENT commits finish together go together: the
    schedule follows the latest real send, not the sum of every sender's delay."""
    c = RateController(10_000.0, 1.0, tuning=EXACT)
    t, counted = 0.0, 0
    while counted < 16:  # sixteen sends counted about 0.1 ms apart
        wait = c.conform(t)
        counted += wait == 0.0
        t += wait + 1e-12
    assert t < 0.003
    for _ in range(16):
        c.sent_late(0.003)  # every commit of the group ends at 3 ms
    assert c.conform(0.003 + 1e-4 + 1e-9) == 0.0


async def test_limiter_slot_runs_before_send_after_the_grant_and_counts_its_time() -> None:
    ft = FakeTime()
    ctl = RateController(10.0, 1.0, tuning=EXACT)
    lim = Limiter(ctl, 4, clock=ft.clock, sleep=ft.sleep)
    seen: list[float] = []

    async def commit() -> None:
        seen.append(ft.now)
        ft.now += 0.05  # a slow commit

    async with lim.slot(before_send=commit) as sent_at:
        assert sent_at == pytest.approx(0.05)
    async with lim.slot(before_send=commit) as second:
        pass
    assert seen[0] == 0.0
    assert second - sent_at >= 0.2 - 1e-9  # two intervals after the real first send


async def test_a_pause_that_begins_during_the_commit_holds_the_send() -> None:
    ft = FakeTime()
    ctl = RateController(10.0, 1.0, tuning=EXACT)
    lim = Limiter(ctl, 4, clock=ft.clock, sleep=ft.sleep)

    async def commit_then_429() -> None:
        ctl.on_rate_limited(ft.now, 3.0)  # another sender's 429 arrives meanwhile

    async with lim.slot(before_send=commit_then_429) as sent:
        assert sent >= 3.0


async def test_limiter_books_again_when_a_429_arrives_while_waiting() -> None:
    ft = FakeTime()
    ctl = RateController(10.0, tuning=EXACT)
    lim = Limiter(ctl, 4, clock=ft.clock, sleep=ft.sleep)
    await lim.acquire()  # t = 0

    def a_429_arrives(_: float) -> None:
        ft.on_sleep = None
        ctl.on_rate_limited(ft.now + 0.01, 3.0, sent_at=0.0)

    ft.on_sleep = a_429_arrives
    sent_at = await lim.acquire()
    assert sent_at >= 3.01  # not at its old slot (0.1): after the pause
    assert len(ft.sleeps) == 2


async def test_limiter_bounds_requests_in_flight() -> None:
    ft = FakeTime()
    lim = Limiter(RateController(1e6, 1e6), 3, clock=ft.clock, sleep=ft.sleep)
    inside = 0
    peak = 0
    release = asyncio.Event()
    entered = asyncio.Semaphore(0)

    async def worker() -> None:
        nonlocal inside, peak
        async with lim.slot():
            inside += 1
            peak = max(peak, inside)
            entered.release()
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(worker()) for _ in range(10)]
    for _ in range(3):
        await entered.acquire()
    for _ in range(5):
        await asyncio.sleep(0)  # give the other seven every chance to (wrongly) get in
    assert (inside, peak) == (3, 3)
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 3


async def test_limiter_on_the_real_loop_clock_spaces_sends() -> None:
    lim = Limiter(RateController(500.0, tuning=EXACT), 8)
    sent = [await lim.acquire() for _ in range(6)]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(g >= 1 / 500 - 1e-6 for g in gaps), gaps


async def test_limiter_reports_answers_to_the_controller() -> None:
    ft = FakeTime()
    ctl = RateController(10.0)
    lim = Limiter(ctl, 2, clock=ft.clock, sleep=ft.sleep)
    async with lim.slot() as sent_at:
        ft.now += 0.05
    lim.rate_limited(sent_at, 1.0)
    assert ctl.paused_until == pytest.approx(1.05)
    assert lim.rate < 10.0
    await lim.sleep(0.5)
    assert ft.sleeps[-1] == 0.5


# --- simulation: the controller against a token-bucket server, in virtual time -----------------


@dataclass
class Server:
    """A rate-limited endpoint: token bucket (rate, burst), 429 + Retry-After when empty."""

    rate: float
    burst: float
    retry_after: str = "float"  # "float" (ms precision), "ceil" (whole seconds), "none"
    tokens: float = -1.0
    last: float = 0.0

    def __post_init__(self) -> None:
        self.tokens = self.burst

    def hit(self, t: float) -> tuple[bool, float | None]:
        self.tokens = min(self.burst, self.tokens + (t - self.last) * self.rate)
        self.last = t
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True, None
        wait = (1.0 - self.tokens) / self.rate
        if self.retry_after == "ceil":
            return False, float(math.ceil(wait))
        if self.retry_after == "none":
            return False, None
        return False, round(wait, 3)


@dataclass
class Run:
    accepted: list[float] = field(default_factory=list)  # response times
    limited: list[float] = field(default_factory=list)
    sends: list[float] = field(default_factory=list)
    pauses: list[tuple[float, float]] = field(default_factory=list)  # (429 time, retry-after)
    rates: list[tuple[float, float]] = field(default_factory=list)

    def achieved(self, t0: float, t1: float) -> float:
        return sum(1 for t in self.accepted if t0 <= t < t1) / (t1 - t0)

    def share_429(self, t0: float = 0.0) -> float:
        bad = sum(1 for t in self.limited if t >= t0)
        return bad / max(1, bad + sum(1 for t in self.accepted if t >= t0))

    def settled_at(self, lo: float, hi: float) -> float:
        """The last time the controller's rate was outside [lo, hi]."""
        return max((t for t, r in self.rates if not lo <= r <= hi), default=0.0)


def simulate(
    ctl: RateController,
    server: Server,
    *,
    duration_s: float,
    senders: int = 8,
    latency_s: float = 0.0,
    jitter_s: float = 0.0,
    seed: int = 1,
) -> Run:
    """``senders`` workers, each with an endless backlog: take a token (sleeping in virtual
    time), send, wait one round trip, report the answer; on 429 retry after
    max(Retry-After, full-jitter backoff). Requests reach the server after half the latency
    plus a random jitter."""
    rng = random.Random(seed)
    policy = RetryPolicy(base_s=0.5, cap_s=60.0, max_total_s=1e9)
    run = Run()
    seq = itertools.count()
    events: list[tuple[float, int, str, int, tuple[object, ...]]] = []
    attempts = [0] * senders

    def at(t: float, kind: str, who: int, *data: object) -> None:
        heapq.heappush(events, (t, next(seq), kind, who, data))

    for w in range(senders):
        at(0.0, "acquire", w)
    while events:
        now, _, kind, w, data = heapq.heappop(events)
        if now > duration_s:
            break
        if kind == "acquire":
            at(now + ctl.reserve(now), "wake", w, ctl.generation)
        elif kind == "wake":
            if ctl.generation != data[0]:  # a 429 voided the booking: book again
                at(now, "acquire", w)
                continue
            run.sends.append(now)
            at(now + latency_s / 2 + rng.uniform(0, jitter_s), "arrive", w, now)
        elif kind == "arrive":
            ok, retry_after = server.hit(now)
            at(now + latency_s / 2, "answer", w, data[0], ok, retry_after)
        else:
            sent_at, accepted, wait = data
            assert isinstance(sent_at, float)
            if accepted:
                run.accepted.append(now)
                ctl.on_success(now, sent_at)
                attempts[w] = 0
                at(now, "acquire", w)
            else:
                assert wait is None or isinstance(wait, float)
                run.limited.append(now)
                run.pauses.append((now, wait or 0.0))
                ctl.on_rate_limited(now, wait, sent_at)
                delay = policy.next_delay(attempts[w], 0.0, rng.random(), wait)
                attempts[w] += 1
                at(now + (delay or 0.0), "acquire", w)
            run.rates.append((now, ctl.rate))
    return run


R = 20.0
LATENCIES = (0.0, 0.05, 0.2)
JITTER_S = 0.0005  # arrival jitter at the server: timers and the network are never exact


@pytest.mark.parametrize("retry_after", ["float", "ceil", "none"])
@pytest.mark.parametrize("burst", [1, 2, 5])
@pytest.mark.parametrize("latency_s", LATENCIES)
def test_sim_configured_at_the_server_rate(retry_after: str, burst: int, latency_s: float) -> None:
    run = simulate(
        RateController(R),
        Server(R, burst, retry_after),
        duration_s=60.0,
        latency_s=latency_s,
        jitter_s=JITTER_S,
    )
    achieved = run.achieved(0.0, 60.0)
    # A burst-1 server refuses any request that arrives early by more than the pacing slack;
    # with whole-second Retry-After each of those costs a second of silence.
    floor = 0.92 if (burst == 1 and retry_after == "ceil") else 0.97
    assert achieved >= floor * R, (achieved, run.share_429())
    assert run.share_429() < 0.01


@pytest.mark.parametrize("latency_s", LATENCIES)
def test_sim_configured_at_the_server_rate_without_jitter_sends_no_429(latency_s: float) -> None:
    for burst in (1, 2, 5):
        run = simulate(RateController(R), Server(R, burst), duration_s=60.0, latency_s=latency_s)
        assert run.limited == []
        assert run.achieved(0.0, 60.0) >= 0.98 * R


@pytest.mark.parametrize("retry_after", ["float", "none"])
@pytest.mark.parametrize("burst", [1, 2, 5])
@pytest.mark.parametrize("latency_s", LATENCIES)
def test_sim_ten_times_too_high_settles_near_the_server_rate(
    retry_after: str, burst: int, latency_s: float
) -> None:
    run = simulate(
        RateController(10 * R),
        Server(R, burst, retry_after),
        duration_s=60.0,
        latency_s=latency_s,
        jitter_s=JITTER_S,
    )
    assert run.settled_at(0.8 * R, 1.15 * R) <= 12.0
    assert run.achieved(15.0, 60.0) >= 0.93 * R
    assert run.share_429(15.0) < 0.015


@pytest.mark.parametrize("burst", [1, 5])
def test_sim_ten_times_too_high_with_whole_second_retry_after(burst: int) -> None:
    run = simulate(
        RateController(10 * R),
        Server(R, burst, "ceil"),
        duration_s=90.0,
        latency_s=0.05,
        jitter_s=JITTER_S,
    )
    assert run.settled_at(0.8 * R, 1.15 * R) <= 20.0
    assert run.achieved(30.0, 90.0) >= 0.88 * R
    assert run.share_429(30.0) < 0.015


def test_sim_a_429_pauses_every_sender() -> None:
    run = simulate(
        RateController(10 * R), Server(R, 1, "ceil"), duration_s=20.0, latency_s=0.0, senders=8
    )
    assert run.pauses
    for t429, retry_after in run.pauses:
        # Zero latency: nothing in flight at the 429, so no sender sends during its pause.
        assert not [s for s in run.sends if t429 < s < t429 + retry_after - 1e-9]


def test_sim_follows_a_limit_that_drops_and_rises() -> None:
    class Moving(Server):
        def hit(self, t: float) -> tuple[bool, float | None]:
            self.rate = 20.0 if t < 60 else (10.0 if t < 120 else 30.0)
            return super().hit(t)

    run = simulate(RateController(50.0), Moving(20.0, 2), duration_s=240.0, latency_s=0.05)
    assert run.achieved(20, 60) >= 0.9 * 20
    assert 0.9 * 10 <= run.achieved(80, 120) <= 10.2
    assert run.achieved(200, 240) >= 0.75 * 30  # probes its way up again


def _report() -> None:  # pragma: no cover - a figure printer, not a test
    for configured in (R, 10 * R):
        for retry_after in ("float", "ceil", "none"):
            for burst in (1, 2, 5):
                for latency in LATENCIES:
                    run = simulate(
                        RateController(configured),
                        Server(R, burst, retry_after),
                        duration_s=60.0,
                        latency_s=latency,
                        jitter_s=JITTER_S,
                    )
                    print(
                        f"configured {configured:5.0f}  retry-after {retry_after:5s}  "
                        f"burst {burst}  latency {latency * 1000:3.0f} ms:  "
                        f"achieved {run.achieved(0, 60) / R:5.3f} R (after 15 s: "
                        f"{run.achieved(15, 60) / R:5.3f} R)  429s {100 * run.share_429():4.2f} %"
                        f"  settled (0.8-1.15 R) after {run.settled_at(0.8 * R, 1.15 * R):4.1f} s"
                    )


if __name__ == "__main__":  # pragma: no cover
    _report()
