"""Worker schedules and back-off: pure functions of the time."""

from __future__ import annotations

import calendar

import pytest

from ingest.config import load
from ingest.errors import ConfigError
from ingest.worker.schedule import (
    failed_retry_due,
    parse_schedule,
    unreachable_delay_s,
    with_jitter,
)


def _t(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> float:
    return float(calendar.timegm((y, mo, d, h, mi, s)))


@pytest.mark.parametrize(
    ("text", "period"),
    [
        ("every 15m", 900),
        ("every 3600s", 3600),
        ("every 1h", 3600),
        ("EVERY 2d", 172800),
        ("every 90", 90),
        ("every 1.5h", 5400),
    ],
)
def test_intervals(text: str, period: float) -> None:
    s = parse_schedule(text)
    assert s.next_after(1000.0) == 1000.0 + period
    assert s.typical_period_s(0) == period


@pytest.mark.parametrize(
    ("expr", "now", "expected"),
    [
        ("0 2 * * *", _t(2026, 11, 25, 1, 59, 59), _t(2026, 11, 25, 2)),
        ("0 2 * * *", _t(2026, 11, 25, 2), _t(2026, 11, 26, 2)),  # strictly after
        ("*/15 * * * *", _t(2026, 11, 25, 10, 16), _t(2026, 11, 25, 10, 30)),
        ("30 23 31 12 *", _t(2026, 12, 31, 23, 31), _t(2027, 12, 31, 23, 30)),
        ("0 0 29 2 *", _t(2026, 3, 1), _t(2028, 2, 29)),  # next leap day
        ("0 9 * * 1-5", _t(2026, 11, 27, 10), _t(2026, 11, 30, 9)),  # Fri 10:00 → Mon 09:00
        ("0 9 * * 0", _t(2026, 11, 25), _t(2026, 11, 29, 9)),  # Sunday as 0
        ("0 9 * * 7", _t(2026, 11, 25), _t(2026, 11, 29, 9)),  # and as 7
        # Both day fields restricted: either matches (cron semantics): the 1st, or a Monday.
        ("0 0 1 * 1", _t(2026, 11, 25), _t(2026, 11, 30)),
        ("5,35 1-2 * 6 *", _t(2026, 11, 25), _t(2027, 6, 1, 1, 5)),
    ],
)
def test_cron_next(expr: str, now: float, expected: float) -> None:
    assert parse_schedule(expr).next_after(now) == expected


def test_cron_period_for_readiness() -> None:
    assert parse_schedule("0 2 * * *").typical_period_s(_t(2026, 11, 25)) == 86400
    assert parse_schedule("0 9 * * 1-5").typical_period_s(_t(2026, 11, 26)) == 3 * 86400


@pytest.mark.parametrize(
    "text",
    [
        "hourly",
        "every",
        "every 0s",
        "61 * * * *",
        "* * * *",
        "0 2 30-1 * *",
        "0 0 31 2 *",
        "*/0 * * * *",
        "a b c d e",
    ],
)
def test_bad_schedules_fail_with_the_field_named(text: str) -> None:
    with pytest.raises(ConfigError, match=r"worker\.schedule"):
        parse_schedule(text).next_after(0)


def test_config_rejects_a_bad_schedule_before_any_work() -> None:
    with pytest.raises(ConfigError, match=r"worker\.schedule"):
        load(None, ["worker.schedule=every day"])
    with pytest.raises(ConfigError, match="events_queue"):
        load(None, ["worker.events=sqs"])


def test_jitter_and_backoffs() -> None:
    assert with_jitter(100.0, 60.0, 0.5) == 130.0
    assert with_jitter(100.0, 0.0, 0.99) == 100.0
    # failed items: base * 2^(failures-1), capped
    assert not failed_retry_due(1, 1000.0, 1299.0, 300, 86400)
    assert failed_retry_due(1, 1000.0, 1300.0, 300, 86400)
    assert not failed_retry_due(3, 1000.0, 1000.0 + 1199, 300, 86400)
    assert failed_retry_due(3, 1000.0, 1000.0 + 1200, 300, 86400)
    assert failed_retry_due(500, 0.0, 86400.0, 300, 86400)  # the cap holds, no overflow
    # unreachable: exponential from 1 s with half jitter, capped
    assert unreachable_delay_s(0, 300, 0.0) == 0.5 and unreachable_delay_s(0, 300, 1.0) == 1.0
    assert unreachable_delay_s(4, 300, 1.0) == 16.0
    assert 150.0 <= unreachable_delay_s(60, 300, 0.3) <= 300.0
