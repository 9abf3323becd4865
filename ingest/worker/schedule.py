"""When the worker acts: sync schedules (interval or cron), jitter and back-off. Pure: every
function takes the time (``time.time()`` seconds, UTC) instead of reading a clock.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

from ingest.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31), ("month", 1, 12))


@dataclass(frozen=True)
class Schedule:
    """``every <n><s|m|h|d>`` or a 5-field cron expression (minute hour day month weekday,
    UTC; weekday 0 or 7 = Sunday; ``*``, ``a-b``, ``*/n``, ``a-b/n`` and lists)."""

    text: str
    period_s: float = 0.0  # interval schedules
    cron: tuple[frozenset[int], ...] = ()  # minute, hour, day, month, weekday (0 = Sunday)
    any_day: bool = True  # day-of-month field is '*'
    any_weekday: bool = True  # weekday field is '*'

    def next_after(self, now: float) -> float:
        """The first firing time strictly after ``now``."""
        if self.period_s:
            return now + self.period_s
        return _next_cron(self, now)

    def typical_period_s(self, now: float) -> float:
        """The longest gap between the next few firings (for the readiness threshold)."""
        if self.period_s:
            return self.period_s
        t, gaps = self.next_after(now), []
        for _ in range(4):
            nxt = self.next_after(t)
            gaps.append(nxt - t)
            t = nxt
        return max(gaps)


def parse_schedule(text: str) -> Schedule:
    """Parse worker.schedule; ConfigError names the field and the accepted forms."""
    s = text.strip().lower()
    m = re.fullmatch(r"every\s+(\d+(?:\.\d+)?)\s*([smhd]?)", s)
    if m:
        period = float(m.group(1)) * _UNITS[m.group(2) or "s"]
        if period < 1:
            raise _bad(text, "an interval must be at least 1 s")
        return Schedule(text, period_s=period)
    parts = s.split()
    if len(parts) != 5:
        raise _bad(text, 'use "every 30m" / "every 1h" or 5 cron fields')
    sets = [
        _field(p, name, lo, hi, text) for p, (name, lo, hi) in zip(parts, _FIELDS, strict=False)
    ]
    weekdays = {d % 7 for d in _field(parts[4], "weekday", 0, 7, text)}
    return Schedule(
        text,
        cron=(*sets, frozenset(weekdays)),
        any_day=parts[2] == "*",
        any_weekday=parts[4] == "*",
    )


def _bad(text: str, why: str) -> ConfigError:
    return ConfigError(f"config: worker.schedule = {text!r} is not a schedule: {why}")


def _field(part: str, name: str, lo: int, hi: int, text: str) -> frozenset[int]:
    out: set[int] = set()
    for piece in part.split(","):
        m = re.fullmatch(r"(\*|\d+)(?:-(\d+))?(?:/(\d+))?", piece)
        if not m:
            raise _bad(text, f"cannot read the {name} field {part!r}")
        start, end, step = m.group(1), m.group(2), m.group(3)
        if start == "*":
            a, b = lo, hi
        else:
            a = int(start)
            b = int(end) if end is not None else (hi if step else a)
        n = int(step) if step else 1
        if not (lo <= a <= hi and lo <= b <= hi and a <= b and n >= 1):
            raise _bad(text, f"the {name} field {part!r} is outside {lo}-{hi}")
        out.update(range(a, b + 1, n))
    return frozenset(out)


def _next_cron(s: Schedule, now: float) -> float:
    minutes, hours, days, months, weekdays = s.cron
    t = (int(now) // 60 + 1) * 60  # the next whole minute
    for _ in range(100_000):  # bounded: enough for any satisfiable expression over 28 years
        tm = time.gmtime(t)
        if tm.tm_mon not in months:
            y, mo = (tm.tm_year + 1, 1) if tm.tm_mon == 12 else (tm.tm_year, tm.tm_mon + 1)
            t = calendar.timegm((y, mo, 1, 0, 0, 0))
            continue
        if not _day_ok(s, days, weekdays, tm):
            t = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, 0, 0, 0)) + 86400
            continue
        if tm.tm_hour not in hours:
            t = calendar.timegm((tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_hour, 0, 0)) + 3600
            continue
        if tm.tm_min not in minutes:
            t += 60
            continue
        return float(t)
    raise ConfigError(f"config: worker.schedule = {s.text!r} never fires")


def _day_ok(
    s: Schedule, days: frozenset[int], weekdays: frozenset[int], tm: time.struct_time
) -> bool:
    weekday = (tm.tm_wday + 1) % 7  # struct_time: Monday = 0; cron: Sunday = 0
    if s.any_day and s.any_weekday:
        return True
    if s.any_day:
        return weekday in weekdays
    if s.any_weekday:
        return tm.tm_mday in days
    return tm.tm_mday in days or weekday in weekdays  # cron: either restriction matches


def with_jitter(t: float, jitter_s: float, u: float) -> float:
    """``t`` delayed by a uniform fraction ``u`` in [0, 1) of ``jitter_s``."""
    return t + max(0.0, jitter_s) * u


def failed_retry_due(
    failures: int, failed_at: float, now: float, base_s: float, cap_s: float
) -> bool:
    """A failed item is retried once base * 2^(failures-1) (capped) has passed since it failed."""
    wait = min(cap_s, base_s * float(2 ** max(0, min(failures - 1, 40))))
    return bool(now >= failed_at + wait)


def unreachable_delay_s(attempt: int, cap_s: float, u: float) -> float:
    """Wait before the next preflight after ``attempt`` failures in a row: exponential from
    1 s, capped, with half-jitter so a fleet of workers does not knock in step."""
    full = min(cap_s, 2.0 ** min(attempt, 30))
    return full / 2 + full / 2 * u
