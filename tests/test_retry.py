"""RetryPolicy: full-jitter exponential backoff, the Retry-After floor, and the total-time cap."""

from __future__ import annotations

import pytest

from ingest.registrar.retry import RetryPolicy


def test_ceiling_doubles_per_attempt_until_the_cap() -> None:
    p = RetryPolicy(base_s=0.5, cap_s=4.0, max_total_s=1e9)
    # rand = 1 shows the ceiling of each attempt's window.
    assert [p.next_delay(n, 0.0, 1.0) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_full_jitter_scales_the_whole_window() -> None:
    p = RetryPolicy(base_s=1.0, cap_s=100.0, max_total_s=1e9)
    assert p.next_delay(3, 0.0, 0.0) == 0.0  # full jitter: may retry at once
    assert p.next_delay(3, 0.0, 0.25) == pytest.approx(2.0)  # 0.25 x 8
    assert p.next_delay(3, 0.0, 0.999) == pytest.approx(7.992)


def test_rand_outside_unit_interval_is_clamped() -> None:
    p = RetryPolicy(base_s=1.0, cap_s=10.0, max_total_s=1e9)
    assert p.next_delay(1, 0.0, -3.0) == 0.0
    assert p.next_delay(1, 0.0, 7.0) == 2.0


def test_server_delay_is_a_floor_even_above_the_cap() -> None:
    p = RetryPolicy(base_s=0.5, cap_s=2.0, max_total_s=1e9)
    assert p.next_delay(0, 0.0, 0.0, server_delay_s=3.0) == 3.0
    assert p.next_delay(10, 0.0, 1.0, server_delay_s=30.0) == 30.0
    # ... and does not lower a longer jittered wait.
    assert p.next_delay(3, 0.0, 1.0, server_delay_s=0.1) == 2.0


def test_gives_up_when_the_wait_would_pass_the_total_budget() -> None:
    p = RetryPolicy(base_s=1.0, cap_s=10.0, max_total_s=60.0)
    assert p.next_delay(2, 55.0, 1.0) == 4.0  # 55 + 4 = 59 fits
    assert p.next_delay(2, 56.5, 1.0) is None  # 56.5 + 4 > 60
    assert p.next_delay(2, 55.0, 0.5) == 2.0
    assert p.next_delay(0, 10.0, 0.0, server_delay_s=51.0) is None  # Retry-After beyond it


def test_exact_budget_is_allowed() -> None:
    p = RetryPolicy(base_s=1.0, cap_s=10.0, max_total_s=10.0)
    assert p.next_delay(1, 8.0, 1.0) == 2.0


def test_zero_budget_never_retries() -> None:
    p = RetryPolicy(base_s=1.0, cap_s=10.0, max_total_s=0.0)
    assert p.next_delay(0, 0.0, 0.5) is None
    assert p.next_delay(0, 0.0, 0.0) == 0.0  # a zero wait fits a zero budget


def test_huge_attempt_numbers_do_not_overflow() -> None:
    p = RetryPolicy(base_s=0.5, cap_s=60.0, max_total_s=1e9)
    assert p.next_delay(5000, 0.0, 1.0) == 60.0


def test_retries_sum_up_to_the_budget() -> None:
    """Driving the policy as the registrar does ends after the budget, not before or after."""
    p = RetryPolicy(base_s=1.0, cap_s=8.0, max_total_s=30.0)
    elapsed, attempt = 0.0, 0
    while (d := p.next_delay(attempt, elapsed, 1.0)) is not None:
        elapsed += d
        attempt += 1
    # 1 + 2 + 4 + 8 + 8 = 23; the next 8 would make 31 > 30.
    assert (attempt, elapsed) == (5, 23.0)


@pytest.mark.parametrize(
    "kwargs", [{"base_s": 0.0}, {"cap_s": 0.0}, {"max_total_s": -1.0}, {"base_s": -1.0}]
)
def test_invalid_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


def test_negative_attempt_is_refused() -> None:
    with pytest.raises(ValueError):
        RetryPolicy().next_delay(-1, 0.0, 0.5)
