"""Simulated time for the workload: the real-to-simulated mapping and the activity curve.

`SimClock` runs `speed` simulated seconds per real second from `start`, anchored at a
`time.monotonic()` reading; pgsage's own clock (settings `clock_speed`, `clock_start`) is set to
the same values at the same moment, so the proxy's logged `started_at` and the simulator agree.

`activity(t)` is how busy the warehouse is at simulated time `t`, relative to a weekday's peak
hour (1.0): business hours with a lunch dip and an evening lull, quiet nights, slow weekends,
and a month-end spike (the last two days of a month and the first). Arrival rates are the
configured average rate times `activity(t) / MEAN_ACTIVITY`, so over weeks the average is kept.
"""

from __future__ import annotations

import calendar
import math
import time
from datetime import UTC, datetime, timedelta

#: activity at the middle of each hour of a weekday (UTC is the business time zone)
HOURLY = (
    0.04, 0.03, 0.03, 0.03, 0.04, 0.08, 0.18, 0.45,  # 00-07: night, early risers
    0.80, 0.95, 1.00, 0.97, 0.62, 0.70, 0.96, 1.00,  # 08-15: morning peak, lunch dip 12-13
    0.90, 0.72, 0.42, 0.28, 0.20, 0.14, 0.09, 0.06,  # 16-23: wind down, evening lull
)  # fmt: skip
#: Monday first
WEEKDAY = (1.00, 1.00, 0.98, 0.97, 0.90, 0.25, 0.18)
MONTH_END = 1.8
PEAK_HOURS = (10, 15)


def month_end_factor(day: datetime) -> float:
    """MONTH_END on the last two days of a month and the first day of the next, else 1."""
    last = calendar.monthrange(day.year, day.month)[1]
    return MONTH_END if day.day >= last - 1 or day.day == 1 else 1.0


def activity(t: datetime) -> float:
    """Relative arrival intensity at simulated time `t` (weekday peak hour = 1.0)."""
    hours = t.hour + t.minute / 60 + t.second / 3600 - 0.5
    base = math.floor(hours)
    frac = hours - base
    # linear between hour midpoints, wrapping around midnight
    hourly = HOURLY[base % 24] * (1 - frac) + HOURLY[(base + 1) % 24] * frac
    return hourly * WEEKDAY[t.weekday()] * month_end_factor(t)


def _mean_activity() -> float:
    """Average activity over four ordinary weeks plus the month-end days, at 10-minute steps."""
    start = datetime(2026, 2, 2, tzinfo=UTC)  # a Monday; the span covers Feb's month end
    steps = 28 * 24 * 6
    return sum(activity(start + timedelta(minutes=10 * i)) for i in range(steps)) / steps


MEAN_ACTIVITY = _mean_activity()
#: the largest value `activity` takes (for thinning a Poisson process)
MAX_ACTIVITY = max(HOURLY) * max(WEEKDAY) * MONTH_END


class SimClock:
    """`speed` simulated seconds per real second; simulated `start` at monotonic `anchor`."""

    def __init__(self, start: datetime, speed: float, anchor: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("clock speed must be positive")
        self.start = start if start.tzinfo else start.replace(tzinfo=UTC)
        self.speed = float(speed)
        self.anchor = time.monotonic() if anchor is None else anchor
        self._start_epoch = self.start.timestamp()

    def reanchor(self, anchor: float | None = None) -> None:
        """Simulated `start` is now (or at monotonic `anchor`)."""
        self.anchor = time.monotonic() if anchor is None else anchor

    def sim_epoch(self, monotonic: float) -> float:
        return self._start_epoch + (monotonic - self.anchor) * self.speed

    def sim_at(self, monotonic: float) -> datetime:
        """The simulated time of a `time.monotonic()` reading."""
        return datetime.fromtimestamp(self.sim_epoch(monotonic), UTC)

    def real_at(self, sim_epoch: float) -> float:
        """The `time.monotonic()` reading at which simulated epoch seconds `sim_epoch` arrive."""
        return self.anchor + (sim_epoch - self._start_epoch) / self.speed

    def now(self) -> datetime:
        return self.sim_at(time.monotonic())
